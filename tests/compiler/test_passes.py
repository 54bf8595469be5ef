"""Passes: op counts before and after each pass, fusion structure, the check pass's rejections."""

import dataclasses
import json
import keyword
import logging

import pytest

from lmspec.compiler import GraphError, PassContext, lower, run_passes, verify
from lmspec.compiler.ops import OPS, OpDef
from lmspec.compiler.passes import PIPELINE
from lmspec.compiler.plan import Identifier, class_name, plan, planned
from lmspec.errors import CompileError
from lmspec.spec import SpecError, load_spec, spec_hash, spec_to_data
from lmspec.spec.loader import validate

from .conftest import EXAMPLES
from .test_lower import MIMO_COUNTS, TINY_COUNTS


def _fused_counts(unfused, n_layers, n_moe, n_dense, n_ce):
    """Expected counts after fusion, derived from the unfused counts and the layout.

    Every residual add meets one norm (attention residual -> post_attention_layernorm, FFN residual
    -> next input_layernorm / model.norm / MTP final_layernorm): 2 add_rmsnorm per decoder layer.
    Each dense FFN's gate+up+silu_mul is one swiglu; each MoE's gate linear + sigmoid + correction +
    topk + renormalize is one router; each LM head + CE is one lm_head_ce.
    """
    c = dict(unfused)
    c["add_rmsnorm"] = 2 * n_layers
    c["rmsnorm"] -= 2 * n_layers
    del c["add"]
    c["swiglu"] = n_dense
    del c["silu_mul"]
    c["router"] = n_moe
    for op in ("sigmoid", "correction_bias", "topk", "renormalize"):
        del c[op]
    c["lm_head_ce"] = n_ce
    del c["cross_entropy"]
    c["linear"] -= 2 * n_dense + n_moe + n_ce
    return c


MIMO_FUSED = _fused_counts(MIMO_COUNTS, n_layers=48 + 3, n_moe=47, n_dense=4, n_ce=4)
TINY_FUSED = _fused_counts(TINY_COUNTS, n_layers=7 + 3, n_moe=6, n_dense=4, n_ce=4)


def test_derived_fused_counts_spelled_out():
    # MiMo: 48*2 + 3*2 add_rmsnorm; 1 + 3 swiglu; 47 routers; 1 + 3 lm_head_ce; 10 plain rmsnorm left
    # (layer 0's input_layernorm and enorm, hnorm, input_layernorm of each MTP block).
    assert MIMO_FUSED == {
        "input": 2,
        "embedding": 4,
        "rmsnorm": 10,
        "add_rmsnorm": 102,
        "linear": 211,
        "rope": 102,
        "value_scale": 51,
        "attention": 51,
        "swiglu": 4,
        "router": 47,
        "experts": 47,
        "lm_head_ce": 4,
        "concat": 3,
        "shift_tokens": 5,
    }
    assert sum(MIMO_FUSED.values()) == 643 and sum(TINY_FUSED.values()) == 151


@pytest.mark.parametrize(
    "name,unfused,fused", [("mimo", MIMO_COUNTS, MIMO_FUSED), ("tiny", TINY_COUNTS, TINY_FUSED)]
)
def test_op_counts_before_and_after_each_pass(request, name, unfused, fused):
    spec = request.getfixturevalue(name)
    g = lower(spec)
    verify(g)
    expected_after = {
        "shapes": unfused,
        "check": unfused,
        "accounting": unfused,
        "fusion": fused,
        "plan": fused,
    }
    for p in PIPELINE:
        assert dict(g.op_counts()) == (
            unfused if p == "shapes" else expected_after[PIPELINE[PIPELINE.index(p) - 1]]
        )
        g = run_passes(g, only=(p,))
        verify(g)
        assert dict(g.op_counts()) == expected_after[p], p
    assert g.passes == list(PIPELINE)
    assert g.fused_units == {"add_rmsnorm", "swiglu", "router", "lm_head_ce"}


