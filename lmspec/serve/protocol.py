"""The OpenAI wire format: reading a request body within limits, strict request models, errors, and
the pieces of responses (usage, log-probabilities, server-sent events).

A body is refused before it is parsed when it is larger than the server's limit or nests JSON deeper
than ``MAX_JSON_DEPTH``; after parsing, a string holding a lone UTF-16 surrogate (not Unicode text)
is refused wherever it is, and the fields of the OpenAI API that this server does not implement
(``tools``, ``response_format``, ``logit_bias``, ...) are refused by name unless they hold their
neutral value. Request models are strict: ``"stream": "yes"`` is not a bool, ``[true, false]`` is
not a list of token ids, and unknown fields are errors, as with the OpenAI API itself.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.requests import Request

from lmspec.runtime.tokenizer import ByteTokenizer, Tokenizer
from lmspec.serve.engine import TokenLogprob
from lmspec.serve.sampling import MAX_LOGPROBS, SEED_RANGE

__all__ = [
    "APIError",
    "ChatRequest",
    "CompletionRequest",
    "GenerationRequest",
    "parse_request",
    "read_body",
]

MAX_N = 16  # choices per request; each takes an engine row of its own
MAX_STOP = 16  # stop strings per request
MAX_JSON_DEPTH = 32  # the deepest OpenAI request (a chat message's content parts) nests 4 levels
DEFAULT_MAX_BODY_BYTES = 8 * 2**20  # a 262k-token prompt of ~4 characters per token, JSON-escaped, fits


class APIError(Exception):
    """An error answered in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def clip(text: str, limit: int = 80) -> str:
    """``text`` quoted for an error message, cut to ``limit`` characters."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


# ---------------------------------------------------------------------------------------------
# Reading and parsing the body
# ---------------------------------------------------------------------------------------------


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``max_bytes``."""
    too_large = APIError(
        413,
        f"the request body is larger than this server's limit of {max_bytes} bytes",
        code="request_too_large",
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > max_bytes:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_OPEN = np.frombuffer(b"[{", dtype=np.uint8)
_CLOSE = np.frombuffer(b"]}", dtype=np.uint8)


def json_depth(raw: bytes) -> int:
    """How deep ``raw`` nests arrays and objects, without parsing it (brackets inside strings do not count)."""
    skeleton = np.frombuffer(_JSON_STRING.sub(b'""', raw), dtype=np.uint8)
    step = np.isin(skeleton, _OPEN).astype(np.int64) - np.isin(skeleton, _CLOSE).astype(np.int64)
    return int(step.cumsum().max(initial=0))


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(raw: bytes) -> dict:
    """The JSON object in ``raw``; a 400 for anything else. Depth is bounded before parsing."""
    depth = json_depth(raw)
    if depth > MAX_JSON_DEPTH:
        raise APIError(
            400, f"the JSON body nests {depth} levels deep; at most {MAX_JSON_DEPTH}", code="invalid_json"
        )
    try:
        data = json.loads(raw, parse_constant=_no_constants)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise APIError(
            400, f"malformed JSON body: {' '.join(str(e).split())[:200]}", code="invalid_json"
        ) from None
    if not isinstance(data, dict):
        raise APIError(400, "expected a JSON object as the request body", code="invalid_json")
    return data


def check_text(data: Any) -> None:
    """Refuse any string (or key) holding a lone UTF-16 surrogate: JSON can spell one, Unicode text cannot."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                stack.append((f"{path}.{key}" if path else str(key), key))
                stack.append((f"{path}.{key}" if path else str(key), item))
        elif isinstance(value, list):  # token-id lists can be long: only strings and containers are visited
            stack.extend((f"{path}.{i}", x) for i, x in enumerate(value) if isinstance(x, str | list | dict))
        elif isinstance(value, str) and not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                where = path.encode("utf-8", "replace").decode("utf-8")
                raise APIError(
                    400,
                    f"{where}: character {e.start} is a lone UTF-16 surrogate, which is not valid Unicode text",
                    param=where,
                    code="invalid_value",
                ) from None


# Fields of the OpenAI API this server does not implement, with their neutral values: a request may
# send the neutral value (some clients always do), anything else is refused by name, never ignored.
_NEUTRAL: dict[str, Callable[[Any], bool]] = {
    "tools": lambda v: v == [],
    "tool_choice": lambda v: v == "none",
    "parallel_tool_calls": lambda v: isinstance(v, bool),
    "functions": lambda v: v == [],
    "function_call": lambda v: v == "none",
    "response_format": lambda v: v == {"type": "text"},
    "logit_bias": lambda v: v == {},
    "presence_penalty": lambda v: v == 0 and not isinstance(v, bool),
    "frequency_penalty": lambda v: v == 0 and not isinstance(v, bool),
    "repetition_penalty": lambda v: v == 1 and not isinstance(v, bool),
    "best_of": lambda v: v == 1 and not isinstance(v, bool),
    "suffix": lambda v: v == "",
    "audio": lambda v: False,
    "modalities": lambda v: v == ["text"],
    "prediction": lambda v: False,
    "web_search_options": lambda v: False,
    "reasoning_effort": lambda v: False,
    "service_tier": lambda v: v in ("auto", "default"),
    "store": lambda v: v is False,
    "metadata": lambda v: v == {},
}


def drop_neutral(data: dict) -> dict:
    """``data`` without the unsupported fields that hold their neutral value; a 400 naming any other."""
    out = dict(data)
    for name, neutral in _NEUTRAL.items():
        if name not in out:
            continue
        value = out.pop(name)
        if value is not None and not neutral(value):
            raise APIError(
                400, f"{name}: not supported by this server", param=name, code="unsupported_parameter"
            )
    return out


# ---------------------------------------------------------------------------------------------
# Request models
# ---------------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class GenerationRequest(_Strict):
    """What completions and chat completions share."""

    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)  # an extension (vLLM has it too)
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], lt=SEED_RANGE[1])
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    user: str | None = None  # an end-user id for abuse tracking: accepted, not used

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> GenerationRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        return self

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class CompletionRequest(GenerationRequest):
    prompt: (
        str
        | Annotated[list[str], Field(min_length=1, max_length=1)]
        | Annotated[list[int], Field(min_length=1)]
        | Annotated[list[Annotated[list[int], Field(min_length=1)]], Field(min_length=1, max_length=1)]
    )
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None  # a participant's name: accepted, not shown to the model

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(GenerationRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: only allowed when logprobs is true")
        return self


# A union's members appear in pydantic's error locations ("prompt.str"); a readable message replaces
# the first member's complaint.
_EXPECTED = {
    "prompt": "expected a string, a list of one string, or a non-empty list of token ids",
    "stop": f"expected a string or a list of at most {MAX_STOP} strings",
    "content": "expected a string or a list of text parts ({'type': 'text', 'text': ...})",
}
_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict"}


def _validation_error(e: ValidationError) -> APIError:
    err = e.errors()[0]
    loc = [str(p) for p in err["loc"]]
    path = [p for p in loc if p not in _UNION_TAGS and "[" not in p]
    param, message = ".".join(path) or None, err["msg"]
    named = [i for i, p in enumerate(path) if p in _EXPECTED]
    if err["type"] == "extra_forbidden":
        message = "unknown field"
    elif err["type"] == "value_error":  # a model validator's "field: message"
        param, _, message = message.removeprefix("Value error, ").partition(": ")
    elif len(path) < len(loc) and named:
        param, message = ".".join(path[: named[-1] + 1]), _EXPECTED[path[named[-1]]]
    return APIError(400, f"{param}: {message}" if param else message, param=param, code="invalid_value")


def parse_request(raw: bytes, cls: type[GenerationRequest]) -> GenerationRequest:
    """A validated request from a body already within the size limit."""
    data = parse_json(raw)
    check_text(data)
    data = drop_neutral(data)
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e) from None


# ---------------------------------------------------------------------------------------------
# Response pieces
# ---------------------------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def sse(obj: dict | str) -> str:
    """One server-sent event; ``json.dumps`` escapes every non-ASCII character."""
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -9999.0  # the OpenAI API's stand-in for log(0); JSON has no -inf


def token_text(tokenizer: Tokenizer, token: int) -> str:
    return tokenizer.decode([token])


def token_bytes(tokenizer: Tokenizer, token: int) -> list[int]:
    """The UTF-8 bytes a token stands for (exact for the byte tokenizer, from its text otherwise)."""
    if isinstance(tokenizer, ByteTokenizer):
        return [token]
    return list(token_text(tokenizer, token).encode("utf-8"))


def chat_logprobs(tokenizer: Tokenizer, lps: list[TokenLogprob]) -> dict:
    """``choices[i].logprobs`` of a chat completion."""

    def entry(token: int, logprob: float) -> dict:
        return {
            "token": token_text(tokenizer, token),
            "logprob": _finite(logprob),
            "bytes": token_bytes(tokenizer, token),
        }

    content = [
        {**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]} for lp in lps
    ]
    return {"content": content, "refusal": None}


def completion_logprobs(tokenizer: Tokenizer, lps: list[TokenLogprob | None], offset: int) -> dict:
    """``choices[i].logprobs`` of a (legacy) completion; ``None`` entries are the unscored first prompt token
    (as the API reports it), ``offset`` is where the first token's text starts in the choice's text."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for lp in lps:
        if lp is None:
            continue
        text = token_text(tokenizer, lp.token)
        out["tokens"].append(text)
        out["token_logprobs"].append(_finite(lp.logprob))
        top: dict[str, float] = {}
        for t, v in lp.top:  # most likely first; tokens that print alike keep the likeliest's value
            top.setdefault(token_text(tokenizer, t), _finite(v))
        out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def prompt_entries(tokenizer: Tokenizer, prompt: list[int], lps: list[TokenLogprob | None]) -> dict:
    """The echoed prompt's part of a completion's logprobs: the first token has no logprob."""
    out = completion_logprobs(tokenizer, lps, 0)
    first = token_text(tokenizer, prompt[0])
    return {
        "tokens": [first, *out["tokens"]],
        "token_logprobs": [None, *out["token_logprobs"]],
        "top_logprobs": [None, *out["top_logprobs"]],
        "text_offset": [0, *(o + len(first) for o in out["text_offset"])],
    }
