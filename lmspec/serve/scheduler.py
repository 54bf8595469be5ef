"""Continuous batching: one thread owns the ``DecodeEngine`` and steps it while any request is in flight.

Each iteration drops cancelled requests (their rows are free at once), admits waiting requests into
free rows, runs one ``DecodeEngine.step`` and hands every request its events through the callback
it was submitted with. A request that fails ends with an error event of its own; the engine keeps
serving the others. Only if the step itself breaks (a bug, not a request) does every running request
end with that error, and the scheduler keeps serving new ones.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from lmspec.runtime.tokenizer import Tokenizer
from lmspec.serve.engine import DecodeEngine, Event, RequestStats
from lmspec.serve.sampling import SamplingParams

__all__ = ["Metrics", "Pending", "Scheduler"]


@dataclass(eq=False)
class Pending:
    """One submitted request: ``deliver(event)`` is called from the scheduler thread."""

    prompt: list[int]
    params: SamplingParams
    deliver: Callable[[Event], None]
    rid: int | None = None
    cancelled: bool = False


@dataclass
class Metrics:
    requests: int = 0
    requests_failed: int = 0
    requests_cancelled: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    decode_steps: int = 0
    drafted: int = 0
    accepted: int = 0
    batch_steps: int = 0
    batch_rows: int = 0
    by_status: dict[int, int] = field(default_factory=dict)

    def count_status(self, status: int) -> None:
        self.by_status[status] = self.by_status.get(status, 0) + 1


class Scheduler:
    """Continuous batching over a ``DecodeEngine`` of ``max_batch`` rows, in a thread of its own."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        *,
        speculative_depth: int,
        max_batch: int,
        **engine_options: int,
    ) -> None:
        self.engine = DecodeEngine(
            model,
            max_batch=max_batch,
            speculative_depth=speculative_depth,
            tokenizer=tokenizer,
            **engine_options,
        )
        self.max_len = self.engine.max_len
        self.metrics = Metrics()
        self._waiting: queue.Queue[Pending] = queue.Queue()
        self._running: dict[int, Pending] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lmspec-scheduler", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return self._waiting.qsize()

    @property
    def running(self) -> int:
        return len(self._running)

    def submit(self, prompt: list[int], params: SamplingParams, deliver: Callable[[Event], None]) -> Pending:
        req = Pending(prompt, params, deliver)
        self._waiting.put(req)
        self._wake.set()
        return req

    def cancel(self, req: Pending) -> None:
        """Free the request's row at the next iteration (a no-op once it has finished)."""
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
                self.metrics.requests_failed += 1
                stats = RequestStats(prompt_tokens=len(req.prompt))
                req.deliver(Event(-1, [], "", True, "error", stats, error=str(e)))
                continue
            self._running[req.rid] = req
            self.metrics.requests += 1
            self.metrics.prompt_tokens += len(req.prompt)

    def _drop_cancelled(self) -> None:
        for rid, req in list(self._running.items()):
            if req.cancelled:
                self.engine.cancel(rid)
                del self._running[rid]
                self.metrics.requests_cancelled += 1

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._drop_cancelled()
            self._admit()
            if not self._running:
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                events = self.engine.step()
            except Exception as e:  # noqa: BLE001 - the step itself broke: end its requests, keep serving
                events = self.engine.abort(e)
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
            st, m = ev.stats, self.metrics
            m.completion_tokens += st.completion_tokens
            m.decode_steps += st.decode_steps
            m.drafted += st.drafted
            m.accepted += st.accepted
            if ev.error is not None:
                m.requests_failed += 1
        if not req.cancelled:
            try:
                req.deliver(ev)
            except RuntimeError:  # the handler's event loop has closed (shutdown): nobody is listening
                req.cancelled = True