def test_fused_nodes_keep_members_and_wiring(mimo):
    g = run_passes(lower(mimo))
    norm = g.node("model.norm")
    assert norm["op"] == "add_rmsnorm"
    assert norm["members"] == [("model.layers.47.mlp_residual", "add"), ("model.norm", "rmsnorm")]
    # Its residual input is the sum (port 1) of the fused post-attention norm.
    assert g.inputs("model.norm") == [
        "model.layers.47.mlp.experts",
        "model.layers.47.post_attention_layernorm",
    ]
    assert g.nx.edges["model.layers.47.post_attention_layernorm", "model.norm"] == {"arg": 1, "port": 1}
    # MTP block 1 reads the main model's hidden state: the sum (port 1) of the fused final norm.
    (edge,) = g.nx.in_edges("model.mtp.layers.0.hnorm", data=True)
    assert edge[0] == "model.norm" and edge[2]["port"] == 1
    assert g.nx.edges["model.norm", "loss"] == {"arg": 0, "port": 0}
    router = g.node("model.layers.1.mlp.gate")
    assert router["op"] == "router" and [op for _, op in router["members"]] == [
        "linear",
        "sigmoid",
        "correction_bias",
        "topk",
        "renormalize",
    ]
    assert router["params"] == {"model.layers.1.mlp.gate.weight": (256, 4096)}
    assert router["buffers"] == {"model.layers.1.mlp.gate.e_score_correction_bias": (256,)}
    assert router["shape"] == ("B", "T", 8) and router["dtype"] == "float32"
    sw = g.node("model.layers.0.mlp.swiglu")
    assert sw["op"] == "swiglu" and sw["shape"] == ("B", "T", 16384)
    assert g.users("model.layers.0.mlp.swiglu") == ["model.layers.0.mlp.down_proj"]
    ce = g.node("model.mtp.layers.2.loss")
    assert ce["op"] == "lm_head_ce" and ce["params"] == {"lm_head.weight": (152576, 4096)}
    assert g.inputs("model.mtp.layers.2.loss") == [
        "model.mtp.layers.2.final_layernorm",
        "model.mtp.layers.2.targets",
    ]
    # Accounting survives fusion: members' FLOPs are summed into the unit.
    assert sw["flops"] == 2 * 2 * 4096 * 16384
    assert router["flops"] == 2 * 4096 * 256


def test_shapes_rederived_on_the_fused_graph(tiny):
    g = run_passes(lower(tiny))
    before = dict(g.nx.nodes(data="shape"))
    g = run_passes(g, only=("shapes",))
    assert dict(g.nx.nodes(data="shape")) == before


def test_disable_by_name_and_by_unit(tiny):
    g = run_passes(lower(tiny), disable=("fusion",))
    assert g.fused_units == set() and dict(g.op_counts()) == TINY_COUNTS and "fusion" not in g.passes
    g = run_passes(lower(tiny), disable=("fusion.router",))
    verify(g)
    assert g.fused_units == {"add_rmsnorm", "swiglu", "lm_head_ce"}
    assert g.op_counts()["router"] == 0 and g.op_counts()["topk"] == 6
    with pytest.raises(ValueError, match="unknown passes"):
        run_passes(lower(tiny), disable=("fuse",))


def test_passes_log_counts_at_debug(tiny, caplog):
    with caplog.at_level(logging.DEBUG, logger="lmspec.compiler.passes"):
        run_passes(lower(tiny), disable=("check",))
    text = caplog.text
    assert "pass check: skipped" in text
    before, after = text.split("IR after fusion:", 1)
    assert "IR after accounting:" in before and "add=20" in before and "add_rmsnorm" not in before
    assert "add_rmsnorm=20" in after and "pass plan:" in after


def test_accounting_context(tiny):
    g = run_passes(lower(tiny), ctx=PassContext(context=16))
    swa = g.node("model.layers.1.self_attn.attention")
    per_key = 2 * 4 * (48 + 32)
    assert swa["flops_per_key"] == per_key and swa["flops_at_context"] == per_key * 16  # 16 < 33 keys
    g = run_passes(lower(tiny), ctx=PassContext(context=1000))
    assert g.node("model.layers.1.self_attn.attention")["flops_at_context"] == per_key * 33
    assert g.node("model.layers.3.self_attn.attention")["flops_at_context"] == per_key * 1000


