"""Lowering: the op graph of MiMo-V2-Flash, its names, attributes and invariants."""

import subprocess
import sys
import time

import pytest

from lmspec.compiler import GraphError, lower, run_passes, verify
from lmspec.compiler.ops import BACKEND_FAMILIES, OPS


def test_layers_and_mtp_layers(mimo):
    g = lower(mimo)
    verify(g)
    assert [li.path for li in g.layers] == [f"model.layers.{i}" for i in range(48)]
    assert [li.index for li in g.layers if li.attention == "global"] == [0, 5, 11, 17, 23, 29, 35, 41, 47]
    assert [li.ffn for li in g.layers].count("dense") == 1 and g.layers[0].ffn == "dense"
    assert [li.path for li in g.mtp_layers] == [
        "model.mtp.layers.0",
        "model.mtp.layers.1",
        "model.mtp.layers.2",
    ]
    assert {(li.block, li.attention, li.ffn) for li in g.mtp_layers} == {("MTP", "swa", "dense")}
    assert g.fused_units == set() and g.passes == []


# Unfused op counts, derived from the layout. MiMo: 48 decoder layers + 3 MTP decoder layers = 51;
# 1 + 3 dense FFNs (layer 0 and the MTP blocks), 47 MoE; value_scale 0.707 on every attention.
#   rmsnorm  = 2 per decoder layer (102) + model.norm + 3 per MTP block (enorm, hnorm, final) = 112
#   linear   = q,k,v,o x 51 (204) + gate/up/down x 4 dense (12) + 47 routers + 3 eh_proj + 4 LM heads = 270
#   add      = 2 residuals x 51 = 102; rope = q and k x 51 = 102
#   shift_tokens = 3 MTP targets + inputs of blocks 2 and 3 = 5
MIMO_COUNTS = {
    "input": 2,
    "embedding": 4,
    "rmsnorm": 112,
    "linear": 270,
    "rope": 102,
    "value_scale": 51,
    "attention": 51,
    "add": 102,
    "silu_mul": 4,
    "sigmoid": 47,
    "correction_bias": 47,
    "topk": 47,
    "renormalize": 47,
    "experts": 47,
    "cross_entropy": 4,
    "concat": 3,
    "shift_tokens": 5,
}
# Tiny: 7 layers `G0 S*2 G S*2 G` + 3 MTP = 10 decoder layers; 1 + 3 dense, 6 MoE.
#   rmsnorm = 20 + 1 + 9 = 30; linear = 40 + 12 + 6 + 3 + 4 = 65
TINY_COUNTS = {
    "input": 2,
    "embedding": 4,
    "rmsnorm": 30,
    "linear": 65,
    "rope": 20,
    "value_scale": 10,
    "attention": 10,
    "add": 20,
    "silu_mul": 4,
    "sigmoid": 6,
    "correction_bias": 6,
    "topk": 6,
    "renormalize": 6,
    "experts": 6,
    "cross_entropy": 4,
    "concat": 3,
    "shift_tokens": 5,
}


@pytest.mark.parametrize("name,counts,total", [("mimo", MIMO_COUNTS, 945), ("tiny", TINY_COUNTS, 207)])
def test_op_counts_after_lowering(request, name, counts, total):
    g = lower(request.getfixturevalue(name))
    assert dict(g.op_counts()) == counts
    assert g.nx.number_of_nodes() == total


def test_attention_nodes_carry_the_spec(mimo):
    g = run_passes(lower(mimo), only=("shapes",))
    swa = g.node("model.layers.1.self_attn.attention")
    assert swa["field"] == "model.attention.swa" and swa["path"] == "model.layers.1.self_attn"
    assert (
        swa["attrs"].items()
        >= {
            "kind": "sliding",
            "window_keys": 129,
            "sink": True,
            "num_heads": 64,
            "num_kv_heads": 8,
            "gqa_group": 8,
            "qk_head_dim": 192,
            "v_head_dim": 128,
            "value_scale": 0.707,
        }.items()
    )
    assert swa["params"] == {"model.layers.1.self_attn.sinks": (64,)}
    assert swa["shape"] == ("B", "T", 64 * 128)
    ga = g.node("model.layers.5.self_attn.attention")
    assert ga["attrs"]["window_keys"] is None and ga["attrs"]["num_kv_heads"] == 4 and ga["params"] == {}
    rope = g.node("model.layers.5.self_attn.rope_q")
    assert rope["attrs"]["rope_dim"] == 64 and rope["attrs"]["theta"] == 5.0e6
    # The rope op names its head width as the spec and the attention op do.
    assert rope["attrs"]["qk_head_dim"] == 192 and "head_dim" not in rope["attrs"]
    assert rope["field"] == "model.attention.global.rope"
    assert g.node("model.layers.1.self_attn.rope_k")["attrs"]["theta"] == 1.0e4
    assert g.node("model.layers.1.self_attn.k_proj")["shape"] == ("B", "T", 8 * 192)
    assert g.node("model.layers.5.self_attn.v_proj")["shape"] == ("B", "T", 4 * 128)
    assert g.node("model.mtp.layers.2.self_attn.attention")["attrs"]["window_keys"] == 129


