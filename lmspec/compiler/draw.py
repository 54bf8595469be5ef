"""`lmspec graph`: the compiled graph as an indented listing, graphviz DOT, or a picture.

Pictures read as columns: the inputs and embedding, one column per decoder layer, the final norm
and head, then one column per MTP block; read each column top-down, then the next one. Layers
outside `--layers` (by default every layer but the first of each block kind) collapse into one
labelled box. Fused units are drawn in one colour, attention in another, so the kernels a spec
uses stand out. SVG/PNG go through graphviz's `dot` when it is installed, else matplotlib.
"""

from __future__ import annotations

import math
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx

from lmspec.compiler.graph import Graph
from lmspec.compiler.ops import OPS

# Fill colours by what a node is; fused units share one colour so they stand out.
COLORS = {
    "fused": "#f4a259",
    "attention": "#7fb3e6",
    "rope": "#b9d9a8",
    "moe": "#c9b3e6",
    "linear": "#e8e8e8",
    "io": "#ffffff",
    "loss": "#f28b82",
    "layer": "#fff2b3",
    "other": "#f5f5f5",
}
LEGEND = [
    ("fused unit", "fused"),
    ("attention", "attention"),
    ("rope", "rope"),
    ("MoE", "moe"),
    ("projection", "linear"),
    ("collapsed layer", "layer"),
    ("loss", "loss"),
]


def parse_layers(text: str | None, n_layers: int) -> set[int] | None:
    """`0-6`, `3`, `0-2,5` -> layer indices; None -> None. Raises ValueError with a readable message."""
    if text is None:
        return None
    out: set[int] = set()
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            a, b = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ValueError(f"--layers: expected ranges like 0-6 or 1,3, got {text!r}") from None
        if a > b or a < 0 or b >= n_layers:
            raise ValueError(f"--layers: expected indices within 0-{n_layers - 1}, got {part.strip()!r}")
        out.update(range(a, b + 1))
    return out


def default_expanded(graph: Graph) -> set[int]:
    """The first layer of each block kind: every distinct layer shape appears once, expanded."""
    seen: dict[str, int] = {}
    for li in graph.layers:
        seen.setdefault(li.block, li.index)
    return set(seen.values())


# -- the view: the IR with collapsed layers, grouped into columns ------------------------------------


@dataclass
class VNode:
    id: str
    label: str
    color: str
    column: str
    fused: bool = False


@dataclass
class View:
    title: str
    columns: list[tuple[str, str]] = field(default_factory=list)  # (key, header)
    nodes: dict[str, VNode] = field(default_factory=dict)
    edges: list[tuple[str, str]] = field(default_factory=list)
    collapsed: set[str] = field(default_factory=set)  # layer paths drawn as one box
    plain: set[str] = field(default_factory=set)  # columns of stacked collapsed boxes (no frame)


def _short(node_id: str, scope: str) -> str:
    if scope == "model":
        return node_id
    return node_id[len(scope) + 1 :] if node_id.startswith(scope + ".") else node_id


def _dims(shape) -> str:
    return "(" + ",".join(str(d) for d in shape) + ")" if shape is not None else "?"


def _color(op: str) -> str:
    d = OPS[op]
    if d.fused:
        return "fused"
    if op in ("input", "shift_tokens", "embedding", "concat"):
        return "io"
    if op == "cross_entropy":
        return "loss"
    if op in ("attention", "value_scale"):
        return "attention"
    return {"rope": "rope", "moe": "moe", "native": "linear" if op == "linear" else "other"}.get(
        d.family, "other"
    )


def _op_label(graph: Graph, n: str, d: dict) -> str:
    op, a, scope = d["op"], d["attrs"], d["scope"]
    name = _short(n, scope)
    if op == "attention":
        kind = f"sliding W={a['window_keys']}" if a["window_keys"] is not None else "global"
        sink = " +sink" if a["sink"] else ""
        return f"attention\n{kind}{sink}\n{a['num_heads']}q/{a['num_kv_heads']}kv heads"
    if op == "linear":
        w = next(iter(d["params"].values()))
        return f"{name}\n{w[1]}→{w[0]}"
    if op == "rope":
        return f"rope {name[-1]}\n{a['rope_dim']}/{a['qk_head_dim']} dims"
    if op == "experts":
        return f"experts\n{a['num_experts']} x top-{a['top_k']}"
    if op == "router":
        return f"router\n{a['score_function']} top-{a['top_k']}"
    if op == "add_rmsnorm":
        return f"add_rmsnorm\n{name}"
    if op == "lm_head_ce":
        return "lm_head_ce" if scope == "model" else "lm_head_ce\n(shared head)"
    if op == "value_scale":
        return f"v × {a['value_scale']:g}"
    if op == "input":
        return n
    if op == "shift_tokens":
        return f"{name}\nlabels +{a['offset']}"
    if op == "swiglu":
        return f"swiglu\n{_short(n, scope)}"
    return name if name.endswith(op) or op in ("add", "rmsnorm") else f"{name}\n{op}"


