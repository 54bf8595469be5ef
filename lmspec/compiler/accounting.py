"""Exact accounting from the spec alone: parameters, active parameters, KV cache and FLOPs.

Pure integer arithmetic on a validated `Spec`; no tensor is allocated and torch is never imported,
so `lmspec stats` answers for a 309B model in milliseconds.

The parameter formulas follow the module structure of transformers' MiMo-V2-Flash model (which the
generated model mirrors), so `param_count(spec)` equals `sum(p.numel() for p in model.parameters())`:

- attention: q_proj (H -> heads*qk), k_proj (H -> kv*qk), v_proj (H -> kv*v), each with a bias only
  when `bias`; o_proj (heads*v -> H) never has one; `sinks` (heads) on sink layers;
- two RMSNorm weights per decoder layer (H each), plus the final norm;
- dense FFN: gate/up (H -> I) and down (I -> H), no bias;
- MoE: router weight (E, H); experts gate_up (E, 2I, H) and down (E, H, I); shared experts as one
  dense SwiGLU of width num_shared_experts * expert_intermediate_size. The correction bias (E) is
  a buffer, so it is reported under `buffers`, never as a parameter;
- MTP block: enorm and hnorm (H each), eh_proj (2H -> H), one decoder layer of the MTP block's
  kind, final_layernorm (H); the embedding and LM head are shared with the backbone;
- embedding (V, H) and lm_head (V, H), the head omitted when tied.

Conventions of the derived figures:

- "Active" parameters per token count every attention, norm, sink, dense-FFN and router weight,
  and for MoE layers `top_k` routed experts plus all shared experts. The three headline variants
  differ only in whether the embedding table and the LM head are included.
- KV cache: keys are stored after RoPE at qk_head_dim, values at v_head_dim, `kv_dtype_bytes`
  each. A global layer grows by one slot per token; a sliding layer holds at most `window_keys`
  slots, a fixed cost per sequence. The all-global variant replaces every layer's attention by
  the model's (most used) global kind, keeping everything else.
- FLOPs are forward multiply-adds x 2: every matmul weight (attention projections, experts used,
  router, LM head, eh_proj) costs 2 FLOPs per token, q/k/v biases (when `bias`) are counted with
  their projection at the same rate; the embedding lookup, norms, sinks and softmax are not. Attention scores and the value mix cost 2*heads*keys*(qk + v) per
  token, where a token at position `context` sees `context` keys in global layers and
  `min(context, window_keys)` in sliding ones (the decode cost at that context). The
  `seq_mean` variant averages over every position of a causal `context`-token sequence
  (the per-token cost of a training or prefill forward).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from lmspec.spec import Spec
from lmspec.spec.schema import AttentionBase, DenseFFN, GlobalAttention, MoEFFN, SlidingAttention

if TYPE_CHECKING:  # rich is imported when printing, so `account` stays import-light
    from rich.table import Table

__all__ = ["Accounting", "StepMemory", "account", "param_count", "print_stats", "training_step_memory"]


# ---------------------------------------------------------------------------------------------
# Per-module formulas
# ---------------------------------------------------------------------------------------------


def attention_projection_params(attn: AttentionBase, hidden: int) -> int:
    """q/k/v/o projection weights (and q/k/v biases when `bias`) of one attention module."""
    q = attn.num_heads * attn.qk_head_dim
    k = attn.num_kv_heads * attn.qk_head_dim
    v = attn.num_kv_heads * attn.v_head_dim
    weights = hidden * (q + k + v) + attn.num_heads * attn.v_head_dim * hidden
    return weights + ((q + k + v) if attn.bias else 0)


def sink_params(attn: AttentionBase) -> int:
    """One learnable sink logit per query head."""
    return attn.num_heads if attn.sink else 0


def swiglu_params(hidden: int, intermediate: int) -> int:
    """gate_proj and up_proj (H -> I) plus down_proj (I -> H), no biases."""
    return 3 * hidden * intermediate


def _ffn_components(ffn: DenseFFN | MoEFFN, name: str, hidden: int, active: bool) -> dict[str, int]:
    if isinstance(ffn, DenseFFN):
        return {f"dense_ffn.{name}": swiglu_params(hidden, ffn.intermediate_size)}
    used = ffn.top_k if active else ffn.num_experts
    out = {
        f"routed_experts.{name}": used * swiglu_params(hidden, ffn.expert_intermediate_size),
        f"router.{name}": ffn.num_experts * hidden,
    }
    if ffn.num_shared_experts:
        width = ffn.num_shared_experts * ffn.expert_intermediate_size
        out[f"shared_experts.{name}"] = swiglu_params(hidden, width)
    return out


def _router_bias(ffn: DenseFFN | MoEFFN, name: str) -> dict[str, int]:
    """The correction bias is a buffer: it ships with the weights but is never trained by SGD."""
    if isinstance(ffn, MoEFFN) and ffn.correction_bias:
        return {f"router_bias.{name}": ffn.num_experts}
    return {}


def _layer_components(spec: Spec, block: str, active: bool) -> dict[str, int]:
    """Parameters of one decoder layer of `block`, by component (all experts, or the active ones)."""
    m = spec.model
    b = m.blocks[block]
    attn = m.attention[b.attention]
    out = {f"attention.{b.attention}": attention_projection_params(attn, m.hidden_size)}
    if attn.sink:
        out[f"sinks.{b.attention}"] = sink_params(attn)
    out["norms"] = 2 * m.hidden_size
    out.update(_ffn_components(m.ffn[b.ffn], b.ffn, m.hidden_size, active))
    return out


def _mtp_block_components(spec: Spec, active: bool) -> dict[str, int]:
    m = spec.model
    assert m.mtp is not None
    out = _layer_components(spec, m.mtp.block, active)
    out["eh_proj"] = 2 * m.hidden_size * m.hidden_size
    out["norms"] += 3 * m.hidden_size  # enorm, hnorm, final_layernorm
    return out


def _add(total: dict[str, int], part: dict[str, int], times: int = 1) -> None:
    for k, v in part.items():
        total[k] = total.get(k, 0) + v * times


def _backbone_components(spec: Spec, active: bool) -> dict[str, int]:
    m = spec.model
    out: dict[str, int] = {"embedding": m.vocab_size * m.hidden_size}
    if not m.tie_word_embeddings:
        out["lm_head"] = m.vocab_size * m.hidden_size
    for block, count in Counter(m.layer_blocks).items():
        _add(out, _layer_components(spec, block, active), count)
    out["norms"] += m.hidden_size  # final norm
    return out


def param_count(spec: Spec, include_mtp: bool = True) -> int:
    """Trainable parameters of the generated model: `sum(p.numel() for p in model.parameters())`.

    Buffers (the MoE correction bias, RoPE tables) are excluded; a tied LM head is counted once,
    as the embedding. With `include_mtp`, the MTP blocks' own weights are added.
    """
    total = sum(_backbone_components(spec, active=False).values())
    mtp = spec.model.mtp
    if include_mtp and mtp is not None and mtp.num_blocks:
        total += mtp.num_blocks * sum(_mtp_block_components(spec, active=False).values())
    return total


# ---------------------------------------------------------------------------------------------
# KV cache and FLOPs
# ---------------------------------------------------------------------------------------------


def kv_bytes_per_slot(attn: AttentionBase, kv_dtype_bytes: int) -> int:
    """Bytes one cached token takes in one layer: keys (after RoPE) and values of every KV head."""
    return attn.num_kv_heads * (attn.qk_head_dim + attn.v_head_dim) * kv_dtype_bytes


def kv_slots(attn: AttentionBase, context: int) -> int:
    """Cache slots one sequence of `context` tokens needs in one layer of this kind."""
    return min(context, attn.window_keys) if isinstance(attn, SlidingAttention) else context


def mean_keys(attn: AttentionBase, context: int) -> float:
    """Keys a query sees, averaged over the positions 1..context of a causal sequence."""
    w = attn.window_keys if isinstance(attn, SlidingAttention) else context
    if context <= w:
        return (context + 1) / 2
    return (w * (w + 1) / 2 + (context - w) * w) / context


def attention_score_flops(attn: AttentionBase, keys: float) -> float:
    """q.k over qk_head_dim and the value mix over v_head_dim, for one query token."""
    return 2.0 * attn.num_heads * keys * (attn.qk_head_dim + attn.v_head_dim)


def _all_global_reference(spec: Spec) -> str | None:
    """The global attention kind an all-global variant uses: the most used one, else any declared."""
    m = spec.model
    used = Counter(m.blocks[b].attention for b in m.layer_blocks)
    globals_used = [
        (n, name) for name, n in used.most_common() if isinstance(m.attention[name], GlobalAttention)
    ]
    if globals_used:
        return globals_used[0][1]
    declared = [name for name, a in m.attention.items() if isinstance(a, GlobalAttention)]
    return declared[0] if declared else None


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Accounting:
    """Everything `lmspec stats` reports. Counts are exact integers; bytes use the stated dtypes."""

    name: str
    context: int
    dtype_bytes: int
    kv_dtype_bytes: int
    num_layers: int
    layers_by_attention: dict[str, int]
    # Parameters
    params: dict[str, int]  # backbone (no MTP), by component
    params_backbone: int
    buffers: dict[str, int]  # non-trainable state that ships with the weights (router correction bias)
    mtp_blocks: int
    mtp_params_per_block_components: dict[str, int]
    mtp_params_per_block: int
    mtp_params: int
    params_total: int  # backbone + MTP = sum of the generated model's parameter numel
    weight_bytes: int  # params_total * dtype_bytes
    # Active parameters per token
    active: dict[str, int]  # backbone, by component, with top_k routed experts
    active_without_embedding_and_head: int
    active_with_head: int
    active_with_embedding_and_head: int
    mtp_active_per_block: int
    # KV cache
    kv_bytes_per_token: dict[str, int]  # growing layers (global), by attention kind, all layers of it
    kv_bytes_per_token_total: int
    kv_fixed_bytes_per_sequence: dict[str, int]  # sliding layers at a full window, by kind
    kv_fixed_bytes_per_sequence_total: int
    kv_bytes_at_context: dict[str, int]  # one sequence of `context` tokens, by kind
    kv_bytes_at_context_total: int
    all_global_reference: str | None
    all_global_kv_bytes_at_context: int
    kv_ratio_all_global: float
    mtp_kv_bytes_at_context: int  # the MTP blocks' own caches, not included above
    # FLOPs per token (forward)
    flops_per_token: dict[str, float]  # a token at position `context`, by component
    flops_per_token_total: float
    flops_per_token_seq_mean: dict[str, float]  # averaged over a causal `context`-token sequence
    flops_per_token_seq_mean_total: float
    mtp_flops_per_token_per_block: float
    counted: dict[str, str]

    def to_dict(self) -> dict:
        return asdict(self)


def _matmul_flops(components: dict[str, int]) -> dict[str, float]:
    """2 FLOPs per weight of every matmul; lookups and elementwise weights are free."""
    skip = ("embedding", "norms", "sinks.")
    return {k: 2.0 * v for k, v in components.items() if not k.startswith(skip)}


def _attention_kinds(spec: Spec, blocks: Iterable[str]) -> Counter[str]:
    return Counter(spec.model.blocks[b].attention for b in blocks)


def _head_active(spec: Spec, active: dict[str, int]) -> int:
    """A tied head is still a matmul at every token, so it counts once as "head" there."""
    return active["embedding"] if spec.model.tie_word_embeddings else active.get("lm_head", 0)


def _mtp_blocks(spec: Spec) -> int:
    return spec.model.mtp.num_blocks if spec.model.mtp is not None else 0


def _mtp_attention(spec: Spec) -> AttentionBase:
    m = spec.model
    assert m.mtp is not None
    return m.attention[m.blocks[m.mtp.block].attention]


def _with_totals(**figures: dict[str, Any]) -> dict[str, Any]:
    """Each per-part figure `name`, followed by `name_total`: the sum of its parts."""
    out: dict[str, Any] = {}
    for name, parts in figures.items():
        out[name] = parts
        out[f"{name}_total"] = sum(parts.values())
    return out


def _param_fields(spec: Spec, dtype_bytes: int) -> dict[str, Any]:
    """The parameter, buffer and active-parameter fields of `Accounting`."""
    m = spec.model
    params = _backbone_components(spec, active=False)
    buffers: dict[str, int] = {}
    for block, count in Counter(m.layer_blocks).items():
        ffn_name = m.blocks[block].ffn
        _add(buffers, _router_bias(m.ffn[ffn_name], ffn_name), count)

    n_mtp = _mtp_blocks(spec)
    mtp_components = _mtp_block_components(spec, active=False) if n_mtp else {}
    mtp_active_components = _mtp_block_components(spec, active=True) if n_mtp else {}
    if n_mtp:
        ffn_name = m.blocks[m.mtp.block].ffn
        _add(buffers, {f"mtp.{k}": v for k, v in _router_bias(m.ffn[ffn_name], ffn_name).items()}, n_mtp)
    mtp_block = sum(mtp_components.values())
    backbone = sum(params.values())
    total = backbone + n_mtp * mtp_block

    active = _backbone_components(spec, active=True)
    embed = active["embedding"]
    core = sum(active.values()) - embed - active.get("lm_head", 0)
    head_active = _head_active(spec, active)
    return {
        "params": params,
        "params_backbone": backbone,
        "buffers": buffers,
        "mtp_blocks": n_mtp,
        "mtp_params_per_block_components": mtp_components,
        "mtp_params_per_block": mtp_block,
        "mtp_params": n_mtp * mtp_block,
        "params_total": total,
        "weight_bytes": total * dtype_bytes,
        "active": active,
        "active_without_embedding_and_head": core,
        "active_with_head": core + head_active,
        "active_with_embedding_and_head": core + head_active + (embed if not m.tie_word_embeddings else 0),
        "mtp_active_per_block": sum(mtp_active_components.values()),
    }


def _kv_fields(spec: Spec, context: int, kv_b: int) -> dict[str, Any]:
    """The KV-cache fields of `Accounting`: per token, fixed per sequence, at `context`, all-global."""
    m = spec.model
    by_kind = _attention_kinds(spec, m.layer_blocks)
    per_token: dict[str, int] = {}
    fixed: dict[str, int] = {}
    at_context: dict[str, int] = {}
    for kind, count in by_kind.items():
        attn = m.attention[kind]
        slot = kv_bytes_per_slot(attn, kv_b) * count
        if isinstance(attn, SlidingAttention):
            fixed[kind] = slot * attn.window_keys
        else:
            per_token[kind] = slot
        at_context[kind] = slot * kv_slots(attn, context)
    ref = _all_global_reference(spec)
    if ref is not None:
        all_global = kv_bytes_per_slot(m.attention[ref], kv_b) * m.num_layers * context
    else:
        all_global = sum(kv_bytes_per_slot(m.attention[k], kv_b) * n for k, n in by_kind.items()) * context
    mtp_kv = 0
    if _mtp_blocks(spec):
        mtp_attn = _mtp_attention(spec)
        mtp_kv = _mtp_blocks(spec) * kv_bytes_per_slot(mtp_attn, kv_b) * kv_slots(mtp_attn, context)
    return {
        **_with_totals(
            kv_bytes_per_token=per_token, kv_fixed_bytes_per_sequence=fixed, kv_bytes_at_context=at_context
        ),
        "all_global_reference": ref,
        "all_global_kv_bytes_at_context": all_global,
        "kv_ratio_all_global": all_global / sum(at_context.values()),
        "mtp_kv_bytes_at_context": mtp_kv,
    }


def _flop_fields(spec: Spec, context: int, active: dict[str, int]) -> dict[str, Any]:
    """The forward-FLOP fields of `Accounting`, from the active parameters and the keys each layer sees."""
    m = spec.model
    flops = _matmul_flops(active)
    if m.tie_word_embeddings:
        flops["lm_head"] = 2.0 * active["embedding"]
    flops_mean = dict(flops)
    for kind, count in _attention_kinds(spec, m.layer_blocks).items():
        attn = m.attention[kind]
        flops[f"attention_scores.{kind}"] = count * attention_score_flops(attn, kv_slots(attn, context))
        flops_mean[f"attention_scores.{kind}"] = count * attention_score_flops(attn, mean_keys(attn, context))
    mtp_flops = 0.0
    if _mtp_blocks(spec):
        mtp_attn = _mtp_attention(spec)
        mtp_flops = (
            sum(_matmul_flops(_mtp_block_components(spec, active=True)).values())
            + 2.0 * _head_active(spec, active)
            + attention_score_flops(mtp_attn, kv_slots(mtp_attn, context))
        )
    return {
        **_with_totals(flops_per_token=flops, flops_per_token_seq_mean=flops_mean),
        "mtp_flops_per_token_per_block": mtp_flops,
    }


def _counted(spec: Spec, active: dict[str, int], kv_b: int, ref: str | None) -> dict[str, str]:
    """What each figure counts, in words, with the numbers a reader needs to redo it."""
    embed, head_active = active["embedding"], _head_active(spec, active)
    return {
        "params": "trainable parameters; backbone excludes MTP; buffers (router correction bias) listed apart",
        "active": f"attention, sinks, norms, dense FFN, routers, top_k routed + all shared experts per MoE layer; "
        f"headline figures with and without the embedding ({embed}) and LM head ({head_active})",
        "kv": f"keys after RoPE + values of every KV head, {kv_b} bytes each; sliding layers hold "
        "min(context, window_keys) slots; MTP caches reported apart",
        "all_global": f"every backbone layer uses attention kind {ref!r} (KV heads and head dims)"
        if ref is not None
        else "no global kind declared: every layer keeps its heads, without a window",
        "flops": "2 x matmul weights used per token + 2*heads*keys*(qk+v) per attention layer; "
        "embedding lookup, norms, sinks and softmax not counted; keys at position `context`",
    }


def account(
    spec: Spec, context: int = 262144, *, dtype_bytes: int = 2, kv_dtype_bytes: int | None = None
) -> Accounting:
    """Parameters, active parameters, KV cache at `context` tokens and forward FLOPs per token."""
    if context < 1:
        raise ValueError(f"context: expected a positive token count, got {context}")
    if dtype_bytes < 1 or (kv_dtype_bytes is not None and kv_dtype_bytes < 1):
        raise ValueError("dtype bytes: expected a positive byte count")
    kv_b = dtype_bytes if kv_dtype_bytes is None else kv_dtype_bytes
    m = spec.model
    params = _param_fields(spec, dtype_bytes)
    kv = _kv_fields(spec, context, kv_b)
    return Accounting(
        name=spec.name,
        context=context,
        dtype_bytes=dtype_bytes,
        kv_dtype_bytes=kv_b,
        num_layers=m.num_layers,
        layers_by_attention=dict(_attention_kinds(spec, m.layer_blocks)),
        **params,
        **kv,
        **_flop_fields(spec, context, params["active"]),
        counted=_counted(spec, params["active"], kv_b, kv["all_global_reference"]),
    )


# ---------------------------------------------------------------------------------------------
# Memory of one training step
# ---------------------------------------------------------------------------------------------

# Queries per block of the CPU's banded sliding-window path: a block of 32 queries holds its band of
# 32 + window_keys - 1 keys (lmspec.runtime.ops.cpu.BAND_BLOCK; the compiler cannot import the runtime).
_BAND_BLOCK = 32


def _attention_keys(attn: AttentionBase, seq_len: int) -> int:
    """Keys per query whose probabilities autograd keeps: every key on a global layer (the dense
    (T, T) matrix), the band on a sliding one; plus the sink's column."""
    keys = seq_len
    if isinstance(attn, SlidingAttention):
        keys = min(seq_len, attn.window_keys + _BAND_BLOCK - 1)
    return keys + int(attn.sink)


