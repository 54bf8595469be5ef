"""The default CPU backend: the reference, with fast paths for training attention and MoE experts.

``CPUBackend`` overrides ``attention`` and ``moe_experts``. Dense-position float32 attention (training, and prefill of
queries that are the last Tq of Tk positions) runs through ``F.scaled_dot_product_attention``:

| path            | when                                                                        | cost       |
|-----------------|-----------------------------------------------------------------------------|------------|
| ``banded``      | sliding, Tq == Tk, a multiple of ``BAND_BLOCK``, >= ``min_banded_seq(W)``   | O(T * W)   |
| ``sdpa_causal`` | global, no sink, Tq == Tk                                                   | O(T^2)     |
| ``sdpa_masked`` | any other dense case; a sink is folded in as an extra key                   | O(Tq * Tk) |
| ``sdpa_segments`` | ``segment_ids`` given (packed documents), float32, Tq == Tk; per-sequence mask | O(T^2)   |
| ``reference``   | explicit positions (decode), not float32, Tq > Tk, window < 1               | reference  |

Every path computes ``lmspec.runtime.ops.reference.attention`` up to float32 rounding
(tests/kernels/test_cpu_fast_path.py compares them at the boundaries of this table). ``PATH_CALLS``
counts the calls that took each path, so a test or a benchmark can tell which one ran.

``moe_experts`` follows the plan of the Triton grouped-GEMM kernel: sort the N*k assignments by expert
(``expert_offsets``: no host sync), one grouped GEMM per projection, the un-permute fused with the weighted
sum over the k slots, and a hand-written backward (``_GroupedExperts``). ``moe_path`` picks the GEMM:

| path            | when                                                                   |
|-----------------|------------------------------------------------------------------------|
| ``grouped_mm``  | ``torch._grouped_mm`` takes it: float32/bf16/fp16, H and I rows 16-byte aligned |
| ``expert_loop`` | otherwise (float64, odd sizes): one matmul per expert that has tokens  |

tests/kernels/test_cpu_moe.py compares both against the reference at the routing boundaries (idle experts,
one expert with every token, top_k = num_experts); ``MOE_PATH_CALLS`` counts the calls of each path.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from lmspec.runtime.ops import reference
from lmspec.runtime.ops.base import AttentionKeywords, Backend, keyword_defaults

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack for **kwargs needs Python 3.11

__all__ = [
    "BAND_BLOCK",
    "MOE_PATH_CALLS",
    "PATH_CALLS",
    "CPUBackend",
    "attention",
    "attention_path",
    "expert_offsets",
    "min_banded_seq",
    "moe_experts",
    "moe_path",
    "rope",
]

# Query block of the banded path. Each block of 32 queries attends to its band of 32 + W - 1 keys in one
# batched SDPA call: large enough to amortise the per-block key overlap (W - 1 keys read twice) and the
# call overhead, small enough that a band stays close to W.
BAND_BLOCK = 32

# Masks are rebuilt for every new (shape, window) only; a training run uses a handful of them.
_MASK_CACHE: dict[tuple, Tensor] = {}
_MASK_CACHE_SIZE = 64

PATH_CALLS: Counter[str] = Counter()
MOE_PATH_CALLS: Counter[str] = Counter()


def _count(counter: Counter[str], path: str) -> None:
    """Count a call of ``path``, in eager mode only: a count read and written inside a torch.compile'd graph
    would be a guard that fails on the next call, and recompile every step."""
    if not torch.compiler.is_compiling():
        counter[path] += 1


def min_banded_seq(window_keys: int) -> int:
    """Shortest sequence the banded path takes for ``window_keys``: a multiple of ``BAND_BLOCK`` at least
    twice the band (``BAND_BLOCK + window_keys - 1`` keys), where the band computes at most half the scores
    of the masked dense path."""
    band = BAND_BLOCK + window_keys - 1
    return -(-2 * band // BAND_BLOCK) * BAND_BLOCK


def attention_path(
    Tq: int,
    Tk: int,
    *,
    window_keys: int | None,
    sink: bool,
    dtype: torch.dtype,
    dense_positions: bool,
    segments: bool = False,
) -> str:
    """The path (see the module's table) that ``attention`` takes for these arguments."""
    if segments:
        usable = dtype == torch.float32 and Tq == Tk and (window_keys is None or window_keys >= 1)
        return "sdpa_segments" if usable else "reference"
    if (
        not dense_positions
        or dtype != torch.float32
        or Tq > Tk
        or (window_keys is not None and window_keys < 1)
    ):
        return "reference"
    if window_keys is not None and Tq == Tk and Tk % BAND_BLOCK == 0 and Tk >= min_banded_seq(window_keys):
        return "banded"
    if window_keys is None and not sink and Tq == Tk:
        return "sdpa_causal"
    return "sdpa_masked"


def attention(
    q: Tensor, k: Tensor, v: Tensor, sinks: Tensor | None, **kw: Unpack[AttentionKeywords]
) -> Tensor:
    """``reference.attention`` (same arguments and result), through the fastest path that computes it."""
    unknown = kw.keys() - AttentionKeywords.__optional_keys__ - AttentionKeywords.__required_keys__
    if unknown:
        raise TypeError(f"attention() got unexpected keyword arguments {sorted(unknown)}")
    if "scale" not in kw:
        raise TypeError("attention() missing required keyword argument 'scale'")
    window_keys = kw.get("window_keys")
    dense = kw.get("q_pos") is None and kw.get("k_pos") is None
    path = attention_path(
        q.shape[2],
        k.shape[2],
        window_keys=window_keys,
        sink=sinks is not None,
        dtype=q.dtype,
        dense_positions=dense,
        segments=kw.get("segment_ids") is not None,
    )
    _count(PATH_CALLS, path)
    if path == "reference":
        return reference.attention(q, k, v, sinks, **kw)
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"num_heads {q.shape[1]} is not a multiple of num_kv_heads {k.shape[1]}")
    if path == "sdpa_segments":
        out = _sdpa_segments(q, k, v, sinks, scale=kw["scale"], window_keys=window_keys, **_positions(kw))
    else:
        out = _PATHS[path](q, k, v, sinks, scale=kw["scale"], window_keys=window_keys)
    value_scale = kw.get("value_scale", keyword_defaults(reference.attention)["value_scale"])
    return out * value_scale if value_scale != 1.0 else out


