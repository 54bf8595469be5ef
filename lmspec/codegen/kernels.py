"""Render the Triton kernel templates for one spec.

``render_kernels(constants, out_dir)`` turns a dict of per-spec constants into readable Python modules, one
per kernel family and variant, plus ``kernels.json`` (the manifest ``TritonBackend`` loads). The constants
keep the names used everywhere else (``window_keys``, ``sink``, ``qk_head_dim``, ``v_head_dim``,
``value_scale``, ``rope_dim``, ``top_k``, ``num_experts``) and become ``tl.constexpr`` or Jinja structure.

Constants, all keys optional::

    {"attention": [{"name": "swa", "window_keys": 129, "sink": True, "qk_head_dim": 192, "v_head_dim": 128,
                    "value_scale": 0.707, "num_heads": 64, "num_kv_heads": 8, "rope_dim": 64}, ...],
     "moe": {"num_experts": 256, "top_k": 8, "score_function": "sigmoid", "renormalize": True,
             "routed_scaling_factor": 1.0, "num_groups": 1, "top_k_groups": 1},
     "rmsnorm": {"eps": 1e-5},
     "lm_head_ce": {"vocab_size": 152576}}

``swiglu`` is always rendered; ``rope`` once per distinct (rope_dim, qk_head_dim) of the attention variants.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import jinja2

TEMPLATE_DIR = Path(__file__).parent / "templates"
MANIFEST = "kernels.json"
FAMILIES = ("rmsnorm", "swiglu", "rope", "attention", "decode_attention", "moe", "lm_head_ce")


@dataclass(frozen=True)
class RenderedModule:
    """One rendered kernel module: its family, file stem, kernel-name prefix and baked constants."""

    family: str
    module: str
    prefix: str
    constants: dict[str, Any] = field(default_factory=dict)


def _fmt(x: float) -> str:
    return repr(float(x)).replace(".", "p").replace("-", "m")


def attention_variant(c: Mapping[str, Any]) -> str:
    """Name of an attention variant, e.g. ``swa_sink_w129_qk192_v128_vs0p707`` (value scale only if != 1)."""
    window = c.get("window_keys")
    parts = ["swa" if window else "full"]
    if c.get("sink"):
        parts.append("sink")
    if window:
        parts.append(f"w{window}")
    parts += [f"qk{c['qk_head_dim']}", f"v{c['v_head_dim']}"]
    if float(c.get("value_scale", 1.0)) != 1.0:
        parts.append(f"vs{_fmt(c['value_scale'])}")
    return "_".join(parts)


def _attention_constants(c: Mapping[str, Any], count_blocks: bool) -> dict[str, Any]:
    window = c.get("window_keys")
    if window is not None and int(window) < 1:
        raise ValueError(f"window_keys must be >= 1, got {window}")
    return {
        "window_keys": int(window) if window else None,
        "sink": bool(c.get("sink", False)),
        "qk_head_dim": int(c["qk_head_dim"]),
        "v_head_dim": int(c["v_head_dim"]),
        "value_scale": float(c.get("value_scale", 1.0)),
        "count_blocks": count_blocks,
    }


def _moe_constants(c: Mapping[str, Any]) -> dict[str, Any]:
    score = c.get("score_function", "sigmoid")
    if score not in ("sigmoid", "softmax"):
        raise ValueError(f"score_function must be 'sigmoid' or 'softmax', got {score!r}")
    return {
        "num_experts": int(c["num_experts"]),
        "top_k": int(c["top_k"]),
        "score_function": score,
        "renormalize": bool(c.get("renormalize", True)),
        "routed_scaling_factor": float(c.get("routed_scaling_factor", 1.0)),
        "num_groups": int(c.get("num_groups", 1)),
        "top_k_groups": int(c.get("top_k_groups", 1)),
    }


def plan_modules(constants: Mapping[str, Any], *, count_blocks: bool = False) -> list[RenderedModule]:
    """The modules ``render_kernels`` writes for these constants (pure: no files touched)."""
    mods: list[RenderedModule] = []
    eps = float(constants.get("rmsnorm", {}).get("eps", 1e-6))
    mods.append(RenderedModule("rmsnorm", "rmsnorm", f"lmspec_add_rmsnorm_eps{_fmt(eps)}", {"eps": eps}))
    mods.append(RenderedModule("swiglu", "swiglu", "lmspec_swiglu", {}))
    seen_rope: set[tuple[int, int]] = set()
    for c in constants.get("attention", []):
        base = _attention_constants(c, count_blocks)
        variant = attention_variant(c)
        mods.append(RenderedModule("attention", f"attn_{variant}", f"lmspec_attn_{variant}", base))
        decode = {k: v for k, v in base.items() if k != "count_blocks"}
        mods.append(
            RenderedModule("decode_attention", f"decode_{variant}", f"lmspec_decode_{variant}", decode)
        )
        rope_dim = c.get("rope_dim")
        if rope_dim and (int(rope_dim), base["qk_head_dim"]) not in seen_rope:
            seen_rope.add((int(rope_dim), base["qk_head_dim"]))
            name = f"rope_r{rope_dim}_qk{base['qk_head_dim']}"
            rc = {"rope_dim": int(rope_dim), "qk_head_dim": base["qk_head_dim"]}
            mods.append(RenderedModule("rope", name, f"lmspec_{name}", rc))
    if "moe" in constants:
        m = _moe_constants(constants["moe"])
        name = f"moe_{m['score_function']}_e{m['num_experts']}_k{m['top_k']}"
        mods.append(RenderedModule("moe", name, f"lmspec_{name}", m))
    if "lm_head_ce" in constants:
        vocab = int(constants["lm_head_ce"]["vocab_size"])
        mods.append(
            RenderedModule(
                "lm_head_ce", f"lm_head_ce_v{vocab}", f"lmspec_lm_head_ce_v{vocab}", {"vocab_size": vocab}
            )
        )
    names = [m.module for m in mods]
    if len(set(names)) != len(names):
        raise ValueError(f"two kernel variants render to the same module name: {names}")
    return mods


def _env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def template_hash(family: str) -> str:
    """Short content hash of a family's template, written into headers and the manifest."""
    return hashlib.sha256((TEMPLATE_DIR / f"{family}.py.jinja").read_bytes()).hexdigest()[:12]