def _ffn_activations(ffn: DenseFFN | MoEFFN, hidden: int) -> int:
    """Elements per token an FFN keeps for backward: its input norm, SwiGLU intermediates, output."""
    if isinstance(ffn, DenseFFN):
        return 3 * hidden + 4 * ffn.intermediate_size
    copies = ffn.top_k * (2 * hidden + 4 * ffn.expert_intermediate_size)  # each routed copy
    shared = 4 * ffn.num_shared_experts * ffn.expert_intermediate_size
    return 3 * hidden + 2 * ffn.num_experts + copies + shared


def _layer_activations(spec: Spec, block: str, seq_len: int) -> int:
    """Elements per token one decoder layer of `block` keeps for backward."""
    m = spec.model
    b = m.blocks[block]
    a = m.attention[b.attention]
    h = m.hidden_size
    # input norm in/out, q and the per-query-head k and v the attention saves, the unexpanded k and v,
    # the attention output (o_proj's input) and o_proj's output, and the probabilities.
    attention = (
        3 * h
        + a.num_heads * (2 * a.qk_head_dim + 2 * a.v_head_dim)
        + a.num_kv_heads * (a.qk_head_dim + a.v_head_dim)
        + a.num_heads * _attention_keys(a, seq_len)
    )
    return attention + _ffn_activations(m.ffn[b.ffn], h)


