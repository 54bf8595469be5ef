"""Comparison against a float64 reference: one tolerance table, NaN never passes, poisoned outputs.

The error of a result is ``||out - ref|| / max(||ref||, floor)`` in float64 (relative Frobenius norm). The
tolerance depends only on the dtype the kernel ran in, and lives in ``TOLERANCES`` and nowhere else; so do
the element-wise tolerances tests pass to ``torch.testing.assert_close`` (``close(name)``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tolerance:
    """A row of ``TOLERANCES``: ``rtol`` relative, ``atol`` absolute (element-wise rows only)."""

    rtol: float
    atol: float = 0.0


# The one tolerance table of the project.
# - Keyed by a dtype: a kernel computed in that dtype against its float64 reference, as the relative norm
#   error of ``assert_matches_reference`` (``rtol``; ``floor`` is that check's absolute part, per call).
# - Keyed by a name: two implementations of one computation, element by element, for
#   ``torch.testing.assert_close(a, b, **close(name))``.
TOLERANCES: dict[torch.dtype | str, Tolerance] = {
    torch.float64: Tolerance(1e-10),
    torch.float32: Tolerance(1e-4),
    torch.float16: Tolerance(5e-3),
    torch.bfloat16: Tolerance(1e-2),
    # The same operations in the same order (a save/load round trip, a replay, routing decisions): bitwise.
    "exact": Tolerance(0.0, 0.0),
    # One float64 op computed two ways (a rewritten graph, explicit vs implicit positions): a few ulps.
    "float64_op": Tolerance(1e-12, 1e-12),
    # Two float64 formulations of one result (reference vs rewritten or cached math): rounding only.
    "float64": Tolerance(1e-10, 1e-12),
    # One float32 op against another implementation of it (transformers' module, the flash kernel).
    "float32_op": Tolerance(1e-5, 1e-6),
    # Two float32 implementations of one op or one loss (ours vs transformers', fused vs unfused).
    "float32": Tolerance(1e-5, 1e-5),
    # float32 logits through a whole model: reduction orders differ in every layer and the errors add up.
    "float32_model": Tolerance(1e-4, 1e-4),
}


class ReferenceMismatch(AssertionError):
    """A result outside tolerance; ``error`` is its relative error (``inf`` for NaN or a shape mismatch)."""

    def __init__(self, message: str, error: float) -> None:
        super().__init__(message)
        self.error = error


def tolerance(dtype: torch.dtype) -> float:
    """Relative-norm tolerance for results computed in ``dtype``."""
    try:
        return TOLERANCES[dtype].rtol
    except KeyError:
        raise KeyError(f"no tolerance for {dtype}; add it to lmspec.testing.compare.TOLERANCES") from None


def close(name: str) -> dict[str, float]:
    """``rtol`` and ``atol`` of the element-wise row ``name``, as keywords for ``torch.testing.assert_close``."""
    row = TOLERANCES.get(name) if isinstance(name, str) else None
    if row is None:
        names = ", ".join(k for k in TOLERANCES if isinstance(k, str))
        raise KeyError(f"no element-wise tolerance {name!r}; the table has {names}")
    return {"rtol": row.rtol, "atol": row.atol}


def relative_error(out: torch.Tensor, ref: torch.Tensor, *, floor: float = 0.0) -> float:
    """``||out - ref|| / max(||ref||, floor)`` in float64; ``inf`` on NaN/inf in ``out`` or a shape mismatch.

    ``floor`` is for results that vanish by exact cancellation (e.g. dQ when each query sees one key):
    there the absolute error is measured against a unit-scale norm instead of a near-zero one.
    """
    if out.shape != ref.shape:
        return math.inf
    o = out.detach().to(torch.float64)
    r = ref.detach().to(torch.float64)
    if not torch.isfinite(o).all():
        return math.inf
    diff = (o - r).norm().item()
    denom = max(r.norm().item(), floor)
    if denom == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / denom


def assert_matches_reference(
    out: torch.Tensor, ref_fp64: torch.Tensor, dtype: torch.dtype, *, name: str = "output", floor: float = 0.0
) -> float:
    """Raise AssertionError with a readable report unless ``out`` matches the float64 reference.

    Returns the relative error. NaN anywhere in ``out`` (e.g. an element a kernel never wrote into a
    poisoned buffer) fails whatever the tolerance.
    """
    err = relative_error(out, ref_fp64, floor=floor)
    tol = tolerance(dtype)
    if not err <= tol:
        o = out.detach().to(torch.float64)
        r = ref_fp64.detach().to(torch.float64)
        lines = [f"{name}: relative error {err:.3e} > tolerance {tol:.1e} ({dtype})"]
        if o.shape != r.shape:
            lines.append(f"  shape {tuple(o.shape)} != reference {tuple(r.shape)}")
        else:
            nan = (~torch.isfinite(o)).sum().item()
            if nan:
                first = tuple(int(i) for i in (~torch.isfinite(o)).nonzero()[0])
                lines.append(
                    f"  {nan} of {o.numel()} elements are NaN/inf (first at {first}): unwritten or overflow"
                )
            absdiff = torch.where(torch.isfinite(o), (o - r).abs(), torch.full_like(r, math.inf))
            worst = tuple(int(i) for i in torch.unravel_index(absdiff.argmax(), o.shape))
            lines.append(
                f"  worst element {worst}: got {o[worst].item():.6g}, reference {r[worst].item():.6g}"
            )
            lines.append(f"  reference norm {r.norm().item():.4g}, shape {tuple(r.shape)}")
        raise ReferenceMismatch("\n".join(lines), err)
    return err


def _poison_value(dtype: torch.dtype) -> float | int | bool:
    if dtype.is_floating_point or dtype.is_complex:
        return math.nan
    if dtype == torch.bool:
        return True
    return torch.iinfo(dtype).min  # far outside any valid index, so an unwritten index fails loudly


@contextlib.contextmanager
def poisoned_allocations() -> Iterator[None]:
    """Make ``torch.empty``/``torch.empty_like`` return poisoned memory (NaN, or the int minimum) while active.

    Kernel wrappers allocate their outputs with these, so any element a kernel fails to write shows up as
    NaN (or a wild index) in the comparison instead of passing with stale memory that happens to be right.
    """
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(_poison_value(t.dtype)) if t.numel() else t

    def empty_like(*args, **kwargs):
        t = real_empty_like(*args, **kwargs)
        return t.fill_(_poison_value(t.dtype)) if t.numel() else t

    torch.empty, torch.empty_like = empty, empty_like  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real_empty, real_empty_like  # type: ignore[assignment]
