"""`lmspec serve`: an OpenAI-compatible HTTP server with continuous batching over the hybrid KV cache.

Endpoints: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` (``stream: true`` sends
server-sent events ``data: {...}`` and a final ``data: [DONE]``), ``/health`` and ``/metrics``
(Prometheus text). Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.
With an API key, every endpoint but ``/health`` needs ``Authorization: Bearer KEY``.

The handlers are module-level functions on an ``APIRouter``; the server's state (scheduler,
tokenizer, limits) reaches them through the ``get_state`` dependency from ``app.state``. A handler
validates the request (``protocol``), submits one engine request per choice to the ``Scheduler``
thread and awaits their events, so a slow client never stalls the batch. A non-streamed request
whose client goes away is cancelled within ``DISCONNECT_POLL_S``; a streamed one as soon as the
stream notices.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import jinja2
import jinja2.sandbox
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from torch import nn

from lmspec.runtime.tokenizer import ByteTokenizer, Tokenizer
from lmspec.serve import protocol
from lmspec.serve.engine import Event, TokenLogprob
from lmspec.serve.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    GenerationRequest,
    clip,
    sse,
    usage,
)
from lmspec.serve.sampling import SamplingParams
from lmspec.serve.scheduler import Metrics, Pending, Scheduler

__all__ = ["ServerState", "create_app", "router"]

# How often a handler waiting for a non-streamed result checks that its client is still connected.
DISCONNECT_POLL_S = 0.25
# The status logged for a client that left before its answer (nginx's "client closed request").
CLIENT_GONE = 499


@dataclass
class ServerState:
    """What the handlers share; lives in ``app.state.lmspec``."""

    scheduler: Scheduler
    tokenizer: Tokenizer
    name: str
    vocab_size: int
    temperature: float  # the spec's serving defaults
    top_p: float
    template: jinja2.Template
    api_key: str | None
    max_body_bytes: int
    max_prompt_chars: int  # a longer text cannot fit the context whatever it tokenizes to
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def max_len(self) -> int:
        return self.scheduler.max_len


def get_state(request: Request) -> ServerState:
    return request.app.state.lmspec


def require_api_key(request: Request, state: ServerState = Depends(get_state)) -> None:
    """401 unless the request carries ``Authorization: Bearer KEY`` (when the server has a key)."""
    if state.api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), state.api_key.encode()):
        raise APIError(
            401,
            "invalid or missing API key: send the header 'Authorization: Bearer KEY'",
            code="invalid_api_key",
        )


router = APIRouter(dependencies=[Depends(require_api_key)])
public_router = APIRouter()


# ---------------------------------------------------------------------------------------------
# From a request to engine requests
# ---------------------------------------------------------------------------------------------


async def read_request(
    request: Request, cls: type[GenerationRequest], state: ServerState
) -> GenerationRequest:
    req = protocol.parse_request(await protocol.read_body(request, state.max_body_bytes), cls)
    if req.model != state.name:
        raise APIError(
            404,
            f"The model {clip(req.model)} does not exist; this server serves {state.name!r}",
            param="model",
            code="model_not_found",
        )
    return req


def _too_long(state: ServerState, what: str, param: str) -> APIError:
    return APIError(
        400,
        f"{what}; this model's context is {state.max_len} tokens",
        param=param,
        code="context_length_exceeded",
    )


def tokenize(state: ServerState, text: str, param: str) -> list[int]:
    """``text``'s tokens; a text too long for the context is refused before it is tokenized."""
    if len(text) > state.max_prompt_chars:
        raise _too_long(state, f"the prompt has {len(text)} characters, more than can fit", param)
    ids = state.tokenizer.encode(text)
    if not ids:
        raise APIError(400, "the prompt is empty", param=param, code="invalid_value")
    return ids


def completion_prompt(state: ServerState, req: CompletionRequest) -> list[int]:
    p = req.prompt
    if isinstance(p, list) and isinstance(p[0], list):
        p = p[0]
    if isinstance(p, list) and isinstance(p[0], str):
        p = p[0]
    if isinstance(p, str):
        return tokenize(state, p, "prompt")
    if len(p) > state.max_len:
        raise _too_long(state, f"the prompt has {len(p)} tokens", "prompt")
    if any(not 0 <= t < state.vocab_size for t in p):
        raise APIError(
            400,
            f"prompt: token ids must be in 0..{state.vocab_size - 1}",
            param="prompt",
            code="invalid_value",
        )
    return list(p)


