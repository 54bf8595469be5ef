"""Accounting from the IR against the spec-only accounting, and against MiMo-V2-Flash's figures."""

import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmspec.compiler import lower, run_passes, stats_from_graph, verify
from lmspec.compiler.accounting import account, param_count
from lmspec.spec import Spec, load_spec

from .conftest import EXAMPLES


def test_mimo_figures(mimo):
    s = stats_from_graph(run_passes(lower(mimo)), context=4096)
    p = s["params"]
    assert p["total"] == 308_778_768_832  # "308.78B without MTP" (facts: derived check)
    assert p["active"] == 15_445_924_288  # "15.45B with embedding+head"
    assert (
        p["active"] - p["by_component"]["embedding"] - p["by_component"]["lm_head"] == 14_196_021_696
    )  # 14.20B
    assert p["mtp"] == 3 * 329_273_408  # 0.329B per MTP block without the shared embedding/head
    assert p["buffers"] == 47 * 256  # e_score_correction_bias, not a parameter
    assert sum(p["by_component"].values()) == p["total"]
    assert p["by_component"]["experts"] == 47 * 256 * 3 * 4096 * 2048


def test_sliding_attention_flops_are_capped_by_the_window(mimo):
    g = run_passes(lower(mimo))
    a, b = (stats_from_graph(g, context=L)["flops_per_token"] for L in (4096, 8192))
    per_key = 2 * 64 * (192 + 128)
    # Only the 9 global layers see more keys; the 39 sliding layers stay at 129 keys.
    assert b["forward_attention"] - a["forward_attention"] == 9 * per_key * 4096
    assert a["forward_attention"] == 9 * per_key * 4096 + 39 * per_key * 129
    # Matmul FLOPs are 2 x the weights a token meets: active params less lookups and elementwise weights.
    p = stats_from_graph(g)["params"]
    sinks = 39 * 64
    matmul = p["active"] - p["by_component"]["embedding"] - p["by_component"]["norm"] - sinks
    assert a["forward"] - a["forward_attention"] == 2 * matmul


def _compare(spec: Spec, context: int) -> None:
    graph = run_passes(lower(spec))
    verify(graph)
    s = stats_from_graph(graph, context=context)
    acc = account(spec, context)
    p, f = s["params"], s["flops_per_token"]
    assert p["total"] == param_count(spec, include_mtp=False) == acc.params_backbone
    assert p["total_with_mtp"] == param_count(spec) == acc.params_total
    assert p["mtp"] == acc.mtp_params
    assert p["active"] == acc.active_with_embedding_and_head
    assert p["buffers"] == sum(acc.buffers.values())
    comp = p["by_component"]

    def theirs(*prefixes: str) -> int:
        return sum(v for k, v in acc.params.items() if k.startswith(prefixes))

    assert comp.get("attention", 0) == theirs("attention.", "sinks.")
    assert comp.get("experts", 0) == theirs("routed_experts.")
    assert comp.get("router", 0) == theirs("router.")
    assert comp.get("dense_ffn", 0) == theirs("dense_ffn.")
    assert comp.get("shared_experts", 0) == theirs("shared_experts.")
    assert comp.get("norm", 0) == acc.params["norms"]
    # The one difference in convention: the spec accounting charges 2 FLOPs per q/k/v bias element,
    # the IR counts matmul weights only (a bias is one add, like the norms it also leaves out).
    bias = {scope: 0 for scope in ("main", "mtp")}
    for _, d in graph.nx.nodes(data=True):
        for name, shape in d["params"].items():
            if name.endswith(".bias"):
                bias["mtp" if d["scope"].startswith("model.mtp.") else "main"] += 2 * math.prod(shape)
    assert f["forward"] == pytest.approx(acc.flops_per_token_total - bias["main"], rel=1e-12)
    assert f["forward_mean"] == pytest.approx(acc.flops_per_token_seq_mean_total - bias["main"], rel=1e-12)
    assert f["mtp_forward"] == pytest.approx(
        acc.mtp_flops_per_token_per_block * acc.mtp_blocks - bias["mtp"], rel=1e-12
    )


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: Path(p).stem)
@pytest.mark.parametrize("context", [1, 100, 262144])
def test_examples_match_spec_accounting(path, context):
    _compare(load_spec(path, []), context)


