"""The op surface, defined once: ``Backend``, whose every op defaults to the reference.

A backend subclasses ``Backend`` and overrides only the ops it implements itself (``CPUBackend`` overrides
``attention``; ``TritonBackend`` overrides the ops it has kernels for). Signatures, shapes and semantics of
each op are those of the function of the same name in ``lmspec.runtime.ops.reference``; an override keeps
that signature. ``OP_FAMILIES`` groups the ops into the families that ``get_backend(overrides=...)`` names.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, TypedDict

from torch import Tensor

from lmspec.runtime.ops import reference

__all__ = [
    "OP_FAMILIES",
    "OPS",
    "AttentionKeywords",
    "Backend",
    "ReferenceBackend",
    "RouteKeywords",
    "keyword_defaults",
]

# Override keys name a family; each family covers these backend methods.
OP_FAMILIES: dict[str, tuple[str, ...]] = {
    "rmsnorm": ("rmsnorm", "add_rmsnorm"),
    "swiglu": ("swiglu",),
    "rope": ("rope",),
    "attention": ("attention",),
    "moe": ("route", "moe_experts"),
    "lm_head_ce": ("lm_head_ce",),
}

# Every op of the surface, in family order.
OPS: tuple[str, ...] = tuple(op for ops in OP_FAMILIES.values() for op in ops)


class _AttentionScale(TypedDict):
    scale: float


class AttentionKeywords(_AttentionScale, total=False):
    """The keyword arguments of ``attention`` as ``reference.attention`` defines them (``scale`` required).
    An override that only dispatches on them takes ``**kw: Unpack[AttentionKeywords]`` and passes them on."""

    value_scale: float
    window_keys: int | None
    q_pos: Tensor | None
    k_pos: Tensor | None
    segment_ids: Tensor | None


class _RouteTopK(TypedDict):
    top_k: int


class RouteKeywords(_RouteTopK, total=False):
    """The keyword arguments of ``route`` as ``reference.route`` defines them (``top_k`` required)."""

    score_function: str
    renormalize: bool
    routed_scaling_factor: float
    num_groups: int
    top_k_groups: int


@functools.cache
def keyword_defaults(op: Callable[..., Any]) -> Mapping[str, Any]:
    """The defaults of ``op``'s keyword-only parameters: what an override that takes ``**kw`` reads for a
    keyword the call left out, so that each default is written once, in ``reference``."""
    params = inspect.signature(op).parameters.values()
    return MappingProxyType(
        {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY and p.default is not p.empty}
    )


class Backend:
    """The ops a generated model calls, each defaulting to its reference in ``lmspec.runtime.ops.reference``.

    Static methods, so ``backend.attention`` is the plain function and an override may be either a static
    method or an ordinary method with the same parameters after ``self``.
    """

    name: str = "reference"

    rmsnorm = staticmethod(reference.rmsnorm)
    add_rmsnorm = staticmethod(reference.add_rmsnorm)
    swiglu = staticmethod(reference.swiglu)
    rope = staticmethod(reference.rope)
    attention = staticmethod(reference.attention)
    route = staticmethod(reference.route)
    moe_experts = staticmethod(reference.moe_experts)
    lm_head_ce = staticmethod(reference.lm_head_ce)


class WrappedBackend(Backend):
    """``base`` for every op but the ones a subclass defines itself (``wraps``), which fall back to ``base``
    where their inputs are not split: how a parallel layout adds its own ops over any backend."""

    wraps: tuple[str, ...] = ()
    label: str = ""

    def __init__(self, base: Backend) -> None:
        self.base = base
        self.name = f"{base.name}+{self.label}"
        for op in OPS:
            if op not in self.wraps:
                setattr(self, op, getattr(base, op))


class ReferenceBackend(Backend):
    """Every op is the plain reference: exact in float64, the oracle that the other backends are tested on."""

    name = "reference"