@dataclass(frozen=True)
class StepMemory:
    """Bytes one training step holds at its peak on a CPU (fp32), by part.

    - params, grads: 4 bytes per parameter each;
    - optimizer: AdamW's two moments, 8 bytes per parameter;
    - activations: what autograd keeps for backward, `batch * seq_len` tokens times the elements per
      token of every layer (see `training_step_memory`), 4 bytes each.
    """

    batch: int
    seq_len: int
    params: int
    grads: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations


def training_step_memory(spec: Spec, batch: int, seq_len: int, dtype_bytes: int = 4) -> StepMemory:
    """An estimate of the peak memory of one training step (forward, backward, AdamW step).

    Parameters, gradients and the two AdamW moments are exact (`param_count`). Activations are the
    tensors autograd keeps, per token: the embedding output; per decoder layer the norms' inputs and
    outputs, q and the per-query-head k and v, the attention output, the softmax probabilities
    (`seq_len` keys on a global layer, the 32-query band of `window_keys + 31` keys on a sliding one,
    one more for a sink), and the SwiGLU intermediates (gate, up, silu, product) of the dense FFN, of
    each of the `top_k` routed copies of a MoE token and of the shared experts; the final norm, and
    vocab / 4 for the LM-head cross-entropy of the head and of every MTP block (it runs over chunks of
    at most 1/32 of the tokens, so the full logits never exist), whose eh_proj and norms add
    7 x hidden. It is a budget, not an allocator trace: within a factor of two of the peak RSS growth
    measured on the CPU runtime (tests/spec/test_accounting.py).
    """
    m = spec.model
    n = param_count(spec)
    head = m.vocab_size // 4  # the chunked LM-head CE holds a chunk's logits, never all of them
    per_token = m.hidden_size + 2 * m.hidden_size + head  # embedding, final norm, head
    for block, count in Counter(m.layer_blocks).items():
        per_token += count * _layer_activations(spec, block, seq_len)
    if m.mtp is not None and m.mtp.num_blocks:
        mtp = 7 * m.hidden_size + _layer_activations(spec, m.mtp.block, seq_len) + head
        per_token += m.mtp.num_blocks * mtp
    return StepMemory(
        batch=batch,
        seq_len=seq_len,
        params=n * dtype_bytes,
        grads=n * dtype_bytes,
        optimizer=2 * n * 4,
        activations=batch * seq_len * per_token * dtype_bytes,
    )


