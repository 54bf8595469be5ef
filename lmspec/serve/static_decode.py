"""Decoding in the style of gpt-fast: a static KV cache and one fixed-shape step per token (or per verify).

``StaticDecoder`` decodes a batch of prompts to a fixed number of new tokens each. The prompts are read by
one eager forward (ragged rows padded with position -1); every later step is one call of a single
function whose tensors never change shape: the whole batch at once, the positions and lengths kept as
device tensors, the KV cache a ``StaticKVCache``. With ``compile=True`` that function is compiled once
(``torch.compile(fullgraph=True)``: inductor on CPU; ``mode="reduce-overhead"`` makes it a CUDA graph on
a GPU) and replayed for every token without a recompile. Nothing is read on the host inside the loop
except what the sampler needs: greedy decoding picks its tokens inside the step, so the host reads the
tokens once at the end (or once per step when streaming).

Speculative decoding with D MTP blocks is one step per round, of one fixed shape: each block k runs
over the D + 1 positions N-1-D..N-1 ending at the last processed one, then the main model verifies
``[x_N, d_1..d_D]`` at positions N..N+D, and the accepted prefix, the bonus token, the new length and the
main model's hidden states are written in place. Re-running a block over the D + 1 latest positions
instead of from its own cache length (the dynamic engine's catch-up) gives each position's entry again
from the same inputs, so the block caches need no rollback and the step no per-row length: a position
leaves the window only once every token it reads is final (see docs/serving.md, "Static decode").
Greedy only when speculating: the accept rule is then exact argmax matching, done inside the step.

Rows that have produced their tokens are frozen (their length stops advancing) until the whole batch is
done, so no row runs past its buffers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lmspec.runtime.kv_cache import StaticKVCache
from lmspec.serve.sampling import SamplingParams, probs, sample

__all__ = ["DecodeTimes", "StaticDecoder", "StaticResult"]


@dataclass
class DecodeTimes:
    """Where a ``StaticDecoder.generate`` spent its time, in seconds (host wall clock)."""

    prefill_s: float = 0.0
    decode_s: float = 0.0  # every step after the prefill, the sampler included
    sampler_s: float = 0.0  # host sampling (0 when greedy: the step picks its tokens)
    steps: int = 0
    compile_s: float = 0.0  # the first compiled call, compile included, when compile=True


@dataclass
class StaticResult:
    """Per row: the new token ids, decode rounds and accepted drafts; ``times`` for the whole batch."""

    token_ids: list[list[int]]
    rounds: list[int]
    accepted: list[int]
    times: DecodeTimes


def check_speculative_depth(spec: Any, depth: int) -> None:
    """ValueError unless ``depth`` is a number of draft blocks the model has (0 .. its MTP blocks)."""
    available = spec.model.mtp.num_blocks if spec.model.mtp else 0
    if not 0 <= depth <= available:
        raise ValueError(f"speculative_depth must be in 0..{available} (the model's MTP blocks), got {depth}")


def seeded_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with ``seed``, or with a fresh random seed when it is None."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
    return gen


class StaticDecoder:
    """Batched decode over a ``StaticKVCache`` with one fixed-shape (optionally compiled) step.

    ``max_len`` bounds prompt + new tokens of every row. ``speculative_depth`` D > 0 drafts with the
    model's first D MTP blocks (greedy only). ``compile`` compiles the step with ``torch.compile``
    (``mode`` and ``backend`` are passed through: ``"reduce-overhead"`` for CUDA graphs). The decoder can be reused
    for any batch of at most ``batch_size`` prompts fitting ``max_len``; a smaller batch is padded.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        batch_size: int,
        max_len: int,
        speculative_depth: int = 0,
        compile: bool = False,
        mode: str | None = None,
        backend: str | Callable[..., Any] = "inductor",
    ) -> None:
        spec = model.spec
        check_speculative_depth(spec, speculative_depth)
        self.model = model.eval()
        self.depth = D = speculative_depth
        self.batch_size = batch_size
        self.max_len = max_len
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        # A frozen row keeps verifying D + 1 positions past its last kept one; the token buffer holds the
        # drafts and bonus token written past the current length.
        context = max_len + 2 * D + 1
        self.cache = StaticKVCache(
            model,
            batch_size,
            context,
            speculative_depth=D,
            mtp_blocks=D,
            device=self.device,
            dtype=self.dtype,
        )
        self.tokens = torch.zeros(batch_size, context + D + 2, dtype=torch.long, device=self.device)
        self.n = torch.zeros(batch_size, dtype=torch.long, device=self.device)  # positions processed
        self.limit = torch.zeros(batch_size, dtype=torch.long, device=self.device)  # frozen once n >= limit
        self.rounds = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self.accepted = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        # h^0 of the last 2(D + 1) positions: a window reads D + 1 of them while a verify writes D + 1 more.
        H = spec.model.hidden_size
        self.h0 = torch.zeros(batch_size, 2 * (D + 1), H, device=self.device, dtype=self.dtype)
        for t in (self.tokens, self.n, self.limit, self.rounds, self.accepted, self.h0):
            torch._dynamo.mark_static_address(t)  # updated in place by the step: CUDA-graph inputs
        step: Callable[..., Any] = self._speculative_step if D else self._greedy_step
        self.compiled = compile
        options: dict[str, Any] = {"fullgraph": True, "mode": mode, "backend": backend}
        self._step = torch.compile(step, **options) if compile else step
        self._logits = torch.compile(self._next_logits, **options) if compile else self._next_logits
        self._compiled_once: set[str] = set()

    # -- the fixed-shape steps (traced by torch.compile) -------------------------------------------
    def _next_logits(self) -> Tensor:
        """Main model over x_N at position N of every row -> logits (B, V) of x_(N+1)."""
        x = self.tokens.gather(1, self.n[:, None])  # (B, 1)
        return self.model(x, position_ids=self.n[:, None], cache=self.cache).logits[:, -1]

    def _advance(self, new: Tensor) -> None:
        """Append token ``new`` (B,) to every row that is not frozen."""
        live = self.n < self.limit
        at = (self.n + 1)[:, None]
        self.tokens.scatter_(1, at, torch.where(live, new, self.tokens.gather(1, at)[:, 0])[:, None])
        self.rounds.add_(live.long())
        self.n.add_(live.long())

    def _greedy_step(self) -> None:
        self._advance(self._next_logits().argmax(-1))

    def _speculative_step(self) -> None:
        """One round at depth D: D draft forwards over the window N-1-D..N-1, one verify over N..N+D."""
        D, n = self.depth, self.n
        B, R, H = self.h0.shape
        ar = torch.arange(D + 1, device=n.device)
        win = n[:, None] - 1 - D + ar  # (B, D + 1) window positions
        win_pos = torch.where(win >= 0, win, torch.full_like(win, -1))
        # Tokens N-1-D .. N (D + 2): block k at window slot i reads token N-1-D+i+k, a draft past N.
        base = self.tokens.gather(1, (n[:, None] - 1 - D + torch.arange(D + 2, device=n.device)).clamp_min(0))
        h = self.h0.gather(1, (win.clamp_min(0) % R)[:, :, None].expand(B, D + 1, H))  # h^0 at the window
        drafts: list[Tensor] = []
        for k in range(1, D + 1):
            ids = torch.cat([base, *(d[:, None] for d in drafts)], dim=1)[:, k : k + D + 1]  # (B, D + 1)
            h, logits = self.model.mtp_forward(k, h, ids, win_pos, self.cache)
            drafts.append(logits[:, -1].argmax(-1))
        d = torch.stack(drafts, dim=1)  # (B, D)
        verify_pos = n[:, None] + ar  # (B, D + 1)
        out = self.model(torch.cat([base[:, -1:], d], dim=1), position_ids=verify_pos, cache=self.cache)
        target = out.logits.argmax(-1)  # (B, D + 1)
        a = (d == target[:, :D]).long().cumprod(dim=1).sum(dim=1)  # (B,) drafts accepted
        # Tokens N+1..N+D+1: d_1..d_a, then the target at a (the correction or the bonus); later ones are
        # overwritten by the next round before anything reads them.
        new = torch.where(ar[None] < a[:, None], torch.cat([d, d[:, :1]], dim=1), target)
        live = n < self.limit
        at = n[:, None] + 1 + ar
        self.tokens.scatter_(1, at, torch.where(live[:, None], new, self.tokens.gather(1, at)))
        self.h0.scatter_(1, (verify_pos % R)[:, :, None].expand(B, D + 1, H), out.hidden)
        self.accepted.add_(torch.where(live, a, torch.zeros_like(a)))
        self.rounds.add_(live.long())
        self.n.add_(torch.where(live, a + 1, torch.zeros_like(a)))

    # -- prefill (eager) -------------------------------------------------------------------------------
    @torch.inference_mode()
    def _prefill(self, prompts: list[list[int]]) -> Tensor:
        """Read every prompt (rows past len(prompts) get a one-token prompt); returns the last logits (B, V)."""
        B = self.batch_size
        lengths = [len(p) for p in prompts] + [1] * (B - len(prompts))
        T = max(lengths)
        ids = torch.zeros(B, T, dtype=torch.long)
        pos = torch.full((B, T), -1, dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, : len(p)] = torch.tensor(p, dtype=torch.long)
        for r, length in enumerate(lengths):
            pos[r, :length] = torch.arange(length)
        ids, pos = ids.to(self.device), pos.to(self.device)
        self.cache.reset()
        self.tokens.zero_()
        self.tokens[:, :T] = ids
        lens = torch.tensor(lengths, device=self.device)
        self.n.copy_(lens - 1)  # the first token is fed like a decode step's x_N: see generate
        out = self.model(ids, position_ids=pos, cache=self.cache)
        last = out.logits[torch.arange(B, device=self.device), lens - 1]  # (B, V)
        if self.depth:
            self._prefill_mtp(out.hidden, ids, pos, lens)
        return last

    def _prefill_mtp(self, hidden: Tensor, ids: Tensor, pos: Tensor, lens: Tensor) -> None:
        """h^0 of the prompts' last positions into the ring; each block over the prompt (catch-up).

        Block k at p reads x_(p+k); past the prompt that token is unknown, but every such position
        (p >= P-k) lies in the first round's window (p >= P-1-D), which rewrites it before any read.
        """
        B, T, H = hidden.shape
        R = self.h0.shape[1]
        for r in range(R):  # positions P-R..P-1 of each row, where they exist
            p = lens - R + r
            ok = p >= 0
            h = hidden[torch.arange(B, device=self.device), p.clamp_min(0)]  # (B, H)
            slot = (p.clamp_min(0) % R)[:, None, None].expand(B, 1, H)
            self.h0.scatter_(1, slot, torch.where(ok[:, None], h, self.h0.gather(1, slot)[:, 0])[:, None])
        h = hidden
        for k in range(1, self.depth + 1):
            nxt = torch.nn.functional.pad(ids, (0, k), value=0)[
                :, k : k + T
            ]  # (B, T): x_(p+k), 0 past the end
            h, _ = self.model.mtp_forward(k, h, nxt, pos, self.cache)

    # -- the loop --------------------------------------------------------------------------------------
    def _call(self, fn: Callable[[], Any], name: str, times: DecodeTimes) -> Any:
        if self.compiled and name not in self._compiled_once:
            t0 = time.perf_counter()
            out = fn()
            times.compile_s += time.perf_counter() - t0
            self._compiled_once.add(name)
            return out
        return fn()

    def _start(self, prompts: Sequence[Sequence[int]], max_tokens: Sequence[int]) -> list[list[int]]:
        if not prompts or len(prompts) > self.batch_size:
            raise ValueError(f"expected 1..{self.batch_size} prompts, got {len(prompts)}")
        rows = [[int(t) for t in p] for p in prompts]
        for p, m in zip(rows, max_tokens, strict=True):
            if not p:
                raise ValueError("every prompt must hold at least one token")
            if len(p) + m > self.max_len:
                raise ValueError(f"prompt ({len(p)} tokens) + {m} new tokens exceeds max_len {self.max_len}")
        return rows

    @torch.inference_mode()
    def stream(
        self,
        prompts: Sequence[Sequence[int]],
        max_tokens: int | Sequence[int],
        params: SamplingParams | None = None,
        generator: torch.Generator | None = None,
    ) -> Iterator[list[list[int]]]:
        """Yield each step's new tokens per row (empty for a row that is done).

        ``params`` other than greedy sample on the host from ``sampling.probs`` (depth 0 only), with
        ``generator``; greedy (the default) picks tokens inside the step.
        """
        yield from self._run(prompts, max_tokens, params, generator, DecodeTimes(), stream=True)

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_tokens: int | Sequence[int],
        params: SamplingParams | None = None,
        generator: torch.Generator | None = None,
    ) -> StaticResult:
        """Decode every prompt to its ``max_tokens`` new tokens; the host reads the tokens once, at the end."""
        times = DecodeTimes()
        for _ in self._run(prompts, max_tokens, params, generator, times, stream=False):
            pass
        return self._result(len(prompts), times)

    def _result(self, rows: int, times: DecodeTimes) -> StaticResult:
        tokens, n, lim = self.tokens.tolist(), self.n.tolist(), self.limit.tolist()
        out = []
        for r in range(rows):
            first = lim[r] - self._max_tokens[r] + 1  # the first new token's index
            out.append(tokens[r][first : min(n[r], lim[r]) + 1])
        return StaticResult(out, self.rounds.tolist()[:rows], self.accepted.tolist()[:rows], times)

    def _run(
        self,
        prompts: Sequence[Sequence[int]],
        max_tokens: int | Sequence[int],
        params: SamplingParams | None,
        generator: torch.Generator | None,
        times: DecodeTimes,
        stream: bool,
    ) -> Iterator[list[list[int]]]:
        m = [max_tokens] * len(prompts) if isinstance(max_tokens, int) else list(max_tokens)
        rows = self._start(prompts, m)
        sampled = params is not None and not params.greedy
        if sampled and self.depth:
            raise ValueError("StaticDecoder speculates greedily only; use DecodeEngine to sample with drafts")
        self._max_tokens = m + [1] * (self.batch_size - len(rows))
        lens = [len(p) for p in rows] + [1] * (self.batch_size - len(rows))
        t0 = time.perf_counter()
        last = self._prefill(rows)
        # n = P - 1 after the prefill: the first new token x_P is appended like any other, from the
        # prefill's logits, then rows stop at n = P + max_tokens - 1.
        self.limit.copy_(torch.tensor([p + k - 1 for p, k in zip(lens, self._max_tokens, strict=True)]))
        self.limit.copy_(torch.maximum(self.limit, self.n))  # max_tokens 0: frozen from the start
        first = self._sample(last, params, generator, times) if sampled else last.argmax(-1)
        self._advance(first)
        self.rounds.zero_()  # rounds count decode steps after the prefill
        self.accepted.zero_()
        times.prefill_s = time.perf_counter() - t0
        if stream:
            yield self._news([lens[r] for r in range(len(rows))], len(rows))
        t1 = time.perf_counter()
        while True:
            # The longest row needs at most its remaining tokens in rounds; speculation ends sooner,
            # so the host checks the lengths every few rounds (one small read), never every token.
            left = int((self.limit - self.n).clamp_min(0).max())
            if left == 0:
                break
            for _ in range(left if not self.depth else max(1, left // (self.depth + 1))):
                before = self.n.clone() if stream else None
                if sampled:
                    logits = self._call(self._logits, "logits", times)
                    self._advance(self._sample(logits, params, generator, times))
                else:
                    self._call(self._step, "step", times)
                times.steps += 1
                if stream:
                    assert before is not None
                    yield self._news(before.add(1).tolist(), len(rows))
        times.decode_s = time.perf_counter() - t1

    def _news(self, starts: list[int], rows: int) -> list[list[int]]:
        """Tokens from ``starts[r]`` to the current length of each row (its new tokens of this step)."""
        n, lim = self.n.tolist(), self.limit.tolist()
        toks = self.tokens[:rows].tolist()
        return [toks[r][starts[r] : min(n[r], lim[r]) + 1] for r in range(rows)]

    def _sample(
        self, logits: Tensor, params: SamplingParams | None, gen: torch.Generator | None, times: DecodeTimes
    ) -> Tensor:
        assert params is not None
        t0 = time.perf_counter()
        p = probs(logits, params)  # (B, V)
        out = torch.tensor([sample(p[r], gen) for r in range(p.shape[0])], device=logits.device)
        times.sampler_s += time.perf_counter() - t0
        return out
