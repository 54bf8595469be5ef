"""transformers interop: a ``mimo_v2_flash`` config.json to a Spec and back.

transformers 5.23 can express one global and one sliding attention kind that share ``num_heads``,
``qk_head_dim``, ``v_head_dim`` and value scale, with sliding KV heads = 2 x global KV heads and sinks only on
sliding layers. A spec outside that still exports a config: the keys the Hub checkpoint uses
(``swa_num_key_value_heads``, ``add_full_attention_sink_bias``, ...) plus ``lmspec_*`` keys carry the rest, and
``config_to_spec`` reads them back; ``export_issues`` lists what stock transformers would get wrong.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lmspec.spec import (
    MTP,
    DenseFFN,
    GlobalAttention,
    MoEFFN,
    SlidingAttention,
    Spec,
    SpecError,
    spec_to_data,
)
from lmspec.spec.limits import MAX_CONFIG_BYTES, MAX_LAYERS, clip, identifier_from, quote
from lmspec.spec.loader import read_text, validate
from lmspec.spec.pattern import compress_layers

__all__ = ["config_to_spec", "export_issues", "read_config", "spec_to_config"]

FULL = "full_attention"
SLIDING = "sliding_attention"


def _used_blocks(spec: Spec) -> list[str]:
    """Block names in use: one per decoder layer, then the MTP block (its settings ride in the config too)."""
    m = spec.model
    return list(m.layer_blocks) + ([m.mtp.block] if m.mtp and m.mtp.num_blocks else [])


def _kinds(spec: Spec) -> tuple[str | None, str | None]:
    """The global and sliding attention kind names in use (first of each, decoder layers first)."""
    m = spec.model
    g = s = None
    for block in _used_blocks(spec):
        name = m.blocks[block].attention
        if isinstance(m.attention[name], SlidingAttention):
            s = s or name
        else:
            g = g or name
    return g, s


def export_issues(spec: Spec) -> list[str]:
    """Why stock transformers 5.23 cannot run this spec exactly (empty when it can)."""
    m = spec.model
    issues: list[str] = []
    used_att = {m.blocks[b].attention for b in _used_blocks(spec)}
    used_ffn = {m.blocks[b].ffn for b in _used_blocks(spec)}
    if m.mtp and m.mtp.num_blocks:
        mtp = m.blocks[m.mtp.block]
        if not isinstance(m.attention[mtp.attention], SlidingAttention) or not isinstance(
            m.ffn[mtp.ffn], DenseFFN
        ):
            issues.append("MTP block is not sliding attention with a dense FFN")
    glob = [n for n in used_att if isinstance(m.attention[n], GlobalAttention)]
    slid = [n for n in used_att if isinstance(m.attention[n], SlidingAttention)]
    if len(glob) > 1 or len(slid) > 1:
        issues.append("more than one global or sliding attention kind")
    kinds = [m.attention[n] for n in used_att]
    for field in ("num_heads", "qk_head_dim", "v_head_dim", "value_scale", "bias"):
        if len({getattr(a, field) for a in kinds}) > 1:
            issues.append(f"attention kinds differ in {field}")
    if any(a.softmax_scale is not None for a in kinds):
        issues.append("softmax_scale other than qk_head_dim ** -0.5")
    if glob and slid and m.attention[slid[0]].num_kv_heads != 2 * m.attention[glob[0]].num_kv_heads:
        issues.append("sliding num_kv_heads is not 2 x global num_kv_heads")
    if not glob and slid and m.attention[slid[0]].num_kv_heads % 2:
        issues.append("sliding num_kv_heads is odd (transformers derives it as 2 x num_key_value_heads)")
    if any(m.attention[n].sink for n in glob) or any(not m.attention[n].sink for n in slid):
        issues.append("sinks not exactly on the sliding layers")
    dense = [n for n in used_ffn if isinstance(m.ffn[n], DenseFFN)]
    moe = [n for n in used_ffn if isinstance(m.ffn[n], MoEFFN)]
    if len(dense) > 1 or len(moe) > 1:
        issues.append("more than one dense or MoE FFN kind")
    for n in moe:
        f = m.ffn[n]
        if f.num_shared_experts:
            issues.append("shared experts")
        if f.score_function != "sigmoid":
            issues.append("softmax router")
        if not f.correction_bias:
            issues.append("router without correction bias")
    return issues


def _rope_parameters(g: Any, s: Any) -> dict[str, dict[str, Any]]:
    """transformers' nested ``rope_parameters``: one entry per layer type (a missing kind borrows the other's)."""
    rope: dict[str, Any] = {}
    for lt, a in ((FULL, g or s), (SLIDING, s or g)):
        rope[lt] = {
            "rope_type": "default",
            "rope_theta": float(a.rope.theta),
            "partial_rotary_factor": a.rope.fraction,
        }
    return rope


def _moe_config(moe: MoEFFN) -> dict[str, Any]:
    return {
        "n_routed_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "moe_intermediate_size": moe.expert_intermediate_size,
        "norm_topk_prob": moe.renormalize,
        "routed_scaling_factor": moe.routed_scaling_factor,
        "n_group": moe.num_groups,
        "topk_group": moe.top_k_groups,
        "scoring_func": moe.score_function,
        "topk_method": "noaux_tc" if moe.correction_bias else "greedy",
        "n_shared_experts": moe.num_shared_experts or None,
    }


def _attention_config(spec: Spec) -> dict[str, Any]:
    """The attention keys: heads, head dims, window, sinks, value scale and RoPE of the kinds in use."""
    m = spec.model
    g_name, s_name = _kinds(spec)
    g = m.attention[g_name] if g_name else None
    s = m.attention[s_name] if s_name else None
    ref = g or s
    assert ref is not None  # a spec has at least one layer
    global_kv = g.num_kv_heads if g else max(1, s.num_kv_heads // 2)  # type: ignore[union-attr]
    config: dict[str, Any] = {
        "num_attention_heads": ref.num_heads,
        "num_key_value_heads": global_kv,
        "swa_num_key_value_heads": s.num_kv_heads if s else 2 * global_kv,
        "head_dim": ref.qk_head_dim,
        "v_head_dim": ref.v_head_dim,
        "rope_parameters": _rope_parameters(g, s),
        "attention_bias": ref.bias,
        "attention_dropout": 0.0,
        "attention_value_scale": ref.value_scale,
        # transformers requires an int even without sliding layers, where nothing reads it.
        "sliding_window": s.window_keys if s else m.max_position_embeddings,
        "add_full_attention_sink_bias": bool(g and g.sink),
        "add_swa_attention_sink_bias": bool(s and s.sink),
    }
    if s is not None and s.window_keys > 1:
        # The previous tokens a query sees besides itself: transformers sets sliding_window = this + 1, and
        # SGLang and vLLM read only this key (the engines' code: docs/scale.md).
        config["sliding_window_size"] = s.window_keys - 1
    # The flat keys of the released config.json, which SGLang's and vLLM's MiMo-V2-Flash models read instead
    # of transformers' layer_types / rope_parameters / rms_norm_eps (transformers keeps them as plain attributes).
    swa = s or ref
    config |= {
        "swa_num_attention_heads": swa.num_heads,
        "swa_head_dim": swa.qk_head_dim,
        "swa_v_head_dim": swa.v_head_dim,
        "rope_theta": float(ref.rope.theta),  # the global kind's, or the sliding one's without global layers
        "swa_rope_theta": float(swa.rope.theta),
        # one factor for both kinds in the engines; the nested rope_parameters keep each kind's own
        "partial_rotary_factor": ref.rope.fraction,
    }
    return config


def spec_to_config(spec: Spec, dtype: str = "float32") -> dict[str, Any]:
    """A transformers ``mimo_v2_flash`` config.json for the spec (see the module docstring for the limits)."""
    m = spec.model
    layer_types = [
        SLIDING if isinstance(m.layer_attention(i), SlidingAttention) else FULL for i in range(m.num_layers)
    ]
    mlp_types = ["sparse" if isinstance(m.layer_ffn(i), MoEFFN) else "dense" for i in range(m.num_layers)]
    dense = next((f for f in m.ffn.values() if isinstance(f, DenseFFN)), None)
    moe = next((m.layer_ffn(i) for i in range(m.num_layers) if isinstance(m.layer_ffn(i), MoEFFN)), None)
    if moe is None:
        moe = next((f for f in m.ffn.values() if isinstance(f, MoEFFN)), None)
    config: dict[str, Any] = {
        "architectures": ["MiMoV2FlashForCausalLM"],
        "model_type": "mimo_v2_flash",
        "dtype": dtype,
        "vocab_size": m.vocab_size,
        "hidden_size": m.hidden_size,
        "intermediate_size": dense.intermediate_size
        if dense
        else (moe.expert_intermediate_size if moe else 1),
        "num_hidden_layers": m.num_layers,
        "hidden_act": "silu",
        "max_position_embeddings": m.max_position_embeddings,
        "initializer_range": m.init_std,
        "rms_norm_eps": m.norm.eps,
        "tie_word_embeddings": m.tie_word_embeddings,
        **_attention_config(spec),
        "layer_types": layer_types,
        "mlp_layer_types": mlp_types,
        "num_nextn_predict_layers": m.mtp.num_blocks if m.mtp else 0,
        # the released config's per-layer lists and norm epsilon, for SGLang and vLLM (see _attention_config)
        "hybrid_layer_pattern": [int(t == SLIDING) for t in layer_types],
        "moe_layer_freq": [int(t == "sparse") for t in mlp_types],
        "layernorm_epsilon": m.norm.eps,
        "pad_token_id": None,
        "bos_token_id": None,
        "eos_token_id": None,
        "use_cache": True,
    }
    if moe is not None:
        config.update(_moe_config(moe))
    issues = export_issues(spec)
    if issues:
        # Stock transformers cannot run this spec; the full spec rides along so config_to_spec is exact.
        config["lmspec_unsupported_by_transformers"] = issues
        config["lmspec_spec"] = spec_to_data(spec)
    return config


# ---------------------------------------------------------------------------------------------
# config.json -> Spec
# ---------------------------------------------------------------------------------------------

WHERE = "config.json"

# The type of each config key read, checked before any value is used: JSON's 1e9 is not an integer,
# true is not a number, and a count is never built into a list before it is known to be small.
_INT, _NUMBER, _BOOL, _TEXT = "an integer", "a number", "true or false", "a string"
_CONFIG_TYPES = {
    **dict.fromkeys(
        (
            "num_hidden_layers num_attention_heads num_key_value_heads swa_num_key_value_heads head_dim "
            "v_head_dim swa_head_dim swa_v_head_dim sliding_window sliding_window_size intermediate_size "
            "n_routed_experts num_experts_per_tok moe_intermediate_size n_shared_experts n_group topk_group "
            "num_nextn_predict_layers vocab_size hidden_size max_position_embeddings"
        ).split(),
        _INT,
    ),
    **dict.fromkeys(
        (
            "attention_value_scale partial_rotary_factor rope_theta swa_rope_theta routed_scaling_factor "
            "rms_norm_eps layernorm_epsilon initializer_range"
        ).split(),
        _NUMBER,
    ),
    **dict.fromkeys(
        (
            "attention_bias add_full_attention_sink_bias add_swa_attention_sink_bias norm_topk_prob "
            "tie_word_embeddings"
        ).split(),
        _BOOL,
    ),
    **dict.fromkeys("model_type scoring_func topk_method".split(), _TEXT),
}

# Spec fields as the config.json keys that set them, so an out-of-range value is named as written.
_CONFIG_KEY = {
    "model.vocab_size": "vocab_size",
    "model.hidden_size": "hidden_size",
    "model.max_position_embeddings": "max_position_embeddings",
    "model.init_std": "initializer_range",
    "model.norm.eps": "rms_norm_eps",
    "model.mtp.num_blocks": "num_nextn_predict_layers",
    "model.ffn.dense.intermediate_size": "intermediate_size",
    "model.ffn.moe.num_experts": "n_routed_experts",
    "model.ffn.moe.top_k": "num_experts_per_tok",
    "model.ffn.moe.expert_intermediate_size": "moe_intermediate_size",
    "model.ffn.moe.num_shared_experts": "n_shared_experts",
    "model.ffn.moe.score_function": "scoring_func",
    "model.ffn.moe.routed_scaling_factor": "routed_scaling_factor",
    "model.ffn.moe.num_groups": "n_group",
    "model.ffn.moe.top_k_groups": "topk_group",
    "model.attention.global.num_heads": "num_attention_heads",
    "model.attention.global.num_kv_heads": "num_key_value_heads",
    "model.attention.global.qk_head_dim": "head_dim",
    "model.attention.global.v_head_dim": "v_head_dim",
    "model.attention.global.value_scale": "attention_value_scale",
    "model.attention.global.rope.fraction": "rope_parameters.full_attention.partial_rotary_factor",
    "model.attention.global.rope.theta": "rope_parameters.full_attention.rope_theta",
    "model.attention.swa.num_heads": "num_attention_heads",
    "model.attention.swa.num_kv_heads": "swa_num_key_value_heads",
    "model.attention.swa.qk_head_dim": "head_dim",
    "model.attention.swa.v_head_dim": "v_head_dim",
    "model.attention.swa.window": "sliding_window",
    "model.attention.swa.value_scale": "attention_value_scale",
    "model.attention.swa.rope.fraction": "rope_parameters.sliding_attention.partial_rotary_factor",
    "model.attention.swa.rope.theta": "rope_parameters.sliding_attention.rope_theta",
}


def _error(key: str, message: str) -> SpecError:
    return SpecError(WHERE, 0, 0, clip(key), message)


def _is(value: Any, expected: str) -> bool:
    if isinstance(value, bool):
        return expected == _BOOL
    if expected == _INT:
        return isinstance(value, int)
    if expected == _NUMBER:
        return isinstance(value, (int, float)) and math.isfinite(value)
    return isinstance(value, str) if expected == _TEXT else False


def _check_types(config: dict[str, Any]) -> None:
    """Every key the import reads has the JSON type transformers means (null: the default)."""
    for key, expected in _CONFIG_TYPES.items():
        value = config.get(key)
        if value is not None and not _is(value, expected):
            raise _error(key, f"expected {expected}, got {quote(value)}")


def _get(config: dict[str, Any], key: str, default: Any) -> Any:
    value = config.get(key)
    return default if value is None else value


def _string_list(config: dict[str, Any], key: str, n_layers: int) -> list | None:
    """``config[key]`` as a list of `n_layers` entries, or None when the config leaves it out."""
    value = config.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != n_layers:
        size = f"{len(value)} entries" if isinstance(value, list) else quote(value)
        raise _error(key, f"expected a list of {n_layers} entries (num_hidden_layers), got {size}")
    return value


def _layer_types(config: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(attention type, MLP type) per decoder layer, from the config's lists or transformers' defaults."""
    n_layers = _get(config, "num_hidden_layers", 48)
    if not 1 <= n_layers <= MAX_LAYERS:  # before any per-layer list is built
        raise _error("num_hidden_layers", f"expected 1 to {MAX_LAYERS} layers, got {n_layers}")
    layer_types = _string_list(config, "layer_types", n_layers)
    pattern = _string_list(config, "hybrid_layer_pattern", n_layers)
    if layer_types is None and pattern is not None:
        layer_types = [SLIDING if p else FULL for p in pattern]
    if layer_types is None:
        layer_types = [FULL if (i == 0 or not (i + 1) % 6) else SLIDING for i in range(n_layers)]
    mlp_types = _string_list(config, "mlp_layer_types", n_layers)
    freq = _string_list(config, "moe_layer_freq", n_layers)
    if mlp_types is None and freq is not None:
        mlp_types = ["sparse" if f else "dense" for f in freq]
    if mlp_types is None:
        mlp_types = ["dense"] + ["sparse"] * (n_layers - 1)
    for i, (lt, mt) in enumerate(zip(layer_types, mlp_types, strict=True)):
        if lt not in (FULL, SLIDING) or mt not in ("dense", "sparse"):
            raise _error(
                f"layer_types.{i}", f"expected full/sliding and dense/sparse, got {quote(lt)}, {quote(mt)}"
            )
    return layer_types, mlp_types


