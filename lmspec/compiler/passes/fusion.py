"""Fusion: replace groups of ops by the units the kernels implement, one node per unit.

Why: each unit is one kernel (or one backend call) that keeps the intermediate in registers or
never materialises it, so the generated model calls the unit instead of its members.
- `add_rmsnorm`: a residual add feeding an RMSNorm (the next norm after every attention and FFN
  output; the final norms). Two outputs: 0 = normed, 1 = the sum, which stays the residual stream.
- `swiglu`: gate and up projections of the same input feeding `silu(gate) * up` (dense FFNs and
  shared experts; routed experts are already one grouped `experts` op).
- `router`: logits, sigmoid/softmax scores, correction bias, top-k, renormalisation and scaling.
- `lm_head_ce`: the LM head feeding cross-entropy, so (tokens x vocab) logits are never stored.
The fused node keeps `members` ([(id, op), ...]), the union of their parameters and buffers, their
summed accounting, and the input/output edges of the group. `graph.fused_units` becomes the set of
units applied (`ctx.units`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lmspec.compiler.graph import Graph

if TYPE_CHECKING:
    from lmspec.compiler.passes import PassContext

_SUMMED = ("n_params", "flops", "flops_per_key", "flops_at_context")


@dataclass(frozen=True)
class _Unit:
    """One group of ops to fuse into a single node fed by `inputs` ((producer, port) in argument order).

    `ports` maps each member whose value leaves the group to the fused node's output port; the fused
    node takes `principal`'s path, field, scope, dtype and shape, and its id unless `new_id` is given.
    `attrs` adds to the union of the members' attributes.
    """

    members: list[str]
    principal: str
    inputs: list[tuple[str, int]]
    ports: dict[str, int]
    new_id: str | None = None
    attrs: dict[str, Any] = field(default_factory=dict)


def _fuse(graph: Graph, op: str, unit: _Unit) -> None:
    """Replace the unit's members with one `op` node, rewiring the group's inputs and outputs."""
    g = graph.nx
    members = unit.members
    group = set(members)
    outgoing = [
        (unit.ports[m], user, data["arg"])
        for m in members
        for _, user, data in g.out_edges(m, data=True)
        if user not in group
    ]
    new_id = unit.new_id or unit.principal
    p = g.nodes[unit.principal]
    node = {
        "op": op,
        "shape": p["shape"],
        "dtype": p["dtype"],
        "path": p["path"],
        "field": p["field"],
        "scope": p["scope"],
        "params": {},
        "buffers": {},
        "attrs": {},
        "members": [(m, g.nodes[m]["op"]) for m in members],
    }
    for m in members:
        d = g.nodes[m]
        node["params"].update(d["params"])
        node["buffers"].update(d["buffers"])
        node["attrs"].update(d["attrs"])
        for key in _SUMMED:
            if key in d:
                node[key] = node.get(key, 0) + d[key]
    node["attrs"].update(unit.attrs)
    g.remove_nodes_from(members)
    g.add_node(new_id, **node)
    for arg, (src, port) in enumerate(unit.inputs):
        g.add_edge(src, new_id, arg=arg, port=port)
    for port, user, arg in outgoing:
        g.add_edge(new_id, user, arg=arg, port=port)


def _in(graph: Graph, node_id: str, arg: int) -> tuple[str, int]:
    """(producer, port) feeding argument `arg` of `node_id`."""
    for src, _, data in graph.nx.in_edges(node_id, data=True):
        if data["arg"] == arg:
            return src, data["port"]
    raise KeyError(f"{node_id} has no argument {arg}")


def _op(graph: Graph, node_id: str) -> str:
    return graph.nx.nodes[node_id]["op"]


def _norm_preference(graph: Graph, add: str, norm: str) -> tuple[int, int]:
    # A sum read by several norms (the last layer's output feeds `model.norm` and MTP's `hnorm`) is
    # fused with the norm of its own layer, else the main model's, so MTP reads the sum (port 1).
    scope = graph.nx.nodes[norm]["scope"]
    return (scope != graph.nx.nodes[add]["scope"], scope.startswith("model.mtp."))


def _add_rmsnorm(graph: Graph, add: str) -> _Unit | None:
    norms = [u for u in graph.users(add) if _op(graph, u) == "rmsnorm" and _in(graph, u, 0)[0] == add]
    if not norms:
        return None
    norm = min(norms, key=lambda n: _norm_preference(graph, add, n))
    return _Unit(
        [add, norm], principal=norm, inputs=[_in(graph, add, 0), _in(graph, add, 1)], ports={norm: 0, add: 1}
    )


def _swiglu(graph: Graph, act: str) -> _Unit | None:
    gate, up = _in(graph, act, 0)[0], _in(graph, act, 1)[0]
    if not all(_op(graph, n) == "linear" and graph.users(n) == [act] for n in (gate, up)):
        return None
    src = _in(graph, gate, 0)
    if _in(graph, up, 0) != src:
        return None
    new_id = graph.nx.nodes[act]["path"] + ".swiglu"
    return _Unit([gate, up, act], principal=act, inputs=[src], ports={act: 0}, new_id=new_id)


def _router(graph: Graph, topk: str) -> _Unit | None:
    scores, _ = _in(graph, topk, len(graph.inputs(topk)) - 1)
    logits, _ = _in(graph, scores, 0)
    if _op(graph, logits) != "linear":
        return None
    members = [logits, scores]
    selection, _ = _in(graph, topk, 0)
    if selection != scores:
        if _op(graph, selection) != "correction_bias" or _in(graph, selection, 0)[0] != scores:
            return None
        members.append(selection)
    members.append(topk)
    last = topk
    while True:  # renormalize / routed_scale follow one by one
        users = graph.users(last)
        if len(users) != 1 or _op(graph, users[0]) not in ("renormalize", "routed_scale"):
            break
        last = users[0]
        members.append(last)
    return _Unit(
        members,
        principal=last,
        inputs=[_in(graph, logits, 0)],
        ports={last: 0},
        new_id=logits,
        attrs={
            "score_function": _op(graph, scores),
            "renormalize": any(_op(graph, m) == "renormalize" for m in members),
        },
    )


def _lm_head_ce(graph: Graph, ce: str) -> _Unit | None:
    head, _ = _in(graph, ce, 0)
    if _op(graph, head) != "linear" or graph.users(head) != [ce]:
        return None
    return _Unit([head, ce], principal=ce, inputs=[_in(graph, head, 0), _in(graph, ce, 1)], ports={ce: 0})


# unit (also the fused node's op) -> (the op each candidate group is found from, the rule that finds it)
_UNITS: dict[str, tuple[str, Callable[[Graph, str], _Unit | None]]] = {
    "add_rmsnorm": ("add", _add_rmsnorm),
    "swiglu": ("silu_mul", _swiglu),
    "router": ("topk", _router),
    "lm_head_ce": ("cross_entropy", _lm_head_ce),
}


def _apply(graph: Graph, unit: str) -> int:
    """Fuse every group of `unit` in `graph`; returns how many."""
    anchor_op, find = _UNITS[unit]
    count = 0
    for anchor in graph.nodes_of(anchor_op):
        found = find(graph, anchor)
        if found is not None:
            _fuse(graph, unit, found)
            count += 1
    return count


def fusion(graph: Graph, ctx: PassContext) -> Graph:
    for unit in ctx.units:
        n = _apply(graph, unit)
        graph.nx.graph.setdefault("fused_counts", {})[unit] = n
    graph.fused_units = set(ctx.units)
    return graph
