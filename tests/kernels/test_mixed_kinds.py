"""A spec with two MoE kinds and two sliding kinds of different windows runs on its own Triton kernels.

Every kind of every family gets its kernel variant, and the whole model on the Triton backend (interpreter
on CPU) matches a float64 run of the same weights on the reference backend: logits and the gradient of
every parameter, each within the float32 tolerance of ``lmspec.testing``'s one table.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch

import lmspec
from lmspec.compiler import lower, run_passes
from lmspec.compiler.variants import AttentionVariant, MoEVariant, kernel_variants
from lmspec.spec import load_spec
from lmspec.testing import assert_matches_reference

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

SPEC = Path(__file__).with_name("mixed_kinds.yaml")


def test_every_kind_has_its_own_variant():
    variants = kernel_variants(run_passes(lower(load_spec(SPEC))))
    moe = {v.name for v in variants if isinstance(v, MoEVariant)}
    assert moe == {"moe_sigmoid_e8_k2", "moe_softmax_e4_k1_raw"}
    sliding = {v.name for v in variants if type(v) is AttentionVariant and v.kind == "sliding"}
    assert sliding == {"attn_sliding_sink_w8_qk32_v16_vs0p707", "attn_sliding_w17_qk16_v16"}
    narrow = next(v for v in variants if v.name == "moe_softmax_e4_k1_raw")
    # layers 2 and 4 and the MTP block use the narrow MoE: router and experts nodes of each
    assert {n.rsplit(".", 1)[0] for n in narrow.nodes} == {
        "model.layers.2.mlp",
        "model.layers.4.mlp",
        "model.mtp.layers.0.mlp",
    }


def test_variants_come_from_the_ir_alone():
    graph = run_passes(lower(load_spec(SPEC)))
    want = [(v, v.nodes) for v in kernel_variants(graph)]
    graph.spec = None  # kernel_variants reads node ops and attributes, never the spec
    assert [(v, v.nodes) for v in kernel_variants(graph)] == want


def test_unfused_graph_needs_no_fused_unit_kernels():
    variants = kernel_variants(run_passes(lower(load_spec(SPEC)), disable=("fusion",)))
    families = {v.family for v in variants}
    # swiglu and head + CE run inline when unfused; the experts always run on the backend
    assert families == {"rmsnorm", "rope", "attention", "decode_attention", "moe"}
    assert all(n.endswith(".experts") for v in variants if isinstance(v, MoEVariant) for n in v.nodes)


def _forward_backward(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Logits, then the gradient of main + MTP + balance losses with respect to every parameter."""
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        results = {"logits": model(x).logits}
    out = model(x, labels=x)
    (out.loss + sum(out.mtp_losses) + out.aux_loss).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        results[name] = p.grad
    return results


def test_mixed_kinds_on_triton_match_the_float64_reference():
    torch.manual_seed(0)
    model = lmspec.build(SPEC, backend="reference")
    reference = copy.deepcopy(model).double()
    x = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(1))  # past both windows
    want = _forward_backward(reference, x)
    try:
        model.set_backend("triton")
    except RuntimeError as e:  # triton imported earlier in this process without the interpreter
        pytest.skip(str(e))
    got = _forward_backward(model, x)
    assert got.keys() == want.keys()
    for name in want:
        assert_matches_reference(got[name], want[name], torch.float32, name=name)
