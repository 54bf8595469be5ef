"""The official `openai` client against `lmspec serve` on loopback: completions and chat, streamed and
not, concurrent clients batched together, and bad requests answered in OpenAI's error shape."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import uvicorn

from lmspec.runtime.tokenizer import ByteTokenizer
from lmspec.serve.engine import Generator
from lmspec.serve.sampling import SamplingParams
from lmspec.serve.server import create_app

from .conftest import small_model

DEPTH = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served():
    import torch

    torch.set_num_threads(1)
    model = small_model(5, window=4, init_std=0.5, dtype=torch.float64)
    app = create_app(model, ByteTokenizer(), speculative_depth=DEPTH, max_batch=4)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port}"
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)
    yield model, client, base
    server.should_exit = True
    thread.join(timeout=10)
    app.state.scheduler.close()


def _greedy(model, prompt: str, n: int) -> str:
    return (
        Generator(model, speculative_depth=0)
        .generate(prompt, SamplingParams(temperature=0.0, max_tokens=n))
        .text
    )


def test_models_and_health(served):
    model, client, base = served
    assert [m.id for m in client.models.list().data] == [model.spec.name]
    assert httpx.get(f"{base}/health").json()["status"] == "ok"


def test_completion_plain_and_streamed_equal_the_generator(served):
    model, client, _ = served
    name = model.spec.name
    want = _greedy(model, "The cat", 20)
    out = client.completions.create(model=name, prompt="The cat", max_tokens=20, temperature=0)
    assert out.choices[0].text == want and out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == 7 and out.usage.completion_tokens == 20 and out.usage.total_tokens == 27
    chunks = list(
        client.completions.create(model=name, prompt="The cat", max_tokens=20, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_plain_and_streamed_use_the_chat_template(served):
    model, client, _ = served
    name = model.spec.name
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    prompt = "<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n"  # the spec's default chat template
    want = _greedy(model, prompt, 12)
    out = client.chat.completions.create(model=name, messages=messages, max_tokens=12, temperature=0)
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content == want
    assert out.usage.prompt_tokens == len(prompt.encode())
    stream = client.chat.completions.create(
        model=name, messages=messages, max_tokens=12, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want


def test_eight_concurrent_clients_get_their_own_complete_answers(served):
    model, client, base = served
    name = model.spec.name
    prompts = [f"prompt number {i}: " + "x" * i for i in range(8)]
    lengths = [10 + 3 * i for i in range(8)]
    wants = [_greedy(model, p, n) for p, n in zip(prompts, lengths, strict=True)]
    steps_before = _metric(base, "lmspec_batch_steps_total")
    rows_before = _metric(base, "lmspec_batch_rows_total")

    def ask(i: int) -> str:
        if i % 2:
            chunks = client.completions.create(
                model=name, prompt=prompts[i], max_tokens=lengths[i], temperature=0, stream=True
            )
            return "".join(c.choices[0].text for c in chunks if c.choices)
        return (
            client.completions.create(model=name, prompt=prompts[i], max_tokens=lengths[i], temperature=0)
            .choices[0]
            .text
        )

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(ask, range(8)))
    assert got == wants
    # Batched: the engine steps carried several requests each on average (4 rows, 8 clients).
    rows = _metric(base, "lmspec_batch_rows_total") - rows_before
    steps = _metric(base, "lmspec_batch_steps_total") - steps_before
    assert rows / steps > 2.0


def _metric(base: str, name: str) -> float:
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_metrics_report_requests_tokens_acceptance_and_cache_bytes(served):
    model, client, base = served
    client.completions.create(model=model.spec.name, prompt="abc", max_tokens=8, temperature=0)
    assert _metric(base, "lmspec_requests_total") >= 1
    assert _metric(base, "lmspec_completion_tokens_total") >= 8
    assert _metric(base, "lmspec_acceptance_length") >= 1.0
    assert _metric(base, "lmspec_kv_cache_bytes") > 0
    assert _metric(base, "lmspec_speculative_depth") == DEPTH


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "gpt-4", "prompt": "hi"}, 404, "model"),
        ({"model": "{name}", "prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
        ({"model": "{name}", "prompt": "x" * 5000, "max_tokens": 4}, 400, "prompt"),
        ({"model": "{name}", "prompt": "hi", "max_tokens": 5000}, 400, "max_tokens"),
        ({"model": "{name}", "prompt": "hi", "temperature": -1}, 400, "temperature"),
        ({"model": "{name}"}, 400, "prompt"),
        ("{not json", 400, None),
    ],
)
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(served, body, status, param):
    model, client, base = served
    name = model.spec.name
    content = body if isinstance(body, str) else json.dumps(body).replace("{name}", name)
    r = httpx.post(f"{base}/v1/completions", content=content, headers={"content-type": "application/json"})
    assert r.status_code == status
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    # The client library maps these to its exceptions, and the next request is served normally.
    if status == 404:
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="gpt-4", prompt="hi")
    out = client.completions.create(model=name, prompt="ok", max_tokens=3, temperature=0)
    assert len(out.choices[0].text.encode("utf-8", errors="replace")) >= 1
