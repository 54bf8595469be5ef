"""Totals from the IR: parameters (total, active, by component, MTP) and FLOPs per token.

Everything here is summed from node weight shapes and the accounting pass's per-node FLOPs; no
formula restates the architecture. Tensors shared between nodes (MTP's use of the embedding and
LM head, a tied head) are counted once, by name.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from lmspec.compiler.graph import Graph
from lmspec.compiler.passes.accounting import node_flops, visible_keys

COMPONENTS = ("embedding", "attention", "norm", "dense_ffn", "router", "experts", "shared_experts", "lm_head")


def component_of(name: str) -> str:
    """The component a parameter belongs to, from its transformers name."""
    if name == "model.embed_tokens.weight":
        return "embedding"
    if name == "lm_head.weight":
        return "lm_head"
    if ".self_attn." in name:
        return "attention"
    if name.endswith(("norm.weight",)):
        return "norm"
    if ".mlp.gate." in name:
        return "router"
    if ".mlp.experts." in name:
        return "experts"
    if ".mlp.shared_experts." in name:
        return "shared_experts"
    if ".mlp." in name:
        return "dense_ffn"
    if name.startswith("model.mtp.") and ".eh_proj." in name:
        return "mtp_proj"
    raise ValueError(f"parameter {name!r} belongs to no known component")


def _is_mtp(d: dict[str, Any]) -> bool:
    return d["scope"].startswith("model.mtp.")


def mean_visible_keys(window_keys: int | None, seq_len: int) -> float:
    """Mean keys per query over a causal sequence of `seq_len` tokens (query i sees min(i+1, W))."""
    w = seq_len if window_keys is None else min(window_keys, seq_len)
    # queries 1..w see 1..w keys; the remaining seq_len - w see w each
    return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len


def _params(nodes: Iterable[dict[str, Any]]) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for d in nodes:
        out.update(d["params"])
    return out


def stats_from_graph(graph: Graph, context: int | None = None) -> dict[str, Any]:
    """Parameter and FLOP totals of a lowered graph (any passes; accounting is recomputed per node).

    `context` (default: the accounting pass's, else max_position_embeddings) sets the keys attention
    sees: `forward` is the cost of one token at the end of a `context`-token sequence,
    `forward_mean` the mean over all tokens of such a sequence (causal), `train` = 3 x forward_mean.
    """
    m = graph.spec.model
    context = context or graph.nx.graph.get("context") or m.max_position_embeddings
    main = [d for _, d in graph.nx.nodes(data=True) if not _is_mtp(d)]
    mtp = [d for _, d in graph.nx.nodes(data=True) if _is_mtp(d)]
    main_params = _params(main)
    mtp_params = {k: v for k, v in _params(mtp).items() if k not in main_params}

    def by_component(params: dict[str, tuple[int, ...]]) -> dict[str, int]:
        out: dict[str, int] = {}
        for name, shape in params.items():
            c = component_of(name)
            out[c] = out.get(c, 0) + math.prod(shape)
        return out

    # Active: a token meets top_k of num_experts routed experts.
    inactive = 0
    for d in main:
        if d["op"] == "experts":
            experts = sum(math.prod(s) for s in d["params"].values())
            inactive += experts - experts * d["attrs"]["top_k"] // d["attrs"]["num_experts"]

    def flops(nodes: list[dict[str, Any]], keys) -> dict[str, float]:
        total = attention = 0.0
        for d in nodes:
            fixed, per_key = node_flops(d)
            attn = per_key * keys(d["attrs"].get("window_keys") if per_key else None)
            total += fixed + attn
            attention += attn
        return {"total": total, "attention": attention}

    at_end = flops(main, lambda w: visible_keys(w, context))
    mean = flops(main, lambda w: mean_visible_keys(w, context))
    mtp_end = flops(mtp, lambda w: visible_keys(w, context))
    total_main = sum(math.prod(s) for s in main_params.values())
    total_mtp = sum(math.prod(s) for s in mtp_params.values())
    return {
        "name": graph.spec.name,
        "context": context,
        "params": {
            "total": total_main,
            "active": total_main - inactive,
            "mtp": total_mtp,
            "total_with_mtp": total_main + total_mtp,
            "by_component": by_component(main_params),
            "mtp_by_component": by_component(mtp_params),
            "buffers": sum(math.prod(s) for _, d in graph.nx.nodes(data=True) for s in d["buffers"].values()),
        },
        "flops_per_token": {
            "forward": at_end["total"],
            "forward_attention": at_end["attention"],
            "forward_mean": mean["total"],
            "train": 3 * mean["total"],
            "mtp_forward": mtp_end["total"],
        },
    }
