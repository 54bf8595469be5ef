"""Specs shared by the compiler tests (loaded once per session)."""

from pathlib import Path

import pytest

from lmspec.spec import Spec, load_spec

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="session")
def mimo() -> Spec:
    return load_spec(EXAMPLES / "mimo_v2_flash.yaml", [])


@pytest.fixture(scope="session")
def tiny() -> Spec:
    return load_spec(EXAMPLES / "mimo_v2_flash_tiny.yaml", [])
