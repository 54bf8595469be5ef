"""The static KV cache and the fixed-shape decode step: the same attention and the same tokens as the
dynamic cache and engine, at the ring's boundaries, and one compiled graph for every token."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.utils import counters

from lmspec.runtime.kv_cache import HybridKVCache, StaticKVCache
from lmspec.runtime.ops import reference
from lmspec.serve.engine import Generator
from lmspec.serve.sampling import SamplingParams
from lmspec.serve.static_decode import StaticDecoder

from .conftest import small_model


def _attend(cache, key: str, q, k, v, pos, window_keys):
    k_all, v_all, k_pos = cache.update(key, k, v, pos)
    return reference.attention(
        q, k_all, v_all, None, scale=0.3, window_keys=window_keys, q_pos=pos, k_pos=k_pos
    )


@pytest.mark.parametrize("depth", [0, 1, 3])
@pytest.mark.parametrize("first_chunk", ["in_place_max", "concatenating_min", "one"])
def test_static_cache_attends_as_the_dynamic_cache_across_the_ring(depth, first_chunk):
    """A prefill chunk at the in-place boundary (ring - window + 1 tokens, and one more), then decode and
    verify chunks of D + 1 tokens with rollbacks, through positions window, window + 1 and several ring
    wraps: every step's attention output equals the dynamic cache's."""
    model = small_model(0, window=5)
    dyn = HybridKVCache(model, 2, 80, speculative_depth=depth, mtp_blocks=0)
    sta = StaticKVCache(model, 2, 80, speculative_depth=depth, mtp_blocks=0)
    ring = next(lay for lay in sta.layouts if lay.is_ring)
    W, S = ring.window_keys, ring.slots
    assert S == W + depth
    assert sta._layers[ring.key].writes_in_place(S - W + 1)
    assert not sta._layers[ring.key].writes_in_place(S - W + 2)
    n = {"in_place_max": S - W + 1, "concatenating_min": S - W + 2, "one": 1}[first_chunk]
    gen = torch.Generator().manual_seed(depth)
    H, D = ring.num_kv_heads, ring.qk_head_dim
    lengths = torch.tensor([0, 0])
    step = n
    for _ in range(40):
        pos = lengths[:, None] + torch.arange(step)[None]  # (2, T)
        if step > 1:
            pos[1, -1] = -1  # row 1: a padded last token
        q = torch.randn(2, 2 * H, step, D, generator=gen, dtype=torch.float64)
        k = torch.randn(2, H, step, D, generator=gen, dtype=torch.float64)
        v = torch.randn(2, H, step, ring.v_head_dim, generator=gen, dtype=torch.float64)
        want = _attend(dyn, ring.key, q, k, v, pos, W)
        got = _attend(sta, ring.key, q, k, v, pos, W)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        kept = torch.randint(1, step + 1, (2,), generator=gen)  # a verify keeps a + 1 of its D + 1
        lengths = lengths + torch.minimum(kept, (pos >= 0).sum(1))
        dyn.rollback(lengths, keys=[ring.key])
        sta.rollback(lengths, keys=[ring.key])
        step = depth + 1
    assert int(lengths.min()) > 2 * S  # the ring wrapped several times


def _reference(model, prompts, max_tokens):
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    return [Generator(model, speculative_depth=0).generate(p, params).token_ids for p in prompts]


@pytest.mark.parametrize("depth", [0, 1, 2, 3])
def test_static_decode_equals_the_dynamic_engine_at_the_window_boundaries(depth):
    """Prompts of exactly the window, window + 1, shorter than D and long, in one ragged batch; decoding
    runs well past the window, so the rings wrap."""
    model = small_model(1, window=6, vocab=5, init_std=0.5)
    W = next(lay.window_keys for lay in StaticKVCache(model, 1, 8).layouts if lay.is_ring)
    prompts = [[t % 5 for t in range(W)], [t % 3 for t in range(W + 1)], [2], [1, 0] * 11]
    ref = _reference(model, prompts, 25)
    dec = StaticDecoder(model, batch_size=5, max_len=64, speculative_depth=depth)
    out = dec.generate(prompts, 25)
    assert out.token_ids == ref
    if depth:
        assert sum(out.accepted) > 0  # drafts were accepted, so partial acceptances were exercised
    # The decoder is reusable: a smaller batch with other lengths gives each prompt's own tokens.
    again = dec.generate(prompts[2:], [3, 10])
    assert again.token_ids == [ref[2][:3], ref[3][:10]]


@settings(max_examples=15, deadline=None)
@given(
    window=st.integers(1, 6),
    vocab=st.sampled_from([3, 5, 64]),
    depth=st.integers(0, 3),
    init_std=st.sampled_from([0.02, 0.5]),
    prompts=st.lists(st.lists(st.integers(0, 2), min_size=1, max_size=20), min_size=1, max_size=3),
    max_tokens=st.lists(st.integers(0, 16), min_size=3, max_size=3),
    seed=st.integers(0, 3),
)
def test_static_decode_equals_the_dynamic_engine(window, vocab, depth, init_std, prompts, max_tokens, seed):
    model = small_model(seed, window=window, vocab=vocab, init_std=init_std)
    m = max_tokens[: len(prompts)]
    ref = [_reference(model, [p], k)[0] for p, k in zip(prompts, m, strict=True)]
    dec = StaticDecoder(model, batch_size=len(prompts), max_len=40, speculative_depth=depth)
    assert dec.generate(prompts, m).token_ids == ref


def test_static_decode_sampled_at_depth_zero_matches_the_engine_row_alone():
    """Host sampling (the sampler's share of a step): one row with the engine's seeded generator."""
    model = small_model(2, vocab=64)
    params = SamplingParams(temperature=0.9, top_p=0.9, max_tokens=12, seed=7)
    want = Generator(model, speculative_depth=0).generate([3, 1, 4], params).token_ids
    gen = torch.Generator().manual_seed(7)
    got = StaticDecoder(model, batch_size=1, max_len=20).generate([[3, 1, 4]], 12, params, gen)
    assert got.token_ids == [want]
    with pytest.raises(ValueError, match="greedily"):
        StaticDecoder(model, batch_size=1, max_len=20, speculative_depth=1).generate([[1]], 2, params)


def _graph_counter():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return graphs, backend


@pytest.mark.parametrize("depth", [0, 3])
def test_the_compiled_step_is_one_graph_for_every_token(depth):
    """One graph, no graph break, no recompile over 40 tokens and a second, smaller batch."""
    torch._dynamo.reset()
    counters.clear()
    graphs, backend = _graph_counter()
    model = small_model(1, window=4, vocab=5, init_std=0.5)
    prompts = [[0, 1, 2, 2, 1, 0, 1], [1, 2]]
    ref = _reference(model, prompts, 40)
    dec = StaticDecoder(
        model, batch_size=2, max_len=64, speculative_depth=depth, compile=True, backend=backend
    )
    assert dec.generate(prompts, 40).token_ids == ref
    assert dec.generate(prompts[1:], 9).token_ids == [ref[1][:9]]
    assert len(graphs) == 1
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]
    assert not counters["recompiles"]


@pytest.mark.slow
@pytest.mark.parametrize("depth", [0, 3])
def test_inductor_compiled_decode_gives_the_eager_tokens(depth):
    """Inductor on CPU (about a minute of compiling per depth): the same tokens, one graph."""
    torch._dynamo.reset()
    counters.clear()
    model = small_model(1, window=4, vocab=5, init_std=0.5, dtype=torch.float32)
    prompts = [[0, 1, 2, 2, 1, 0, 1], [1, 2], [2] * 12]
    ref = _reference(model, prompts, 30)
    dec = StaticDecoder(model, batch_size=3, max_len=64, speculative_depth=depth, compile=True)
    out = dec.generate(prompts, 30)
    assert out.token_ids == ref
    assert out.times.compile_s > 0
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]


def _engine_tokens(engine, prompts, max_tokens):
    from lmspec.serve.engine import _drain

    rids = [engine.add(p, SamplingParams(temperature=0.0, max_tokens=max_tokens)) for p in prompts]
    out = {r: [] for r in rids}
    for ev in _drain(engine):
        out[ev.rid] += ev.token_ids
    return [out[r] for r in rids]


@pytest.mark.parametrize("depth", [0, 3])
def test_the_compiled_engine_gives_the_eager_tokens_with_one_graph_per_model_part(depth):
    """``DecodeEngine(compile=True)`` (what ``lmspec serve --compile`` runs): a ragged batch in which rows
    finish at different steps, and a request admitted into a freed row; one graph for the verify and
    one per MTP block, never recompiled."""
    from lmspec.serve.engine import DecodeEngine

    torch._dynamo.reset()
    counters.clear()
    graphs, backend = _graph_counter()
    model = small_model(1, window=4, vocab=5, init_std=0.5)
    prompts = [[0, 1, 2, 2, 1, 0, 1], [1, 2], [2] * 9]
    ref = _reference(model, prompts, 30)
    engine = DecodeEngine(
        model, max_batch=3, max_len=64, speculative_depth=depth, compile=True, compile_backend=backend
    )
    assert isinstance(engine.cache, StaticKVCache)
    assert _engine_tokens(engine, prompts, 30) == ref
    assert _engine_tokens(engine, prompts[1:2], 12) == [ref[1][:12]]
    assert len(graphs) == depth + 1
    assert not counters["graph_break"]
    assert not counters["recompiles"]


def test_generator_compile_uses_one_static_decoder_per_shape():
    torch._dynamo.reset()
    graphs, backend = _graph_counter()
    model = small_model(1, window=4, vocab=5, init_std=0.5)
    prompts = [[0, 1, 2, 2, 1, 0, 1], [1, 2]]
    ref = _reference(model, prompts, 20)
    gen = Generator(model, speculative_depth=2, compile=True, compile_backend=backend)
    params = SamplingParams(temperature=0.0, max_tokens=20)
    for _ in range(2):
        out = gen.generate_batch(prompts, [params, params])
        assert [c.token_ids for c in out] == ref
        assert [c.finish_reason for c in out] == ["length", "length"]
        # 19 tokens after the first; a last round may accept drafts past max_tokens, as the engine counts.
        assert all(19 <= c.stats.decode_steps + c.stats.accepted <= 19 + 2 for c in out)
    streamed = [ev.token_ids for ev in gen.stream(prompts[0], params)]
    assert sum(streamed, []) == ref[0]
    assert len(gen._decoders) == 2 and len(graphs) == 2  # one graph per batch shape, reused by later calls
    # Stop strings go through the eager engine.
    stop = SamplingParams(temperature=0.0, max_tokens=20, stop=("\x04",))
    assert gen.generate(prompts[0], stop).token_ids == Generator(model).generate(prompts[0], stop).token_ids


@pytest.mark.slow
def test_lmspec_generate_compile(tmp_path, capsys):
    """``lmspec generate --compile`` (inductor): the eager command's text."""
    from lmspec.cli import main

    torch._dynamo.reset()
    model = small_model(6, window=4, init_std=0.5, dtype=torch.float32)
    model.save_pretrained(tmp_path)
    args = ["generate", str(tmp_path / "spec.yaml"), "--checkpoint", str(tmp_path), "--prompt", "hello"]
    args += ["--max-tokens", "12", "--temperature", "0", "--speculative-depth", "2"]
    assert main(args) == 0
    eager = capsys.readouterr().out
    assert main([*args, "--compile"]) == 0
    assert capsys.readouterr().out == eager
