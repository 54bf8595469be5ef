"""`training.compile` and `training.activation_checkpointing`: same losses and gradients as the eager step.

The compiled step (`CompiledStep(forward_loss)`: model forward with labels + the training loss, under
`torch.compile(fullgraph=True)`) must trace without a graph break, keep one graph while the batch size
changes inside a stage (a batch-size warmup), and compile one more graph for a new sequence length (a new
stage). The fast tests trace with dynamo alone (`CompileCounter` backend: every captured graph counted, the
eager ops run as they are); the slow one runs inductor and compares its losses and gradients with eager.
Activation checkpointing recomputes the same ops in the same order, so its losses and gradients are equal
bit for bit.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.testing import CompileCounter
from torch._dynamo.utils import counters

import lmspec
from lmspec.runtime.model_base import CompiledStep
from lmspec.spec import load_spec
from lmspec.testing.compare import close
from lmspec.train.metrics import read_metrics
from lmspec.train.trainer import forward_loss

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "examples" / "mimo_v2_flash_tiny.yaml"
# The tiny spec's layout (dense global layer 0, sliding + sink MoE, global MoE, an MTP block) at sizes
# that compile quickly.
MICRO = [
    "model.hidden_size=32",
    "model.layers=G0 S G",
    "model.mtp.num_blocks=1",
    "serving.speculative_depth=1",
    *(f"model.attention.{k}.{f}" for k in ("global", "swa") for f in ("num_heads=2", "num_kv_heads=1")),
    *(f"model.attention.{k}.{f}" for k in ("global", "swa") for f in ("qk_head_dim=16", "v_head_dim=8")),
    "model.attention.swa.window=8",
    "model.ffn.dense.intermediate_size=64",
    "model.ffn.moe.num_experts=4",
    "model.ffn.moe.expert_intermediate_size=16",
]
MTP_WEIGHT, AUX_COEF = 0.3, 1e-2


def _model(layers: str | None = None) -> torch.nn.Module:
    torch.manual_seed(0)
    return lmspec.build(load_spec(TINY, MICRO + ([f"model.layers={layers}"] if layers else []))).train()


def _batch(batch: int, seq: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(0, 256, (batch, seq + 1), generator=torch.Generator().manual_seed(seed))
    return x[:, :-1], x[:, 1:]


def _losses(parts) -> list[torch.Tensor]:
    return [parts.total, parts.ce, parts.aux, *parts.mtp]


def _step(fn, model, batch, seq, seed):
    """Loss parts, expert load and parameter gradients of one micro-batch through ``fn``."""
    model.zero_grad(set_to_none=True)
    parts, load = fn(model, *_batch(batch, seq, seed), {}, MTP_WEIGHT, AUX_COEF)
    parts.total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return [t.detach() for t in _losses(parts)], load, grads


def _traced(backend) -> CompiledStep:
    step = CompiledStep(forward_loss)
    step.fn = torch.compile(forward_loss, fullgraph=True, backend=backend)
    return step


def test_one_graph_per_stage_without_graph_breaks():
    torch._dynamo.reset()
    counters.clear()
    graphs = CompileCounter()
    step, model = _traced(graphs), _model(layers="S G")  # two layers keep the trace to seconds
    # A batch-size warmup within one stage: one graph for every batch size (fullgraph: a break raises).
    for seed, batch in enumerate((2, 3, 5)):
        got = _step(step, model, batch, 32, seed)
        want = _step(forward_loss, model, batch, 32, seed)
        for g, w in zip(got[0], want[0], strict=True):
            torch.testing.assert_close(g, w, **close("exact"))
        torch.testing.assert_close(got[1], want[1], **close("exact"))
    assert graphs.frame_count == 1
    assert not counters["graph_break"] and not counters["recompiles"]


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_is_exact(mode):
    model = _model()
    want = _step(forward_loss, model, 3, 32, 0)
    model.set_activation_checkpointing(mode)
    got = _step(forward_loss, model, 3, 32, 0)
    for g, w in zip(got[0], want[0], strict=True):
        torch.testing.assert_close(g, w, **close("exact"))
    assert got[2].keys() == want[2].keys()
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], **close("exact"), msg=name)
    model.set_activation_checkpointing("none")
    assert "forward" not in vars(model.model.layers[0])  # the layer's own forward again


def test_an_unknown_checkpointing_mode_is_refused():
    with pytest.raises(ValueError, match="activation_checkpointing"):
        _model().set_activation_checkpointing("some")


@pytest.mark.slow
def test_inductor_matches_eager_and_compiles_once_per_stage():
    torch._dynamo.reset()
    counters.clear()
    model = _model()
    reference = copy.deepcopy(model)
    step = CompiledStep(forward_loss)
    for seed, batch in enumerate((2, 3, 5)):
        losses, load, grads = _step(step, model, batch, 32, seed)
        want_losses, want_load, want_grads = _step(forward_loss, reference, batch, 32, seed)
        for g, w in zip(losses, want_losses, strict=True):
            torch.testing.assert_close(g, w, **close("float32_model"))
        torch.testing.assert_close(load, want_load, **close("exact"))  # same routing decisions
        for name, w in want_grads.items():
            torch.testing.assert_close(grads[name], w, **close("float32_model"), msg=name)
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"] and not counters["recompiles"]
    first = step.compile_s
    assert first > 0
    # The next stage's sequence length: one more graph, again shared by its batch sizes.
    for seed, batch in enumerate((2, 4)):
        _step(step, model, batch, 48, seed)
    assert counters["stats"]["unique_graphs"] == 2
    assert not counters["graph_break"]
    assert step.compile_s > first


@pytest.mark.slow
def test_lmspec_train_compile_reports_compile_time_and_matches_eager(tmp_path):
    # The CLI flag end to end on the micro layout: the first stage's steps (a batch-size warmup) compile
    # once, and the losses follow the eager run's.
    common = ["--max-tokens", "6000", "--eval-every", "100", "--eval-tokens", "512", "--no-progress"]
    overrides = [a for o in MICRO for a in ("--set", o)]
    runs = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        cmd = [sys.executable, "-m", "lmspec", "train", str(TINY), "--out", str(tmp_path / name)]
        proc = subprocess.run(
            cmd + common + overrides + extra, capture_output=True, text=True, timeout=900, cwd=ROOT
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = (read_metrics(tmp_path / name), proc.stdout + proc.stderr)
    eager, compiled = runs["eager"][0], runs["compiled"][0]
    assert len(eager) == len(compiled) > 3
    stages = {r["stage"] for r in compiled}
    compiles = runs["compiled"][1].count("compiled in")
    assert 1 <= compiles <= len(stages)  # at most one compile per stage, whatever its batch sizes
    assert compiled[-1]["compile_s"] > 0
    for e, c in zip(eager, compiled, strict=True):
        assert c["loss"] == pytest.approx(e["loss"], rel=1e-3)
