"""Decode attention over a KV cache with positions (ring buffers, empty slots, split-K) vs the reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings

from kernels.constants import DECODE_VARIANTS, MIMO_SLIDING
from lmspec.testing import checks
from lmspec.testing import strategies as S
from lmspec.testing.compare import close


@settings(max_examples=50)
@given(case=S.decode_cases(DECODE_VARIANTS))
def test_decode_attention_matches_reference(backend, case):
    checks.check_decode_attention(backend, case)


@pytest.mark.slow
@settings(max_examples=300)
@given(case=S.decode_cases(DECODE_VARIANTS, max_slots=300))
def test_decode_attention_matches_reference_slow(backend, case):
    checks.check_decode_attention(backend, case)


def test_query_with_no_visible_key_and_no_sink_gives_zero(backend):
    q = torch.randn(1, 2, 1, 20)
    k = torch.randn(1, 1, 5, 20)
    v = torch.randn(1, 1, 5, 12)
    out = backend.attention(
        q, k, v, None, scale=0.2, window_keys=None, q_pos=torch.tensor([[3]]), k_pos=torch.full((1, 5), -1)
    )
    assert torch.equal(out, torch.zeros_like(out))


def test_backend_routes_positions_to_the_decode_kernel(backend):
    # Same call with explicit arange positions and without: decode and flash kernels agree.
    case = S.AttentionCase(
        MIMO_SLIDING, batch=1, kv_heads=1, group=8, seq=9, sink_mean=2.0, dtype="float32", seed=3
    )
    x = case.inputs()
    kw = {"scale": 192**-0.5, "value_scale": 0.707, "window_keys": 129}
    pos = torch.arange(9)[None]
    flash = backend.attention(x["q"], x["k"], x["v"], x["sinks"], **kw)
    decode = backend.attention(x["q"], x["k"], x["v"], x["sinks"], q_pos=pos, k_pos=pos, **kw)
    torch.testing.assert_close(decode, flash, **close("float32_op"))
