"""Hypothesis strategies for kernel inputs, drawn from a spec's kernel variants (``lmspec.compiler.variants``).

Each strategy draws a small frozen *case* (shapes, spec variant, dtype, seed); ``case.inputs()`` builds the
tensors deterministically from the seed, so a failing example prints as a short, replayable repr.
Sizes stay small by default because the Triton interpreter is slow; odd sizes and sequence lengths around
and across the sliding window are favoured, since that is where masks and block edges go wrong.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from hypothesis import strategies as st

from lmspec.compiler.variants import (
    AttentionVariant,
    DecodeAttentionVariant,
    LMHeadCEVariant,
    MoEVariant,
    RoPEVariant,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(g: torch.Generator, *shape: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _seeds() -> st.SearchStrategy[int]:
    return st.integers(0, 2**31 - 1)


def _dtypes(names: tuple[str, ...]) -> st.SearchStrategy[str]:
    return st.sampled_from(names)


def seq_lengths(
    window_keys: int | None, *, max_small: int = 40, max_seq: int = 160
) -> st.SearchStrategy[int]:
    """Mostly short sequences; otherwise lengths just below, at and past the window (or a block edge)."""
    edges = [1, 2, 15, 16, 17, 31, 32, 33]
    if window_keys:
        edges += [window_keys - 1, window_keys, window_keys + 1, window_keys + 2, 2 * window_keys + 1]
    edges = sorted({t for t in edges if 1 <= t <= max_seq})
    return st.one_of(st.integers(1, max_small), st.sampled_from(edges))


@dataclass(frozen=True)
class AttentionCase:
    variant: AttentionVariant
    batch: int
    kv_heads: int
    group: int
    seq: int
    sink_mean: float
    dtype: str
    seed: int

    def inputs(self) -> dict[str, Any]:
        g = _gen(self.seed)
        dt = DTYPES[self.dtype]
        v = self.variant
        hq = self.kv_heads * self.group
        out: dict[str, Any] = {
            "q": _randn(g, self.batch, hq, self.seq, v.qk_head_dim, dtype=dt),
            "k": _randn(g, self.batch, self.kv_heads, self.seq, v.qk_head_dim, dtype=dt),
            "v": _randn(g, self.batch, self.kv_heads, self.seq, v.v_head_dim, dtype=dt),
            "sinks": _randn(g, hq, dtype=dt) + self.sink_mean if v.sink else None,
        }
        return out


def attention_cases(
    variants: Sequence[AttentionVariant],
    *,
    dtypes: tuple[str, ...] = ("float32",),
    max_batch: int = 2,
    max_kv_heads: int = 2,
    max_group: int = 3,
    max_small: int = 40,
    max_seq: int = 160,
) -> st.SearchStrategy[AttentionCase]:
    """Training-attention cases over the spec's attention variants; sinks from neutral to dominant."""

    @st.composite
    def draw(d: st.DrawFn) -> AttentionCase:
        variant = d(st.sampled_from(variants))
        return AttentionCase(
            variant=variant,
            batch=d(st.integers(1, max_batch)),
            kv_heads=d(st.integers(1, max_kv_heads)),
            group=d(st.integers(1, max_group)),
            seq=d(seq_lengths(variant.window_keys, max_small=max_small, max_seq=max_seq)),
            # Up to 8: with unit-scale logits the sink then holds most of the softmax mass.
            sink_mean=d(st.sampled_from([0.0, 2.0, 5.0, 8.0])),
            dtype=d(_dtypes(dtypes)),
            seed=d(_seeds()),
        )

    return draw()


