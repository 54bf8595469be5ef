"""Render the model module for a lowered graph: the Jinja context, the template, and formatting."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jinja2
import torch

import lmspec
from lmspec.compiler import Graph
from lmspec.spec import GlobalAttention, MoEFFN, SlidingAttention, spec_hash
from lmspec.spec.pattern import compress_layers

TEMPLATE_DIR = Path(__file__).parent / "templates"
MODEL_TEMPLATE = "model.py.jinja"


def class_name(name: str, suffix: str = "") -> str:
    """`mimo_v2_flash_tiny` -> `MimoV2FlashTiny`; `swa` + Attention -> `SwaAttention`; keeps a valid identifier."""
    parts = [p for p in re.split(r"[^0-9A-Za-z]+", name) if p]
    text = "".join(p[0].upper() + p[1:] for p in parts) or "Unnamed"
    if text[0].isdigit():
        text = "K" + text
    return text + suffix


def _unique(names: dict[str, str]) -> dict[str, str]:
    """Make class names unique when two spec names sanitise to the same identifier."""
    seen: dict[str, int] = {}
    out = {}
    for key, cls in names.items():
        n = seen.get(cls, 0)
        seen[cls] = n + 1
        out[key] = cls if n == 0 else f"{cls}{n + 1}"
    return out


def _attention_context(name: str, cls: str, a: GlobalAttention | SlidingAttention) -> dict[str, Any]:
    if isinstance(a, SlidingAttention):
        window = f"window={a.window} {a.window_convention} -> {a.window_keys} keys"
    else:
        window = "global: every earlier key"
    return {
        "name": name,
        "cls": cls,
        "kind": a.kind,
        "num_heads": a.num_heads,
        "num_kv_heads": a.num_kv_heads,
        "qk_head_dim": a.qk_head_dim,
        "v_head_dim": a.v_head_dim,
        "rope_dim": a.rope_dim,
        "theta": float(a.rope.theta),
        "value_scale": float(a.value_scale),
        "sink": a.sink,
        "bias": a.bias,
        # The default scale is written as transformers computes it, so the float is the same and readable.
        "scale": f"{a.qk_head_dim} ** -0.5" if a.softmax_scale is None else repr(float(a.softmax_scale)),
        "window_keys": a.window_keys,
        "window_comment": window,
    }


def _ffn_context(name: str, cls: str, f: Any) -> dict[str, Any]:
    ctx: dict[str, Any] = {"name": name, "cls": cls, "kind": f.kind}
    if isinstance(f, MoEFFN):
        ctx.update(
            num_experts=f.num_experts,
            top_k=f.top_k,
            expert_intermediate_size=f.expert_intermediate_size,
            num_shared_experts=f.num_shared_experts,
            shared_intermediate_size=f.expert_intermediate_size * f.num_shared_experts,
            score_function=f.score_function,
            correction_bias=f.correction_bias,
            renormalize=f.renormalize,
            routed_scaling_factor=float(f.routed_scaling_factor),
            num_groups=f.num_groups,
            top_k_groups=f.top_k_groups,
        )
    else:
        ctx.update(intermediate_size=f.intermediate_size)
    return ctx


def _used_by(block: str, graph: Graph) -> str:
    layers = [layer.index for layer in graph.layers if layer.block == block]
    parts = []
    if layers:
        parts.append(f"layers {compress_indices(layers)}")
    if any(layer.block == block for layer in graph.mtp_layers):
        parts.append("the MTP blocks")
    return " and ".join(parts)


def compress_indices(indices: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    runs: list[str] = []
    start = prev = indices[0]
    for i in [*indices[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        runs.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ", ".join(runs)


def spec_locations(spec_path: str | None) -> dict[str, str]:
    """`model.attention.swa` -> `examples/x.yaml:24` for the kinds and blocks of a spec file (empty if unreadable)."""
    if spec_path is None or not Path(spec_path).is_file():
        return {}
    from lmspec.spec import SpecError
    from lmspec.spec.loader import load

    try:
        positions = load(spec_path).positions
    except SpecError:  # valid only with overrides: the header then names the file without lines
        return {}
    return {
        ".".join(map(str, path)): f"{pos.file}:{pos.line}"
        for path, pos in positions.items()
        if len(path) == 3 and path[0] == "model" and path[1] in ("attention", "ffn", "blocks")
    }


def model_context(
    graph: Graph, spec_path: str | None = None, locations: dict[str, str] | None = None
) -> dict[str, Any]:
    """Everything the model template reads, from the graph (layers, MTP layers, fused units) and its Spec."""
    where = locations or {}

    def spec_ref(path: str) -> str:
        return f"{path} ({where[path]})" if path in where else path

    spec = graph.spec
    m = spec.model
    used_blocks = [layer.block for layer in graph.layers] + [layer.block for layer in graph.mtp_layers]
    block_names = list(dict.fromkeys(used_blocks))
    att_names = list(dict.fromkeys(m.blocks[b].attention for b in block_names))
    ffn_names = list(dict.fromkeys(m.blocks[b].ffn for b in block_names))
    cls = _unique(
        {("a", n): class_name(n, "Attention") for n in att_names}
        | {("f", n): class_name(n, "FFN") for n in ffn_names}
        | {("b", n): class_name(n, "Block") for n in block_names}
    )
    attention = {n: _attention_context(n, cls[("a", n)], m.attention[n]) for n in att_names}
    ffn = {n: _ffn_context(n, cls[("f", n)], m.ffn[n]) for n in ffn_names}
    for n, ctx in attention.items():
        ctx["spec_ref"] = spec_ref(f"model.attention.{n}")
    for n, ctx in ffn.items():
        ctx["spec_ref"] = spec_ref(f"model.ffn.{n}")
    blocks = {
        n: {
            "name": n,
            "cls": cls[("b", n)],
            "attention": attention[m.blocks[n].attention],
            "ffn": ffn[m.blocks[n].ffn],
            "used_by": _used_by(n, graph),
            "spec_ref": spec_ref(f"model.blocks.{n}"),
        }
        for n in block_names
    }
    digest = spec_hash(spec)
    header = [
        f'"""{spec.name}: model module generated by lmspec {lmspec.__version__} for torch {torch.__version__}.',
        "",
        f"Spec: {spec_path or spec.name} (sha256 {digest})",
        f"Template: lmspec/codegen/templates/{MODEL_TEMPLATE}",
        f"Fused units: {', '.join(sorted(graph.fused_units)) or 'none'}",
        "Do not edit: change the spec and recompile.",
        '"""',
    ]
    mtp = None
    if graph.mtp_layers:
        mtp = {"num_blocks": len(graph.mtp_layers), "block": blocks[graph.mtp_layers[0].block]}
    return {
        "header": "\n".join(header),
        "spec_name": spec.name,
        "spec_hash": digest,
        "prefix": class_name(spec.name),
        "hidden_size": m.hidden_size,
        "vocab_size": m.vocab_size,
        "eps": float(m.norm.eps),
        "init_std": float(m.init_std),
        "tie": m.tie_word_embeddings,
        "num_layers": len(graph.layers),
        "fused_units": sorted(graph.fused_units),
        "fused_units_repr": repr(tuple(sorted(graph.fused_units))).replace("'", '"'),
        "attention": list(attention.values()),
        "ffn": list(ffn.values()),
        "blocks": list(blocks.values()),
        "layers": [{"index": layer.index, "cls": blocks[layer.block]["cls"]} for layer in graph.layers],
        "layers_pattern": compress_layers([layer.block for layer in graph.layers]),
        "mtp": mtp,
    }


def _env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def template_sources() -> bytes:
    """The bytes of every model template: part of the cache key."""
    return b"".join(p.read_bytes() for p in sorted(TEMPLATE_DIR.glob("model*.jinja")))


def _ruff() -> list[str] | None:
    exe = shutil.which("ruff")
    if exe:
        return [exe]
    try:
        import ruff  # noqa: F401
    except ImportError:
        return None
    return [sys.executable, "-m", "ruff"]


def format_source(text: str) -> str:
    """`ruff format` the rendered text when ruff is available; the template is tidy enough without it."""
    cmd = _ruff()
    if cmd is None:
        return text
    try:
        done = subprocess.run(
            [*cmd, "format", "--line-length", "110", "--isolated", "-"],
            input=text,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return text
    return done.stdout if done.returncode == 0 and done.stdout else text


def render_model(
    graph: Graph,
    spec_path: str | None = None,
    locations: dict[str, str] | None = None,
    *,
    format: bool = True,
) -> str:
    """Source text of the model module for this graph (``locations``: see ``spec_locations``)."""
    text = _env().get_template(MODEL_TEMPLATE).render(**model_context(graph, spec_path, locations))
    text = re.sub(r"\n{4,}", "\n\n\n", text)
    return format_source(text) if format else text
