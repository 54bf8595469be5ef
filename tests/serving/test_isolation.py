"""One request never fails another: a request whose model output turns NaN (a poisoned embedding row,
as an overflow in a real model would) ends alone with an error, while a concurrent request completes
with exactly the greedy reference text; the failed request's cache row is clean for the next one.
Settings at the edge of the valid range (top_p=1e-300, temperature=1e-300) just work."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest
import torch

from lmspec.runtime.tokenizer import ByteTokenizer
from lmspec.serve.engine import DecodeEngine
from lmspec.serve.sampling import SamplingParams
from lmspec.serve.server import create_app

from .conftest import greedy, running, small_model

POISON = 200  # a byte the innocent prompts never contain and the reference never generates
INNOCENT = list(b"the innocent one")
GREEDY = SamplingParams(temperature=0.0, max_tokens=12)


def _poisoned_model(seed: int = 5):
    model = small_model(seed, window=4, init_std=0.5)
    reference = greedy(model, INNOCENT, 12).token_ids
    assert POISON not in reference
    with torch.no_grad():
        model.model.embed_tokens.weight[POISON] = float("nan")
    return model, reference


def _run(engine: DecodeEngine) -> dict[int, dict]:
    out: dict[int, dict] = {}
    while engine.active:
        for ev in engine.step():
            d = out.setdefault(ev.rid, {"tokens": [], "reason": None, "error": None})
            d["tokens"] += ev.token_ids
            if ev.finished:
                d["reason"], d["error"] = ev.finish_reason, ev.error
    return out


@pytest.mark.parametrize("depth", [0, 2])
def test_a_nan_row_fails_alone_and_leaves_its_row_clean(depth):
    model, reference = _poisoned_model()
    engine = DecodeEngine(model, max_batch=2, max_len=64, speculative_depth=depth, tokenizer=ByteTokenizer())
    # The poisoned prompt is long, so it writes cache positions the next request in its row will not
    # overwrite at first: NaN left there would reach that request (attention weight 0 times NaN is NaN).
    bad = engine.add([1, POISON] + [2] * 30, GREEDY)
    good = engine.add(INNOCENT, GREEDY)
    done = _run(engine)
    assert done[bad]["reason"] == "error" and "non-finite logits" in done[bad]["error"]
    assert done[good]["tokens"] == reference and done[good]["reason"] == "length"
    # The next request lands in the failed request's row (row 0) and is exact.
    again = engine.add(INNOCENT[:3], GREEDY)
    assert engine.rows[0] is not None and engine.rows[0].rid == again
    assert _run(engine)[again]["tokens"] == greedy(model, INNOCENT[:3], 12).token_ids


def test_without_the_wipe_the_poison_would_reach_the_next_request(monkeypatch):
    """The test above has power: resetting the failed row's positions alone lets NaN through."""
    model, _ = _poisoned_model()
    engine = DecodeEngine(model, max_batch=1, max_len=64, tokenizer=ByteTokenizer())
    monkeypatch.setattr(engine, "_wipe", lambda row, upto: engine.cache.reset([row]))
    engine.add([1, POISON] + [2] * 30, GREEDY)
    _run(engine)
    rid = engine.add(INNOCENT[:3], GREEDY)
    assert _run(engine)[rid]["reason"] == "error"


def test_a_failure_while_drafting_or_verifying_is_confined_to_its_row():
    """Poison that appears mid-generation (the model generates the poisoned token) fails in decode."""
    model = small_model(5, window=4, init_std=0.5)
    victim = [7, 8, 9]
    plain = greedy(model, victim, 12).token_ids
    target = plain[4]  # the victim will generate this token at step 5
    innocent = next(
        p
        for p in ([3, 1, 4], [2, 7, 1, 8], [1, 1, 2, 3, 5])
        if target not in greedy(model, p, 12).token_ids + p
    )
    want = greedy(model, innocent, 12).token_ids
    with torch.no_grad():
        model.model.embed_tokens.weight[target] = float("nan")
    for depth in (0, 3):
        engine = DecodeEngine(
            model, max_batch=2, max_len=64, speculative_depth=depth, tokenizer=ByteTokenizer()
        )
        bad, good = engine.add(victim, GREEDY), engine.add(innocent, GREEDY)
        done = _run(engine)
        assert done[bad]["reason"] == "error" and done[good]["tokens"] == want


