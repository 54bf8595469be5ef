"""The kernel property suite of one spec: every kernel family against its float64 reference.

``run_kernel_suite(variants, examples)`` renders the spec's kernels, draws ``examples`` Hypothesis cases per
kernel, and returns one ``KernelRow`` per kernel; ``print_kernel_table(rows)`` shows them. It backs
``lmspec test-kernels SPEC [--examples N]``. On a CPU the kernels run in the Triton interpreter.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from lmspec.compiler.variants import (
    AttentionVariant,
    DecodeAttentionVariant,
    KernelVariant,
    LMHeadCEVariant,
    MoEVariant,
    RMSNormVariant,
    RoPEVariant,
    SwiGLUVariant,
)
from lmspec.testing import checks
from lmspec.testing import strategies as S
from lmspec.testing.compare import ReferenceMismatch, tolerance
from lmspec.testing.strategies import DTYPES


@dataclass(frozen=True)
class KernelRow:
    """One kernel's result: examples run, worst relative error, tolerance, and ``pass`` or ``FAIL``."""

    kernel: str
    cases: int
    worst_error: float
    tolerance: float
    verdict: str
    detail: str = ""


def _property(strategy: st.SearchStrategy[Any], check: Callable[[Any], dict[str, float]], examples: int):
    stats: dict[str, Any] = {"cases": 0, "worst": 0.0, "detail": ""}

    # No shrinking: the suite reports the first failing case as drawn; the pytest suite shrinks.
    @settings(
        max_examples=examples,
        database=None,
        deadline=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def prop(case: Any) -> None:
        stats["cases"] += 1
        try:
            errs = check(case)
        except ReferenceMismatch as e:
            stats["worst"] = max(stats["worst"], e.error)
            stats["detail"] = f"{case!r}\n{e}"
            raise
        stats["worst"] = max(stats["worst"], max(errs.values(), default=0.0))

    try:
        prop()
        verdict = "pass"
    except Exception as e:  # a failure of any kind is a FAIL row, not a crash of the whole suite
        verdict = "FAIL"
        if not stats["detail"]:
            stats["detail"] = f"{type(e).__name__}: {e}"
            stats["worst"] = math.inf
    return stats["cases"], stats["worst"], verdict, stats["detail"]


Check = Callable[[Any], dict[str, float]]


def _plan_one(
    v: KernelVariant, backend: Any, dtypes: tuple[str, ...], max_seq: int | None
) -> list[tuple[str, st.SearchStrategy[Any], Check]]:
    """(row name, case strategy, check) for one variant; the MoE variant has two rows, router and experts."""
    name = f"lmspec_{v.name}"
    if isinstance(v, RMSNormVariant):
        return [(name, S.rmsnorm_cases(dtypes=dtypes), lambda c: checks.check_rmsnorm(backend, c, v.eps))]
    if isinstance(v, SwiGLUVariant):
        return [(name, S.swiglu_cases(dtypes=dtypes), lambda c: checks.check_swiglu(backend, c))]
    if isinstance(v, RoPEVariant):
        return [(name, S.rope_cases([v], dtypes=dtypes), lambda c: checks.check_rope(backend, c))]
    if isinstance(v, DecodeAttentionVariant):
        slots = {} if max_seq is None else {"max_slots": max_seq}
        strat = S.decode_cases([v], dtypes=dtypes, **slots)
        return [(name, strat, lambda c: checks.check_decode_attention(backend, c))]
    if type(v) is AttentionVariant:
        seq = {} if max_seq is None else {"max_seq": max_seq, "max_small": min(40, max_seq)}
        strat = S.attention_cases([v], dtypes=dtypes, **seq)
        return [(name, strat, lambda c: checks.check_attention(backend, c))]
    if isinstance(v, MoEVariant):
        strat = S.moe_cases(v, dtypes=dtypes)
        return [
            (f"{name}_route", strat, lambda c: checks.check_moe_route(backend, c)),
            (f"{name}_experts", strat, lambda c: checks.check_moe_experts(backend, c)),
        ]
    if isinstance(v, LMHeadCEVariant):
        return [(name, S.ce_cases(v, dtypes=dtypes), lambda c: checks.check_lm_head_ce(backend, c))]
    return []  # debug variants (block counting) have no reference of their own


def run_kernel_suite(
    variants: Sequence[KernelVariant],
    examples: int = 25,
    *,
    kernel_dir: str | Path | None = None,
    dtypes: tuple[str, ...] = ("float32",),
    only: Callable[[str], bool] | None = None,
    max_seq: int | None = None,
) -> list[KernelRow]:
    """Render ``variants`` and property-test each against its reference; one row per kernel.

    ``variants``: e.g. ``kernel_variants(graph)`` of a spec. ``kernel_dir``: render there (default: a
    temporary folder). ``dtypes``: names from ``lmspec.testing.strategies.DTYPES``; the tolerance of a row
    is the loosest over them. ``only``: a predicate on kernel names to run a subset. ``max_seq``: cap on
    drawn sequence lengths and cache sizes (default: lengths up to 160, around and across the window).
    """
    import torch

    from lmspec.codegen.kernels import render_kernels
    from lmspec.runtime.ops.triton_backend import TritonBackend

    threads = torch.get_num_threads()
    # Cases are tiny: torch threads between interpreted kernels would only contend for cores.
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory(prefix="lmspec-kernels-") as tmp:
            out = Path(kernel_dir) if kernel_dir is not None else Path(tmp)
            render_kernels(variants, out, spec_name="test-kernels")
            backend = TritonBackend(out)
            tol = max(tolerance(DTYPES[d]) for d in dtypes)
            rows = []
            for v in variants:
                for name, strategy, check in _plan_one(v, backend, dtypes, max_seq):
                    if only is not None and not only(name):
                        continue
                    cases, worst, verdict, detail = _property(strategy, check, examples)
                    rows.append(KernelRow(name, cases, worst, tol, verdict, detail))
            return rows
    finally:
        torch.set_num_threads(threads)


def print_kernel_table(rows: list[KernelRow], *, console: Any = None, details: bool = True) -> None:
    """Print the rows as a rich table, then the first failing case of each failed kernel."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title="kernel property suite (relative error vs float64 reference)")
    table.add_column("kernel", overflow="fold")
    table.add_column("cases", justify="right")
    table.add_column("worst error", justify="right")
    table.add_column("tolerance", justify="right")
    table.add_column("verdict")
    for r in rows:
        style = "green" if r.verdict == "pass" else "bold red"
        table.add_row(
            r.kernel, str(r.cases), f"{r.worst_error:.2e}", f"{r.tolerance:.0e}", f"[{style}]{r.verdict}[/]"
        )
    console.print(table)
    if details:
        for r in rows:
            if r.verdict != "pass" and r.detail:
                console.print(f"[bold red]{r.kernel}[/]: {r.detail}", markup=True, highlight=False)