@st.composite
def specs(draw) -> Spec:
    """Small specs over the fields that change the graph's structure or sizes."""
    heads = draw(st.sampled_from([2, 4, 6]))
    kv = draw(st.sampled_from([h for h in (1, 2, 3, 6) if heads % h == 0]))
    qk = draw(st.sampled_from([8, 12, 20]))
    rope = {"theta": 1e4, "fraction": draw(st.sampled_from([0.5, 1.0]))}
    common = {
        "num_heads": heads,
        "num_kv_heads": kv,
        "qk_head_dim": qk,
        "v_head_dim": draw(st.sampled_from([4, 8, 12])),
        "rope": rope,
        "value_scale": draw(st.sampled_from([1.0, 0.5])),
        "bias": draw(st.booleans()),
    }
    experts = draw(st.sampled_from([4, 6, 8]))
    moe = {
        "kind": "moe",
        "num_experts": experts,
        "top_k": draw(st.integers(1, 3)),
        "expert_intermediate_size": draw(st.sampled_from([8, 24])),
        "num_shared_experts": draw(st.integers(0, 2)),
        "score_function": draw(st.sampled_from(["sigmoid", "softmax"])),
        "correction_bias": draw(st.booleans()),
        "renormalize": draw(st.booleans()),
        "routed_scaling_factor": draw(st.sampled_from([1.0, 2.5])),
    }
    pattern = draw(st.sampled_from(["G0 S G", "S*3", "G0 (S*2 G)*2", "G"]))
    model = {
        "vocab_size": draw(st.sampled_from([64, 100])),
        "hidden_size": draw(st.sampled_from([16, 48])),
        "max_position_embeddings": 512,
        "tie_word_embeddings": draw(st.booleans()),
        "attention": {
            "global": {"kind": "global", **common, "sink": draw(st.booleans())},
            "swa": {
                "kind": "sliding",
                "window": draw(st.integers(1, 40)),
                "window_convention": draw(st.sampled_from(["keys", "previous_plus_self"])),
                **common,
                "sink": draw(st.booleans()),
            },
        },
        "ffn": {"dense": {"kind": "dense", "intermediate_size": 32}, "moe": moe},
        "blocks": {
            "G0": {"attention": "global", "ffn": "dense"},
            "G": {"attention": "global", "ffn": "moe"},
            "S": {"attention": "swa", "ffn": draw(st.sampled_from(["moe", "dense"]))},
        },
        "layers": pattern,
    }
    n_mtp = draw(st.integers(0, 2))
    if n_mtp:
        model["mtp"] = {"num_blocks": n_mtp, "block": draw(st.sampled_from(["S", "G"]))}
    return Spec.model_validate({"name": "drawn", "model": model})


@settings(max_examples=25)
@given(spec=specs(), context=st.sampled_from([1, 7, 64, 1000]))
def test_drawn_specs_match_spec_accounting(spec, context):
    _compare(spec, context)
    # Every pass keeps the IR valid and the fused graph has one lm_head_ce per loss.
    g = run_passes(lower(spec))
    n_losses = 1 + (spec.model.mtp.num_blocks if spec.model.mtp else 0)
    assert g.op_counts()["lm_head_ce"] == n_losses
    assert g.op_counts()["add_rmsnorm"] == 2 * (spec.model.num_layers + n_losses - 1)


def test_param_total_from_weight_shapes_alone(tiny):
    # Formula-free: every tensor name the lowered graph holds, counted once.
    g = lower(tiny)
    names = {}
    for _, d in g.nx.nodes(data=True):
        names.update(d["params"])
    assert (
        sum(math.prod(s) for s in names.values())
        == stats_from_graph(run_passes(lower(tiny)))["params"]["total_with_mtp"]
    )
