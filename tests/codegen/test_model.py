"""The generated model against the forward contract: outputs, losses, MTP, cache, fusion, init."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lmspec
from lmspec.compiler.accounting import param_count
from lmspec.runtime.model_base import ModelOutput
from lmspec.testing.compare import close

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TINY = EXAMPLES / "mimo_v2_flash_tiny.yaml"
FULL = EXAMPLES / "mimo_v2_flash.yaml"

V = 256


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = lmspec.build(TINY)
    with torch.no_grad():  # make selection depend on the correction bias, as after some balancing
        for moe in m.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.05)
    return m.eval()


def tokens(b: int, t: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


def test_outputs_follow_the_contract(model):
    x = tokens(2, 50)
    out = model(x)
    assert isinstance(out, ModelOutput)
    assert out.logits.shape == (2, 50, V) and out.hidden.shape == (2, 50, 128)
    assert out.loss is None and out.mtp_losses == [] and out.mtp_logits == []
    n_moe = len(model.moe_layers())
    assert n_moe == 6 and out.expert_load.shape == (n_moe, 8)
    # every token picks top_k experts in every MoE layer
    assert torch.equal(out.expert_load.sum(1), torch.full((n_moe,), 2.0 * 50 * 2))
    assert not out.expert_load.requires_grad
    assert out.aux_loss.ndim == 0 and out.aux_loss > 0
    # hidden is before the final norm: normalising it and applying the head gives the logits
    normed = model.ops.rmsnorm(out.hidden, model.model.norm.weight, 1e-5)
    torch.testing.assert_close(model.lm_head(normed), out.logits)


def test_labels_path_matches_logits_and_mtp_chaining(model):
    x = tokens(2, 41, seed=2)
    inp, labels = x[:, :-1].clone(), x[:, 1:].clone()
    labels[0, 5] = -100
    with torch.no_grad():
        full = model(inp)
        out = model(inp, labels=labels)
    assert out.logits is None
    ref = F.cross_entropy(full.logits.reshape(-1, V), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, ref, **close("float32"))
    assert len(out.mtp_losses) == 3
    # Recompute each MTP loss from mtp_forward: block k at t reads labels[:, t+k-1], predicts labels[:, t+k].
    h = full.hidden
    T = labels.shape[1]
    for k in range(1, 4):
        inputs = torch.full_like(labels, -100)
        inputs[:, : T - k + 1] = labels[:, k - 1 :]
        targets = torch.full_like(labels, -100)
        targets[:, : T - k] = labels[:, k:]
        targets[inputs == -100] = -100
        with torch.no_grad():
            h, logits = model.mtp_forward(k, h, inputs.clamp_min(0), None)
        ref_k = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=-100)
        torch.testing.assert_close(out.mtp_losses[k - 1], ref_k, **close("float32"))


def test_return_mtp_logits(model):
    x = tokens(1, 30, seed=3)
    with torch.no_grad():
        out = model(x, return_mtp=True)
        _, first = model.mtp_forward(1, out.hidden, torch.cat([x[:, 1:], x[:, :1] * 0], 1), None)
    assert len(out.mtp_logits) == 3 and all(t.shape == (1, 30, V) for t in out.mtp_logits)
    torch.testing.assert_close(out.mtp_logits[0], first)


def test_aux_loss_is_the_sequence_wise_form(model):
    """Recompute L = mean_b sum_i f_i P_i per MoE layer from each router's own outputs, then sum the layers."""
    x = tokens(2, 20, seed=4)
    E, K, T = 8, 2, 20
    inputs: list[torch.Tensor] = []
    hooks = [
        m.register_forward_hook(lambda mod, args, res: inputs.append(args[0])) for m in model.moe_layers()
    ]
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for h in hooks:
            h.remove()
    total = 0.0
    for mod, inp in zip(model.moe_layers(), inputs, strict=True):
        with torch.no_grad():
            _, idx, scores = mod.gate(inp.reshape(-1, 128))
        for b in range(2):
            s = scores[b * T : (b + 1) * T]
            p = (s / s.sum(-1, keepdim=True)).mean(0)
            f = torch.bincount(idx[b * T : (b + 1) * T].reshape(-1), minlength=E).float() * E / (K * T)
            total += float((f * p).sum()) / 2
    assert out.aux_loss.item() == pytest.approx(total, rel=1e-5)


