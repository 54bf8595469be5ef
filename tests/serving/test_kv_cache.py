"""The hybrid KV cache alone: every step sees exactly the keys a full forward would, through ring wraps,
ragged batches, chunked prefill and speculative rollbacks; its bytes match the accounting."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmspec.compiler.accounting import account
from lmspec.runtime.kv_cache import HybridKVCache, cache_layout, kv_cache_bytes
from lmspec.runtime.ops.reference import attention
from lmspec.spec import load_spec
from lmspec.testing.compare import close

from .conftest import TINY

SWA, GLOBAL = "model.layers.1", "model.layers.0"  # tiny pattern: G0 S*2 G S*2 G


def tiny(window: int = 32, convention: str = "previous_plus_self"):
    return load_spec(
        TINY,
        [f"model.attention.swa.window={window}", f"model.attention.swa.window_convention={convention}"],
    )


@st.composite
def scenarios(draw):
    window = draw(st.integers(1, 6))
    depth = draw(st.integers(0, 3))
    batch = draw(st.integers(1, 3))
    steps = []
    for _ in range(draw(st.integers(1, 10))):
        chunk = []
        for _b in range(batch):
            kind = draw(st.sampled_from(["idle", "prefill", "decode", "speculate"]))
            if kind == "idle":
                chunk.append((0, 0))
            elif kind == "prefill":
                chunk.append((draw(st.integers(1, 12)), None))
            elif kind == "decode":
                chunk.append((1, None))
            else:  # a verify step of depth + 1 tokens, of which `kept` survive the rollback
                chunk.append((depth + 1, draw(st.integers(0, depth + 1))))
        steps.append(chunk)
    left = draw(st.booleans())  # pad ragged rows on the left instead of the right
    return window, depth, batch, steps, left


@settings(max_examples=40)
@given(scenarios(), st.sampled_from([SWA, GLOBAL]))
def test_every_step_sees_exactly_the_keys_of_a_full_forward(scenario, layer):
    window, depth, batch, steps, left = scenario
    spec = tiny(window)
    attn = spec.model.layer_attention(int(layer.rsplit(".", 1)[1]))
    W = attn.window_keys
    Hkv, Hq, D, Dv = attn.num_kv_heads, attn.num_heads, attn.qk_head_dim, attn.v_head_dim
    max_len = 80
    cache = HybridKVCache(spec, batch, max_len, dtype=torch.float64, speculative_depth=depth)
    g = torch.Generator().manual_seed(0)
    # The true keys/values of every position; rejected speculative writes get other, random values.
    true_k = torch.randn(batch, Hkv, max_len, D, generator=g, dtype=torch.float64)
    true_v = torch.randn(batch, Hkv, max_len, Dv, generator=g, dtype=torch.float64)
    lengths = [0] * batch
    for chunk in steps:
        T = max(n for n, _ in chunk) or 1
        pos = torch.full((batch, T), -1, dtype=torch.long)
        k = torch.randn(batch, Hkv, T, D, generator=g, dtype=torch.float64)
        v = torch.randn(batch, Hkv, T, Dv, generator=g, dtype=torch.float64)
        cols = []  # where each row's tokens sit in the padded chunk
        for b, (n, kept) in enumerate(chunk):
            col = torch.arange(T - n, T) if left else torch.arange(n)
            cols.append(col)
            pos[b, col] = torch.arange(lengths[b], lengths[b] + n)
            good = n if kept is None else kept
            k[b, :, col[:good]] = true_k[b, :, lengths[b] : lengths[b] + good]
            v[b, :, col[:good]] = true_v[b, :, lengths[b] : lengths[b] + good]
        q = torch.randn(batch, Hq, T, D, generator=g, dtype=torch.float64)
        k_all, v_all, k_pos = cache.update(layer, k, v, pos)
        assert k_pos.dtype == torch.int64 and k_all.shape[2] == v_all.shape[2] == k_pos.shape[1]
        out = attention(q, k_all, v_all, None, scale=0.3, window_keys=W, q_pos=pos, k_pos=k_pos)
        # Reference: the same queries against the whole history, this step's keys in place.
        ref_k, ref_v = true_k.clone(), true_v.clone()
        ref_pos = torch.full((batch, max_len), -1, dtype=torch.long)
        for b, (n, _) in enumerate(chunk):
            end = lengths[b] + n
            ref_k[b, :, lengths[b] : end] = k[b, :, cols[b]]
            ref_v[b, :, lengths[b] : end] = v[b, :, cols[b]]
            ref_pos[b, :end] = torch.arange(end)
        ref = attention(q, ref_k, ref_v, None, scale=0.3, window_keys=W, q_pos=pos, k_pos=ref_pos)
        for b in range(batch):
            torch.testing.assert_close(out[b, :, cols[b]], ref[b, :, cols[b]], **close("float64"))
        new_lengths = []
        for b, (n, kept) in enumerate(chunk):
            lengths[b] += n if kept is None else kept
            new_lengths.append(lengths[b])
        cache.rollback(new_lengths)
        held = cache.positions(layer)
        for b in range(batch):
            valid = held[b][held[b] >= 0]
            assert max(valid.tolist(), default=-1) < lengths[b]  # nothing rolled back stays visible
            if attn.window_keys is not None:
                # The ring holds every position still needed by the next query.
                needed = set(range(max(0, lengths[b] - W + 1), lengths[b]))
                assert needed <= set(valid.tolist())


def test_ring_is_window_plus_speculative_depth_and_global_is_max_len():
    spec = tiny(32)
    cache = HybridKVCache(spec, 2, 512, speculative_depth=3, dtype=torch.float32)
    layouts = {lay.key: lay for lay in cache.layouts}
    assert layouts[SWA].slots == 33 + 3
    assert layouts[GLOBAL].slots == 512
    assert [k for k in layouts if "mtp" in k] == [
        "model.mtp.layers.0",
        "model.mtp.layers.1",
        "model.mtp.layers.2",
    ]
    assert (
        HybridKVCache(spec, 1, 16, speculative_depth=3).layouts[1].slots == 16
    )  # never more than the context


def test_positions_past_max_len_are_an_error_and_unknown_layers_name_the_known_ones():
    cache = HybridKVCache(tiny(), 1, 8, speculative_depth=0)
    k, v = torch.zeros(1, 2, 1, 48), torch.zeros(1, 2, 1, 32)
    with pytest.raises(ValueError, match="max_len 8"):
        cache.update(GLOBAL, k, v, torch.tensor([[8]]))
    with pytest.raises(KeyError, match="model.layers.0"):
        cache.update("model.layers.99", k, v, torch.tensor([[0]]))


@pytest.mark.parametrize("depth", [0, 3])
def test_measured_bytes_equal_the_accounting_and_the_all_global_ratio(depth):
    spec = tiny(32)
    context = 8 * 33  # 8x the window
    cache = HybridKVCache(spec, 2, context, dtype=torch.bfloat16, speculative_depth=depth)
    predicted = kv_cache_bytes(spec, context, batch=2, dtype_bytes=2, speculative_depth=depth)
    assert cache.nbytes() == predicted

    # Against the spec accounting (`lmspec stats`): without speculation and MTP caches they agree exactly;
    # a speculative depth D adds D slots per sliding layer and each drafting MTP block its own ring.
    acc = account(spec, context, dtype_bytes=2)
    layouts = cache_layout(spec, context, speculative_depth=depth)
    sliding = [lay for lay in layouts if lay.is_ring and "mtp" not in lay.key]
    depth_bytes = sum(depth * lay.bytes_per_slot(2) for lay in sliding)
    mtp_bytes = sum(lay.slots * lay.bytes_per_slot(2) for lay in layouts if "mtp" in lay.key)
    assert kv_cache_bytes(spec, context, speculative_depth=0, mtp_blocks=0) == acc.kv_bytes_at_context_total
    assert predicted == 2 * (acc.kv_bytes_at_context_total + depth_bytes + mtp_bytes)
    if depth == 3:
        assert mtp_bytes == acc.mtp_kv_bytes_at_context + 3 * depth * layouts[-1].bytes_per_slot(2)

    # The all-global variant of the same model, measured, is larger by the predicted ratio.
    glob = load_spec(TINY, ["model.layers=G0 G*2 G G*2 G"])
    all_global = HybridKVCache(
        glob, 1, context, dtype=torch.bfloat16, speculative_depth=0, mtp_blocks=0
    ).nbytes()
    hybrid = HybridKVCache(spec, 1, context, dtype=torch.bfloat16, speculative_depth=0, mtp_blocks=0).nbytes()
    assert all_global == acc.all_global_kv_bytes_at_context
    assert all_global / hybrid == pytest.approx(acc.kv_ratio_all_global, rel=1e-12)
    # Tiny's two kinds share head shapes, so the ratio is slot counts: 7 layers x context over
    # 3 global x context + 4 sliding x window_keys.
    assert all_global / hybrid == pytest.approx(7 * context / (3 * context + 4 * 33), rel=1e-12)


def test_full_size_prediction_matches_lmspec_stats(examples_dir):
    """MiMo-V2-Flash at 256k: the cache the runtime would allocate is what `lmspec stats` reports, plus the speculative slots."""
    spec = load_spec(examples_dir / "mimo_v2_flash.yaml")
    acc = account(spec, 262144, dtype_bytes=2)
    assert kv_cache_bytes(spec, 262144, speculative_depth=0, mtp_blocks=0) == acc.kv_bytes_at_context_total
    per_slot = 8 * (192 + 128) * 2  # SWA: 8 kv heads, qk 192 + v 128, bf16
    with_depth = kv_cache_bytes(spec, 262144, speculative_depth=3, mtp_blocks=3)
    assert with_depth - acc.kv_bytes_at_context_total == 39 * 3 * per_slot + 3 * (129 + 3) * per_slot