def _sdpa_causal(
    q: Tensor, k: Tensor, v: Tensor, sinks: Tensor | None, *, scale: float, window_keys: int | None
) -> Tensor:
    """Global attention without a sink over Tq == Tk dense positions: SDPA's own causal mask."""
    return _flash_causal(q, k, v, scale)


def _flash_causal(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Causal SDPA through the CPU flash kernel, whatever the head dims.

    The flash kernel needs the qk and v head dims equal; otherwise SDPA falls to its math path (an
    explicit score matrix, softmax and masking ops: about 1.5x slower forward + backward on the tiny
    spec's global layers, qk 48 / v 32). The smaller of q/k and v is zero-padded to the other's dim:
    zero q/k columns add nothing to a score (the scale is passed explicitly), zero v columns are sliced off.
    The sliding paths fold a sink into an extra key; padded, they measured slower than the math path,
    so they call SDPA as they are.
    """
    dqk, dv = q.shape[-1], v.shape[-1]
    if dqk < dv:
        q, k = F.pad(q, (0, dv - dqk)), F.pad(k, (0, dv - dqk))
    elif dv < dqk:
        v = F.pad(v, (0, dqk - dv))
    out = F.scaled_dot_product_attention(
        q, k, v, is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )
    return out[..., :dv] if dv < dqk else out


def _sdpa_masked(
    q: Tensor, k: Tensor, v: Tensor, sinks: Tensor | None, *, scale: float, window_keys: int | None
) -> Tensor:
    """Queries are the last Tq of Tk dense positions; the sink, if any, is key 0 of an explicit mask."""
    mask = _dense_mask(q.shape[2], k.shape[2], window_keys, sinks is not None, q.device)  # (Tq, [1 +] Tk)
    if sinks is None:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
        )
    q, k, v = _fold_sink(q, *_per_query_head(k, v, q.shape[1]), sinks, scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _banded(
    q: Tensor, k: Tensor, v: Tensor, sinks: Tensor | None, *, scale: float, window_keys: int
) -> Tensor:
    """Sliding-window attention by query block, each over its band of block + window - 1 keys: O(T * W)."""
    B, Hq, T, Dqk = q.shape
    nblk, L = T // BAND_BLOCK, BAND_BLOCK + window_keys - 1
    k, v = _per_query_head(k, v, Hq)  # (B, Hq, T, D)
    pad = window_keys - 1  # keys before position 0: zeros, never visible
    kb = F.pad(k, (0, 0, pad, 0)).unfold(2, L, BAND_BLOCK).transpose(-1, -2)  # (B, Hq, nblk, L, Dqk)
    vb = F.pad(v, (0, 0, pad, 0)).unfold(2, L, BAND_BLOCK).transpose(-1, -2)  # (B, Hq, nblk, L, Dv)
    qb = q.reshape(B, Hq, nblk, BAND_BLOCK, Dqk)  # (B, Hq, nblk, block, Dqk)
    if sinks is not None:
        qb, kb, vb = _fold_sink(qb, kb, vb, sinks, scale)
    mask = _banded_mask(T, window_keys, sinks is not None, q.device)  # (nblk, block, [1 +] L)
    out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale)  # (B, Hq, nblk, block, Dv)
    return out.reshape(B, Hq, T, -1)  # (B, Hq, T, Dv)


def _positions(kw: AttentionKeywords) -> dict[str, Tensor | None]:
    return {"q_pos": kw.get("q_pos"), "k_pos": kw.get("k_pos"), "segment_ids": kw.get("segment_ids")}


def _sdpa_segments(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    sinks: Tensor | None,
    *,
    scale: float,
    window_keys: int | None,
    q_pos: Tensor | None,
    k_pos: Tensor | None,
    segment_ids: Tensor,
) -> Tensor:
    """Packed documents (Tq == Tk): one (B, 1, T, [1 +] T) mask per batch, keys of the query's own document
    only, causal by position, within the window; the sink, if any, is key 0."""
    B, Hq, T, _ = q.shape
    dense = torch.arange(T, device=q.device).expand(B, T)
    qp = (dense if q_pos is None else q_pos)[:, :, None]  # (B, T, 1)
    kp = (dense if k_pos is None else k_pos)[:, None, :]  # (B, 1, T)
    mask = (kp >= 0) & (kp <= qp) & (segment_ids[:, :, None] == segment_ids[:, None, :])  # (B, T, T)
    if window_keys is not None:
        mask &= (qp - kp) < window_keys
    mask = mask[:, None]  # (B, 1, T, T): the same for every head
    if sinks is None:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
        )
    q, k, v = _fold_sink(q, *_per_query_head(k, v, Hq), sinks, scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_with_sink_column(mask), scale=scale)


_PATHS: dict[str, Callable[..., Tensor]] = {
    "banded": _banded,
    "sdpa_causal": _sdpa_causal,
    "sdpa_masked": _sdpa_masked,
}


def _per_query_head(k: Tensor, v: Tensor, Hq: int) -> tuple[Tensor, Tensor]:
    """k, v (B, Hkv, T, D) -> (B, Hq, T, D): each query head gets its own copy of its group's keys."""
    G = Hq // k.shape[1]
    if G == 1:
        return k, v
    return k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)


def _fold_sink(q: Tensor, k: Tensor, v: Tensor, sinks: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Fold the per-head sink logit in as key 0: q' = [q, 1], k' = [[0, sink/scale], [k, 0]], v' = [0, v].

    q (B, Hq, *, Tq, Dqk), k (B, Hq, *, Tk, Dqk), v (B, Hq, *, Tk, Dv), sinks (Hq,). The sink's logit is then
    exactly ``sink``, it adds to the denominator only (its value is 0), and its gradient flows by autograd.
    """
    B, Hq, Dqk = q.shape[0], q.shape[1], q.shape[-1]
    inner = k.shape[2:-2]
    ones = (1,) * len(inner)
    sink_logit = (sinks.to(k.dtype) / scale).view(Hq, *ones, 1, 1)  # (Hq, 1.., 1, 1)
    sink_key = torch.cat((k.new_zeros(Hq, *ones, 1, Dqk), sink_logit), dim=-1)  # (Hq, 1.., 1, Dqk + 1)
    qs = F.pad(q, (0, 1), value=1.0)  # (B, Hq, *, Tq, Dqk + 1)
    ks = torch.cat(
        (sink_key.expand(B, Hq, *inner, 1, Dqk + 1), F.pad(k, (0, 1))), dim=-2
    )  # (.., 1 + Tk, Dqk + 1)
    vs = F.pad(v, (0, 0, 1, 0))  # (B, Hq, *, 1 + Tk, Dv): the sink's value is zero
    return qs, ks, vs


def _cached_mask(key: tuple, build: Callable[[], Tensor]) -> Tensor:
    if torch.compiler.is_compiling():
        return build()  # built inside the graph: a cache filled while tracing is a guard that fails next call
    mask = _MASK_CACHE.get(key)
    if mask is None:
        if len(_MASK_CACHE) >= _MASK_CACHE_SIZE:
            _MASK_CACHE.clear()
        mask = _MASK_CACHE[key] = build()
    return mask


def _with_sink_column(mask: Tensor) -> Tensor:
    """Prepend the always-visible sink key: (..., Tq, Tk) -> (..., Tq, 1 + Tk)."""
    return torch.cat((mask.new_ones(*mask.shape[:-1], 1), mask), dim=-1)


def _dense_mask(Tq: int, Tk: int, window_keys: int | None, sink: bool, device: torch.device) -> Tensor:
    """Visibility (Tq, [1 +] Tk) of the last Tq of Tk dense positions."""

    def build() -> Tensor:
        qp = torch.arange(Tk - Tq, Tk, device=device)[:, None]  # (Tq, 1)
        kp = torch.arange(Tk, device=device)[None]  # (1, Tk)
        mask = kp <= qp
        if window_keys is not None:
            mask &= (qp - kp) < window_keys
        return _with_sink_column(mask) if sink else mask

    return _cached_mask(("dense", Tq, Tk, window_keys, sink, device), build)


def _banded_mask(T: int, window_keys: int, sink: bool, device: torch.device) -> Tensor:
    """Visibility (T / block, block, [1 +] block + window_keys - 1) of each query block over its key band."""

    def build() -> Tensor:
        L = BAND_BLOCK + window_keys - 1
        starts = torch.arange(0, T, BAND_BLOCK, device=device)[:, None, None]  # (nblk, 1, 1)
        qp = starts + torch.arange(BAND_BLOCK, device=device)[None, :, None]  # (nblk, block, 1)
        kp = starts - (window_keys - 1) + torch.arange(L, device=device)[None, None, :]  # (nblk, 1, L)
        mask = (kp >= 0) & (kp <= qp) & ((qp - kp) < window_keys)
        return _with_sink_column(mask) if sink else mask

    return _cached_mask(("banded", T, window_keys, sink, device), build)


# --- MoE experts ---------------------------------------------------------------------------------------
# The plan of the Triton grouped-GEMM kernel (codegen/templates/moe.py.jinja), with torch ops: sort the N*k
# assignments by expert, one grouped GEMM per projection over the offsets table, the un-permute fused with
# the weighted sum over k. No Python loop over experts and no host sync: every shape is (N*k, ...) or
# (E, ...), known before the routing is.

# torch._grouped_mm's CPU kernel takes these dtypes, and row strides that are multiples of 16 bytes.
_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_GROUPED_MM_ALIGN = 16


def moe_path(dtype: torch.dtype, hidden: int, intermediate: int) -> str:
    """``grouped_mm`` (one ``torch._grouped_mm`` per projection) when its CPU kernel takes the dtype and the
    row strides of H, I and 2I; else ``expert_loop`` (the same plan, one matmul per expert with tokens)."""
    usable = (
        hasattr(torch, "_grouped_mm")
        and dtype in _GROUPED_MM_DTYPES
        and all(n * dtype.itemsize % _GROUPED_MM_ALIGN == 0 for n in (hidden, intermediate))
    )
    return "grouped_mm" if usable else "expert_loop"


def expert_offsets(topk_indices: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Sort the (token, slot) assignments by expert, without a host sync.

    topk_indices (N, k) -> order (N*k,) flat assignment at each sorted position, token_of (N*k,) its token,
    inverse (N*k,) sorted position of each flat assignment, offsets (E,) int32 end row of each expert.
    Stable, so tokens stay in order inside an expert (as ``reference.sort_by_expert``).
    """
    n, k = topk_indices.shape
    experts, order = torch.sort(topk_indices.reshape(-1), stable=True)  # (N*k,) each
    token_of = order // k
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(n * k, device=order.device))
    bounds = torch.arange(num_experts, device=order.device, dtype=experts.dtype)
    offsets = torch.searchsorted(experts, bounds, right=True).to(torch.int32)  # (E,) cumulative counts
    return order, token_of, inverse, offsets


# Both GEMMs are custom ops: torch.compile sees an opaque call with a declared output shape (the fake
# implementations) instead of tracing into them. torch._grouped_mm's own shape function accepts bf16 only,
# and the expert loop reads the offsets on the host; neither could be traced.
@torch.library.custom_op("lmspec::grouped_mm", mutates_args=())
def _grouped_mm(a: Tensor, b: Tensor, offsets: Tensor, path: str) -> Tensor:
    """Rows of ``a`` (M, K) in expert blocks ending at ``offsets``, times ``b[e]`` (E, K, N) -> (M, N)."""
    if path == "grouped_mm":
        return torch._grouped_mm(a, b, offs=offsets)
    out = a.new_zeros(a.shape[0], b.shape[2])
    start = 0
    for e, end in enumerate(offsets.tolist()):
        if end > start:
            out[start:end] = a[start:end] @ b[e]
        start = end
    return out


@_grouped_mm.register_fake
def _(a: Tensor, b: Tensor, offsets: Tensor, path: str) -> Tensor:
    return a.new_empty(a.shape[0], b.shape[2])


@torch.library.custom_op("lmspec::grouped_wgrad", mutates_args=())
def _grouped_wgrad(a: Tensor, b: Tensor, offsets: Tensor, path: str) -> Tensor:
    """Per expert ``a_e^T b_e`` over its block of rows: a (M, K), b (M, N) -> (E, K, N); zero without rows."""
    if path == "grouped_mm":
        return torch._grouped_mm(a.t(), b, offs=offsets)
    out = a.new_zeros(offsets.shape[0], a.shape[1], b.shape[1])
    start = 0
    for e, end in enumerate(offsets.tolist()):
        if end > start:
            out[e] = a[start:end].t() @ b[start:end]
        start = end
    return out


@_grouped_wgrad.register_fake
def _(a: Tensor, b: Tensor, offsets: Tensor, path: str) -> Tensor:
    return a.new_empty(offsets.shape[0], a.shape[1], b.shape[1])


class _GroupedExperts(torch.autograd.Function):
    """(x (N, H), topk_weights (N, k), gate_up_proj (E, 2I, H), down_proj (E, H, I), routing) -> (N, H).

    Forward: x_s = x[token_of]; gu = x_s @ gate_up[e]^T; h = silu(gate) * up; y_s = h @ down[e]^T;
    out_t = sum_j w_tj y_(t,j) (a (1, k) x (k, H) product per token over y_s[inverse]).
    Backward: dw_tj = dout_t . y_(t,j); dy_s = w_s dout[token_of]; dh = dy_s @ down[e];
    d(gate, up) by the SwiGLU backward; dx_s = d(gate, up) @ gate_up[e]; dx_t = sum_j dx_s[inverse];
    dgate_up[e] = d(gate, up)_e^T x_s,e; ddown[e] = dy_s,e^T h_e. Saves gu and the (N, k, H) expert outputs;
    x_s and h are recomputed (a gather and an elementwise op) rather than held.
    """

    @staticmethod
    def forward(ctx, x, topk_weights, gate_up_proj, down_proj, order, token_of, inverse, offsets, path):  # type: ignore[override]
        N, H = x.shape
        k = topk_weights.shape[1]
        inter = gate_up_proj.shape[1] // 2
        cdt = reference._compute_dtype(x.dtype)
        x_sorted = x.index_select(0, token_of)  # (N*k, H): tokens in expert order
        gu = _grouped_mm(x_sorted, gate_up_proj.transpose(1, 2), offsets, path)  # (N*k, 2I)
        h = F.silu(gu[:, :inter]) * gu[:, inter:]  # (N*k, I)
        y_sorted = _grouped_mm(h, down_proj.transpose(1, 2), offsets, path)  # (N*k, H)
        y = y_sorted.index_select(0, inverse).view(N, k, H)  # (N, k, H): back in (token, slot) order
        # The routing weights are fp32 (HF multiplies in fp32): the weighted sum runs in fp32, rounded once.
        out = _sum_slots(y.to(cdt), topk_weights.to(cdt))  # (N, H)
        ctx.save_for_backward(
            x, topk_weights, gate_up_proj, down_proj, order, token_of, inverse, offsets, gu, y
        )
        ctx.path = path
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        x, topk_weights, gate_up_proj, down_proj, order, token_of, inverse, offsets, gu, y = ctx.saved_tensors
        N, H = x.shape
        k = topk_weights.shape[1]
        inter = gu.shape[1] // 2
        cdt = reference._compute_dtype(x.dtype)
        dout = dout.contiguous()  # a broadcast cotangent (from .sum()) has zero strides
        dweights = None
        if ctx.needs_input_grad[1]:
            dweights = torch.bmm(y.to(cdt), dout.to(cdt)[:, :, None]).view(N, k).to(topk_weights.dtype)
        w_sorted = topk_weights.reshape(-1).to(cdt).index_select(0, order)  # (N*k,)
        dy = (dout.index_select(0, token_of).to(cdt) * w_sorted[:, None]).to(x.dtype)  # (N*k, H)
        gate, up = gu[:, :inter], gu[:, inter:]
        silu = F.silu(gate)
        dgate_up = ddown = dx = None
        if ctx.needs_input_grad[3]:
            ddown = _grouped_wgrad(dy, silu * up, offsets, ctx.path)  # (E, H, I)
        dh = _grouped_mm(dy, down_proj, offsets, ctx.path)  # (N*k, I)
        # d(gate, up) written in place into one (N*k, 2I) buffer: the SwiGLU backward without a cat.
        dgu = torch.empty_like(gu)
        dgu[:, :inter] = torch.ops.aten.silu_backward(dh * up, gate)
        dgu[:, inter:] = dh * silu
        if ctx.needs_input_grad[2]:
            dgate_up = _grouped_wgrad(dgu, x.index_select(0, token_of), offsets, ctx.path)  # (E, 2I, H)
        if ctx.needs_input_grad[0]:
            dx_sorted = _grouped_mm(dgu, gate_up_proj, offsets, ctx.path)  # (N*k, H)
            dx = _sum_slots(dx_sorted.index_select(0, inverse).view(N, k, H).to(cdt)).to(x.dtype)  # (N, H)
        return dx, dweights, dgate_up, ddown, None, None, None, None, None


def _sum_slots(y: Tensor, weights: Tensor | None = None) -> Tensor:
    """``sum_j weights[:, j] * y[:, j]`` (or the plain sum) over the k slots: y (N, k, H) -> (N, H).

    k is top_k (small and fixed): one fused multiply-add per slot is several times faster on CPU than
    a reduction over the middle dim or a batched (1, k) x (k, H) matmul per token.
    """
    k = y.shape[1]
    out = y[:, 0] * weights[:, :1] if weights is not None else y[:, 0].clone()
    for j in range(1, k):
        if weights is None:
            out.add_(y[:, j])
        else:
            out.addcmul_(y[:, j], weights[:, j : j + 1])
    return out


def moe_experts(
    x: Tensor, topk_weights: Tensor, topk_indices: Tensor, gate_up_proj: Tensor, down_proj: Tensor
) -> Tensor:
    """``reference.moe_experts`` (same arguments and result) as sorted grouped GEMMs (``_GroupedExperts``)."""
    E, two_i, H = gate_up_proj.shape
    path = moe_path(x.dtype, H, two_i // 2)
    _count(MOE_PATH_CALLS, path)
    order, token_of, inverse, offsets = expert_offsets(topk_indices, E)
    return _GroupedExperts.apply(
        x.contiguous(),
        topk_weights,
        gate_up_proj.contiguous(),
        down_proj.contiguous(),
        order,
        token_of,
        inverse,
        offsets,
        path,
    )


# --- RoPE ---------------------------------------------------------------------------------------------


class _Rope(torch.autograd.Function):
    """``reference.rope`` on one of q / k, written into one output with no intermediate tensors.

    With x = [x1, x2, x_pass] (halves of the leading rope_dim dims) and cos = [c1, c2], sin = [s1, s2]:
    out = [x1 c1 - x2 s1, x2 c2 + x1 s2, x_pass]; the backward is the transposed rotation,
    dx = [g1 c1 + g2 s2, g2 c2 - g1 s1, g_pass]. The reference's rotate_half, two cats and the slices'
    zero-filled gradients (about three times the ops, forward and backward) never run.
    """

    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, sign=1.0)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, sin, sign=-1.0), None, None


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, *, sign: float) -> Tensor:
    """The rotation (sign 1) or its transpose (sign -1) of x's leading rope_dim dims; the rest copied."""
    r = cos.shape[-1]
    h = r // 2
    x1, x2 = x[..., :h], x[..., h:r]
    c1, c2, s1, s2 = cos[..., :h], cos[..., h:], sin[..., :h], sin[..., h:]
    if sign < 0:  # the transpose: g1 pairs with s2, g2 with s1
        s1, s2 = s2, s1
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    o1, o2 = out[..., :h], out[..., h:r]
    torch.mul(x1, c1, out=o1)
    o1.addcmul_(x2, s1, value=-sign)
    torch.mul(x2, c2, out=o2)
    o2.addcmul_(x1, s2, value=sign)
    if r < x.shape[-1]:
        out[..., r:] = x[..., r:]
    return out


def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """``reference.rope`` (same arguments and result) through ``_Rope``.

    Under torch.compile, or with cos/sin that need a gradient or an odd rope_dim, the reference runs:
    inductor fuses its ops itself, and the fast path has no gradient for the tables.
    """
    if torch.compiler.is_compiling() or cos.shape[-1] % 2 or cos.requires_grad or sin.requires_grad:
        return reference.rope(q, k, cos, sin)
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]  # (1, T, rope_dim)
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, rope_dim): broadcast over heads
    return _Rope.apply(q, cos, sin), _Rope.apply(k, cos, sin)


class CPUBackend(Backend):
    """The reference, with the fast attention paths, the grouped-GEMM experts and the RoPE above; the CPU
    default."""

    name = "cpu"
    attention = staticmethod(attention)
    moe_experts = staticmethod(moe_experts)
    rope = staticmethod(rope)
