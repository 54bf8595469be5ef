"""Hypothesis strategies for kernel inputs, drawn from a spec's kernel variants (``lmspec.compiler.variants``).

Each strategy draws a small frozen *case* (shapes, spec variant, dtype, seed); ``case.inputs()`` builds the
tensors deterministically from the seed, so a failing example prints as a short, replayable repr.
Sizes stay small by default because the Triton interpreter is slow; odd sizes and sequence lengths around
and across the sliding window are favoured, since that is where masks and block edges go wrong.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

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
T = TypeVar("T", bound="_Case")


class _Random:
    """A case's tensors: drawn one after another from one generator seeded by the case, in its dtype."""

    def __init__(self, seed: int, dtype: str) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.dtype = DTYPES[dtype]

    def __call__(self, *shape: int, scale: float = 1.0, dtype: torch.dtype | None = None) -> torch.Tensor:
        x = torch.randn(*shape, generator=self.generator, dtype=torch.float64) * scale
        return x.to(self.dtype if dtype is None else dtype)


@dataclass(frozen=True, kw_only=True)
class _Case:
    """What every case has: the dtype of its tensors and the seed they are drawn from."""

    dtype: str
    seed: int

    def random(self) -> _Random:
        return _Random(self.seed, self.dtype)


def _cases(case: type[T], dtypes: tuple[str, ...], **fields: st.SearchStrategy[Any]) -> st.SearchStrategy[T]:
    """Cases of type ``case``: each field from its strategy (drawn in order), then a dtype and a seed."""
    return st.builds(case, **fields, dtype=st.sampled_from(dtypes), seed=st.integers(0, 2**31 - 1))


def seq_lengths(
    window_keys: int | None, *, max_small: int = 40, max_seq: int = 160
) -> st.SearchStrategy[int]:
    """Mostly short sequences; otherwise lengths just below, at and past the window (or a block edge)."""
    edges = [1, 2, 15, 16, 17, 31, 32, 33]
    if window_keys:
        edges += [window_keys - 1, window_keys, window_keys + 1, window_keys + 2, 2 * window_keys + 1]
    edges = sorted({t for t in edges if 1 <= t <= max_seq})
    return st.one_of(st.integers(1, max_small), st.sampled_from(edges))


def _attention_inputs(case: AttentionCase | DecodeCase, *, queries: int, keys: int) -> dict[str, Any]:
    """q (B, Hq, queries, Dqk), k and v (B, Hkv, keys, Dqk or Dv), and sinks (Hq,) if the variant has them."""
    r = case.random()
    v = case.variant
    hq = case.kv_heads * case.group
    return {
        "q": r(case.batch, hq, queries, v.qk_head_dim),
        "k": r(case.batch, case.kv_heads, keys, v.qk_head_dim),
        "v": r(case.batch, case.kv_heads, keys, v.v_head_dim),
        "sinks": r(hq) + case.sink_mean if v.sink else None,
    }


@dataclass(frozen=True)
class AttentionCase(_Case):
    variant: AttentionVariant
    batch: int
    kv_heads: int
    group: int
    seq: int
    sink_mean: float

    def inputs(self) -> dict[str, Any]:
        return _attention_inputs(self, queries=self.seq, keys=self.seq)


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

    def of(variant: AttentionVariant) -> st.SearchStrategy[AttentionCase]:
        return _cases(
            AttentionCase,
            dtypes,
            variant=st.just(variant),
            batch=st.integers(1, max_batch),
            kv_heads=st.integers(1, max_kv_heads),
            group=st.integers(1, max_group),
            seq=seq_lengths(variant.window_keys, max_small=max_small, max_seq=max_seq),
            # Up to 8: with unit-scale logits the sink then holds most of the softmax mass.
            sink_mean=st.sampled_from([0.0, 2.0, 5.0, 8.0]),
        )

    return st.sampled_from(variants).flatmap(of)