# ---------------------------------------------------------------------------------------------
# Printing
# ---------------------------------------------------------------------------------------------

_ORDER = (
    "embedding",
    "eh_proj",
    "attention.",
    "sinks.",
    "attention_scores.",
    "norms",
    "dense_ffn.",
    "routed_experts.",
    "shared_experts.",
    "router.",
    "router_bias.",
    "lm_head",
)


def _ordered(components: dict[str, float]) -> list[tuple[str, float]]:
    def rank(key: str) -> tuple[int, str]:
        for i, prefix in enumerate(_ORDER):
            if key == prefix or (prefix.endswith(".") and key.startswith(prefix)):
                return i, key
        return len(_ORDER), key

    return sorted(components.items(), key=lambda kv: rank(kv[0]))


def _count(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3f}{unit}"
    return f"{n:g}"


def _bytes(n: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:g} B"


def _exact(n: float) -> str:
    return f"{n:,.0f}" if math.isclose(n, round(n)) else f"{n:,.1f}"


def _table(title: str, columns: tuple[str, ...]) -> Table:
    """A left-titled table whose first column is left-aligned and the figures right-aligned."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right")
    return table


def _params_table(acc: Accounting) -> Table:
    params = _table("Parameters", ("component", "total", "active / token", "exact total"))
    for key, value in _ordered(acc.params):
        params.add_row(key, _count(value), _count(acc.active.get(key, 0)), _exact(value))
    params.add_section()
    params.add_row(
        "[bold]backbone (no MTP)[/bold]",
        _count(acc.params_backbone),
        _count(acc.active_with_embedding_and_head),
        _exact(acc.params_backbone),
    )
    if acc.mtp_blocks:
        params.add_row(
            f"MTP ({acc.mtp_blocks} x {_count(acc.mtp_params_per_block)} per block)",
            _count(acc.mtp_params),
            _count(acc.mtp_active_per_block * acc.mtp_blocks),
            _exact(acc.mtp_params),
        )
    params.add_row("[bold]all parameters[/bold]", _count(acc.params_total), "", _exact(acc.params_total))
    for key, value in _ordered(acc.buffers):
        params.add_row(f"buffer: {key}", _count(value), "", _exact(value))
    return params


def _active_table(acc: Accounting) -> Table:
    active = _table("Active parameters per token (backbone)", ("counted", "params"))
    active.add_row("without embedding and LM head", _count(acc.active_without_embedding_and_head))
    active.add_row("with LM head", _count(acc.active_with_head))
    active.add_row("with embedding and LM head", _count(acc.active_with_embedding_and_head))
    return active


def _kv_table(acc: Accounting) -> Table:
    context = acc.context
    kv = _table(
        f"KV cache, {acc.kv_dtype_bytes} bytes per element, one sequence of {context:,} tokens",
        ("attention kind", "layers", "per token", "fixed per sequence", f"at {context:,}"),
    )
    for kind, n in acc.layers_by_attention.items():
        kv.add_row(
            kind,
            str(n),
            _bytes(acc.kv_bytes_per_token.get(kind, 0)),
            _bytes(acc.kv_fixed_bytes_per_sequence.get(kind, 0)),
            _bytes(acc.kv_bytes_at_context[kind]),
        )
    kv.add_section()
    kv.add_row(
        "[bold]total[/bold]",
        str(acc.num_layers),
        _bytes(acc.kv_bytes_per_token_total),
        _bytes(acc.kv_fixed_bytes_per_sequence_total),
        _bytes(acc.kv_bytes_at_context_total),
    )
    kv.add_row(
        f"all-global ({acc.all_global_reference})",
        str(acc.num_layers),
        "",
        "",
        _bytes(acc.all_global_kv_bytes_at_context),
    )
    kv.add_row("[bold]all-global / this model[/bold]", "", "", "", f"{acc.kv_ratio_all_global:.2f}x")
    if acc.mtp_blocks:
        kv.add_row("MTP blocks (apart)", str(acc.mtp_blocks), "", "", _bytes(acc.mtp_kv_bytes_at_context))
    return kv


def _flops_table(acc: Accounting) -> Table:
    flops = _table(
        f"Forward FLOPs per token at context {acc.context:,}",
        ("component", "at position context", "sequence mean"),
    )
    for key, value in _ordered(acc.flops_per_token):
        flops.add_row(key, _count(value), _count(acc.flops_per_token_seq_mean[key]))
    flops.add_section()
    flops.add_row(
        "[bold]total (no MTP)[/bold]",
        _count(acc.flops_per_token_total),
        _count(acc.flops_per_token_seq_mean_total),
    )
    if acc.mtp_blocks:
        flops.add_row("per MTP block", _count(acc.mtp_flops_per_token_per_block), "")
    return flops


def print_stats(
    spec: Spec, *, as_json: bool = False, context: int = 262144, kv_dtype_bytes: int | None = None
) -> int:
    """`lmspec stats`: the accounting of `spec` as rich tables, or as JSON with `as_json`."""
    acc = account(spec, context, kv_dtype_bytes=kv_dtype_bytes)
    if as_json:
        print(json.dumps(acc.to_dict(), indent=2))
        return 0

    from rich.console import Console

    console = Console()
    layout = ", ".join(f"{n} {k}" for k, n in acc.layers_by_attention.items())
    console.print(f"[bold]{acc.name}[/bold]: {acc.num_layers} layers ({layout}), {acc.mtp_blocks} MTP blocks")
    for table in (_params_table(acc), _active_table(acc), _kv_table(acc), _flops_table(acc)):
        console.print(table)
    for key, text in acc.counted.items():
        console.print(f"[dim]{key}: {text}[/dim]")
    return 0
