"""Decoding: a batched engine with MTP speculative decoding over the hybrid KV cache, and `lmspec generate`.

``DecodeEngine`` holds up to ``max_batch`` sequences, each in one row of a ``HybridKVCache``. Every
``step()`` advances the decoding rows by one verify forward of the main model (preceded, when
speculating, by one batched forward per MTP block that drafts the next tokens), then reads the next
chunk of the prompts still being read (one main forward, plus one catch-up forward per MTP block).
Each forward covers only the rows it concerns; ragged rows are padded with position -1. While rows
decode, prompts are read ``interleaved_prefill_chunk`` tokens per step, so a long prompt delays the
others' tokens by one small forward per step, not by its whole prefill. A row that fails (NaN logits,
a raising forward) ends alone. ``Generator`` wraps the engine for one or a few requests; the
server's scheduler drives the same engine with continuous batching.

Speculative decoding, exactly (positions 0-based; N = tokens the main model has processed; the
sequence holds x_0..x_N, x_N sampled but not yet fed; h^0_p is the main model's last hidden state at
position p, h^k_p the output of MTP block k at p)::

    MTP block k at position p reads (h^(k-1)_p, x_(p+k)) and predicts x_(p+k+1)   (as in training)

    draft:   block 1 at N-1 from (h^0_(N-1), x_N)            -> d_1 ~ q_1
             block k at N-1 from (h^(k-1)_(N-1), d_(k-1))      -> d_k ~ q_k,  k = 2..D
    verify:  main model, ONE forward over [x_N, d_1..d_D] at positions N..N+D -> p_0..p_D
    accept:  longest prefix by rejection sampling (greedy: d_i == argmax p_(i-1)), then one token from
             the residual / the bonus distribution; a accepted drafts -> N' = N + a + 1
    rollback: main cache to N' positions; block k's cache to L_k = min(N, N' - k) positions

Block k's cache entry at position p is only right once x_(p+k) is known, so each block runs, in its
draft forward, over every position from its cache length L_k to N-1: positions up to N-k use accepted
tokens (they catch the block up on the tokens accepted last round, with block 1 fed the verified main
hidden states and block k fed block k-1's outputs), positions past N-k use this round's drafts and
are rolled back unless those drafts are accepted. The hidden states each block will still need are
kept per sequence (``_Seq.hidden``).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from lmspec.runtime.kv_cache import HybridKVCache, StaticKVCache
from lmspec.runtime.tokenizer import ByteTokenizer, Tokenizer
from lmspec.serve.sampling import SamplingParams, accept_drafts, probs, sample
from lmspec.serve.static_decode import StaticDecoder, check_speculative_depth, seeded_generator

__all__ = [
    "Completion",
    "DecodeEngine",
    "Event",
    "Generator",
    "RequestStats",
    "TokenLogprob",
    "decode_threads",
]

_T = TypeVar("_T")

# Prompt tokens read per step while other rows decode. A step then costs one decode forward plus one
# forward over this many prompt tokens, so a request that is decoding keeps getting a token every step
# however long a concurrent prompt is. See docs/serving.md for the measured latencies.
_INTERLEAVED_PREFILL_CHUNK = 32

# Contexts of Generator(compile=True)'s static decoders are rounded up to a multiple of this, so requests
# of similar lengths share one compiled graph; a global layer's step attends to every slot of its buffer.
_STATIC_CONTEXT = 256


@dataclass
class RequestStats:
    """Per-request counters. Acceptance length = tokens emitted per main-model decode forward."""

    prompt_tokens: int
    completion_tokens: int = 0
    decode_steps: int = 0  # main-model forwards after the prefill (each one verifies D drafts)
    drafted: int = 0
    accepted: int = 0
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None

    @property
    def acceptance_length(self) -> float:
        """Mean tokens per decode step: 1 + accepted drafts per step (1.0 without speculation)."""
        return (self.decode_steps + self.accepted) / self.decode_steps if self.decode_steps else 0.0

    @property
    def elapsed(self) -> float:
        return (self.finished_at or time.perf_counter()) - self.started

    @property
    def tokens_per_s(self) -> float:
        """Completion tokens per second of the whole request (prefill included)."""
        return self.completion_tokens / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first one, per second after the first one (decode speed alone)."""
        if self.first_token_at is None or self.completion_tokens < 2:
            return 0.0
        dt = (self.finished_at or time.perf_counter()) - self.first_token_at
        return (self.completion_tokens - 1) / dt if dt > 0 else 0.0

    def to_dict(self) -> dict[str, float | int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "decode_steps": self.decode_steps,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "acceptance_length": round(self.acceptance_length, 4),
            "tokens_per_s": round(self.tokens_per_s, 2),
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 2),
            "seconds": round(self.elapsed, 4),
        }