@dataclass(frozen=True)
class DecodeCase:
    variant: DecodeAttentionVariant
    batch: int
    kv_heads: int
    group: int
    queries: int
    cache_slots: int
    newest: int
    empty_every: int
    num_splits: int
    sink_mean: float
    dtype: str
    seed: int

    def inputs(self) -> dict[str, Any]:
        """A ring-buffer cache: slot s holds position p with p % slots == s, for the last ``slots`` positions."""
        g = _gen(self.seed)
        dt = DTYPES[self.dtype]
        v = self.variant
        hq = self.kv_heads * self.group
        s = self.cache_slots
        pos = torch.arange(self.newest - s + 1, self.newest + 1)  # the positions held, oldest first
        k_pos = torch.full((s,), -1, dtype=torch.int64)
        k_pos[pos.remainder(s)] = pos
        k_pos[k_pos < 0] = -1
        if self.empty_every:
            k_pos[:: self.empty_every] = -1
        q_pos = torch.arange(self.newest - self.queries + 1, self.newest + 1)
        return {
            "q": _randn(g, self.batch, hq, self.queries, v.qk_head_dim, dtype=dt),
            "k": _randn(g, self.batch, self.kv_heads, s, v.qk_head_dim, dtype=dt),
            "v": _randn(g, self.batch, self.kv_heads, s, v.v_head_dim, dtype=dt),
            "sinks": _randn(g, hq, dtype=dt) + self.sink_mean if v.sink else None,
            "q_pos": q_pos.expand(self.batch, -1).clone(),
            "k_pos": k_pos.expand(self.batch, -1).clone(),
        }


def decode_cases(
    variants: Sequence[DecodeAttentionVariant],
    *,
    dtypes: tuple[str, ...] = ("float32",),
    max_slots: int = 140,
) -> st.SearchStrategy[DecodeCase]:
    """Decode / chunked-prefill cases over a ring-buffer cache with empty slots and split-K."""

    @st.composite
    def draw(d: st.DrawFn) -> DecodeCase:
        variant = d(st.sampled_from(variants))
        window = variant.window_keys
        slot_choices = st.integers(1, 40)
        if window:
            slot_choices = st.one_of(
                slot_choices, st.sampled_from([w for w in (window, window + 1) if w <= max_slots])
            )
        slots = d(slot_choices)
        return DecodeCase(
            variant=variant,
            batch=d(st.integers(1, 2)),
            kv_heads=d(st.integers(1, 2)),
            group=d(st.sampled_from([1, 2, 3, 8])),
            queries=d(st.integers(1, 4)),
            cache_slots=slots,
            newest=d(st.integers(0, 3 * slots)),
            empty_every=d(st.sampled_from([0, 0, 3, 7])),
            num_splits=d(st.integers(1, 3)),
            sink_mean=d(st.sampled_from([0.0, 5.0])),
            dtype=d(_dtypes(dtypes)),
            seed=d(_seeds()),
        )

    return draw()


@dataclass(frozen=True)
class RMSNormCase:
    rows: int
    hidden: int
    residual: bool
    dtype: str
    seed: int

    def inputs(self) -> dict[str, Any]:
        g = _gen(self.seed)
        dt = DTYPES[self.dtype]
        return {
            "x": _randn(g, self.rows, self.hidden, dtype=dt),
            "residual": _randn(g, self.rows, self.hidden, dtype=dt) if self.residual else None,
            "weight": _randn(g, self.hidden, dtype=dt),
        }


def rmsnorm_cases(*, dtypes: tuple[str, ...] = ("float32",)) -> st.SearchStrategy[RMSNormCase]:
    return st.builds(
        RMSNormCase,
        rows=st.integers(1, 37),
        hidden=st.one_of(st.integers(1, 130), st.sampled_from([4096])),
        residual=st.booleans(),
        dtype=_dtypes(dtypes),
        seed=_seeds(),
    )


@dataclass(frozen=True)
class SwiGLUCase:
    shape: tuple[int, ...]
    dtype: str
    seed: int

    def inputs(self) -> dict[str, Any]:
        g = _gen(self.seed)
        dt = DTYPES[self.dtype]
        return {"gate": _randn(g, *self.shape, dtype=dt, scale=3.0), "up": _randn(g, *self.shape, dtype=dt)}


def swiglu_cases(*, dtypes: tuple[str, ...] = ("float32",)) -> st.SearchStrategy[SwiGLUCase]:
    shapes = st.lists(st.integers(1, 70), min_size=1, max_size=3).map(tuple)
    return st.builds(SwiGLUCase, shape=shapes, dtype=_dtypes(dtypes), seed=_seeds())