@dataclass(frozen=True)
class DecodeCase(_Case):
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

    def inputs(self) -> dict[str, Any]:
        """A ring-buffer cache: slot s holds position p with p % slots == s, for the last ``slots`` positions."""
        s = self.cache_slots
        pos = torch.arange(self.newest - s + 1, self.newest + 1)  # the positions held, oldest first
        k_pos = torch.full((s,), -1, dtype=torch.int64)
        k_pos[pos.remainder(s)] = pos
        k_pos[k_pos < 0] = -1
        if self.empty_every:
            k_pos[:: self.empty_every] = -1
        q_pos = torch.arange(self.newest - self.queries + 1, self.newest + 1)
        return {
            **_attention_inputs(self, queries=self.queries, keys=s),
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

    def slot_counts(window: int | None) -> st.SearchStrategy[int]:
        small = st.integers(1, 40)
        if not window:
            return small
        return st.one_of(small, st.sampled_from([w for w in (window, window + 1) if w <= max_slots]))

    def of(variant: DecodeAttentionVariant, slots: int) -> st.SearchStrategy[DecodeCase]:
        return _cases(
            DecodeCase,
            dtypes,
            variant=st.just(variant),
            batch=st.integers(1, 2),
            kv_heads=st.integers(1, 2),
            group=st.sampled_from([1, 2, 3, 8]),
            queries=st.integers(1, 4),
            cache_slots=st.just(slots),
            newest=st.integers(0, 3 * slots),
            empty_every=st.sampled_from([0, 0, 3, 7]),
            num_splits=st.integers(1, 3),
            sink_mean=st.sampled_from([0.0, 5.0]),
        )

    return st.sampled_from(variants).flatmap(
        lambda v: slot_counts(v.window_keys).flatmap(lambda slots: of(v, slots))
    )


@dataclass(frozen=True)
class RMSNormCase(_Case):
    rows: int
    hidden: int
    residual: bool

    def inputs(self) -> dict[str, Any]:
        r = self.random()
        return {
            "x": r(self.rows, self.hidden),
            "residual": r(self.rows, self.hidden) if self.residual else None,
            "weight": r(self.hidden),
        }


def rmsnorm_cases(*, dtypes: tuple[str, ...] = ("float32",)) -> st.SearchStrategy[RMSNormCase]:
    return _cases(
        RMSNormCase,
        dtypes,
        rows=st.integers(1, 37),
        hidden=st.one_of(st.integers(1, 130), st.sampled_from([4096])),
        residual=st.booleans(),
    )


@dataclass(frozen=True)
class SwiGLUCase(_Case):
    shape: tuple[int, ...]

    def inputs(self) -> dict[str, Any]:
        r = self.random()
        return {"gate": r(*self.shape, scale=3.0), "up": r(*self.shape)}


def swiglu_cases(*, dtypes: tuple[str, ...] = ("float32",)) -> st.SearchStrategy[SwiGLUCase]:
    shapes = st.lists(st.integers(1, 70), min_size=1, max_size=3).map(tuple)
    return _cases(SwiGLUCase, dtypes, shape=shapes)


@dataclass(frozen=True)
class RopeCase(_Case):
    variant: RoPEVariant
    batch: int
    heads: int
    kv_heads: int
    seq: int
    batched_cos: bool

    def inputs(self) -> dict[str, Any]:
        r = self.random()
        v = self.variant
        cos_shape = (self.batch, self.seq, v.rope_dim) if self.batched_cos else (self.seq, v.rope_dim)
        angle = r(*cos_shape, dtype=torch.float64, scale=3.0)
        return {
            "q": r(self.batch, self.heads, self.seq, v.qk_head_dim),
            "k": r(self.batch, self.kv_heads, self.seq, v.qk_head_dim),
            "cos": angle.cos().to(r.dtype),
            "sin": angle.sin().to(r.dtype),
        }


def rope_cases(
    variants: Sequence[RoPEVariant], *, dtypes: tuple[str, ...] = ("float32",)
) -> st.SearchStrategy[RopeCase]:
    return _cases(
        RopeCase,
        dtypes,
        variant=st.sampled_from(variants),
        batch=st.integers(1, 2),
        heads=st.integers(1, 4),
        kv_heads=st.integers(1, 2),
        seq=st.integers(1, 33),
        batched_cos=st.booleans(),
    )


@dataclass(frozen=True)
class MoECase(_Case):
    moe: MoEVariant
    tokens: int
    hidden: int
    intermediate: int
    bias: bool

    def inputs(self) -> dict[str, Any]:
        r = self.random()
        e = self.moe.num_experts
        return {
            "x": r(self.tokens, self.hidden),
            "router_weight": r(e, self.hidden, dtype=torch.float32, scale=self.hidden**-0.5),
            "correction_bias": r(e, dtype=torch.float32, scale=0.1) if self.bias else None,
            "gate_up_proj": r(e, 2 * self.intermediate, self.hidden, scale=self.hidden**-0.5),
            "down_proj": r(e, self.hidden, self.intermediate, scale=self.intermediate**-0.5),
        }


def moe_cases(
    moe: MoEVariant, *, dtypes: tuple[str, ...] = ("float32",), max_tokens: int = 24
) -> st.SearchStrategy[MoECase]:
    return _cases(
        MoECase,
        dtypes,
        moe=st.just(moe),
        tokens=st.integers(1, max_tokens),
        hidden=st.integers(1, 70),
        intermediate=st.integers(1, 40),
        bias=st.booleans(),
    )


@dataclass(frozen=True)
class CECase(_Case):
    vocab_size: int
    tokens: int
    hidden: int
    ignore_every: int
    chunk_size: int

    def inputs(self) -> dict[str, Any]:
        r = self.random()
        labels = torch.randint(0, self.vocab_size, (self.tokens,), generator=r.generator)
        if self.ignore_every:
            labels[:: self.ignore_every] = -100
        return {
            "hidden": r(self.tokens, self.hidden),
            "weight": r(self.vocab_size, self.hidden, scale=self.hidden**-0.5),
            "labels": labels,
        }


def ce_cases(
    variant: LMHeadCEVariant, *, dtypes: tuple[str, ...] = ("float32",), max_tokens: int = 40
) -> st.SearchStrategy[CECase]:
    return _cases(
        CECase,
        dtypes,
        vocab_size=st.just(variant.vocab_size),
        tokens=st.integers(1, max_tokens),
        hidden=st.integers(1, 48),
        ignore_every=st.sampled_from([0, 1, 2, 5]),
        chunk_size=st.sampled_from([1, 3, 4096]),
    )
