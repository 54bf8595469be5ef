"""Partial RoPE (rotate_half on the leading rope_dim dims) against the reference and transformers."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings

from kernels.constants import ROPE_VARIANTS
from lmspec.testing import checks
from lmspec.testing import strategies as S


@settings(max_examples=50)
@given(case=S.rope_cases(ROPE_VARIANTS))
def test_rope_matches_reference(backend, case):
    checks.check_rope(backend, case)


@pytest.mark.slow
@settings(max_examples=400)
@given(case=S.rope_cases(ROPE_VARIANTS))
def test_rope_matches_reference_slow(backend, case):
    checks.check_rope(backend, case)


def test_rope_matches_transformers(backend):
    from transformers.models.mimo_v2_flash.modeling_mimo_v2_flash import apply_rotary_pos_emb

    q, k = torch.randn(2, 4, 7, 192), torch.randn(2, 2, 7, 192)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 64, 2).float() / 64))
    freqs = torch.arange(7)[None, :, None].float() * inv_freq  # (1, T, 32)
    emb = torch.cat([freqs, freqs], -1).expand(2, 7, 64)
    hq, hk = apply_rotary_pos_emb(q, k, emb.cos(), emb.sin())
    oq, ok = backend.rope(q, k, emb.cos(), emb.sin())
    torch.testing.assert_close(oq, hq)
    torch.testing.assert_close(ok, hk)
    assert torch.equal(oq[..., 64:], q[..., 64:])  # dims past rope_dim pass through untouched
