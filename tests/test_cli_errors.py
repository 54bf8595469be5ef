"""Every subcommand over a table of bad arguments: exit status 2, exactly one line on stderr, no traceback.

Each row is something a user can type. The rows run in-process through `lmspec.cli.main`, so a
traceback would surface as an exception here rather than as text.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch

import lmspec
from lmspec.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "examples" / "mimo_v2_flash_tiny.yaml")
FULL = str(ROOT / "examples" / "mimo_v2_flash.yaml")
SMALL = [
    "--set",
    "model.hidden_size=32",
    "--set",
    "model.ffn.moe.num_experts=4",
    "--set",
    "model.ffn.moe.expert_intermediate_size=16",
    "--set",
    "model.ffn.dense.intermediate_size=32",
]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("bad")
    torch.manual_seed(0)
    ckpt = d / "ckpt"
    lmspec.build(TINY, overrides=[o for o in SMALL if o != "--set"]).save_pretrained(ckpt)
    garbled = d / "garbled_run"
    garbled.mkdir()
    (garbled / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{not json\n\x00\x01')
    binary = d / "binary.json"
    binary.write_bytes(os.urandom(512))
    wrong_types = d / "wrong_types.json"
    wrong_types.write_text('{"hidden_size": "wide", "num_hidden_layers": [1], "vocab_size": null}')
    fifo = d / "fifo"
    os.mkfifo(fifo)
    readonly = d / "readonly"
    readonly.mkdir()
    readonly.chmod(stat.S_IRUSR | stat.S_IXUSR)
    a_file = d / "a_file"
    a_file.write_text("not a directory\n")
    chain = d / "chain"  # a spec and the file it extends
    chain.mkdir()
    for example in (TINY, FULL):
        shutil.copy(example, chain)
    foreign = d / "foreign"  # a folder whose model.py is the user's own
    foreign.mkdir()
    (foreign / "model.py").write_text("print('my own model')\n")
    bigint = d / "bigint.json"
    bigint.write_text('{"hidden_size": ' + "9" * 5000 + "}")
    text = d / "text.txt"
    text.write_text("def f(x):\n    return x\n" * 20)
    return {
        "ckpt": str(ckpt),
        "spec": str(ckpt / "spec.yaml"),
        "garbled": str(garbled),
        "binary": str(binary),
        "wrong_types": str(wrong_types),
        "fifo": str(fifo),
        "readonly": str(readonly / "out"),
        "a_file": str(a_file),
        "child": str(chain / Path(TINY).name),
        "parent": str(chain / Path(FULL).name),
        "foreign": str(foreign),
        "config": str(ckpt / "config.json"),
        "bigint": str(bigint),
        "text": str(text),
        "tmp": str(d),
    }


# (subcommand and arguments, with {placeholders} from `files`)
CASES = [
    ["check", "/dev/zero"],
    ["check", "{fifo}"],
    ["check", "{tmp}"],
    ["check", TINY, "--set", "model.hidden_size=banana"],
    ["stats", TINY, "--context", "-5"],
    ["stats", TINY, "--context", "nan"],
    ["stats", TINY, "--kv-dtype-bytes", "0"],
    ["graph", TINY, "--layers", "9-2"],
    ["graph", TINY, "--format", "jpeg"],
    ["graph", TINY, "-o", "/proc/nope/graph.txt"],
    ["compile", TINY, "-o", "/proc/nope"],
    ["compile", TINY, "-o", "{a_file}"],
    ["import-hf", "{tmp}", "-o", "{tmp}/x.yaml"],
    ["import-hf", "{binary}", "-o", "{tmp}/x.yaml"],
    ["import-hf", "{wrong_types}", "-o", "{tmp}/x.yaml"],
    ["import-hf", "/dev/zero", "-o", "{tmp}/x.yaml"],
    ["test-kernels", TINY, "--examples", "-1"],
    ["test-kernels", TINY, "--seq-len", "0"],
    ["train", TINY, "--max-tokens", "2000", "--device", "banana", "--out", "{tmp}/run_a"],
    ["train", TINY, "--max-tokens", "2000", "--backend", "banana", "--out", "{tmp}/run_b"],
    ["train", TINY, "--max-tokens", "inf", "--out", "{tmp}/run_c"],
    ["train", TINY, "--max-tokens", "nan", "--out", "{tmp}/run_d"],
    ["train", TINY, "--max-tokens", "2000", "--eval-every", "-1", "--out", "{tmp}/run_e"],
    ["train", TINY, "--max-tokens", "2000", "--checkpoint-every", "0", "--out", "{tmp}/run_f"],
    ["train", TINY, "--max-tokens", "2000", "--micro-batch-size", "-2", "--out", "{tmp}/run_g"],
    ["train", TINY, "--max-tokens", "2000", "--eval-tokens", "-1", "--out", "{tmp}/run_h"],
    ["train", TINY, "--max-tokens", "2000", "--out", "{a_file}"],
    ["train", TINY, "--max-tokens", "2000", "--out", "/proc/run"],
    ["train", TINY, "--max-tokens", "2000", "--data", "/dev/zero", "--out", "{tmp}/run_i"],
    ["train", TINY, "--max-tokens", "2000", "--data", "{fifo}", "--out", "{tmp}/run_j"],
    ["plot", "{garbled}"],
    ["plot", "{tmp}/no_such_run"],
    ["tokenizer", "train", "--vocab-size", "1e8", "-o", "{tmp}/tok.json"],
    ["tokenizer", "train", "--vocab-size", "0", "-o", "{tmp}/tok.json"],
    ["tokenizer", "train", "--vocab-size", "300", "--data", "{fifo}", "-o", "{tmp}/tok.json"],
    ["generate", "{spec}", "--checkpoint", "{ckpt}", "--prompt", "hi", "--seed", str(2**64)],
    ["generate", "{spec}", "--checkpoint", "{ckpt}", "--prompt", "hi", "--temperature", "nan"],
    ["generate", "{spec}", "--checkpoint", "{ckpt}", "--prompt", "hi", "--max-tokens", "-1"],
    ["generate", "{spec}", "--checkpoint", "{tmp}/no_such_ckpt", "--prompt", "hi"],
    ["generate", FULL, "--checkpoint", "{ckpt}", "--prompt", "hi"],
    ["serve", "{spec}", "--checkpoint", "{ckpt}", "--max-batch", "100000"],
    ["serve", "{spec}", "--checkpoint", "{ckpt}", "--port", "70000"],
    ["serve", "{spec}", "--checkpoint", "{ckpt}", "--max-batch", "0"],
    ["check", TINY, "--world-size", "0"],
    ["check", TINY, "--world-size", "1e9"],
    ["check", TINY, "--world-size", "3", "--set", "training.parallel.expert=2"],
    ["plan", FULL, "--gpus", "0", "--gpu-memory", "141GB"],
    ["plan", FULL, "--gpus", "1e9", "--gpu-memory", "141GB"],
    ["plan", FULL, "--gpus", "-8", "--gpu-memory", "141GB"],
    ["plan", FULL, "--gpus", "64", "--gpu-memory", "abc"],
    ["plan", FULL, "--gpus", "64", "--gpu-memory", "0"],
    ["plan", FULL, "--gpus", "64", "--gpu-memory", "0GB"],
    ["plan", FULL, "--gpus", "64", "--gpu-memory", "141"],
    ["plan", FULL, "--gpus", "64", "--gpu-memory", "1e400GB"],
    ["plan", FULL, "--gpus", "64", "--gpu-memory", "nanGB"],
    ["plan", FULL, "--gpus", "64", "--gpu-memory", "141GB", "--seq-len", "1e12"],
    ["plan", FULL, "--gpus", "64", "--gpu-memory", "141GB", "--seq-len", "300000"],
    ["plan", FULL, "--gpus", "64", "--gpu-memory", "141GB", "--micro-batch", "0"],
    ["plan", FULL, "--gpus", "64", "--gpu-memory", "141GB", "--micro-batch", "1e9"],
    ["plan", FULL, "--gpus", "64", "--gpu-memory", "141GB", "--precision", "fp8"],
    ["plan", FULL, "--gpus", "64", "--gpu-memory", "141GB", "--layout", "1,1,2"],
    ["plan", FULL, "--gpus", "64", "--gpu-memory", "141GB", "--layout", "1,1,2,4"],
    ["plan", FULL, "--gpus", "64"],
    ["plan", "/dev/zero", "--gpus", "64", "--gpu-memory", "141GB"],
    ["bogus-command"],
]

# Outputs that would destroy an input, never finish, or mean "here" by accident.
OUTPUT_CASES = [
    ["graph", "{spec}", "-o", "{spec}"],
    ["graph", "{child}", "-o", "{parent}"],
    ["graph", TINY, "-o", "{fifo}"],
    ["graph", TINY, "-o", ""],
    ["compile", TINY, "-o", ""],
    ["compile", TINY, "-o", "{foreign}"],
    ["compile", TINY, "-o", "{fifo}"],
    ["import-hf", "{config}", "-o", "{config}"],
    ["import-hf", "{config}", "-o", "{fifo}"],
    ["import-hf", "{bigint}", "-o", "{tmp}/x.yaml"],
    ["plot", "{garbled}", "-o", "{garbled}/metrics.jsonl"],
    ["plot", "{garbled}", "-o", "{garbled}/notes.yaml"],
    ["plot", "{garbled}", "-o", "{fifo}"],
    ["tokenizer", "train", "--data", "{text}", "{text}", "--vocab-size", "300", "-o", "{text}"],
    ["tokenizer", "train", "--vocab-size", "300", "-o", "{fifo}"],
    ["train", TINY, "--max-tokens", "2000", "--out", ""],
]
CASES += OUTPUT_CASES


def _ids(case: list[str]) -> str:
    return " ".join(Path(a).name if "/" in a else a for a in case)[:60]


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_bad_arguments_exit_2_with_one_line(case, files, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing a failed command leaves behind lands in the repository
    argv = [a.format(**files) for a in case]
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse refuses before a command runs
        rc = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, f"{argv}: exit {rc}, stderr {err!r}"
    assert len(lines) == 1, f"{argv}: expected one line on stderr, got {lines}"
    assert "Traceback" not in err


def test_outputs_never_replace_what_the_command_reads(files, capsys, tmp_path, monkeypatch):
    """The cases above refuse before writing: every input they name keeps its bytes."""
    monkeypatch.chdir(tmp_path)
    names = ("spec", "child", "parent", "config", "text")
    inputs = [Path(files[k]) for k in names] + [Path(files["garbled"]) / "metrics.jsonl"]
    inputs.append(Path(files["foreign"]) / "model.py")
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in inputs}
    for case in OUTPUT_CASES:
        assert main([a.format(**files) for a in case]) == 2, case
    capsys.readouterr()
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in inputs} == before
    assert not list(tmp_path.iterdir())  # an empty -o or --out never meant "here"