def _rope(config: dict[str, Any], layer_type: str) -> dict[str, Any]:
    """One layer type's RoPE; the Hub config has flat keys, transformers nests them in rope_parameters."""
    fraction = _get(config, "partial_rotary_factor", 0.334)
    flat = "rope_theta" if layer_type == FULL else "swa_rope_theta"
    theta = _get(config, flat, 5_000_000.0 if layer_type == FULL else 10_000.0)
    params = config.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise _error("rope_parameters", f"expected a mapping of layer types, got {quote(params)}")
    nested = params.get(layer_type) or {}
    if not isinstance(nested, dict):
        raise _error(f"rope_parameters.{layer_type}", f"expected a mapping, got {quote(nested)}")
    return {
        "theta": nested.get("rope_theta", theta),
        "fraction": nested.get("partial_rotary_factor", fraction),
    }


def _attention_kinds(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The two attention kinds transformers can express: `global` and `swa`."""
    if config.get("sliding_window_size") is not None:
        window, convention = config["sliding_window_size"], "previous_plus_self"
    else:
        keys = _get(config, "sliding_window", 129)
        window, convention = (keys - 1, "previous_plus_self") if keys > 1 else (keys, "keys")
    head_dim = _get(config, "head_dim", 192)
    v_head_dim = _get(config, "v_head_dim", 128)
    shared = {
        "num_heads": _get(config, "num_attention_heads", 64),
        "value_scale": _get(config, "attention_value_scale", 1.0),
        "bias": _get(config, "attention_bias", False),
    }
    kv = _get(config, "num_key_value_heads", 4)
    return {
        "global": {
            "kind": "global",
            **shared,
            "num_kv_heads": kv,
            "qk_head_dim": head_dim,
            "v_head_dim": v_head_dim,
            "rope": _rope(config, FULL),
            "sink": _get(config, "add_full_attention_sink_bias", False),
        },
        "swa": {
            "kind": "sliding",
            "window": window,
            "window_convention": convention,
            **shared,
            "num_kv_heads": _get(config, "swa_num_key_value_heads", 2 * kv),
            "qk_head_dim": _get(config, "swa_head_dim", head_dim),
            "v_head_dim": _get(config, "swa_v_head_dim", v_head_dim),
            "rope": _rope(config, SLIDING),
            "sink": _get(config, "add_swa_attention_sink_bias", True),
        },
    }


def _ffn_kinds(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        "dense": {"kind": "dense", "intermediate_size": _get(config, "intermediate_size", 16384)},
        "moe": {
            "kind": "moe",
            "num_experts": _get(config, "n_routed_experts", 256),
            "top_k": _get(config, "num_experts_per_tok", 8),
            "expert_intermediate_size": _get(config, "moe_intermediate_size", 2048),
            "num_shared_experts": _get(config, "n_shared_experts", 0),
            "score_function": _get(config, "scoring_func", "sigmoid"),
            "correction_bias": _get(config, "topk_method", "noaux_tc") == "noaux_tc",
            "renormalize": _get(config, "norm_topk_prob", True),
            "routed_scaling_factor": _get(config, "routed_scaling_factor", 1.0),
            "num_groups": _get(config, "n_group", 1),
            "top_k_groups": _get(config, "topk_group", 1),
        },
    }


_BLOCK_OF = {(FULL, "dense"): "G0", (FULL, "sparse"): "G", (SLIDING, "dense"): "S0", (SLIDING, "sparse"): "S"}


def _model(config: dict[str, Any]) -> dict[str, Any]:
    """The spec's model section, as plain data, from a type-checked config."""
    layer_types, mlp_types = _layer_types(config)
    names = [_BLOCK_OF[(lt, mt)] for lt, mt in zip(layer_types, mlp_types, strict=True)]
    blocks = {
        b: {"attention": "global" if lt == FULL else "swa", "ffn": "dense" if mt == "dense" else "moe"}
        for (lt, mt), b in _BLOCK_OF.items()
        if b in names
    }
    mtp_blocks = _get(config, "num_nextn_predict_layers", 0)
    if mtp_blocks:  # the MTP block is sliding attention with a dense FFN, as on the Hub
        blocks["MTP"] = {"attention": "swa", "ffn": "dense"}
    used = blocks.values()
    model: dict[str, Any] = {
        "vocab_size": _get(config, "vocab_size", 152576),
        "hidden_size": _get(config, "hidden_size", 4096),
        "max_position_embeddings": _get(config, "max_position_embeddings", 131072),
        "norm": {
            "kind": "rmsnorm",
            "eps": _get(config, "rms_norm_eps", _get(config, "layernorm_epsilon", 1e-5)),
        },
        "tie_word_embeddings": _get(config, "tie_word_embeddings", False),
        "init_std": _get(config, "initializer_range", 0.02),
        "attention": {
            k: v for k, v in _attention_kinds(config).items() if any(b["attention"] == k for b in used)
        },
        "ffn": {k: v for k, v in _ffn_kinds(config).items() if any(b["ffn"] == k for b in used)},
        "blocks": blocks,
        "layers": compress_layers(names),
    }
    if mtp_blocks:
        model["mtp"] = {
            "num_blocks": mtp_blocks,
            "block": "MTP",
            "loss_weight": MTP.model_fields["loss_weight"].default,
        }
    return model


def read_config(path: str | Path) -> dict[str, Any]:
    """A config.json file as a dict; a one-line SpecError for anything else.

    The file must be a regular file of at most `MAX_CONFIG_BYTES` (stat first, as for spec files),
    hold JSON, and have an object at the top level.
    """
    shown = clip(str(path))
    text = read_text(Path(path), MAX_CONFIG_BYTES, "config.json file")
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise SpecError(shown, e.lineno, e.colno, "", f"expected JSON, got a syntax error: {e.msg}") from None
    except ValueError as e:  # an integer of more digits than Python converts (4300)
        raise SpecError(shown, 0, 0, "", f"expected JSON, got {clip(str(e).split(';')[0])}") from None
    except RecursionError:
        raise SpecError(shown, 0, 0, "", "expected JSON nested a few levels deep, got far deeper") from None
    if not isinstance(config, dict):
        raise SpecError(
            shown, 1, 1, "", f"expected a JSON object at the top level, got {type(config).__name__}"
        )
    return config


def config_to_spec(config: dict[str, Any], name: str = "imported") -> Spec:
    """A Spec (no training section) from a transformers ``mimo_v2_flash`` config.json dict.

    Every key read is type-checked first (JSON's ``1e9`` is not an integer) and the layer count is
    bounded before any per-layer list is built; the result is validated like any spec, with errors
    naming the config key. ``name`` — usually a folder or file name — is made an identifier
    (``MiMo-V2-Flash`` becomes ``MiMo_V2_Flash``); names *inside* the config (an embedded
    ``lmspec_spec``) must already be identifiers, as in any spec.
    """
    if not isinstance(config, dict):
        raise _error("", f"expected a JSON object at the top level, got {type(config).__name__}")
    if "lmspec_spec" in config:
        embedded = config["lmspec_spec"]
        if not isinstance(embedded, dict):
            raise _error("lmspec_spec", f"expected a spec mapping, got {quote(embedded)}")
        return validate(embedded, {}, f"{WHERE}:lmspec_spec")
    _check_types(config)
    model_type = config.get("model_type", "mimo_v2_flash")
    if model_type != "mimo_v2_flash":
        raise _error("model_type", f"expected 'mimo_v2_flash', got {quote(model_type)}")
    data = {"name": identifier_from(name), "model": _model(config)}
    try:
        return validate(data, {}, WHERE)
    except SpecError as e:
        key = _CONFIG_KEY.get(e.field)
        if key is None:
            raise
        raise _error(key, e.message) from None
