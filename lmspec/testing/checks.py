"""One check per kernel: run the kernel (outputs poisoned) and its float64 reference, forward and every gradient.

Each ``check_*(backend, case)`` returns ``{result name: relative error}`` and raises AssertionError (with a
readable report) on the first result outside the dtype's tolerance. ``backend`` is a ``TritonBackend``
(or any backend with the same surface); the reference is ``lmspec.runtime.ops.reference`` in float64.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from lmspec.compiler.variants import MoEVariant
from lmspec.runtime.ops import reference as ref
from lmspec.testing.compare import assert_matches_reference, poisoned_allocations
from lmspec.testing.strategies import (
    DTYPES,
    AttentionCase,
    CECase,
    DecodeCase,
    MoECase,
    RMSNormCase,
    RopeCase,
    SwiGLUCase,
)


def _leaves(
    tensors: Sequence[torch.Tensor | None], dtype: torch.dtype | None = None
) -> list[torch.Tensor | None]:
    out = []
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        t = t.detach().clone() if dtype is None else t.detach().to(dtype)
        out.append(t.requires_grad_() if t.is_floating_point() else t)
    return out


def _grads(
    outputs: Sequence[torch.Tensor], cotangents: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor | None]
):
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    pairs = [(o, c) for o, c in zip(outputs, cotangents, strict=True) if o.requires_grad]
    grads = torch.autograd.grad([o for o, _ in pairs], wanted, [c for _, c in pairs], allow_unused=True)
    it = iter(grads)
    return [None if (t is None or not t.requires_grad) else next(it) for t in inputs]


# Results that cancel (dQ when a query sees one key, dx of a 1-wide RMSNorm) are compared against this
# fraction of the norm of their terms' magnitudes instead of their own near-zero norm: rounding in the
# kernel is relative to the terms, not to what is left after they cancel. 0.1 leaves room for bf16
# (unit roundoff 4e-3 against a 1e-2 tolerance) while an O(1) bug still fails by orders of magnitude.
CANCELLATION_FLOOR = 0.1


def _compare(
    names: Sequence[str],
    got: Sequence[torch.Tensor | None],
    want: Sequence[torch.Tensor | None],
    dtype: torch.dtype,
    magnitudes: dict[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    errors: dict[str, float] = {}
    for name, g, w in zip(names, got, want, strict=True):
        if w is None:
            continue
        if g is None:
            g = torch.zeros_like(w)
        mag = (magnitudes or {}).get(name)
        floor = 0.0 if mag is None else CANCELLATION_FLOOR * mag.norm().item()
        errors[name] = assert_matches_reference(g, w, dtype, name=name, floor=floor)
    return errors


def _run_both(
    kernel: Callable[..., Any],
    reference: Callable[..., Any],
    inputs: Sequence[torch.Tensor | None],
    dtype: torch.dtype,
    seed: int,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[Any], list[Any]]:
    """Forward and backward through kernel (poisoned allocations) and float64 reference, same cotangents."""
    k_in = _leaves(inputs)
    r_in = _leaves(inputs, torch.float64)
    with poisoned_allocations():
        k_out = kernel(*k_in)
    k_out = list(k_out) if isinstance(k_out, tuple) else [k_out]
    r_out = reference(*r_in)
    r_out = list(r_out) if isinstance(r_out, tuple) else [r_out]
    g = torch.Generator().manual_seed(seed ^ 0x5EED)
    cot = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in r_out]
    with poisoned_allocations():
        k_grads = _grads(k_out, [c.to(o.dtype) for c, o in zip(cot, k_out, strict=True)], k_in)
    r_grads = _grads(r_out, cot, r_in)
    return k_out, r_out, k_grads, r_grads


def check_attention(backend: Any, case: AttentionCase) -> dict[str, float]:
    """Flash attention forward, dq, dk, dv and dsinks."""
    v = case.variant
    dtype = DTYPES[case.dtype]
    x = case.inputs()
    kw = {"scale": v.qk_head_dim**-0.5, "value_scale": v.value_scale, "window_keys": v.window_keys}
    ins = [x["q"], x["k"], x["v"], x["sinks"]]
    k_out, r_out, kg, rg = _run_both(
        lambda q, k, vv, s: backend.attention(q, k, vv, s, **kw),
        lambda q, k, vv, s: ref.attention(q, k, vv, s, **kw),
        ins,
        dtype,
        case.seed,
    )
    g = torch.Generator().manual_seed(case.seed ^ 0x5EED)
    do = torch.randn(r_out[0].shape, generator=g, dtype=torch.float64)  # the cotangent _run_both used
    mags = _attention_grad_magnitudes(ins, do, **kw)
    return _compare(["out", "dq", "dk", "dv", "dsinks"], k_out + kg, r_out + rg, dtype, mags)


def _attention_grad_magnitudes(
    ins: Sequence[torch.Tensor | None],
    do: torch.Tensor,
    *,
    scale: float,
    value_scale: float,
    window_keys: int | None,
) -> dict[str, torch.Tensor]:
    """Magnitudes of the terms summed into dQ, dK (scale * sum_j P_ij (|dP|_ij + |D|_i) |k_j|, and transposed)
    and d sinks (sum_{b,i} P_sink_i |D|_i)."""
    q, k, v, sinks = (None if t is None else t.detach().to(torch.float64) for t in ins)
    B, HQ, T, _ = q.shape
    G = HQ // k.shape[1]
    k = k.repeat_interleave(G, dim=1)  # (B, Hq, T, Dqk)
    v = v.repeat_interleave(G, dim=1)  # (B, Hq, T, Dv)
    i = torch.arange(T)
    visible = i[None, :] <= i[:, None]
    if window_keys is not None:
        visible &= (i[:, None] - i[None, :]) < window_keys
    a = (q @ k.transpose(-1, -2) * scale).masked_fill(~visible, float("-inf"))  # (B, Hq, T, T)
    if sinks is not None:
        a = torch.cat([a, sinks.view(1, HQ, 1, 1).expand(B, HQ, T, 1)], dim=-1)
    p = a.softmax(-1)[..., :T]
    # dP and D are themselves sums that cancel: their term magnitudes are |dO| . |v|.
    dp_mag = value_scale * do.abs() @ v.abs().transpose(-1, -2)
    d_mag = (p * dp_mag).sum(-1, keepdim=True)  # (B, Hq, T, 1)
    w = p * (dp_mag + d_mag)
    mags = {"dq": scale * w @ k.abs(), "dk": scale * w.transpose(-1, -2) @ q.abs()}
    if sinks is not None:
        # d sink_h = -sum_{b,i} P_sink_i D_i sums terms of both signs over the batch and the sequence.
        p_sink = 1.0 - p.sum(-1, keepdim=True)
        mags["dsinks"] = (p_sink * d_mag).sum(dim=(0, 2, 3))
    return mags


def check_decode_attention(backend: Any, case: DecodeCase) -> dict[str, float]:
    """Positional (cache) attention forward, with split-K, ring-buffer slots and empty slots.

    ``backend`` must be a ``TritonBackend``: the decode module is called directly to choose ``num_splits``.
    """
    v = case.variant
    dtype = DTYPES[case.dtype]
    x = case.inputs()
    kw = {
        "scale": v.qk_head_dim**-0.5,
        "value_scale": v.value_scale,
        "window_keys": v.window_keys,
        "q_pos": x["q_pos"],
        "k_pos": x["k_pos"],
    }
    module = backend.kernel(v.key)  # the module itself: the backend's call has no num_splits
    with poisoned_allocations():
        out = module.attention(x["q"], x["k"], x["v"], x["sinks"], num_splits=case.num_splits, **kw)
    r = [None if t is None else t.to(torch.float64) for t in (x["q"], x["k"], x["v"], x["sinks"])]
    want = ref.attention(*r, **kw)
    return _compare(["out"], [out], [want], dtype)


def check_rmsnorm(backend: Any, case: RMSNormCase, eps: float) -> dict[str, float]:
    dtype = DTYPES[case.dtype]
    x = case.inputs()
    k_out, r_out, kg, rg = _run_both(
        lambda a, r, w: backend.add_rmsnorm(a, r, w, eps),
        lambda a, r, w: ref.add_rmsnorm(a, r, w, eps),
        [x["x"], x["residual"], x["weight"]],
        dtype,
        case.seed,
    )
    # dx = rstd (g - n mean(g n)) cancels for tiny hidden sizes; its terms have magnitude rstd (|g| + |n| mean|g n|).
    s = r_out[1].detach()
    rstd = torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps)
    n = s * rstd
    gen = torch.Generator().manual_seed(case.seed ^ 0x5EED)
    dy = torch.randn(s.shape, generator=gen, dtype=torch.float64)
    gw = (dy * x["weight"].double()).abs()
    mag = rstd * (gw + n.abs() * (gw * n.abs()).mean(-1, keepdim=True))
    mags = {"dx": mag, "dresidual": mag}
    return _compare(["out", "sum", "dx", "dresidual", "dweight"], k_out + kg, r_out + rg, dtype, mags)


def check_swiglu(backend: Any, case: SwiGLUCase) -> dict[str, float]:
    dtype = DTYPES[case.dtype]
    x = case.inputs()
    k_out, r_out, kg, rg = _run_both(backend.swiglu, ref.swiglu, [x["gate"], x["up"]], dtype, case.seed)
    return _compare(["out", "dgate", "dup"], k_out + kg, r_out + rg, dtype)


def check_rope(backend: Any, case: RopeCase) -> dict[str, float]:
    dtype = DTYPES[case.dtype]
    x = case.inputs()
    cos, sin = x["cos"], x["sin"]
    k_out, r_out, kg, rg = _run_both(
        lambda q, k: backend.rope(q, k, cos, sin),
        lambda q, k: ref.rope(q, k, cos.to(torch.float64), sin.to(torch.float64)),
        [x["q"], x["k"]],
        dtype,
        case.seed,
    )
    return _compare(["q", "k", "dq", "dk"], k_out + kg, r_out + rg, dtype)


def _moe_kw(moe: MoEVariant) -> dict[str, Any]:
    """The routing keywords of ``backend.route``: the variant's constants but the expert count (a shape)."""
    kw = moe.constants()
    del kw["num_experts"]
    return kw


