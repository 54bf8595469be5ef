"""The worked post-training example (`examples/posttrain_tiny/pipeline.yaml`) end to end, shrunk.

`lmspec train` runs all five stages of the pipeline spec (pretrain, a general SFT student, two SFT
teachers that start from it, then MOPD from the general student with the teachers named by stage), and
`lmspec eval --domains` grades the student before and after MOPD and each teacher on the held-out prompts.
At 3% of the example's budget the figures say nothing about quality (`docs/posttraining.md` has the
full run's); this checks that the pipeline is one spec and one command, and that its report is whole.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmspec.cli import main
from lmspec.spec import load_spec
from lmspec.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
PIPELINE = ROOT / "examples" / "posttrain_tiny" / "pipeline.yaml"


def test_the_pipeline_spec_trains_every_stage_and_reports_each_domain(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(PIPELINE), "--out", str(run), "--scale", "0.03", "--no-progress"]) == 0
    rows = read_metrics(run / "metrics.jsonl")
    stages = [s.name for s in load_spec(PIPELINE).training.stages]
    assert [s for s in stages if any(r["stage"] == s for r in rows)] == stages
    mopd = [r for r in rows if r.get("kind") == "mopd"]
    assert mopd and all(r["r3_replayed"] == 1.0 for r in mopd)
    assert set(mopd[-1]["teacher_exact_match"]) == {"addition", "reversal"}
    # The weights later stages read are kept by name: the teachers, and the student MOPD starts from.
    for name in ("sft_general", "teacher_addition", "teacher_reversal"):
        assert (run / "stages" / name / "model.safetensors").is_file()
    capsys.readouterr()

    assert main(["eval", str(run), "--domains"]) == 0
    out = capsys.readouterr().out
    assert "student before" in out and "after / teacher" in out
    report = json.loads((run / "domains.json").read_text())
    (stage,) = report["stages"]
    assert stage["stage"] == "mopd" and stage["before"].endswith("stages/sft_general")
    assert stage["prompts"] == 40  # every 10th of the 400 prompt records, which MOPD never trains on
    for domain in ("addition", "reversal"):
        row = stage["domains"][domain]
        assert all(0.0 <= row[k] <= 1.0 for k in ("before", "after", "teacher")), row


def test_eval_domains_refuses_a_run_without_a_mopd_stage(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "spec.yaml").write_text(f"extends: {ROOT / 'examples' / 'mimo_v2_flash_tiny.yaml'}\n")
    assert main(["eval", str(run), "--domains"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--domains grades mopd stages, and this run's spec has none" in err[0]
