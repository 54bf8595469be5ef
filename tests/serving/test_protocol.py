"""Every bad request gets an OpenAI-shaped 4xx and the server keeps serving: lone surrogates, deep JSON,
out-of-range and wrongly typed fields, unsupported OpenAI fields named, oversized bodies, a wrong or
missing API key; Prometheus label values are escaped."""

from __future__ import annotations

import json
import re

import httpx
import openai
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmspec.runtime.tokenizer import ByteTokenizer
from lmspec.serve.protocol import json_depth
from lmspec.serve.server import create_app

from .conftest import running, small_model

NAME = "{name}"  # replaced by the served model's name
LIMIT = 256 * 1024  # the body limit of the served app: the 100k-deep body (200 kB) gets past it

# (body, status, param): body is a dict (JSON-encoded, "{name}" replaced), or raw bytes sent as is.
BAD_COMPLETIONS = [
    (b'{"model": "{name}", "prompt": "\\ud800abc"}', 400, "prompt"),
    (b'{"model": "{name}", "prompt": "ok", "stop": ["\\udfff"]}', 400, "stop.0"),
    (b'{"model": "{name}", "prompt": "ok", "\\ud800": 1}', 400, "?"),
    (b"[" * 100_000 + b"]" * 100_000, 400, None),
    (b'{"model": "{name}", "prompt": ' + b"[" * 40 + b"1" + b"]" * 40 + b"}", 400, None),
    ({"model": NAME, "prompt": "hi", "seed": 2**64}, 400, "seed"),
    ({"model": NAME, "prompt": "hi", "seed": -(2**63) - 1}, 400, "seed"),
    ({"model": NAME, "prompt": "hi", "seed": 1.5}, 400, "seed"),
    ({"model": NAME, "prompt": [True, False]}, 400, "prompt"),
    ({"model": NAME, "prompt": []}, 400, "prompt"),
    ({"model": NAME, "prompt": ["a", "b"]}, 400, "prompt"),
    ({"model": NAME, "prompt": [[1, 2], [3]]}, 400, "prompt"),
    ({"model": NAME, "prompt": [1, 256]}, 400, "prompt"),
    ({"model": NAME, "prompt": [-1]}, 400, "prompt"),
    ({"model": NAME, "prompt": "hi", "stream": "yes"}, 400, "stream"),
    ({"model": NAME, "prompt": "hi", "stream": 1}, 400, "stream"),
    ({"model": NAME, "prompt": "hi", "echo": "true"}, 400, "echo"),
    ({"model": NAME, "prompt": "hi", "max_tokens": 1.5}, 400, "max_tokens"),
    ({"model": NAME, "prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": NAME, "prompt": "hi", "max_tokens": 5000}, 400, "max_tokens"),
    ({"model": NAME, "prompt": "x" * 5000, "max_tokens": 4}, 400, "prompt"),
    ({"model": NAME, "prompt": "hi", "temperature": -1}, 400, "temperature"),
    ({"model": NAME, "prompt": "hi", "temperature": "1"}, 400, "temperature"),
    ({"model": NAME, "prompt": "hi", "top_p": 0}, 400, "top_p"),
    ({"model": NAME, "prompt": "hi", "n": 0}, 400, "n"),
    ({"model": NAME, "prompt": "hi", "n": 17}, 400, "n"),
    ({"model": NAME, "prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    ({"model": NAME, "prompt": "hi", "stop": ["s"] * 17}, 400, "stop"),
    ({"model": NAME, "prompt": "hi", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"model": NAME, "prompt": "hi", "stream": True, "stream_options": {"x": 1}}, 400, "stream_options.x"),
    ({"model": NAME, "prompt": "hi", "frobnicate": 1}, 400, "frobnicate"),
    ({"model": NAME, "prompt": "hi", "logit_bias": {"1": 5}}, 400, "logit_bias"),
    ({"model": NAME, "prompt": "hi", "suffix": "end"}, 400, "suffix"),
    ({"model": NAME, "prompt": "hi", "best_of": 2}, 400, "best_of"),
    ({"model": NAME, "prompt": "hi", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ({"model": NAME, "prompt": "hi", "frequency_penalty": True}, 400, "frequency_penalty"),
    ({"model": NAME}, 400, "prompt"),
    ({"model": "gpt-4", "prompt": "hi"}, 404, "model"),
    (b'{"model": "{name}", "prompt": "hi", "temperature": NaN}', 400, None),
    (b'{"model": "{name}", "prompt": "hi", "temperature": Infinity}', 400, None),
    (b'{"model": "{name}", "prompt": "hi", "temperature": 1e400}', 400, "temperature"),
    (b'{"model": "{name}", "prompt": "hi", "seed": ' + b"9" * 5000 + b"}", 400, None),
    (b"{not json", 400, None),
    (b"\xff\xfe\x00garbage", 400, None),
    (b'"a string"', 400, None),
    (b"", 400, None),
    (b" " * (LIMIT + 1), 413, None),
]

BAD_CHAT = [
    ({"model": NAME, "messages": [{"role": "user", "content": "\ud800"}]}, 400, "messages.0.content"),
    ({"model": NAME, "messages": []}, 400, "messages"),
    ({"model": NAME, "messages": [{"role": "tool", "content": "x"}]}, 400, "messages.0.role"),
    (
        {"model": NAME, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        400,
        "messages.0.content",
    ),
    ({"model": NAME, "messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content"),
    ({"model": NAME, "messages": [{"role": "user"}], "tools": [{"type": "function"}]}, 400, "tools"),
    ({"model": NAME, "messages": [{"role": "user"}], "tool_choice": "auto"}, 400, "tool_choice"),
    ({"model": NAME, "messages": [{"role": "user"}], "functions": [{"name": "f"}]}, 400, "functions"),
    (
        {"model": NAME, "messages": [{"role": "user"}], "response_format": {"type": "json_object"}},
        400,
        "response_format",
    ),
    ({"model": NAME, "messages": [{"role": "user"}], "top_logprobs": 2}, 400, "top_logprobs"),
    ({"model": NAME, "messages": [{"role": "user"}], "logprobs": 3}, 400, "logprobs"),
    (
        {"model": NAME, "messages": [{"role": "user"}], "max_completion_tokens": -2},
        400,
        "max_completion_tokens",
    ),
    ({"model": NAME, "messages": [{"role": "user", "content": "x" * 5000}]}, 400, "messages"),
]


def _shape(r: httpx.Response) -> dict:
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    assert "Traceback" not in err["message"]
    return err


@pytest.fixture(scope="module")
def served():
    torch.set_num_threads(1)
    model = small_model(5, window=4, init_std=0.5, dtype=torch.float64)
    app = create_app(model, ByteTokenizer(), speculative_depth=1, max_batch=2, max_body_bytes=LIMIT)
    with running(app) as base:
        yield model.spec.name, base


def _post(base: str, path: str, body: dict | bytes, name: str) -> httpx.Response:
    content = (
        body.replace(b"{name}", name.encode())
        if isinstance(body, bytes)
        else json.dumps(body).replace(NAME, name)
    )
    return httpx.post(
        f"{base}{path}", content=content, headers={"content-type": "application/json"}, timeout=60
    )


_CASES = [("/v1/completions", *c) for c in BAD_COMPLETIONS] + [("/v1/chat/completions", *c) for c in BAD_CHAT]


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    _CASES,
    ids=[f"{p.rsplit('/', 1)[1]}-{i}-{param}" for i, (p, _, _, param) in enumerate(_CASES)],
)
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(served, path, body, status, param):
    name, base = served
    r = _post(base, path, body, name)
    assert r.status_code == status, r.text
    assert _shape(r)["param"] == param
    ok = _post(base, "/v1/completions", {"model": NAME, "prompt": "ok", "max_tokens": 2}, name)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_neutral_values_of_unsupported_fields_are_accepted(served):
    name, base = served
    body = {
        "model": NAME,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}], "name": "ann"}],
        "max_tokens": 2,
        "tools": None,
        "logit_bias": {},
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        "response_format": {"type": "text"},
        "user": "u-1",
        "stream": False,
    }
    r = _post(base, "/v1/chat/completions", body, name)
    assert r.status_code == 200, r.text


def test_errors_of_routes_and_methods_have_the_openai_shape(served):
    _, base = served
    assert _shape(r := httpx.get(f"{base}/v1/nothing"))["type"] == "not_found_error" and r.status_code == 404
    assert httpx.get(f"{base}/v1/completions").status_code == 405
    _shape(httpx.get(f"{base}/v1/completions"))


def test_a_body_over_the_limit_is_refused_while_streaming_in(served):
    """Without a Content-Length (chunked upload) the limit is counted as the body arrives."""
    name, base = served

    def chunks():
        yield b'{"model": "' + name.encode() + b'", "prompt": "'
        for _ in range(LIMIT // 1024 + 1):
            yield b"x" * 1024
        yield b'"}'

    r = httpx.post(f"{base}/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and _shape(r)["code"] == "request_too_large"


def _status_counts(base: str) -> dict[str, int]:
    text = httpx.get(f"{base}/metrics").text
    return {
        m[1]: int(m[2]) for m in re.finditer(r'lmspec_http_responses_total\{status="(\d+)"\} (\d+)', text)
    }


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_client_that_leaves_mid_upload_is_no_server_error(served, path):
    """Hanging up while the body is still arriving is counted as 499 (client gone), never a 500."""
    import socket
    import time

    name, base = served
    host, port = base.removeprefix("http://").split(":")
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    )
    before = _status_counts(base)
    for _ in range(3):
        with socket.create_connection((host, int(port))) as s:
            s.sendall(head.encode() + b'{"model": "' + name.encode())
    for _ in range(600):  # the server notices each hang-up on its own time
        after = _status_counts(base)
        if after.get("499", 0) - before.get("499", 0) >= 3:
            break
        time.sleep(0.05)
    assert after.get("499", 0) - before.get("499", 0) == 3, after
    assert after.get("500", 0) == before.get("500", 0), after
    ok = _post(base, "/v1/completions", {"model": NAME, "prompt": "ok", "max_tokens": 2}, name)
    assert ok.status_code == 200


def test_json_depth_ignores_brackets_inside_strings():
    assert json_depth(b'{"a": [1, {"b": "[[[[{{{{"}]}') == 3
    assert json_depth(b'"\\"[[["') == 0
    assert json_depth(b"") == 0


# Random request bodies built from the fields the API knows (and some it does not) with random JSON
# values, surrogates included: whatever they hold, the answer is never a 5xx.
_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(st.characters(exclude_categories=()), max_size=8),  # lone surrogates too
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
_fields = st.sampled_from(
    [
        "prompt",
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "stop",
        "seed",
        "stream",
        "stream_options",
        "n",
        "echo",
        "logprobs",
        "tools",
        "logit_bias",
        "best_of",
        "user",
        "suffix",
        "frobnicate",
    ]
)


@settings(max_examples=60, deadline=None)
@given(fields=st.dictionaries(_fields, _json, max_size=5), max_tokens=st.integers(0, 3))
def test_random_requests_never_get_a_server_error(served, fields, max_tokens):
    name, base = served
    body = {"model": name, "prompt": "a", **fields}
    body.setdefault("max_tokens", max_tokens)
    content = json.dumps(body, ensure_ascii=True)  # lone surrogates travel as \\udXXX escapes
    r = httpx.post(
        f"{base}/v1/completions", content=content, headers={"content-type": "application/json"}, timeout=60
    )
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        _shape(r)


@pytest.fixture(scope="module")
def keyed():
    model = small_model(5, window=4, init_std=0.5, dtype=torch.float64)
    app = create_app(model, ByteTokenizer(), max_batch=1, api_key="s3cret-key")
    with running(app) as base:
        yield model.spec.name, base


def test_an_api_key_is_required_on_every_endpoint_but_health(keyed):
    name, base = keyed
    body = {"model": name, "prompt": "hi", "max_tokens": 2}
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "s3cret-key"},
        {"Authorization": "Basic s3cret-key"},
    ):
        r = httpx.post(f"{base}/v1/completions", json=body, headers=headers)
        assert r.status_code == 401 and _shape(r)["code"] == "invalid_api_key"
        assert r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{base}/metrics").status_code == 401
    assert httpx.get(f"{base}/v1/models").status_code == 401
    assert httpx.get(f"{base}/health").status_code == 200
    good = {"Authorization": "Bearer s3cret-key"}
    assert httpx.post(f"{base}/v1/completions", json=body, headers=good).status_code == 200
    assert httpx.get(f"{base}/metrics", headers=good).status_code == 200
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="s3cret-key", max_retries=0)
    assert client.completions.create(model=name, prompt="hi", max_tokens=2).usage.completion_tokens == 2
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base}/v1", api_key="nope", max_retries=0).models.list()


_SAMPLE = re.compile(
    r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{((?:[a-zA-Z_]\w*="(?:[^"\\\n]|\\[\\"n])*",?)*)\})? (\S+)$'
)


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), value)


def test_metrics_label_values_are_escaped():
    """A crafted model name cannot close the label and add a series of its own."""
    evil = 'x"} 1\nlmspec_fake_total{model="y\\'
    model = small_model(5, window=4, init_std=0.5, dtype=torch.float64)
    app = create_app(model, ByteTokenizer(), max_batch=1, model_name=evil)
    with running(app) as base:
        text = httpx.get(f"{base}/metrics").text
    names, models = set(), set()
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        assert m, f"not a Prometheus sample line: {line!r}"
        names.add(m.group(1))
        models |= {_unescape(v) for v in re.findall(r'model="((?:[^"\\]|\\.)*)"', m.group(3) or "")}
    assert "lmspec_fake_total" not in names
    assert models == {evil}
