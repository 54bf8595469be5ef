"""The model-level graph IR: one node per op, with symbolic (batch, seq) shapes and concrete dims.

Public contract used by codegen:
- `Graph.spec`: the validated Spec it was lowered from.
- `Graph.layers`: one `LayerInfo` per decoder layer (index, block, attention kind name, ffn kind name).
- `Graph.mtp_layers`: one `LayerInfo` per MTP block's decoder layer.
- `Graph.fused_units`: names of the fusion units chosen by the fusion pass
  (`add_rmsnorm`, `swiglu`, `router`, `lm_head_ce`), empty before fusion.
- `Graph.nx`: the networkx DiGraph of op nodes.
- `Graph.passes`: names of the passes run so far, in order.

Node attributes (every node):
- `op`: a key of `lmspec.compiler.ops.OPS`.
- `shape`: output shape, a tuple of ints and the symbols "B", "T" (None until the `shapes` pass).
- `dtype`: "float32", "bfloat16" or "int64".
- `path`: the module path in transformers naming (`model.layers.3.self_attn.q_proj`); ops without a
  module of their own carry their owner's path (a residual add carries `model.layers.3`).
- `field`: the spec field path the node came from (`model.attention.swa`, `model.ffn.moe`).
- `params` / `buffers`: full tensor name -> shape (`model.layers.3.self_attn.q_proj.weight`); a
  shared tensor (MTP's embedding and LM head) appears under the same name on every node using it.
- `attrs`: op attributes (`window_keys`, `sink`, `top_k`, ...).
- `scope`: the decoder layer path (`model.layers.3`, `model.mtp.layers.0`) or "model" outside layers.
- `members`: for fused nodes, the ids and ops of the nodes they replaced.
Edges carry `arg` (the input position at the consumer) and `port` (the producer's output index;
only `add_rmsnorm` has two outputs: 0 = normed, 1 = sum, both of the node's shape).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from lmspec.compiler.ops import OPS, Shape
from lmspec.spec import Spec

DTYPES = frozenset({"float32", "bfloat16", "int64"})


@dataclass(frozen=True)
class LayerInfo:
    index: int
    block: str
    attention: str
    ffn: str
    path: str  # e.g. "model.layers.3" — the module path in the generated model


class GraphError(AssertionError):
    """The IR breaks one of its invariants: a compiler bug, not a user error."""


@dataclass
class Graph:
    spec: Spec
    layers: list[LayerInfo]
    mtp_layers: list[LayerInfo]
    nx: nx.DiGraph = field(default_factory=nx.DiGraph)
    fused_units: set[str] = field(default_factory=set)
    passes: list[str] = field(default_factory=list)

    # -- building ---------------------------------------------------------------------------------

    def add_op(
        self,
        node_id: str,
        op: str,
        *,
        inputs: tuple[str, ...] | list[str] = (),
        dtype: str,
        path: str,
        field: str,
        scope: str = "model",
        params: dict[str, Shape] | None = None,
        buffers: dict[str, Shape] | None = None,
        attrs: dict[str, Any] | None = None,
        shape: Shape | None = None,
    ) -> str:
        """Add one op node fed by `inputs` (node ids, in argument order) and return its id."""
        if node_id in self.nx:
            raise GraphError(f"duplicate node id {node_id!r}")
        self.nx.add_node(
            node_id,
            op=op,
            shape=shape,
            dtype=dtype,
            path=path,
            field=field,
            scope=scope,
            params=dict(params or {}),
            buffers=dict(buffers or {}),
            attrs=dict(attrs or {}),
        )
        for arg, src in enumerate(inputs):
            self.nx.add_edge(src, node_id, arg=arg, port=0)
        return node_id

    # -- queries ----------------------------------------------------------------------------------

    def node(self, node_id: str) -> dict[str, Any]:
        return self.nx.nodes[node_id]

    def inputs(self, node_id: str) -> list[str]:
        """Producer ids in argument order."""
        edges = sorted(self.nx.in_edges(node_id, data="arg"), key=lambda e: e[2])
        return [src for src, _, _ in edges]

    def users(self, node_id: str) -> list[str]:
        return list(self.nx.successors(node_id))

    def op_counts(self) -> Counter[str]:
        return Counter(op for _, op in self.nx.nodes(data="op"))

    def nodes_of(self, op: str) -> list[str]:
        return [n for n, o in self.nx.nodes(data="op") if o == op]

    def topo_order(self) -> list[str]:
        return list(nx.topological_sort(self.nx))


def _is_shape(shape: Any) -> bool:
    return isinstance(shape, tuple) and all((isinstance(d, int) and d > 0) or d in ("B", "T") for d in shape)


def verify(graph: Graph) -> None:
    """Check the IR's invariants; raise GraphError listing every violation.

    Every node has a known op, a dtype, a module path and a spec field; once the `shapes` pass has
    run, every node has a well-formed shape; input positions are 0..n-1; the graph is acyclic; fused
    nodes list their members; `fused_units` only names fusion units.
    """
    problems: list[str] = []
    shaped = "shapes" in graph.passes
    g = graph.nx
    for n, d in g.nodes(data=True):
        op = d.get("op")
        if op not in OPS:
            problems.append(f"{n}: unknown op {op!r}")
            continue
        if d.get("dtype") not in DTYPES:
            problems.append(f"{n}: dtype {d.get('dtype')!r} is not one of {sorted(DTYPES)}")
        if not isinstance(d.get("path"), str) or not d["path"]:
            problems.append(f"{n}: no module path")
        if not isinstance(d.get("field"), str) or not d["field"].startswith("model"):
            problems.append(f"{n}: no spec field path (got {d.get('field')!r})")
        if shaped and not _is_shape(d.get("shape")):
            problems.append(f"{n}: bad shape {d.get('shape')!r}")
        args = sorted(a for _, _, a in g.in_edges(n, data="arg"))
        if args != list(range(len(args))):
            problems.append(f"{n}: input positions {args} are not 0..{len(args) - 1}")
        if OPS[op].fused and not d.get("members"):
            problems.append(f"{n}: fused {op} without members")
    if not nx.is_directed_acyclic_graph(g):
        problems.append("graph has a cycle")
    unknown_units = graph.fused_units - {o for o, d in OPS.items() if d.fused}
    if unknown_units:
        problems.append(f"fused_units names unknown units {sorted(unknown_units)}")
    if problems:
        shown = "; ".join(problems[:10]) + (f"; ... {len(problems) - 10} more" if len(problems) > 10 else "")
        raise GraphError(f"graph of {graph.spec.name} after {graph.passes or ['lower']}: {shown}")
