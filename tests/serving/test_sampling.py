"""Warping (temperature, top-k, top-p) and the speculative accept rule, without a model."""

from __future__ import annotations

import pytest
import torch

from lmspec.serve.sampling import SamplingParams, accept_drafts, probs, sample

from .test_speculative import _chi2_pvalue


def test_greedy_is_one_hot_at_the_argmax_and_never_draws():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 2.9]])
    p = probs(logits, SamplingParams(temperature=0))
    assert torch.equal(p, torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    assert sample(p[1], g) == 0 and torch.equal(g.get_state(), state)


def test_temperature_top_k_and_top_p():
    logits = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))
    assert torch.allclose(probs(logits, SamplingParams()), torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))
    hot = probs(logits, SamplingParams(temperature=2.0))
    assert torch.allclose(hot, torch.softmax(logits / 2, -1))
    top2 = probs(logits, SamplingParams(top_k=2))
    assert torch.allclose(top2, torch.tensor([5 / 7, 2 / 7, 0, 0, 0]))
    # top_p keeps the smallest prefix whose mass reaches top_p: 0.5 + 0.2 = 0.7 >= 0.7.
    assert torch.allclose(probs(logits, SamplingParams(top_p=0.7)), torch.tensor([5 / 7, 2 / 7, 0, 0, 0]))
    assert torch.allclose(
        probs(logits, SamplingParams(top_p=0.71)), torch.tensor([0.5, 0.2, 0.15, 0, 0]) / 0.85
    )
    assert torch.allclose(probs(logits, SamplingParams(top_p=0.1)), torch.tensor([1.0, 0, 0, 0, 0]))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_p", float("nan")),
        ("top_k", -1),
        ("max_tokens", -1),
        ("seed", 2**64),
        ("seed", -(2**63) - 1),
        ("logprobs", 21),
        ("prompt_logprobs", -1),
    ],
)
def test_invalid_params_are_rejected(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(top_p=1e-300),
        SamplingParams(top_p=5e-324),
        SamplingParams(temperature=1e-300),
        SamplingParams(temperature=5e-324, top_p=1e-300, top_k=3),
        SamplingParams(temperature=2.0, top_p=1e-40),
    ],
    ids=["top_p", "top_p-subnormal", "temperature", "all", "hot-top_p"],
)
def test_settings_at_the_edge_of_the_range_keep_the_top_token(params, dtype):
    """What used to be 0/0 (NaN) or an empty top-p set: every row keeps its most likely token."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(64, 50, generator=g) * 30).to(dtype)
    logits[3] = 1e4  # a flat row: all tied
    logits[5, :10] = -torch.inf  # some tokens impossible
    p = probs(logits, params)
    assert torch.isfinite(p).all() and torch.allclose(p.sum(-1), torch.ones(64, dtype=dtype))
    top = logits.argmax(-1)
    assert (p.masked_fill(logits < logits.amax(-1, keepdim=True), 0).sum(-1) > 0).all()  # a top token kept
    tokens = [sample(p[i], g) for i in range(64)]
    assert tokens[:3] + tokens[4:] == top.tolist()[:3] + top.tolist()[4:]  # the tied row may pick any


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_logits_raise_for_that_row(bad):
    logits = torch.zeros(2, 8)
    logits[1, 3] = bad
    with pytest.raises(FloatingPointError, match="non-finite"):
        probs(logits, SamplingParams())
    with pytest.raises(FloatingPointError):
        probs(logits, SamplingParams(temperature=0))  # greedy would pick NaN's index silently
    assert torch.isfinite(probs(logits[:1], SamplingParams())).all()
    with pytest.raises(FloatingPointError):
        probs(torch.full((4,), -torch.inf), SamplingParams())


def test_accept_rule_emits_the_target_distribution():
    """The first emitted token (draft or correction) is distributed as p_0, whatever the draft q is."""
    g = torch.Generator().manual_seed(1)
    V = 6
    p = torch.softmax(torch.randn(3, V, generator=g) * 2, -1).double()
    q = torch.softmax(torch.randn(2, V, generator=g) * 2, -1).double()
    n = 20000
    first = torch.zeros(V, dtype=torch.float64)
    accepted = []
    for _ in range(n):
        drafts = [int(torch.multinomial(q[i].float(), 1, generator=g)) for i in range(2)]
        a, nxt = accept_drafts(p, q, drafts, g)
        first[(drafts + [nxt])[0] if a > 0 else nxt] += 1
        accepted.append(a)
    assert _chi2_pvalue(first, p[0]) > 1e-3
    # The acceptance probability of the first draft is sum_x min(p_0(x), q_1(x)).
    rate = sum(a > 0 for a in accepted) / n
    assert rate == pytest.approx(float(torch.minimum(p[0], q[0]).sum()), abs=0.02)


def test_greedy_accept_keeps_matching_drafts_and_corrects_the_first_miss():
    one_hot = torch.eye(4, dtype=torch.float64)
    p = one_hot[[2, 3, 1]]  # target argmaxes 2, 3 then bonus 1
    assert accept_drafts(p, one_hot[[2, 3]], [2, 3], None) == (2, 1)
    assert accept_drafts(p, one_hot[[2, 0]], [2, 0], None) == (1, 3)
    assert accept_drafts(p, one_hot[[1, 3]], [1, 3], None) == (0, 2)
