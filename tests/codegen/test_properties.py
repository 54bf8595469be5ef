"""Properties of generated models over random small specs (Hypothesis; few, tiny examples)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lmspec
from lmspec.codegen import compile_spec
from lmspec.compiler.accounting import param_count
from lmspec.spec import Spec
from lmspec.spec.loader import validate
from lmspec.testing.compare import close


@st.composite
def attention(draw, kind: str, hidden: int) -> dict:
    heads = draw(st.sampled_from([2, 4]))
    a = {
        "kind": kind,
        "num_heads": heads,
        "num_kv_heads": draw(st.sampled_from([d for d in (1, 2, 4) if heads % d == 0])),
        "qk_head_dim": draw(st.sampled_from([4, 8, 12])),
        "v_head_dim": draw(st.sampled_from([4, 6, 8])),
        "rope": {
            "theta": draw(st.sampled_from([100.0, 10000.0])),
            "fraction": draw(st.sampled_from([0.5, 1.0])),
        },
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
    kinds = (
        ["sliding"]
        if all_sliding
        else draw(st.sampled_from([["global"], ["sliding"], ["global", "sliding"]]))
    )
    att = {k: draw(attention(k, hidden)) for k in kinds}
    experts = draw(st.integers(2, 6))
    # group-limited routing scores a group by its best two experts, so a group holds at least two
    groups = draw(st.sampled_from([g for g in (1, 2, 3) if experts % g == 0 and experts // g >= 2]))
    kept = draw(st.integers(1, groups))
    ffn = {
        "dense": {"kind": "dense", "intermediate_size": draw(st.sampled_from([8, 20]))},
        "moe": {
            "kind": "moe",
            "num_experts": experts,
            "top_k": draw(st.integers(1, min(3, kept * (experts // groups)))),
            "num_groups": groups,
            "top_k_groups": kept,
            "routed_scaling_factor": draw(st.sampled_from([1.0, 2.5])),
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


def _build(spec: Spec, seed: int = 0, disable: tuple[str, ...] = ()) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = lmspec.build(spec, disable_passes=disable)
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
    # Not bit-exact: changing later tokens regroups the sort-by-expert GEMMs, which rounds differently.
    # A real leak moves logits by O(0.1) at init_std 0.2.
    torch.testing.assert_close(a[:, :t], b[:, :t], **close("float32_model"))

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
    reach = sum(
        m.layer_attention(i).window_keys - 1 for i in range(m.num_layers)
    )  # positions back a layer stack sees
    T = reach + 6
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, m.vocab_size, (1, T), generator=g)
    y = x.clone()
    far = T - 1 - reach - 1  # strictly outside the receptive field of the last position
    y[:, : far + 1] = torch.randint(0, m.vocab_size, (1, far + 1), generator=g)
    with torch.no_grad():
        a, b = model(x).logits[:, -1], model(y).logits[:, -1]
    torch.testing.assert_close(a, b, **close("float32_model"))  # same rounding caveat as above
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


@settings(max_examples=8)
@given(spec=small_specs(), seed=st.integers(0, 2**16))
def test_fused_and_unfused_models_agree(spec, seed):
    fused = _build(spec, seed)
    plain = _build(spec, seed, disable=("fusion",))
    plain.load_state_dict(fused.state_dict())
    x = torch.randint(0, spec.model.vocab_size, (2, 10), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        a, b = fused(x, return_mtp=True), plain(x, return_mtp=True)
        la, lb = fused(x, labels=x), plain(x, labels=x)
    torch.testing.assert_close(a.logits, b.logits, **close("float32"))
    torch.testing.assert_close(a.expert_load, b.expert_load, **close("exact"))
    for u, v in zip(a.mtp_logits, b.mtp_logits, strict=True):
        torch.testing.assert_close(u, v, **close("float32"))
    torch.testing.assert_close(la.loss, lb.loss, **close("float32"))
    torch.testing.assert_close(la.aux_loss, lb.aux_loss, **close("float32"))


def _semantics(m) -> tuple:
    """What a model computes, independent of the names its spec gives kinds and blocks.

    A window is compared by the keys it shows (`window: 8, keys` is `window: 7, previous_plus_self`).
    """

    def att(name: str) -> dict:
        a = m.attention[name]
        return a.model_dump(exclude={"window", "window_convention"}) | {"window_keys": a.window_keys}

    layers = [(att(m.blocks[b].attention), m.ffn[m.blocks[b].ffn]) for b in m.layer_blocks]
    mtp = None
    if m.mtp is not None and m.mtp.num_blocks:
        block = m.blocks[m.mtp.block]
        mtp = (m.mtp.num_blocks, att(block.attention), m.ffn[block.ffn])
    return (
        layers,
        mtp,
        m.vocab_size,
        m.hidden_size,
        m.max_position_embeddings,
        m.norm,
        m.tie_word_embeddings,
        m.init_std,
    )


@settings(max_examples=40)
@given(spec=small_specs())
def test_transformers_config_round_trip_keeps_the_model(spec):
    from lmspec.codegen.hf import config_to_spec, spec_to_config

    assert _semantics(config_to_spec(spec_to_config(spec)).model) == _semantics(spec.model)


@st.composite
def expressible_specs(draw) -> Spec:
    """Specs stock transformers can run: the round trip then goes through the plain config keys only."""
    kv = draw(st.sampled_from([1, 2]))
    shared = {
        "num_heads": 4,
        "qk_head_dim": draw(st.sampled_from([4, 8])),
        "v_head_dim": draw(st.sampled_from([4, 6])),
        "value_scale": draw(st.sampled_from([1.0, 0.707])),
        "bias": draw(st.booleans()),
    }
    rope = {"theta": 1000.0, "fraction": draw(st.sampled_from([0.5, 1.0]))}
    data = dict(draw(small_specs()).model.model_dump())
    data["attention"] = {
        "global": {"kind": "global", "num_kv_heads": kv, "sink": False, "rope": rope, **shared},
        "swa": {
            "kind": "sliding",
            "num_kv_heads": 2 * kv,
            "sink": True,
            "window": draw(st.integers(1, 6)),
            "window_convention": draw(st.sampled_from(["previous_plus_self", "keys"])),
            "rope": {"theta": 10.0, "fraction": rope["fraction"]},
            **shared,
        },
    }
    data["ffn"]["moe"] |= {"num_shared_experts": 0, "score_function": "sigmoid", "correction_bias": True}
    kinds = draw(
        st.lists(
            st.sampled_from(["global", "swa"]), min_size=len(data["blocks"]), max_size=len(data["blocks"])
        )
    )
    for block, kind in zip(data["blocks"], kinds, strict=True):
        data["blocks"][block] = {"attention": kind, "ffn": data["blocks"][block]["ffn"]}
    if data["mtp"] is not None:
        data["blocks"]["MTP"] = {"attention": "swa", "ffn": "dense"}
        data["mtp"]["block"] = "MTP"
    return validate({"name": "hf", "model": data}, {}, "<hypothesis>")


@settings(max_examples=30)
@given(spec=expressible_specs())
def test_expressible_specs_round_trip_through_plain_config_keys(spec):
    from lmspec.codegen.hf import config_to_spec, export_issues, spec_to_config

    assert export_issues(spec) == []
    config = spec_to_config(spec)
    assert "lmspec_spec" not in config
    assert _semantics(config_to_spec(config).model) == _semantics(spec.model)


@settings(max_examples=6)
@given(spec=expressible_specs(), seed=st.integers(0, 2**16))
def test_expressible_specs_run_identically_in_transformers(spec, seed, tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    model = _build(spec, seed).eval()
    directory = tmp_path_factory.mktemp("hf")
    model.save_pretrained(directory)
    ref = transformers.MiMoV2FlashForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()
    x = torch.randint(0, spec.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        torch.testing.assert_close(ref(x).logits, model(x).logits, **close("float32_model"))
