"""The plain-PyTorch reference backend against transformers' MiMo-V2-Flash code (the oracle's oracle)."""

from __future__ import annotations

import inspect

import pytest
import torch

from lmspec.runtime.ops import (
    OP_FAMILIES,
    OPS,
    Backend,
    CPUBackend,
    MixedBackend,
    ReferenceBackend,
    cpu,
    get_backend,
)
from lmspec.runtime.ops import reference as ref
from lmspec.runtime.ops.base import AttentionKeywords, RouteKeywords, keyword_defaults
from lmspec.testing.compare import close

hf = pytest.importorskip("transformers.models.mimo_v2_flash.modeling_mimo_v2_flash")


def _hf_attention(q, k, v, sinks, *, scale, value_scale, window_keys):
    class Module:
        num_key_value_groups = q.shape[1] // k.shape[1]
        training = False

    Module.sinks = sinks
    T = q.shape[2]
    i = torch.arange(T)
    visible = i[None, :] <= i[:, None]
    if window_keys is not None:
        visible &= (i[:, None] - i[None, :]) < window_keys  # HF's sliding_window = window_keys
    mask = torch.zeros(T, T, dtype=q.dtype).masked_fill(~visible, float("-inf"))
    out, _ = hf.eager_attention_forward(Module, q, k, v * value_scale, mask, scale)
    return out.transpose(1, 2)  # (B, Hq, T, Dv)


@pytest.mark.parametrize("window_keys,sink", [(129, True), (5, True), (None, False), (3, False)])
@pytest.mark.parametrize("budget", [1 << 24, 300])
def test_attention_matches_transformers_eager(monkeypatch, window_keys, sink, budget):
    # A small score budget forces many query chunks, which exercises the key-range slicing per chunk.
    monkeypatch.setattr(ref, "_ATTN_SCORE_BUDGET", budget)
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, T = 2, 8, 2, 140
    q = torch.randn(B, Hq, T, 24, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, T, 24, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, T, 16, generator=g, dtype=torch.float64)
    sinks = torch.randn(Hq, generator=g, dtype=torch.float64) * 3 if sink else None
    kw = {"scale": 24**-0.5, "value_scale": 0.707, "window_keys": window_keys}
    want = _hf_attention(q, k, v, sinks, **kw)
    torch.testing.assert_close(ref.attention(q, k, v, sinks, **kw), want, **close("float64_op"))
    pos = torch.arange(T).expand(B, T)
    torch.testing.assert_close(
        ref.attention(q, k, v, sinks, q_pos=pos, k_pos=pos, **kw), want, **close("float64_op")
    )


def test_attention_sink_gradient_matches_autograd_of_transformers():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 12, 8, generator=g, dtype=torch.float64)
    k = torch.randn(1, 2, 12, 8, generator=g, dtype=torch.float64)
    v = torch.randn(1, 2, 12, 8, generator=g, dtype=torch.float64)
    sinks = (torch.randn(4, generator=g, dtype=torch.float64) + 4).requires_grad_()
    kw = {"scale": 0.3, "value_scale": 1.0, "window_keys": 4}
    (ds_ref,) = torch.autograd.grad(ref.attention(q, k, v, sinks, **kw).sum(), sinks)
    (ds_hf,) = torch.autograd.grad(_hf_attention(q, k, v, sinks, **kw).sum(), sinks)
    torch.testing.assert_close(ds_ref, ds_hf)


def test_decode_positions_with_empty_slots_equal_dense_attention_over_the_kept_keys():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 2, 1, 8, generator=g, dtype=torch.float64)
    k = torch.randn(1, 1, 6, 8, generator=g, dtype=torch.float64)
    v = torch.randn(1, 1, 6, 4, generator=g, dtype=torch.float64)
    k_pos = torch.tensor([[4, 5, -1, 2, 3, -1]])  # a ring buffer holding positions 2..5, two empty slots
    out = ref.attention(q, k, v, None, scale=0.3, window_keys=3, q_pos=torch.tensor([[5]]), k_pos=k_pos)
    keep = torch.tensor([4, 0, 1])  # slots of positions 3, 4, 5: the 3-key window of query position 5
    dense = torch.softmax((q @ k[:, :, keep].transpose(-1, -2)) * 0.3, -1) @ v[:, :, keep]
    torch.testing.assert_close(out, dense)


def test_backend_names_and_the_torch_alias():
    assert isinstance(get_backend(), CPUBackend) and get_backend().name == "cpu"
    assert isinstance(get_backend("torch"), CPUBackend)  # the CLI's and old run directories' name
    assert type(get_backend("reference")) is ReferenceBackend
    with pytest.raises(ValueError, match="unknown backend 'cuda'; expected one of 'reference', 'cpu'"):
        get_backend("cuda")


def test_every_op_defaults_to_the_reference_and_cpu_overrides_only_attention_rope_and_experts():
    assert sorted(OPS) == sorted(op for ops in OP_FAMILIES.values() for op in ops)
    assert sorted(OPS) == sorted(n for n, a in vars(Backend).items() if isinstance(a, staticmethod))
    for op in OPS:
        assert getattr(ReferenceBackend(), op) is getattr(ref, op)
        want = {"attention": cpu.attention, "rope": cpu.rope, "moe_experts": cpu.moe_experts}.get(
            op, getattr(ref, op)
        )
        assert getattr(CPUBackend(), op) is want, op


def test_mixed_backend_routes_each_family():
    mixed = get_backend("cpu", overrides={"attention": "reference", "moe": "torch"})
    assert isinstance(mixed, MixedBackend) and mixed.name == "cpu+attention=reference,moe=cpu"
    assert mixed.attention is ref.attention and mixed.route is ref.route
    assert get_backend("reference", overrides={"attention": "cpu"}).attention is cpu.attention


def _keyword_only(op):
    params = [p for p in inspect.signature(op).parameters.values() if p.kind is p.KEYWORD_ONLY]
    return {p.name for p in params if p.default is p.empty}, {
        p.name for p in params if p.default is not p.empty
    }


@pytest.mark.parametrize("op,keywords", [(ref.attention, AttentionKeywords), (ref.route, RouteKeywords)])
def test_keyword_dicts_and_defaults_are_the_reference_signature(op, keywords):
    # Overrides that pass **kw on (cpu.attention, the Triton backend) read names and defaults from these.
    required, optional = _keyword_only(op)
    assert keywords.__required_keys__ == required and keywords.__optional_keys__ == optional
    assert set(keyword_defaults(op)) == optional


def test_cpu_attention_refuses_unknown_and_missing_keywords():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['window'\]"):
        cpu.attention(q, q, q, None, scale=0.3, window=3)
    with pytest.raises(TypeError, match="missing required keyword argument 'scale'"):
        cpu.attention(q, q, q, None, window_keys=3)
