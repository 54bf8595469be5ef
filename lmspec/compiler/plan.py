"""The plan: the last compiler pass, and the only thing codegen reads.

`plan(graph) -> Plan` turns the fused graph into typed, frozen contexts: the model's own facts, one
context per attention kind, FFN kind and block that the layers use (in first-use order), one per
layer, the MTP stack, and the kernel variants (`lmspec.compiler.variants`). Everything comes from
node ops, attributes and weight shapes, `graph.layers` / `graph.mtp_layers`, `graph.fused_units`
and the model facts lowering keeps in `graph.nx.graph`; never from `graph.spec`.

Every context carries `nodes`, the IR node ids it implements, and `field`, the spec field path it
came from, so generated code can name both. Together the contexts partition the graph: each node
belongs to exactly one of them (`Plan.node_owners`).

The `plan` pass stores its result in `graph.nx.graph["plan"]`; `planned(graph)` returns it (or
plans a graph whose `plan` pass was switched off). A kind used by several layers must look the same
in every one of them: a difference is a compiler bug (`GraphError`), as one class implements them all.

Names are data: kind, block and spec names are kept as plain strings for codegen to escape. Class
names are `Identifier`s made by `class_name`, which only ever emits `[A-Za-z0-9_]`.
"""

from __future__ import annotations

import keyword
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from lmspec.compiler.graph import Graph, GraphError, LayerInfo
from lmspec.compiler.variants import KernelVariant, kernel_variants
from lmspec.spec.pattern import compress_layers

if TYPE_CHECKING:
    from lmspec.compiler.passes import PassContext

__all__ = [
    "AttentionPlan",
    "BlockPlan",
    "DenseFFNPlan",
    "FFNPlan",
    "Identifier",
    "LayerPlan",
    "MTPPlan",
    "MoEFFNPlan",
    "Plan",
    "class_name",
    "plan",
    "plan_pass",
    "planned",
]

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class Identifier(str):
    """A Python identifier made from spec data: ASCII letters, digits and `_`, never a keyword."""

    def __new__(cls, text: str) -> Identifier:
        if not _IDENTIFIER.match(text) or keyword.iskeyword(text) or keyword.issoftkeyword(text):
            raise ValueError(f"not a Python identifier: {text!r}")
        return super().__new__(cls, text)


def class_name(name: str, suffix: str = "") -> Identifier:
    """`mimo_v2_flash_tiny` -> `MimoV2FlashTiny`; `swa` + `Attention` -> `SwaAttention`.

    Splits on every character outside `[0-9A-Za-z]` and capitalises the parts, so any string at all
    becomes an identifier (`Unnamed` when nothing is left; a leading digit or a keyword gets a `K`).
    """
    parts = [p for p in re.split(r"[^0-9A-Za-z]+", name) if p]
    text = "".join(p[0].upper() + p[1:] for p in parts) or "Unnamed"
    text += suffix
    if text[0].isdigit() or keyword.iskeyword(text) or keyword.issoftkeyword(text):
        text = "K" + text
    return Identifier(text)


# -- the contexts ----------------------------------------------------------------------------------

# How tensor parallelism splits a weight (the generated classes' TENSOR_PLAN): a linear's output features
# (colwise) or input features (rowwise), a per-head parameter with its heads, the LM head by vocabulary.
COLWISE, ROWWISE, HEADS, VOCAB = "colwise", "rowwise", "heads", "vocab"


@dataclass(frozen=True, kw_only=True)
class AttentionPlan:
    """One attention kind: the sizes of its projections, its RoPE, window, sink and scales."""

    name: str  # the kind's name, a key of model.attention
    cls: Identifier
    field: str  # model.attention.<name>
    nodes: tuple[str, ...]  # q/k/v/o projections, RoPE, value scale and attention of every layer using it
    kind: str  # "sliding" or "global"
    num_heads: int
    num_kv_heads: int
    qk_head_dim: int
    v_head_dim: int
    rope_dim: int
    rope_freq_dim: int  # the d of the frequencies theta ** (-2i / d); an odd d rotates rope_dim = d + 1 dims
    theta: float
    value_scale: float
    sink: bool
    bias: bool
    scale: float
    window: int | None  # as written (sliding only); window_keys is what runs
    window_convention: str | None
    window_keys: int | None

    @property
    def scale_is_default(self) -> bool:
        """The scale is `qk_head_dim ** -0.5` (written that way, as transformers computes it)."""
        return self.scale == self.qk_head_dim**-0.5

    @property
    def tensor_plan(self) -> tuple[tuple[str, str], ...]:
        """How tensor parallelism splits this kind's weights by head (`lmspec.train.tensor_parallel`)."""
        split = (("q_proj", COLWISE), ("k_proj", COLWISE), ("v_proj", COLWISE), ("o_proj", ROWWISE))
        return split + ((("sinks", HEADS),) if self.sink else ())


