"""The CPU backend's fast attention paths against the float64 reference, at the boundaries between paths.

``lmspec.runtime.ops.cpu`` picks a path per call (its module docstring has the table). Every test here
counts the calls each path took (``cpu.PATH_CALLS``), so a test cannot pass by silently running another
path. Forward and every gradient (q, k, v, sinks) are compared by ``lmspec.testing.checks`` against the
reference in float64, with the tolerance of the one table in ``lmspec.testing.compare``.
"""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.constants import ROPE_VARIANTS
from lmspec.compiler.variants import AttentionVariant
from lmspec.runtime.ops import CPUBackend, cpu
from lmspec.runtime.ops import reference as ref
from lmspec.testing import checks
from lmspec.testing import strategies as S
from lmspec.testing.compare import assert_matches_reference
from lmspec.testing.strategies import AttentionCase

TINY = Path(__file__).resolve().parents[2] / "examples" / "mimo_v2_flash_tiny.yaml"
BLOCK = cpu.BAND_BLOCK
# 33 is the tiny spec's sliding window (32 previous keys + self): its switch sits at the demo's seq_len 128.
SWITCH_WINDOWS = [1, 2, 5, 33]
# (qk_head_dim, v_head_dim): never equal, so a swapped dim cannot pass.
HEAD_DIMS = [(12, 8), (8, 6), (6, 10)]


def _expected_path(seq: int, window_keys: int | None, sink: bool) -> str:
    """The module's table, restated: banded at multiples of the block from twice the band on."""
    if window_keys is not None and seq % BLOCK == 0 and seq >= 2 * (BLOCK + window_keys - 1):
        return "banded"
    return "sdpa_causal" if window_keys is None and not sink else "sdpa_masked"


def _draw_case(draw: st.DrawFn, window_keys: int | None, seq: int) -> AttentionCase:
    qk, dv = draw(st.sampled_from(HEAD_DIMS))
    variant = AttentionVariant(
        window_keys=window_keys,
        sink=draw(st.booleans()),
        qk_head_dim=qk,
        v_head_dim=dv,
        value_scale=draw(st.sampled_from([1.0, 0.707])),
    )
    return AttentionCase(
        variant=variant,
        batch=draw(st.integers(1, 2)),
        kv_heads=draw(st.integers(1, 2)),
        group=draw(st.sampled_from([1, 3])),  # 3: GQA with an odd group
        seq=seq,
        sink_mean=draw(st.sampled_from([0.0, 5.0])),  # neutral, and a sink that holds most of the mass
        dtype="float32",  # the fast paths run in float32 only (others take the reference)
        seed=draw(st.integers(0, 2**16)),
    )


@st.composite
def banded_switch_cases(draw: st.DrawFn) -> AttentionCase:
    """T one block below, one below, at, one above and one block above the first banded length."""
    window = draw(st.sampled_from(SWITCH_WINDOWS))
    start = cpu.min_banded_seq(window)
    seq = draw(st.sampled_from([start - BLOCK, start - 1, start, start + 1, start + BLOCK]))
    return _draw_case(draw, window, seq)


@st.composite
def window_edge_cases(draw: st.DrawFn) -> AttentionCase:
    """Windows 1, T - 1, T and T + 1 (the last two see every earlier key), and global."""
    seq = draw(st.integers(1, 70))
    window = draw(st.sampled_from([1, max(1, seq - 1), seq, seq + 1, None]))
    return _draw_case(draw, window, seq)


def _check_through_dispatch(case: AttentionCase) -> dict[str, float]:
    before = Counter(cpu.PATH_CALLS)
    errors = checks.check_attention(CPUBackend(), case)
    v = case.variant
    assert Counter(cpu.PATH_CALLS) - before == Counter({_expected_path(case.seq, v.window_keys, v.sink): 1})
    assert set(errors) == {"out", "dq", "dk", "dv"} | ({"dsinks"} if v.sink else set())
    return errors


def test_the_banded_switch_lengths():
    # Twice the band (BLOCK + window - 1 keys), rounded up to a whole block.
    assert [cpu.min_banded_seq(w) for w in (1, 2, 5, 33, 34)] == [64, 96, 96, 128, 160]


@settings(max_examples=40)
@given(case=banded_switch_cases())
def test_banded_switch_matches_reference(case):
    _check_through_dispatch(case)


@settings(max_examples=40)
@given(case=window_edge_cases())
def test_window_edges_match_reference(case):
    _check_through_dispatch(case)


@pytest.mark.parametrize("sink", [False, True])
@pytest.mark.parametrize("window_keys", [1, 33])
def test_banded_path_directly_and_through_dispatch(window_keys, sink):
    # The banded function itself, and the dispatch at the first banded length, both equal the reference.
    seq = cpu.min_banded_seq(window_keys)
    variant = AttentionVariant(window_keys=window_keys, sink=sink, qk_head_dim=12, v_head_dim=8)
    case = AttentionCase(
        variant, batch=1, kv_heads=2, group=2, seq=seq, sink_mean=2.0, dtype="float32", seed=3
    )
    x = case.inputs()
    direct = cpu._banded(x["q"], x["k"], x["v"], x["sinks"], scale=0.3, window_keys=window_keys)
    r = {n: None if t is None else t.double() for n, t in x.items()}
    want = ref.attention(r["q"], r["k"], r["v"], r["sinks"], scale=0.3, window_keys=window_keys)
    assert_matches_reference(direct, want, torch.float32, name="banded")
    _check_through_dispatch(case)


