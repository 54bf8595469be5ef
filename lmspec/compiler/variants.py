"""Kernel variants: the typed, hashable description of every Triton kernel module a model needs.

One frozen dataclass per kernel family. Its fields are the constants the family's template bakes in,
under the spec's own names (``window_keys``, ``sink``, ``qk_head_dim``, ``v_head_dim``, ``value_scale``,
``rope_dim``, ``num_experts``, ``top_k``, ``score_function``, ``eps``, ``vocab_size``); equal constants are
the same kernel, so variants compare and hash by their constants only. ``nodes`` lists the IR node ids a
variant implements (for the generated file's header) and takes no part in equality.

Every variant has:

- ``family``: the kernel family, and ``template``: ``codegen/templates/<template>.py.jinja`` (the family's
  own unless the class says otherwise: ``class X(KernelVariant, family=..., template=..., prefix=...)``);
- ``name``: the module stem, also the kernel-name prefix after ``lmspec_``, unique across families and
  saying what the kernel is (``attn_sliding_sink_w129_qk192_v128_vs0p707``, ``moe_sigmoid_e8_k2``): the
  family's ``prefix`` (its family name unless the class says otherwise), then ``tags()``, joined by ``_``;
- ``key``: ``(family, *constants in field order)``, what the Triton backend computes from a call's
  arguments to find the module in O(1). ``kernels.json`` stores it as a list.

``kernel_variants(graph)`` derives them from the fused graph's nodes and their attributes alone (never
from ``graph.spec``): one per distinct value, in a fixed family order, each family sorted by name.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar, get_args

from lmspec.compiler.graph import Graph, GraphError
from lmspec.spec import MoEFFN

__all__ = [
    "FAMILIES",
    "AttentionVariant",
    "BlockCountAttentionVariant",
    "DecodeAttentionVariant",
    "KernelVariant",
    "LMHeadCEVariant",
    "MoEVariant",
    "RMSNormVariant",
    "RoPEVariant",
    "SwiGLUVariant",
    "from_attrs",
    "kernel_variants",
]

# The schema's own list: a score function added there is accepted here without another edit.
SCORE_FUNCTIONS: tuple[str, ...] = get_args(MoEFFN.model_fields["score_function"].annotation)


def number_tag(x: float) -> str:
    """A float as it may appear in an identifier: ``0.707`` -> ``0p707``, ``1e-05`` -> ``1em05``."""
    return repr(float(x)).replace(".", "p").replace("-", "m").replace("+", "")


@dataclass(frozen=True, kw_only=True)
class KernelVariant:
    """The common surface of every kernel variant (see the module docstring)."""

    family: ClassVar[str]
    template: ClassVar[str]
    prefix: ClassVar[str]
    nodes: tuple[str, ...] = field(default=(), compare=False)

    def __init_subclass__(
        cls, *, family: str | None = None, template: str | None = None, prefix: str | None = None
    ) -> None:
        # A subclass that names no family keeps its parent's (a variant with one more constant).
        super().__init_subclass__()
        if family is not None:
            cls.family, cls.template, cls.prefix = family, template or family, prefix or family

    def tags(self) -> list[str]:
        """The parts of ``name`` after the prefix: each constant that tells this kernel from its siblings."""
        return []

    @property
    def name(self) -> str:
        return "_".join([self.prefix, *self.tags()])

    def constants(self) -> dict[str, Any]:
        """The baked constants, field name -> value, in field order (``nodes`` excluded)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "nodes"}

    @property
    def key(self) -> tuple[Any, ...]:
        return (self.family, *self.constants().values())


@dataclass(frozen=True, kw_only=True)
class AttentionVariant(KernelVariant, family="attention", prefix="attn"):
    """Causal flash attention for training (dense positions, forward and backward).

    ``window_keys``: keys a query sees including itself (None: global); ``sink``: a learnable per-head
    logit in the softmax denominator; ``value_scale``: multiplies V (1.0: no multiply is emitted).
    """

    window_keys: int | None
    sink: bool
    qk_head_dim: int
    v_head_dim: int
    value_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.window_keys is not None and self.window_keys < 1:
            raise ValueError(f"window_keys must be >= 1 or None, got {self.window_keys}")
        if self.qk_head_dim < 1 or self.v_head_dim < 1:
            raise ValueError(f"head dims must be positive, got {self.qk_head_dim}, {self.v_head_dim}")
        object.__setattr__(self, "value_scale", float(self.value_scale))

    @property
    def kind(self) -> str:
        """``sliding`` or ``global``, as the schema says."""
        return "global" if self.window_keys is None else "sliding"

    def tags(self) -> list[str]:
        """What every attention family's name says after its prefix: ``sliding``, ``sink``, ``w129``,
        ``qk192``, ``v128``, ``vs0p707``."""
        parts = [self.kind]
        if self.sink:
            parts.append("sink")
        if self.window_keys is not None:
            parts.append(f"w{self.window_keys}")
        parts += [f"qk{self.qk_head_dim}", f"v{self.v_head_dim}"]
        if self.value_scale != 1.0:
            parts.append(f"vs{number_tag(self.value_scale)}")
        return parts


@dataclass(frozen=True, kw_only=True)
class DecodeAttentionVariant(AttentionVariant, family="decode_attention", prefix="decode"):
    """Forward-only attention at explicit positions (decode, prefill into a KV cache)."""


@dataclass(frozen=True, kw_only=True)
class BlockCountAttentionVariant(
    AttentionVariant, family="attention_block_count", template="attention", prefix="attn_count_blocks"
):
    """The training attention kernel plus ``count_key_blocks``, which counts the key blocks each query
    block visits. A debug instrument for tests of the sliding-window schedule: ``kernel_variants`` never
    produces it, so production kernels carry no counting path."""


