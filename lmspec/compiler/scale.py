"""Scale-out planning from the accounting alone: which layouts of N devices fit a spec, and what each
device holds and moves. Pure integer arithmetic on a validated `Spec`, like `accounting`; no tensor is
allocated, so `lmspec plan` answers for a 309B model in well under a second.

A layout is `data x fsdp x expert x tensor = N` (`training.parallel`), one of those `split_layouts`
finds: every ordered factorisation of N that the model can be split by (`parallel_problem`). What a
layout does to each parameter class (`ParamSplit`):

- routed experts: split over `expert` ranks (whole experts), each expert's matrices over `tensor`
  ranks (expert tensor parallelism, as Megatron does by default), sharded over `fsdp` ranks;
- tensor-split weights (attention projections and sinks, dense FFNs, shared experts, eh_proj, the
  embedding and LM head, vocab-parallel): split over `tensor`, sharded over `fsdp x expert` (the expert
  ranks see different rows, so for these weights they are more FSDP ranks, as in torchtitan's dp2ep);
- replicated weights (norms, routers): whole on every tensor rank, sharded over `fsdp x expert`;
- everything is replicated over `data` (HSDP: the gradients are all-reduced across replicas).

Per device, with a `Precision` (bytes per parameter of the working copy, the gradient, the fp32 master
copy and AdamW's two moments; `bf16`: 2 + 2 + 4 + 8 = 16 bytes, `fp32`: 4 + 4 + 0 + 8 = 16, the CPU
trainer's convention):

- params / grads / optimizer: the device's shard of each class, rounded up;
- gathered: the largest FSDP unit (a decoder layer, an MTP block or the root: embedding, LM head, final
  norm) unsharded in the working precision twice (the one running and the one prefetched) plus its
  unsharded gradient before the reduce-scatter;
- activations per micro-batch of `micro_batch x seq_len` tokens, in the working precision, with flash
  attention (the probabilities are never stored, one fp32 log-sum-exp per head is), split over `tensor`
  ranks (tensor and sequence parallel), and with full activation checkpointing (each layer's input kept,
  one layer recomputed at a time);
- traffic per micro-batch step (forward and backward), bytes each device receives: FSDP all-gathers
  (forward, and again in the backward), the gradients' reduce-scatter, their all-reduce over `data`
  replicas (a ring: 2 (d - 1) / d), the MoE all-to-all (dispatch and combine of each token's `top_k`
  hidden states, forward and backward, the share that leaves the rank: (e - 1) / e, balanced routing),
  and tensor parallelism's all-gathers and reduce-scatters of the hidden states (4 per layer each way).

Training layouts that fit are ranked: those that fit without activation checkpointing first, then by
the bytes a device moves per step, then by peak memory. A bytes model, not a timing model: links of
different speeds (NVLink in a node, the network between nodes) are not told apart.

Serving layouts have `fsdp = 1` and hold the weights in bf16 (dense weights whole on each expert and
data rank, split over `tensor`; routed experts split over `expert x tensor`); the KV cache of one
sequence at the spec's context (`max_position_embeddings`) is split over the `tensor` ranks by KV head.
Each `data x expert` group of `tensor` ranks serves its own sequences (attention data parallel, as
SGLang's `--enable-dp-attention`), so the layouts are ranked by how many sequences fit at once.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

from lmspec.compiler.accounting import _ffn_activations, _layer_components, _mtp_block_components, account
from lmspec.spec import Spec
from lmspec.spec.limits import MAX_BATCH_SIZE, MAX_DEVICES
from lmspec.spec.schema import AttentionBase, MoEFFN, Parallel, parallel_problem

__all__ = [
    "PRECISIONS",
    "DeviceMemory",
    "Layout",
    "ParamSplit",
    "Precision",
    "ScalePlan",
    "ServingFit",
    "Traffic",
    "TrainingFit",
    "device_memory",
    "device_params",
    "device_traffic",
    "layouts",
    "param_split",
    "plan_scale",
    "serving_fit",
    "split_layouts",
]


@dataclass(frozen=True)
class Precision:
    """Bytes per parameter of each copy training keeps, and per activation element."""

    name: str
    param_bytes: int  # the working copy the forward reads (and FSDP all-gathers)
    grad_bytes: int
    master_bytes: int  # an fp32 master copy; 0 when the working copy is fp32 already
    moment_bytes: int  # AdamW's two fp32 moments
    activation_bytes: int

    @property
    def optimizer_bytes(self) -> int:
        return self.master_bytes + self.moment_bytes


# The names are `training.precision`'s: bf16 is mixed precision with fp32 master weights (Megatron's
# distributed optimizer, FSDP2's MixedPrecisionPolicy); fp32 is what the CPU trainer runs.
PRECISIONS: dict[str, Precision] = {
    "bf16": Precision("bf16", 2, 2, 4, 8, 2),
    "fp32": Precision("fp32", 4, 4, 0, 8, 4),
}
SERVING_BYTES = 2  # serving weights and KV cache: bf16


@dataclass(frozen=True, order=True)
class Layout:
    data: int = 1
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1

    @property
    def world_size(self) -> int:
        return self.data * self.fsdp * self.expert * self.tensor

    @property
    def label(self) -> str:
        return f"data {self.data} · fsdp {self.fsdp} · expert {self.expert} · tensor {self.tensor}"

    @classmethod
    def of(cls, parallel: Parallel) -> Layout:
        return cls(parallel.data, parallel.fsdp, parallel.expert, parallel.tensor)


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted({*small, *(n // d for d in small)})


def layouts(n: int) -> list[Layout]:
    """Every ordered factorisation `data x fsdp x expert x tensor = n`, in order."""
    out = []
    for data in _divisors(n):
        for fsdp in _divisors(n // data):
            for expert in _divisors(n // (data * fsdp)):
                out.append(Layout(data, fsdp, expert, n // (data * fsdp * expert)))
    return out


def split_layouts(spec: Spec, n: int, *, serving: bool = False) -> list[Layout]:
    """The layouts of `n` devices the model can be split by (`parallel_problem`); serving: `fsdp = 1`."""
    found = []
    for lay in layouts(n):
        if serving and lay.fsdp != 1:
            continue
        if parallel_problem(spec.model, Parallel(**asdict(lay))) is None:
            found.append(lay)
    return found


# ---------------------------------------------------------------------------------------------
# Parameters by how a layout splits them
# ---------------------------------------------------------------------------------------------

_REPLICATED = ("norms", "router.")  # whole on every tensor rank
_EXPERTS = ("routed_experts.",)


@dataclass(frozen=True)
class ParamSplit:
    """Parameter counts by class: `tensor_split + replicated + experts` is `param_count(spec)`."""

    tensor_split: int
    replicated: int
    experts: int

    @property
    def total(self) -> int:
        return self.tensor_split + self.replicated + self.experts

    def slice(self, lay: Layout) -> float:
        """Parameters of one tensor rank's slice of this unit, before FSDP sharding."""
        return self.tensor_split / lay.tensor + self.replicated + self.experts / (lay.expert * lay.tensor)


