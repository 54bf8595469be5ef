"""Parameter and FLOP accounting from the IR: annotates nodes, rewrites nothing.

Each node gets
- `n_params`: elements of the parameters it holds (buffers such as the router's correction bias
  are not parameters); a shared tensor is counted on every node that uses it, and
  `lmspec.compiler.stats_from_graph` de-duplicates by tensor name;
- `flops`: forward FLOPs per token that do not depend on context: 2 per multiply-add of every
  matmul (projections, router, LM head; experts count only the `top_k` a token is routed to);
- `flops_per_key`: attention FLOPs per token per visible key, 2 * num_heads * (qk_head_dim + v_head_dim)
  for QK^T and PV, and `window_keys` (None for global attention), so a sliding layer's attention at
  context L costs `flops_per_key * min(L, window_keys)` and a global layer's `flops_per_key * L`.
Elementwise ops (norms, RoPE, activations, softmax) count zero, the usual matmul-only convention.
The counts are evaluated at `ctx.context` (default `max_position_embeddings`) into
`flops_at_context`, and the context is kept in `graph.nx.graph["context"]`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from lmspec.compiler.graph import Graph

if TYPE_CHECKING:
    from lmspec.compiler.passes import PassContext

# Ops whose FLOPs are 2 x (elements of their 2-D weights) per token: a token meets each weight once.
_MATMUL_OPS = frozenset({"linear", "swiglu", "router", "lm_head_ce"})


def visible_keys(window_keys: int | None, context: int) -> int:
    """Keys a query at the end of a `context`-token sequence attends to."""
    return context if window_keys is None else min(window_keys, context)


def node_flops(d: dict[str, Any]) -> tuple[int, int]:
    """(context-independent FLOPs per token, attention FLOPs per token per visible key) of one node."""
    op, attrs = d["op"], d["attrs"]
    if op in _MATMUL_OPS:
        return sum(2 * math.prod(s) for s in d["params"].values() if len(s) == 2), 0
    if op == "experts":
        per_expert = sum(math.prod(s[1:]) for s in d["params"].values())
        return 2 * attrs["top_k"] * per_expert, 0
    if op == "attention":
        return 0, 2 * attrs["num_heads"] * (attrs["qk_head_dim"] + attrs["v_head_dim"])
    return 0, 0


def accounting(graph: Graph, ctx: PassContext) -> Graph:
    context = ctx.context or graph.spec.model.max_position_embeddings
    graph.nx.graph["context"] = context
    for _, d in graph.nx.nodes(data=True):
        d["n_params"] = sum(math.prod(s) for s in d["params"].values())
        d["flops"], d["flops_per_key"] = node_flops(d)
        d["window_keys"] = d["attrs"].get("window_keys") if d["op"] == "attention" else None
        d["flops_at_context"] = d["flops"] + d["flops_per_key"] * visible_keys(d["window_keys"], context)
    return graph