def test_the_engine_itself_failing_ends_its_requests_and_keeps_serving():
    model = small_model(5, window=4, init_std=0.5)
    engine = DecodeEngine(model, max_batch=2, max_len=64, tokenizer=ByteTokenizer())
    rids = [engine.add(INNOCENT, GREEDY), engine.add(INNOCENT[:4], GREEDY)]
    engine.step()
    events = engine.abort(RuntimeError("a bug"))
    assert sorted(e.rid for e in events) == rids and all(e.error == "RuntimeError: a bug" for e in events)
    assert engine.free_rows == 2
    rid = engine.add(INNOCENT, GREEDY)
    assert _run(engine)[rid]["tokens"] == greedy(model, INNOCENT, 12).token_ids


@pytest.fixture(scope="module")
def poisoned_server():
    torch.set_num_threads(1)
    model, reference = _poisoned_model()
    app = create_app(model, ByteTokenizer(), speculative_depth=2, max_batch=4)
    with running(app) as base:
        yield model, reference, base


def test_a_poisoned_request_fails_alone_over_http(poisoned_server):
    model, reference, base = poisoned_server
    name = model.spec.name
    innocent_text = bytes(INNOCENT).decode()
    want = bytes(reference).decode("utf-8", errors="replace")
    results: dict[str, httpx.Response] = {}

    def ask(key: str, body: dict) -> None:
        results[key] = httpx.post(f"{base}/v1/completions", json={"model": name, **body}, timeout=120)

    innocent = {"prompt": innocent_text, "max_tokens": 12, "temperature": 0}
    threads = [
        threading.Thread(target=ask, args=("innocent", innocent)),
        threading.Thread(target=ask, args=("poisoned", {"prompt": [1, POISON, 2, 3], "max_tokens": 12})),
        threading.Thread(
            target=ask, args=("poisoned_stream", {"prompt": [POISON], "max_tokens": 5, "stream": True})
        ),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results["innocent"].status_code == 200
    assert results["innocent"].json()["choices"][0]["text"] == want
    bad = results["poisoned"]
    assert bad.status_code == 500 and bad.json()["error"]["code"] == "generation_failed"
    assert "non-finite logits" in bad.json()["error"]["message"]
    # A stream that fails before its first token is answered as a JSON error too.
    assert results["poisoned_stream"].status_code == 500
    assert httpx.get(f"{base}/health").json()["running"] == 0
    # The server keeps serving, the innocent request again exact.
    again = httpx.post(f"{base}/v1/completions", json={"model": name, **innocent}, timeout=120)
    assert again.json()["choices"][0]["text"] == want


def test_edge_of_range_sampling_settings_work_beside_an_innocent_request(poisoned_server):
    """top_p=1e-300 (0 in float32) and temperature=1e-300 keep the top token: they decode greedily."""
    model, reference, base = poisoned_server
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
    name = model.spec.name
    prompt = bytes(INNOCENT).decode()
    want = bytes(reference).decode("utf-8", errors="replace")
    outs: dict[str, str] = {}

    def ask(key: str, **kw) -> None:
        outs[key] = client.completions.create(model=name, prompt=prompt, max_tokens=12, **kw).choices[0].text

    threads = [
        threading.Thread(target=ask, args=("innocent",), kwargs={"temperature": 0}),
        threading.Thread(target=ask, args=("top_p",), kwargs={"top_p": 1e-300, "seed": 3}),
        threading.Thread(target=ask, args=("temperature",), kwargs={"temperature": 1e-300, "seed": 4}),
        threading.Thread(target=ask, args=("both",), kwargs={"temperature": 2.0, "top_p": 5e-324}),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outs == {"innocent": want, "top_p": want, "temperature": want, "both": want}
