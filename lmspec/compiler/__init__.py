"""Compiler stage: lower a Spec to a graph IR, run passes over it, account and draw it.

`lower(spec) -> Graph`, `run_passes(graph, disable=())`, `verify(graph)`,
`stats_from_graph(graph, context=None) -> dict`. See `graph.py` for the IR and `passes/` for the
pipeline. Nothing here imports torch at import time (`fx_fusion` imports it when called).
"""

from lmspec.compiler.graph import Graph, GraphError, LayerInfo, verify
from lmspec.compiler.lower import PassContext, lower, run_passes
from lmspec.compiler.stats import stats_from_graph

__all__ = [
    "Graph",
    "GraphError",
    "LayerInfo",
    "PassContext",
    "lower",
    "run_passes",
    "stats_from_graph",
    "verify",
]