@dataclass(frozen=True, kw_only=True)
class DenseFFNPlan:
    """A SwiGLU FFN: down(silu(gate(x)) * up(x)); `fused_swiglu` when the fusion pass made it one op."""

    name: str
    cls: Identifier
    field: str
    nodes: tuple[str, ...]
    kind: str = "dense"
    intermediate_size: int
    fused_swiglu: bool

    @property
    def tensor_plan(self) -> tuple[tuple[str, str], ...]:
        """Tensor parallelism splits the SwiGLU's width: gate/up by output, down by input features."""
        return SWIGLU_TENSOR_PLAN


@dataclass(frozen=True, kw_only=True)
class MoEFFNPlan:
    """Routed SwiGLU experts (router, grouped experts, optional always-on shared experts)."""

    name: str
    cls: Identifier
    field: str
    nodes: tuple[str, ...]  # all of the FFN's nodes; the three below are parts of it
    router_nodes: tuple[str, ...]
    experts_nodes: tuple[str, ...]
    shared_nodes: tuple[str, ...]
    kind: str = "moe"
    num_experts: int
    top_k: int
    expert_intermediate_size: int
    num_shared_experts: int
    shared_intermediate_size: int
    score_function: str
    correction_bias: bool
    renormalize: bool
    routed_scaling_factor: float
    num_groups: int
    top_k_groups: int
    fused_router: bool
    fused_swiglu: bool  # of the shared experts

    @property
    def tensor_plan(self) -> tuple[tuple[str, str], ...]:
        """The shared experts' split under tensor parallelism (the routed experts stay whole: see scale.md)."""
        return SWIGLU_TENSOR_PLAN


FFNPlan = DenseFFNPlan | MoEFFNPlan

# The tensor-parallel split of a SwiGLU (a dense FFN, a MoE kind's shared experts): its width.
SWIGLU_TENSOR_PLAN = (("gate_proj", COLWISE), ("up_proj", COLWISE), ("down_proj", ROWWISE))


@dataclass(frozen=True, kw_only=True)
class BlockPlan:
    """One block kind: pre-norm attention then pre-norm FFN, each with a residual."""

    name: str
    cls: Identifier
    field: str  # model.blocks.<name>
    nodes: tuple[str, ...]  # the norms and residual adds of every layer using it
    attention: AttentionPlan
    ffn: FFNPlan
    layers: tuple[int, ...]  # main decoder layers using it
    in_mtp: bool  # the MTP blocks use it


@dataclass(frozen=True, kw_only=True)
class LayerPlan:
    """One main decoder layer."""

    index: int
    path: str  # model.layers.<index>
    block: str
    cls: Identifier  # the block's class
    nodes: tuple[str, ...]  # every node of the layer


@dataclass(frozen=True, kw_only=True)
class MTPPlan:
    """The MTP stack: `num_blocks` chained blocks, each one decoder layer of `block` plus its own nodes."""

    num_blocks: int
    block: BlockPlan
    field: str  # model.mtp
    paths: tuple[str, ...]  # model.mtp.layers.<j>
    nodes: tuple[str, ...]  # embedding, norms, eh_proj, concat, token shifts, head and loss of each block


