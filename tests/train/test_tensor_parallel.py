"""Tensor parallelism: the split derived from the compiled plan, the rows and sums of a tensor layout, the
vocab-parallel cross-entropy against the fused op, and `tensor=2` (2 processes) under torchrun against one
process."""

from __future__ import annotations

import sys

import pytest
import torch

import lmspec
from lmspec.runtime.parallel import tensor_plan
from lmspec.spec import load_spec
from lmspec.train.distributed import Dist

from .gloo import run_on_ranks
from .test_expert_parallel import STEPS, _same_curve, _torchrun
from .test_parallel_layout import SPEC, _train


def test_the_split_follows_each_layer_kind_of_the_compiled_plan():
    model = lmspec.build(load_spec(SPEC), device="cpu", backend="torch")
    plan = tensor_plan(model)
    # Layers 0, 3 and 6 are global attention (no sink), the others and the MTP blocks sliding with sinks.
    assert plan["model.layers.0.self_attn.q_proj"] == "colwise"
    assert plan["model.layers.0.self_attn.o_proj"] == "rowwise"
    assert "model.layers.0.self_attn.sinks" not in plan
    assert plan["model.layers.1.self_attn.sinks"] == "heads"
    assert plan["model.mtp.layers.2.self_attn.sinks"] == "heads"
    # Layer 0 and the MTP blocks have the dense FFN; the MoE layers' experts stay whole.
    assert plan["model.layers.0.mlp.down_proj"] == "rowwise"
    assert plan["model.mtp.layers.0.mlp.gate_proj"] == "colwise"
    assert not any(k.startswith("model.layers.1.mlp") for k in plan)
    assert plan["lm_head"] == "vocab"
    assert len(plan) == 7 * 4 + 3 * 4 + 7 + 4 * 3 + 1  # q/k/v/o, sinks of 4 swa layers + 3 MTP, FFNs, head


def test_the_ranks_of_a_tensor_group_read_the_same_rows():
    # (data 2, tensor 2): ranks 0, 1 hold the first half of the batch, ranks 2, 3 the second.
    rows = [Dist(rank=r, world_size=4, tensor=2).rows(6) for r in range(4)]
    assert rows == [slice(0, 3), slice(0, 3), slice(3, 6), slice(3, 6)]
    assert Dist(rank=1, world_size=2, tensor=2).rows(4) == slice(0, 4)
    assert Dist(world_size=4, tensor=2).batch_ranks == 2


def _check_ce(rank: int, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from lmspec.runtime.ops.reference import lm_head_ce
    from lmspec.train.tensor_parallel import vocab_parallel_ce

    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(0)
    h = torch.randn(10, 16, generator=g, dtype=torch.float64)
    w = torch.randn(12, 16, generator=g, dtype=torch.float64)
    for labels in (torch.randint(12, (10,), generator=g), torch.full((10,), -100)):
        labels[:3] = -100
        hs, ws = h.clone().requires_grad_(), w.clone().requires_grad_()
        want = lm_head_ce(hs, ws, labels)
        want.backward()
        hp = h.clone().requires_grad_()
        wp = torch.nn.Parameter(distribute_tensor(w.clone(), mesh, [Shard(0)]))
        got = vocab_parallel_ce(hp, wp, labels)
        got.backward()
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(hp.grad, hs.grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(wp.grad.full_tensor(), ws.grad, rtol=1e-12, atol=1e-12)


def test_vocab_parallel_ce_matches_the_fused_op_forward_and_backward(tmp_path):
    run_on_ranks(_check_ce, 2, tmp_path, ports=(1601, 2000))


@pytest.mark.slow
def test_tensor_parallel_matches_one_process(tmp_path):
    _train(tmp_path / "one", sys.executable, extra=STEPS)
    log = _train(
        tmp_path / "tp2", *_torchrun(2, tmp_path), extra=(*STEPS, "--set", "training.parallel.tensor=2")
    )
    # Each tensor rank holds half of every split weight: q heads, o_proj inputs, the sinks and the vocabulary.
    for rank in (0, 1):
        assert (
            f"rank {rank}: tensor lm_head vocab local (128, 128) of (256, 128); "
            "model.layers.0.self_attn.q_proj colwise local (96, 128) of (192, 128); "
            "model.layers.0.self_attn.o_proj rowwise local (128, 64) of (128, 128); "
            f"model.layers.1.self_attn.sinks heads local (2,) of (4,) (tensor rank {rank} of 2)"
        ) in log
    _same_curve(tmp_path / "one", tmp_path / "tp2")