# -- the check pass -----------------------------------------------------------------------------


def _shaped(spec):
    return run_passes(lower(spec), only=("shapes",))


def _check(g):
    return run_passes(g, only=("check",))


def test_check_accepts_the_examples(mimo, tiny):
    for spec in (mimo, tiny):
        _check(_shaped(spec))
    for f in sorted(EXAMPLES.glob("*.yaml")):
        verify(run_passes(lower(load_spec(f, []))))


def test_check_rejects_rope_dim_beyond_head_dim(tiny):
    g = _shaped(tiny)
    g.node("model.layers.1.self_attn.rope_q")["attrs"]["rope_dim"] = 64
    with pytest.raises(CompileError) as e:
        _check(g)
    msg = str(e.value)
    assert msg == (
        "spec mimo_v2_flash_tiny: model.attention.swa.rope: model.layers.1.self_attn.rope_q: "
        "rope_dim 64 exceeds qk_head_dim 48"
    )
    assert isinstance(e.value, SpecError) and "\n" not in msg


def test_check_rejects_odd_rope_dim(tiny):
    g = _shaped(tiny)
    g.node("model.layers.3.self_attn.rope_k")["attrs"]["rope_dim"] = 15
    with pytest.raises(CompileError, match=r"model.attention.global.rope: .*rope_dim must be even.*got 15"):
        _check(g)


def test_check_rejects_mismatched_hidden_sizes(tiny):
    g = _shaped(tiny)
    g.node("model.layers.2.self_attn.o_proj")["params"]["model.layers.2.self_attn.o_proj.weight"] = (128, 96)
    with pytest.raises(
        CompileError,
        match=r"model.attention.swa: model.layers.2.self_attn.o_proj \(linear\): "
        r"linear input vs weight \(out, in\): expected last dim 96, "
        r"got shape \('B', 'T', 128\)",
    ):
        _check(g)
    # The shapes pass finds the same problem when it runs first.
    g = lower(tiny)
    g.node("model.layers.0.mlp.down_proj")["params"]["model.layers.0.mlp.down_proj.weight"] = (128, 64)
    with pytest.raises(CompileError, match=r"model.ffn.dense: .*expected last dim 64"):
        run_passes(g)


def test_check_rejects_stale_shapes(tiny):
    g = _shaped(tiny)
    g.node("model.layers.2.attn_residual")["shape"] = ("B", "T", 96)
    with pytest.raises(CompileError, match=r"shape \('B', 'T', 96\) disagrees with its inputs"):
        _check(g)


def test_check_rejects_ops_without_backend(tiny, monkeypatch):
    g = _shaped(tiny)
    g.node("model.layers.0.input_layernorm")["op"] = "layernorm"
    with pytest.raises(CompileError, match="unknown op 'layernorm'"):
        _check(g)
    monkeypatch.setitem(OPS, "gelu_mul", OpDef("gelu_mul", "gelu", "gelu(gate) * up", OPS["silu_mul"].rule))
    g = _shaped(tiny)
    g.node("model.layers.0.mlp.act")["op"] = "gelu_mul"
    with pytest.raises(
        CompileError, match=r"model.ffn.dense: .*op 'gelu_mul' \(family 'gelu'\) has no backend"
    ):
        _check(g)


def test_check_rejects_bad_gqa_and_dead_nodes(tiny):
    g = _shaped(tiny)
    g.node("model.layers.1.self_attn.attention")["attrs"]["num_kv_heads"] = 3
    with pytest.raises(CompileError, match="num_kv_heads 3 must divide num_heads 4"):
        _check(g)
    g = _shaped(tiny)
    g.add_op(
        "model.layers.1.extra",
        "rmsnorm",
        inputs=["model.layers.1.attn_residual"],
        dtype="float32",
        path="model.layers.1.extra",
        field="model.norm",
        params={"model.layers.1.extra.weight": (128,)},
    )
    with pytest.raises(CompileError, match="model.layers.1.extra: computes a value no loss depends on"):
        run_passes(g, only=("shapes", "check"))