@dataclass(frozen=True, kw_only=True)
class Plan:
    """Everything codegen renders, derived from the fused graph (see the module docstring)."""

    name: str  # the spec's name
    spec_hash: str
    cls: Identifier  # class-name prefix: <cls>Model, <cls>ForCausalLM
    hidden_size: int
    vocab_size: int
    eps: float
    init_std: float
    tie_word_embeddings: bool
    fused_units: tuple[str, ...]
    add_rmsnorm: bool  # residual adds are fused into the next norm: layers carry (hidden, residual)
    lm_head_ce: bool  # LM head + cross-entropy is one op: logits are never stored when training
    layers_pattern: str
    attention: tuple[AttentionPlan, ...]
    ffn: tuple[FFNPlan, ...]
    blocks: tuple[BlockPlan, ...]
    layers: tuple[LayerPlan, ...]
    mtp: MTPPlan | None
    trunk_nodes: tuple[str, ...]  # embedding and final norm (<cls>Model)
    head_nodes: tuple[str, ...]  # inputs, LM head and loss (<cls>ForCausalLM)
    kernels: tuple[KernelVariant, ...]

    @property
    def tensor_plan(self) -> tuple[tuple[str, str], ...]:
        """The LM head split by vocabulary under tensor parallelism; a head tied to the embedding stays whole."""
        return () if self.tie_word_embeddings else (("lm_head", VOCAB),)

    @property
    def class_name(self) -> Identifier:
        """The generated model class, `<cls>ForCausalLM`."""
        return Identifier(self.cls + "ForCausalLM")

    def node_owners(self) -> dict[str, str]:
        """IR node id -> the context implementing it (`attention.swa`, `block.S`, `mtp`, `trunk`, ...)."""
        owners: dict[str, str] = {}
        groups: list[tuple[str, tuple[str, ...]]] = [("trunk", self.trunk_nodes), ("head", self.head_nodes)]
        groups += [(f"attention.{a.name}", a.nodes) for a in self.attention]
        groups += [(f"ffn.{f.name}", f.nodes) for f in self.ffn]
        groups += [(f"block.{b.name}", b.nodes) for b in self.blocks]
        if self.mtp is not None:
            groups.append(("mtp", self.mtp.nodes))
        for owner, nodes in groups:
            for n in nodes:
                if n in owners:
                    raise GraphError(f"plan: node {n} belongs to both {owners[n]} and {owner}")
                owners[n] = owner
        return owners

    def to_data(self) -> dict[str, Any]:
        """The plan as JSON-ready data (the cache key hashes it; LMSPEC_DEBUG prints it)."""
        data = asdict(self)
        data["kernels"] = [{"family": k.family, "name": k.name, **asdict(k)} for k in self.kernels]
        return data


# -- reading the graph -----------------------------------------------------------------------------


def _natural(node_id: str) -> tuple[Any, ...]:
    """Sort key that puts `model.layers.2` before `model.layers.10`."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in node_id.split("."))


def _sorted(nodes: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted(nodes, key=_natural))


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + ".")


@dataclass
class _LayerParts:
    """A decoder layer's nodes split by the class that implements them."""

    attention: list[str]
    ffn: list[str]
    block: list[str]
    rest: list[str]  # MTP-only nodes (empty in a main layer)


def _split_layer(graph: Graph, layer: LayerInfo, nodes: list[str]) -> _LayerParts:
    p = layer.path
    sa, mp = f"{p}.self_attn", f"{p}.mlp"
    block_paths = (p, f"{p}.input_layernorm", f"{p}.post_attention_layernorm")
    parts = _LayerParts([], [], [], [])
    for n in nodes:
        d = graph.node(n)
        if _under(d["path"], sa):
            parts.attention.append(n)
        elif _under(d["path"], mp):
            parts.ffn.append(n)
        elif d["path"] in block_paths and d["field"] != "model.mtp":
            parts.block.append(n)
        else:
            parts.rest.append(n)
    return parts


def _params(graph: Graph, nodes: Iterable[str], key: str = "params") -> dict[str, tuple]:
    out: dict[str, tuple] = {}
    for n in nodes:
        out.update(graph.node(n)[key])
    return out


def _only(graph: Graph, nodes: Iterable[str], op: str, where: str) -> dict[str, Any]:
    found = [graph.node(n) for n in nodes if graph.node(n)["op"] == op]
    if not found:
        raise GraphError(f"plan: {where} has no {op} node")
    return found[0]


def _attention_facts(graph: Graph, layer: LayerInfo, nodes: list[str]) -> dict[str, Any]:
    where = f"{layer.path}.self_attn"
    a = _only(graph, nodes, "attention", where)
    attrs = a["attrs"]
    rope = _only(graph, nodes, "rope", where)["attrs"]
    return {
        "kind": attrs["kind"],
        "num_heads": attrs["num_heads"],
        "num_kv_heads": attrs["num_kv_heads"],
        "qk_head_dim": attrs["qk_head_dim"],
        "v_head_dim": attrs["v_head_dim"],
        "rope_dim": rope["rope_dim"],
        "rope_freq_dim": rope["rope_freq_dim"],
        "theta": float(rope["theta"]),
        "value_scale": float(attrs["value_scale"]),
        "sink": bool(attrs["sink"]),
        "bias": f"{a['path']}.q_proj.bias" in _params(graph, nodes),
        "scale": float(attrs["scale"]),
        "window": attrs.get("window"),
        "window_convention": attrs.get("window_convention"),
        "window_keys": attrs["window_keys"],
    }


