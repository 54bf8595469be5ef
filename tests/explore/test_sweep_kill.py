"""A sweep killed with SIGKILL and started again finishes only what is missing, and its results equal an
uninterrupted sweep's apart from the timing columns. Also: the submitit launcher, on its local executor.
"""

from __future__ import annotations

import csv
import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmspec.train.results import TIMING_COLUMNS

ROOT = Path(__file__).resolve().parents[2]
MICRO = ROOT / "examples" / "sweeps" / "micro.yaml"
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
pytestmark = pytest.mark.slow


def _sweep_cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lmspec", "sweep", str(MICRO), "--out", str(out), "--threads", "1", *extra]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _without_timing(path: Path) -> list[dict[str, str]]:
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    return [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in rows]


def _wait_for(condition, proc: subprocess.Popen, what: str, limit_s: float = 900) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        assert proc.poll() is None, f"the sweep ended before {what}"
        assert time.monotonic() < deadline, f"no {what} after {limit_s} s"
        time.sleep(0.2)


def test_a_killed_sweep_finishes_only_the_missing_work(tmp_path):
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    proc = subprocess.Popen(
        _sweep_cmd(killed, "--jobs", "1"), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    runs = killed / "runs"

    def first_done_second_checkpointed() -> bool:
        done = list(runs.glob("*/result.json"))
        started = [
            p for p in runs.glob("*/checkpoints/LATEST") if not (p.parents[1] / "result.json").exists()
        ]
        return len(done) == 1 and len(started) == 1

    _wait_for(first_done_second_checkpointed, proc, "finished first run and checkpointed second run")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = next(runs.glob("*/result.json")).parent
    partial = next(p for p in runs.iterdir() if not (p / "result.json").exists())
    finished_log = (finished / "train.log").read_text()

    rerun = _run(_sweep_cmd(killed, "--jobs", "1"))
    assert f"({finished.name}): skipped: finished earlier" in rerun.stderr
    assert "2 of 2 runs finished (1 earlier, 1 now)" in rerun.stdout
    assert (finished / "train.log").read_text() == finished_log  # nothing of the finished run ran again
    resumed = re.findall(r"resumed from \S+ at step (\d+)", (partial / "train.log").read_text())
    assert len(resumed) == 1 and int(resumed[0]) > 0  # continued from its checkpoint, not from scratch

    _run(_sweep_cmd(reference, "--jobs", "2"))
    assert _without_timing(killed / "results.csv") == _without_timing(reference / "results.csv")


def test_the_submitit_launcher_runs_each_run_as_a_job(tmp_path):
    pytest.importorskip("submitit")
    out = tmp_path / "sub"
    proc = _run(_sweep_cmd(out, "--jobs", "2", "--launcher", "submitit", "--submitit", "cluster=local"))
    assert "2 of 2 runs finished (0 earlier, 2 now)" in proc.stdout
    assert len(list((out / "submitit").glob("*_result.pkl"))) == 2  # what submitit's jobs returned
    reference = tmp_path / "local"
    _run(_sweep_cmd(reference, "--jobs", "2"))
    assert _without_timing(out / "results.csv") == _without_timing(reference / "results.csv")
