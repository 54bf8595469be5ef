"""Kernels rendered once per session for the test constants (constants.py), and the Triton backends.

The constants mix MiMo-V2-Flash's real attention variants (window 129 + sink, full; q/k 192, v 128,
value scale 0.707) with small odd-sized ones that keep the interpreter fast.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import lmspec.runtime.ops.triton_support  # noqa: F401, I001  (interpreter on before any test module imports triton)
from kernels.constants import MOE_SOFTMAX, TEST_CONSTANTS
from lmspec.testing import register_profiles

register_profiles(load=True)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Kernel tests run tiny tensor ops between interpreted kernels; extra threads only contend for cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _backend(tmp_path_factory: pytest.TempPathFactory, name: str, constants: dict, **kw):
    from lmspec.codegen.kernels import render_kernels
    from lmspec.runtime.ops.triton_backend import TritonBackend

    out: Path = tmp_path_factory.mktemp(name)
    render_kernels(constants, out, spec_name=f"tests/kernels:{name}", **kw)
    return TritonBackend(out)


@pytest.fixture(scope="session")
def backend(tmp_path_factory: pytest.TempPathFactory):
    """TritonBackend over kernels rendered from TEST_CONSTANTS."""
    return _backend(tmp_path_factory, "kernels", TEST_CONSTANTS)


@pytest.fixture(scope="session")
def softmax_moe_backend(tmp_path_factory: pytest.TempPathFactory):
    """The MoE kernels of a softmax router without renormalisation, scaled by 2.5."""
    return _backend(tmp_path_factory, "kernels_softmax_moe", {"moe": MOE_SOFTMAX})


@pytest.fixture(scope="session")
def counting_backend(tmp_path_factory: pytest.TempPathFactory):
    """Attention kernels rendered with the debug counter of visited key blocks."""
    window = {"window_keys": 16, "sink": True, "qk_head_dim": 16, "v_head_dim": 16, "value_scale": 1.0}
    full = {"window_keys": None, "sink": False, "qk_head_dim": 16, "v_head_dim": 16, "value_scale": 1.0}
    return _backend(tmp_path_factory, "kernels_counting", {"attention": [window, full]}, count_blocks=True)
