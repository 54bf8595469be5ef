"""Every run of the shipped ablation trains through all of the tiny spec's stages (a few steps each): the variants are
valid for the trainer, not only for the schema (the all-global one declares a sliding kind no layer uses)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmspec.spec.sweep import load_sweep
from lmspec.train.trainer import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[2]
ABLATION = load_sweep(ROOT / "examples" / "sweeps" / "paper_ablation.yaml")


@pytest.mark.slow
@pytest.mark.parametrize("point", [p for p in ABLATION.points if p.seed == 0], ids=lambda p: p.label)
def test_each_variant_trains_through_every_stage(point, tmp_path):
    config = TrainConfig(
        spec=point.spec,
        out=tmp_path / "run",
        max_tokens=100000,  # every stage, sft included, gets at least one step
        progress=False,
        quiet=True,
        eval_tokens=512,
        plot=False,
    )
    result = Trainer(config).run()
    stages = [r["stage"] for r in result.history]
    assert list(dict.fromkeys(stages)) == ["pretrain", "midtrain", "long_context", "sft"]
    long_rows = [r for r in result.history if r["stage"] == "long_context"]
    assert all(r["source_tokens"].keys() <= {"all", "long"} for r in long_rows)
    assert result.val_bpb is not None
