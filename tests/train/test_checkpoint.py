"""Checkpoint layout, atomic replacement, pruning and `resolve_checkpoint`."""

import json

import pytest
import torch

from lmspec.errors import UsageError
from lmspec.runtime.checkpoint import (
    latest_checkpoint,
    load_optimizer_state,
    load_trainer_state,
    resolve_checkpoint,
    save_checkpoint,
)
from lmspec.train.metrics import MetricsWriter, read_metrics, without_timing


def _state(step):
    return {"step": step, "tokens": 0, "data_position": 0, "rng": {}, "corpus": "c", "spec_hash": "h"}


def _save(run, step, **kw):
    def model(path):
        (path / "model.safetensors").write_bytes(b"w%d" % step)
        (path / "spec.yaml").write_text("name: x\n")

    return save_checkpoint(
        run,
        step,
        save_model=model,
        optimizer_state={"state": {"w": torch.ones(2) * step}},
        trainer_state=_state(step),
        **kw,
    )


def test_layout_latest_and_pruning(tmp_path):
    for step in (1, 2, 3, 4):
        path = _save(tmp_path, step, keep=2)
    assert path.name == "step_00000004"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "LATEST",
        "step_00000003",
        "step_00000004",
    ]
    assert latest_checkpoint(tmp_path) == path
    assert load_trainer_state(path) == _state(4)
    assert torch.equal(load_optimizer_state(path)["state"]["w"], torch.full((2,), 4.0))
    assert {p.name for p in path.iterdir()} == {
        "model.safetensors",
        "spec.yaml",
        "optimizer.pt",
        "trainer_state.json",
        "manifest.json",
    }


def test_a_crash_mid_write_leaves_the_previous_checkpoint(tmp_path):
    _save(tmp_path, 1)

    def crash(path):
        (path / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt  # stands in for the process dying half-way

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, save_model=crash, optimizer_state={}, trainer_state=_state(2))
    assert latest_checkpoint(tmp_path).name == "step_00000001"
    assert resolve_checkpoint(tmp_path).name == "step_00000001"
    _save(tmp_path, 2)  # the next save clears the debris
    assert not list((tmp_path / "checkpoints").glob(".tmp_*"))


def test_resolve_checkpoint_accepts_run_checkpoints_and_step_dirs(tmp_path):
    path = _save(tmp_path, 7)
    assert resolve_checkpoint(tmp_path) == path
    assert resolve_checkpoint(tmp_path / "checkpoints") == path
    assert resolve_checkpoint(path) == path
    with pytest.raises(UsageError, match="no such"):
        resolve_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no checkpoint found"):
        resolve_checkpoint(tmp_path / "empty")


def test_metrics_resume_drops_lines_past_the_checkpoint(tmp_path):
    w = MetricsWriter(tmp_path)
    for step in range(1, 6):
        w.write({"step": step, "loss": 1.0 / step, "tokens_per_s": 100.0 + step})
    w.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "lo')  # a line torn by a crash
    w = MetricsWriter(tmp_path, truncate_after_step=3)
    w.write({"step": 4, "loss": 0.25, "tokens_per_s": 1.0})
    w.close()
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert without_timing(rows)[3] == {"step": 4, "loss": 0.25}
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1