def chat_prompt(state: ServerState, req: ChatRequest) -> list[int]:
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    if sum(len(m["content"]) for m in messages) > state.max_prompt_chars:
        raise _too_long(state, "the messages hold more characters than can fit", "messages")
    try:
        text = state.template.render(messages=messages, add_generation_prompt=True)
    except jinja2.TemplateError as e:
        raise APIError(400, f"messages: the chat template failed: {e}", param="messages") from None
    return tokenize(state, text, "messages")


def choice_seeds(seed: int | None, n: int) -> list[int | None]:
    """Choice i samples with its own generator: seeds spread by the golden ratio, choice 0 keeps ``seed``."""
    if seed is None:
        return [None] * n
    return [(seed + i * 0x9E3779B97F4A7C15) % 2**64 for i in range(n)]


def sampling_params(
    state: ServerState,
    req: GenerationRequest,
    prompt_len: int,
    max_tokens: int | None,
    default_max: int,
    logprobs: int | None = None,
    prompt_logprobs: int | None = None,
) -> list[SamplingParams]:
    """One ``SamplingParams`` per choice; a 400 when the prompt and ``max_tokens`` exceed the context."""
    room = state.max_len - prompt_len
    if room < 1:
        param = "messages" if isinstance(req, ChatRequest) else "prompt"
        raise _too_long(state, f"the prompt has {prompt_len} tokens", param)
    if max_tokens is None:
        max_tokens = min(default_max, room)
    if max_tokens > room:
        raise _too_long(
            state, f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) is too long", "max_tokens"
        )
    return [
        SamplingParams(
            temperature=state.temperature if req.temperature is None else req.temperature,
            top_p=state.top_p if req.top_p is None else req.top_p,
            top_k=req.top_k or 0,
            max_tokens=max_tokens,
            stop=req.stop_strings,
            seed=seed,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )
        for seed in choice_seeds(req.seed, req.n)
    ]


# ---------------------------------------------------------------------------------------------
# Running the choices of one request
# ---------------------------------------------------------------------------------------------


class ClientGone(Exception):
    """The client of a non-streamed request disconnected."""


class Run:
    """The engine requests (one per choice) of one HTTP request, their events merged into one queue."""

    def __init__(self, state: ServerState, prompt: list[int], params: list[SamplingParams]) -> None:
        self.scheduler = state.scheduler
        self.n = self.left = len(params)
        self._checked = time.monotonic()
        self._queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self._handles: list[Pending] = [
            self.scheduler.submit(prompt, p, functools.partial(self._deliver, loop, i))
            for i, p in enumerate(params)
        ]

    def _deliver(self, loop: asyncio.AbstractEventLoop, index: int, ev: Event) -> None:
        loop.call_soon_threadsafe(self._queue.put_nowait, (index, ev))

    async def next(self, request: Request | None = None) -> tuple[int, Event] | None:
        """The next (choice index, event), None once every choice has finished; a failed choice raises.

        With ``request``, check every ``DISCONNECT_POLL_S`` that its client is still there (a stream
        must not: its response already listens for the disconnect).
        """
        if self.left == 0:
            return None
        while True:
            # Events may come every few milliseconds for as long as the request runs: check the client
            # on a clock, not only when the queue stays empty.
            if request is not None and time.monotonic() - self._checked >= DISCONNECT_POLL_S:
                self._checked = time.monotonic()
                if await request.is_disconnected():
                    raise ClientGone
            try:
                index, ev = await asyncio.wait_for(self._queue.get(), DISCONNECT_POLL_S)
                break
            except TimeoutError:
                continue
        if ev.error is not None:
            raise APIError(
                500, f"generation failed: {ev.error}", type="server_error", code="generation_failed"
            )
        self.left -= ev.finished
        return index, ev

    def cancel(self) -> None:
        """Free every row this request still holds (a no-op for finished choices)."""
        for handle in self._handles:
            self.scheduler.cancel(handle)


@dataclass
class Job:
    """One validated request, ready to run: what the response needs besides the events."""

    chat: bool
    prompt: list[int]
    params: list[SamplingParams]
    stream: bool
    include_usage: bool
    echo: bool = False
    logprobs: bool = False
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex[:24]


@dataclass
class _Choice:
    text: str = ""
    completion_tokens: int = 0
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    stats: dict | None = None

    def add(self, ev: Event) -> None:
        self.text += ev.text
        self.completion_tokens += len(ev.token_ids)
        self.logprobs += ev.logprobs or []
        if ev.prompt_logprobs is not None:
            self.prompt_logprobs = ev.prompt_logprobs
        if ev.finished:
            self.finish_reason, self.stats = ev.finish_reason, ev.stats.to_dict()


