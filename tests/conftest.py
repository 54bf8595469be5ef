"""Shared test set-up: the Triton interpreter selected first, one Hypothesis profile, a private
compile cache and one intra-op thread per test."""

import os

# Triton reads TRITON_INTERPRET once, at import: select the interpreter (on a machine without CUDA)
# before transformers or anything else can import triton.
try:
    import lmspec.runtime.ops.triton_support  # noqa: F401
except (ImportError, RuntimeError):
    pass

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "lmspec",
    deadline=None,
    derandomize=bool(os.environ.get("CI")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.load_profile("lmspec")


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory):
    """Generated modules go to a per-run cache, never the user's ~/.cache/lmspec."""
    mp = pytest.MonkeyPatch()
    mp.setenv("LMSPEC_CACHE", str(tmp_path_factory.mktemp("lmspec-cache")))
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _one_thread():
    """Test models are tiny: intra-op threads only add contention on a small shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