def test_dtypes_follow_precision_and_router_is_fp32(mimo, tiny):
    g = lower(mimo)  # precision bf16
    assert g.node("model.layers.3.self_attn.q_proj")["dtype"] == "bfloat16"
    assert g.node("model.layers.3.mlp.gate")["dtype"] == "float32"
    assert g.node("model.layers.3.mlp.gate.topk")["dtype"] == "float32"
    assert g.node("loss")["dtype"] == "float32" and g.node("input_ids")["dtype"] == "int64"
    assert lower(tiny).node("model.layers.3.self_attn.q_proj")["dtype"] == "float32"


def test_mtp_branch_wiring(tiny):
    g = lower(tiny)
    p = "model.mtp.layers.1"
    assert g.inputs(f"{p}.concat") == [f"{p}.enorm", f"{p}.hnorm"]  # embedding first, hidden second
    assert g.inputs(f"{p}.hnorm") == ["model.mtp.layers.0.mlp_residual"]
    assert g.inputs("model.mtp.layers.0.hnorm") == ["model.layers.6.mlp_residual"]
    assert g.inputs(f"{p}.embed_tokens") == [f"{p}.tokens"]
    assert g.node(f"{p}.tokens")["attrs"]["offset"] == 1 and g.node(f"{p}.targets")["attrs"]["offset"] == 2
    assert g.inputs("model.mtp.layers.0.embed_tokens") == ["labels"]
    # The MTP blocks share the main embedding and LM head by name.
    assert g.node(f"{p}.embed_tokens")["params"] == {"model.embed_tokens.weight": (256, 128)}
    assert g.node(f"{p}.lm_head")["params"] == {"lm_head.weight": (256, 128)}
    assert g.node(f"{p}.eh_proj")["params"] == {f"{p}.eh_proj.weight": (128, 256)}


def test_parameter_names_and_shapes_match_transformers(mimo):
    torch = pytest.importorskip("torch")
    from transformers import MiMoV2FlashConfig, MiMoV2FlashForCausalLM

    m = mimo.model
    cfg = MiMoV2FlashConfig(
        layer_types=[
            "sliding_attention" if m.layer_attention(i).kind == "sliding" else "full_attention"
            for i in range(m.num_layers)
        ],
        mlp_layer_types=[
            "dense" if m.layer_ffn(i).kind == "dense" else "sparse" for i in range(m.num_layers)
        ],
    )
    with torch.device("meta"):  # full size, no memory
        hf = MiMoV2FlashForCausalLM(cfg)
    g = lower(mimo)
    params, buffers = {}, {}
    for _, d in g.nx.nodes(data=True):
        if not d["scope"].startswith("model.mtp."):  # transformers has no MTP modules
            params.update(d["params"])
            buffers.update(d["buffers"])
    assert params == {n: tuple(p.shape) for n, p in hf.named_parameters()}
    assert buffers == {n: tuple(b.shape) for n, b in hf.named_buffers() if "e_score_correction_bias" in n}


def test_verify_reports_broken_invariants(tiny):
    g = lower(tiny)
    g.node("model.layers.0.input_layernorm")["op"] = "layernorm"
    g.node("model.layers.1.self_attn.q_proj")["field"] = ""
    with pytest.raises(GraphError, match=r"unknown op 'layernorm'.*no spec field path"):
        verify(g)
    g = run_passes(lower(tiny), only=("shapes",))
    g.node("lm_head")["shape"] = None
    with pytest.raises(GraphError, match="lm_head: bad shape None"):
        verify(g)


def test_every_op_has_a_backend_family_tied_to_the_runtime():
    ops = pytest.importorskip("lmspec.runtime.ops")
    assert BACKEND_FAMILIES - {"native"} == set(ops.OP_FAMILIES)
    assert {d.family for d in OPS.values()} <= BACKEND_FAMILIES


def test_full_size_lowering_and_passes_are_fast(mimo):
    t0 = time.perf_counter()
    g = run_passes(lower(mimo))
    elapsed = time.perf_counter() - t0
    verify(g)
    assert elapsed < 2.0, f"lower + passes on the full model took {elapsed:.2f} s"


def test_compiler_imports_neither_torch_nor_runtime():
    code = (
        "import sys, lmspec.compiler, lmspec.compiler.draw, lmspec.compiler.fx_fusion; "
        "bad = [m for m in ('torch', 'lmspec.runtime') if m in sys.modules]; "
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