def _echo_text(state: ServerState, job: Job) -> str:
    return state.tokenizer.decode(job.prompt) if job.echo else ""


def _logprobs_field(
    state: ServerState, job: Job, lps: list[TokenLogprob], prompt_lps: list | None, offset: int
) -> dict | None:
    if not job.logprobs:
        return None
    if job.chat:
        return protocol.chat_logprobs(state.tokenizer, lps)
    out = protocol.completion_logprobs(state.tokenizer, lps, offset)
    if prompt_lps is not None:
        head = protocol.prompt_entries(state.tokenizer, job.prompt, prompt_lps)
        out = {key: head[key] + out[key] for key in out}
    return out


def _final_choice(state: ServerState, job: Job, index: int, c: _Choice) -> dict:
    echo = _echo_text(state, job)
    logprobs = _logprobs_field(state, job, c.logprobs, c.prompt_logprobs, len(echo))
    if job.chat:
        message = {"role": "assistant", "content": c.text}
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": c.finish_reason}
    return {"index": index, "text": echo + c.text, "logprobs": logprobs, "finish_reason": c.finish_reason}


async def collect(request: Request, state: ServerState, job: Job) -> Response:
    """A non-streamed response: every choice's whole text."""
    run = Run(state, job.prompt, job.params)
    choices = [_Choice() for _ in job.params]
    try:
        while (item := await run.next(request)) is not None:
            choices[item[0]].add(item[1])
    except ClientGone:
        state.scheduler.metrics.count_status(CLIENT_GONE)
        return Response(status_code=CLIENT_GONE)  # nobody reads it; the rows are already free
    finally:
        run.cancel()
    state.scheduler.metrics.count_status(200)
    completion = sum(c.completion_tokens for c in choices)
    return JSONResponse(
        {
            "id": job.id,
            "object": "chat.completion" if job.chat else "text_completion",
            "created": job.created,
            "model": state.name,
            "choices": [_final_choice(state, job, i, c) for i, c in enumerate(choices)],
            "usage": usage(len(job.prompt), completion),
            "lmspec": [c.stats for c in choices] if len(choices) > 1 else choices[0].stats,
        }
    )


def _chunk(state: ServerState, job: Job, choices: list[dict]) -> dict:
    out = {
        "id": job.id,
        "object": "chat.completion.chunk" if job.chat else "text_completion",
        "created": job.created,
        "model": state.name,
        "choices": choices,
    }
    if job.include_usage:
        out["usage"] = None  # the API's rule: null on every chunk but the last, which has usage
    return out


class _StreamState:
    """Per-choice bookkeeping of a stream: whether the choice has started, where its text is."""

    def __init__(self, n: int) -> None:
        self.started = [False] * n
        self.offsets = [0] * n
        self.completion_tokens = 0


def _stream_choice(state: ServerState, job: Job, st: _StreamState, index: int, ev: Event) -> dict:
    finish = ev.finish_reason if ev.finished else None
    st.completion_tokens += len(ev.token_ids)
    if job.chat:
        logprobs = _logprobs_field(state, job, ev.logprobs or [], None, 0)
        delta = {"content": ev.text} if ev.text else {}
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
    text = ev.text
    if not st.started[index]:
        st.started[index] = True
        text = _echo_text(state, job) + text
    prompt_lps = ev.prompt_logprobs if job.echo else None
    logprobs = _logprobs_field(state, job, ev.logprobs or [], prompt_lps, st.offsets[index])
    st.offsets[index] += len(text)
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


async def stream_events(
    state: ServerState, job: Job, run: Run, first: tuple[int, Event]
) -> AsyncIterator[str]:
    """The server-sent events of a streamed response, from its first (already received) event on."""
    st = _StreamState(run.n)
    try:
        if job.chat:
            role = {"role": "assistant", "content": ""}
            opening = [
                {"index": i, "delta": role, "logprobs": None, "finish_reason": None} for i in range(run.n)
            ]
            yield sse(_chunk(state, job, opening))
        item: tuple[int, Event] | None = first
        while item is not None:
            index, ev = item
            if ev.text or ev.finished or ev.token_ids or ev.prompt_logprobs is not None:
                yield sse(_chunk(state, job, [_stream_choice(state, job, st, index, ev)]))
            item = await run.next()
        if job.include_usage:
            yield sse({**_chunk(state, job, []), "usage": usage(len(job.prompt), st.completion_tokens)})
    except APIError as e:  # a choice failed after the stream started: its error is the last event
        yield sse(e.body())
    finally:
        run.cancel()  # a client that went away frees its rows
    yield sse("[DONE]")


