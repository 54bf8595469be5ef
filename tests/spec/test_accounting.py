"""Accounting from the spec alone, against MiMo-V2-Flash's published and derived figures."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lmspec.compiler.accounting import account, param_count, training_step_memory
from lmspec.spec import Spec, load_spec, spec_to_data

from .conftest import EXAMPLES, MIMO, TINY

GiB = 2**30


def test_mimo_backbone_and_mtp_params(mimo):
    acc = account(mimo)
    # Facts file, "derived check": 308.78B without MTP; paper Table 1: 0.33B per MTP block.
    assert acc.params_backbone == pytest.approx(308.78e9, rel=1e-3)
    assert acc.params_backbone == 308_778_768_832
    assert acc.mtp_blocks == 3
    assert acc.mtp_params_per_block == 329_273_408  # 0.329B without the shared embedding/head
    assert acc.mtp_params == 3 * acc.mtp_params_per_block
    assert acc.params_total == acc.params_backbone + acc.mtp_params == param_count(mimo)
    assert param_count(mimo, include_mtp=False) == acc.params_backbone
    assert sum(acc.params.values()) == acc.params_backbone
    # The correction bias is a buffer: 47 MoE layers x 256 experts, never a parameter.
    assert acc.buffers == {"router_bias.moe": 47 * 256}


def test_mimo_components(mimo):
    p = account(mimo).params
    assert p["embedding"] == p["lm_head"] == 152576 * 4096
    per_global = 4096 * (64 * 192 + 4 * 192 + 4 * 128) + 64 * 128 * 4096
    per_swa = 4096 * (64 * 192 + 8 * 192 + 8 * 128) + 64 * 128 * 4096
    assert p["attention.global"] == 9 * per_global
    assert p["attention.swa"] == 39 * per_swa
    assert p["sinks.swa"] == 39 * 64  # SWA layers only
    assert "sinks.global" not in p
    assert p["norms"] == (2 * 48 + 1) * 4096
    assert p["dense_ffn.dense"] == 3 * 4096 * 16384  # layer 0 only
    assert p["routed_experts.moe"] == 47 * 256 * 3 * 4096 * 2048
    assert p["router.moe"] == 47 * 256 * 4096
    assert not any(k.startswith("shared_experts") for k in p)


def test_mimo_active_params(mimo):
    acc = account(mimo)
    # Facts file: 14.20B without embedding/head, 14.82B with head, 15.45B with both (paper: 15B).
    assert acc.active_without_embedding_and_head == pytest.approx(14.20e9, abs=0.005e9)
    assert acc.active_with_head == pytest.approx(14.82e9, abs=0.005e9)
    assert acc.active_with_embedding_and_head == pytest.approx(15.45e9, abs=0.005e9)
    assert acc.active["routed_experts.moe"] == 47 * 8 * 3 * 4096 * 2048  # top-8, no shared experts
    assert acc.active_with_embedding_and_head == sum(acc.active.values())
    assert "embedding" in acc.counted["active"]


def test_mimo_kv_cache(mimo):
    acc = account(mimo, 262144)
    # Facts: 9 x 4 x (192+128) x 2 B = 23,040 B/token; SWA fixed 39 x 129 x 8 x 320 x 2 B.
    assert acc.kv_bytes_per_token == {"global": 23_040}
    assert acc.kv_fixed_bytes_per_sequence == {"swa": 39 * 129 * 8 * 320 * 2}
    assert acc.kv_bytes_at_context_total == 23_040 * 262144 + 39 * 129 * 8 * 320 * 2
    assert acc.kv_bytes_at_context_total / GiB == pytest.approx(5.65, abs=0.01)
    assert acc.all_global_reference == "global"
    assert acc.all_global_kv_bytes_at_context == 48 * 4 * 320 * 2 * 262144
    assert acc.all_global_kv_bytes_at_context / GiB == pytest.approx(30.0)
    assert acc.kv_ratio_all_global == pytest.approx(5.3, abs=0.05)
    # The MTP blocks (sliding) keep their own window-sized caches, reported apart.
    assert acc.mtp_kv_bytes_at_context == 3 * 129 * 8 * 320 * 2


def test_kv_before_the_window_fills(mimo):
    acc = account(mimo, 100)
    assert acc.kv_bytes_at_context == {"global": 23_040 * 100, "swa": 39 * 100 * 8 * 320 * 2}
    # A short context holds fewer bytes in the hybrid model per layer only where SWA has more KV heads.
    assert acc.kv_ratio_all_global == pytest.approx(48 * 4 / (9 * 4 + 39 * 8))


def test_mimo_flops(mimo):
    acc = account(mimo, 4096)
    f = acc.flops_per_token
    per_key = 2 * 64 * (192 + 128)
    assert f["attention_scores.global"] == 9 * per_key * 4096
    assert f["attention_scores.swa"] == 39 * per_key * 129  # window-limited
    assert f["routed_experts.moe"] == 2 * acc.active["routed_experts.moe"]
    assert f["lm_head"] == 2 * 152576 * 4096
    assert "embedding" not in f and "norms" not in f
    matmul = acc.active_with_embedding_and_head - acc.active["embedding"] - acc.active["norms"] - 39 * 64
    assert acc.flops_per_token_total == 2 * matmul + per_key * (9 * 4096 + 39 * 129)
    # Averaged over a causal sequence a global query sees (T+1)/2 keys.
    assert acc.flops_per_token_seq_mean["attention_scores.global"] == 9 * per_key * 4097 / 2
    longer = account(mimo, 8192).flops_per_token
    assert longer["attention_scores.swa"] == f["attention_scores.swa"]
    assert acc.mtp_flops_per_token_per_block == (
        2 * (acc.mtp_params_per_block - 5 * 4096 - 64) + 2 * 152576 * 4096 + per_key * 129
    )


def test_ablation_variants(mimo):
    base = account(mimo)
    all_global = account(load_spec(EXAMPLES / "mimo_v2_flash_all_global.yaml"))
    assert all_global.kv_ratio_all_global == 1.0
    assert all_global.kv_bytes_at_context_total == base.all_global_kv_bytes_at_context
    assert all_global.kv_fixed_bytes_per_sequence_total == 0
    w512 = account(load_spec(EXAMPLES / "mimo_v2_flash_window512.yaml"))
    assert w512.kv_fixed_bytes_per_sequence_total == 39 * 513 * 8 * 320 * 2
    assert w512.params_total == base.params_total
    no_sink = account(load_spec(EXAMPLES / "mimo_v2_flash_no_sink.yaml"))
    # The MTP blocks use the swa kind too, so their sinks go as well.
    assert base.params_total - no_sink.params_total == 39 * 64 + 3 * 64


def _variant(spec: Spec, **model_changes) -> Spec:
    data = spec_to_data(spec)
    for dotted, value in model_changes.items():
        node = data["model"]
        *head, last = dotted.split("__")
        for part in head:
            node = node[part]
        node[last] = value
    return Spec.model_validate(data)


def test_tied_shared_and_bias(tiny):
    base = account(tiny)
    H, V = 128, 256
    tied = account(_variant(tiny, tie_word_embeddings=True))
    assert "lm_head" not in tied.params
    assert tied.params_total == base.params_total - V * H
    assert tied.active_with_head == tied.active_with_embedding_and_head == base.active_with_head
    assert tied.flops_per_token["lm_head"] == base.flops_per_token["lm_head"]

    shared = account(
        _variant(tiny, ffn__moe={**spec_to_data(tiny)["model"]["ffn"]["moe"], "num_shared_experts": 2})
    )
    width = 2 * 96
    assert shared.params["shared_experts.moe"] == 6 * 3 * H * width  # 6 MoE layers
    assert shared.active["shared_experts.moe"] == shared.params["shared_experts.moe"]  # always on
    assert shared.mtp_params_per_block == base.mtp_params_per_block  # the MTP block is dense

    swa = spec_to_data(tiny)["model"]["attention"]["swa"]
    biased = account(_variant(tiny, attention__swa={**swa, "bias": True}))
    per_layer = 4 * 48 + 2 * 48 + 2 * 32  # q, k, v biases; o_proj never has one
    assert biased.params_total - base.params_total == (4 + 3) * per_layer  # 4 SWA layers + 3 MTP blocks


def test_matches_transformers_module_structure(mimo):
    """The reference model, built on the meta device, has exactly param_count(spec) parameters."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    m = mimo.model
    layer_types = [
        "full_attention" if m.layer_attention(i).kind == "global" else "sliding_attention"
        for i in range(m.num_layers)
    ]
    config = transformers.MiMoV2FlashConfig(
        vocab_size=m.vocab_size,
        hidden_size=m.hidden_size,
        intermediate_size=16384,
        num_hidden_layers=m.num_layers,
        num_attention_heads=64,
        num_key_value_heads=4,
        head_dim=192,
        v_head_dim=128,
        moe_intermediate_size=2048,
        n_routed_experts=256,
        num_experts_per_tok=8,
        layer_types=layer_types,
        mlp_layer_types=[
            "dense" if m.layer_ffn(i).kind == "dense" else "sparse" for i in range(m.num_layers)
        ],
    )
    with torch.device("meta"):
        model = transformers.MiMoV2FlashForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == param_count(mimo, include_mtp=False)
    bias = sum(b.numel() for name, b in model.named_buffers() if name.endswith("e_score_correction_bias"))
    assert bias == sum(account(mimo).buffers.values())


