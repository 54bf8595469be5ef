"""`lmspec export` writes what SGLang's and vLLM's MiMo-V2-Flash loaders read: tensor names, shapes and
config.json keys, checked against their expectations written down as data (the engines are not run here).

The expectations come from reading these files (the commits are those the code index held):

- SGLang ``sgl-project/sglang``: ``python/sglang/srt/models/mimo_v2_flash.py`` (0a41b3bf99b0), the main model,
  and ``python/sglang/srt/models/mimo_v2_flash_nextn.py`` (10c947154ea0), the MTP draft model.
- vLLM ``vllm-project/vllm``: ``vllm/model_executor/models/mimo_v2_flash.py`` (01ed47b4166b) and
  ``vllm/model_executor/models/mimo_v2_mtp.py`` (037951aa733b).

What both loaders do with a checkpoint name, in short:

- ``q_proj`` / ``k_proj`` / ``v_proj`` are stacked into their ``qkv_proj`` and ``gate_proj`` / ``up_proj`` into
  ``gate_up_proj``, so the checkpoint holds them apart; a fused name would match no parameter.
- Routed experts are read one expert at a time, ``mlp.experts.{e}.{gate,up,down}_proj.weight`` (their
  expert-parallel ranks keep only their own ``e``), never as transformers' in-memory (E, 2I, H) stack.
- The sink is ``self_attn.attention_sink_bias`` (num_heads,), sliced by attention-TP rank.
- Names containing ``mtp`` are skipped by the main model and read by the draft model, which also takes
  ``model.embed_tokens`` and ``lm_head`` (shared). vLLM names the MTP block's second norm only
  ``pre_mlp_layernorm`` (a name it lacks is skipped without a word); SGLang maps it to its
  ``post_attention_layernorm``. vLLM builds MTP layer 0 only; SGLang maps every ``model.mtp.layers.{k}``
  onto its one draft block.
- A name that matches no parameter is skipped (vLLM) or logged and skipped (SGLang), so a wrong name leaves
  a weight uninitialised rather than failing: hence an exact name set here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import lmspec
from lmspec.cli import main
from lmspec.codegen.hf import spec_to_config
from lmspec.spec import load_spec

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "examples" / "mimo_v2_flash_tiny.yaml"
FULL = ROOT / "examples" / "mimo_v2_flash.yaml"
# The tiny spec's sliding kind has as many KV heads as its global one; transformers (and the engines' config,
# which derives nothing) wants the released ratio of 2, so the export test widens it as docs/scale.md does.
TINY_EXPORTABLE = ["model.attention.swa.num_kv_heads=4"]

# config.json keys the engines read (getattr with a default where the code has one, else plain attribute
# access, which raises on a config without the key). Value: the JSON type.
ENGINE_CONFIG_KEYS: dict[str, type | tuple[type, ...]] = {
    "architectures": list,  # both register MiMoV2FlashForCausalLM
    "vocab_size": int,
    "hidden_size": int,
    "num_hidden_layers": int,
    "intermediate_size": int,
    "hidden_act": str,  # both refuse anything but silu
    "layernorm_epsilon": float,  # not rms_norm_eps
    "tie_word_embeddings": bool,
    "max_position_embeddings": int,
    "hybrid_layer_pattern": list,  # 1 = sliding layer; not layer_types
    "moe_layer_freq": list,  # 1 = MoE layer; not mlp_layer_types
    "num_attention_heads": int,
    "num_key_value_heads": int,
    "head_dim": int,
    "v_head_dim": int,
    "swa_num_attention_heads": int,
    "swa_num_key_value_heads": int,
    "swa_head_dim": int,
    "swa_v_head_dim": int,
    "sliding_window_size": int,  # previous tokens besides the query; not sliding_window
    "attention_bias": bool,
    "attention_value_scale": float,
    "add_swa_attention_sink_bias": bool,
    "add_full_attention_sink_bias": bool,  # SGLang only; vLLM never gives a global layer a sink
    "rope_theta": float,  # flat; not rope_parameters
    "swa_rope_theta": float,
    "partial_rotary_factor": float,
    "n_routed_experts": int,
    "num_experts_per_tok": int,
    "moe_intermediate_size": int,
    "norm_topk_prob": bool,
    "n_group": int,
    "topk_group": int,
    "topk_method": str,  # SGLang makes e_score_correction_bias only for noaux_tc; vLLM always does
    "num_nextn_predict_layers": int,
}


def _attention(c: dict, sliding: bool) -> tuple[int, int, int, int, bool]:
    """(heads, KV heads, q/k head dim, v head dim, sink) of one attention kind, from the engines' keys."""
    if sliding:
        return (
            c["swa_num_attention_heads"],
            c["swa_num_key_value_heads"],
            c["swa_head_dim"],
            c["swa_v_head_dim"],
            c["add_swa_attention_sink_bias"],
        )
    return (
        c["num_attention_heads"],
        c["num_key_value_heads"],
        c["head_dim"],
        c["v_head_dim"],
        c["add_full_attention_sink_bias"],
    )


