"""MoE kernels against the float64 reference: router (sigmoid and softmax variants) and grouped experts."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings

from kernels.constants import MOE_SIGMOID, MOE_SOFTMAX
from lmspec.testing import checks
from lmspec.testing import strategies as S
from lmspec.testing.compare import close


@settings(max_examples=50)
@given(case=S.moe_cases(MOE_SIGMOID))
def test_sigmoid_router_matches_reference(backend, case):
    checks.check_moe_route(backend, case)


@settings(max_examples=50)
@given(case=S.moe_cases(MOE_SOFTMAX))
def test_softmax_router_matches_reference(softmax_moe_backend, case):
    checks.check_moe_route(softmax_moe_backend, case)


@settings(max_examples=50)
@given(case=S.moe_cases(MOE_SIGMOID))
def test_grouped_experts_match_reference(backend, case):
    checks.check_moe_experts(backend, case)


@settings(max_examples=15)
@given(case=S.moe_cases(MOE_SOFTMAX))
def test_grouped_experts_match_reference_softmax_spec(softmax_moe_backend, case):
    checks.check_moe_experts(softmax_moe_backend, case)


@pytest.mark.slow
@settings(max_examples=200)
@given(case=S.moe_cases(MOE_SIGMOID, max_tokens=200))
def test_grouped_experts_match_reference_slow(backend, case):
    checks.check_moe_experts(backend, case)


def test_router_and_experts_match_transformers(backend):
    from transformers.models.mimo_v2_flash import modeling_mimo_v2_flash as hf

    class Config:
        num_local_experts, num_experts_per_tok, hidden_size, moe_intermediate_size = 8, 3, 32, 24
        hidden_act, routed_scaling_factor, n_group, topk_group, norm_topk_prob = "silu", 1.0, 1, 1, True
        _experts_implementation = "eager"

    router, experts = hf.MiMoV2FlashTopkRouter(Config), hf.MiMoV2FlashExperts(Config)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in (router.weight, experts.gate_up_proj, experts.down_proj):
            p.normal_(std=0.2)
        router.e_score_correction_bias.normal_(std=0.1)
    x = torch.randn(20, 32)
    _, hf_w, hf_i = router(x)
    w, i, _ = backend.route(x, router.weight, router.e_score_correction_bias, top_k=3)
    order = hf_i.argsort(-1)
    assert torch.equal(i.sort(-1).values, hf_i.gather(1, order))
    torch.testing.assert_close(w.gather(1, i.argsort(-1)), hf_w.gather(1, order))
    out = backend.moe_experts(x, w, i, experts.gate_up_proj, experts.down_proj)
    torch.testing.assert_close(out, experts(x, hf_i, hf_w), **close("float32"))


def test_expert_without_tokens_gets_zero_gradient(backend):
    x = torch.randn(4, 16)
    idx = torch.tensor([[0, 1, 2]] * 4)
    w = torch.full((4, 3), 1 / 3)
    gu = torch.randn(8, 20, 16, requires_grad=True)
    dp = torch.randn(8, 16, 10, requires_grad=True)
    backend.moe_experts(x, w, idx, gu, dp).sum().backward()
    assert torch.equal(gu.grad[3:], torch.zeros_like(gu.grad[3:]))
    assert gu.grad[:3].abs().sum() > 0