def test_accounting_imports_no_torch():
    code = (
        "import sys; from lmspec.compiler.accounting import account; from lmspec.spec import load_spec; "
        f"account(load_spec({str(MIMO)!r})); "
        "print(sorted(m for m in ('torch', 'jinja2', 'triton') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_stats_cli_json(run_cli):
    code, out, err = run_cli("stats", MIMO, "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["params_backbone"] == 308_778_768_832
    assert data["mtp_params_per_block"] == 329_273_408
    assert round(data["kv_ratio_all_global"], 1) == 5.3
    assert data["context"] == 262144
    code, out, _ = run_cli("stats", TINY, "--json", "--context", "64", "--set", "model.hidden_size=64")
    data = json.loads(out)
    assert code == 0 and data["context"] == 64 and data["params"]["embedding"] == 256 * 64


def test_stats_cli_table(run_cli):
    code, out, err = run_cli("stats", MIMO)
    assert code == 0, err
    for text in ("Parameters", "308,778,768,832", "329.273M", "14.196B", "15.446B", "5.31x", "FLOPs"):
        assert text in out


def test_stats_cli_rejects_bad_context(run_cli):
    code, _, err = run_cli("stats", TINY, "--context", "0")
    assert code == 2
    assert "context" in err and "Traceback" not in err


def _minimal(attention: dict, layers: str = "A*3") -> Spec:
    return Spec.model_validate(
        {
            "name": "minimal",
            "model": {
                "vocab_size": 10,
                "hidden_size": 8,
                "max_position_embeddings": 64,
                "attention": {
                    "a": {
                        "num_heads": 2,
                        "num_kv_heads": 1,
                        "qk_head_dim": 4,
                        "v_head_dim": 2,
                        "rope": {"theta": 1e4},
                        **attention,
                    }
                },
                "ffn": {"f": {"kind": "dense", "intermediate_size": 5}},
                "blocks": {"A": {"attention": "a", "ffn": "f"}},
                "layers": layers,
            },
        }
    )


def test_all_sliding_model_compares_against_itself_without_a_window():
    spec = _minimal({"kind": "sliding", "window": 4, "window_convention": "keys"})
    acc = account(spec, 10)
    slot = 1 * (4 + 2) * 2
    assert acc.all_global_reference is None
    assert acc.kv_bytes_per_token_total == 0
    assert acc.kv_fixed_bytes_per_sequence_total == 3 * 4 * slot
    assert acc.all_global_kv_bytes_at_context == 3 * 10 * slot
    assert acc.kv_ratio_all_global == 10 / 4
    # Exact small-model arithmetic: embedding, head, 3 x (q, k, v, o, 2 norms, SwiGLU), final norm.
    per_layer = 8 * (2 * 4 + 4 + 2) + 2 * 2 * 8 + 2 * 8 + 3 * 8 * 5
    assert param_count(spec) == 2 * 10 * 8 + 3 * per_layer + 8


def test_context_of_one_token():
    spec = _minimal({"kind": "global"}, layers="A")
    acc = account(spec, 1)
    assert acc.kv_bytes_at_context_total == acc.all_global_kv_bytes_at_context == (4 + 2) * 2
    assert acc.flops_per_token["attention_scores.a"] == 2 * 2 * 1 * (4 + 2)
    assert acc.flops_per_token_seq_mean == acc.flops_per_token
    with pytest.raises(ValueError):
        account(spec, 0)


@pytest.mark.parametrize("window_keys", [1, 5, 9, 10, 11, 50])
def test_sequence_mean_keys_is_the_mean_over_positions(window_keys):
    from lmspec.compiler.accounting import mean_keys

    spec = _minimal({"kind": "sliding", "window": window_keys, "window_convention": "keys"})
    attn = spec.model.attention["a"]
    for context in (1, 7, 10, 23):
        exact = sum(min(i, window_keys) for i in range(1, context + 1)) / context
        assert mean_keys(attn, context) == pytest.approx(exact)


# ---------------------------------------------------------------------------------------------
# Memory of one training step (`check --target cpu`)
# ---------------------------------------------------------------------------------------------


def test_step_memory_parts(tiny):
    n = param_count(tiny)
    one = training_step_memory(tiny, 1, 128)
    assert (one.params, one.grads, one.optimizer) == (4 * n, 4 * n, 8 * n)
    assert one.total == one.params + one.grads + one.optimizer + one.activations
    assert training_step_memory(tiny, 16, 128).activations == 16 * one.activations  # linear in batch
    # Global layers keep a (T, T) probability matrix: per token, their cost grows with T; sliding
    # layers keep a band of window_keys + 31 keys, so an all-sliding model stays linear in T.
    sliding = tiny.model_copy(update={"model": tiny.model.model_copy(update={"layers": "S*6"})})
    assert (
        training_step_memory(sliding, 1, 1024).activations
        == 8 * training_step_memory(sliding, 1, 128).activations
    )
    assert training_step_memory(tiny, 1, 1024).activations > 8 * one.activations


# One CPU training step measured in a fresh process: the growth of its peak RSS (VmHWM) over the step
# against the estimate, less the parameters, which exist before the step.
MEASURE = """
import json, sys, torch, lmspec
from lmspec.compiler.accounting import training_step_memory

def hwm():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))

path, batch, seq, sets = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
torch.set_num_threads(1)
torch.manual_seed(0)
model = lmspec.build(path, overrides=sets)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
x, y = torch.randint(0, model.spec.model.vocab_size, (2, batch, seq))
before = hwm()
out = model(x, labels=y)
(out.loss + sum(out.mtp_losses) + (0 if out.aux_loss is None else out.aux_loss)).backward()
opt.step()
est = training_step_memory(model.spec, batch, seq)
print(json.dumps({"measured": hwm() - before, "estimated": est.total - est.params}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize(
    ("batch", "seq", "sets"),
    [
        (16, 128, ()),  # the tiny spec's first stage: sliding, global and MoE layers, three MTP blocks
        (2, 1024, ("model.layers=G*4", "model.mtp.num_blocks=0", "serving.speculative_depth=0")),
        (8, 256, ("model.vocab_size=8192",)),
    ],
    ids=["tiny", "global_long", "large_vocab"],
)
def test_step_memory_is_within_a_factor_of_two_of_a_measured_step(batch, seq, sets):
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, str(TINY), str(batch), str(seq), *sets],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    ratio = figures["measured"] / figures["estimated"]
    print(f"  measured {figures['measured'] / 1e6:.0f} MB, estimated {figures['estimated'] / 1e6:.0f} MB")
    assert 0.5 < ratio < 2.0, figures


def test_check_target_cpu_fits(run_cli):
    code, out, err = run_cli("check", TINY, "--target", "cpu")
    assert (code, err) == (0, "")
    summary, memory = out.strip().splitlines()
    assert memory.startswith(
        "memory of one training step on cpu, stage pretrain (batch 16 x seq_len 128): about "
    )
    assert "fits in this machine's" in memory


def test_check_target_cpu_refuses_what_cannot_fit(run_cli):
    code, out, err = run_cli("check", MIMO, "--target", "cpu")  # petabytes at the first stage's batch
    assert (code, out) == (2, "")
    (line,) = err.strip().splitlines()
    assert line.startswith(f"lmspec: error: {MIMO}: --target cpu: one training step of stage pretrain")
    assert "(batch 2048 x seq_len 32768) needs about" in line and "more than this machine's" in line