def test_fused_and_unfused_models_agree(tiny_spec):
    torch.manual_seed(0)
    fused = lmspec.build(tiny_spec)
    torch.manual_seed(0)
    plain = lmspec.build(tiny_spec, disable_passes=("fusion",))
    fused_src = Path(sys.modules[type(fused).__module__].__file__).read_text()
    plain_src = Path(sys.modules[type(plain).__module__].__file__).read_text()
    assert "ops.add_rmsnorm" in fused_src and "ops.lm_head_ce" in fused_src
    assert "ops.add_rmsnorm" not in plain_src and "ops.lm_head_ce" not in plain_src
    plain.load_state_dict(fused.state_dict())
    x = tokens(2, 70, seed=5)
    with torch.no_grad():
        a, b = fused(x), plain(x)
        la, lb = fused(x, labels=x), plain(x, labels=x)
    torch.testing.assert_close(a.logits, b.logits, **close("float32"))
    torch.testing.assert_close(a.hidden, b.hidden, **close("float32"))
    torch.testing.assert_close(la.loss, lb.loss, **close("float32"))
    for u, v in zip(la.mtp_losses, lb.mtp_losses, strict=True):
        torch.testing.assert_close(u, v, **close("float32"))


class ConcatCache:
    """The smallest cache that honours the contract: keeps every key/value and its position."""

    def __init__(self) -> None:
        self.store: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def update(self, layer_key, k, v, position_ids):
        if layer_key in self.store:
            k0, v0, p0 = self.store[layer_key]
            k, v, position_ids = (
                torch.cat([k0, k], 2),
                torch.cat([v0, v], 2),
                torch.cat([p0, position_ids], 1),
            )
        self.store[layer_key] = (k, v, position_ids)
        return k, v, position_ids


def test_incremental_decoding_through_the_cache_matches_a_full_forward(model):
    x = tokens(2, 60, seed=6)  # longer than the 33-key window
    with torch.no_grad():
        full = model(x).logits
        cache = ConcatCache()
        pieces = [model(x[:, :40], cache=cache).logits]
        for t in range(40, 60):
            pos = torch.full((2, 1), t)
            pieces.append(model(x[:, t : t + 1], position_ids=pos, cache=cache).logits)
    keys = set(cache.store)
    assert keys == {f"model.layers.{i}" for i in range(7)}
    torch.testing.assert_close(torch.cat(pieces, 1), full, **close("float32_model"))


def test_explicit_positions_and_logits_to_keep(model):
    x = tokens(2, 35, seed=7)
    with torch.no_grad():
        a = model(x).logits
        b = model(x, position_ids=torch.arange(35).expand(2, 35)).logits
        c = model(x, logits_to_keep=1).logits
    torch.testing.assert_close(a, b, **close("float32"))
    assert c.shape == (2, 1, V)
    torch.testing.assert_close(c, a[:, -1:])


def test_set_rope_theta_changes_only_global_layers(model):
    x = tokens(1, 40, seed=8)
    with torch.no_grad():
        before = model(x).logits
        model.set_rope_theta({"global": 640000.0})
        after = model(x).logits
        model.set_rope_theta({"global": 5.0e6})
        again = model(x).logits
    assert not torch.allclose(before, after)
    torch.testing.assert_close(before, again, **close("exact"))
    with pytest.raises(ValueError, match="unknown attention kinds"):
        model.set_rope_theta({"nope": 1.0})


def test_set_backend_with_overrides_keeps_results(model):
    x = tokens(1, 20, seed=9)
    with torch.no_grad():
        a = model(x).logits
        model.set_backend("torch", op_overrides={"attention": "torch"})
        assert model.model.layers[1].self_attn.ops is model.ops
        b = model(x).logits
        model.set_backend("torch")
    torch.testing.assert_close(a, b, **close("exact"))