def _ffn_facts(graph: Graph, layer: LayerInfo, nodes: list[str]) -> dict[str, Any]:
    mp = f"{layer.path}.mlp"
    params = _params(graph, nodes)
    ops = {graph.node(n)["op"] for n in nodes}
    if "experts" not in ops:
        return {
            "kind": "dense",
            "intermediate_size": params[f"{mp}.down_proj.weight"][1],
            "fused_swiglu": "swiglu" in ops,
        }
    attrs = _only(graph, nodes, "experts", mp)["attrs"]
    num_experts, two_i, _ = params[f"{mp}.experts.gate_up_proj"]
    shared = params.get(f"{mp}.shared_experts.down_proj.weight")
    shared_size = shared[1] if shared else 0
    return {
        "kind": "moe",
        "num_experts": num_experts,
        "top_k": attrs["top_k"],
        "expert_intermediate_size": two_i // 2,
        "num_shared_experts": shared_size // (two_i // 2),
        "shared_intermediate_size": shared_size,
        "score_function": attrs["score_function"],
        "correction_bias": f"{mp}.gate.e_score_correction_bias" in _params(graph, nodes, "buffers"),
        "renormalize": bool(attrs["renormalize"]),
        "routed_scaling_factor": float(attrs["routed_scaling_factor"]),
        "num_groups": attrs["num_groups"],
        "top_k_groups": attrs["top_k_groups"],
        "fused_router": "router" in ops,
        "fused_swiglu": "swiglu" in ops,
    }


class _Kinds:
    """Facts and nodes per kind name, checked equal across the layers that use the kind."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.facts: dict[str, dict[str, Any]] = {}
        self.nodes: dict[str, list[str]] = {}
        self.first: dict[str, str] = {}

    def add(self, name: str, facts: dict[str, Any], nodes: list[str], layer: str) -> None:
        seen = self.facts.setdefault(name, facts)
        if seen != facts:
            diff = sorted(k for k in facts if facts[k] != seen.get(k))
            raise GraphError(
                f"plan: {self.what} {name!r} differs between {self.first[name]} and {layer} in {diff}"
            )
        self.first.setdefault(name, layer)
        self.nodes.setdefault(name, []).extend(nodes)


def _unique_classes(names: dict[tuple[str, str], Identifier]) -> dict[tuple[str, str], Identifier]:
    """Make class names unique when two spec names sanitise to the same identifier."""
    seen: dict[str, int] = {}
    out = {}
    for key, cls in names.items():
        n = seen.get(cls, 0)
        seen[cls] = n + 1
        out[key] = cls if n == 0 else Identifier(f"{cls}{n + 1}")
    return out


def _ffn_plan(
    name: str, cls: Identifier, facts: dict[str, Any], nodes: tuple[str, ...], graph: Graph
) -> FFNPlan:
    common = {"name": name, "cls": cls, "field": f"model.ffn.{name}", "nodes": nodes}
    if facts["kind"] == "dense":
        return DenseFFNPlan(**common, **facts)

    def part(module: str) -> tuple[str, ...]:
        """The nodes of one submodule of the FFN (`gate`, `experts`, `shared_experts`)."""
        return tuple(n for n in nodes if _under(graph.node(n)["path"].partition(".mlp.")[2], module))

    return MoEFFNPlan(
        **common,
        router_nodes=part("gate"),
        experts_nodes=part("experts"),
        shared_nodes=part("shared_experts"),
        **facts,
    )


def _model_nodes(graph: Graph) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(trunk, head): the nodes outside any decoder layer."""
    trunk, head = [], []
    for n, d in graph.nx.nodes(data=True):
        if d["scope"] != "model":
            continue
        (trunk if d["path"] in ("model.embed_tokens", "model.norm") else head).append(n)
    return _sorted(trunk), _sorted(head)


def _model_facts(graph: Graph) -> dict[str, Any]:
    embedding = next(d for _, d in graph.nx.nodes(data=True) if d["op"] == "embedding")
    ((vocab, hidden),) = embedding["params"].values()
    eps = {float(d["attrs"]["eps"]) for _, d in graph.nx.nodes(data=True) if "eps" in d["attrs"]}
    if len(eps) != 1:
        raise GraphError(f"plan: expected one norm eps across the model, got {sorted(eps)}")
    ops = graph.op_counts()
    g = graph.nx.graph
    return {
        "name": g["name"],
        "spec_hash": g["spec_hash"],
        "cls": class_name(g["name"]),
        "hidden_size": hidden,
        "vocab_size": vocab,
        "eps": eps.pop(),
        "init_std": float(g["init_std"]),
        "tie_word_embeddings": not any("lm_head.weight" in d["params"] for _, d in graph.nx.nodes(data=True)),
        "fused_units": tuple(sorted(graph.fused_units)),
        "add_rmsnorm": ops["add_rmsnorm"] > 0,
        "lm_head_ce": ops["lm_head_ce"] > 0,
    }


