"""Kernels rendered once per session for the test variants (constants.py), and the Triton backends.

The variants mix MiMo-V2-Flash's real attention variants (window 129 + sink, full; q/k 192, v 128,
value scale 0.707) with small odd-sized ones that keep the interpreter fast.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import lmspec.runtime.ops.triton_support  # noqa: F401, I001  (interpreter on before any test module imports triton)
from kernels.constants import MOE_SOFTMAX, TEST_VARIANTS
from lmspec.compiler.variants import BlockCountAttentionVariant
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


def _backend(tmp_path_factory: pytest.TempPathFactory, name: str, variants: tuple):
    from lmspec.codegen.kernels import render_kernels
    from lmspec.runtime.ops.triton_backend import TritonBackend

    out: Path = tmp_path_factory.mktemp(name)
    render_kernels(variants, out, spec_name=f"tests/kernels:{name}")
    return TritonBackend(out)


@pytest.fixture(scope="session")
def backend(tmp_path_factory: pytest.TempPathFactory):
    """TritonBackend over kernels rendered from TEST_VARIANTS."""
    return _backend(tmp_path_factory, "kernels", TEST_VARIANTS)


@pytest.fixture(scope="session")
def softmax_moe_backend(tmp_path_factory: pytest.TempPathFactory):
    """The MoE kernels of a softmax router without renormalisation, scaled by 2.5."""
    return _backend(tmp_path_factory, "kernels_softmax_moe", (MOE_SOFTMAX,))


COUNTING_SLIDING = BlockCountAttentionVariant(window_keys=16, sink=True, qk_head_dim=16, v_head_dim=16)
COUNTING_GLOBAL = BlockCountAttentionVariant(window_keys=None, sink=False, qk_head_dim=16, v_head_dim=16)


@pytest.fixture(scope="session")
def counting_backend(tmp_path_factory: pytest.TempPathFactory):
    """Attention kernels of the debug variant that counts the key blocks each query block visits."""
    return _backend(tmp_path_factory, "kernels_counting", (COUNTING_SLIDING, COUNTING_GLOBAL))
