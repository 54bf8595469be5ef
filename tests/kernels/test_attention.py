"""Flash attention (training) against the float64 reference: forward, dq, dk, dv and dsinks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings

from kernels.conftest import COUNTING_GLOBAL, COUNTING_SLIDING
from kernels.constants import ATTENTION_VARIANTS, MIMO_SLIDING
from lmspec.compiler.variants import BlockCountAttentionVariant
from lmspec.testing import checks
from lmspec.testing import strategies as S

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@settings(max_examples=50)
@given(case=S.attention_cases(ATTENTION_VARIANTS, max_small=40, max_seq=160))
def test_flash_attention_matches_reference(backend, case):
    checks.check_attention(backend, case)


@settings(max_examples=6)
@given(
    case=S.attention_cases([MIMO_SLIDING], max_batch=1, max_kv_heads=1, max_group=2, max_small=8, max_seq=140)
)
def test_mimo_swa_across_the_window(backend, case):
    # Lengths 128..131 and 2W+1 sit where the window starts to cut keys and where key blocks straddle it.
    checks.check_attention(backend, case)


@pytest.mark.parametrize("seq", [128, 129, 130, 131])
def test_mimo_swa_window_edges(backend, seq):
    case = S.AttentionCase(
        MIMO_SLIDING, batch=1, kv_heads=1, group=2, seq=seq, sink_mean=5.0, dtype="float32", seed=seq
    )
    checks.check_attention(backend, case)


def test_dominant_sink_takes_the_mass_and_its_gradient_is_right(backend):
    # Sinks of 8 against unit-scale logits: most of every row's softmax mass sits on the sink.
    case = S.AttentionCase(
        MIMO_SLIDING, batch=1, kv_heads=1, group=2, seq=20, sink_mean=8.0, dtype="float32", seed=7
    )
    x = case.inputs()
    kw = {"scale": 192**-0.5, "value_scale": 0.707, "window_keys": 129}
    with_sink = backend.attention(x["q"], x["k"], x["v"], x["sinks"], **kw)
    without = backend.attention(x["q"], x["k"], x["v"], x["sinks"] - 1e4, **kw)
    assert with_sink.norm() < 0.05 * without.norm()
    errors = checks.check_attention(backend, case)
    assert "dsinks" in errors


@pytest.mark.slow
@settings(max_examples=200)
@given(
    case=S.attention_cases(
        ATTENTION_VARIANTS, max_batch=2, max_kv_heads=2, max_group=4, max_small=64, max_seq=300
    )
)
def test_flash_attention_matches_reference_slow(backend, case):
    checks.check_attention(backend, case)


def _visited(backend, variant: BlockCountAttentionVariant, seq: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, seq, 16, generator=g)
    k = torch.randn(1, 1, seq, 16, generator=g)
    v = torch.randn(1, 1, seq, 16, generator=g)
    sinks = torch.zeros(1) if variant.sink else None
    return backend.kernel(variant.key).count_key_blocks(q, k, v, sinks, 0.25)


def test_sliding_window_visits_key_blocks_linear_in_seq(counting_backend):
    lengths = [64, 128, 256, 512]
    swa = [int(_visited(counting_backend, COUNTING_SLIDING, t).sum()) for t in lengths]
    dense = [int(_visited(counting_backend, COUNTING_GLOBAL, t).sum()) for t in lengths]
    block_m, block_n = counting_backend.kernel(COUNTING_SLIDING.key).launch("fwd")[:2]
    # Per query block: the blocks overlapping [start - W + 1, start + BLOCK_M), never more.
    bound = -(-(block_m + 16 - 1) // block_n) + 1
    assert int(_visited(counting_backend, COUNTING_SLIDING, 512).max()) <= bound
    # Doubling T doubles the sliding-window work (up to the first blocks) but quadruples the causal work.
    for a, b in zip(swa, swa[1:], strict=False):
        assert b <= 2 * a + bound
    assert dense[-1] / dense[-2] > 3.5
    assert swa[-1] / swa[-2] < 2.1
