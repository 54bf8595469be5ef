"""Loader limits and semantic bounds: every hostile or absurd input is refused by `lmspec check` (or
`lmspec import-hf`) with exit 2, one line, quickly and in little memory.

Each case runs `lmspec` in its own process; its peak RSS and wall time come from `os.wait4` on that
process alone. The contract is 2 s and 200 MB per case on a quiet machine (`lmspec check` of a valid
spec takes about 0.5 s and 50 MB); the test asserts the memory bound and, since the test machine is
shared, only a generous 10 s ceiling on time. `pytest -s` prints every figure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from lmspec.spec.limits import (
    MAX_EXTENDS_DEPTH,
    MAX_FILE_BYTES,
    MAX_LAYERS,
    MAX_PATTERN_CHARS,
    MAX_QUOTE_CHARS,
    MAX_YAML_VALUES,
)

from .conftest import TINY

MAX_RSS = 200 * 2**20
TIME_CEILING_S = 10.0  # the contract is 2 s; a shared CI machine gets a wide margin
LINE_LIMIT = 6 * MAX_QUOTE_CHARS + 2 * 4096  # quoted input is clipped; a path may be long

# A fresh, small Python forks and execs `python -m lmspec ARGS` and reports that child's own peak
# RSS and wall time. (Linux keeps a process's RSS high-water mark across exec, and a child forked
# straight from pytest starts with pytest's pages counted, so the launcher must be a small process.)
LAUNCHER = """
import json, os, sys, time
report, args = sys.argv[1], sys.argv[2:]
start = time.monotonic()
pid = os.fork()
if pid == 0:
    os.execv(sys.executable, [sys.executable, "-m", "lmspec", *args])
_, status, usage = os.wait4(pid, 0)
seconds = time.monotonic() - start
with open(report, "w") as f:
    json.dump({"rc": os.waitstatus_to_exitcode(status), "seconds": seconds, "kb": usage.ru_maxrss}, f)
"""


@dataclass(frozen=True)
class Run:
    rc: int
    out: str
    err: str
    seconds: float
    max_rss: int  # bytes


def run(*args: str | Path, timeout: float = 120.0) -> Run:
    """`lmspec ARGS` in its own process, measured: its peak RSS and wall time."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "usage.json"
        proc = subprocess.run(
            [sys.executable, "-c", LAUNCHER, str(report), *map(str, args)],
            capture_output=True,
            stdin=subprocess.DEVNULL,
            timeout=timeout,
        )
        usage = json.loads(report.read_text())
    assert proc.returncode == 0, proc.stderr[-2000:]
    return Run(
        usage["rc"],
        proc.stdout.decode(errors="replace"),
        proc.stderr.decode(errors="replace"),
        usage["seconds"],
        usage["kb"] * 1024,
    )


def assert_refused(result: Run, *fragments: str) -> str:
    """Exit 2, nothing on stdout, one short line on stderr holding each fragment, within the bounds."""
    print(
        f"  rc {result.rc}  {result.seconds:5.2f} s  {result.max_rss / 2**20:6.1f} MB  {result.err.strip()[:150]}"
    )
    assert result.rc == 2, result.err[-2000:]
    assert result.out == ""
    assert "Traceback" not in result.err
    lines = result.err.strip("\n").split("\n")
    assert len(lines) == 1, result.err[:2000]
    assert len(lines[0]) <= LINE_LIMIT, len(lines[0])
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert result.max_rss < MAX_RSS, result.max_rss
    assert result.seconds < TIME_CEILING_S, result.seconds
    return lines[0]


def check(*args: str | Path) -> str:
    return assert_refused(run("check", *args))


def test_a_valid_spec_is_the_baseline():
    result = run("check", TINY)
    print(f"  baseline: {result.seconds:.2f} s, {result.max_rss / 2**20:.1f} MB")
    assert result.rc == 0 and result.max_rss < MAX_RSS
    # The measure sees more than the launcher: `check` loads pydantic, PyYAML and the schema.
    assert result.max_rss > 20 * 2**20


# ---------------------------------------------------------------------------------------------
# Files that are not spec files
# ---------------------------------------------------------------------------------------------


def test_dev_zero_is_refused_before_reading():
    assert check("/dev/zero").endswith("expected a regular file, got a character device")


def test_a_fifo_is_refused_without_hanging(tmp_path):
    fifo = tmp_path / "spec.fifo"
    os.mkfifo(fifo)  # nobody ever writes: opening it for reading would block forever
    assert check(fifo).endswith("expected a regular file, got a FIFO")


def test_a_directory_is_refused(tmp_path):
    assert check(tmp_path).endswith("expected a regular file, got a directory")


def test_a_symlink_loop_is_one_line(tmp_path):
    (tmp_path / "a.yaml").symlink_to(tmp_path / "b.yaml")
    (tmp_path / "b.yaml").symlink_to(tmp_path / "a.yaml")
    assert check(tmp_path / "a.yaml").endswith("got too many levels of symbolic links")