@dataclass(frozen=True)
class RopeCase:
    rope_dim: int
    qk_head_dim: int
    batch: int
    heads: int
    kv_heads: int
    seq: int
    batched_cos: bool
    dtype: str
    seed: int

    def inputs(self) -> dict[str, Any]:
        g = _gen(self.seed)
        dt = DTYPES[self.dtype]
        cos_shape = (self.batch, self.seq, self.rope_dim) if self.batched_cos else (self.seq, self.rope_dim)
        angle = _randn(g, *cos_shape, dtype=torch.float64, scale=3.0)
        return {
            "q": _randn(g, self.batch, self.heads, self.seq, self.qk_head_dim, dtype=dt),
            "k": _randn(g, self.batch, self.kv_heads, self.seq, self.qk_head_dim, dtype=dt),
            "cos": angle.cos().to(dt),
            "sin": angle.sin().to(dt),
        }


def rope_cases(
    variants: Sequence[RoPEVariant], *, dtypes: tuple[str, ...] = ("float32",)
) -> st.SearchStrategy[RopeCase]:
    @st.composite
    def draw(d: st.DrawFn) -> RopeCase:
        v = d(st.sampled_from(variants))
        return RopeCase(
            rope_dim=v.rope_dim,
            qk_head_dim=v.qk_head_dim,
            batch=d(st.integers(1, 2)),
            heads=d(st.integers(1, 4)),
            kv_heads=d(st.integers(1, 2)),
            seq=d(st.integers(1, 33)),
            batched_cos=d(st.booleans()),
            dtype=d(_dtypes(dtypes)),
            seed=d(_seeds()),
        )

    return draw()


@dataclass(frozen=True)
class MoECase:
    moe: MoEVariant
    tokens: int
    hidden: int
    intermediate: int
    bias: bool
    dtype: str
    seed: int

    def inputs(self) -> dict[str, Any]:
        g = _gen(self.seed)
        dt = DTYPES[self.dtype]
        e = self.moe.num_experts
        return {
            "x": _randn(g, self.tokens, self.hidden, dtype=dt),
            "router_weight": _randn(g, e, self.hidden, dtype=torch.float32, scale=self.hidden**-0.5),
            "correction_bias": _randn(g, e, dtype=torch.float32, scale=0.1) if self.bias else None,
            "gate_up_proj": _randn(
                g, e, 2 * self.intermediate, self.hidden, dtype=dt, scale=self.hidden**-0.5
            ),
            "down_proj": _randn(
                g, e, self.hidden, self.intermediate, dtype=dt, scale=self.intermediate**-0.5
            ),
        }


def moe_cases(
    moe: MoEVariant, *, dtypes: tuple[str, ...] = ("float32",), max_tokens: int = 24
) -> st.SearchStrategy[MoECase]:
    return st.builds(
        MoECase,
        moe=st.just(moe),
        tokens=st.integers(1, max_tokens),
        hidden=st.integers(1, 70),
        intermediate=st.integers(1, 40),
        bias=st.booleans(),
        dtype=_dtypes(dtypes),
        seed=_seeds(),
    )


@dataclass(frozen=True)
class CECase:
    vocab_size: int
    tokens: int
    hidden: int
    ignore_every: int
    chunk_size: int
    dtype: str
    seed: int

    def inputs(self) -> dict[str, Any]:
        g = _gen(self.seed)
        dt = DTYPES[self.dtype]
        labels = torch.randint(0, self.vocab_size, (self.tokens,), generator=g)
        if self.ignore_every:
            labels[:: self.ignore_every] = -100
        return {
            "hidden": _randn(g, self.tokens, self.hidden, dtype=dt),
            "weight": _randn(g, self.vocab_size, self.hidden, dtype=dt, scale=self.hidden**-0.5),
            "labels": labels,
        }


def ce_cases(
    variant: LMHeadCEVariant, *, dtypes: tuple[str, ...] = ("float32",), max_tokens: int = 40
) -> st.SearchStrategy[CECase]:
    return st.builds(
        CECase,
        vocab_size=st.just(variant.vocab_size),
        tokens=st.integers(1, max_tokens),
        hidden=st.integers(1, 48),
        ignore_every=st.sampled_from([0, 1, 2, 5]),
        chunk_size=st.sampled_from([1, 3, 4096]),
        dtype=_dtypes(dtypes),
        seed=_seeds(),
    )
