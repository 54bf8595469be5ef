"""Log-probabilities equal a direct forward's log-softmax to 1e-5: for generated tokens (also under
speculation, where they come from the verify forward), for prompt tokens read in chunks (prompt
scoring), and as the server reports them on /v1/chat/completions and /v1/completions (echo)."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch

from lmspec.runtime.tokenizer import ByteTokenizer
from lmspec.serve.engine import Generator
from lmspec.serve.sampling import SamplingParams
from lmspec.serve.server import create_app

from .conftest import running, small_model

TOL = 1e-5
K = 5


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return small_model(5, window=4, init_std=0.5, dtype=torch.float64)


def _forward_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log_softmax of a plain forward over the whole sequence, no cache: (T, V); row t predicts ids[t+1]."""
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].double().log_softmax(-1)


def _check(lp_row: torch.Tensor, token: int, logprob: float, top: list[tuple[int, float]]) -> None:
    assert abs(logprob - float(lp_row[token])) < TOL
    values, indices = lp_row.topk(len(top))
    assert [t for t, _ in top] == indices.tolist()
    assert max(abs(v - float(w)) for (_, v), w in zip(top, values, strict=True)) < TOL


@pytest.mark.parametrize("depth", [0, 2])
def test_generated_and_prompt_logprobs_equal_the_forward(model, depth):
    prompt = list(b"Scoring a prompt, chunk by chunk.")
    params = SamplingParams(temperature=0.8, seed=3, max_tokens=10, logprobs=K, prompt_logprobs=K)
    gen = Generator(model, speculative_depth=depth, prefill_chunk=4)
    out = gen.generate(prompt, params)
    lp = _forward_logprobs(model, prompt + out.token_ids)
    assert len(out.logprobs) == len(out.token_ids) == 10
    for i, entry in enumerate(out.logprobs):
        assert entry.token == out.token_ids[i]
        _check(lp[len(prompt) - 1 + i], entry.token, entry.logprob, list(entry.top))
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for j, entry in enumerate(out.prompt_logprobs[1:], start=1):
        assert entry.token == prompt[j]
        _check(lp[j - 1], entry.token, entry.logprob, list(entry.top))


def test_scoring_a_prompt_alone(model):
    """max_tokens 0 with prompt logprobs reads the prompt and generates nothing."""
    prompt = list(b"just score me")
    out = Generator(model).generate(prompt, SamplingParams(max_tokens=0, prompt_logprobs=0))
    assert out.token_ids == [] and out.finish_reason == "length"
    lp = _forward_logprobs(model, prompt)
    got = [e.logprob for e in out.prompt_logprobs[1:]]
    want = [float(lp[j - 1, prompt[j]]) for j in range(1, len(prompt))]
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < TOL


@pytest.fixture(scope="module")
def served(model):
    app = create_app(model, ByteTokenizer(), speculative_depth=2, max_batch=2)
    with running(app) as base:
        yield base, openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)


def test_chat_logprobs_equal_the_forward(model, served):
    base, client = served
    messages = [{"role": "user", "content": "hello"}]
    prompt = list(b"<|user|>\nhello\n<|assistant|>\n")
    out = client.chat.completions.create(
        model=model.spec.name,
        messages=messages,
        max_tokens=8,
        temperature=0.7,
        seed=1,
        logprobs=True,
        top_logprobs=K,
    )
    content = out.choices[0].logprobs.content
    tokens = [e.bytes[0] for e in content]  # the byte tokenizer: one byte per token
    assert bytes(tokens).decode("utf-8", errors="replace") == out.choices[0].message.content
    lp = _forward_logprobs(model, prompt + tokens)
    for i, e in enumerate(content):
        _check(
            lp[len(prompt) - 1 + i], tokens[i], e.logprob, [(t.bytes[0], t.logprob) for t in e.top_logprobs]
        )
    # Streamed, the same request (same seed) reports the same log-probabilities chunk by chunk.
    stream = client.chat.completions.create(
        model=model.spec.name,
        messages=messages,
        max_tokens=8,
        temperature=0.7,
        seed=1,
        logprobs=True,
        top_logprobs=K,
        stream=True,
    )
    streamed = [e.logprob for c in stream if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert streamed == pytest.approx([e.logprob for e in content], abs=TOL)


def test_completion_echo_scores_the_prompt(model, served):
    """The legacy API's prompt scoring: max_tokens 0, echo, logprobs k."""
    base, _ = served
    text = "score this prompt"
    r = httpx.post(
        f"{base}/v1/completions",
        json={"model": model.spec.name, "prompt": text, "max_tokens": 0, "echo": True, "logprobs": 3},
    )
    choice = r.json()["choices"][0]
    assert choice["text"] == text
    lps = choice["logprobs"]
    assert lps["tokens"] == list(text) and lps["token_logprobs"][0] is None and lps["top_logprobs"][0] is None
    assert lps["text_offset"] == list(range(len(text)))
    ids = list(text.encode())
    lp = _forward_logprobs(model, ids)
    for j in range(1, len(ids)):
        assert abs(lps["token_logprobs"][j] - float(lp[j - 1, ids[j]])) < TOL
        values, indices = lp[j - 1].topk(3)
        want: dict[str, float] = {}
        for t, v in zip(indices.tolist(), values.tolist(), strict=True):  # bytes >= 128 all print as U+FFFD
            want.setdefault(bytes([t]).decode("utf-8", errors="replace"), v)
        assert lps["top_logprobs"][j] == pytest.approx(want, abs=TOL)
    assert r.json()["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}


def test_completion_logprobs_with_echo_and_generation(model, served):
    base, _ = served
    r = httpx.post(
        f"{base}/v1/completions",
        json={
            "model": model.spec.name,
            "prompt": "abc",
            "max_tokens": 6,
            "temperature": 0,
            "echo": True,
            "logprobs": 0,
        },
    )
    choice = r.json()["choices"][0]
    generated = Generator(model).generate("abc", SamplingParams(temperature=0, max_tokens=6)).token_ids
    ids = list(b"abc") + generated
    lp = _forward_logprobs(model, ids)
    assert choice["text"].startswith("abc") and len(choice["logprobs"]["token_logprobs"]) == len(ids)
    want = [None] + [float(lp[t - 1, ids[t]]) for t in range(1, len(ids))]
    got = choice["logprobs"]["token_logprobs"]
    assert got[0] is None and max(abs(a - b) for a, b in zip(got[1:], want[1:], strict=True)) < TOL
    assert all(d == {} for d in choice["logprobs"]["top_logprobs"][1:])  # logprobs 0: the chosen token only
