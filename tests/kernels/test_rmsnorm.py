"""Residual add + RMSNorm against the float64 reference: out, sum, dx, dresidual, dweight."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings

from kernels.constants import EPS
from lmspec.testing import checks
from lmspec.testing import strategies as S
from lmspec.testing.compare import close


@settings(max_examples=50)
@given(case=S.rmsnorm_cases())
def test_add_rmsnorm_matches_reference(backend, case):
    checks.check_rmsnorm(backend, case, EPS)


@pytest.mark.slow
@settings(max_examples=500)
@given(case=S.rmsnorm_cases())
def test_add_rmsnorm_matches_reference_slow(backend, case):
    checks.check_rmsnorm(backend, case, EPS)


def test_rmsnorm_matches_transformers(backend):
    from transformers.models.mimo_v2_flash.modeling_mimo_v2_flash import MiMoV2FlashRMSNorm

    hf = MiMoV2FlashRMSNorm(64, eps=EPS)
    with torch.no_grad():
        hf.weight.normal_()
    x = torch.randn(3, 5, 64)
    torch.testing.assert_close(backend.rmsnorm(x, hf.weight, EPS), hf(x), **close("float32_op"))


def test_eps_is_baked(backend):
    # eps is part of the variant's key: another eps has no kernel, rather than a silently different norm.
    with pytest.raises(LookupError, match=r"no rendered rmsnorm kernel for key \('rmsnorm', 1e-06\)"):
        backend.rmsnorm(torch.randn(2, 8), torch.ones(8), 1e-6)
