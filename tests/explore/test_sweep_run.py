"""The micro sweep end to end (`examples/sweeps/micro.yaml`: the tiny spec with and without sinks, 2e4
tokens each, `--jobs 2`): results, accounting equal to `lmspec stats --json`, a rerun that trains nothing,
`lmspec compare` over the same runs, and `lmspec eval` reproducing the sweep's own evaluation.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmspec.train.results import ACCOUNTING_COLUMNS, TIMING_COLUMNS

ROOT = Path(__file__).resolve().parents[2]
MICRO = ROOT / "examples" / "sweeps" / "micro.yaml"
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def lmspec(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "lmspec", *map(str, args)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def rows_of(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


@pytest.fixture(scope="module")
def micro(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("sweeps") / "micro"
    return out, lmspec("sweep", MICRO, "--out", out, "--jobs", "2", "--threads", "2")


def test_one_row_per_variant_with_every_figure(micro):
    out, proc = micro
    rows = rows_of(out / "results.csv")
    assert [r["variant"] for r in rows] == ["sink=true", "sink=false"]
    assert [r["diff"] for r in rows] == ["model.attention.swa.sink=true", "model.attention.swa.sink=false"]
    for r in rows:
        for col in (
            "bpb_pretrain",
            "bpb_midtrain",
            "bpb_long_context",
            "bpb_beyond_128",
            "bpb_beyond_128_before",
        ):
            assert 0 < float(r[col]) < 9, (col, r[col])  # bits per byte of a barely trained byte model
        for col in ("mtp_accept_d1", "mtp_accept_d2", "mtp_accept_d3"):
            assert 1.0 <= float(r[col]) <= 1 + int(col[-1])
        assert 0 <= float(r["passkey_exact"]) <= float(r["passkey_token_acc"]) <= 1
        assert 1.0 <= float(r["max_expert_load"]) <= 4.0  # top-2 of 8 experts: at most 4x the uniform share
        assert float(r["tokens_per_s"]) > 0 and float(r["wall_s"]) > 0
    for name in ("results.md", "results.json", "loss_curves.png", "pareto.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "sink=true" in proc.stdout and "bpb_long_context" in proc.stdout


def test_accounting_columns_are_lmspec_stats_json(micro):
    out, _ = micro
    plan = json.loads((out / "sweep.json").read_text())
    rows = {r["variant"]: r for r in rows_of(out / "results.csv")}
    for run in plan["runs"]:
        row = rows[run["label"]]
        stats = json.loads(
            lmspec("stats", out / run["run_dir"] / "spec.yaml", "--json", "--context", row["context"]).stdout
        )
        for col in ACCOUNTING_COLUMNS:
            assert float(row[col]) == stats[col], (run["label"], col)
    assert rows["sink=true"]["params_total"] != rows["sink=false"]["params_total"]  # the sink logits


def test_a_rerun_trains_nothing_and_writes_the_same_results(micro):
    out, _ = micro
    before = (out / "results.csv").read_text()
    logs = {p: p.read_text() for p in (out / "runs").glob("*/train.log")}
    proc = lmspec("sweep", MICRO, "--out", out, "--jobs", "2", "--threads", "2")
    assert proc.stderr.count("skipped: finished earlier") == 2, proc.stderr
    assert "2 of 2 runs finished (2 earlier, 0 now)" in proc.stdout
    assert {p: p.read_text() for p in logs} == logs  # no worker ran
    assert (out / "results.csv").read_text() == before


def test_compare_over_the_run_directories_measures_the_same(micro, tmp_path):
    out, _ = micro
    sweep_rows = rows_of(out / "results.csv")
    run_dirs = [out / r["run_dir"] for r in json.loads((out / "sweep.json").read_text())["runs"]]
    lmspec("compare", *run_dirs, "-o", tmp_path / "cmp")
    rows = rows_of(tmp_path / "cmp" / "results.csv")
    assert [r["variant"] for r in rows] == [d.name for d in run_dirs]
    assert rows[0]["diff"] == "(base)" and rows[1]["diff"] == "model.attention.swa.sink=false"
    for mine, theirs in zip(rows, sweep_rows, strict=True):
        same = [k for k in theirs if k not in ("variant", "diff") and k not in TIMING_COLUMNS]
        assert {k: mine[k] for k in same} == {k: theirs[k] for k in same}


def test_eval_of_a_stage_checkpoint_reproduces_the_sweep_evaluation(micro):
    out, _ = micro
    run = out / json.loads((out / "sweep.json").read_text())["runs"][0]["run_dir"]
    result = json.loads((run / "result.json").read_text())["eval"]["before_last_stage"]
    assert result["stage"] == "long_context"  # the weights before the tiny spec's last (sft) stage
    proc = lmspec(
        "eval", run, "--checkpoint", "long_context", "--eval-tokens", "2048",
        "--passkey-lengths", "128,512", "--passkey-trials", "2",
    )  # fmt: skip
    assert "passkey retrieval" in proc.stdout and "MTP acceptance length" in proc.stdout
    report = json.loads((run / "eval_long_context.json").read_text())
    assert report["position_bpb"] == result["position_bpb"]
    assert report["passkey"] == result["passkey"]
    assert report["rope_theta"]["global"] == 5.0e6  # the long_context stage's theta, after the extension
    assert math.isfinite(report["position_bpb"]["beyond"])
