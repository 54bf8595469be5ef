"""The model-level graph IR: one node per op, with symbolic (batch, seq) shapes and concrete dims.

Public contract used by codegen:
- `Graph.spec`: the validated Spec it was lowered from.
- `Graph.layers`: one `LayerInfo` per decoder layer (index, block, attention kind name, ffn kind name).
- `Graph.mtp_layers`: one `LayerInfo` per MTP block's decoder layer.
- `Graph.fused_units`: names of the fusion units chosen by the fusion pass
  (`add_rmsnorm`, `swiglu`, `router`, `lm_head_ce`), empty before fusion.
- `Graph.nx`: the networkx DiGraph of op nodes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx

from lmspec.spec import Spec


@dataclass(frozen=True)
class LayerInfo:
    index: int
    block: str
    attention: str
    ffn: str
    path: str  # e.g. "model.layers.3" — the module path in the generated model


@dataclass
class Graph:
    spec: Spec
    layers: list[LayerInfo]
    mtp_layers: list[LayerInfo]
    nx: nx.DiGraph = field(default_factory=nx.DiGraph)
    fused_units: set[str] = field(default_factory=set)