def _attention_keys(prefix: str, c: dict, sliding: bool) -> dict[str, tuple[int, ...]]:
    heads, kv, qk, v, sink = _attention(c, sliding)
    h = c["hidden_size"]
    keys = {
        f"{prefix}.self_attn.q_proj.weight": (heads * qk, h),
        f"{prefix}.self_attn.k_proj.weight": (kv * qk, h),
        f"{prefix}.self_attn.v_proj.weight": (kv * v, h),
        f"{prefix}.self_attn.o_proj.weight": (h, heads * v),
    }
    if sink:
        keys[f"{prefix}.self_attn.attention_sink_bias"] = (heads,)
    return keys


def _dense_keys(prefix: str, c: dict) -> dict[str, tuple[int, ...]]:
    h, i = c["hidden_size"], c["intermediate_size"]
    return {
        f"{prefix}.mlp.gate_proj.weight": (i, h),
        f"{prefix}.mlp.up_proj.weight": (i, h),
        f"{prefix}.mlp.down_proj.weight": (h, i),
    }


def engine_main_keys(c: dict) -> dict[str, tuple[int, ...]]:
    """Every checkpoint name the main models' load_weights fills, with its shape, from config.json alone."""
    h, v = c["hidden_size"], c["vocab_size"]
    keys: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not c["tie_word_embeddings"]:
        keys["lm_head.weight"] = (v, h)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        keys |= {f"{p}.input_layernorm.weight": (h,), f"{p}.post_attention_layernorm.weight": (h,)}
        keys |= _attention_keys(p, c, sliding=c["hybrid_layer_pattern"][i] == 1)
        if not c["moe_layer_freq"][i]:
            keys |= _dense_keys(p, c)
            continue
        n, mi = c["n_routed_experts"], c["moe_intermediate_size"]
        keys[f"{p}.mlp.gate.weight"] = (n, h)
        keys[f"{p}.mlp.gate.e_score_correction_bias"] = (n,)  # vLLM always; SGLang for noaux_tc (asserted)
        for e in range(n):
            keys |= {
                f"{p}.mlp.experts.{e}.gate_proj.weight": (mi, h),
                f"{p}.mlp.experts.{e}.up_proj.weight": (mi, h),
                f"{p}.mlp.experts.{e}.down_proj.weight": (h, mi),
            }
    return keys


def engine_mtp_keys(c: dict) -> dict[str, tuple[int, ...]]:
    """Every ``model.mtp.layers.{k}`` name the draft models read: an SWA layer with a dense FFN between
    enorm/hnorm/eh_proj and final_layernorm."""
    h = c["hidden_size"]
    keys: dict[str, tuple[int, ...]] = {}
    for k in range(c["num_nextn_predict_layers"]):
        p = f"model.mtp.layers.{k}"
        for norm in ("enorm", "hnorm", "final_layernorm", "input_layernorm", "pre_mlp_layernorm"):
            keys[f"{p}.{norm}.weight"] = (h,)
        keys[f"{p}.eh_proj.weight"] = (h, 2 * h)  # concat[enorm(embedding), hnorm(hidden)] -> hidden
        keys |= _attention_keys(p, c, sliding=True)
        keys |= _dense_keys(p, c)
    return keys


