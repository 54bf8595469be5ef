"""Shared fixtures: a private compile cache, and the tiny example spec."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmspec.spec import Spec, load_spec

TINY = Path(__file__).resolve().parents[2] / "examples" / "mimo_v2_flash_tiny.yaml"


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    mp = pytest.MonkeyPatch()
    mp.setenv("LMSPEC_CACHE", str(tmp_path_factory.mktemp("lmspec-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def tiny_spec() -> Spec:
    return load_spec(TINY)