def _header(mod: RenderedModule, spec_name: str) -> str:
    lines = [
        f"# Generated by lmspec from spec {spec_name}; do not edit (re-render instead).",
        f"# Template: lmspec/codegen/templates/{mod.family}.py.jinja (sha256 {template_hash(mod.family)})",
        f"# Kernels: {mod.prefix}_*",
        "# Baked constants: " + (", ".join(f"{k}={v!r}" for k, v in mod.constants.items()) or "none"),
    ]
    return "\n".join(lines)


def _extra_context(mod: RenderedModule) -> dict[str, Any]:
    c = mod.constants
    if mod.family == "rope":
        half = c["rope_dim"] // 2
        rest = c["qk_head_dim"] - c["rope_dim"]
        return {
            "half_pad": 1 << max(0, (half - 1).bit_length()),
            "pass_pad": (1 << (rest - 1).bit_length()) if rest > 0 else 0,
        }
    if mod.family == "moe":
        e = c["num_experts"]
        return {"experts_pad": max(16, 1 << (e - 1).bit_length())}
    return {}


def render_module(mod: RenderedModule, spec_name: str = "<unnamed spec>") -> str:
    """Source text of one rendered module."""
    template = _env().get_template(f"{mod.family}.py.jinja")
    return template.render(
        header=_header(mod, spec_name), prefix=mod.prefix, **mod.constants, **_extra_context(mod)
    )


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def render_kernels(
    constants: Mapping[str, Any],
    out_dir: str | Path,
    *,
    spec_name: str = "<unnamed spec>",
    count_blocks: bool = False,
) -> list[Path]:
    """Render every kernel module these constants need into ``out_dir``; returns the written paths.

    Also writes ``kernels.json`` (the last path returned), listing each module's family, kernel prefix and
    constants. ``count_blocks`` adds a debug output to attention forward kernels that counts key blocks.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mods = plan_modules(constants, count_blocks=count_blocks)
    paths = []
    for mod in mods:
        path = out / f"{mod.module}.py"
        _write_atomic(path, render_module(mod, spec_name))
        paths.append(path)
    manifest = {
        "spec": spec_name,
        "modules": [
            asdict(m) | {"file": f"{m.module}.py", "template_sha": template_hash(m.family)} for m in mods
        ],
    }
    manifest_path = out / MANIFEST
    _write_atomic(manifest_path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    paths.append(manifest_path)
    return paths