def test_an_over_long_path_is_one_line(tmp_path):
    line = check(tmp_path / ("x" * 5000 + ".yaml"))
    assert line.endswith("got file name too long") and "…" in line  # the path is clipped too


def test_an_over_long_file_is_refused(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("name: x\nmodel:\n  layers: " + "G " * 800_000 + "\n")
    size = path.stat().st_size
    assert check(path).endswith(f"expected a spec file of at most {MAX_FILE_BYTES} bytes, got {size}")


def test_a_binary_file_is_refused(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_bytes(b"name: x\nmodel: \xff\xfe\n")
    assert check(path) == f"{path}:2:8: expected UTF-8 text, got the byte 0xff"


# ---------------------------------------------------------------------------------------------
# extends, nesting, alias bombs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "name: [" + ",".join(["1"] * 60_000) + "]\n",  # refused after its first 20,000 values are scanned
        "".join(f"k{i}: 1\n" for i in range(11_000)),  # a key and a value each
        "a: &a 1\nb: [" + ",".join(["*a"] * 25_000) + "]\n",  # aliases count where they are used
    ],
    ids=["long_list", "many_keys", "many_aliases"],
)
def test_a_file_of_many_values_is_refused_while_composing(tmp_path, text):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    assert len(text) < MAX_FILE_BYTES
    assert check(path).endswith(
        f"expected at most {MAX_YAML_VALUES} YAML values (aliases expanded), got more"
    )


