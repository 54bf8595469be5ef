"""Decoding: a batched engine with MTP speculative decoding over the hybrid KV cache, and `lmspec generate`.

``DecodeEngine`` holds up to ``max_batch`` sequences, each in one row of a ``HybridKVCache``. Every
``step()`` runs one batched forward of the main model (prefill chunks and decode rows side by side,
ragged rows padded with position -1), preceded, when speculating, by one batched forward per MTP
block that drafts the next tokens. ``Generator`` wraps it for one or a few requests; the server's
scheduler drives the same engine with continuous batching.

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

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lmspec.runtime.kv_cache import HybridKVCache
from lmspec.runtime.tokenizer import ByteTokenizer, Tokenizer
from lmspec.serve.sampling import SamplingParams, accept_drafts, probs, sample

__all__ = [
    "Completion",
    "DecodeEngine",
    "Event",
    "Generator",
    "RequestStats",
    "decode_threads",
]


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

    def flush(self) -> str:
        delta = self.text[self.emitted :]
        self.emitted = len(self.text)
        return delta


@dataclass
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
    finished: bool = False
    finish_reason: str | None = None

    @property
    def generated(self) -> list[int]:
        return self.tokens[len(self.prompt) :]

    @property
    def decoding(self) -> bool:
        return self.main_len >= len(self.prompt)


@dataclass
class Event:
    """What one step produced for one request."""

    rid: int
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None
    stats: RequestStats


class DecodeEngine:
    """Batched decoding with optional MTP speculation; one KV-cache row per running request."""

    def __init__(
        self,
        model: nn.Module,
        *,
        max_batch: int = 1,
        max_len: int | None = None,
        speculative_depth: int = 0,
        tokenizer: Tokenizer | None = None,
        prefill_chunk: int = 256,
    ) -> None:
        spec = model.spec
        available = spec.model.mtp.num_blocks if spec.model.mtp else 0
        if not 0 <= speculative_depth <= available:
            raise ValueError(
                f"speculative_depth must be in 0..{available} (the model's MTP blocks), got {speculative_depth}"
            )
        self.model = model
        self.spec = spec
        self.depth = speculative_depth
        self.tokenizer = tokenizer
        self.eos_id = getattr(tokenizer, "eos_id", None)
        self.max_len = max_len or spec.model.max_position_embeddings
        self.prefill_chunk = prefill_chunk
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        # A verify step writes up to D positions past the last kept one.
        self.cache = HybridKVCache(
            model,
            max_batch,
            self.max_len + self.depth + 1,
            device=self.device,
            dtype=self.dtype,
            speculative_depth=self.depth,
            mtp_blocks=self.depth,
        )
        self.main_keys = [k for k in self.cache.keys if not k.startswith("model.mtp.")]
        self.rows: list[_Seq | None] = [None] * max_batch
        self._next_id = 0

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
        gen = torch.Generator(device="cpu")
        gen.manual_seed(params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item()))
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
        )
        self._next_id += 1
        self.cache.reset([row])
        self.rows[row] = seq
        if params.max_tokens == 0:
            self._finish(seq, "length")
        return seq.rid

    def cancel(self, rid: int) -> None:
        for i, s in enumerate(self.rows):
            if s is not None and s.rid == rid:
                self.rows[i] = None

    def _empty_hidden(self) -> Tensor:
        return torch.empty(0, self.spec.model.hidden_size, device=self.device, dtype=self.dtype)

    def _finish(self, seq: _Seq, reason: str) -> None:
        seq.finished = True
        seq.finish_reason = reason
        seq.stats.finished_at = time.perf_counter()

    # -- one step -------------------------------------------------------------------------------
    def _pad(self, rows: dict[int, tuple[list[int], int]]) -> tuple[Tensor, Tensor]:
        """{row: (ids, first position)} -> input_ids, position_ids (B, T), padding at position -1."""
        B = len(self.rows)
        T = max(len(ids) for ids, _ in rows.values())
        ids = torch.zeros(B, T, dtype=torch.long)
        pos = torch.full((B, T), -1, dtype=torch.long)
        for r, (toks, start) in rows.items():
            ids[r, : len(toks)] = torch.tensor(toks, dtype=torch.long)
            pos[r, : len(toks)] = torch.arange(start, start + len(toks))
        return ids.to(self.device), pos.to(self.device)

    @torch.inference_mode()
    def step(self) -> list[Event]:
        """Advance every running request by one main-model forward; returns what each produced."""
        events: list[Event] = []
        for s in self.active:
            if s.finished:  # requests finished at admission (max_tokens 0)
                events.append(self._event(s, [], s.text.flush()))
                self.rows[s.row] = None
        running = self.active
        if not running:
            return events
        decode = [s for s in running if s.decoding]
        drafts, draft_probs, block_out = self._draft(decode) if self.depth else ({}, {}, {})

        rows: dict[int, tuple[list[int], int]] = {}
        for s in running:
            if s.decoding:
                rows[s.row] = ([s.tokens[s.main_len]] + drafts.get(s.rid, []), s.main_len)
            else:
                chunk = s.prompt[s.main_len : s.main_len + self.prefill_chunk]
                rows[s.row] = (chunk, s.main_len)
        ids, pos = self._pad(rows)
        out = self.model(ids, position_ids=pos, cache=self.cache)
        logits, hidden = out.logits, out.hidden  # (B, T, V), (B, T, H)

        big = self.cache.max_len + 1
        main_lengths = torch.full((len(self.rows),), big, dtype=torch.long)
        mtp_lengths = [torch.full((len(self.rows),), big, dtype=torch.long) for _ in range(self.depth)]
        for s in running:
            n = len(rows[s.row][0])
            if not s.decoding:
                new = self._prefill_done(s, logits[s.row, :n], hidden[s.row, :n])
            else:
                new = self._verify(s, logits[s.row, :n], hidden[s.row, :n], drafts, draft_probs, block_out)
                for k in range(self.depth):
                    mtp_lengths[k][s.row] = s.mtp_len[k]
            main_lengths[s.row] = s.main_len
            if new:
                events.append(self._emit(s, new))
        self.cache.rollback(main_lengths, keys=self.main_keys)
        for k in range(self.depth):
            self.cache.rollback(mtp_lengths[k], keys=[f"model.mtp.layers.{k}"])
        for s in running:
            if s.finished:
                self.rows[s.row] = None
        return events

    def _draft(self, decode: list[_Seq]) -> tuple[dict[int, list[int]], dict[int, list[Tensor]], dict]:
        """Run MTP blocks 1..D over each decoding sequence; return drafts, their q, and block outputs."""
        drafts: dict[int, list[int]] = {s.rid: [] for s in decode}
        qs: dict[int, list[Tensor]] = {s.rid: [] for s in decode}
        block_out: dict[tuple[int, int], Tensor] = {}  # (rid, k) -> h^k for positions mtp_len[k-1] .. N-1
        if not decode:
            return drafts, qs, block_out
        H = self.spec.model.hidden_size
        for k in range(1, self.depth + 1):
            rows: dict[int, tuple[list[int], int]] = {}
            inputs: dict[int, Tensor] = {}
            for s in decode:
                start, N = s.mtp_len[k - 1], s.main_len
                ext = s.tokens + drafts[s.rid]
                rows[s.row] = (ext[start + k : N + k], start)
                h = s.hidden[k - 1]
                if k > 1:
                    h = torch.cat([h, block_out[(s.rid, k - 1)]])
                inputs[s.row] = h  # (N - start, H): h^(k-1) at positions start .. N-1
            ids, pos = self._pad(rows)
            hid = torch.zeros(len(self.rows), ids.shape[1], H, device=self.device, dtype=self.dtype)
            for r, h in inputs.items():
                hid[r, : h.shape[0]] = h
            h_k, logits = self.model.mtp_forward(k, hid, ids, pos, self.cache)
            for s in decode:
                n = s.main_len - s.mtp_len[k - 1]
                block_out[(s.rid, k)] = h_k[s.row, :n]
                q = probs(logits[s.row, n - 1], s.params)
                qs[s.rid].append(q)
                drafts[s.rid].append(sample(q, s.generator))
        return drafts, qs, block_out

    def _prefill_done(self, s: _Seq, logits: Tensor, hidden: Tensor) -> list[int]:
        n = logits.shape[0]
        if self.depth:
            s.hidden[0] = torch.cat([s.hidden[0], hidden])
        s.main_len += n
        if s.main_len < len(s.prompt):
            return []
        token = sample(probs(logits[-1], s.params), s.generator)
        s.tokens.append(token)
        return [token]

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

    def _emit(self, s: _Seq, new: list[int]) -> Event:
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
        return self._event(s, new, text)

    def _event(self, s: _Seq, new: list[int], text: str) -> Event:
        return Event(s.rid, new, text, s.finished, s.finish_reason, s.stats)


# ---------------------------------------------------------------------------------------------
# The single-process API
# ---------------------------------------------------------------------------------------------


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    stats: RequestStats


class Generator:
    """Generate from a model: ``stream`` yields events as tokens come, ``generate`` returns the result.

    ``speculative_depth`` defaults to the spec's ``serving.speculative_depth``; 0 decodes one token
    per main-model forward. Prompts are strings (encoded with ``tokenizer``, byte-level by default) or
    token ids.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer | None = None,
        *,
        speculative_depth: int | None = None,
        prefill_chunk: int = 256,
    ) -> None:
        self.model = model.eval()
        self.spec = model.spec
        self.tokenizer = tokenizer if tokenizer is not None else ByteTokenizer()
        self.speculative_depth = (
            self.spec.serving.speculative_depth if speculative_depth is None else speculative_depth
        )
        self.prefill_chunk = prefill_chunk

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
        engine = self._engine(ids, list(params))
        rids = [engine.add(p, sp) for p, sp in zip(ids, params, strict=True)]
        tokens: dict[int, list[int]] = {r: [] for r in rids}
        texts: dict[int, str] = {r: "" for r in rids}
        done: dict[int, Event] = {}
        while engine.active:
            for ev in engine.step():
                tokens[ev.rid] += ev.token_ids
                texts[ev.rid] += ev.text
                if ev.finished:
                    done[ev.rid] = ev
        return [
            Completion(texts[r], tokens[r], done[r].finish_reason or "length", done[r].stats) for r in rids
        ]


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