def _layer_label(graph: Graph, scope: str, block: str) -> str:
    m = graph.spec.model
    b = m.blocks[block]
    a, f = m.attention[b.attention], m.ffn[b.ffn]
    attn = f"{b.attention}: " + (f"W={a.window_keys}" if a.window_keys is not None else "global")
    attn += " +sink" if a.sink else ""
    ffn = (
        f"{b.ffn}: {f.num_experts}x top-{f.top_k}"
        if f.kind == "moe"
        else f"{b.ffn}: dense {f.intermediate_size}"
    )
    return f"{scope.replace('model.', '')}\n[{block}] {attn}\n{ffn}"


def build_view(graph: Graph, expanded: set[int] | None) -> View:
    """Group the IR into columns, collapsing layers outside `expanded` (None: expand all)."""
    spec = graph.spec
    infos = {li.path: li for li in graph.layers} | {li.path: li for li in graph.mtp_layers}
    exp_paths = {li.path for li in graph.layers if expanded is None or li.index in expanded}
    # MTP blocks: the first is expanded whenever any layer is; the rest repeat it.
    exp_paths |= {li.path for li in graph.mtp_layers[: 1 if expanded is not None else None]}
    fused = ", ".join(sorted(graph.fused_units)) or "none"
    view = View(
        title=f"{spec.name}: {len(graph.layers)} layers + {len(graph.mtp_layers)} MTP blocks, "
        f"{graph.nx.number_of_nodes()} ops (fused: {fused})"
    )
    # Consecutive collapsed layers stack in one frameless column, at most _STACK per column.
    column_of: dict[str, str] = {}

    def add_columns(infos_in_order, prefix: str) -> None:
        run: list[str] = []
        for li in infos_in_order:
            if li.path in exp_paths:
                run = []
                view.columns.append((li.path, f"{prefix}.{li.index} [{li.block}]"))
                column_of[li.path] = li.path
                continue
            if not run or len(run) == _STACK:
                run = []
                key = f"stack:{li.path}"
                view.columns.append((key, ""))
                view.plain.add(key)
            run.append(li.path)
            column_of[li.path] = f"stack:{run[0]}"

    view.columns.append(("in", "inputs"))
    add_columns(graph.layers, "layers")
    view.columns.append(("out", "head"))
    add_columns(graph.mtp_layers, "mtp")

    rep: dict[str, str] = {}
    for n, d in graph.nx.nodes(data=True):
        scope = d["scope"]
        if scope in infos and scope not in exp_paths:
            rep[n] = scope
            if scope not in view.nodes:
                view.nodes[scope] = VNode(
                    scope, _layer_label(graph, scope, infos[scope].block), "layer", column_of[scope]
                )
                view.collapsed.add(scope)
            continue
        if d["op"] == "input":
            continue  # drawn as a copy in each column that reads it
        column = scope if scope in infos else ("in" if d["op"] == "embedding" else "out")
        rep[n] = n
        view.nodes[n] = VNode(n, _op_label(graph, n, d), _color(d["op"]), column, OPS[d["op"]].fused)
    seen = set()
    for u, v in graph.nx.edges():
        if graph.node(u)["op"] == "input":
            if v not in rep:
                continue
            col = view.nodes[rep[v]].column
            if col in view.plain:
                continue
            copy = f"{u}@{rep[v]}"  # one copy beside each consumer keeps label edges short
            if copy not in view.nodes:
                view.nodes[copy] = VNode(copy, u, "io", col)
            a, b = copy, rep[v]
        else:
            a, b = rep[u], rep[v]
        if a != b and (a, b) not in seen:
            seen.add((a, b))
            view.edges.append((a, b))
    return view


# -- text -----------------------------------------------------------------------------------------


