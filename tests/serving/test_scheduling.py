"""Scheduling: a long prompt is read in small chunks beside decoding rows, so a short request gets its
tokens before the long prefill finishes; requests arriving at any step get exactly their greedy
reference; a client that disconnects frees its row at once."""

from __future__ import annotations

import time

import httpx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmspec.runtime.tokenizer import ByteTokenizer
from lmspec.serve.engine import DecodeEngine
from lmspec.serve.sampling import SamplingParams
from lmspec.serve.server import create_app

from .conftest import greedy, running, small_model


@pytest.mark.parametrize("depth", [0, 3])
def test_a_short_request_gets_its_tokens_while_a_long_prompt_is_read(depth):
    model = small_model(5, window=4, init_std=0.5)
    long_prompt = [(7 * i) % 256 for i in range(600)]
    short_prompt = list(b"short")
    engine = DecodeEngine(
        model,
        max_batch=2,
        max_len=700,
        speculative_depth=depth,
        prefill_chunk=64,
        interleaved_prefill_chunk=16,
    )
    params = SamplingParams(temperature=0.0, max_tokens=8)
    long_id = engine.add(long_prompt, params)
    engine.step()  # nothing decodes yet: the long prompt reads a full chunk
    long_seq = next(s for s in engine.active if s.rid == long_id)
    assert long_seq.main_len == 64
    short_id = engine.add(short_prompt, params)
    short_tokens, read = [], [long_seq.main_len]
    while len(short_tokens) < 8:
        events = engine.step()
        short_tokens += [t for e in events if e.rid == short_id for t in e.token_ids]
        read.append(long_seq.main_len)
    # The short request finished while the long prompt was still being read, 16 tokens a step once the
    # short one decoded (its own prefill step read one more full chunk beside it).
    assert long_seq.main_len < len(long_prompt) and long_seq.stats.first_token_at is None
    steps = [b - a for a, b in zip(read, read[1:], strict=False)]
    assert steps[0] == 64 and set(steps[1:]) == {16}
    assert short_tokens == greedy(model, short_prompt, 8).token_ids
    # And the long request's own output is exact.
    done = []
    while engine.active:
        done += [t for e in engine.step() if e.rid == long_id for t in e.token_ids]
    assert done == greedy(model, long_prompt, 8).token_ids


@settings(max_examples=25, deadline=None)
@given(
    depth=st.integers(0, 3),
    prompts=st.lists(st.lists(st.integers(0, 4), min_size=1, max_size=40), min_size=2, max_size=4),
    arrivals=st.lists(st.integers(0, 6), min_size=4, max_size=4),
    chunks=st.tuples(st.integers(1, 12), st.integers(1, 5)),
    max_tokens=st.integers(1, 10),
)
def test_requests_arriving_at_any_step_get_their_greedy_reference(
    depth, prompts, arrivals, chunks, max_tokens
):
    """Staggered arrivals mix prefill chunks, MTP catch-up and decode rows in every combination."""
    model = small_model(1, window=3, vocab=5, init_std=0.5)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    engine = DecodeEngine(
        model,
        max_batch=len(prompts),
        speculative_depth=depth,
        prefill_chunk=chunks[0],
        interleaved_prefill_chunk=chunks[1],
    )
    out: dict[int, list[int]] = {}
    rids: dict[int, int] = {}
    step = 0
    while len(rids) < len(prompts) or engine.active:
        for i, p in enumerate(prompts):
            if i not in rids and arrivals[i] <= step:
                rids[i] = engine.add(p, params)
        for ev in engine.step():
            out.setdefault(ev.rid, []).extend(ev.token_ids)
        step += 1
        assert step < 2000
    for i, p in enumerate(prompts):
        assert out[rids[i]] == greedy(model, p, max_tokens).token_ids


@pytest.fixture(scope="module")
def served():
    torch.set_num_threads(1)
    model = small_model(5, window=4, init_std=0.5)
    app = create_app(model, ByteTokenizer(), speculative_depth=1, max_batch=2)
    with running(app) as base:
        yield model.spec.name, base


def _metrics(base: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name.split("{")[0]] = float(value)
    return out


def _wait_for_cancel(base: str, before: float) -> dict[str, float]:
    for _ in range(600):  # bounded: up to 60 s
        m = _metrics(base)
        if m["lmspec_requests_cancelled_total"] > before and m["lmspec_running_requests"] == 0:
            return m
        time.sleep(0.1)
    raise AssertionError("the disconnected request still holds its row")


def test_a_non_streamed_request_whose_client_leaves_frees_its_row(served):
    name, base = served
    before = _metrics(base)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{base}/v1/completions", json={"model": name, "prompt": "long", "max_tokens": 4000}, timeout=0.5
        )
    after = _wait_for_cancel(base, before["lmspec_requests_cancelled_total"])
    # It ended by the cancel, not by finishing its 4000 tokens.
    assert after["lmspec_completion_tokens_total"] - before["lmspec_completion_tokens_total"] < 4000
    ok = httpx.post(
        f"{base}/v1/completions", json={"model": name, "prompt": "ok", "max_tokens": 3}, timeout=60
    )
    assert ok.json()["usage"]["completion_tokens"] == 3


def test_a_stream_whose_client_leaves_frees_its_row(served):
    name, base = served
    before = _metrics(base)["lmspec_requests_cancelled_total"]
    body = {"model": name, "prompt": "long", "max_tokens": 4000, "stream": True}
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    _wait_for_cancel(base, before)