@dataclass(frozen=True, kw_only=True)
class MoEVariant(KernelVariant, family="moe"):
    """Fused router (scores, correction bias, top-k, renormalisation, scaling) and grouped SwiGLU experts.

    ``num_groups`` > 1 (group-limited selection) routes through the reference; the experts kernel is the same.
    """

    num_experts: int
    top_k: int
    score_function: str = "sigmoid"
    renormalize: bool = True
    routed_scaling_factor: float = 1.0
    num_groups: int = 1
    top_k_groups: int = 1

    def __post_init__(self) -> None:
        if self.score_function not in SCORE_FUNCTIONS:
            raise ValueError(f"score_function must be one of {SCORE_FUNCTIONS}, got {self.score_function!r}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in 1..num_experts={self.num_experts}, got {self.top_k}")
        object.__setattr__(self, "routed_scaling_factor", float(self.routed_scaling_factor))

    def tags(self) -> list[str]:
        parts = [self.score_function, f"e{self.num_experts}", f"k{self.top_k}"]
        if self.num_groups > 1:
            parts.append(f"g{self.num_groups}k{self.top_k_groups}")
        if not self.renormalize:
            parts.append("raw")
        if self.routed_scaling_factor != 1.0:
            parts.append(f"rs{number_tag(self.routed_scaling_factor)}")
        return parts


@dataclass(frozen=True, kw_only=True)
class RMSNormVariant(KernelVariant, family="rmsnorm"):
    """RMSNorm and the fused residual add + RMSNorm."""

    eps: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "eps", float(self.eps))

    def tags(self) -> list[str]:
        return [f"eps{number_tag(self.eps)}"]


@dataclass(frozen=True, kw_only=True)
class RoPEVariant(KernelVariant, family="rope"):
    """Rotary embedding of the first ``rope_dim`` of ``qk_head_dim`` dims of q and k (rotate-half pairs)."""

    rope_dim: int
    qk_head_dim: int

    def __post_init__(self) -> None:
        if self.rope_dim < 2 or self.rope_dim % 2 or self.rope_dim > self.qk_head_dim:
            raise ValueError(f"rope_dim must be even and in 2..{self.qk_head_dim}, got {self.rope_dim}")

    def tags(self) -> list[str]:
        return [f"r{self.rope_dim}", f"qk{self.qk_head_dim}"]


@dataclass(frozen=True, kw_only=True)
class SwiGLUVariant(KernelVariant, family="swiglu"):
    """``silu(gate) * up``; nothing is baked in."""


@dataclass(frozen=True, kw_only=True)
class LMHeadCEVariant(KernelVariant, family="lm_head_ce"):
    """Chunked LM head + cross-entropy: the (tokens, vocab) logits are never stored."""

    vocab_size: int

    def tags(self) -> list[str]:
        return [f"v{self.vocab_size}"]


# The order kernel_variants returns families in (and kernels.json lists them in).
FAMILIES: tuple[type[KernelVariant], ...] = (
    RMSNormVariant,
    SwiGLUVariant,
    RoPEVariant,
    AttentionVariant,
    DecodeAttentionVariant,
    MoEVariant,
    LMHeadCEVariant,
)


# Which variants each IR op needs. Ops not listed run as plain torch in the generated model: unfused
# gate/up + silu_mul, an unfused router (the experts still run on the backend) and an unfused head + CE.
VARIANTS_OF_OP: dict[str, tuple[type[KernelVariant], ...]] = {
    "rmsnorm": (RMSNormVariant,),
    "add_rmsnorm": (RMSNormVariant,),
    "swiglu": (SwiGLUVariant,),
    "rope": (RoPEVariant,),
    "attention": (AttentionVariant, DecodeAttentionVariant),
    "router": (MoEVariant,),
    "experts": (MoEVariant,),
    "lm_head_ce": (LMHeadCEVariant,),
}


def from_attrs(cls: type[KernelVariant], node_id: str, attrs: dict[str, Any]) -> KernelVariant:
    """The variant ``cls`` of one node: each field is the node attribute of the same name."""
    names = [f.name for f in fields(cls) if f.name != "nodes"]
    missing = [n for n in names if n not in attrs]
    if missing:  # lowering must put every constant on the node: a compiler bug, not a user error
        raise GraphError(f"{node_id}: {cls.__name__} needs node attributes {missing}")
    return cls(**{n: attrs[n] for n in names})


def _natural(node_id: str) -> tuple[Any, ...]:
    """Sort key that puts `model.layers.2` before `model.layers.10` (node ids in headers read in order)."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in node_id.split("."))


def _merge(variants: Iterable[tuple[str, KernelVariant]]) -> tuple[KernelVariant, ...]:
    nodes: dict[KernelVariant, list[str]] = {}
    for node_id, v in variants:
        nodes.setdefault(v, []).append(node_id)
    order = {cls.family: i for i, cls in enumerate(FAMILIES)}
    merged = [replace(v, nodes=tuple(sorted(ids, key=_natural))) for v, ids in nodes.items()]
    return tuple(sorted(merged, key=lambda v: (order[v.family], v.name)))


def kernel_variants(graph: Graph) -> tuple[KernelVariant, ...]:
    """Every kernel variant the fused ``graph`` needs, deduplicated, each with the node ids it implements.

    Reads only node ops and attributes. Two variants with equal constants are one kernel: an attention
    kind used by 40 layers, or two kinds that differ only in head counts, render once. Order: the
    family order of ``FAMILIES``, then name.
    """
    found = (
        (node_id, from_attrs(cls, node_id, d["attrs"]))
        for node_id, d in graph.nx.nodes(data=True)
        for cls in VARIANTS_OF_OP.get(d["op"], ())
    )
    return _merge(found)
