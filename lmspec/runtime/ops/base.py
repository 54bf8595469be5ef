"""The op surface, defined once: ``Backend``, whose every op defaults to the reference.

A backend subclasses ``Backend`` and overrides only the ops it implements itself (``CPUBackend`` overrides
``attention``; ``TritonBackend`` overrides the ops it has kernels for). Signatures, shapes and semantics of
each op are those of the function of the same name in ``lmspec.runtime.ops.reference``; an override keeps
that signature. ``OP_FAMILIES`` groups the ops into the families that ``get_backend(overrides=...)`` names.
"""

from __future__ import annotations

from typing import TypedDict

from torch import Tensor

from lmspec.runtime.ops import reference

__all__ = ["OP_FAMILIES", "OPS", "AttentionOptions", "Backend", "ReferenceBackend"]

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


class AttentionOptions(TypedDict, total=False):
    """The keywords of ``attention`` after ``scale``, as ``reference.attention`` defines them. An override
    that dispatches on them takes ``**kw: Unpack[AttentionOptions]`` and passes them on unchanged."""

    value_scale: float
    window_keys: int | None
    q_pos: Tensor | None
    k_pos: Tensor | None


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


class ReferenceBackend(Backend):
    """Every op is the plain reference: exact in float64, the oracle that the other backends are tested on."""

    name = "reference"
