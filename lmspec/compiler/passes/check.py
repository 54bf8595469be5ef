"""Executability check: reject graphs the runtime cannot run, with one clear line naming the field.

Rewrites nothing. It checks, per node: the op is known and some runtime op family implements it
(the compiler keeps its own table, `lmspec.compiler.ops.BACKEND_FAMILIES`, rather than importing the
runtime); RoPE rotates an even number of dims that fit in `qk_head_dim`; attention heads group
evenly (GQA) and a sliding window sees at least one key; routing picks at most `num_experts`; every
shape agrees with its rule (so a hand-edited or mis-lowered hidden size is caught even when the
`shapes` pass was skipped, in which case shapes are inferred here); and nothing computes a value
no loss depends on. The spec schema already rejects most of these at load time; this pass is the
last line for graphs built or rewritten by code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import networkx as nx

from lmspec.compiler.graph import Graph
from lmspec.compiler.ops import BACKEND_FAMILIES, OPS
from lmspec.compiler.passes.shapes import node_shape
from lmspec.errors import CompileError

if TYPE_CHECKING:
    from lmspec.compiler.passes import PassContext

_OUTPUTS = ("cross_entropy", "lm_head_ce")


def check(graph: Graph, ctx: PassContext) -> Graph:
    name = graph.spec.name
    shaped = "shapes" in graph.passes
    for n in graph.topo_order():
        d = graph.node(n)
        op, field, attrs = d["op"], d["field"], d["attrs"]

        def fail(message: str, field: str = field, n: str = n) -> None:
            raise CompileError(name, field, f"{n}: {message}")

        if op not in OPS:
            fail(f"unknown op {op!r}; the runtime implements {sorted(OPS)}")
        if OPS[op].family not in BACKEND_FAMILIES:
            fail(
                f"op {op!r} (family {OPS[op].family!r}) has no backend implementation; "
                f"backends implement {sorted(BACKEND_FAMILIES)}"
            )
        if op == "rope":
            if attrs["rope_dim"] > attrs["qk_head_dim"]:
                fail(f"rope_dim {attrs['rope_dim']} exceeds qk_head_dim {attrs['qk_head_dim']}")
            if attrs["rope_dim"] <= 0 or attrs["rope_dim"] % 2:
                fail(f"rope_dim must be even and positive (rotate-half pairs dims), got {attrs['rope_dim']}")
        elif op == "attention":
            if attrs["num_heads"] % attrs["num_kv_heads"]:
                fail(f"num_kv_heads {attrs['num_kv_heads']} must divide num_heads {attrs['num_heads']}")
            wk = attrs["window_keys"]
            if wk is not None and wk < 1:
                fail(f"window_keys must be at least 1, got {wk}")
            if attrs["sink"] and not d["params"]:
                fail("sink: true but the node has no sinks parameter")
        elif op in ("topk", "router", "experts"):
            if attrs["top_k"] > attrs["num_experts"]:
                fail(f"top_k {attrs['top_k']} exceeds num_experts {attrs['num_experts']}")
        want = node_shape(graph, n)
        if shaped and d["shape"] != want:
            fail(f"shape {d['shape']} disagrees with its inputs and weights, which give {want}")
        d["shape"] = want
    outputs = [n for n, op in graph.nx.nodes(data="op") if op in _OUTPUTS]
    live = set(outputs).union(*(nx.ancestors(graph.nx, o) for o in outputs)) if outputs else set()
    dead = [n for n in graph.nx if n not in live]
    if dead:
        raise CompileError(
            name,
            graph.node(dead[0])["field"],
            f"{dead[0]}: computes a value no loss depends on ({len(dead)} such nodes)",
        )
    return graph
