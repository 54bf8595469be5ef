"""Debug levels: `LMSPEC_DEBUG=1|2|3`, or `lmspec -v|-vv|-vvv` (the flag wins over the variable).

| level | printed on stderr, through `logging`                                      | logger, record level             |
|-------|---------------------------------------------------------------------------|----------------------------------|
| 0     | nothing (the default)                                                     |                                  |
| 1     | each pass: its name, time and node count                                  | `lmspec.compiler.passes`, INFO   |
| 2     | also the IR before the passes and after each: op counts and the listing of `lmspec graph` (one layer per block kind, the others collapsed; printed again only when a pass changed it) | `lmspec.compiler.passes`, DEBUG |
| 3     | also the plan summary, and the paths of the files a compile wrote (or of the cache entry it reused) | `lmspec.compiler.plan`, `lmspec.codegen`, INFO |

The records are there whatever the level: an application that configures `logging` itself sees them
at the record levels above. The level only sets up a stderr handler on the `lmspec` logger and the
levels of the three loggers, for everyone who did not. Levels above 3 print what 3 prints.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

from lmspec.errors import UsageError

if TYPE_CHECKING:
    from lmspec.compiler.graph import Graph
    from lmspec.compiler.plan import Plan

__all__ = [
    "ENV",
    "MAX_LEVEL",
    "GraphDump",
    "apply_debug_level",
    "debug_level",
    "describe_plan",
    "log_generated",
    "set_debug_level",
]

ENV = "LMSPEC_DEBUG"
MAX_LEVEL = 3
PASSES_LOGGER = "lmspec.compiler.passes"
PLAN_LOGGER = "lmspec.compiler.plan"
CODEGEN_LOGGER = "lmspec.codegen"

_override: int | None = None  # set by `lmspec -v`; None: the environment decides
_applied = 0  # the level the loggers are configured for


class _Stderr(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record comes (the CLI and pytest may swap it)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("[%(name)s] %(message)s"))

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the property ignores it
        pass


_handler = _Stderr()


def set_debug_level(level: int | None) -> None:
    """Override `LMSPEC_DEBUG` for this process (`lmspec -v` does); `None` hands back to the variable."""
    global _override
    if level is not None and level < 0:
        raise ValueError(f"debug level: expected 0 to {MAX_LEVEL}, got {level}")
    _override = level


def debug_level() -> int:
    """The level in force: the one `set_debug_level` set, else `LMSPEC_DEBUG`, else 0."""
    if _override is not None:
        return min(_override, MAX_LEVEL)
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return 0
    try:
        level = int(raw)
    except ValueError:
        level = -1
    if level < 0:
        raise UsageError(f"{ENV}: expected 0, 1, 2 or 3, got {raw[:40]!r}")
    return min(level, MAX_LEVEL)


def apply_debug_level() -> int:
    """Configure the loggers for the level in force (a no-op when it has not changed); returns it.

    Called where the records start (`run_passes`), so `LMSPEC_DEBUG` works for library users too.
    """
    global _applied
    level = debug_level()
    if level == _applied:
        return level
    top = logging.getLogger("lmspec")
    if level == 0:
        # Undo only what an earlier level set, leaving the application's own logging as it was.
        top.removeHandler(_handler)
        top.propagate = True
        for name in (PASSES_LOGGER, PLAN_LOGGER, CODEGEN_LOGGER):
            logging.getLogger(name).setLevel(logging.NOTSET)
    else:
        if _handler not in top.handlers:
            top.addHandler(_handler)
        top.propagate = False  # printed once, by our handler, even when the root logger has one too
        logging.getLogger(PASSES_LOGGER).setLevel(logging.INFO if level == 1 else logging.DEBUG)
        for name in (PLAN_LOGGER, CODEGEN_LOGGER):
            logging.getLogger(name).setLevel(logging.INFO if level >= 3 else logging.WARNING)
    _applied = level
    return level


class GraphDump:
    """Level 2's view of the IR: op counts, then the `lmspec graph` listing with repeated layers
    collapsed. The listing is printed again only when a pass changed it."""

    def __init__(self) -> None:
        self.last: str | None = None

    def __call__(self, graph: Graph, when: str) -> str:
        from lmspec.compiler.draw import default_expanded, to_text

        counts = ", ".join(f"{op}={n}" for op, n in sorted(graph.op_counts().items()))
        head = f"IR {when}: {graph.nx.number_of_nodes()} nodes: {counts}"
        listing = to_text(graph, default_expanded(graph)).split("\n", 1)[1]  # its header names the passes
        if listing == self.last:
            return f"{head}\n  (listing unchanged)"
        self.last = listing
        return f"{head}\n{listing}"


def describe_plan(plan: Plan) -> str:
    """Level 3's plan summary: the classes, kinds and kernel variants codegen will render."""
    mtp = f", {plan.mtp.num_blocks} MTP blocks of {plan.mtp.block.name}" if plan.mtp is not None else ""
    lines = [
        f"plan of {plan.name} ({plan.class_name}): layers {plan.layers_pattern!r}{mtp}",
        "  attention: "
        + ", ".join(
            f"{a.name} ({a.kind}, window_keys={a.window_keys}, sink={a.sink})" for a in plan.attention
        ),
        "  ffn: " + ", ".join(f"{f.name} ({f.kind})" for f in plan.ffn),
        "  blocks: " + ", ".join(f"{b.name} = {b.attention.name} + {b.ffn.name}" for b in plan.blocks),
        "  fused units: " + (", ".join(plan.fused_units) or "none"),
        f"  kernel variants ({len(plan.kernels)}): " + ", ".join(k.name for k in plan.kernels),
    ]
    return "\n".join(lines)


class Generated(Protocol):
    """What `log_generated` reads of a compiled model (`lmspec.codegen.CompiledModel`)."""

    directory: Path
    cache_hit: bool
    kernel_files: list[Path]

    @property
    def model_path(self) -> Path: ...


G = TypeVar("G", bound=Generated)


def log_generated(compiled: G) -> G:
    """Level 3: the paths of the files this compile wrote, or of the cache entry it reused; returns it."""
    log = logging.getLogger(CODEGEN_LOGGER)
    if log.isEnabledFor(logging.INFO):
        if compiled.cache_hit:
            paths = sorted(p for p in Path(compiled.directory).rglob("*") if p.is_file())
        else:
            paths = sorted([Path(compiled.model_path), *map(Path, compiled.kernel_files)])
        log.info(
            "%s %d generated files in %s:\n%s",
            "reused" if compiled.cache_hit else "wrote",
            len(paths),
            compiled.directory,
            "\n".join(f"  {p}" for p in paths),
        )
    return compiled
