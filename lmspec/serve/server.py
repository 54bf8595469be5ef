"""`lmspec serve`: an OpenAI-compatible HTTP server with continuous batching over the hybrid KV cache.

Endpoints: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` (``stream: true`` sends
server-sent events ``data: {...}`` and a final ``data: [DONE]``), ``/health`` and ``/metrics``
(Prometheus text). Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.

One background thread owns the ``DecodeEngine``: each iteration it admits waiting requests into free
cache rows, runs one batched step (new prompts' prefill chunks beside running requests' decode or
speculative-verify tokens, each row at its own positions) and hands every request its new text.
HTTP handlers only enqueue requests and wait on their own event queue, so a slow client never stalls
the batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

import jinja2
import jinja2.sandbox
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from lmspec.runtime.tokenizer import Tokenizer
from lmspec.serve.engine import DecodeEngine, Event
from lmspec.serve.sampling import SamplingParams

__all__ = ["Scheduler", "create_app"]


# ---------------------------------------------------------------------------------------------
# Scheduling
# ---------------------------------------------------------------------------------------------


@dataclass
class _Pending:
    prompt: list[int]
    params: SamplingParams
    deliver: Any  # callable(Event | Exception), called from the scheduler thread
    rid: int | None = None
    cancelled: bool = False


@dataclass
class Metrics:
    requests: int = 0
    requests_failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    decode_steps: int = 0
    drafted: int = 0
    accepted: int = 0
    batch_steps: int = 0
    batch_rows: int = 0
    by_status: dict[int, int] = field(default_factory=dict)


class Scheduler:
    """Continuous batching: a thread that runs ``DecodeEngine.step`` while any request is in flight."""

    def __init__(
        self, model: nn.Module, tokenizer: Tokenizer, *, speculative_depth: int, max_batch: int
    ) -> None:
        self.engine = DecodeEngine(
            model, max_batch=max_batch, speculative_depth=speculative_depth, tokenizer=tokenizer
        )
        self.max_len = self.engine.max_len
        self.metrics = Metrics()
        self._waiting: queue.Queue[_Pending] = queue.Queue()
        self._running: dict[int, _Pending] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="lmspec-scheduler", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return self._waiting.qsize()

    @property
    def running(self) -> int:
        return len(self._running)

    def submit(self, prompt: list[int], params: SamplingParams, deliver) -> _Pending:
        req = _Pending(prompt, params, deliver)
        self._waiting.put(req)
        self._wake.set()
        return req

    def cancel(self, req: _Pending) -> None:
        req.cancelled = True
        self._wake.set()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)

    def _admit(self) -> None:
        while self.engine.free_rows and not self._waiting.empty():
            req = self._waiting.get_nowait()
            if req.cancelled:
                continue
            try:
                req.rid = self.engine.add(req.prompt, req.params)
            except ValueError as e:  # validated before submission; kept as a last line of defence
                req.deliver(e)
                continue
            self._running[req.rid] = req
            self.metrics.requests += 1
            self.metrics.prompt_tokens += len(req.prompt)

    def _loop(self) -> None:
        while not self._stop.is_set():
            for rid, req in list(self._running.items()):
                if req.cancelled:
                    self.engine.cancel(rid)
                    del self._running[rid]
            self._admit()
            if not self._running:
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                events = self.engine.step()
            except Exception as e:  # a failed step fails its requests; the server keeps serving
                for rid, req in list(self._running.items()):
                    self.engine.cancel(rid)
                    self.metrics.requests_failed += 1
                    req.deliver(e)
                self._running.clear()
                continue
            self.metrics.batch_steps += 1
            self.metrics.batch_rows += len(self._running)
            for ev in events:
                self._dispatch(ev)

    def _dispatch(self, ev: Event) -> None:
        req = self._running.get(ev.rid)
        if req is None:
            return
        if ev.finished:
            del self._running[ev.rid]
            st = ev.stats
            m = self.metrics
            m.completion_tokens += st.completion_tokens
            m.decode_steps += st.decode_steps
            m.drafted += st.drafted
            m.accepted += st.accepted
        if not req.cancelled:
            req.deliver(ev)


# ---------------------------------------------------------------------------------------------
# Requests and errors in OpenAI's shape
# ---------------------------------------------------------------------------------------------


class APIError(Exception):
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


class _Req(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1)


class CompletionRequest(_Req):
    prompt: str | list[str] | list[int]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")
        return self.content or ""


class ChatRequest(_Req):
    messages: list[ChatMessage] = Field(min_length=1)


def _validation_error(e: ValidationError) -> APIError:
    err = e.errors()[0]
    param = ".".join(str(p) for p in err["loc"]) or None
    return APIError(400, f"{param}: {err['msg']}" if param else err["msg"], param=param, code="invalid_value")


# ---------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------


def _metrics_text(sched: Scheduler, model_name: str) -> str:
    m = sched.metrics
    acc = (m.decode_steps + m.accepted) / m.decode_steps if m.decode_steps else 0.0
    lines = []

    def metric(name: str, kind: str, help_: str, value: float, labels: str = "") -> None:
        lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name}{labels} {value}"])

    lab = f'{{model="{model_name}"}}'
    metric("lmspec_requests_total", "counter", "Requests admitted to the batch.", m.requests, lab)
    metric(
        "lmspec_requests_failed_total",
        "counter",
        "Requests failed by an engine error.",
        m.requests_failed,
        lab,
    )
    lines += [
        "# HELP lmspec_http_responses_total HTTP responses by status.",
        "# TYPE lmspec_http_responses_total counter",
    ]
    lines += [f'lmspec_http_responses_total{{status="{s}"}} {n}' for s, n in sorted(m.by_status.items())]
    metric(
        "lmspec_prompt_tokens_total", "counter", "Prompt tokens of admitted requests.", m.prompt_tokens, lab
    )
    metric(
        "lmspec_completion_tokens_total",
        "counter",
        "Tokens generated by finished requests.",
        m.completion_tokens,
        lab,
    )
    metric(
        "lmspec_decode_steps_total",
        "counter",
        "Main-model decode forwards, per request.",
        m.decode_steps,
        lab,
    )
    metric("lmspec_draft_tokens_total", "counter", "MTP draft tokens proposed.", m.drafted, lab)
    metric("lmspec_accepted_tokens_total", "counter", "MTP draft tokens accepted.", m.accepted, lab)
    metric(
        "lmspec_acceptance_length",
        "gauge",
        "Tokens per decode step (1 + accepted drafts).",
        round(acc, 6),
        lab,
    )
    metric("lmspec_batch_steps_total", "counter", "Batched engine steps.", m.batch_steps, lab)
    metric("lmspec_batch_rows_total", "counter", "Requests summed over batched steps.", m.batch_rows, lab)
    metric("lmspec_running_requests", "gauge", "Requests in the batch now.", sched.running, lab)
    metric("lmspec_waiting_requests", "gauge", "Requests waiting for a free row.", sched.waiting, lab)
    metric(
        "lmspec_kv_cache_bytes",
        "gauge",
        "K/V bytes allocated by the hybrid cache.",
        sched.engine.cache.nbytes(),
        lab,
    )
    metric("lmspec_speculative_depth", "gauge", "MTP draft depth.", sched.engine.depth, lab)
    return "\n".join(lines) + "\n"


def create_app(
    model: nn.Module,
    tokenizer: Tokenizer,
    *,
    speculative_depth: int = 0,
    max_batch: int = 8,
    model_name: str | None = None,
) -> FastAPI:
    """The FastAPI app; its scheduler thread starts now and stops at the app's shutdown."""
    from starlette.exceptions import HTTPException as StarletteHTTPException

    spec = model.spec
    name = model_name or spec.name
    sched = Scheduler(model, tokenizer, speculative_depth=speculative_depth, max_batch=max_batch)
    template = jinja2.sandbox.ImmutableSandboxedEnvironment(
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True
    ).from_string(spec.serving.chat_template)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        sched.close()

    app = FastAPI(title="lmspec", version="0.1.0", lifespan=lifespan)
    app.state.scheduler = sched

    def error_response(e: APIError) -> JSONResponse:
        sched.metrics.by_status[e.status] = sched.metrics.by_status.get(e.status, 0) + 1
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(APIError(e.status_code, str(e.detail), type=kind))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        return error_response(APIError(400, str(e.errors()[0].get("msg", "invalid request"))))

    async def parse(request: Request, cls: type[_Req]) -> _Req:
        raw = await request.body()
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"malformed JSON body: {e}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "expected a JSON object as the request body", code="invalid_json")
        try:
            req = cls.model_validate(data)
        except ValidationError as e:
            raise _validation_error(e) from None
        if req.model != name:
            raise APIError(
                404,
                f"The model '{req.model}' does not exist; this server serves '{name}'",
                param="model",
                code="model_not_found",
            )
        return req

    def sampling(req: _Req, prompt_len: int, default_max: int) -> SamplingParams:
        room = sched.max_len - prompt_len
        if room < 1:
            raise APIError(
                400,
                f"the prompt has {prompt_len} tokens; this model's context is {sched.max_len} tokens",
                param="messages" if isinstance(req, ChatRequest) else "prompt",
                code="context_length_exceeded",
            )
        max_tokens = req.max_tokens if req.max_tokens is not None else req.max_completion_tokens
        if max_tokens is None:
            max_tokens = min(default_max, room)
        if max_tokens > room:
            raise APIError(
                400,
                f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds this model's "
                f"context of {sched.max_len} tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        return SamplingParams(
            temperature=spec.serving.temperature if req.temperature is None else req.temperature,
            top_p=spec.serving.top_p if req.top_p is None else req.top_p,
            top_k=req.top_k or 0,
            max_tokens=max_tokens,
            stop=stop,
            seed=req.seed,
        )

    async def run(prompt: list[int], params: SamplingParams) -> AsyncIterator[Event]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event | Exception] = asyncio.Queue()
        handle = sched.submit(prompt, params, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        try:
            while True:
                ev = await events.get()
                if isinstance(ev, Exception):
                    raise APIError(500, f"generation failed: {ev}", type="server_error")
                yield ev
                if ev.finished:
                    return
        finally:
            sched.cancel(handle)  # a client that went away frees its row

    def usage(prompt_len: int, completion: int) -> dict[str, int]:
        return {
            "prompt_tokens": prompt_len,
            "completion_tokens": completion,
            "total_tokens": prompt_len + completion,
        }

    def sse(obj: dict | str) -> str:
        return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"

    async def respond(req: _Req, prompt: list[int], params: SamplingParams, chat: bool):
        cid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        obj = "chat.completion" if chat else "text_completion"
        now = int(time.time())

        def choice(text: str, finish: str | None, delta: bool) -> dict:
            if not chat:
                return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            if delta:
                return {
                    "index": 0,
                    "delta": {"content": text} if text else {},
                    "logprobs": None,
                    "finish_reason": finish,
                }
            return {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish,
            }

        if not req.stream:
            text, last = [], None
            async for ev in run(prompt, params):
                text.append(ev.text)
                last = ev
            assert last is not None
            sched.metrics.by_status[200] = sched.metrics.by_status.get(200, 0) + 1
            return JSONResponse(
                {
                    "id": cid,
                    "object": obj,
                    "created": now,
                    "model": name,
                    "choices": [choice("".join(text), last.finish_reason, delta=False)],
                    "usage": usage(len(prompt), last.stats.completion_tokens),
                    "lmspec": last.stats.to_dict(),
                }
            )

        chunk_obj = "chat.completion.chunk" if chat else "text_completion"
        events = run(prompt, params)
        first = await anext(events)  # errors before streaming starts still get a JSON error response

        async def stream() -> AsyncIterator[str]:
            base = {"id": cid, "object": chunk_obj, "created": now, "model": name}
            if chat:
                yield sse(
                    {
                        **base,
                        "choices": [
                            {
                                "index": 0,
                                "delta": {"role": "assistant", "content": ""},
                                "logprobs": None,
                                "finish_reason": None,
                            }
                        ],
                    }
                )
            ev: Event | None = first
            try:
                while ev is not None:
                    if ev.text or ev.finished:
                        yield sse(
                            {
                                **base,
                                "choices": [choice(ev.text, ev.finish_reason if ev.finished else None, True)],
                            }
                        )
                    if ev.finished:
                        yield sse(
                            {**base, "choices": [], "usage": usage(len(prompt), ev.stats.completion_tokens)}
                        )
                        break
                    ev = await anext(events, None)
            except APIError as e:
                yield sse(e.body())
            finally:
                await events.aclose()
            yield sse("[DONE]")

        sched.metrics.by_status[200] = sched.metrics.by_status.get(200, 0) + 1
        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "running": sched.running, "waiting": sched.waiting}

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": name, "object": "model", "created": created, "owned_by": "lmspec"}],
        }

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(_metrics_text(sched, name), media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await parse(request, CompletionRequest)
        assert isinstance(req, CompletionRequest)
        p = req.prompt
        if isinstance(p, list) and p and all(isinstance(t, int) for t in p):
            ids = [int(t) for t in p]
            if any(not 0 <= t < spec.model.vocab_size for t in ids):
                raise APIError(
                    400, f"prompt token ids must be in 0..{spec.model.vocab_size - 1}", param="prompt"
                )
        else:
            if isinstance(p, list):
                if len(p) != 1:
                    raise APIError(400, "this server takes one prompt per request", param="prompt")
                p = p[0]
            ids = tokenizer.encode(str(p))
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        return await respond(req, ids, sampling(req, len(ids), 16), chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = await parse(request, ChatRequest)
        assert isinstance(req, ChatRequest)
        try:
            text = template.render(messages=[{"role": m.role, "content": m.text()} for m in req.messages])
        except jinja2.TemplateError as e:
            raise APIError(400, f"chat template: {e}", param="messages") from None
        ids = tokenizer.encode(text)
        return await respond(req, ids, sampling(req, len(ids), 256), chat=True)

    return app
