"""Shared fixtures: the tiny example spec."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmspec.spec import Spec, load_spec

TINY = Path(__file__).resolve().parents[2] / "examples" / "mimo_v2_flash_tiny.yaml"


@pytest.fixture(scope="session")
def tiny_spec() -> Spec:
    return load_spec(TINY)
