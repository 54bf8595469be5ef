"""Properties of generated models over random small specs (Hypothesis; few, tiny examples)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lmspec
from lmspec.codegen import compile_spec
from lmspec.compiler.accounting import param_count
from lmspec.spec import Spec
from lmspec.spec.loader import validate


@st.composite
def attention(draw, kind: str, hidden: int) -> dict:
    heads = draw(st.sampled_from([2, 4]))
    a = {
        "kind": kind,
        "num_heads": heads,
        "num_kv_heads": draw(st.sampled_from([d for d in (1, 2, 4) if heads % d == 0])),
        "qk_head_dim": draw(st.sampled_from([4, 8, 12])),
        "v_head_dim": draw(st.sampled_from([4, 6, 8])),
        "rope": {"theta": draw(st.sampled_from([100.0, 10000.0])), "fraction": draw(st.sampled_from([0.5, 1.0]))},
        "value_scale": draw(st.sampled_from([1.0, 0.707])),
        "sink": draw(st.booleans()),
        "bias": draw(st.booleans()),
    }
    if kind == "sliding":
        a["window"] = draw(st.integers(1, 5))
        a["window_convention"] = draw(st.sampled_from(["previous_plus_self", "keys"]))
    return a


@st.composite
def small_specs(draw, all_sliding: bool = False) -> Spec:
    hidden = draw(st.sampled_from([16, 24]))
    kinds = ["sliding"] if all_sliding else draw(st.sampled_from([["global"], ["sliding"], ["global", "sliding"]]))
    att = {k: draw(attention(k, hidden)) for k in kinds}
    experts = draw(st.integers(2, 5))
    ffn = {
        "dense": {"kind": "dense", "intermediate_size": draw(st.sampled_from([8, 20]))},
        "moe": {
            "kind": "moe",
            "num_experts": experts,
            "top_k": draw(st.integers(1, min(3, experts))),
            "expert_intermediate_size": draw(st.sampled_from([4, 12])),
            "num_shared_experts": draw(st.integers(0, 1)),
            "score_function": draw(st.sampled_from(["sigmoid", "softmax"])),
            "correction_bias": draw(st.booleans()),
            "renormalize": draw(st.booleans()),
        },
    }
    blocks = {f"{a[0]}{f[0]}": {"attention": a, "ffn": f} for a in att for f in ffn}
    names = draw(st.lists(st.sampled_from(sorted(blocks)), min_size=1, max_size=4))
    model = {
        "vocab_size": draw(st.integers(11, 40)),
        "hidden_size": hidden,
        "max_position_embeddings": 128,
        "tie_word_embeddings": draw(st.booleans()),
        "init_std": 0.2,
        "attention": att,
        "ffn": ffn,
        "blocks": blocks,
        "layers": " ".join(names),
    }
    mtp = draw(st.integers(0, 2))
    if mtp:
        model["mtp"] = {"num_blocks": mtp, "block": draw(st.sampled_from(sorted(blocks)))}
    return validate({"name": "prop", "model": model}, {}, "<hypothesis>")


def _build(spec: Spec, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = lmspec.build(spec)
    with torch.no_grad():
        for moe in model.moe_layers():
            if hasattr(moe.gate, "e_score_correction_bias"):
                moe.gate.e_score_correction_bias.normal_(0, 0.1)
    return model


@settings(max_examples=15)
@given(spec=small_specs(), seed=st.integers(0, 2**16), t=st.integers(2, 11))
def test_counts_causality_and_gradients(spec, seed, t):
    model = _build(spec, seed)
    assert model.num_parameters() == param_count(spec)
    V = spec.model.vocab_size
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (2, 12), generator=g)
    y = x.clone()
    y[:, t:] = torch.randint(0, V, (2, 12 - t), generator=g)
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-6)

    out = model(x[:, :-1], labels=x[:, 1:])
    total = out.loss + sum(out.mtp_losses) + out.aux_loss
    total.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@settings(max_examples=10)
@given(spec=small_specs(all_sliding=True), seed=st.integers(0, 2**16))
def test_sliding_only_models_forget_beyond_their_receptive_field(spec, seed):
    model = _build(spec, seed)
    m = spec.model
    reach = sum(m.layer_attention(i).window_keys - 1 for i in range(m.num_layers))  # positions back a layer stack sees
    T = reach + 6
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, m.vocab_size, (1, T), generator=g)
    y = x.clone()
    far = T - 1 - reach - 1  # strictly outside the receptive field of the last position
    y[:, : far + 1] = torch.randint(0, m.vocab_size, (1, far + 1), generator=g)
    with torch.no_grad():
        a, b = model(x).logits[:, -1], model(y).logits[:, -1]
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    if m.layer_attention(m.num_layers - 1).window_keys > 1:
        z = x.clone()
        z[:, -2] = (z[:, -2] + 1) % m.vocab_size  # inside the window: must matter
        with torch.no_grad():
            assert not torch.equal(model(z).logits[:, -1], a)


@settings(max_examples=5)
@given(spec=small_specs())
def test_compiling_twice_gives_identical_code(spec, tmp_path_factory):
    one = compile_spec(spec, out_dir=tmp_path_factory.mktemp("one"))
    two = compile_spec(spec, out_dir=tmp_path_factory.mktemp("two"))
    assert one.model_path.read_bytes() == two.model_path.read_bytes()
    assert compile_spec(spec).source == one.source
