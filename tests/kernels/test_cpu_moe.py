"""The CPU backend's grouped-GEMM experts against the float64 reference, at the routing boundaries.

``lmspec.runtime.ops.cpu.moe_experts`` sorts the assignments by expert and runs one grouped GEMM per
projection (``torch._grouped_mm``, or the per-expert loop when the dtype or the row strides rule it out:
``moe_path``). Every test here counts the path each call took (``cpu.MOE_PATH_CALLS``), so a test cannot
pass by running the other one. Forward and every gradient (x, routing weights, gate_up_proj, down_proj) are
compared with the tolerance of the one table in ``lmspec.testing.compare``; outputs are poisoned, so an
element the fast path never writes fails as NaN.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.constants import MOE_SIGMOID, MOE_SOFTMAX
from lmspec.runtime.ops import CPUBackend, cpu
from lmspec.runtime.ops import reference as ref
from lmspec.testing import checks
from lmspec.testing import strategies as S
from lmspec.testing.compare import assert_matches_reference, poisoned_allocations

NAMES = ("out", "dx", "dweights", "dgate_up_proj", "ddown_proj")
# Hidden and intermediate sizes: multiples of 4 keep float32 rows 16-byte aligned (the grouped_mm path);
# the odd ones take the expert loop.
ALIGNED = [4, 8, 12, 20]
UNALIGNED = [1, 3, 7, 13]
ROUTINGS = ("random", "one_expert_hot", "some_experts_idle", "every_expert")


def _routing(kind: str, tokens: int, experts: int, top_k: int, g: torch.Generator) -> torch.Tensor:
    """(tokens, top_k) distinct experts per token, in one of the boundary patterns of ``ROUTINGS``."""
    if kind == "every_expert":  # top_k == num_experts: every expert gets every token
        return torch.stack([torch.randperm(experts, generator=g) for _ in range(tokens)])
    if kind == "one_expert_hot":  # every token's first choice is expert 1; with k = 1 it gets them all
        others = torch.tensor([e for e in range(experts) if e != 1])
        rest = [others[torch.randperm(experts - 1, generator=g)[: top_k - 1]] for _ in range(tokens)]
        return torch.stack([torch.cat((torch.tensor([1]), r)) for r in rest])
    if kind == "some_experts_idle":  # only the first top_k + 1 experts (at most E) receive tokens
        used = min(experts, top_k + 1)
        return torch.stack([torch.randperm(used, generator=g)[:top_k] for _ in range(tokens)])
    return torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)])


@st.composite
def expert_cases(draw: st.DrawFn) -> dict:
    experts = draw(st.integers(2, 9))
    kind = draw(st.sampled_from(ROUTINGS))
    top_k = experts if kind == "every_expert" else draw(st.integers(1, min(3, experts)))
    sizes = ALIGNED if draw(st.booleans()) else UNALIGNED
    return {
        "tokens": draw(st.integers(1, 40)),
        "experts": experts,
        "top_k": top_k,
        "hidden": draw(st.sampled_from(sizes)),
        "intermediate": draw(st.sampled_from(sizes)),
        "routing": kind,
        "dtype": torch.float32,
        "seed": draw(st.integers(0, 2**16)),
    }


def _inputs(case: dict) -> tuple[list[torch.Tensor], torch.Tensor]:
    """float64 (x, topk_weights, gate_up_proj, down_proj) and the routing of ``case``."""
    g = torch.Generator().manual_seed(case["seed"])
    n, e, k, h, i = (case[f] for f in ("tokens", "experts", "top_k", "hidden", "intermediate"))
    indices = _routing(case["routing"], n, e, k, g)
    tensors = [
        torch.randn(n, h, generator=g, dtype=torch.float64),
        torch.rand(n, k, generator=g, dtype=torch.float64) + 0.1,
        torch.randn(e, 2 * i, h, generator=g, dtype=torch.float64) * h**-0.5,
        torch.randn(e, h, i, generator=g, dtype=torch.float64) * i**-0.5,
    ]
    return tensors, indices


def _check(case: dict, cotangent: str = "random") -> dict[str, float]:
    """Forward and every gradient of cpu.moe_experts against the float64 reference; returns the errors."""
    dtype = case["dtype"]
    exact, indices = _inputs(case)
    exact = [t.requires_grad_() for t in exact]
    # The routing weights stay float32 whatever the model dtype (the router computes in fp32).
    weight_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    fast = [t.detach().to(weight_dtype if j == 1 else dtype).requires_grad_() for j, t in enumerate(exact)]
    want = ref.moe_experts(exact[0], exact[1], indices, exact[2], exact[3])
    before = Counter(cpu.MOE_PATH_CALLS)
    with poisoned_allocations():
        got = cpu.moe_experts(fast[0], fast[1], indices, fast[2], fast[3])
        path = cpu.moe_path(dtype, case["hidden"], case["intermediate"])
        assert Counter(cpu.MOE_PATH_CALLS) - before == Counter({path: 1})
        if cotangent == "sum":  # a broadcast cotangent with zero strides, as from out.sum().backward()
            got_grads = torch.autograd.grad(got.sum(), fast)
        else:
            cot = torch.randn(want.shape, generator=torch.Generator().manual_seed(case["seed"] ^ 0x5EED))
            got_grads = torch.autograd.grad(got, fast, cot.to(dtype))
    if cotangent == "sum":
        want_grads = torch.autograd.grad(want.sum(), exact)
    else:
        want_grads = torch.autograd.grad(want, exact, cot.double())
    errors = {}
    for name, g_, w_ in zip(NAMES, [got, *got_grads], [want, *want_grads], strict=True):
        errors[name] = assert_matches_reference(g_, w_, dtype, name=name)
    return errors


@settings(max_examples=60)
@given(case=expert_cases())
def test_grouped_experts_match_reference_at_routing_boundaries(case):
    _check(case)


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("sizes", [(8, 12), (7, 5)], ids=["grouped_mm", "expert_loop"])
def test_each_path_and_routing_boundary(routing, sizes):
    hidden, intermediate = sizes
    experts = 4
    case = {
        "tokens": 33,
        "experts": experts,
        "top_k": experts if routing == "every_expert" else 2,
        "hidden": hidden,
        "intermediate": intermediate,
        "routing": routing,
        "dtype": torch.float32,
        "seed": 7,
    }
    _check(case)


def test_all_tokens_to_one_expert_and_a_single_token():
    # top_k = 1 with every token on expert 1: one expert holds all rows, the others none.
    base = {"experts": 5, "hidden": 8, "intermediate": 4, "dtype": torch.float32, "seed": 3}
    _check({**base, "tokens": 17, "top_k": 1, "routing": "one_expert_hot"})
    _check({**base, "tokens": 1, "top_k": 2, "routing": "random"})


@pytest.mark.parametrize("sizes", [(8, 12), (7, 5)], ids=["grouped_mm", "expert_loop"])
def test_a_broadcast_cotangent(sizes):
    # out.sum().backward() hands the backward a zero-stride cotangent, which torch._grouped_mm refuses.
    hidden, intermediate = sizes
    case = {"tokens": 9, "experts": 3, "top_k": 2, "hidden": hidden, "intermediate": intermediate}
    _check({**case, "routing": "random", "dtype": torch.float32, "seed": 11}, cotangent="sum")


@pytest.mark.parametrize("routing", ["random", "one_expert_hot"])
def test_bfloat16(routing):
    # bf16 at sizes where a result is a sum of many rounded terms; at a handful of elements a gradient that
    # cancels can exceed the relative tolerance in any bf16 implementation, the reference's included.
    case = {"tokens": 64, "experts": 6, "top_k": 2, "hidden": 32, "intermediate": 24}
    _check({**case, "routing": routing, "dtype": torch.bfloat16, "seed": 13})


def test_float64_takes_the_expert_loop_exactly():
    # float64 (the oracle's dtype) is not a grouped_mm dtype: the same plan, one matmul per expert, equal
    # to the reference within float64 rounding, forward and every gradient.
    case = {"tokens": 30, "experts": 6, "top_k": 2, "hidden": 8, "intermediate": 12}
    errors = _check({**case, "routing": "some_experts_idle", "dtype": torch.float64, "seed": 5})
    assert set(errors) == set(NAMES)


@pytest.mark.parametrize("sizes", [(8, 12), (7, 5)], ids=["grouped_mm", "expert_loop"])
def test_an_expert_without_tokens_gets_exactly_zero_gradient(sizes):
    hidden, intermediate = sizes
    x = torch.randn(6, hidden)
    idx = torch.tensor([[0, 2]] * 6)
    w = torch.full((6, 2), 0.5)
    gu = torch.randn(4, 2 * intermediate, hidden, requires_grad=True)
    dp = torch.randn(4, hidden, intermediate, requires_grad=True)
    with poisoned_allocations():
        cpu.moe_experts(x, w, idx, gu, dp).square().sum().backward()
    for e in (1, 3):
        assert torch.equal(gu.grad[e], torch.zeros_like(gu.grad[e]))
        assert torch.equal(dp.grad[e], torch.zeros_like(dp.grad[e]))
    assert gu.grad[0].abs().sum() > 0 and dp.grad[2].abs().sum() > 0


def test_expert_offsets_are_the_cumulative_counts():
    idx = torch.tensor([[3, 0], [0, 1], [3, 1], [0, 3]])
    order, token_of, inverse, offsets = cpu.expert_offsets(idx, 5)
    assert offsets.tolist() == [3, 5, 5, 8, 8]  # expert 2 and 4 have no rows
    assert torch.equal(idx.reshape(-1)[order], torch.tensor([0, 0, 0, 1, 1, 3, 3, 3]))
    assert torch.equal(token_of, order // 2)
    assert torch.equal(order[inverse], torch.arange(8))
    want_order, want_tokens, counts = ref.sort_by_expert(idx, 5)
    assert torch.equal(order, want_order) and torch.equal(token_of, want_tokens)
    assert torch.equal(offsets.long(), counts.cumsum(0))


@settings(max_examples=25)
@given(case=S.moe_cases(MOE_SIGMOID))
def test_the_kernel_suite_check_passes_on_the_cpu_backend(case):
    checks.check_moe_experts(CPUBackend(), case)


@settings(max_examples=10)
@given(case=S.moe_cases(MOE_SOFTMAX))
def test_the_kernel_suite_check_passes_on_the_cpu_backend_softmax_spec(case):
    checks.check_moe_experts(CPUBackend(), case)


def test_the_cpu_backend_uses_the_grouped_experts():
    assert CPUBackend.moe_experts is cpu.moe_experts
    assert cpu.moe_path(torch.float32, 128, 96) == "grouped_mm"  # the tiny spec's experts
    assert cpu.moe_path(torch.float32, 128, 98) == "expert_loop"  # 98 * 4 bytes is not a multiple of 16
    assert cpu.moe_path(torch.bfloat16, 128, 96) == "grouped_mm"
    assert cpu.moe_path(torch.float64, 128, 96) == "expert_loop"
