"""Plain PyTorch reference of every op: the float64 oracle of every kernel and of the fast CPU paths.

Each op is written to be read next to its Triton template: shapes are commented on every reshape, and
every op is correct in float64 so tests can compare kernels against a float64 run of the same code. No op
here picks a faster path by shape or dtype; those live in ``lmspec.runtime.ops.cpu``.
Semantics follow ``transformers`` 5.23 ``modeling_mimo_v2_flash.py``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# Bound on the number of attention scores held at once by the reference (elements, not bytes):
# 2**24 fp32 scores = 64 MiB, small enough for CPU training and large enough to keep matmuls efficient.
_ATTN_SCORE_BUDGET = 1 << 24


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Reductions run in float32, or float64 when the inputs are float64 (reference runs)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rmsnorm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``weight * (x * rsqrt(mean(x^2) + eps))`` with the statistics in fp32, cast back before the weight (HF)."""
    xf = x.to(_compute_dtype(x.dtype))
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def add_rmsnorm(x: Tensor, residual: Tensor | None, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Return ``(rmsnorm(x + residual), x + residual)``; the sum is the next residual stream."""
    summed = x if residual is None else x + residual
    return rmsnorm(summed, weight, eps), summed


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up``."""
    return F.silu(gate) * up


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Partial rotary embedding on the leading ``rope_dim = cos.shape[-1]`` dims of q and k (rotate_half style).

    q (B, Hq, T, Dqk), k (B, Hkv, T, Dqk), cos/sin (B, T, rope_dim) or (T, rope_dim); dims past rope_dim pass.
    """
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]  # (1, T, rope_dim)
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, rope_dim): broadcast over heads
    rope_dim = cos.shape[-1]

    def apply(x: Tensor) -> Tensor:
        x_rot, x_pass = x[..., :rope_dim], x[..., rope_dim:]
        return torch.cat((x_rot * cos + _rotate_half(x_rot) * sin, x_pass), dim=-1)

    return apply(q), apply(k)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    sinks: Tensor | None,
    *,
    scale: float,
    value_scale: float = 1.0,
    window_keys: int | None = None,
    q_pos: Tensor | None = None,
    k_pos: Tensor | None = None,
    segment_ids: Tensor | None = None,
) -> Tensor:
    """Masked softmax attention with GQA, a per-head sink logit and sliding window; chunked over queries.

    q (B, Hq, Tq, Dqk), k (B, Hkv, Tk, Dqk), v (B, Hkv, Tk, Dv) -> (B, Hq, Tq, Dv).
    Key j is visible to query i iff ``0 <= k_pos[j] <= q_pos[i]`` and ``q_pos[i] - k_pos[j] < window_keys``.
    ``q_pos``/``k_pos`` None means ``arange`` (queries are the last Tq positions when Tq < Tk).
    ``segment_ids`` (B, Tk), each key's document (queries are the last Tq), hides keys of other documents:
    with positions restarting at each document, a packed document computes exactly as if alone.
    The sink is an extra logit in the denominator only. A query with nothing visible and no sink gives 0.
    """
    B, Hq, Tq, Dqk = q.shape
    _, Hkv, Tk, _ = k.shape
    Dv = v.shape[-1]
    if Hq % Hkv != 0:
        raise ValueError(f"num_heads {Hq} is not a multiple of num_kv_heads {Hkv}")
    G = Hq // Hkv
    cdt = _compute_dtype(q.dtype)
    dense_positions = q_pos is None and k_pos is None
    if q_pos is None:
        q_pos = torch.arange(Tk - Tq, Tk, device=q.device).expand(B, Tq)
    if k_pos is None:
        k_pos = torch.arange(Tk, device=q.device).expand(B, Tk)

    qg = q.reshape(B, Hkv, G, Tq, Dqk).to(cdt)  # (B, Hkv, G, Tq, Dqk): heads of one kv group together
    kf, vf = k.to(cdt), v.to(cdt)
    sink = None if sinks is None else sinks.to(cdt).reshape(1, Hkv, G, 1, 1)  # (1, Hkv, G, 1, 1)

    chunk = max(1, _ATTN_SCORE_BUDGET // max(1, B * Hq * Tk))
    outs = []
    for qs in range(0, Tq, chunk):
        qe = min(Tq, qs + chunk)
        # With dense positions, keys outside [first query - window + 1, last query] are never visible:
        # slicing them away makes the reference cost O(T * W) for sliding layers.
        ks, ke = 0, Tk
        if dense_positions:
            ke = Tk - Tq + qe
            if window_keys is not None:
                ks = max(0, Tk - Tq + qs - window_keys + 1)
        kc, vc = kf[:, :, ks:ke], vf[:, :, ks:ke]  # (B, Hkv, Tkc, D)
        qp = q_pos[:, qs:qe, None]  # (B, Tqc, 1)
        kp = k_pos[:, None, ks:ke]  # (B, 1, Tkc)
        visible = (kp >= 0) & (kp <= qp)
        if window_keys is not None:
            visible &= (qp - kp) < window_keys
        if segment_ids is not None:
            q_seg = segment_ids[:, Tk - Tq + qs : Tk - Tq + qe, None]  # (B, Tqc, 1)
            visible &= q_seg == segment_ids[:, None, ks:ke]  # (B, Tqc, Tkc)
        visible = visible[:, None, None]  # (B, 1, 1, Tqc, Tkc)

        scores = torch.einsum("bhgqd,bhkd->bhgqk", qg[:, :, :, qs:qe], kc) * scale  # (B, Hkv, G, Tqc, Tkc)
        scores = scores.masked_fill(~visible, float("-inf"))
        row_max = scores.amax(-1, keepdim=True)  # (B, Hkv, G, Tqc, 1)
        if sink is not None:
            row_max = torch.maximum(row_max, sink)
        # The result does not depend on the shift, so it carries no gradient; rows with nothing visible
        # get a finite shift so that exp() gives exact zeros instead of NaN.
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
        p = torch.exp(scores - row_max)
        denom = p.sum(-1, keepdim=True)
        if sink is not None:
            denom = denom + torch.exp(sink - row_max)
        denom = torch.where(denom > 0, denom, torch.ones_like(denom))
        out = torch.einsum("bhgqk,bhkd->bhgqd", p / denom, vc)  # (B, Hkv, G, Tqc, Dv)
        outs.append(out)
    out = torch.cat(outs, dim=3).reshape(B, Hq, Tq, Dv)  # (B, Hq, Tq, Dv)
    if value_scale != 1.0:
        out = out * value_scale
    return out.to(q.dtype)


def route(
    x: Tensor,
    weight: Tensor,
    correction_bias: Tensor | None,
    *,
    top_k: int,
    score_function: str = "sigmoid",
    renormalize: bool = True,
    routed_scaling_factor: float = 1.0,
    num_groups: int = 1,
    top_k_groups: int = 1,
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k router: fp32 logits, sigmoid/softmax scores, selection on ``scores + bias`` (HF ``noaux_tc``).

    x (N, H), weight (E, H) -> (topk_weights (N, k) fp32, topk_indices (N, k) int64, scores (N, E) fp32).
    Indices come sorted by descending selection score. Weights are the raw scores at the chosen experts.
    """
    cdt = _compute_dtype(x.dtype)
    logits = F.linear(x.to(cdt), weight.to(cdt))  # (N, E)
    if score_function == "sigmoid":
        scores = logits.sigmoid()
    elif score_function == "softmax":
        scores = logits.softmax(dim=-1)
    else:
        raise ValueError(f"unknown score_function {score_function!r}; expected 'sigmoid' or 'softmax'")
    choice = scores.detach()
    if correction_bias is not None:
        choice = choice + correction_bias.to(cdt)
    N, E = choice.shape
    if num_groups > 1:
        grouped = choice.view(N, num_groups, E // num_groups)  # (N, groups, E/groups)
        group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)  # (N, groups)
        group_idx = group_scores.topk(top_k_groups, dim=-1)[1]
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
        expert_mask = group_mask[:, :, None].expand(N, num_groups, E // num_groups).reshape(N, E)
        choice = choice.masked_fill(~expert_mask, float("-inf"))
    topk_indices = choice.topk(top_k, dim=-1, sorted=True)[1]  # (N, k)
    topk_weights = scores.gather(1, topk_indices)
    if renormalize:
        topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
    topk_weights = topk_weights * routed_scaling_factor
    return topk_weights, topk_indices, scores


def sort_by_expert(topk_indices: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """Permutation that groups the N*k (token, slot) assignments by expert.

    Returns (order (N*k,) int64 into the flattened assignments, token_of (N*k,) token index of each sorted
    assignment, counts (E,) assignments per expert). Stable, so tokens stay in order inside an expert.
    """
    flat = topk_indices.reshape(-1)  # (N*k,)
    order = torch.argsort(flat, stable=True)
    token_of = order // topk_indices.shape[1]
    counts = torch.bincount(flat, minlength=num_experts)
    return order, token_of, counts


def moe_experts(
    x: Tensor, topk_weights: Tensor, topk_indices: Tensor, gate_up_proj: Tensor, down_proj: Tensor
) -> Tensor:
    """``sum_k w_k * down_e(silu(gate_e x) * up_e x)`` over the chosen experts, as sort-by-expert + GEMMs.

    x (N, H), gate_up_proj (E, 2I, H) with gate rows first, down_proj (E, H, I) -> (N, H).
    Only experts that received tokens are visited; each does one GEMM over its contiguous block of tokens.
    """
    N, H = x.shape
    E, two_i, _ = gate_up_proj.shape
    inter = two_i // 2
    order, token_of, counts = sort_by_expert(topk_indices, E)
    x_sorted = x.index_select(0, token_of)  # (N*k, H): tokens permuted into expert order
    w_sorted = topk_weights.reshape(-1).index_select(0, order)  # (N*k,)
    pieces = []
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n == 0:
            continue
        xe = x_sorted[start : start + n]  # (n, H)
        gate_up = xe @ gate_up_proj[e].t()  # (n, 2I)
        h = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]  # (n, I)
        pieces.append(h @ down_proj[e].t())  # (n, H)
        start += n
    y_sorted = torch.cat(pieces, 0) if pieces else x_sorted.new_zeros(0, H)  # (N*k, H)
    # HF multiplies the expert output by the fp32 routing weight, then accumulates in the input dtype.
    y_sorted = (y_sorted * w_sorted[:, None]).to(x.dtype)
    return x.new_zeros(N, H).index_add(0, token_of, y_sorted)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Mean CE of ``hidden @ weight.T`` without materialising the (N, V) logits.

    Forward keeps only the per-token log-sum-exp; backward recomputes each chunk's logits, turns them into
    ``softmax - onehot`` in place and accumulates dhidden and dweight chunk by chunk.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int, chunk: int) -> Tensor:  # type: ignore[override]
        cdt = _compute_dtype(hidden.dtype)
        N = hidden.shape[0]
        w = weight.to(cdt)
        valid = labels != ignore_index
        safe_labels = torch.where(valid, labels, torch.zeros_like(labels))
        lse = torch.empty(N, dtype=cdt, device=hidden.device)
        total = torch.zeros((), dtype=cdt, device=hidden.device)
        for s, e in _chunk_bounds(N, chunk):
            logits = hidden[s:e].to(cdt) @ w.t()  # (n, V), turned into exp(logits - max) in place below
            target = logits.gather(1, safe_labels[s:e, None])[:, 0]
            row_max = logits.amax(dim=-1)
            # In place instead of torch.logsumexp, whose temporary would double the chunk's memory.
            lse_c = row_max + logits.sub_(row_max[:, None]).exp_().sum(dim=-1).log()
            total += ((lse_c - target) * valid[s:e]).sum()
            lse[s:e] = lse_c
            del logits
        # A tensor, not a Python int: reading it on the host would stop torch.compile's graph here.
        n_valid = valid.sum().clamp_min(1).to(cdt)
        ctx.save_for_backward(hidden, weight, safe_labels, valid, lse, n_valid)
        ctx.chunk = chunk
        # All labels ignored: a zero loss with zero gradients, so packed batches of padding do not NaN a run.
        return (total / n_valid).to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        hidden, weight, labels, valid, lse, n_valid = ctx.saved_tensors
        cdt = lse.dtype
        N = hidden.shape[0]
        w = weight.to(cdt)
        g = grad_out.to(cdt) / n_valid
        dhidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        dweight = torch.zeros_like(w) if ctx.needs_input_grad[1] else None
        rows = torch.arange(N, device=hidden.device)
        for s, e in _chunk_bounds(N, ctx.chunk):
            h = hidden[s:e].to(cdt)
            dlogits = h @ w.t()  # (n, V), overwritten in place below to bound memory
            dlogits.sub_(lse[s:e, None]).exp_()
            dlogits[rows[: e - s], labels[s:e]] -= 1.0
            dlogits.mul_((valid[s:e].to(cdt) * g)[:, None])
            if dhidden is not None:
                dhidden[s:e] = (dlogits @ w).to(hidden.dtype)
            if dweight is not None:
                dweight.addmm_(dlogits.t(), h)
            del dlogits
        return dhidden, None if dweight is None else dweight.to(weight.dtype), None, None, None


def _chunk_bounds(N: int, chunk: int) -> list[tuple[int, int]]:
    """Row ranges of the chunks; a single chunk is tested as ``N <= chunk`` rather than by counting, so a
    batch size that torch.compile treats as symbolic is guarded, not specialised (no recompile per size)."""
    if N <= chunk:
        return [(0, N)]
    return [(s, min(N, s + chunk)) for s in range(0, N, chunk)]


# Logits held at once by the CE (elements, not bytes): 2**22 fp32 = 16 MiB. Below it a chunk of 1/32 of the
# tokens saves no memory worth having and costs a GEMM and a dozen small ops per chunk (a 256-token vocab
# at 2048 tokens was 32 chunks of 64 rows).
_CE_LOGITS_BUDGET = 1 << 22


def lm_head_ce(
    hidden: Tensor, weight: Tensor, labels: Tensor, *, ignore_index: int = -100, chunk_size: int = 4096
) -> Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` over non-ignored labels, chunked over tokens.

    hidden (N, H), weight (V, H), labels (N,). A chunk holds at most ``chunk_size`` rows, and at most 1/32
    of the tokens unless its (rows, V) logits fit ``_CE_LOGITS_BUDGET``: the extra memory of forward +
    backward (chunk logits, transients, dW) stays under 1/8 of the full logits or about the budget.
    """
    N, V = hidden.shape[0], weight.shape[0]
    chunk = max(1, min(chunk_size, max(math.ceil(N / 32), _CE_LOGITS_BUDGET // V)))
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, labels, ignore_index, chunk)