def to_text(graph: Graph, expanded: set[int] | None) -> str:
    """An indented listing: scopes in order, each op with its shape, inputs and key attributes."""
    spec = graph.spec
    infos = {li.path: li for li in graph.layers} | {li.path: li for li in graph.mtp_layers}
    order = graph.topo_order()
    by_scope: dict[str, list[str]] = {}
    for n in order:
        by_scope.setdefault(graph.node(n)["scope"], []).append(n)
    fused = ", ".join(sorted(graph.fused_units)) or "none"
    lines = [
        f"{spec.name}: {graph.nx.number_of_nodes()} ops after {', '.join(graph.passes) or 'lowering'} "
        f"(fused: {fused})"
    ]
    width = max(len(_short(n, graph.node(n)["scope"])) for n in order) + 2

    def emit(n: str, indent: str) -> None:
        d = graph.node(n)
        scope = d["scope"]
        ports = {src: port for src, _, port in graph.nx.in_edges(n, data="port")}
        ins = ", ".join(_short(s, scope) + ("[sum]" if ports[s] == 1 else "") for s in graph.inputs(n))
        extra = []
        a = d["attrs"]
        if d["op"] == "attention":
            extra.append(
                f"window_keys={a['window_keys']} sink={a['sink']} heads={a['num_heads']}/{a['num_kv_heads']}"
            )
        if d["op"] in ("router", "topk", "experts"):
            extra.append(f"top_k={a['top_k']}/{a['num_experts']}")
        if d.get("members"):
            extra.append("fuses " + " + ".join(op for _, op in d["members"]))
        params = sum(math.prod(s) for s in d["params"].values())
        if params:
            extra.append(f"params={params:,}")
        tail = ("  " + "; ".join(extra)) if extra else ""
        lines.append(
            f"{indent}{_short(n, scope):<{width}}{d['op']:<16}{_dims(d['shape']):<16}{d['dtype']:<9}"
            f"<- {ins or '-'}{tail}"
        )

    top = by_scope.get("model", [])
    head = [n for n in top if graph.node(n)["op"] in ("input", "embedding")]
    for n in head:
        emit(n, "  ")
    for scope, info in infos.items():
        is_mtp = scope.startswith("model.mtp.")
        if is_mtp and scope == graph.mtp_layers[0].path:
            for n in top:
                if n not in head:
                    emit(n, "  ")
        nodes = by_scope.get(scope, [])
        m = spec.model
        b = m.blocks[info.block]
        header = f"  {scope}  [{info.block}: attention {b.attention}, ffn {b.ffn}]"
        if not is_mtp and expanded is not None and info.index not in expanded:
            params = sum(math.prod(s) for n in nodes for s in graph.node(n)["params"].values())
            lines.append(f"{header}  {len(nodes)} ops, {params:,} params (collapsed)")
            continue
        lines.append(header)
        for n in nodes:
            emit(n, "    ")
    if not graph.mtp_layers:
        for n in top:
            if n not in head:
                emit(n, "  ")
    return "\n".join(lines) + "\n"


# -- DOT -------------------------------------------------------------------------------------------


def _q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_dot(view: View) -> str:
    """Graphviz DOT source: one cluster per expanded column, collapsed layers as single boxes."""
    out = [
        "digraph lmspec {",
        f"  label={_q(view.title)}; labelloc=t; fontsize=18; fontname=Helvetica;",
        "  rankdir=TB; nodesep=0.25; ranksep=0.3; newrank=true;",
        '  node [shape=box, style="rounded,filled", fontname=Helvetica, fontsize=10];',
        '  edge [arrowsize=0.6, color="#555555"];',
    ]
    headers = dict(view.columns)
    for key, _ in view.columns:
        members = [n for n in view.nodes.values() if n.column == key]
        if not members:
            continue
        clustered = key not in view.plain
        if clustered:
            out.append(f"  subgraph {_q('cluster_' + key)} {{")
            out.append(
                f'    label={_q(headers[key])}; style="rounded,filled"; fillcolor="#fafafa"; color="#bbbbbb";'
            )
        for n in members:
            pen = ', penwidth=2, color="#c0392b"' if n.fused else ""
            out.append(f"    {_q(n.id)} [label={_q(n.label)}, fillcolor={_q(COLORS[n.color])}{pen}];")
        if clustered:
            out.append("  }")
    for a, b in view.edges:
        out.append(f"  {_q(a)} -> {_q(b)};")
    out.append("}")
    return "\n".join(out) + "\n"


# -- matplotlib --------------------------------------------------------------------------------------


