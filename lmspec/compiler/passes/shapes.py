"""Shape inference: give every node its output shape from its inputs, weights and attributes.

Walks the graph in topological order and applies each op's rule from `lmspec.compiler.ops`. This is
where a hidden size that does not line up (a projection whose weight expects other features than
its input carries, heads x head dim that do not fill a projection) is found: the rule's complaint
becomes a `CompileError` naming the node and the spec field it came from. Running it again on a
fused graph re-derives the same shapes through the fused ops' rules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lmspec.compiler.graph import Graph
from lmspec.compiler.ops import OPS, Shape, ShapeError, infer_shape
from lmspec.errors import CompileError

if TYPE_CHECKING:
    from lmspec.compiler.passes import PassContext


def local_tensors(node: dict[str, Any]) -> dict[str, Shape]:
    """A node's parameter and buffer shapes by name relative to its module path.

    A shared tensor owned by another module (an MTP block's use of `model.embed_tokens.weight`, a
    tied LM head) is named by its last component.
    """
    prefix = node["path"] + "."
    out = {}
    for name, shape in (*node["params"].items(), *node["buffers"].items()):
        out[name[len(prefix) :] if name.startswith(prefix) else name.rsplit(".", 1)[-1]] = shape
    return out


def node_shape(graph: Graph, node_id: str) -> Shape:
    """Apply the node's shape rule to its producers' current shapes."""
    d = graph.node(node_id)
    ins = [graph.node(src)["shape"] for src in graph.inputs(node_id)]
    if d["op"] not in OPS:
        raise CompileError(graph.spec.name, d["field"], f"{node_id}: unknown op {d['op']!r}")
    try:
        return infer_shape(d["op"], ins, local_tensors(d), d["attrs"])
    except (ShapeError, KeyError, TypeError) as e:
        raise CompileError(graph.spec.name, d["field"], f"{node_id} ({d['op']}): {e}") from None


def shapes(graph: Graph, ctx: PassContext) -> Graph:
    for n in graph.topo_order():
        graph.node(n)["shape"] = node_shape(graph, n)
    return graph