def _exported(directory: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A fresh tiny model (MTP blocks included) saved as a checkpoint, then ``lmspec export``-ed."""
    root = tmp_path_factory.mktemp("engine")
    spec = load_spec(TINY, TINY_EXPORTABLE)
    torch.manual_seed(11)
    model = lmspec.build(spec)
    with torch.no_grad():  # non-zero sinks and balancing biases, so a mix-up shows in the logits
        for name, t in model.state_dict().items():
            if name.endswith(("sinks", "e_score_correction_bias")):
                t.normal_(0.0, 0.5)
    model.save_pretrained(root / "ckpt")
    assert main(["export", str(root / "ckpt"), "--out", str(root / "out")]) == 0
    return root / "ckpt", root / "out"


def test_export_holds_exactly_the_names_and_shapes_the_engines_load(exported):
    _, out = exported
    config = json.loads((out / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 3 and config["topk_method"] == "noaux_tc"
    expected = engine_main_keys(config) | engine_mtp_keys(config)
    got = _exported(out)
    assert sorted(set(expected) - set(got)) == []  # nothing an engine asks for is missing
    assert sorted(set(got) - set(expected)) == []  # nothing is written that no loader rule consumes
    assert {k: got[k] for k in expected} == expected
    mtp = [k for k in got if "mtp" in k]
    assert len(mtp) == 3 * 14 and all(k.startswith("model.mtp.layers.") for k in mtp)


def test_config_carries_every_key_the_engines_read(exported):
    _, out = exported
    config = json.loads((out / "config.json").read_text())
    for key, kind in ENGINE_CONFIG_KEYS.items():
        assert key in config, key
        value = config[key]
        assert isinstance(value, kind) and not (kind is int and isinstance(value, bool)), (key, value)
    spec = load_spec(TINY, TINY_EXPORTABLE)
    m = spec.model
    assert config["architectures"] == ["MiMoV2FlashForCausalLM"]
    assert config["hybrid_layer_pattern"] == [0, 1, 1, 0, 1, 1, 0]  # "G0 S*2 G S*2 G"
    assert config["moe_layer_freq"] == [0, 1, 1, 1, 1, 1, 1]
    assert config["sliding_window_size"] == m.attention["swa"].window_keys - 1 == 32
    assert config["layernorm_epsilon"] == m.norm.eps
    assert config["swa_rope_theta"] == m.attention["swa"].rope.theta
    assert config["rope_theta"] == m.attention["global"].rope.theta
    assert (
        config["partial_rotary_factor"]
        == m.attention["swa"].rope.fraction
        == m.attention["global"].rope.fraction
    )


def test_released_spec_config_matches_the_hub_keys_and_the_serving_layout():
    """The full spec's config.json gives the engines the released values, and splits as TP8 · DP2 needs."""
    config = spec_to_config(load_spec(FULL))
    pattern = [0 if (i == 0 or not (i + 1) % 6) else 1 for i in range(48)]
    assert config["hybrid_layer_pattern"] == pattern and config["moe_layer_freq"] == [0] + [1] * 47
    assert config["sliding_window_size"] == 128 and config["layernorm_epsilon"] == 1e-5
    assert (config["swa_num_attention_heads"], config["swa_head_dim"], config["swa_v_head_dim"]) == (
        64,
        192,
        128,
    )
    assert (config["rope_theta"], config["swa_rope_theta"], config["partial_rotary_factor"]) == (
        5e6,
        1e4,
        0.334,
    )
    assert config["add_swa_attention_sink_bias"] and not config["add_full_attention_sink_bias"]
    assert config["n_routed_experts"] == 256 and config["topk_method"] == "noaux_tc"
    # SGLang --tp-size 8 --dp-size 2 --enable-dp-attention: attention at TP 4, whose ranks split heads, KV heads
    # and sinks evenly (its asserts); DeepEP puts 256 / 8 experts on each GPU.
    attn_tp = 8 // 2
    for heads, kv in ((64, 4), (config["swa_num_attention_heads"], config["swa_num_key_value_heads"])):
        assert heads % attn_tp == 0 and kv % attn_tp == 0
    assert config["n_routed_experts"] % 8 == 0
    keys = engine_main_keys(config) | engine_mtp_keys(config)
    assert len(keys) == 3 + 48 * 6 + 39 + 47 * (2 + 256 * 3) + 3 + 3 * 14
    assert keys["model.layers.1.mlp.experts.255.down_proj.weight"] == (4096, 2048)
    assert keys["model.mtp.layers.2.self_attn.k_proj.weight"] == (8 * 192, 4096)


def test_export_loads_back_in_lmspec_and_transformers(exported):
    ckpt, out = exported
    ours = lmspec.from_pretrained(ckpt)
    again = lmspec.from_pretrained(out)  # the per-expert, Hub-named file back into the fused modules
    for (n, p), (_, q) in zip(ours.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(p, q), n
    transformers = pytest.importorskip("transformers")
    back = transformers.MiMoV2FlashForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    x = torch.randint(0, 256, (2, 80), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (ours(x).logits - back(x).logits).abs().max().item() < 1e-4