class _TextState:
    """Incremental detokenisation with stop strings: emits only text that can no longer change."""

    def __init__(self, tokenizer: Tokenizer | None, stop: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.emitted = 0
        self.text = ""
        self.ids: list[int] = []

    def feed(self, ids: Sequence[int]) -> tuple[str, bool]:
        """All generated ids so far -> (new text, stopped). Holds back a partial UTF-8 char or stop prefix."""
        if self.tokenizer is None:
            return "", False
        text = self.tokenizer.decode(ids)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text = text[:cut]
            delta = self.text[self.emitted :]
            self.emitted = len(self.text)
            return delta, True
        self.text = text
        safe = len(text.rstrip("\ufffd"))
        for s in self.stop:
            for n in range(min(len(s) - 1, safe), 0, -1):
                if text[:safe].endswith(s[:n]):
                    safe -= n
                    break
        delta = text[self.emitted : max(safe, self.emitted)]
        self.emitted = max(safe, self.emitted)
        return delta, False

    def feed_new(self, new: Sequence[int]) -> tuple[str, bool]:
        """``feed`` with only this step's ids: keeps the ids itself."""
        self.ids += new
        return self.feed(self.ids)

    def flush(self) -> str:
        delta = self.text[self.emitted :]
        self.emitted = len(self.text)
        return delta


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model's raw logits, and the ``top`` most likely (token, logprob)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(eq=False)  # compared and hashed by identity: one object per request
class _Seq:
    """One request in a row of the engine."""

    rid: int
    row: int
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator
    text: _TextState
    stats: RequestStats
    tokens: list[int] = field(default_factory=list)  # x_0..x_N: prompt + generated
    main_len: int = 0  # positions the main model has processed (its cache length)
    mtp_len: list[int] = field(default_factory=list)  # per MTP block: positions in its cache (L_k)
    # hidden[j] holds h^j for positions mtp_len[j] .. L_j - 1 (L_0 = main_len, L_j = mtp_len[j-1]):
    # what block j+1 still has to read.
    hidden: list[Tensor] = field(default_factory=list)
    # Prompt tokens' log-probabilities (the first has none), when the request asked for them.
    prompt_logprobs: list[TokenLogprob | None] | None = None
    written: int = 0  # 1 + the highest position this request may have written to any cache layer
    # With record_rollout: the experts (n, L, K) of every position read so far, chunk by chunk, and those of
    # the last forward's positions, kept once the step knows which of them stay (a verify keeps a + 1).
    routes: list[Tensor] = field(default_factory=list)
    pending_routes: Tensor | None = None
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None

    @property
    def generated(self) -> list[int]:
        return self.tokens[len(self.prompt) :]

    @property
    def decoding(self) -> bool:
        return self.main_len >= len(self.prompt)


@dataclass
class Event:
    """What one step produced for one request.

    ``logprobs`` has one entry per ``token_ids`` entry when the request asked for them;
    ``prompt_logprobs`` comes once, with the event of the step that finished the prompt. A request
    that failed ends with ``finish_reason="error"`` and ``error`` saying why; no other request is
    affected.
    """

    rid: int
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None
    stats: RequestStats
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    error: str | None = None
    # With record_rollout: each new token's log-probability under the distribution it was sampled from
    # (after temperature, top-k and top-p), and on the last event the expert ids (positions, MoE layers, K)
    # the main model routed every position it read to.
    behaviour_logprobs: list[float] | None = None
    routes: Tensor | None = None


class _RowView:
    """The KV cache as one forward over a subset of its rows sees it (``rows`` ascending).

    The cache is batched over every engine row; a forward over only the rows that have work this step
    hands it full-batch tensors in which the other rows are padding (position -1: never written, never
    visible) and gets back its own rows. Idle rows, and rows waiting for another phase of the step,
    cost no model compute.
    """

    def __init__(self, cache: HybridKVCache, rows: list[int]) -> None:
        self.cache = cache
        self.rows = torch.tensor(rows, dtype=torch.long, device=cache.device)

    def update(
        self, layer_key: str, k: Tensor, v: Tensor, position_ids: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        B = self.cache.batch_size
        full_k = k.new_zeros((B, *k.shape[1:]))  # (B, Hkv, T, Dqk)
        full_v = v.new_zeros((B, *v.shape[1:]))  # (B, Hkv, T, Dv)
        full_pos = position_ids.new_full((B, position_ids.shape[1]), -1)  # (B, T)
        full_k[self.rows], full_v[self.rows], full_pos[self.rows] = k, v, position_ids
        k_all, v_all, k_pos = self.cache.update(layer_key, full_k, full_v, full_pos)
        return k_all[self.rows], v_all[self.rows], k_pos[self.rows]


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class DecodeEngine:
    """Batched decoding with optional MTP speculation; one KV-cache row per running request.

    Each ``step()`` runs the decoding rows (D draft forwards, one verify forward) and then the rows
    still reading their prompt (one forward over the next prompt chunk, plus one catch-up forward per
    MTP block), each forward over only the rows it concerns. A prompt is read ``prefill_chunk`` tokens
    per step while no row decodes, and at most ``interleaved_prefill_chunk`` tokens per step (over all
    prefilling rows, shortest remainder first) while some do, so a long prompt never holds up the
    tokens of requests already decoding by more than one small chunk's forward per step.

    A row whose forward or sampling raises (NaN logits, an allocation failure) ends alone with an
    error event: a batched forward that raises is retried row by row, the rows that still fail end,
    and the cache slots they wrote are zeroed before the row is reused.

    ``record_rollout`` makes the engine a rollout sampler for on-policy training: events carry each
    token's behaviour log-probability and, on a request's last event, the experts every position was
    routed to (for Rollout Routing Replay).

    ``compile`` keeps the cache in a ``StaticKVCache`` and runs every decode-shaped forward (verify,
    and each MTP block's draft) over all rows and D + 1 positions, padded with position -1, through
    ``torch.compile(fullgraph=True)`` (``compile_mode`` and ``compile_backend`` passed through;
    ``"reduce-overhead"`` for CUDA graphs): one graph for the verify and one per MTP block, whatever
    the rows, lengths and acceptances. Prompts are read eagerly. Tokens are the eager engine's.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        max_batch: int = 1,
        max_len: int | None = None,
        speculative_depth: int = 0,
        tokenizer: Tokenizer | None = None,
        prefill_chunk: int = 256,
        interleaved_prefill_chunk: int = _INTERLEAVED_PREFILL_CHUNK,
        record_rollout: bool = False,
        compile: bool = False,
        compile_mode: str | None = None,
        compile_backend: str | Callable[..., Any] = "inductor",
    ) -> None:
        spec = model.spec
        check_speculative_depth(spec, speculative_depth)
        if prefill_chunk < 1 or interleaved_prefill_chunk < 1:
            raise ValueError("prefill_chunk and interleaved_prefill_chunk must be at least 1")
        self.model = model
        self.spec = spec
        self.depth = speculative_depth
        self.tokenizer = tokenizer
        self.eos_id = getattr(tokenizer, "eos_id", None)
        self.max_len = max_len or spec.model.max_position_embeddings
        self.prefill_chunk = prefill_chunk
        self.interleaved_prefill_chunk = interleaved_prefill_chunk
        self.record_rollout = record_rollout
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        # A verify step writes up to D positions past the last kept one.
        self.cache = (StaticKVCache if compile else HybridKVCache)(
            model,
            max_batch,
            self.max_len + self.depth + 1,
            device=self.device,
            dtype=self.dtype,
            speculative_depth=self.depth,
            mtp_blocks=self.depth,
        )
        self.main_keys = [k for k in self.cache.keys if not k.startswith("model.mtp.")]
        # One compiled function per model part (0: main, k: MTP block k), so k is never a traced input.
        self._compiled: dict[int, Callable[..., tuple[Tensor, Tensor]]] = {}
        if compile:
            options: dict[str, Any] = {"fullgraph": True, "mode": compile_mode, "backend": compile_backend}
            for k in range(self.depth + 1):
                self._compiled[k] = torch.compile(functools.partial(self._fixed_forward, k), **options)
        self.rows: list[_Seq | None] = [None] * max_batch
        self._next_id = 0
        self._failed: list[_Seq] = []  # failed during this step: reported, then their rows wiped

    # -- admission ------------------------------------------------------------------------------
    @property
    def free_rows(self) -> int:
        return sum(s is None for s in self.rows)

    @property
    def active(self) -> list[_Seq]:
        return [s for s in self.rows if s is not None]

    def add(self, prompt: Sequence[int], params: SamplingParams) -> int:
        """Start a request in a free row; returns its id. The prompt must leave room for max_tokens."""
        if not prompt:
            raise ValueError("the prompt must hold at least one token")
        if len(prompt) + params.max_tokens > self.max_len:
            raise ValueError(
                f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds the context "
                f"of {self.max_len} tokens"
            )
        row = next((i for i, s in enumerate(self.rows) if s is None), None)
        if row is None:
            raise RuntimeError("no free row; check free_rows before add()")
        gen = seeded_generator(params.seed)
        seq = _Seq(
            rid=self._next_id,
            row=row,
            prompt=list(prompt),
            params=params,
            generator=gen,
            text=_TextState(self.tokenizer, params.stop),
            stats=RequestStats(prompt_tokens=len(prompt)),
            tokens=list(prompt),
            mtp_len=[0] * self.depth,
            hidden=[self._empty_hidden() for _ in range(self.depth)],
            prompt_logprobs=None if params.prompt_logprobs is None else [None],
        )
        self._next_id += 1
        self.cache.reset([row])
        self.rows[row] = seq
        if params.max_tokens == 0 and params.prompt_logprobs is None:
            self._finish(seq, "length")  # nothing to compute
        return seq.rid

    def cancel(self, rid: int) -> None:
        for i, s in enumerate(self.rows):
            if s is not None and s.rid == rid:
                self.rows[i] = None

    def abort(self, error: BaseException) -> list[Event]:
        """End every running request with ``error`` (the engine itself failed) and empty their rows."""
        for s in self.active:
            self._fail(s, error)
        try:
            return self._report_failures()
        except Exception:  # noqa: BLE001 - even zeroing the cache failed: free the rows regardless
            events = [Event(s.rid, [], "", True, "error", s.stats, error=s.error) for s in self._failed]
            self.rows = [None] * len(self.rows)
            self._failed = []
            self.cache.reset()
            return events

    def _empty_hidden(self) -> Tensor:
        return torch.empty(0, self.spec.model.hidden_size, device=self.device, dtype=self.dtype)

    def _finish(self, seq: _Seq, reason: str) -> None:
        seq.finished = True
        seq.finish_reason = reason
        seq.stats.finished_at = time.perf_counter()

    # -- one step -------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[Event]:
        """Advance every running request by one step; returns what each produced."""
        events: list[Event] = []
        for s in self.active:
            if s.finished:  # requests finished at admission (max_tokens 0)
                events.append(self._event(s, [], s.text.flush()))
                self.rows[s.row] = None
        decoding = [s for s in self.active if s.decoding]
        plan = self._prefill_plan([s for s in self.active if not s.decoding], bool(decoding))
        if decoding:
            events += self._decode(decoding)
        if plan:
            events += self._prefill(plan)
        for s in self.active:
            if s.finished:
                self.rows[s.row] = None
        return events + self._report_failures()

    def _prefill_plan(self, prefilling: list[_Seq], decoding: bool) -> dict[_Seq, int]:
        """Prompt tokens each prefilling row reads this step."""
        if not decoding:
            return {s: min(len(s.prompt) - s.main_len, self.prefill_chunk) for s in prefilling}
        budget, plan = self.interleaved_prefill_chunk, {}
        for s in sorted(prefilling, key=lambda s: (len(s.prompt) - s.main_len, s.rid)):
            n = min(len(s.prompt) - s.main_len, budget)
            if n <= 0:
                break
            plan[s] = n
            budget -= n
        return plan

    # -- isolation ------------------------------------------------------------------------------
    def _isolated(
        self, inputs: dict[_Seq, Any], run: Callable[[dict[_Seq, Any]], dict[int, _T]]
    ) -> dict[int, _T]:
        """``run(inputs)`` for all rows at once; if that raises, for each row alone, so only failing rows fail.

        ``run`` returns per-request results keyed by rid and changes no request state, so a retry
        repeats it exactly (it rewrites the same cache positions).
        """
        if not inputs:
            return {}
        try:
            return run(inputs)
        except Exception as e:  # noqa: BLE001 - any failure is confined to the rows it comes from
            if len(inputs) == 1:
                self._fail(next(iter(inputs)), e)
                return {}
        out: dict[int, _T] = {}
        for s, x in inputs.items():
            out.update(self._isolated({s: x}, run))
        return out

    def _guard(self, s: _Seq, fn: Callable[..., _T], *args: Any) -> _T | None:
        """``fn(s, *args)``, or None after failing request ``s`` alone if it raises."""
        try:
            return fn(s, *args)
        except Exception as e:  # noqa: BLE001 - a request's own failure ends that request only
            self._fail(s, e)
            return None

    def _fail(self, s: _Seq, error: BaseException) -> None:
        if s.finished:
            return
        self._finish(s, "error")
        s.error = _one_line(error)
        self._failed.append(s)

    def _report_failures(self) -> list[Event]:
        events = []
        for s in self._failed:
            if self.rows[s.row] is s:
                self.rows[s.row] = None
            self._wipe(s.row, s.written)
            events.append(Event(s.rid, [], "", True, "error", s.stats, error=s.error))
        self._failed = []
        return events

    def _wipe(self, row: int, upto: int) -> None:
        """Zero every cache slot of ``row`` that positions < ``upto`` map to, then empty the row.

        A failed request may have left NaN keys or values: attention gives a masked slot weight 0, but
        0 * NaN is NaN, so the row's next request would read them.
        """
        if upto > 0:
            view = _RowView(self.cache, [row])
            for lay in self.cache.layouts:
                first = max(0, upto - lay.slots) if lay.is_ring else 0
                n = min(upto, lay.slots) if lay.is_ring else upto
                shape = (1, lay.num_kv_heads, n)
                k = torch.zeros(*shape, lay.qk_head_dim, device=self.device, dtype=self.dtype)
                v = torch.zeros(*shape, lay.v_head_dim, device=self.device, dtype=self.dtype)
                pos = torch.arange(first, first + n, device=self.device)[None]
                view.update(lay.key, k, v, pos)
        self.cache.reset([row])

    # -- forwards over a subset of rows ---------------------------------------------------------
    def _view(self, rows: list[int]) -> HybridKVCache | _RowView:
        return self.cache if rows == list(range(len(self.rows))) else _RowView(self.cache, rows)

    def _pad(self, inputs: list[tuple[list[int], int]]) -> tuple[Tensor, Tensor]:
        """[(ids, first position)] -> input_ids, position_ids (b, T), padding at position -1."""
        T = max(len(ids) for ids, _ in inputs)
        ids = torch.zeros(len(inputs), T, dtype=torch.long)
        pos = torch.full((len(inputs), T), -1, dtype=torch.long)
        for r, (toks, start) in enumerate(inputs):
            ids[r, : len(toks)] = torch.tensor(toks, dtype=torch.long)
            pos[r, : len(toks)] = torch.arange(start, start + len(toks))
        return ids.to(self.device), pos.to(self.device)

    def _fixed_forward(
        self, k: int, ids: Tensor, pos: Tensor, hidden: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """Main model (k = 0) or MTP block k over every row -> (logits, hidden); what ``compile`` compiles."""
        if k == 0:
            out = self.model(ids, position_ids=pos, cache=self.cache)
            return out.logits, out.hidden
        assert hidden is not None
        h_k, logits = self.model.mtp_forward(k, hidden, ids, pos, self.cache)
        return logits, h_k

    def _fixed_shape(
        self, k: int, seqs: list[_Seq], ids: Tensor, pos: Tensor, hidden: Tensor | None
    ) -> tuple[Tensor, Tensor] | None:
        """With ``compile``, a decode-shaped forward (at most D + 1 tokens per row) padded to every row and
        D + 1 positions; None for a prompt chunk or without ``compile``."""
        T = self.depth + 1
        if not self._compiled or ids.shape[1] > T or self.record_rollout:
            return None
        B = len(self.rows)
        rows = torch.tensor([s.row for s in seqs], device=self.device)
        full_ids = torch.zeros(B, T, dtype=torch.long, device=self.device)
        full_pos = torch.full((B, T), -1, dtype=torch.long, device=self.device)
        full_ids[rows, : ids.shape[1]], full_pos[rows, : ids.shape[1]] = ids, pos
        full_h = None
        if hidden is not None:
            full_h = hidden.new_zeros(B, T, hidden.shape[-1])
            full_h[rows, : ids.shape[1]] = hidden
        logits, h = self._compiled[k](full_ids, full_pos, full_h)
        return logits[rows], h[rows]

    def _forward(self, inputs: dict[_Seq, tuple[list[int], int]]) -> dict[int, tuple[Tensor, Tensor]]:
        """Main model over {seq: (ids, first position)} -> {rid: (logits (n, V), hidden (n, H))}."""
        seqs = sorted(inputs, key=lambda s: s.row)
        for s in seqs:
            ids, start = inputs[s]
            s.written = max(s.written, start + len(ids))
        ids, pos = self._pad([inputs[s] for s in seqs])
        fixed = self._fixed_shape(0, seqs, ids, pos, None)
        if fixed is not None:
            n = {s: len(inputs[s][0]) for s in seqs}
            return {s.rid: (fixed[0][i, : n[s]], fixed[1][i, : n[s]]) for i, s in enumerate(seqs)}
        extra = {"return_routes": True} if self.record_rollout else {}
        out = self.model(ids, position_ids=pos, cache=self._view([s.row for s in seqs]), **extra)
        if self.record_rollout:
            for i, s in enumerate(seqs):
                s.pending_routes = out.routes[i, : len(inputs[s][0])].cpu()
        return {
            s.rid: (out.logits[i, : len(inputs[s][0])], out.hidden[i, : len(inputs[s][0])])
            for i, s in enumerate(seqs)
        }

    def _mtp_forward(
        self, k: int, inputs: dict[_Seq, tuple[list[int], int, Tensor]]
    ) -> dict[int, tuple[Tensor, Tensor]]:
        """MTP block k over {seq: (ids x_(p+k), first position p, h^(k-1) (n, H))} -> {rid: (h^k, logits)}."""
        seqs = sorted(inputs, key=lambda s: s.row)
        ids, pos = self._pad([inputs[s][:2] for s in seqs])
        hid = torch.zeros(
            len(seqs), ids.shape[1], self.spec.model.hidden_size, device=self.device, dtype=self.dtype
        )
        for i, s in enumerate(seqs):
            h = inputs[s][2]
            hid[i, : h.shape[0]] = h
        fixed = self._fixed_shape(k, seqs, ids, pos, hid)
        if fixed is not None:
            logits, h_k = fixed
        else:
            h_k, logits = self.model.mtp_forward(k, hid, ids, pos, self._view([s.row for s in seqs]))
        return {
            s.rid: (h_k[i, : len(inputs[s][0])], logits[i, : len(inputs[s][0])]) for i, s in enumerate(seqs)
        }

    # -- prefill ---------------------------------------------------------------------------------
    def _prefill(self, plan: dict[_Seq, int]) -> list[Event]:
        inputs = {s: (s.prompt[s.main_len : s.main_len + n], s.main_len) for s, n in plan.items()}
        outs = self._isolated(inputs, self._forward)
        events = []
        for s in plan:
            if s.rid in outs:
                ev = self._guard(s, self._prefilled, *outs[s.rid])
                if ev is not None:
                    events.append(ev)
        if self.depth:
            self._catch_up([s for s in plan if not s.finished])
        return events

    def _prefilled(self, s: _Seq, logits: Tensor, hidden: Tensor) -> Event | None:
        """Record one prompt chunk; at the prompt's end, sample the first token (or finish: max_tokens 0)."""
        start, n, P = s.main_len, logits.shape[0], len(s.prompt)
        if s.prompt_logprobs is not None:
            m = min(n, P - 1 - start)  # position p predicts prompt token p + 1
            s.prompt_logprobs += _logprobs(
                logits[:m], s.prompt[start + 1 : start + 1 + m], s.params.prompt_logprobs
            )
        if self.depth:
            s.hidden[0] = torch.cat([s.hidden[0], hidden])
        if s.pending_routes is not None:
            s.routes.append(s.pending_routes)
        s.main_len += n
        if s.main_len < P:
            return None
        if s.params.max_tokens == 0:
            self._finish(s, "length")
            return self._event(s, [], "")
        token = sample(probs(logits[-1], s.params), s.generator)
        s.tokens.append(token)
        return self._emit(s, [token], logits[-1:])

    def _catch_up(self, seqs: list[_Seq]) -> None:
        """Run each MTP block over the prompt positions whose inputs are now known, chunk by chunk.

        Block k at position p reads x_(p+k), a prompt token while p <= P-1-k, so after the main model
        has read the prompt up to main_len, block k can advance to E_k = min(main_len, P - k). Doing it
        here, a chunk at a time, keeps the first decode step from running every block over the whole
        prompt at once.
        """
        for k in range(1, self.depth + 1):
            ends = {s: min(s.main_len, len(s.prompt) - k) for s in seqs if not s.finished}
            todo = [s for s, end in ends.items() if end > s.mtp_len[k - 1]]
            inputs = {}
            for s in todo:
                start, end = s.mtp_len[k - 1], ends[s]
                inputs[s] = (s.tokens[start + k : end + k], start, s.hidden[k - 1][: end - start])
            outs = self._isolated(inputs, functools.partial(self._mtp_forward, k))
            for s in todo:
                if s.rid in outs:
                    self._guard(s, self._caught_up, k, ends[s], outs[s.rid][0])

    def _caught_up(self, s: _Seq, k: int, end: int, h_k: Tensor) -> None:
        n = end - s.mtp_len[k - 1]
        if k < self.depth:
            s.hidden[k] = torch.cat([s.hidden[k], h_k])
        s.hidden[k - 1] = s.hidden[k - 1][n:]
        s.mtp_len[k - 1] = end

    # -- decode ----------------------------------------------------------------------------------
    def _decode(self, seqs: list[_Seq]) -> list[Event]:
        drafts, draft_probs, block_out = self._draft(seqs) if self.depth else ({}, {}, {})
        seqs = [s for s in seqs if not s.finished]
        inputs = {s: ([s.tokens[s.main_len]] + drafts.get(s.rid, []), s.main_len) for s in seqs}
        outs = self._isolated(inputs, self._forward)
        events = []
        for s in seqs:
            if s.rid not in outs:
                continue
            logits, hidden = outs[s.rid]
            new = self._guard(s, self._verify, logits, hidden, drafts, draft_probs, block_out)
            if new is not None:
                ev = self._guard(s, self._emit, new, logits)
                if ev is not None:
                    events.append(ev)
        self._rollback([s for s in seqs if s.error is None])
        return events

    def _rollback(self, seqs: list[_Seq]) -> None:
        """Forget the rejected drafts' positions of ``seqs`` in the main and MTP caches."""
        big = self.cache.max_len + 1  # other rows: nothing to forget
        main_lengths = torch.full((len(self.rows),), big, dtype=torch.long)
        mtp_lengths = [torch.full((len(self.rows),), big, dtype=torch.long) for _ in range(self.depth)]
        for s in seqs:
            main_lengths[s.row] = s.main_len
            for k in range(self.depth):
                mtp_lengths[k][s.row] = s.mtp_len[k]
        self.cache.rollback(main_lengths, keys=self.main_keys)
        for k in range(self.depth):
            self.cache.rollback(mtp_lengths[k], keys=[f"model.mtp.layers.{k}"])

    def _draft(self, seqs: list[_Seq]) -> tuple[dict[int, list[int]], dict[int, list[Tensor]], dict]:
        """Run MTP blocks 1..D over each decoding sequence; return drafts, their q, and block outputs."""
        drafts: dict[int, list[int]] = {s.rid: [] for s in seqs}
        qs: dict[int, list[Tensor]] = {s.rid: [] for s in seqs}
        block_out: dict[tuple[int, int], Tensor] = {}  # (rid, k) -> h^k for positions mtp_len[k-1] .. N-1
        for k in range(1, self.depth + 1):
            live = [s for s in seqs if not s.finished]
            inputs = {}
            for s in live:
                start, N = s.mtp_len[k - 1], s.main_len
                h = s.hidden[k - 1]  # h^(k-1) at positions start .. N-1, the newest from this round
                if k > 1:
                    h = torch.cat([h, block_out[(s.rid, k - 1)]])
                inputs[s] = ((s.tokens + drafts[s.rid])[start + k : N + k], start, h)
            outs = self._isolated(inputs, functools.partial(self._mtp_forward, k))
            for s in live:
                if s.rid in outs:
                    block_out[(s.rid, k)], logits = outs[s.rid]
                    self._guard(s, self._draft_one, logits[-1], drafts[s.rid], qs[s.rid])
        return drafts, qs, block_out

    def _draft_one(self, s: _Seq, logits: Tensor, drafts: list[int], qs: list[Tensor]) -> None:
        q = probs(logits, s.params)
        qs.append(q)
        drafts.append(sample(q, s.generator))

    def _verify(
        self,
        s: _Seq,
        logits: Tensor,
        hidden: Tensor,
        drafts: dict[int, list[int]],
        draft_probs: dict[int, list[Tensor]],
        block_out: dict[tuple[int, int], Tensor],
    ) -> list[int]:
        N, D = s.main_len, self.depth
        p = probs(logits, s.params)  # (D + 1, V)
        if D:
            d = drafts[s.rid]
            a, nxt = accept_drafts(p, torch.stack(draft_probs[s.rid]), d, s.generator)
            new = d[:a] + [nxt]
        else:
            a, new = 0, [sample(p[0], s.generator)]
        s.stats.decode_steps += 1
        s.stats.drafted += D
        s.stats.accepted += a
        s.tokens.extend(new)
        n_new = N + a + 1
        if s.pending_routes is not None:
            s.routes.append(s.pending_routes[: a + 1])  # the positions of x_N, d_1..d_a stay
        s.main_len = n_new
        if D:
            # h^0 for the accepted inputs x_N, d_1..d_a (positions N..N+a) feeds block 1 next round.
            s.hidden[0] = torch.cat([s.hidden[0], hidden[: a + 1]])
            for k in range(1, D + 1):
                start = s.mtp_len[k - 1]
                keep = min(N, n_new - k)  # block k is right where x_(p+k) was accepted: p <= N'-1-k
                if k < D:
                    s.hidden[k] = torch.cat([s.hidden[k], block_out[(s.rid, k)][: keep - start]])
                s.mtp_len[k - 1] = keep
            for j in range(D):
                # hidden[j] starts at the old mtp_len[j]; drop what block j+1 has now consumed.
                consumed = s.hidden[j].shape[0] - ((n_new if j == 0 else s.mtp_len[j - 1]) - s.mtp_len[j])
                s.hidden[j] = s.hidden[j][consumed:]
        return new

    def _emit(self, s: _Seq, new: list[int], logits: Tensor) -> Event:
        """Report tokens ``new`` (``logits[i]`` is the distribution new[i] was drawn from), cut at a limit."""
        if s.stats.first_token_at is None:
            s.stats.first_token_at = time.perf_counter()
        room = s.params.max_tokens - s.stats.completion_tokens
        reason = None
        if len(new) >= room:
            new, reason = new[:room], "length"
        if self.eos_id is not None and self.eos_id in new:
            new, reason = new[: new.index(self.eos_id)], "stop"
        s.stats.completion_tokens += len(new)
        generated = s.tokens[len(s.prompt) : len(s.prompt) + s.stats.completion_tokens]
        text, stopped = s.text.feed(generated)
        if stopped:
            reason = "stop"
        if reason is not None:
            self._finish(s, reason)
            text += s.text.flush()
        k = s.params.logprobs
        lps = None if k is None else _logprobs(logits[: len(new)], new, k)
        event = self._event(s, new, text, lps)
        if self.record_rollout:
            p = probs(logits[: len(new)].double(), s.params)  # (n, V): what each token was drawn from
            chosen = p.gather(-1, torch.tensor(new, dtype=torch.long, device=p.device)[:, None])[:, 0]
            event.behaviour_logprobs = chosen.log().tolist()
        return event

    def _event(self, s: _Seq, new: list[int], text: str, logprobs: list[TokenLogprob] | None = None) -> Event:
        prompt_lps = None
        if s.prompt_logprobs is not None and (s.decoding or s.finished):
            prompt_lps, s.prompt_logprobs = s.prompt_logprobs, None  # sent once, when the prompt is read
        event = Event(s.rid, new, text, s.finished, s.finish_reason, s.stats, logprobs, prompt_lps)
        if self.record_rollout and s.finished and s.routes:
            event.routes = torch.cat(s.routes)  # (positions read, L, K)
        return event


def _logprobs(logits: Tensor, tokens: Sequence[int], k: int | None) -> list[TokenLogprob]:
    """Log-softmax of the raw ``logits`` (n, V) at ``tokens`` (n,), with the k most likely alternatives."""
    if not len(tokens):
        return []
    cdt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    lp = logits.to(cdt).log_softmax(-1)  # (n, V)
    chosen = lp.gather(-1, torch.tensor(list(tokens), device=lp.device)[:, None])[:, 0].tolist()
    top_v, top_i = lp.topk(k or 0, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
    return [
        TokenLogprob(int(t), c, tuple(zip(ti, tv, strict=True)))
        for t, c, ti, tv in zip(tokens, chosen, top_i.tolist(), top_v.tolist(), strict=True)
    ]


# ---------------------------------------------------------------------------------------------
# The single-process API
# ---------------------------------------------------------------------------------------------


@dataclass
class Completion:
    """A finished request; ``finish_reason`` is "error" (and ``error`` says why) when it failed."""

    text: str
    token_ids: list[int]
    finish_reason: str
    stats: RequestStats
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    error: str | None = None


class Generator:
    """Generate from a model: ``stream`` yields events as tokens come, ``generate`` returns the result.

    ``speculative_depth`` defaults to the spec's ``serving.speculative_depth``; 0 decodes one token
    per main-model forward. Prompts are strings (encoded with ``tokenizer``, byte-level by default) or
    token ids.

    ``compile`` decodes through ``StaticDecoder`` (a static KV cache and one compiled fixed-shape step,
    ``compile_mode`` and ``compile_backend`` passed to ``torch.compile``) every batch it can: greedy, or sampled at depth 0,
    without stop strings or log-probabilities; the others run on the eager engine. One decoder is kept
    per batch size and context (rounded up to ``_STATIC_CONTEXT`` tokens), so later calls reuse its graph.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer | None = None,
        *,
        speculative_depth: int | None = None,
        prefill_chunk: int = 256,
        compile: bool = False,
        compile_mode: str | None = None,
        compile_backend: str | Callable[..., Any] = "inductor",
    ) -> None:
        self.model = model.eval()
        self.spec = model.spec
        self.tokenizer = tokenizer if tokenizer is not None else ByteTokenizer()
        self.speculative_depth = (
            self.spec.serving.speculative_depth if speculative_depth is None else speculative_depth
        )
        self.prefill_chunk = prefill_chunk
        self.compile = compile
        self.compile_mode = compile_mode
        self.compile_backend = compile_backend
        self._decoders: dict[tuple[int, int], StaticDecoder] = {}

    def _static(self, prompts: list[list[int]], params: Sequence[SamplingParams]) -> StaticDecoder | None:
        """The compiled decoder for this batch, or None where it does not apply (see the class doc)."""
        if not self.compile or not prompts:
            return None
        # Sampling draws from one generator for the batch: the engine's per-request streams only for one row.
        sampled_ok = len(params) == 1 and self.speculative_depth == 0
        plain = all(not p.stop and p.logprobs is None and p.prompt_logprobs is None for p in params)
        if not (plain and (all(p.greedy for p in params) or sampled_ok)):
            return None
        need = max(len(p) + sp.max_tokens for p, sp in zip(prompts, params, strict=True))
        limit = self.spec.model.max_position_embeddings
        context = min(-(-need // _STATIC_CONTEXT) * _STATIC_CONTEXT, limit)
        key = (len(prompts), context)
        if key not in self._decoders:
            self._decoders[key] = StaticDecoder(
                self.model,
                batch_size=len(prompts),
                max_len=context,
                speculative_depth=self.speculative_depth,
                compile=True,
                mode=self.compile_mode,
                backend=self.compile_backend,
            )
        return self._decoders[key]

    def _static_stream(
        self, decoder: StaticDecoder, prompts: list[list[int]], params: Sequence[SamplingParams]
    ) -> Iterator[Event]:
        """``StaticDecoder.stream`` as engine events: text, the end-of-sequence token and the stats."""
        gen = seeded_generator(params[0].seed)
        stats = [RequestStats(prompt_tokens=len(p)) for p in prompts]
        texts = [_TextState(self.tokenizer, ()) for _ in prompts]
        done = [sp.max_tokens == 0 for sp in params]
        eos = getattr(self.tokenizer, "eos_id", None)
        sampling = None if params[0].greedy else params[0]
        steps = decoder.stream(prompts, [sp.max_tokens for sp in params], sampling, gen)
        for news in steps:
            for r, new in enumerate(news):
                if done[r] or not new:
                    continue
                st = stats[r]
                if st.first_token_at is None:
                    st.first_token_at = time.perf_counter()
                else:
                    st.decode_steps += 1
                    st.drafted += decoder.depth
                    st.accepted += len(new) - 1
                reason = None
                if eos is not None and eos in new:
                    new, reason = new[: new.index(eos)], "stop"
                st.completion_tokens += len(new)
                text, _ = texts[r].feed_new(new)
                if reason is None and st.completion_tokens >= params[r].max_tokens:
                    reason = "length"
                if reason is not None:
                    done[r], st.finished_at = True, time.perf_counter()
                    text += texts[r].flush()
                yield Event(r, new, text, reason is not None, reason, st)
            if all(done):
                steps.close()  # every row has finished: no more steps
                return
        for r in range(len(prompts)):
            if not done[r]:  # max_tokens 0
                stats[r].finished_at = time.perf_counter()
                yield Event(r, [], "", True, "length", stats[r])

    def _static_batch(
        self, decoder: StaticDecoder, prompts: list[list[int]], params: Sequence[SamplingParams]
    ) -> list[Completion]:
        """The whole batch in one ``StaticDecoder.generate``: tokens read once, text decoded once per row."""
        gen = seeded_generator(params[0].seed)
        started = time.perf_counter()
        sampling = None if params[0].greedy else params[0]
        res = decoder.generate(prompts, [sp.max_tokens for sp in params], sampling, gen)
        first_at = started + res.times.prefill_s
        eos = getattr(self.tokenizer, "eos_id", None)
        out = []
        for r, toks in enumerate(res.token_ids):
            reason = "length"
            if eos is not None and eos in toks:
                toks, reason = toks[: toks.index(eos)], "stop"
            st = RequestStats(len(prompts[r]), len(toks), res.rounds[r], res.rounds[r] * decoder.depth)
            st.accepted, st.started = res.accepted[r], started
            st.first_token_at = first_at if toks else None
            st.finished_at = first_at + res.times.decode_s
            out.append(Completion(self.tokenizer.decode(toks), toks, reason, st))
        return out

    def _ids(self, prompt: str | Sequence[int]) -> list[int]:
        return self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]

    def _engine(self, prompts: list[list[int]], params: list[SamplingParams]) -> DecodeEngine:
        need = max(len(p) + sp.max_tokens for p, sp in zip(prompts, params, strict=True))
        return DecodeEngine(
            self.model,
            max_batch=len(prompts),
            max_len=min(need, self.spec.model.max_position_embeddings),
            speculative_depth=self.speculative_depth,
            tokenizer=self.tokenizer,
            prefill_chunk=self.prefill_chunk,
        )

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None) -> Iterator[Event]:
        """Yield one ``Event`` per step with the new token ids and text; the last has ``finished``."""
        params = params or SamplingParams()
        ids = self._ids(prompt)
        decoder = self._static([ids], [params])
        if decoder is not None:
            yield from self._static_stream(decoder, [ids], [params])
            return
        engine = self._engine([ids], [params])
        engine.add(ids, params)
        while engine.active:
            yield from engine.step()

    def generate(self, prompt: str | Sequence[int], params: SamplingParams | None = None) -> Completion:
        return self.generate_batch([prompt], [params or SamplingParams()])[0]

    def generate_batch(
        self, prompts: Sequence[str | Sequence[int]], params: Sequence[SamplingParams]
    ) -> list[Completion]:
        """Run several requests together, one cache row each (ragged lengths, per-request sampling)."""
        ids = [self._ids(p) for p in prompts]
        decoder = self._static(ids, params)
        if decoder is not None:
            return self._static_batch(decoder, ids, params)
        engine = self._engine(ids, list(params))
        rids = [engine.add(p, sp) for p, sp in zip(ids, params, strict=True)]
        events = _drain(engine)
        out = {r: Completion("", [], "length", RequestStats(0)) for r in rids}
        for r, sp in zip(rids, params, strict=True):
            out[r].logprobs = None if sp.logprobs is None else []
        for ev in events:
            c = out[ev.rid]
            c.token_ids += ev.token_ids
            c.text += ev.text
            if ev.logprobs is not None and c.logprobs is not None:
                c.logprobs += ev.logprobs
            if ev.prompt_logprobs is not None:
                c.prompt_logprobs = ev.prompt_logprobs
            if ev.finished:
                c.finish_reason, c.stats, c.error = ev.finish_reason or "length", ev.stats, ev.error
        return [out[r] for r in rids]


def _drain(engine: DecodeEngine) -> Iterator[Event]:
    while engine.active:
        yield from engine.step()


# ---------------------------------------------------------------------------------------------
# Loading and the CLI
# ---------------------------------------------------------------------------------------------


# Below this hidden size a CPU decode step multiplies matrices too small to split: intra-op threads
# cost more in synchronisation than they save (the tiny spec decodes ~20x slower with 2 threads than
# with 1 on a busy 2-core machine). OMP_NUM_THREADS, when set, wins.
_SINGLE_THREAD_HIDDEN = 1024


def decode_threads(model: nn.Module) -> None:
    import os

    param = next(model.parameters())
    if param.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        if model.spec.model.hidden_size < _SINGLE_THREAD_HIDDEN:
            torch.set_num_threads(1)
