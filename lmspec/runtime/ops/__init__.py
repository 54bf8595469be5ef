"""Op backends: one surface, two implementations.

``TorchBackend`` is plain PyTorch (the CPU backend and the reference of every kernel). ``TritonBackend``
runs the kernels rendered for one spec by ``lmspec.codegen.kernels.render_kernels`` and imported from
``kernel_dir``. ``get_backend("triton", kernel_dir=..., overrides={"moe": "torch"})`` mixes them per op family.

On a machine without CUDA the Triton backend runs in the Triton interpreter. It sets ``TRITON_INTERPRET=1``
itself when triton has not been imported yet, and raises a clear error if triton was already imported
without it (triton's own library functions are bound to the mode at import). So either set
``TRITON_INTERPRET=1`` in the environment, or import ``lmspec.runtime.ops.triton_support`` before anything
that imports triton (transformers can). On a GPU the same rendered sources compile unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

from torch import Tensor

from lmspec.runtime.ops.torch_backend import TorchBackend

__all__ = ["OP_FAMILIES", "Backend", "MixedBackend", "TorchBackend", "get_backend"]

# Override keys name a family; each family covers these backend methods.
OP_FAMILIES: dict[str, tuple[str, ...]] = {
    "rmsnorm": ("rmsnorm", "add_rmsnorm"),
    "swiglu": ("swiglu",),
    "rope": ("rope",),
    "attention": ("attention",),
    "moe": ("route", "moe_experts"),
    "lm_head_ce": ("lm_head_ce",),
}


@runtime_checkable
class Backend(Protocol):
    """The op surface the generated model calls. Shapes and semantics are documented on ``TorchBackend``."""

    name: str

    def rmsnorm(self, x: Tensor, weight: Tensor, eps: float) -> Tensor: ...

    def add_rmsnorm(
        self, x: Tensor, residual: Tensor | None, weight: Tensor, eps: float
    ) -> tuple[Tensor, Tensor]: ...

    def swiglu(self, gate: Tensor, up: Tensor) -> Tensor: ...

    def rope(self, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]: ...

    def attention(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        sinks: Tensor | None,
        *,
        scale: float,
        value_scale: float = 1.0,
        window_keys: int | None = None,
        q_pos: Tensor | None = None,
        k_pos: Tensor | None = None,
    ) -> Tensor: ...

    def route(
        self,
        x: Tensor,
        weight: Tensor,
        correction_bias: Tensor | None,
        *,
        top_k: int,
        score_function: str = "sigmoid",
        renormalize: bool = True,
        routed_scaling_factor: float = 1.0,
        num_groups: int = 1,
        top_k_groups: int = 1,
    ) -> tuple[Tensor, Tensor, Tensor]: ...

    def moe_experts(
        self, x: Tensor, topk_weights: Tensor, topk_indices: Tensor, gate_up_proj: Tensor, down_proj: Tensor
    ) -> Tensor: ...

    def lm_head_ce(
        self,
        hidden: Tensor,
        weight: Tensor,
        labels: Tensor,
        *,
        ignore_index: int = -100,
        chunk_size: int = 4096,
    ) -> Tensor: ...


class MixedBackend:
    """Routes each op family to one of several backends (``overrides`` of ``get_backend``)."""

    def __init__(self, default: Backend, by_family: dict[str, Backend]) -> None:
        self.name = default.name + "+" + ",".join(f"{f}={b.name}" for f, b in sorted(by_family.items()))
        self._default = default
        for family, backend in by_family.items():
            for op in OP_FAMILIES[family]:
                setattr(self, op, getattr(backend, op))

    def __getattr__(self, op: str):  # ops without an override come from the default backend
        return getattr(self._default, op)


def _make(name: str, kernel_dir: str | Path | None) -> Backend:
    if name == "torch":
        return TorchBackend()
    if name == "triton":
        if kernel_dir is None:
            raise ValueError("the triton backend needs kernel_dir: the folder written by render_kernels()")
        from lmspec.runtime.ops.triton_backend import TritonBackend

        return TritonBackend(kernel_dir)
    raise ValueError(f"unknown backend {name!r}; expected 'torch' or 'triton'")


def get_backend(
    name: str = "torch", *, kernel_dir: str | Path | None = None, overrides: dict[str, str] | None = None
) -> Backend:
    """Return the backend ``name``; ``overrides`` maps an op family (see ``OP_FAMILIES``) to another backend."""
    default = _make(name, kernel_dir)
    if not overrides:
        return default
    unknown = set(overrides) - set(OP_FAMILIES)
    if unknown:
        raise ValueError(f"unknown op families {sorted(unknown)}; expected some of {sorted(OP_FAMILIES)}")
    cache: dict[str, Backend] = {name: default}
    by_family = {}
    for family, backend_name in overrides.items():
        if backend_name not in cache:
            cache[backend_name] = _make(backend_name, kernel_dir)
        by_family[family] = cache[backend_name]
    return MixedBackend(default, by_family)  # type: ignore[return-value]
