"""`lmspec sweep`, `compare` and `eval` over bad arguments: exit 2 and one line, no traceback; the sweep's
progress table renders every status."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from lmspec.cli import main
from lmspec.train.sweep import Board, Job

ROOT = Path(__file__).resolve().parents[2]
MICRO = str(ROOT / "examples" / "sweeps" / "micro.yaml")
TINY = str(ROOT / "examples" / "mimo_v2_flash_tiny.yaml")

CASES = [
    ["sweep", "{tmp}/no_such.yaml"],
    ["sweep", MICRO, "--jobs", "0"],
    ["sweep", MICRO, "--launcher", "slurm"],
    ["sweep", MICRO, "--submitit", "no-equals-sign"],
    ["sweep", MICRO, "--seeds", "2"],
    ["sweep", TINY, "--vary", "model.hidden_size"],
    ["sweep", TINY, "--vary", "model.hidden_size=[1,"],
    ["sweep", TINY, "--max-tokens", "1e4", "--scale", "0.5"],
    ["compare", "{tmp}/no_such_run"],
    ["compare", "{tmp}"],
    ["eval", "{tmp}/no_such_run"],
    ["eval", "{tmp}"],
    ["eval", "{run}", "--checkpoint", "step_99"],
    ["eval", "{run}", "--passkey-depths", "1.5"],
    ["eval", "{run}", "--passkey-lengths", "999999"],
    ["eval", "{run}", "--passkey-trials", "0"],
]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A run directory holding one checkpoint of the tiny spec (untrained weights are enough here)."""
    import lmspec

    d = tmp_path_factory.mktemp("run")
    lmspec.build(TINY).save_pretrained(d / "checkpoints" / "step_00000001")
    (d / "checkpoints" / "LATEST").write_text("step_00000001\n")
    return d


@pytest.mark.parametrize("case", CASES, ids=[" ".join(Path(a).name for a in c)[:50] for c in CASES])
def test_bad_arguments_exit_2_with_one_line(case, run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = [a.format(tmp=tmp_path, run=run) for a in case]
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, (argv, rc, err)
    assert not (tmp_path / "sweeps").exists()  # nothing was started


def test_the_progress_table_shows_every_status(tmp_path):
    jobs = []
    for i, status in enumerate(("queued", "running", "done", "skipped", "failed")):
        run_dir = tmp_path / f"r{i}"
        run_dir.mkdir()
        rows = [
            {"step": 3, "tokens": 6144, "stage": "midtrain", "loss": 2.5, "val_bpb": 3.25},
            {"step": 4, "tokens": 8192, "stage": "midtrain", "loss": 2.4},
        ]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"torn')
        jobs.append((Job(str(run_dir), f"v{i}", "v", 0, [], "", "", None, None, 1, {}), status))
    board = Board([j for j, _ in jobs], live=False)
    for job, status in jobs[1:]:
        board.set(job.run_dir, status, "why" if status == "failed" else "")
    out = io.StringIO()
    Console(file=out, width=160).print(board.table())
    text = out.getvalue()
    for _, status in jobs:
        assert status in text
    assert "8,192" in text and "2.400" in text and "3.250" in text  # last step's loss, last held-out bpb