def check_moe_route(backend: Any, case: MoECase) -> dict[str, float]:
    """Router: same experts chosen, weights and scores, and gradients to x and the router weight."""
    x = case.inputs()
    kw = _moe_kw(case.moe)
    bias = x["correction_bias"]
    k_in = _leaves([x["x"], x["router_weight"]])
    r_in = _leaves([x["x"], x["router_weight"]], torch.float64)
    with poisoned_allocations():
        kw_, ki, ks = backend.route(k_in[0], k_in[1], bias, **kw)
    rw, ri, rs = ref.route(r_in[0], r_in[1], None if bias is None else bias.double(), **kw)
    if not torch.equal(ki, ri):
        # Near-ties can legitimately flip in fp32; only accept a flip between scores equal to fp32 precision.
        choice = rs.detach() + (0 if bias is None else bias.double())
        gap = (choice.gather(1, ki) - choice.gather(1, ri)).abs().max().item()
        if gap > 1e-6:
            raise AssertionError(
                f"router chose different experts (selection-score gap {gap:.3g}):\n{ki}\nvs\n{ri}"
            )
        return {"indices(tie)": 0.0}
    g = torch.Generator().manual_seed(case.seed ^ 0x5EED)
    cw = torch.randn(rw.shape, generator=g, dtype=torch.float64)
    cs = torch.randn(rs.shape, generator=g, dtype=torch.float64)
    with poisoned_allocations():
        kg = _grads([kw_, ks], [cw.float(), cs.float()], k_in)
    rg = _grads([rw, rs], [cw, cs], r_in)
    # The router computes in fp32 whatever the model dtype; only dx is rounded to the model dtype.
    errors = _compare(["weights", "scores", "dweight"], [kw_, ks, kg[1]], [rw, rs, rg[1]], torch.float32)
    errors |= _compare(["dx"], [kg[0]], [rg[0]], DTYPES[case.dtype])
    return errors