@pytest.mark.parametrize("sink", [False, True])
@pytest.mark.parametrize("window_keys", [None, 3, 70])
@pytest.mark.parametrize("queries", [1, 5])
def test_queries_after_a_prefix_match_reference(queries, window_keys, sink):
    # Tq < Tk with dense positions: the queries are the last Tq positions (the mask is offset).
    g = torch.Generator().manual_seed(queries * 100 + (window_keys or 0))
    Tk = 70
    q = torch.randn(2, 6, queries, 12, generator=g)
    k = torch.randn(2, 2, Tk, 12, generator=g)
    v = torch.randn(2, 2, Tk, 8, generator=g)
    sinks = torch.randn(6, generator=g) + 2.0 if sink else None
    kw = {"scale": 12**-0.5, "value_scale": 0.707, "window_keys": window_keys}
    fast = [t.requires_grad_() for t in (q.clone(), k.clone(), v.clone())]
    exact = [t.double().requires_grad_() for t in (q, k, v)]
    s64 = None if sinks is None else sinks.double()
    before = Counter(cpu.PATH_CALLS)
    out = cpu.attention(*fast, sinks, **kw)
    assert Counter(cpu.PATH_CALLS) - before == Counter({"sdpa_masked": 1})
    want = ref.attention(*exact, s64, **kw)
    do = torch.randn(want.shape, generator=g, dtype=torch.float64)
    got_grads = torch.autograd.grad(out, fast, do.float())
    want_grads = torch.autograd.grad(want, exact, do)
    for name, got, w in zip(["out", "dq", "dk", "dv"], [out, *got_grads], [want, *want_grads], strict=True):
        assert_matches_reference(got, w, torch.float32, name=name)


def test_other_calls_take_the_reference_exactly():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 40, 8, generator=g, dtype=torch.float64) for _ in range(3))
    sinks = torch.randn(2, generator=g, dtype=torch.float64)
    pos = torch.arange(40).expand(1, 40)
    calls = [
        ((q, k, v, sinks), {"window_keys": 5}),  # float64: the oracle's own dtype
        ((q.float(), k.float(), v.float(), None), {"q_pos": pos, "k_pos": pos}),  # explicit positions
        ((q.bfloat16(), k.bfloat16(), v.bfloat16(), sinks.bfloat16()), {"window_keys": 33}),  # half
        ((q.float(), k[:, :, :10].float(), v[:, :, :10].float(), None), {}),  # more queries than keys
    ]
    for args, kw in calls:
        before = Counter(cpu.PATH_CALLS)
        out = cpu.attention(*args, scale=0.3, **kw)
        assert Counter(cpu.PATH_CALLS) - before == Counter({"reference": 1})
        assert torch.equal(out, ref.attention(*args, scale=0.3, **kw))


@pytest.mark.parametrize("seq,banded_calls", [(127, 0), (128, 4)])
def test_the_tiny_model_takes_the_banded_path_at_its_training_length(seq, banded_calls):
    # The tiny spec trains at seq_len 128 with four sliding layers: every demo step runs the banded path,
    # and one token less does not. Its logits equal the reference backend's.
    import lmspec

    torch.manual_seed(0)
    model = lmspec.build(str(TINY))
    oracle = copy.deepcopy(model).double()
    oracle.set_backend("reference")
    x = torch.randint(1, 256, (1, seq))
    before = Counter(cpu.PATH_CALLS)
    with torch.no_grad():
        fast = model(x).logits
        assert (Counter(cpu.PATH_CALLS) - before)["banded"] == banded_calls
        exact = oracle(x).logits
    assert_matches_reference(fast, exact, torch.float32, name="logits")


@pytest.mark.parametrize("qk,dv", [(12, 8), (6, 10), (8, 8)])
@pytest.mark.parametrize("group", [1, 3])
def test_the_causal_path_runs_the_flash_kernel_at_any_head_dims(qk, dv, group):
    # The global path pads the smaller head dim so that SDPA's CPU flash kernel takes it (forward and
    # backward) instead of its math path; the result and every gradient still equal the reference.
    from torch.profiler import ProfilerActivity, profile

    variant = AttentionVariant(window_keys=None, sink=False, qk_head_dim=qk, v_head_dim=dv)
    case = AttentionCase(
        variant, batch=2, kv_heads=2, group=group, seq=37, sink_mean=0.0, dtype="float32", seed=11
    )
    _check_through_dispatch(case)
    x = case.inputs()
    q, k, v = (x[n].clone().requires_grad_() for n in ("q", "k", "v"))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        cpu.attention(q, k, v, None, scale=qk**-0.5).sum().backward()
    ran = {e.key for e in prof.key_averages()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ran
    assert "aten::_scaled_dot_product_flash_attention_for_cpu_backward" in ran
    assert "aten::_softmax" not in ran  # the math path's softmax never ran


@settings(max_examples=60)
@given(case=S.rope_cases(ROPE_VARIANTS))
def test_cpu_rope_matches_reference(case):
    # Rotated halves, pass-through dims (none when rope_dim == head_dim), batched and shared tables, and
    # the gradients of q and k, against the float64 reference.
    errors = checks.check_rope(CPUBackend(), case)
    assert set(errors) == {"q", "k", "dq", "dk"}


def test_cpu_rope_falls_back_to_the_reference_where_it_has_no_path():
    # Tables that need a gradient: the fast path gives none for them, so the reference runs.
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, 2, 5, 12, generator=g), torch.randn(1, 1, 5, 12, generator=g)
    cos = torch.randn(5, 8, generator=g).requires_grad_()
    sin = torch.randn(5, 8, generator=g)
    got = cpu.rope(q, k, cos, sin)
    want = ref.rope(q, k, cos, sin)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert got[0].grad_fn is not None and got[0].grad_fn.name() != "_RopeBackward"
