"""SwiGLU against the float64 reference: out, dgate, dup."""

from __future__ import annotations

import pytest
from hypothesis import given, settings

from lmspec.testing import checks
from lmspec.testing import strategies as S


@settings(max_examples=50)
@given(case=S.swiglu_cases())
def test_swiglu_matches_reference(backend, case):
    checks.check_swiglu(backend, case)


@pytest.mark.slow
@settings(max_examples=500)
@given(case=S.swiglu_cases())
def test_swiglu_matches_reference_slow(backend, case):
    checks.check_swiglu(backend, case)
