"""`training.parallel: {data: 2}` under torchrun: an HSDP mesh (replicated over data, sharded over fsdp)
trains the same losses as one process."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from lmspec.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
SPEC = str(ROOT / "examples" / "mimo_v2_flash_tiny.yaml")
SHORT = ["--max-tokens", "8000", "--eval-every", "100", "--eval-tokens", "1024", "--checkpoint-every", "100"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _train(out: Path, *prefix: str, extra: tuple[str, ...] = ()) -> str:
    cmd = [*prefix, "-m", "lmspec", "train", SPEC, "--out", str(out), "--no-progress", *SHORT, *extra]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.slow
def test_two_data_replicas_match_one_process(tmp_path):
    _train(tmp_path / "one", sys.executable)
    port = str(29500 + random.Random(str(tmp_path)).randint(401, 800))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    torchrun += ["--master-addr", "127.0.0.1", "--master-port", port]
    log = _train(tmp_path / "two", *torchrun, extra=("--set", "training.parallel.data=2"))
    assert "on cpu x2" in log
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["tokens"] for r in one] == [r["tokens"] for r in two] and len(one) >= 5
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), a["step"]