def _collect(graph: Graph, by_scope: dict[str, list[str]]) -> tuple[_Kinds, _Kinds, _Kinds, list[str]]:
    """Attention kinds, FFN kinds and blocks over every decoder layer, and the MTP blocks' own nodes."""
    attention, ffn, blocks = _Kinds("attention kind"), _Kinds("FFN kind"), _Kinds("block")
    mtp_nodes: list[str] = []
    for layer, in_mtp in [(x, False) for x in graph.layers] + [(x, True) for x in graph.mtp_layers]:
        parts = _split_layer(graph, layer, by_scope.get(layer.path, []))
        if parts.rest and not in_mtp:
            raise GraphError(f"plan: {layer.path}: nodes {sorted(parts.rest)} belong to no part of a layer")
        mtp_nodes += parts.rest
        where = layer.path
        attention.add(
            layer.attention, _attention_facts(graph, layer, parts.attention), parts.attention, where
        )
        ffn.add(layer.ffn, _ffn_facts(graph, layer, parts.ffn), parts.ffn, where)
        blocks.add(layer.block, {"attention": layer.attention, "ffn": layer.ffn}, parts.block, where)
    return attention, ffn, blocks, mtp_nodes


def _block_plans(
    graph: Graph,
    att: dict[str, AttentionPlan],
    ffns: dict[str, FFNPlan],
    blocks: _Kinds,
    cls: dict[tuple[str, str], Identifier],
) -> dict[str, BlockPlan]:
    return {
        n: BlockPlan(
            name=n,
            cls=cls[("b", n)],
            field=f"model.blocks.{n}",
            nodes=_sorted(blocks.nodes[n]),
            attention=att[links["attention"]],
            ffn=ffns[links["ffn"]],
            layers=tuple(layer.index for layer in graph.layers if layer.block == n),
            in_mtp=any(layer.block == n for layer in graph.mtp_layers),
        )
        for n, links in blocks.facts.items()
    }


def plan(graph: Graph) -> Plan:
    """The plan of a lowered graph (normally after every other pass): see the module docstring."""
    by_scope: dict[str, list[str]] = {}
    for n, scope in graph.nx.nodes(data="scope"):
        by_scope.setdefault(scope, []).append(n)
    attention, ffn, blocks, mtp_nodes = _collect(graph, by_scope)
    cls = _unique_classes(
        {("a", n): class_name(n, "Attention") for n in attention.facts}
        | {("f", n): class_name(n, "FFN") for n in ffn.facts}
        | {("b", n): class_name(n, "Block") for n in blocks.facts}
    )
    att = {
        n: AttentionPlan(
            name=n, cls=cls[("a", n)], field=f"model.attention.{n}", nodes=_sorted(attention.nodes[n]), **f
        )
        for n, f in attention.facts.items()
    }
    ffns = {n: _ffn_plan(n, cls[("f", n)], f, _sorted(ffn.nodes[n]), graph) for n, f in ffn.facts.items()}
    block = _block_plans(graph, att, ffns, blocks, cls)
    mtp = None
    if graph.mtp_layers:
        mtp = MTPPlan(
            num_blocks=len(graph.mtp_layers),
            block=block[graph.mtp_layers[0].block],
            field="model.mtp",
            paths=tuple(layer.path for layer in graph.mtp_layers),
            nodes=_sorted(mtp_nodes),
        )
    trunk, head = _model_nodes(graph)
    layers = tuple(
        LayerPlan(
            index=layer.index,
            path=layer.path,
            block=layer.block,
            cls=block[layer.block].cls,
            nodes=_sorted(by_scope[layer.path]),
        )
        for layer in graph.layers
    )
    return Plan(
        **_model_facts(graph),
        layers_pattern=compress_layers([layer.block for layer in graph.layers]),
        attention=tuple(att.values()),
        ffn=tuple(ffns.values()),
        blocks=tuple(block.values()),
        layers=layers,
        mtp=mtp,
        trunk_nodes=trunk,
        head_nodes=head,
        kernels=kernel_variants(graph),
    )


def plan_pass(graph: Graph, ctx: PassContext) -> Graph:
    """The `plan` pass: plan the graph and keep the plan in `graph.nx.graph["plan"]`."""
    graph.nx.graph["plan"] = plan(graph)
    return graph


def planned(graph: Graph) -> Plan:
    """The plan the `plan` pass stored, or a fresh one when that pass did not run."""
    if "plan" in graph.passes and "plan" in graph.nx.graph:
        return graph.nx.graph["plan"]
    return plan(graph)