def _layout(view: View) -> tuple[dict[str, tuple[float, float]], dict[str, tuple[float, float, float, int]]]:
    """Node centres and per column (x, y top, width, rows).

    Columns run left to right with rows by depth inside a column. The backbone (inputs, layers,
    head) is the top band; the MTP blocks form a second band under it, right-aligned so that the
    head's output feeds the first MTP block a short step below.
    """
    g = nx.DiGraph()
    g.add_nodes_from(view.nodes)
    g.add_edges_from(view.edges)
    order = list(nx.topological_sort(g))
    local: dict[str, dict[str, tuple[float, int]]] = {}
    size: dict[str, tuple[float, int]] = {}
    for key, _ in view.columns:
        members = [n for n in order if view.nodes[n].column == key]
        if not members:
            continue
        depth: dict[str, int] = {}
        for n in members:  # topological order: longest path from the column's sources
            depth[n] = max((depth[p] + 1 for p in g.predecessors(n) if p in depth), default=0)

        def lone_source(p: str, depth: dict[str, int] = depth) -> bool:
            return (
                not any(q in depth for q in g.predecessors(p))
                and sum(c in depth for c in g.successors(p)) == 1
            )

        # Sources, and nodes fed only by their own lone sources (labels -> targets), sit just above
        # their first consumer instead of at the top of the column.
        for n in reversed(members):
            succ = [depth[c] for c in g.successors(n) if c in depth]
            if succ and all(lone_source(p) for p in g.predecessors(n) if p in depth):
                depth[n] = min(succ) - 1
        rows: dict[int, list[str]] = {}
        for n in members:
            rows.setdefault(depth[n], []).append(n)
        width = max(len(r) for r in rows.values()) * _DX
        local[key] = {
            n: ((i - (len(ns) - 1) / 2) * _DX + width / 2, r)
            for r, ns in rows.items()
            for i, n in enumerate(ns)
        }
        size[key] = (width, len(rows))
    bands = [
        [k for k, _ in view.columns if k in size and not k.startswith("model.mtp.")],
        [k for k, _ in view.columns if k in size and k.startswith("model.mtp.")],
    ]

    def band_width(keys: list[str]) -> float:
        return sum(size[k][0] for k in keys) + _GAP * max(len(keys) - 1, 0)

    top_w = band_width(bands[0])
    pos: dict[str, tuple[float, float]] = {}
    cols: dict[str, tuple[float, float, float, int]] = {}
    y0 = 0.0
    for keys in bands:
        if not keys:
            continue
        x = top_w - band_width(keys) if keys is bands[1] else 0.0
        for k in keys:
            w, r = size[k]
            cols[k] = (x, y0, w, r)
            for n, (dx, row) in local[k].items():
                pos[n] = (x + dx, y0 - row * _DY)
            x += w + _GAP
        y0 -= max(size[k][1] for k in keys) * _DY + 1.2
    return pos, cols


_DX, _DY, _GAP = 1.2, 0.72, 0.3
_STACK = 8  # collapsed layers per stacked column


def _summary(graph: Graph) -> str:
    from lmspec.compiler.stats import stats_from_graph

    s = stats_from_graph(graph, context=4096)
    p, f = s["params"], s["flops_per_token"]

    def h(n: float) -> str:
        for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
            if n >= size:
                return f"{n / size:.2f}{unit}"
        return f"{n:g}"

    counts = graph.op_counts()
    units = ", ".join(f"{counts[u]} {u}" for u in sorted(graph.fused_units) if counts[u])
    return (
        f"params {h(p['total'])} (+{h(p['mtp'])} MTP), active {h(p['active'])}\n"
        f"forward {h(f['forward'])}FLOP/token at 4,096 context\n"
        f"fused units: {units}"
    )


def _draw_columns(ax, view: View, cols: dict[str, tuple[float, float, float, int]]) -> None:
    """A rounded grey box and a bold header behind each column that is not drawn plain."""
    from matplotlib.patches import FancyBboxPatch

    headers = dict(view.columns)
    for key, (x, y, w, r) in cols.items():
        if key in view.plain:
            continue
        ax.add_patch(
            FancyBboxPatch(
                (x - 0.05, y - r * _DY + 0.3),
                w + 0.1,
                r * _DY + 0.05,
                boxstyle="round,pad=0.02,rounding_size=0.15",
                fc="#f7f7f7",
                ec="#c8c8c8",
                lw=0.8,
                zorder=0,
            )
        )
        ax.text(
            x + w / 2,
            y + 0.55,
            headers[key],
            ha="center",
            va="center",
            fontsize=9,
            weight="bold",
            color="#333333",
        )


