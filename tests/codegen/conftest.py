"""Shared fixtures: a private compile cache, one intra-op thread, and the tiny example spec."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# Select the Triton interpreter (on a machine without CUDA) before transformers or anything else imports
# triton: triton reads TRITON_INTERPRET once, and test_triton_model runs the rendered kernels.
try:
    import lmspec.runtime.ops.triton_support  # noqa: F401
except (ImportError, RuntimeError):
    pass

from lmspec.spec import Spec, load_spec

TINY = Path(__file__).resolve().parents[2] / "examples" / "mimo_v2_flash_tiny.yaml"


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    mp = pytest.MonkeyPatch()
    mp.setenv("LMSPEC_CACHE", str(tmp_path_factory.mktemp("lmspec-cache")))
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: intra-op threads only add contention on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_spec() -> Spec:
    return load_spec(TINY)