def check_moe_experts(backend: Any, case: MoECase) -> dict[str, float]:
    """Grouped-GEMM experts forward and gradients to x, routing weights, gate_up_proj and down_proj."""
    dtype = DTYPES[case.dtype]
    x = case.inputs()
    kw = _moe_kw(case.moe)
    bias = x["correction_bias"]
    weights, indices, _ = ref.route(
        x["x"].double(), x["router_weight"].double(), None if bias is None else bias.double(), **kw
    )
    weights = weights.float()
    k_out, r_out, kg, rg = _run_both(
        lambda a, w, gu, dp: backend.moe_experts(a, w, indices, gu, dp),
        lambda a, w, gu, dp: ref.moe_experts(a, w, indices, gu, dp),
        [x["x"], weights, x["gate_up_proj"], x["down_proj"]],
        dtype,
        case.seed,
    )
    return _compare(["out", "dx", "dweights", "dgate_up_proj", "ddown_proj"], k_out + kg, r_out + rg, dtype)


def check_lm_head_ce(backend: Any, case: CECase) -> dict[str, float]:
    dtype = DTYPES[case.dtype]
    x = case.inputs()
    labels = x["labels"]
    k_out, r_out, kg, rg = _run_both(
        lambda h, w: backend.lm_head_ce(h, w, labels, chunk_size=case.chunk_size),
        lambda h, w: ref.lm_head_ce(h, w, labels, chunk_size=case.chunk_size),
        [x["hidden"], x["weight"]],
        dtype,
        case.seed,
    )
    # dhidden_t = (sum_v p_tv W_v - W_y) g / n cancels (softmax sums to one); its terms: sum_v p_tv |W_v| + |W_y|.
    h, w = x["hidden"].double(), x["weight"].double()
    valid = labels != -100
    p = torch.softmax(h @ w.t(), dim=-1)
    cot = torch.randn((), generator=torch.Generator().manual_seed(case.seed ^ 0x5EED), dtype=torch.float64)
    w_y = w.abs()[labels.clamp(min=0)]
    mag = (p @ w.abs() + w_y) * valid[:, None] * cot.abs() / max(int(valid.sum()), 1)
    return _compare(["loss", "dhidden", "dweight"], k_out + kg, r_out + rg, dtype, {"dhidden": mag})