async def respond(request: Request, state: ServerState, job: Job) -> Response:
    if not job.stream:
        return await collect(request, state, job)
    run = Run(state, job.prompt, job.params)
    try:
        first = await run.next(request)  # an error before the first token still gets a JSON error response
    except ClientGone:
        run.cancel()
        state.scheduler.metrics.count_status(CLIENT_GONE)
        return Response(status_code=CLIENT_GONE)
    except BaseException:
        run.cancel()
        raise
    assert first is not None
    state.scheduler.metrics.count_status(200)
    return StreamingResponse(stream_events(state, job, run, first), media_type="text/event-stream")


# ---------------------------------------------------------------------------------------------
# Endpoints
# ---------------------------------------------------------------------------------------------


@router.post("/v1/completions")
async def completions(request: Request, state: ServerState = Depends(get_state)) -> Response:
    req = await read_request(request, CompletionRequest, state)
    assert isinstance(req, CompletionRequest)
    prompt = completion_prompt(state, req)
    k = req.logprobs
    params = sampling_params(
        state, req, len(prompt), req.max_tokens, 16, logprobs=k, prompt_logprobs=k if req.echo else None
    )
    job = Job(False, prompt, params, req.stream, req.include_usage, echo=req.echo, logprobs=k is not None)
    return await respond(request, state, job)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, state: ServerState = Depends(get_state)) -> Response:
    req = await read_request(request, ChatRequest, state)
    assert isinstance(req, ChatRequest)
    prompt = chat_prompt(state, req)
    max_tokens = req.max_tokens if req.max_completion_tokens is None else req.max_completion_tokens
    k = (req.top_logprobs or 0) if req.logprobs else None
    params = sampling_params(state, req, len(prompt), max_tokens, 256, logprobs=k)
    job = Job(True, prompt, params, req.stream, req.include_usage, logprobs=req.logprobs)
    return await respond(request, state, job)


def _model_card(state: ServerState) -> dict:
    return {"id": state.name, "object": "model", "created": state.created, "owned_by": "lmspec"}


@router.get("/v1/models")
async def list_models(state: ServerState = Depends(get_state)) -> dict:
    return {"object": "list", "data": [_model_card(state)]}


@router.get("/v1/models/{model:path}")
async def retrieve_model(model: str, state: ServerState = Depends(get_state)) -> dict:
    if model != state.name:
        raise APIError(404, f"The model {clip(model)} does not exist", param="model", code="model_not_found")
    return _model_card(state)


@router.get("/metrics")
async def metrics(state: ServerState = Depends(get_state)) -> PlainTextResponse:
    return PlainTextResponse(metrics_text(state), media_type="text/plain; version=0.0.4")


@public_router.get("/health")
async def health(state: ServerState = Depends(get_state)) -> dict:
    sched = state.scheduler
    return {"status": "ok", "model": state.name, "running": sched.running, "waiting": sched.waiting}


