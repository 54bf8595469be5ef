"""Expert parallelism: the all-to-all dispatch op against the single-process grouped GEMM, and `expert=2`
(2 processes) and `fsdp=2 x expert=2` (4 processes) under torchrun against one process."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from lmspec.train.metrics import read_metrics

from .gloo import run_on_ranks
from .test_parallel_layout import _train

E, H, INTER, K = 8, 32, 16, 2


def _inputs(n: int, skew: bool) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, H, generator=g, dtype=torch.float64)
    w = torch.rand(n, K, generator=g, dtype=torch.float64).float()
    if skew:  # every token to experts 0 and 1: the second rank receives no rows at all
        idx = torch.tensor([[0, 1]] * n)
    else:
        idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(n)])
    gate_up = torch.randn(E, 2 * INTER, H, generator=g, dtype=torch.float64) * 0.2
    down = torch.randn(E, H, INTER, generator=g, dtype=torch.float64) * 0.2
    return x, w, idx, gate_up, down


def _check_rank(rank: int, world: int) -> None:
    from lmspec.runtime.ops.cpu import moe_experts
    from lmspec.runtime.ops.expert_parallel import dispatch_combine

    for skew in (False, True):
        x, w, idx, gate_up, down = _inputs(12, skew)
        # The single-process op on all tokens, every rank alike: the oracle.
        xs, ws, gus, ds = (t.clone().requires_grad_() for t in (x, w, gate_up, down))
        want = moe_experts(xs, ws, idx, gus, ds)
        want.pow(2).sum().backward()
        # This rank's half of the tokens, its half of the experts.
        rows = slice(rank * 6, rank * 6 + 6)
        local = slice(rank * E // world, (rank + 1) * E // world)
        xr, wr = x[rows].clone().requires_grad_(), w[rows].clone().requires_grad_()
        gur, dr = gate_up[local].clone().requires_grad_(), down[local].clone().requires_grad_()
        got = dispatch_combine(moe_experts, xr, wr, idx[rows], gur, dr, dist.group.WORLD)
        got.pow(2).sum().backward()
        torch.testing.assert_close(got, want[rows], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(xr.grad, xs.grad[rows], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(wr.grad, ws.grad[rows], rtol=1e-6, atol=1e-6)
        # The experts' gradients sum both ranks' tokens: the whole batch's, as in one process.
        torch.testing.assert_close(gur.grad, gus.grad[local], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(dr.grad, ds.grad[local], rtol=1e-12, atol=1e-12)


def test_dispatch_and_combine_match_one_process_forward_and_backward(tmp_path):
    run_on_ranks(_check_rank, 2, tmp_path, ports=(801, 1200))


# 22 steps of the tiny spec (pretrain, midtrain, long_context at batch 4: one row per rank of 4); the
# held-out batch at seq_len 512 needs 4 rows too.
STEPS = ("--max-tokens", "40000", "--eval-tokens", "2048")


def _torchrun(n: int, tmp_path: Path) -> list[str]:
    port = str(29500 + random.Random(f"{tmp_path}{n}").randint(1201, 1600))
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n)] + [
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        port,
    ]


def _same_curve(one: Path, many: Path) -> None:
    a, b = read_metrics(one), read_metrics(many)
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b] and len(a) >= 20
    for x, y in zip(a, b, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5), x["step"]
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-5), x["step"]
        # Bias balancing saw the global counts: the same load, so the same routing, as one process.
        assert y["max_load_ratio"] == pytest.approx(x["max_load_ratio"], rel=1e-9), x["step"]


@pytest.mark.slow
def test_expert_parallel_layouts_match_one_process(tmp_path):
    _train(tmp_path / "one", sys.executable, extra=STEPS)
    log = _train(
        tmp_path / "ep2", *_torchrun(2, tmp_path), extra=(*STEPS, "--set", "training.parallel.expert=2")
    )
    assert "rank 0: experts 0-3 of 8 in each of 6 MoE layers (expert rank 0 of 2)" in log
    assert "rank 1: experts 4-7 of 8 in each of 6 MoE layers (expert rank 1 of 2)" in log
    _same_curve(tmp_path / "one", tmp_path / "ep2")
    layout = ("--set", "training.parallel.fsdp=2", "--set", "training.parallel.expert=2")
    log = _train(tmp_path / "ep2fsdp2", *_torchrun(4, tmp_path), extra=(*STEPS, *layout))
    # The expert dimension is the mesh's innermost: ranks 0 and 2 are the two fsdp shards of expert rank 0,
    # each with half of experts 0-3 (2 of the 4), and expert groups are neighbouring ranks.
    assert (
        "rank 2: experts 0-3 of 8 in each of 6 MoE layers (expert rank 0 of 2); gate_up_proj local (2, "
        in log
    )
    assert "rank 1: experts 4-7 of 8" in log
    _same_curve(tmp_path / "one", tmp_path / "ep2fsdp2")