# -- the plan pass ------------------------------------------------------------------------------


def _two_of_each(tiny):
    """The tiny spec plus a second sliding kind (another window, no sink) and a second MoE kind."""
    data = spec_to_data(tiny)
    m = data["model"]
    m["attention"]["swa_wide"] = {**m["attention"]["swa"], "window": 8, "sink": False, "bias": True}
    m["ffn"]["moe_small"] = {
        **m["ffn"]["moe"],
        "num_experts": 4,
        "top_k": 1,
        "score_function": "softmax",
        "correction_bias": False,
        "num_shared_experts": 1,
    }
    m["blocks"]["W"] = {"attention": "swa_wide", "ffn": "moe_small"}
    m["layers"] = "G0 S W G S W G"
    return validate(data, {}, "<two_of_each>")


def _spec_facts(spec, p):
    """What the plan should say, read from the spec (tests may read it; codegen may not)."""
    m = spec.model
    for a in p.attention:
        s = m.attention[a.name]
        assert (a.kind, a.num_heads, a.num_kv_heads, a.qk_head_dim, a.v_head_dim) == (
            s.kind,
            s.num_heads,
            s.num_kv_heads,
            s.qk_head_dim,
            s.v_head_dim,
        )
        assert (a.rope_dim, a.theta, a.value_scale, a.sink, a.bias, a.scale, a.window_keys) == (
            s.rope_dim,
            s.rope.theta,
            s.value_scale,
            s.sink,
            s.bias,
            s.scale,
            s.window_keys,
        )
        assert a.window == getattr(s, "window", None) and a.field == f"model.attention.{a.name}"
    for f in p.ffn:
        s = m.ffn[f.name]
        assert f.kind == s.kind and f.field == f"model.ffn.{f.name}"
        if f.kind == "dense":
            assert f.intermediate_size == s.intermediate_size
            continue
        names = (
            "num_experts top_k expert_intermediate_size num_shared_experts score_function correction_bias "
            "renormalize routed_scaling_factor num_groups top_k_groups"
        ).split()
        assert {k: getattr(f, k) for k in names} == {k: getattr(s, k) for k in names}
        assert f.shared_intermediate_size == s.num_shared_experts * s.expert_intermediate_size
    assert [layer.block for layer in p.layers] == m.layer_blocks
    assert {b.name: (b.attention.name, b.ffn.name) for b in p.blocks} == {
        name: (m.blocks[name].attention, m.blocks[name].ffn) for name in {b.name for b in p.blocks}
    }
    assert (p.name, p.spec_hash, p.hidden_size, p.vocab_size) == (
        spec.name,
        spec_hash(spec),
        m.hidden_size,
        m.vocab_size,
    )
    assert (p.eps, p.init_std, p.tie_word_embeddings) == (m.norm.eps, m.init_std, m.tie_word_embeddings)
    assert (p.mtp.num_blocks if p.mtp else 0) == (m.mtp.num_blocks if m.mtp else 0)


class _NoSpec:
    def __getattr__(self, name):
        raise AssertionError(f"the plan read graph.spec.{name}")


@pytest.mark.parametrize("disable", [(), ("fusion",)])
def test_plan_says_what_the_spec_says_without_reading_it(tiny, mimo, disable):
    for spec in (tiny, mimo, _two_of_each(tiny)):
        g = run_passes(lower(spec), disable=(*disable, "plan"))
        g.spec = _NoSpec()
        p = plan(g)
        _spec_facts(spec, p)
        assert p.add_rmsnorm == p.lm_head_ce == (not disable)
        assert all(f.fused_swiglu == (not disable) for f in p.ffn if f.kind == "dense")


