"""Shared test set-up: the Triton interpreter selected first, one Hypothesis profile, a private
compile cache, one intra-op thread per test, and the repository's paths.

Tests run from any working directory: a path into the repository comes from `repo_root` or
`examples_dir` (or, where a module needs it at import time, from its own `__file__`), never from a
relative path such as "examples/...".
"""

from pathlib import Path

# Triton reads TRITON_INTERPRET once, at import: select the interpreter (on a machine without CUDA)
# before transformers or anything else can import triton.
try:
    import lmspec.runtime.ops.triton_support  # noqa: F401
except (ImportError, RuntimeError):
    pass

import pytest
import torch

from lmspec.testing.profiles import register_profiles

# The project's one Hypothesis profile system (lmspec.testing.profiles): `lmspec`, or `lmspec-ci` under CI.
register_profiles(load=True)


REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository's root directory, wherever pytest was started from."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def examples_dir(repo_root: Path) -> Path:
    """`examples/`: the example specs."""
    return repo_root / "examples"


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory):
    """Generated modules go to a per-run cache, never the user's ~/.cache/lmspec; and a debug level
    left set in the shell prints nothing into outputs the tests compare (tests/compiler/test_debug.py
    sets its own)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("LMSPEC_CACHE", str(tmp_path_factory.mktemp("lmspec-cache")))
    mp.delenv("LMSPEC_DEBUG", raising=False)
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _one_thread():
    """Test models are tiny: intra-op threads only add contention on a small shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
