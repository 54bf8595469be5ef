"""Sharded checkpoints of torchrun runs: every rank writes its own shards, a killed 4-rank run resumes on 2
ranks with another expert layout and continues the same metrics, and a sharded checkpoint exports to a
folder transformers loads with the same logits."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

import lmspec
from lmspec.cli import main
from lmspec.runtime.checkpoint import CHECKPOINTS, LATEST, MANIFEST_FILE
from lmspec.train.metrics import read_metrics

from .test_expert_parallel import _torchrun
from .test_parallel_layout import ENV, ROOT, SHORT, SPEC, _train

# 12 steps; a checkpoint every 4.
RUN = ("--max-tokens", "20000", "--eval-tokens", "2048", "--checkpoint-every", "4")
FOUR = ("--set", "training.parallel.fsdp=2", "--set", "training.parallel.expert=2")
TWO = ("--set", "training.parallel.fsdp=2")  # expert 1: every rank holds all experts (FSDP-sharded)


def _cmd(out: Path, prefix: list[str], *extra: str) -> list[str]:
    return [*prefix, "-m", "lmspec", "train", SPEC, "--out", str(out), "--no-progress", *SHORT, *RUN, *extra]


def _latest(run: Path) -> str | None:
    latest = run / CHECKPOINTS / LATEST
    return latest.read_text().strip() if latest.is_file() else None


def _descendants(pid: int) -> list[int]:
    """The processes below `pid` (children first), from /proc."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _kill_after_checkpoint(run: Path, prefix: list[str], step_dir: str) -> None:
    """Start the 4-rank run and kill -9 it and its workers once LATEST names `step_dir`."""
    proc = subprocess.Popen(
        _cmd(run, prefix, *FOUR),
        env=ENV,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while _latest(run) != step_dir and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = _descendants(proc.pid)
    # torchrun's workers may sit in process groups of their own: kill -9 each of them, then torchrun.
    for pid in [*_descendants(proc.pid), proc.pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    while any(_alive(pid) for pid in workers):
        time.sleep(0.05)
    assert _latest(run) == step_dir and proc.returncode != 0, (proc.returncode, _latest(run))


@pytest.mark.slow
def test_a_killed_four_rank_run_resumes_on_two_ranks_with_the_same_metrics(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    _train(whole, *_torchrun(4, tmp_path), extra=(*RUN, *FOUR))
    _kill_after_checkpoint(killed, _torchrun(4, tmp_path), "step_00000004")
    ckpt = killed / CHECKPOINTS / "step_00000004"
    # Each rank wrote its own quarter: no file holds the model (every shard is well under half the state).
    shards = sorted(ckpt.glob("__*_*.distcp"))
    assert [p.name for p in shards] == [f"__{r}_0.distcp" for r in range(4)]
    total = sum(p.stat().st_size for p in shards)
    assert max(p.stat().st_size for p in shards) < 0.3 * total
    assert set(json.loads((ckpt / MANIFEST_FILE).read_text())["files"]) >= {p.name for p in shards}

    log = _train(killed, *_torchrun(2, tmp_path), extra=(*RUN, *TWO, "--resume"))
    assert "resumed from" in log and "step 4" in log
    a, b = read_metrics(whole), read_metrics(killed)
    assert [r["step"] for r in a] == [r["step"] for r in b] and len(a) == 12
    assert [r["stage"] for r in a[4:]] == ["pretrain"] * 5 + ["midtrain"] * 2 + ["sft"]
    for x, y in zip(a[4:-1], b[4:-1], strict=True):
        for key in ("loss", "ce", "max_load_ratio"):
            assert y[key] == pytest.approx(x[key], rel=1e-6), (x["step"], key)
        # The gradient norm and the sequence aux loss (weight 1e-5 in the loss) are fp32 sums that another
        # layout reduces in another order; they move by a few 1e-6.
        for key in ("grad_norm", "aux"):
            assert y[key] == pytest.approx(x[key], rel=1e-5), (x["step"], key)
    # The sft step: every loss is a mean over the global batch's count, so the layout does not weigh ranks'
    # rows differently (the MTP losses moved by 2e-3 when each rank's were weighted by its share of the CE
    # labels). What is left, about 1e-5, is routing: fp32 sums reduced in another order flip a few top-k
    # choices (one process run whole or in micro-batches of 4 rows differs in 35 of this step's 12k, and
    # with one's routes replayed in the other the CE is the same), and the step's 271 trained tokens make
    # each flip weigh 8x what it does in a pretrain step.
    x, y = a[-1], b[-1]
    for key in ("loss", "ce"):
        assert y[key] == pytest.approx(x[key], rel=5e-5), key
    assert y["mtp"] == pytest.approx(x["mtp"], rel=5e-5)


def _export(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["export", *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
def test_a_sharded_checkpoint_exports_to_transformers_with_the_same_logits(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    # The tiny spec's sliding kind has as many KV heads as the global one; transformers wants twice.
    exportable = ("--set", "model.attention.swa.num_kv_heads=4", "--max-tokens", "6000")
    run = tmp_path / "run"
    _train(run, *_torchrun(2, tmp_path), extra=(*exportable, "--set", "training.parallel.expert=2"))
    code, out, err = _export(capsys, str(run), "--out", str(tmp_path / "hf"))
    assert code == 0 and "from the sharded checkpoint" in out, err
    ours = lmspec.from_pretrained(run).eval()  # the sharded checkpoint, read in one process
    theirs = transformers.MiMoV2FlashForCausalLM.from_pretrained(
        tmp_path / "hf", attn_implementation="eager"
    ).eval()
    x = torch.randint(0, 256, (2, 80), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(x).logits - theirs(x).logits).abs().max().item() < 1e-4
    # A damaged shard is refused by name before anything reads it.
    ckpt = run / CHECKPOINTS / _latest(run)
    shard = ckpt / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-8])
    capsys.readouterr()  # transformers' own progress lines
    code, out, err = _export(capsys, str(run), "--out", str(tmp_path / "hf2"))
    assert code == 2 and f"{shard}: truncated" in err and len(err.strip().splitlines()) == 1, err