def _label(value: str) -> str:
    """A Prometheus label value: backslash, double quote and line feed escaped, as the text format says."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _acceptance_length(m: Metrics, s: Scheduler) -> float:
    return round((m.decode_steps + m.accepted) / m.decode_steps, 6) if m.decode_steps else 0.0


def _kv_cache_bytes(m: Metrics, s: Scheduler) -> int:
    return s.engine.cache.nbytes()


# name, help, value: a field of the scheduler's Metrics, or a function of (metrics, scheduler). A name
# ending in _total is a counter, any other a gauge (the Prometheus naming rule).
_METRICS: list[tuple[str, str, str | Callable[[Metrics, Scheduler], float]]] = [
    ("lmspec_requests_total", "Requests admitted to the batch.", "requests"),
    ("lmspec_requests_failed_total", "Requests ended by an error.", "requests_failed"),
    ("lmspec_requests_cancelled_total", "Requests whose client went away.", "requests_cancelled"),
    ("lmspec_prompt_tokens_total", "Prompt tokens of admitted requests.", "prompt_tokens"),
    ("lmspec_completion_tokens_total", "Tokens generated by finished requests.", "completion_tokens"),
    ("lmspec_decode_steps_total", "Main-model decode forwards, per request.", "decode_steps"),
    ("lmspec_draft_tokens_total", "MTP draft tokens proposed.", "drafted"),
    ("lmspec_accepted_tokens_total", "MTP draft tokens accepted.", "accepted"),
    ("lmspec_acceptance_length", "Tokens per decode step (1 + accepted drafts).", _acceptance_length),
    ("lmspec_batch_steps_total", "Batched engine steps.", "batch_steps"),
    ("lmspec_batch_rows_total", "Requests summed over batched steps.", "batch_rows"),
    ("lmspec_running_requests", "Requests in the batch now.", lambda m, s: s.running),
    ("lmspec_waiting_requests", "Requests waiting for a free row.", lambda m, s: s.waiting),
    ("lmspec_kv_cache_bytes", "K/V bytes allocated by the hybrid cache.", _kv_cache_bytes),
    ("lmspec_speculative_depth", "MTP draft depth.", lambda m, s: s.engine.depth),
]


def metrics_text(state: ServerState) -> str:
    sched = state.scheduler
    m = sched.metrics
    labels = f'{{model="{_label(state.name)}"}}'
    lines = []
    for name, help_, value in _METRICS:
        kind = "counter" if name.endswith("_total") else "gauge"
        v = getattr(m, value) if isinstance(value, str) else value(m, sched)
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name}{labels} {v}"]
    lines += [
        "# HELP lmspec_http_responses_total HTTP responses by status.",
        "# TYPE lmspec_http_responses_total counter",
    ]
    lines += [f'lmspec_http_responses_total{{status="{s}"}} {n}' for s, n in sorted(m.by_status.items())]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------


def _error_response(request: Request, e: APIError) -> JSONResponse:
    request.app.state.lmspec.scheduler.metrics.count_status(e.status)
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


async def _on_api_error(request: Request, e: Exception) -> JSONResponse:
    assert isinstance(e, APIError)
    return _error_response(request, e)


async def _on_http_error(request: Request, e: Exception) -> JSONResponse:
    assert isinstance(e, StarletteHTTPException)
    kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
    return _error_response(request, APIError(e.status_code, str(e.detail), type=kind))


async def _on_validation_error(request: Request, e: Exception) -> JSONResponse:
    assert isinstance(e, RequestValidationError)
    return _error_response(request, APIError(400, str(e.errors()[0].get("msg", "invalid request"))))


async def _on_client_gone(request: Request, e: Exception) -> Response:
    """The client left before its body arrived: nothing to answer and nothing wrong with the server.

    Without this handler the error reached the catch-all below: a 500 in /metrics and a traceback in the
    log for every client that hangs up mid-upload.
    """
    request.app.state.lmspec.scheduler.metrics.count_status(CLIENT_GONE)
    return Response(status_code=CLIENT_GONE)


async def _on_internal_error(request: Request, e: Exception) -> JSONResponse:
    error = APIError(500, f"internal error: {type(e).__name__}", type="server_error", code="internal_error")
    return _error_response(request, error)


def max_chars_per_token(tokenizer: Tokenizer) -> int:
    """The most characters of text one token can stand for (its bytes, or a special token's name)."""
    if isinstance(tokenizer, ByteTokenizer):
        return 1
    longest = max((len(tokenizer.decode([i])) for i in range(tokenizer.vocab_size)), default=1)
    return max(longest, int(tokenizer.token_bytes.max(initial=1)))


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    app.state.lmspec.scheduler.close()


def create_app(
    model: nn.Module,
    tokenizer: Tokenizer,
    *,
    speculative_depth: int = 0,
    max_batch: int = 8,
    model_name: str | None = None,
    api_key: str | None = None,
    max_body_bytes: int = protocol.DEFAULT_MAX_BODY_BYTES,
    **engine_options: int,
) -> FastAPI:
    """The FastAPI app; its scheduler thread starts now and stops at the app's shutdown.

    ``engine_options`` go to the ``DecodeEngine`` (``prefill_chunk``, ``interleaved_prefill_chunk``).
    """
    spec = model.spec
    scheduler = Scheduler(
        model, tokenizer, speculative_depth=speculative_depth, max_batch=max_batch, **engine_options
    )
    template = jinja2.sandbox.ImmutableSandboxedEnvironment(
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True
    ).from_string(spec.serving.chat_template)
    app = FastAPI(
        title="lmspec", version="0.1.0", lifespan=_lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.lmspec = ServerState(
        scheduler=scheduler,
        tokenizer=tokenizer,
        name=model_name or spec.name,
        vocab_size=spec.model.vocab_size,
        temperature=spec.serving.temperature,
        top_p=spec.serving.top_p,
        template=template,
        api_key=api_key or None,
        max_body_bytes=max_body_bytes,
        max_prompt_chars=scheduler.max_len * max_chars_per_token(tokenizer),
    )
    app.state.scheduler = scheduler
    app.include_router(router)
    app.include_router(public_router)
    app.add_exception_handler(APIError, _on_api_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(ClientDisconnect, _on_client_gone)
    app.add_exception_handler(Exception, _on_internal_error)
    return app
