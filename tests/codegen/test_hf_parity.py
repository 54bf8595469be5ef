"""Parity with transformers' own MiMoV2FlashForCausalLM (eager attention, float32), both directions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lmspec
from lmspec.cli import main
from lmspec.codegen.hf import config_to_spec, export_issues, spec_to_config
from lmspec.spec import load_spec

transformers = pytest.importorskip("transformers")
from transformers import MiMoV2FlashConfig, MiMoV2FlashForCausalLM  # noqa: E402

FULL = Path(__file__).resolve().parents[2] / "examples" / "mimo_v2_flash.yaml"
G, S = "full_attention", "sliding_attention"

CONFIGS = {
    # several global and sliding layers, routed MoE, sinks, value scale, GQA, qk != v, window 9
    "hybrid": dict(
        num_hidden_layers=6,
        layer_types=[G, S, S, G, S, S],
        mlp_layer_types=["dense"] + ["sparse"] * 5,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=12,
        v_head_dim=8,
        sliding_window=9,
        attention_value_scale=0.707,
        n_routed_experts=6,
        num_experts_per_tok=2,
        rope_parameters={
            G: {"rope_type": "default", "rope_theta": 50000.0, "partial_rotary_factor": 0.334},
            S: {"rope_type": "default", "rope_theta": 1000.0, "partial_rotary_factor": 0.5},
        },
    ),
    # odd sizes, group-limited routing, no renormalisation, scaling factor, sliding first, tied head
    "grouped": dict(
        num_hidden_layers=4,
        layer_types=[S, G, S, S],
        mlp_layer_types=["sparse", "dense", "sparse", "sparse"],
        num_attention_heads=6,
        num_key_value_heads=3,
        head_dim=10,
        v_head_dim=14,
        sliding_window=5,
        attention_value_scale=1.3,
        n_routed_experts=8,
        num_experts_per_tok=3,
        n_group=4,
        topk_group=2,
        norm_topk_prob=False,
        routed_scaling_factor=2.5,
        tie_word_embeddings=True,
        rope_parameters={
            G: {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0},
            S: {"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.4},
        },
    ),
    # MHA on global layers, no value scale, a single expert chosen
    "mha": dict(
        num_hidden_layers=3,
        layer_types=[G, S, G],
        mlp_layer_types=["sparse"] * 3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        v_head_dim=16,
        sliding_window=7,
        attention_value_scale=None,
        n_routed_experts=4,
        num_experts_per_tok=1,
        rope_parameters={
            G: {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
            S: {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
        },
    ),
    # odd rotary products, which transformers rounds up: head_dim 16 with the default factor 0.334
    # gives int(5.344) = 5 -> 3 frequencies over 6 dims; 16 x 0.45 gives 7 -> 4 frequencies over 8 dims
    "odd_rotary": dict(
        num_hidden_layers=3,
        layer_types=[G, S, G],
        mlp_layer_types=["dense", "sparse", "sparse"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        v_head_dim=8,
        sliding_window=6,
        n_routed_experts=4,
        num_experts_per_tok=2,
        rope_parameters={
            G: {"rope_type": "default", "rope_theta": 10000.0},
            S: {"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.45},
        },
    ),
}


def hf_model(name: str, seed: int = 0) -> MiMoV2FlashForCausalLM:
    kw = (
        dict(
            vocab_size=97,
            hidden_size=40,
            intermediate_size=56,
            moe_intermediate_size=20,
            max_position_embeddings=512,
            initializer_range=0.1,
        )
        | CONFIGS[name]
    )
    config = MiMoV2FlashConfig(**kw)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = MiMoV2FlashForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial sinks and balancing biases, so both are really tested
        for layer in model.model.layers:
            if layer.self_attn.sinks is not None:
                layer.self_attn.sinks.normal_(0.0, 1.0)
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.e_score_correction_bias.normal_(0.0, 0.05)
    return model


def ids(t: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 97, (2, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers(name, tmp_path):
    ref = hf_model(name)
    ref.save_pretrained(tmp_path)
    ours = lmspec.from_pretrained(tmp_path)
    window = ours.spec.model.attention["swa"].window_keys
    assert window == CONFIGS[name]["sliding_window"]
    x = ids(8 * window, seed=1)  # several windows long
    with torch.no_grad():
        diff = (ref(x).logits - ours(x).logits).abs().max().item()
    assert diff < 1e-4


def test_odd_rotary_products_round_as_transformers(tmp_path):
    """int(16 * 0.334) = 5: 3 frequencies theta ** (-2i / 5) over 6 rotated dims, bit for bit; and back."""
    from lmspec.runtime.model_base import RotaryEmbedding

    ref = hf_model("odd_rotary")
    ref.save_pretrained(tmp_path / "hf")
    ours = lmspec.from_pretrained(tmp_path / "hf")
    attention = ours.spec.model.attention
    assert (attention["global"].rope_freq_dim, attention["global"].rope_dim) == (5, 6)
    assert (attention["swa"].rope_freq_dim, attention["swa"].rope_dim) == (7, 8)
    positions = torch.arange(40)[None]
    for kind, layer_type in (("global", G), ("swa", S)):
        theirs = ref.model.rotary_emb(torch.zeros(1, dtype=torch.float32), positions, layer_type)
        mine = ours.model.rotary[kind](positions, torch.float32)
        assert isinstance(ours.model.rotary[kind], RotaryEmbedding)
        assert torch.equal(theirs[0], mine[0]) and torch.equal(theirs[1], mine[1]), kind
    ours.save_pretrained(tmp_path / "ours")  # exported with the same partial_rotary_factor
    back = MiMoV2FlashForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    x = ids(40, seed=5)
    with torch.no_grad():
        assert (back(x).logits - ours(x).logits).abs().max().item() < 1e-4


def test_round_trip_through_transformers(tmp_path):
    ref = hf_model("hybrid", seed=1)
    ref.save_pretrained(tmp_path / "hf")
    ours = lmspec.from_pretrained(tmp_path / "hf")
    ours.save_pretrained(tmp_path / "ours")
    files = sorted(p.name for p in (tmp_path / "ours").iterdir())
    assert files == ["config.json", "model.safetensors", "spec.yaml"]
    back = MiMoV2FlashForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    x = ids(60, seed=2)
    with torch.no_grad():
        a, b, c = ref(x).logits, ours(x).logits, back(x).logits
    assert (a - c).abs().max().item() < 1e-4
    assert (b - c).abs().max().item() < 1e-4


def test_fresh_lmspec_model_with_mtp_loads_in_transformers(tmp_path):
    """lmspec-initialised weights, MTP included: transformers ignores model.mtp.* and gives the same logits."""
    config = hf_model("hybrid").config.to_dict() | {"num_nextn_predict_layers": 2}
    spec = config_to_spec(config, name="hybrid_mtp")
    assert spec.model.mtp.num_blocks == 2
    torch.manual_seed(7)
    ours = lmspec.build(spec)
    ours.save_pretrained(tmp_path / "ours")
    back = MiMoV2FlashForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    x = ids(50, seed=3)
    with torch.no_grad():
        assert (ours(x).logits - back(x).logits).abs().max().item() < 1e-4
    again = lmspec.from_pretrained(tmp_path / "ours")  # spec.yaml and MTP weights come back
    for (n, p), (_, q) in zip(ours.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(p, q), n
    # transformers' own save drops model.mtp.*: loading that folder re-initialises MTP with a warning
    back.config.num_nextn_predict_layers = 2
    back.save_pretrained(tmp_path / "hf")
    with pytest.warns(UserWarning, match="MTP"):
        from_hf = lmspec.from_pretrained(tmp_path / "hf")
    with torch.no_grad():
        assert (from_hf(x).logits - back(x).logits).abs().max().item() < 1e-4
    assert from_hf.num_mtp_blocks == 2


def test_sharded_checkpoint_loads(tmp_path):
    ref = hf_model("mha", seed=3)
    ref.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = lmspec.from_pretrained(tmp_path)
    x = ids(30, seed=4)
    with torch.no_grad():
        assert (ref(x).logits - ours(x).logits).abs().max().item() < 1e-4


def test_full_spec_exports_the_hub_config():
    spec = load_spec(FULL)
    assert export_issues(spec) == []
    config = spec_to_config(spec)
    assert config["sliding_window"] == 129 and config["sliding_window_size"] == 128
    assert config["num_key_value_heads"] == 4 and config["swa_num_key_value_heads"] == 8
    assert config["head_dim"] == 192 and config["v_head_dim"] == 128
    assert config["layer_types"].count(G) == 9 and config["layer_types"][5] == G
    assert config["mlp_layer_types"] == ["dense"] + ["sparse"] * 47
    assert config["n_routed_experts"] == 256 and config["num_experts_per_tok"] == 8
    assert config["rope_parameters"][S]["rope_theta"] == 1e4
    assert config["num_nextn_predict_layers"] == 3
    hf_config = MiMoV2FlashConfig(
        **{k: v for k, v in config.items() if k not in ("architectures", "model_type")}
    )
    assert hf_config.sliding_window == 129
    back = config_to_spec(config, name=spec.name)
    assert back.model.num_layers == 48 and back.model.layer_blocks == spec.model.layer_blocks
    for kind in ("global", "swa"):
        assert back.model.attention[kind] == spec.model.attention[kind]
    assert back.model.ffn == spec.model.ffn and back.model.mtp == spec.model.mtp


def test_spec_transformers_cannot_express_still_round_trips(tiny_spec):
    config = spec_to_config(tiny_spec)
    assert config["lmspec_unsupported_by_transformers"] == [
        "sliding num_kv_heads is not 2 x global num_kv_heads"
    ]
    assert config_to_spec(config).model == tiny_spec.model


def test_import_hf_command(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    hf_model("grouped").config.to_json_file(cfg)
    out = tmp_path / "spec.yaml"
    assert main(["import-hf", str(cfg), "-o", str(out)]) == 0
    spec = load_spec(out)
    assert spec.training is None and "training:" not in out.read_text()
    m = spec.model
    assert m.attention["swa"].window_keys == 5 and m.ffn["moe"].num_groups == 4 and m.tie_word_embeddings
    (tmp_path / "bad.json").write_text("{not json")
    assert main(["import-hf", str(tmp_path / "bad.json"), "-o", str(out)]) == 2
    assert main(["import-hf", str(tmp_path / "missing.json"), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("Traceback" not in line for line in err)


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(lmspec.spec.SpecError):
        lmspec.from_pretrained(tmp_path / "nope")
    ref = hf_model("mha")
    ref.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_hidden_layers"] = 2
    config["layer_types"], config["mlp_layer_types"] = (
        config["layer_types"][:2],
        config["mlp_layer_types"][:2],
    )
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no place for"):
        lmspec.from_pretrained(tmp_path)


def test_hub_style_config_gives_the_example_spec():
    """The flat keys of the released config.json (as the converter and SGLang read them) give examples/mimo_v2_flash."""
    hub = {
        "model_type": "mimo_v2_flash",
        "vocab_size": 152576,
        "hidden_size": 4096,
        "intermediate_size": 16384,
        "num_hidden_layers": 48,
        "num_attention_heads": 64,
        "num_key_value_heads": 4,
        "swa_num_key_value_heads": 8,
        "head_dim": 192,
        "v_head_dim": 128,
        "swa_head_dim": 192,
        "swa_v_head_dim": 128,
        "rope_theta": 5000000,
        "swa_rope_theta": 10000,
        "partial_rotary_factor": 0.334,
        "sliding_window": 128,
        "sliding_window_size": 128,
        "attention_value_scale": 0.707,
        "hybrid_layer_pattern": [0 if i == 0 or (i + 1) % 6 == 0 else 1 for i in range(48)],
        "moe_layer_freq": [0] + [1] * 47,
        "n_routed_experts": 256,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 2048,
        "n_shared_experts": None,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "norm_topk_prob": True,
        "routed_scaling_factor": None,
        "n_group": 1,
        "topk_group": 1,
        "layernorm_epsilon": 1e-5,
        "max_position_embeddings": 262144,
        "tie_word_embeddings": False,
        "add_full_attention_sink_bias": False,
        "add_swa_attention_sink_bias": True,
        "num_nextn_predict_layers": 3,
        "initializer_range": 0.006,
    }
    spec = config_to_spec(hub, name="mimo_v2_flash")
    example = load_spec(FULL).model
    assert spec.model.attention == example.attention and spec.model.ffn == example.ffn
    assert spec.model.layer_blocks == example.layer_blocks and spec.model.mtp == example.mtp
    assert spec.model.norm == example.norm and spec.model.init_std == example.init_std
