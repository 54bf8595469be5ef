"""The official `openai` client against `lmspec serve` on loopback: completions and chat, streamed and
not, the client's own streaming loop, usage only when asked for, n choices, concurrent clients batched
together."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from lmspec.runtime.tokenizer import ByteTokenizer
from lmspec.serve.server import create_app

from .conftest import greedy, running, small_model

DEPTH = 2
CHAT_PROMPT = "<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n"  # the spec's default chat template
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def served():
    torch.set_num_threads(1)
    model = small_model(5, window=4, init_std=0.5, dtype=torch.float64)
    app = create_app(model, ByteTokenizer(), speculative_depth=DEPTH, max_batch=4)
    with running(app) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)
        yield model, client, base


def test_models_and_health(served):
    model, client, base = served
    assert [m.id for m in client.models.list().data] == [model.spec.name]
    assert client.models.retrieve(model.spec.name).id == model.spec.name
    assert httpx.get(f"{base}/health").json()["status"] == "ok"


def test_completion_plain_and_streamed_equal_the_generator(served):
    model, client, _ = served
    name = model.spec.name
    want = greedy(model, "The cat", 20).text
    out = client.completions.create(model=name, prompt="The cat", max_tokens=20, temperature=0)
    assert out.choices[0].text == want and out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == 7 and out.usage.completion_tokens == 20 and out.usage.total_tokens == 27
    stream = client.completions.create(
        model=name, prompt="The cat", max_tokens=20, temperature=0, stream=True
    )
    text, reasons = "", []
    for chunk in stream:  # the client's own loop: every chunk has a choice
        text += chunk.choices[0].text
        reasons.append(chunk.choices[0].finish_reason)
    assert text == want and reasons[-1] == "length" and set(reasons[:-1]) == {None}


def test_the_openai_chat_streaming_loop_works(served):
    """`for chunk in stream: chunk.choices[0].delta.content` — the loop that crashed on a usage chunk."""
    model, client, _ = served
    want = greedy(model, CHAT_PROMPT, 12).text
    out = client.chat.completions.create(
        model=model.spec.name, messages=MESSAGES, max_tokens=12, temperature=0
    )
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content == want
    assert out.usage.prompt_tokens == len(CHAT_PROMPT.encode())
    stream = client.chat.completions.create(
        model=model.spec.name, messages=MESSAGES, max_tokens=12, temperature=0, stream=True
    )
    text, first = "", None
    for chunk in stream:
        first = first or chunk
        text += chunk.choices[0].delta.content or ""
    assert first.choices[0].delta.role == "assistant"
    assert text == want


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_the_usage_chunk_comes_only_when_asked_for(served, chat):
    model, client, _ = served
    kw = dict(model=model.spec.name, max_tokens=5, temperature=0, stream=True)
    create = client.chat.completions.create if chat else client.completions.create
    kw |= {"messages": MESSAGES} if chat else {"prompt": "ab"}
    plain = list(create(**kw))
    assert all(c.choices and c.usage is None for c in plain)
    counted = list(create(**kw, stream_options={"include_usage": True}))
    assert all(c.choices and c.usage is None for c in counted[:-1])
    assert counted[-1].choices == [] and counted[-1].usage.completion_tokens == 5


def test_n_choices_at_a_fixed_seed_are_reproducible_and_distinct(served):
    model, client, _ = served
    kw = dict(model=model.spec.name, prompt="Once", max_tokens=12, temperature=1.0, n=3, seed=1234)
    first = client.completions.create(**kw)
    again = client.completions.create(**kw)
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.text for c in sorted(again.choices, key=lambda c: c.index)]
    assert len(set(texts)) == 3
    assert first.usage.completion_tokens == 36
    # Choice 0 samples with the request's seed itself: the same as a one-choice request.
    one = client.completions.create(**{**kw, "n": 1})
    assert one.choices[0].text == texts[0]
    # Streamed, the chunks carry each choice's index and the texts are the same.
    streamed = ["", "", ""]
    for chunk in client.completions.create(**kw, stream=True):
        streamed[chunk.choices[0].index] += chunk.choices[0].text
    assert streamed == texts


def test_n_chat_choices(served):
    model, client, _ = served
    out = client.chat.completions.create(
        model=model.spec.name, messages=MESSAGES, max_tokens=6, temperature=0.9, n=2, seed=7
    )
    assert sorted(c.index for c in out.choices) == [0, 1]
    assert all(c.message.content is not None and c.finish_reason == "length" for c in out.choices)


def test_eight_concurrent_clients_get_their_own_complete_answers(served):
    model, client, base = served
    name = model.spec.name
    prompts = [f"prompt number {i}: " + "x" * i for i in range(8)]
    lengths = [10 + 3 * i for i in range(8)]
    wants = [greedy(model, p, n).text for p, n in zip(prompts, lengths, strict=True)]
    steps_before = metric(base, "lmspec_batch_steps_total")
    rows_before = metric(base, "lmspec_batch_rows_total")

    def ask(i: int) -> str:
        kw = dict(model=name, prompt=prompts[i], max_tokens=lengths[i], temperature=0)
        if i % 2:
            return "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True))
        return client.completions.create(**kw).choices[0].text

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(ask, range(8)))
    assert got == wants
    # Batched: the engine steps carried several requests each on average (4 rows, 8 clients).
    rows = metric(base, "lmspec_batch_rows_total") - rows_before
    steps = metric(base, "lmspec_batch_steps_total") - steps_before
    assert rows / steps > 2.0


def metric(base: str, name: str, headers: dict | None = None) -> float:
    for line in httpx.get(f"{base}/metrics", headers=headers).text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_metrics_report_requests_tokens_acceptance_and_cache_bytes(served):
    model, client, base = served
    client.completions.create(model=model.spec.name, prompt="abc", max_tokens=8, temperature=0)
    assert metric(base, "lmspec_requests_total") >= 1
    assert metric(base, "lmspec_completion_tokens_total") >= 8
    assert metric(base, "lmspec_acceptance_length") >= 1.0
    assert metric(base, "lmspec_kv_cache_bytes") > 0
    assert metric(base, "lmspec_speculative_depth") == DEPTH
