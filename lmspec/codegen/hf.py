"""transformers interop: a ``mimo_v2_flash`` config.json to a Spec and back.

transformers 5.23 can express one global and one sliding attention kind that share ``num_heads``,
``qk_head_dim``, ``v_head_dim`` and value scale, with sliding KV heads = 2 x global KV heads and sinks only on
sliding layers. A spec outside that still exports a config: the keys the Hub checkpoint uses
(``swa_num_key_value_heads``, ``add_full_attention_sink_bias``, ...) plus ``lmspec_*`` keys carry the rest, and
``config_to_spec`` reads them back; ``export_issues`` lists what stock transformers would get wrong.
"""

from __future__ import annotations

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
from lmspec.spec.loader import validate
from lmspec.spec.pattern import compress_layers

__all__ = ["config_to_spec", "export_issues", "spec_to_config"]

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


def spec_to_config(spec: Spec, dtype: str = "float32") -> dict[str, Any]:
    """A transformers ``mimo_v2_flash`` config.json for the spec (see the module docstring for the limits)."""
    m = spec.model
    g_name, s_name = _kinds(spec)
    g = m.attention[g_name] if g_name else None
    s = m.attention[s_name] if s_name else None
    ref = g or s
    assert ref is not None  # a spec has at least one layer
    layer_types = [
        SLIDING if isinstance(m.layer_attention(i), SlidingAttention) else FULL for i in range(m.num_layers)
    ]
    mlp_types = ["sparse" if isinstance(m.layer_ffn(i), MoEFFN) else "dense" for i in range(m.num_layers)]
    dense = next((f for f in m.ffn.values() if isinstance(f, DenseFFN)), None)
    moe = next((m.layer_ffn(i) for i in range(m.num_layers) if isinstance(m.layer_ffn(i), MoEFFN)), None)
    if moe is None:
        moe = next((f for f in m.ffn.values() if isinstance(f, MoEFFN)), None)
    rope: dict[str, Any] = {}
    for lt, a in ((FULL, g or s), (SLIDING, s or g)):
        assert a is not None
        rope[lt] = {
            "rope_type": "default",
            "rope_theta": float(a.rope.theta),
            "partial_rotary_factor": a.rope.fraction,
        }
    global_kv = g.num_kv_heads if g else max(1, s.num_kv_heads // 2)  # type: ignore[union-attr]
    swa_kv = s.num_kv_heads if s else 2 * global_kv
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
        "num_attention_heads": ref.num_heads,
        "num_key_value_heads": global_kv,
        "swa_num_key_value_heads": swa_kv,
        "head_dim": ref.qk_head_dim,
        "v_head_dim": ref.v_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": m.max_position_embeddings,
        "initializer_range": m.init_std,
        "rms_norm_eps": m.norm.eps,
        "tie_word_embeddings": m.tie_word_embeddings,
        "rope_parameters": rope,
        "attention_bias": ref.bias,
        "attention_dropout": 0.0,
        "attention_value_scale": ref.value_scale,
        # transformers requires an int even without sliding layers, where nothing reads it.
        "sliding_window": s.window_keys if s else m.max_position_embeddings,
        "layer_types": layer_types,
        "mlp_layer_types": mlp_types,
        "add_full_attention_sink_bias": bool(g and g.sink),
        "add_swa_attention_sink_bias": bool(s and s.sink),
        "num_nextn_predict_layers": m.mtp.num_blocks if m.mtp else 0,
        "pad_token_id": None,
        "bos_token_id": None,
        "eos_token_id": None,
        "use_cache": True,
    }
    if s is not None and s.window_convention == "previous_plus_self":
        config["sliding_window_size"] = s.window  # transformers sets sliding_window = this + 1
    if moe is not None:
        config.update(
            n_routed_experts=moe.num_experts,
            num_experts_per_tok=moe.top_k,
            moe_intermediate_size=moe.expert_intermediate_size,
            norm_topk_prob=moe.renormalize,
            routed_scaling_factor=moe.routed_scaling_factor,
            n_group=moe.num_groups,
            topk_group=moe.top_k_groups,
            scoring_func=moe.score_function,
            topk_method="noaux_tc" if moe.correction_bias else "greedy",
            n_shared_experts=moe.num_shared_experts or None,
        )
    issues = export_issues(spec)
    if issues:
        # Stock transformers cannot run this spec; the full spec rides along so config_to_spec is exact.
        config["lmspec_unsupported_by_transformers"] = issues
        config["lmspec_spec"] = spec_to_data(spec)
    return config