def test_plan_partitions_the_graph(tiny, mimo):
    """Every IR node is implemented by exactly one context of the plan, fused or not."""
    for spec in (tiny, mimo):
        for disable in ((), ("fusion",)):
            g = run_passes(lower(spec), disable=disable)
            assert set(planned(g).node_owners()) == set(g.nx.nodes)
    p = planned(run_passes(lower(tiny)))
    swa = next(a for a in p.attention if a.name == "swa")
    layers = {int(n.split(".")[2]) for n in swa.nodes if n.startswith("model.layers.")}
    assert (
        layers == {1, 2, 4, 5} and "model.mtp.layers.2.self_attn.attention" in swa.nodes
    )  # MTP blocks are S
    assert (
        "model.layers.1.self_attn.attention" in swa.nodes
        and "model.layers.1.self_attn.sinks" not in swa.nodes
    )
    moe = next(f for f in p.ffn if f.kind == "moe")
    assert set(moe.router_nodes) == {f"model.layers.{i}.mlp.gate" for i in (1, 2, 3, 4, 5, 6)}
    assert set(moe.experts_nodes) == {f"model.layers.{i}.mlp.experts" for i in (1, 2, 3, 4, 5, 6)}
    assert "model.layers.3.self_attn.attention" in p.layers[3].nodes and p.layers[3].cls == "GBlock"
    assert p.trunk_nodes == ("model.embed_tokens", "model.norm") and p.head_nodes == (
        "input_ids",
        "labels",
        "loss",
    )


def test_plan_is_the_last_pass_and_is_frozen(tiny):
    assert PIPELINE[-1] == "plan"
    g = run_passes(lower(tiny))
    p = planned(g)
    assert p is g.nx.graph["plan"] and planned(g) is p
    assert hash(p) == hash(plan(g)) and p == plan(g)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.hidden_size = 1  # type: ignore[misc]
    data = json.dumps(p.to_data(), sort_keys=True)
    assert data == json.dumps(plan(g).to_data(), sort_keys=True)
    assert '"family": "moe"' in data and p.class_name == "MimoV2FlashTinyForCausalLM"


def test_plan_has_every_kind_and_its_kernel(tiny):
    spec = _two_of_each(tiny)
    p = planned(run_passes(lower(spec)))
    assert [a.name for a in p.attention] == ["global", "swa", "swa_wide"]
    assert [f.name for f in p.ffn] == ["dense", "moe", "moe_small"]
    wide = p.attention[2]
    assert (wide.window_keys, wide.sink, wide.bias) == (9, False, True)
    assert [b.layers for b in p.blocks] == [(0,), (1, 4), (2, 5), (3, 6), ()]
    moe_kernels = {k.name for k in p.kernels if k.family == "moe"}
    assert moe_kernels == {"moe_sigmoid_e8_k2", "moe_softmax_e4_k1"}
    attention_kernels = {k.name for k in p.kernels if k.family == "attention"}
    assert {"attn_sliding_sink_w33_qk48_v32_vs0p707", "attn_sliding_w9_qk48_v32_vs0p707"} <= attention_kernels


def test_plan_rejects_a_kind_that_differs_between_layers(tiny):
    g = run_passes(lower(tiny), disable=("plan",))
    g.node("model.layers.4.self_attn.attention")["attrs"]["sink"] = False
    with pytest.raises(
        GraphError,
        match=r"attention kind 'swa' differs between model.layers.1 and model.layers.4 in \['sink'\]",
    ):
        plan(g)


def test_class_names_are_identifiers():
    hostile = ['d"""; __import__("os").system("x"); """', "1st", "None", "", "a\nb", "{{ x }}", "é", "match"]
    for name in hostile:
        cls = class_name(name, "Block")
        assert cls.isidentifier() and cls.isascii() and not keyword.iskeyword(cls)
    assert class_name("mimo_v2_flash_tiny") == "MimoV2FlashTiny" and class_name("none") == "KNone"
    with pytest.raises(ValueError):
        Identifier("a b")
