"""Fused LM head + cross-entropy: values and gradients vs the reference, and its memory bound."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings

from kernels.constants import LM_HEAD_CE
from lmspec.compiler.variants import LMHeadCEVariant
from lmspec.testing import checks
from lmspec.testing import strategies as S


@settings(max_examples=50)
@given(case=S.ce_cases(LM_HEAD_CE))
def test_lm_head_ce_matches_reference(backend, case):
    checks.check_lm_head_ce(backend, case)


@pytest.mark.slow
@settings(max_examples=300)
@given(case=S.ce_cases(LM_HEAD_CE, max_tokens=300))
def test_lm_head_ce_matches_reference_slow(backend, case):
    checks.check_lm_head_ce(backend, case)


def test_reference_matches_torch_cross_entropy():
    from lmspec.runtime.ops import reference as ref

    h = torch.randn(33, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (33,))
    labels[::4] = -100
    got = ref.lm_head_ce(h, w, labels, chunk_size=5)
    want = F.cross_entropy(h @ w.t(), labels)
    torch.testing.assert_close(got, want)
    g = torch.autograd.grad(got, [h, w])
    gw = torch.autograd.grad(want, [h, w])
    for a, b in zip(g, gw, strict=True):
        torch.testing.assert_close(a, b)


_MEASURE = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    backend_name, kernel_dir, n, h, v = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
    from lmspec.runtime.ops import get_backend
    backend = get_backend(backend_name, kernel_dir=kernel_dir if backend_name == "triton" else None)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    weight = (torch.randn(v, h, generator=g) * h**-0.5).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    # Warm up on a few tokens so code paths and allocator arenas exist before the measurement.
    backend.lm_head_ce(hidden[:4].detach().requires_grad_(), weight, labels[:4]).backward()
    weight.grad = None
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    loss = backend.lm_head_ce(hidden, weight, labels)
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"extra": peak - base, "loss": loss.item()}))
    """
)


def _peak_extra(backend_name: str, kernel_dir: str, n: int, h: int, v: int) -> int:
    # Large blocks always come from mmap and go back to the OS when freed, so the RSS high-water mark
    # follows live tensors instead of glibc's heap growth.
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    res = subprocess.run(
        [sys.executable, "-c", _MEASURE, backend_name, kernel_dir, str(n), str(h), str(v)],
        capture_output=True,
        text=True,
        env=env,
        cwd=os.getcwd(),
        check=True,
    )
    return json.loads(res.stdout.strip().splitlines()[-1])["extra"]


@pytest.mark.parametrize("backend_name,n", [("torch", 2048), ("triton", 256)])
def test_fused_ce_peak_memory_is_under_an_eighth_of_the_logits(backend_name, n, tmp_path):
    """Forward+backward peak extra memory (process RSS high-water mark) < 1/8 of the (N, V) fp32 logits."""
    from lmspec.codegen.kernels import render_kernels

    v, h = 152576, 8
    render_kernels([LMHeadCEVariant(vocab_size=v)], tmp_path)
    extra = _peak_extra(backend_name, str(tmp_path), n, h, v)
    full_logits = n * v * 4
    assert extra < full_logits / 8, (
        f"peak extra {extra / 2**20:.1f} MiB vs full logits {full_logits / 2**20:.1f} MiB"
    )