def _split(components: dict[str, int], times: int = 1) -> ParamSplit:
    rep = sum(v for k, v in components.items() if k.startswith(_REPLICATED))
    exp = sum(v for k, v in components.items() if k.startswith(_EXPERTS))
    return ParamSplit(times * (sum(components.values()) - rep - exp), times * rep, times * exp)


def _units(spec: Spec) -> list[ParamSplit]:
    """The FSDP units (each decoder layer, each MTP block, the root) by class, one per unit."""
    m = spec.model
    units = [_split(_layer_components(spec, block, active=False)) for block in m.layer_blocks]
    if m.mtp is not None and m.mtp.num_blocks:
        units += [_split(_mtp_block_components(spec, active=False))] * m.mtp.num_blocks
    root = {"embedding": m.vocab_size * m.hidden_size, "norms": m.hidden_size}
    if not m.tie_word_embeddings:
        root["lm_head"] = m.vocab_size * m.hidden_size
    return [*units, _split(root)]


def param_split(spec: Spec) -> ParamSplit:
    """All parameters (backbone and MTP blocks) by how a layout splits them."""
    units = _units(spec)
    return ParamSplit(*(sum(getattr(u, f) for u in units) for f in ("tensor_split", "replicated", "experts")))


def device_params(split: ParamSplit, lay: Layout) -> int:
    """Parameters one device holds under `lay` (its shard of each class, rounded up)."""
    dense_shards = lay.fsdp * lay.expert
    return (
        -(-split.tensor_split // (lay.tensor * dense_shards))
        + -(-split.replicated // dense_shards)
        + -(-split.experts // (lay.expert * lay.fsdp * lay.tensor))
    )


# ---------------------------------------------------------------------------------------------
# Memory and traffic of one device
# ---------------------------------------------------------------------------------------------


def _attention_elements(a: AttentionBase, hidden: int) -> int:
    """Elements per token one attention layer keeps for backward with flash attention: the norm's input
    and output, o_proj's output, q and the attention output, k and v, and an fp32 log-sum-exp per head."""
    return (
        3 * hidden
        + a.num_heads * (a.qk_head_dim + a.v_head_dim)
        + a.num_kv_heads * (a.qk_head_dim + a.v_head_dim)
        + 2 * a.num_heads
    )


def _layer_elements(spec: Spec, block: str) -> int:
    m = spec.model
    b = m.blocks[block]
    return _attention_elements(m.attention[b.attention], m.hidden_size) + _ffn_activations(
        m.ffn[b.ffn], m.hidden_size
    )


def activation_elements(spec: Spec, *, checkpointing: bool) -> int:
    """Elements per token a training micro-batch keeps for backward on one (unsplit) model replica.

    The embedding output, the final norm, and vocab / 4 for the chunked LM-head cross-entropy of the head
    and of every MTP block (the convention of `training_step_memory`); per layer `_layer_elements`, or with
    full checkpointing the layer's input alone plus the one layer being recomputed.
    """
    m = spec.model
    h, head = m.hidden_size, m.vocab_size // 4
    blocks = list(m.layer_blocks)
    mtp_blocks = m.mtp.num_blocks if m.mtp is not None else 0
    per_token = 3 * h + head + mtp_blocks * (7 * h + head)
    layers = [*blocks, *([m.mtp.block] * mtp_blocks if m.mtp is not None else [])]
    counts = Counter(layers)
    if checkpointing:
        return per_token + len(layers) * h + max(_layer_elements(spec, b) for b in counts)
    return per_token + sum(n * _layer_elements(spec, b) for b, n in counts.items())


@dataclass(frozen=True)
class DeviceMemory:
    """Bytes one device holds at the peak of a training step, by part."""

    params: int
    grads: int
    optimizer: int
    gathered: int
    activations: int
    activations_checkpointed: int

    @property
    def states(self) -> int:
        return self.params + self.grads + self.optimizer + self.gathered

    def peak(self, *, checkpointing: bool) -> int:
        return self.states + (self.activations_checkpointed if checkpointing else self.activations)


def device_memory(spec: Spec, lay: Layout, prec: Precision, seq_len: int, micro_batch: int) -> DeviceMemory:
    """What one device holds under `lay` for one micro-batch of `micro_batch x seq_len` tokens."""
    n = device_params(param_split(spec), lay)
    gathered = 0
    if lay.fsdp * lay.expert > 1:
        unit = max(u.slice(lay) for u in _units(spec))
        gathered = math.ceil(unit * (2 * prec.param_bytes + prec.grad_bytes))
    tokens = micro_batch * seq_len
    acts = [
        -(-tokens * activation_elements(spec, checkpointing=c) * prec.activation_bytes // lay.tensor)
        for c in (False, True)
    ]
    return DeviceMemory(
        params=n * prec.param_bytes,
        grads=n * prec.grad_bytes,
        optimizer=n * prec.optimizer_bytes,
        gathered=gathered,
        activations=acts[0],
        activations_checkpointed=acts[1],
    )


@dataclass(frozen=True)
class Traffic:
    """Bytes one device receives (all-gathers, all-to-all) or sends (reductions) per micro-batch step."""

    all_gather: int
    reduce_scatter: int
    all_reduce: int
    all_to_all: int
    tensor: int

    @property
    def total(self) -> int:
        return self.all_gather + self.reduce_scatter + self.all_reduce + self.all_to_all + self.tensor


def _moe_layers(spec: Spec) -> list[MoEFFN]:
    m = spec.model
    blocks = [*m.layer_blocks, *([m.mtp.block] * m.mtp.num_blocks if m.mtp is not None else [])]
    return [f for f in (m.ffn[m.blocks[b].ffn] for b in blocks) if isinstance(f, MoEFFN)]


def device_traffic(spec: Spec, lay: Layout, prec: Precision, seq_len: int, micro_batch: int) -> Traffic:
    """The collectives of one forward and backward under `lay`, in bytes per device (see the module)."""
    split, m = param_split(spec), spec.model
    dense = split.tensor_split / lay.tensor + split.replicated
    experts = split.experts / (lay.expert * lay.tensor)
    shards_d, shards_e = lay.fsdp * lay.expert, lay.fsdp
    gathered = dense * (shards_d - 1) / shards_d + experts * (shards_e - 1) / shards_e
    tokens = micro_batch * seq_len / lay.tensor  # sequence parallel: each tensor rank its share
    h, act = m.hidden_size, prec.activation_bytes
    leave = (lay.expert - 1) / lay.expert
    a2a = sum(4 * tokens * f.top_k * h * act * leave for f in _moe_layers(spec))
    layers = m.num_layers + (m.mtp.num_blocks if m.mtp is not None else 0)
    tp = 8 * layers * micro_batch * seq_len * h * act * (lay.tensor - 1) / lay.tensor
    shard = device_params(split, lay)
    return Traffic(
        all_gather=round(2 * gathered * prec.param_bytes),
        reduce_scatter=round(gathered * prec.grad_bytes),
        all_reduce=round(2 * shard * prec.grad_bytes * (lay.data - 1) / lay.data),
        all_to_all=round(a2a),
        tensor=round(tp),
    )


# ---------------------------------------------------------------------------------------------
# Serving
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServingFit:
    """One serving layout: bf16 weights and the KV cache of one sequence, per device."""

    layout: Layout
    weights: int
    kv_per_sequence: int
    free: int
    sequences_per_group: int  # sequences one group of `tensor` ranks holds at the context
    sequences: int  # over every `data x expert` group

    @property
    def fits(self) -> bool:
        return self.sequences_per_group >= 1


def serving_fit(spec: Spec, lay: Layout, gpu_memory: int, kv_at_context: int) -> ServingFit:
    """`lay` for serving on devices of `gpu_memory` bytes; `kv_at_context`: one sequence's whole cache."""
    split = param_split(spec)
    weights = SERVING_BYTES * (
        -(-split.tensor_split // lay.tensor)
        + split.replicated
        + -(-split.experts // (lay.expert * lay.tensor))
    )
    kv = -(-kv_at_context // lay.tensor)
    free = gpu_memory - weights
    per_group = max(free, 0) // kv if kv else 0
    return ServingFit(lay, weights, kv, free, per_group, per_group * lay.data * lay.expert)


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingFit:
    layout: Layout
    memory: DeviceMemory
    traffic: Traffic
    checkpointing: bool  # fits only with activation checkpointing

    @property
    def peak(self) -> int:
        return self.memory.peak(checkpointing=self.checkpointing)


@dataclass(frozen=True)
class ScalePlan:
    """What `lmspec plan` reports: the inputs, the layouts that fit (ranked), and the totals."""

    name: str
    gpus: int
    gpu_memory: int
    seq_len: int
    micro_batch: int
    precision: Precision
    context: int
    layouts: int  # ordered factorisations of `gpus`
    training_split: int  # of those, the ones the model can be split by
    training: list[TrainingFit]
    serving_split: int
    serving: list[ServingFit]
    params: ParamSplit
    states_total: int  # params, grads and optimizer state of the whole model, one replica
    declared: Layout | None = None  # the spec's own training.parallel, when it has one

    @property
    def min_training_gpus(self) -> int:
        """A lower bound: the devices the parameters, gradients and optimizer state alone need."""
        return -(-self.states_total // self.gpu_memory)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["training"] = [{**asdict(t), "peak": t.peak} for t in self.training]
        out["serving"] = [asdict(s) for s in self.serving]
        out["min_training_gpus"] = self.min_training_gpus
        return out


def _training_fits(spec: Spec, lays: list[Layout], gpu_memory: int, prec: Precision, seq_len: int, mb: int):
    fits = []
    for lay in lays:
        mem = device_memory(spec, lay, prec, seq_len, mb)
        if mem.peak(checkpointing=True) > gpu_memory:
            continue
        ckpt = mem.peak(checkpointing=False) > gpu_memory
        fits.append(TrainingFit(lay, mem, device_traffic(spec, lay, prec, seq_len, mb), ckpt))
    return sorted(fits, key=lambda f: (f.checkpointing, f.traffic.total, f.peak, f.layout))


def _check_inputs(spec: Spec, gpus: int, gpu_memory: int, seq_len: int, micro_batch: int) -> None:
    if not 1 <= gpus <= MAX_DEVICES:
        raise ValueError(f"--gpus: expected 1 to {MAX_DEVICES:,} devices, got {gpus}")
    if gpu_memory < 1:
        raise ValueError(f"--gpu-memory: expected a positive size, got {gpu_memory} bytes")
    limit = spec.model.max_position_embeddings
    if not 1 <= seq_len <= limit:
        raise ValueError(f"--seq-len: expected 1 to model.max_position_embeddings ({limit:,}), got {seq_len}")
    if not 1 <= micro_batch <= MAX_BATCH_SIZE:
        raise ValueError(f"--micro-batch: expected 1 to {MAX_BATCH_SIZE:,} sequences, got {micro_batch}")


def plan_scale(
    spec: Spec,
    gpus: int,
    gpu_memory: int,
    *,
    seq_len: int | None = None,
    micro_batch: int = 1,
    precision: str | None = None,
) -> ScalePlan:
    """The layouts of `gpus` devices of `gpu_memory` bytes that fit `spec` for training and serving.

    `seq_len` defaults to the first training stage's (else the context), `precision` to
    `training.precision` (else bf16). Raises ValueError, naming the flag, for inputs out of range.
    """
    training = spec.training
    context = spec.model.max_position_embeddings
    seq_len = seq_len if seq_len is not None else (training.stages[0].seq_len if training else context)
    _check_inputs(spec, gpus, gpu_memory, seq_len, micro_batch)
    name = precision or (training.precision if training else "bf16")
    if name not in PRECISIONS:
        raise ValueError(f"--precision: expected one of {', '.join(PRECISIONS)}, got {name!r}")
    prec = PRECISIONS[name]
    acc = account(spec, context, dtype_bytes=SERVING_BYTES)
    kv = acc.kv_bytes_at_context_total + acc.mtp_kv_bytes_at_context
    train_lays, serve_lays = split_layouts(spec, gpus), split_layouts(spec, gpus, serving=True)
    served = [serving_fit(spec, lay, gpu_memory, kv) for lay in serve_lays]
    split = param_split(spec)
    declared = training.parallel if training is not None else None
    return ScalePlan(
        name=spec.name,
        gpus=gpus,
        gpu_memory=gpu_memory,
        seq_len=seq_len,
        micro_batch=micro_batch,
        precision=prec,
        context=context,
        layouts=len(layouts(gpus)),
        training_split=len(train_lays),
        training=_training_fits(spec, train_lays, gpu_memory, prec, seq_len, micro_batch),
        serving_split=len(serve_lays),
        serving=sorted((s for s in served if s.fits), key=lambda s: (-s.sequences, s.weights, s.layout)),
        params=split,
        states_total=split.total * (prec.param_bytes + prec.grad_bytes + prec.optimizer_bytes),
        declared=Layout.of(declared) if declared is not None else None,
    )
