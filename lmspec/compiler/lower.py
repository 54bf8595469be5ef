"""Lowering: Spec -> Graph."""

from __future__ import annotations

from lmspec.compiler.graph import Graph, LayerInfo
from lmspec.spec import Spec


def lower(spec: Spec) -> Graph:
    m = spec.model
    layers = [
        LayerInfo(i, name, m.blocks[name].attention, m.blocks[name].ffn, f"model.layers.{i}")
        for i, name in enumerate(m.layer_blocks)
    ]
    mtp_layers = []
    if m.mtp is not None:
        b = m.blocks[m.mtp.block]
        mtp_layers = [
            LayerInfo(k, m.mtp.block, b.attention, b.ffn, f"model.mtp.layers.{k}") for k in range(m.mtp.num_blocks)
        ]
    return Graph(spec=spec, layers=layers, mtp_layers=mtp_layers)


def run_passes(graph: Graph, disable: tuple[str, ...] = ()) -> Graph:
    if "fusion" not in disable:
        graph.fused_units = {"add_rmsnorm", "swiglu", "router", "lm_head_ce"}
    return graph
