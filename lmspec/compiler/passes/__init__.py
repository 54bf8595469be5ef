"""Graph passes: each is `(graph, ctx) -> graph`, named, switchable and logged.

`PIPELINE` lists them in order. `run_passes(graph, disable=("fusion",))` skips by name; a fusion
unit alone is skipped with `fusion.<unit>` (e.g. `fusion.router`). Logger `lmspec.compiler.passes`
logs each pass and its time at INFO and the IR before and after at DEBUG; `LMSPEC_DEBUG=1|2|3` (or
`lmspec -v`) prints them (`lmspec.compiler.debug`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from lmspec.compiler.debug import PLAN_LOGGER, GraphDump, apply_debug_level, describe_plan
from lmspec.compiler.graph import Graph
from lmspec.compiler.ops import FUSED_UNITS
from lmspec.compiler.passes.accounting import accounting
from lmspec.compiler.passes.check import check
from lmspec.compiler.passes.fusion import fusion
from lmspec.compiler.passes.shapes import shapes
from lmspec.compiler.plan import plan_pass

log = logging.getLogger("lmspec.compiler.passes")


@dataclass
class PassContext:
    """What passes may read besides the graph."""

    context: int | None = None  # tokens of context for attention FLOPs; None: max_position_embeddings
    units: tuple[str, ...] = FUSED_UNITS  # fusion units to apply
    timings: dict[str, float] = field(default_factory=dict)  # seconds per pass, filled by run_passes


PassFn = Callable[[Graph, PassContext], Graph]

PASSES: dict[str, PassFn] = {
    "shapes": shapes,
    "check": check,
    "accounting": accounting,
    "fusion": fusion,
    "plan": plan_pass,
}
# `plan` is last: it reads the final graph into the Plan codegen renders (lmspec.compiler.plan).
PIPELINE: tuple[str, ...] = ("shapes", "check", "accounting", "fusion", "plan")


def run_passes(
    graph: Graph,
    disable: Iterable[str] = (),
    *,
    ctx: PassContext | None = None,
    only: Iterable[str] | None = None,
) -> Graph:
    """Run the pipeline (or the passes in `only`, in pipeline order) except those named in `disable`."""
    disable = set(disable)
    units = {f"fusion.{u}" for u in FUSED_UNITS}
    wanted = set(PIPELINE) if only is None else set(only)
    unknown = (disable | wanted) - set(PIPELINE) - units
    if unknown:
        raise ValueError(f"unknown passes {sorted(unknown)}; expected some of {[*PIPELINE, *sorted(units)]}")
    ctx = ctx or PassContext()
    ctx.units = tuple(u for u in ctx.units if f"fusion.{u}" not in disable)
    apply_debug_level()
    dump = GraphDump()
    if log.isEnabledFor(logging.DEBUG):
        log.debug("%s", dump(graph, "before the passes"))
    for name in PIPELINE:
        if name not in wanted or name in disable:
            log.info("pass %s: skipped", name)
            continue
        t0 = time.perf_counter()
        graph = PASSES[name](graph, ctx)
        graph.passes.append(name)
        ctx.timings[name] = time.perf_counter() - t0
        log.info("pass %s: %.1f ms, %d nodes", name, 1e3 * ctx.timings[name], graph.nx.number_of_nodes())
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s", dump(graph, f"after {name}"))
    plan_log = logging.getLogger(PLAN_LOGGER)
    if "plan" in graph.nx.graph and plan_log.isEnabledFor(logging.INFO):
        plan_log.info("%s", describe_plan(graph.nx.graph["plan"]))
    return graph
