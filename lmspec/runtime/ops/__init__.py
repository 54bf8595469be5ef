"""Op backends: one surface (``Backend``, in ``base.py``), three implementations, chosen by name.

| name          | class              | what runs                                                         |
|---------------|--------------------|-------------------------------------------------------------------|
| ``reference`` | ``ReferenceBackend`` | ``reference.py``: plain math, exact in float64; the tests' oracle |
| ``cpu``       | ``CPUBackend``     | ``cpu.py``: the reference plus fast attention and MoE paths; CPU default |
| ``triton``    | ``TritonBackend``  | ``triton_backend.py``: the kernels rendered for one spec          |

``torch`` is another name for ``cpu`` (what the CLI, run directories and generated models said before the
reference and the fast paths were separate backends). ``get_backend("triton", kernel_dir=...,
overrides={"moe": "cpu"})`` mixes backends per op family (``OP_FAMILIES``).

On a machine without CUDA the Triton backend runs in the Triton interpreter. It sets ``TRITON_INTERPRET=1``
itself when triton has not been imported yet, and raises a clear error if triton was already imported
without it (triton's own library functions are bound to the mode at import). So either set
``TRITON_INTERPRET=1`` in the environment, or import ``lmspec.runtime.ops.triton_support`` before anything
that imports triton (transformers can). On a GPU the same rendered sources compile unchanged.
"""

from __future__ import annotations

from pathlib import Path

from lmspec.runtime.ops.base import OP_FAMILIES, OPS, Backend, ReferenceBackend
from lmspec.runtime.ops.cpu import CPUBackend

__all__ = [
    "BACKENDS",
    "OP_FAMILIES",
    "OPS",
    "Backend",
    "CPUBackend",
    "MixedBackend",
    "ReferenceBackend",
    "get_backend",
]

# Backend names get_backend accepts, and the one each stands for.
BACKENDS: dict[str, str] = {"reference": "reference", "cpu": "cpu", "torch": "cpu", "triton": "triton"}


class MixedBackend(Backend):
    """Routes each op family to one of several backends (``overrides`` of ``get_backend``)."""

    def __init__(self, default: Backend, by_family: dict[str, Backend]) -> None:
        self.name = default.name + "+" + ",".join(f"{f}={b.name}" for f, b in sorted(by_family.items()))
        for family, ops in OP_FAMILIES.items():
            backend = by_family.get(family, default)
            for op in ops:
                setattr(self, op, getattr(backend, op))


def _make(name: str, kernel_dir: str | Path | None) -> Backend:
    if BACKENDS.get(name) == "reference":
        return ReferenceBackend()
    if BACKENDS.get(name) == "cpu":
        return CPUBackend()
    if BACKENDS.get(name) == "triton":
        if kernel_dir is None:
            raise ValueError("the triton backend needs kernel_dir: the folder written by render_kernels()")
        from lmspec.runtime.ops.triton_backend import TritonBackend

        return TritonBackend(kernel_dir)  # type: ignore[return-value]
    raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(repr(b) for b in BACKENDS)}")


def get_backend(
    name: str = "cpu", *, kernel_dir: str | Path | None = None, overrides: dict[str, str] | None = None
) -> Backend:
    """Return the backend ``name`` (see ``BACKENDS``); ``overrides`` maps an op family (``OP_FAMILIES``) to
    another backend's name."""
    default = _make(name, kernel_dir)
    if not overrides:
        return default
    unknown = set(overrides) - set(OP_FAMILIES)
    if unknown:
        raise ValueError(f"unknown op families {sorted(unknown)}; expected some of {sorted(OP_FAMILIES)}")
    made: dict[str, Backend] = {BACKENDS.get(name, name): default}
    by_family = {}
    for family, backend_name in overrides.items():
        key = BACKENDS.get(backend_name, backend_name)
        if key not in made:
            made[key] = _make(backend_name, kernel_dir)
        by_family[family] = made[key]
    return MixedBackend(default, by_family)