def _get(config: dict[str, Any], key: str, default: Any) -> Any:
    value = config.get(key)
    return default if value is None else value


def config_to_spec(config: dict[str, Any], name: str = "imported") -> Spec:
    """A Spec (no training section) from a transformers ``mimo_v2_flash`` config.json dict."""
    if "lmspec_spec" in config:
        return validate(config["lmspec_spec"], {}, "config.json:lmspec_spec")
    where = "config.json"
    model_type = config.get("model_type", "mimo_v2_flash")
    if model_type != "mimo_v2_flash":
        raise SpecError(where, 1, 1, "model_type", f"expected 'mimo_v2_flash', got {model_type!r}")
    n_layers = int(_get(config, "num_hidden_layers", 48))
    layer_types = config.get("layer_types")
    if layer_types is None and config.get("hybrid_layer_pattern") is not None:
        layer_types = [SLIDING if p else FULL for p in config["hybrid_layer_pattern"]]
    if layer_types is None:
        layer_types = [FULL if (i == 0 or not (i + 1) % 6) else SLIDING for i in range(n_layers)]
    mlp_types = config.get("mlp_layer_types")
    if mlp_types is None and config.get("moe_layer_freq") is not None:
        mlp_types = ["sparse" if f else "dense" for f in config["moe_layer_freq"]]
    if mlp_types is None:
        mlp_types = ["dense"] + ["sparse"] * (n_layers - 1)
    if len(layer_types) != n_layers or len(mlp_types) != n_layers:
        raise SpecError(
            where,
            1,
            1,
            "layer_types",
            f"expected {n_layers} entries in layer_types and mlp_layer_types, got {len(layer_types)} and {len(mlp_types)}",
        )
    heads = int(_get(config, "num_attention_heads", 64))
    kv = int(_get(config, "num_key_value_heads", 4))
    swa_kv = int(_get(config, "swa_num_key_value_heads", 2 * kv))
    head_dim = int(_get(config, "head_dim", 192))
    v_head_dim = int(_get(config, "v_head_dim", 128))
    value_scale = float(_get(config, "attention_value_scale", 1.0))
    bias = bool(_get(config, "attention_bias", False))
    # The Hub config has flat keys (rope_theta, swa_rope_theta, partial_rotary_factor); transformers nests them.
    fraction = float(_get(config, "partial_rotary_factor", 0.334))
    default_rope = {
        FULL: {"rope_theta": _get(config, "rope_theta", 5_000_000.0), "partial_rotary_factor": fraction},
        SLIDING: {"rope_theta": _get(config, "swa_rope_theta", 10_000.0), "partial_rotary_factor": fraction},
    }
    rope_params = config.get("rope_parameters") or default_rope

    def rope(lt: str) -> dict[str, float]:
        p = rope_params.get(lt) or default_rope[lt]
        return {"theta": float(p["rope_theta"]), "fraction": float(p.get("partial_rotary_factor", fraction))}

    if config.get("sliding_window_size") is not None:
        window, convention = int(config["sliding_window_size"]), "previous_plus_self"
    else:
        keys = int(_get(config, "sliding_window", 129))
        window, convention = (keys - 1, "previous_plus_self") if keys > 1 else (keys, "keys")
    attention = {
        "global": {
            "kind": "global",
            "num_heads": heads,
            "num_kv_heads": kv,
            "qk_head_dim": head_dim,
            "v_head_dim": v_head_dim,
            "rope": rope(FULL),
            "value_scale": value_scale,
            "sink": bool(_get(config, "add_full_attention_sink_bias", False)),
            "bias": bias,
        },
        "swa": {
            "kind": "sliding",
            "window": window,
            "window_convention": convention,
            "num_heads": heads,
            "num_kv_heads": swa_kv,
            "qk_head_dim": int(_get(config, "swa_head_dim", head_dim)),
            "v_head_dim": int(_get(config, "swa_v_head_dim", v_head_dim)),
            "rope": rope(SLIDING),
            "value_scale": value_scale,
            "sink": bool(_get(config, "add_swa_attention_sink_bias", True)),
            "bias": bias,
        },
    }
    ffn = {
        "dense": {"kind": "dense", "intermediate_size": int(_get(config, "intermediate_size", 16384))},
        "moe": {
            "kind": "moe",
            "num_experts": int(_get(config, "n_routed_experts", 256)),
            "top_k": int(_get(config, "num_experts_per_tok", 8)),
            "expert_intermediate_size": int(_get(config, "moe_intermediate_size", 2048)),
            "num_shared_experts": int(_get(config, "n_shared_experts", 0)),
            "score_function": str(_get(config, "scoring_func", "sigmoid")),
            "correction_bias": _get(config, "topk_method", "noaux_tc") == "noaux_tc",
            "renormalize": bool(_get(config, "norm_topk_prob", True)),
            "routed_scaling_factor": float(_get(config, "routed_scaling_factor", 1.0)),
            "num_groups": int(_get(config, "n_group", 1)),
            "top_k_groups": int(_get(config, "topk_group", 1)),
        },
    }
    block_of = {
        (FULL, "dense"): "G0",
        (FULL, "sparse"): "G",
        (SLIDING, "dense"): "S0",
        (SLIDING, "sparse"): "S",
    }
    names = []
    for lt, mt in zip(layer_types, mlp_types, strict=True):
        if (lt, mt) not in block_of:
            raise SpecError(
                where, 1, 1, "layer_types", f"expected full/sliding and dense/sparse, got {lt!r}, {mt!r}"
            )
        names.append(block_of[(lt, mt)])
    blocks = {
        b: {"attention": "global" if lt == FULL else "swa", "ffn": "dense" if mt == "dense" else "moe"}
        for (lt, mt), b in block_of.items()
        if b in names
    }
    mtp_blocks = int(_get(config, "num_nextn_predict_layers", 0))
    model: dict[str, Any] = {
        "vocab_size": int(_get(config, "vocab_size", 152576)),
        "hidden_size": int(_get(config, "hidden_size", 4096)),
        "max_position_embeddings": int(_get(config, "max_position_embeddings", 131072)),
        "norm": {
            "kind": "rmsnorm",
            "eps": float(_get(config, "rms_norm_eps", _get(config, "layernorm_epsilon", 1e-5))),
        },
        "tie_word_embeddings": bool(_get(config, "tie_word_embeddings", False)),
        "init_std": float(_get(config, "initializer_range", 0.02)),
        "attention": {
            k: v
            for k, v in attention.items()
            if any(b["attention"] == k for b in blocks.values()) or (k == "swa" and mtp_blocks)
        },
        "ffn": {
            k: v
            for k, v in ffn.items()
            if any(b["ffn"] == k for b in blocks.values()) or (k == "dense" and mtp_blocks)
        },
        "blocks": blocks,
        "layers": compress_layers(names),
    }
    if mtp_blocks:
        model["blocks"]["MTP"] = {"attention": "swa", "ffn": "dense"}
        model["mtp"] = {
            "num_blocks": mtp_blocks,
            "block": "MTP",
            "loss_weight": MTP.model_fields["loss_weight"].default,
        }
    return validate({"name": name, "model": model}, {}, where)