def test_the_files_of_one_spec_share_the_size_limit(tmp_path):
    filler = "# " + "x" * 77 + "\n"
    (tmp_path / "base.yaml").write_text(filler * (MAX_FILE_BYTES // 160 + 10))  # half, and a bit
    (tmp_path / "mid.yaml").write_text("extends: base.yaml\n" + filler * (MAX_FILE_BYTES // 320))
    path = tmp_path / "spec.yaml"
    path.write_text("extends: mid.yaml\n" + filler * (MAX_FILE_BYTES // 320))
    line = check(path)
    assert line.startswith(
        f"{tmp_path / 'mid.yaml'}:1:10: extends: expected the files of one spec to hold at most"
    )


def test_an_extends_chain_1100_deep_reports_the_depth_limit(tmp_path):
    for i in range(1100):
        (tmp_path / f"s{i}.yaml").write_text(f"extends: s{i + 1}.yaml\n")
    shutil.copy(TINY, tmp_path / "s1100.yaml")
    (tmp_path / "mimo_v2_flash.yaml").write_bytes((TINY.parent / "mimo_v2_flash.yaml").read_bytes())
    line = check(tmp_path / "s0.yaml")
    assert f"expected a chain of at most {MAX_EXTENDS_DEPTH} files through extends, got more" in line
    assert line.startswith(f"{tmp_path / f's{MAX_EXTENDS_DEPTH - 1}.yaml'}:1:10: extends:")


def test_an_extends_of_a_device_names_it(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("extends: /dev/zero\n")
    assert (
        check(path) == f"{path}:1:10: extends: expected a regular file, got a character device ('/dev/zero')"
    )


def test_deep_nesting(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("name: " + "[" * 50_000 + "]" * 50_000 + "\n")
    assert check(path) == f"{path}:1:71: expected at most 64 levels of nesting, got more"


def _bomb(depth: int = 9, width: int = 9) -> str:
    """A flow-style YAML value whose aliases expand to width ** depth values."""
    parts = [f"&a0 [{', '.join(['x'] * width)}]"]
    parts += [f"&a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, depth)]
    return "[" + ", ".join(parts) + "]"


def test_an_alias_bomb_in_a_file(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(f"name: {_bomb()}\n")
    assert check(path).endswith(
        f"expected at most {MAX_YAML_VALUES} YAML values (aliases expanded), got more"
    )


def test_an_alias_bomb_through_set():
    line = check(TINY, "--set", f"name={_bomb()}")
    assert line.startswith("--set:1:") and line.endswith(
        f"expected at most {MAX_YAML_VALUES} YAML values (aliases expanded), got more"
    )


# ---------------------------------------------------------------------------------------------
# Layer patterns
# ---------------------------------------------------------------------------------------------


def test_a_pattern_longer_than_the_limit_is_refused_before_tokenizing():
    line = check(TINY, "--set", "model.layers=" + "G " * 60_000)  # YAML drops the last space
    assert line.endswith(
        f"model.layers: expected a pattern of at most {MAX_PATTERN_CHARS} characters, got 119999"
    )


def test_a_pattern_of_many_layers_stops_at_the_layer_limit():
    line = check(TINY, "--set", "model.layers=" + "G " * 30_000)  # 60,000 characters, linear to read
    assert line.endswith(f"model.layers: expected at most {MAX_LAYERS} layers, got more")


@pytest.mark.parametrize("layers", ["G0 S*49999", "(S*5 G)*10000", "S*" + "9" * 4000])
def test_a_50000_layer_spec_is_refused_at_check(layers):
    assert "model.layers: expected" in check(TINY, "--set", f"model.layers={layers}")


# ---------------------------------------------------------------------------------------------
# Quoting: what an error echoes is clipped
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "assignment",
    [
        "name=" + "n" * 100_000,
        "model.hidden_size=" + "9" * 100_000,
        "model.attention.swa.window=[" + "1, " * 30_000 + "1]",
        "model.nope" + "e" * 100_000 + "=1",
        "x" * 100_000,
    ],
    ids=["long_name", "long_number", "long_list", "long_key", "no_equals"],
)
def test_errors_quote_at_most_a_clip_of_the_input(assignment):
    line = check(TINY, "--set", assignment)
    assert len(line) < 6 * MAX_QUOTE_CHARS + len(str(TINY))


# ---------------------------------------------------------------------------------------------
# What check accepts, train must run: strict types and bounds
# ---------------------------------------------------------------------------------------------

BAD_VALUES = [
    ("training.optimizer.betas=[2.0,-1.0]", "training.optimizer.betas.0: expected a value < 1.0, got 2.0"),
    ("training.optimizer.betas=[0.9,-1.0]", "training.optimizer.betas.1: expected a value >= 0.0, got -1.0"),
    ("training.optimizer.eps=0", "training.optimizer.eps: expected a value > 0.0, got 0"),
    ("training.seed=-1", "training.seed: expected a value >= 0, got -1"),
    ("training.seed=18446744073709551616", "training.seed: expected a value <= 9223372036854775807"),
    (
        "training.stages.0.seq_len=1000000",
        "expected at most model.max_position_embeddings (4096), got 1000000",
    ),
    ("training.stages.0.seq_len=100000000", "training.stages.0.seq_len: expected a value <= 16777216"),
    ("training.stages.0.seq_len=8192", "expected at most model.max_position_embeddings (4096), got 8192"),
    ("model.attention.swa.window=1e20", "model.attention.swa.window: expected an integer, got '1e20'"),
    ("model.attention.swa.window=1.0e+20", "model.attention.swa.window: expected an integer"),
    ("model.attention.swa.window=5000", "expected at most max_position_embeddings (4096), got 5000"),
    ("model.ffn.moe.num_experts=1000000000000", "num_experts: expected a value <= 4096"),
    ("model.vocab_size=100000000000", "model.vocab_size: expected a value <= 4194304"),
    ("model.hidden_size=1.0e+30", "model.hidden_size: expected an integer, got 1e+30"),
    ("model.hidden_size=100000", "model.hidden_size: expected a value <= 65536, got 100000"),
    ("model.mtp.num_blocks=1000", "model.mtp.num_blocks: expected a value <= 16, got 1000"),
    ("model.hidden_size=true", "model.hidden_size: expected an integer, got True"),
    ("model.hidden_size=128.0", "model.hidden_size: expected an integer, got 128.0"),
    ('model.tie_word_embeddings="yes"', "model.tie_word_embeddings: expected true or false, got 'yes'"),
    ("model.norm.eps=true", "model.norm.eps: expected a number, got True"),
    ("model.attention.swa.num_heads=100000", "num_heads: expected a value <= 1024"),
    ("training.stages.0.tokens=1e300", "training.stages: expected at most 100,000,000 steps"),
    ("training.stages.2.tokens=1.0e+15", "training.stages: expected at most 100,000,000 steps"),
]


@pytest.mark.parametrize(("assignment", "fragment"), BAD_VALUES, ids=[a for a, _ in BAD_VALUES])
def test_check_refuses_what_train_cannot_run(assignment, fragment):
    assert fragment in check(TINY, "--set", assignment)


def test_examples_stay_valid(run_cli):
    for path in sorted(TINY.parent.glob("*.yaml")):
        assert run_cli("check", path)[0] == 0, path


# ---------------------------------------------------------------------------------------------
# import-hf
# ---------------------------------------------------------------------------------------------


def test_import_hf_refuses_devices_and_fifos(tmp_path):
    fifo = tmp_path / "config.json"
    os.mkfifo(fifo)
    for source, kind in (("/dev/zero", "a character device"), (fifo, "a FIFO")):
        line = assert_refused(run("import-hf", source, "-o", tmp_path / "spec.yaml"))
        assert line.endswith(f"expected a regular file, got {kind}")


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("num_hidden_layers", 1e9, "num_hidden_layers: expected an integer, got 1000000000.0"),
        ("num_hidden_layers", 10**9, f"num_hidden_layers: expected 1 to {MAX_LAYERS} layers, got 1000000000"),
        ("hidden_size", 10**30, "hidden_size: expected a value <= 65536"),
        ("n_routed_experts", 10**12, "n_routed_experts: expected a value <= 4096"),
        ("layer_types", ["full_attention"] * 40_000, "layer_types: expected a list of 48 entries"),
    ],
)
def test_import_hf_refuses_huge_configs(tmp_path, key, value, fragment):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "mimo_v2_flash", key: value}))
    line = assert_refused(run("import-hf", config, "-o", tmp_path / "spec.yaml"))
    assert fragment in line
    assert not (tmp_path / "spec.yaml").exists()