def _draw_nodes(ax, view: View, pos: dict[str, tuple[float, float]]) -> dict:
    """One coloured label per node (fused units with a red border); returns the text artists by node."""
    texts = {}
    for n, v in view.nodes.items():
        x, y = pos[n]
        texts[n] = ax.text(
            x,
            y,
            v.label,
            ha="center",
            va="center",
            fontsize=7,
            zorder=3,
            linespacing=1.15,
            bbox={
                "boxstyle": "round,pad=0.3",
                "fc": COLORS[v.color],
                "lw": 1.6 if v.fused else 0.6,
                "ec": "#c0392b" if v.fused else "#666666",
            },
        )
    return texts


def _draw_edges(ax, view: View, pos: dict[str, tuple[float, float]], texts: dict) -> None:
    """Arrows between node boxes: grey across columns, dark within one."""
    for a, b in view.edges:
        (xa, ya), (xb, yb) = pos[a], pos[b]
        cross = view.nodes[a].column != view.nodes[b].column
        # Skip connections inside a column bend to one side instead of running through the boxes.
        bend = not cross and abs(ya - yb) > 1.5 * _DY
        ax.annotate(
            "",
            xy=(xb, yb),
            xytext=(xa, ya),
            zorder=2,
            arrowprops={
                "arrowstyle": "-|>",
                "color": "#a0a0a0" if cross else "#505050",
                "lw": 0.7,
                "mutation_scale": 8,
                "shrinkA": 0,
                "shrinkB": 0,
                "patchA": texts[a].get_bbox_patch(),
                "patchB": texts[b].get_bbox_patch(),
                "connectionstyle": f"arc3,rad={0.35 if xa >= xb else -0.35}" if bend else "arc3",
            },
        )


def _draw_key(ax, summary: str, top: float) -> None:
    """The summary text and the colour legend, in the free space left of the MTP band (from `top`)."""
    from matplotlib.patches import Patch

    if summary:
        ax.text(0.0, top + 0.4, summary, ha="left", va="top", fontsize=9, family="monospace")
    handles = [Patch(fc=COLORS[c], ec="#c0392b" if c == "fused" else "#666666", label=t) for t, c in LEGEND]
    ax.legend(
        handles=handles,
        loc="upper left",
        fontsize=9,
        frameon=False,
        ncol=2,
        bbox_to_anchor=(0.0, top - 1.6),
        bbox_transform=ax.transData,
    )


def draw_matplotlib(view: View, path: Path, fmt: str, summary: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pos, cols = _layout(view)
    right = max(x + w for x, _, w, _ in cols.values())
    bottom = min(y - r * _DY for _, y, _, r in cols.values())
    fig, ax = plt.subplots(figsize=(max(8.0, right * 0.95), max(5.0, -bottom * 0.95 + 1.0)), dpi=110)
    ax.set_xlim(-0.3, right + 0.3)
    ax.set_ylim(bottom - 0.2, 1.0)
    ax.axis("off")
    _draw_columns(ax, view, cols)
    _draw_edges(ax, view, pos, _draw_nodes(ax, view, pos))
    fig.suptitle(view.title, fontsize=13, x=0.01, ha="left")
    band2_top = max((y for k, (_, y, *_rest) in cols.items() if k.startswith("model.mtp.")), default=bottom)
    _draw_key(ax, summary, band2_top)
    fig.tight_layout()
    fig.savefig(path, format=fmt)
    plt.close(fig)


# -- the command -------------------------------------------------------------------------------------


RENDERERS = ("auto", "dot", "matplotlib")


def render(
    graph: Graph, fmt: str, layers: set[int] | None, path: Path | None, renderer: str = "auto"
) -> str | None:
    """Render `graph` as `fmt` (text, dot, svg, png); text/dot return the source when `path` is None.

    Pictures use graphviz's `dot` when `renderer` is "dot", or "auto" and `dot` is installed;
    otherwise matplotlib.
    """
    if fmt == "text":
        src = to_text(graph, layers)
    else:
        view = build_view(graph, layers if layers is not None else default_expanded(graph))
        if fmt == "dot":
            src = to_dot(view)
        else:
            assert path is not None
            dot = shutil.which("dot") if renderer in ("auto", "dot") else None
            if renderer == "dot" and dot is None:
                raise FileNotFoundError("graphviz's dot is not installed; use --renderer matplotlib")
            if dot:
                subprocess.run([dot, f"-T{fmt}", "-o", str(path)], input=to_dot(view), text=True, check=True)
            else:
                draw_matplotlib(view, path, fmt, _summary(graph))
            return None
    if path is None:
        return src
    path.write_text(src)
    return None