def test_init_is_deterministic_and_follows_the_spec(tiny_spec):
    torch.manual_seed(3)
    a = lmspec.build(tiny_spec)
    torch.manual_seed(3)
    b = lmspec.build(tiny_spec)
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(p, q), n
    sd = a.state_dict()
    assert torch.equal(sd["model.layers.0.input_layernorm.weight"], torch.ones(128))
    assert torch.equal(sd["model.mtp.layers.0.enorm.weight"], torch.ones(128))
    assert torch.equal(sd["model.layers.1.mlp.gate.e_score_correction_bias"], torch.zeros(8))
    assert sd["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    experts = sd["model.layers.1.mlp.experts.gate_up_proj"]
    assert experts.shape == (8, 192, 128)
    assert experts.std().item() == pytest.approx(0.02, rel=0.05)
    assert a.model.layers[1].self_attn.sinks.requires_grad
    assert a.model.layers[0].self_attn.__class__.__name__ == "GlobalAttention"
    assert not hasattr(a.model.layers[0].self_attn, "sinks")


def test_backward_reaches_every_parameter(model):
    torch.manual_seed(0)
    m = lmspec.build(TINY)
    x = tokens(2, 48, seed=10)
    out = m(x[:, :-1], labels=x[:, 1:])
    (out.loss + sum(out.mtp_losses) + 1e-2 * out.aux_loss).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_meta_build_of_the_full_spec_matches_accounting():
    m = lmspec.build(FULL, device="meta")
    assert all(p.is_meta for p in m.parameters())
    assert m.num_parameters() == param_count(m.spec) == 309_766_589_056
    names = dict(m.named_parameters())
    assert names["model.layers.1.mlp.experts.gate_up_proj"].shape == (256, 4096, 4096)
    assert names["model.layers.1.self_attn.k_proj.weight"].shape == (8 * 192, 4096)
    assert names["model.layers.0.self_attn.k_proj.weight"].shape == (4 * 192, 4096)
    assert names["model.mtp.layers.2.eh_proj.weight"].shape == (4096, 8192)


def test_tied_embeddings(tiny_spec, tmp_path):
    torch.manual_seed(0)
    m = lmspec.build(tiny_spec, overrides=["model.tie_word_embeddings=true"])
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert m.num_parameters() == param_count(m.spec)
    m.save_pretrained(tmp_path)
    back = lmspec.from_pretrained(tmp_path)
    assert back.lm_head.weight is back.model.embed_tokens.weight
    x = tokens(1, 16, seed=11)
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, m(x).logits, **close("exact"))


def test_bf16_build_keeps_the_balancing_bias_in_fp32(tiny_spec):
    m = lmspec.build(tiny_spec, dtype=torch.bfloat16)
    assert m.model.embed_tokens.weight.dtype == torch.bfloat16
    assert m.moe_layers()[0].gate.e_score_correction_bias.dtype == torch.float32
    with torch.no_grad():
        out = m(tokens(1, 12, seed=12))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()


def test_from_pretrained_reads_a_run_directory(tiny_spec, tmp_path):
    torch.manual_seed(0)
    m = lmspec.build(tiny_spec)
    step = tmp_path / "checkpoints" / "step_00000007"
    m.save_pretrained(step)
    (step / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoints" / "LATEST").write_text("step_00000007\n")
    (tmp_path / "spec.yaml").write_text((step / "spec.yaml").read_text())
    back = lmspec.from_pretrained(tmp_path)
    for (n, p), (_, q) in zip(m.state_dict().items(), back.state_dict().items(), strict=True):
        assert torch.equal(p, q), n


def test_save_and_load_keep_dtype_and_the_fp32_bias(tiny_spec, tmp_path):
    torch.manual_seed(0)
    m = lmspec.build(tiny_spec, dtype=torch.bfloat16)
    with torch.no_grad():
        m.moe_layers()[0].gate.e_score_correction_bias.fill_(1e-5 / 3)  # not representable in bf16
    m.save_pretrained(tmp_path)
    back = lmspec.from_pretrained(tmp_path)
    assert back.model.embed_tokens.weight.dtype == torch.bfloat16
    bias = back.moe_layers()[0].gate.e_score_correction_bias
    assert bias.dtype == torch.float32 and torch.equal(bias, m.moe_layers()[0].gate.e_score_correction_bias)
    assert lmspec.from_pretrained(tmp_path, dtype=torch.float32).lm_head.weight.dtype == torch.float32


def test_a_checkpoint_records_the_rope_theta_it_was_saved_with(tiny_spec, tmp_path):
    torch.manual_seed(0)
    m = lmspec.build(tiny_spec)
    m.set_rope_theta({"global": 640000.0})  # stage 1 of the schedule
    m.save_pretrained(tmp_path)
    back = lmspec.from_pretrained(tmp_path)
    assert back.rope_thetas()["global"] == 640000.0
    assert (
        back.spec == m.spec and back.spec.model.attention["global"].rope.theta == 5.0e6
    )  # spec.yaml unchanged
    assert (
        json.loads((tmp_path / "config.json").read_text())["rope_parameters"]["full_attention"]["rope_theta"]
        == 640000.0
    )
    x = tokens(1, 40, seed=13)
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, m(x).logits, **close("exact"))


def test_dtype_casts_keep_the_balancing_bias_exact(tiny_spec):
    m = lmspec.build(tiny_spec)
    gate = m.moe_layers()[0].gate
    with torch.no_grad():
        gate.e_score_correction_bias.fill_(1e-5 / 3)
    before = gate.e_score_correction_bias.clone()
    m.to(torch.bfloat16)
    assert m.lm_head.weight.dtype == torch.bfloat16
    assert gate.e_score_correction_bias.dtype == torch.float32
    assert torch.equal(gate.e_score_correction_bias, before)
    m.half()
    assert torch.equal(gate.e_score_correction_bias, before)
