"""The spec schema: what a model and its training schedule may say, and nothing more.

Every class is strict (`extra="forbid"`) and frozen. Field names are the names used everywhere
downstream — IR attributes, template variables and kernel constants — so one parameter can be
followed from the YAML file to the kernel with grep.

Derived values (`window_keys`, `rope_dim`, the expanded layer list) are pure functions or
properties; they never overwrite what the user wrote.

Types are strict where an integer or a flag is meant: `hidden_size: true` is not 1, `4096.0` is
not 4096 and `tie_word_embeddings: "yes"` is not true. Numbers may be written as YAML floats or as
numeric text (`1.2e6`, which YAML 1.1 reads as a string), never as booleans.

Names — the spec's `name`, stage names, and the keys of `model.attention`, `model.ffn` and
`model.blocks` with every reference to them — match `limits.NAME_PATTERN`,
`[A-Za-z_][A-Za-z0-9_]{0,63}`: an ASCII identifier of at most 64 characters. Names reach generated
code, file names and logs; an identifier is safe in each.

Sizes are bounded by the documented maxima in `lmspec.spec.limits` (hidden size, vocabulary,
positions, heads, head dims, experts, MTP blocks, seed, ...), and by each other where a value only
makes sense below another: a stage's `seq_len` and a sliding `window` are at most
`max_position_embeddings`.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    StrictBool,
    StringConstraints,
    model_validator,
)
from pydantic_core import PydanticCustomError

from lmspec.spec import limits
from lmspec.spec.pattern import expand_pattern


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)


def _not_a_bool(value: Any) -> Any:
    """Pydantic's lax float takes `true` as 1.0; a spec never means a flag as a number."""
    if isinstance(value, bool):
        raise PydanticCustomError("float_type", "Input should be a valid number")
    return value


Name = Annotated[str, Strict(), StringConstraints(pattern=limits.NAME_PATTERN)]
Number = Annotated[float, BeforeValidator(_not_a_bool)]
PositiveFloat = Annotated[Number, Field(gt=0.0)]
NonNegativeFloat = Annotated[Number, Field(ge=0.0)]
Bool = StrictBool


def _count(maximum: int, minimum: int = 1) -> Any:
    """An integer in [minimum, maximum]; strict, so `true` and `4.0` are refused."""
    return Annotated[int, Strict(), Field(ge=minimum, le=maximum)]


Heads = _count(limits.MAX_HEADS)
HeadDim = _count(limits.MAX_HEAD_DIM)
Intermediate = _count(limits.MAX_INTERMEDIATE_SIZE)
Experts = _count(limits.MAX_EXPERTS)
SharedExperts = _count(limits.MAX_EXPERTS, minimum=0)
MTPDepth = _count(limits.MAX_MTP_BLOCKS, minimum=0)
VocabSize = _count(limits.MAX_VOCAB_SIZE)
HiddenSize = _count(limits.MAX_HIDDEN_SIZE)
Positions = _count(limits.MAX_POSITIONS)
BatchSize = _count(limits.MAX_BATCH_SIZE)
Seed = _count(limits.MAX_SEED, minimum=0)


# ---------------------------------------------------------------------------------------------
# Architecture
# ---------------------------------------------------------------------------------------------


class Rope(StrictModel):
    """Rotary embedding applied to the leading `rope_dim` dims of each q/k head (rotate-half style)."""

    theta: PositiveFloat = Field(description="RoPE base frequency.")
    fraction: Number = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="Fraction of qk_head_dim that is rotated: int(qk_head_dim * fraction) rounded up to even.",
    )


class AttentionBase(StrictModel):
    num_heads: Heads = Field(description="Query heads.")
    num_kv_heads: Heads = Field(description="Key/value heads (GQA); must divide num_heads.")
    qk_head_dim: HeadDim = Field(description="Per-head dim of queries and keys.")
    v_head_dim: HeadDim = Field(description="Per-head dim of values (independent of qk_head_dim).")
    rope: Rope
    value_scale: PositiveFloat = Field(1.0, description="Values are multiplied by this before attention.")
    sink: Bool = Field(False, description="Learnable per-head sink logit in the softmax denominator.")
    bias: Bool = Field(False, description="Bias on the q/k/v projections (o_proj never has one).")
    softmax_scale: PositiveFloat | None = Field(None, description="Logit scale; default qk_head_dim ** -0.5.")

    @model_validator(mode="after")
    def _check_heads(self) -> AttentionBase:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_kv_heads: expected a divisor of num_heads ({self.num_heads}), got {self.num_kv_heads}"
            )
        product = self.rope_freq_dim
        if product == 0:
            raise ValueError(
                f"rope.fraction: expected a fraction giving at least one rotated dim, got "
                f"int({self.qk_head_dim} * {self.rope.fraction}) = 0"
            )
        if self.rope_dim > self.qk_head_dim:
            raise ValueError(
                f"rope.fraction: expected at most qk_head_dim ({self.qk_head_dim}) rotated dims, got "
                f"int({self.qk_head_dim} * {self.rope.fraction}) = {product}, rounded up to {self.rope_dim}"
            )
        return self

    @property
    def rope_freq_dim(self) -> int:
        """The d of the RoPE frequencies theta ** (-2i / d), i = 0 .. ceil(d / 2) - 1.

        d = int(qk_head_dim * fraction), truncated as transformers truncates partial_rotary_factor. An
        odd d is kept as the exponent's denominator, exactly as transformers' `arange(0, d, 2) / d`.
        """
        return int(self.qk_head_dim * self.rope.fraction)

    @property
    def rope_dim(self) -> int:
        """Rotated dims per head: one pair per frequency, so `rope_freq_dim` rounded up to even.

        transformers takes ceil(d / 2) frequencies for d = int(qk_head_dim * fraction) and rotates two
        dims per frequency: head_dim 16 with fraction 0.334 gives d = 5, 3 frequencies, 6 rotated dims.
        """
        d = self.rope_freq_dim
        return d + d % 2

    @property
    def scale(self) -> float:
        return self.softmax_scale if self.softmax_scale is not None else self.qk_head_dim**-0.5


class GlobalAttention(AttentionBase):
    """Causal attention over every earlier token."""

    kind: Literal["global"] = "global"

    @property
    def window_keys(self) -> int | None:
        return None


class SlidingAttention(AttentionBase):
    """Causal attention over a sliding window of keys.

    The field implementations disagree on what `window: 128` means, so the spec says it:
    `window_convention: previous_plus_self` attends to the 128 previous tokens and the token itself
    (129 keys; SGLang, transformers 5.23), `keys` attends to 128 keys counting the token itself
    (vLLM, FlashAttention's (w-1, 0)).
    """

    kind: Literal["sliding"] = "sliding"
    window: Positions = Field(
        description="Window size, read by window_convention; at most max_position_embeddings."
    )
    window_convention: Literal["previous_plus_self", "keys"] = Field(
        description="previous_plus_self: window previous tokens + self; keys: window keys including self."
    )

    @property
    def window_keys(self) -> int:
        """Number of keys a query sees: key j is visible from query i iff 0 <= i - j < window_keys."""
        return self.window + 1 if self.window_convention == "previous_plus_self" else self.window


AttentionKind = Annotated[GlobalAttention | SlidingAttention, Field(discriminator="kind")]


class DenseFFN(StrictModel):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    kind: Literal["dense"] = "dense"
    intermediate_size: Intermediate
    activation: Literal["silu"] = "silu"


class MoEFFN(StrictModel):
    """Routed mixture of SwiGLU experts, optionally with always-on shared experts."""

    kind: Literal["moe"] = "moe"
    num_experts: Experts = Field(description="Routed experts.")
    top_k: Experts = Field(description="Experts chosen per token.")
    expert_intermediate_size: Intermediate
    num_shared_experts: SharedExperts = 0
    score_function: Literal["sigmoid", "softmax"] = "sigmoid"
    correction_bias: Bool = Field(
        True, description="Aux-loss-free balancing bias, added to scores for selection only."
    )
    renormalize: Bool = Field(True, description="Renormalise the chosen top-k weights to sum to 1.")
    routed_scaling_factor: PositiveFloat = 1.0
    num_groups: Experts = Field(1, description="Group-limited routing: expert groups.")
    top_k_groups: Experts = Field(1, description="Group-limited routing: groups kept per token.")
    activation: Literal["silu"] = "silu"

    @model_validator(mode="after")
    def _check_routing(self) -> MoEFFN:
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k: expected at most num_experts ({self.num_experts}), got {self.top_k}")
        if self.num_experts % self.num_groups:
            raise ValueError(
                f"num_groups: expected a divisor of num_experts ({self.num_experts}), got {self.num_groups}"
            )
        if self.top_k_groups > self.num_groups:
            raise ValueError(
                f"top_k_groups: expected at most num_groups ({self.num_groups}), got {self.top_k_groups}"
            )
        per_group = self.num_experts // self.num_groups
        if self.num_groups > 1 and per_group < 2:
            # A group scores as the sum of its top-2 experts (DeepSeek-V3, transformers).
            raise ValueError(
                f"num_groups: expected groups of at least 2 experts (num_experts {self.num_experts} / "
                f"num_groups), got {self.num_groups} groups of {per_group}"
            )
        if self.num_groups > 1 and self.top_k > self.top_k_groups * per_group:
            raise ValueError(
                f"top_k: expected at most the experts in the kept groups ({self.top_k_groups} x {per_group}), "
                f"got {self.top_k}"
            )
        return self


FFNKind = Annotated[DenseFFN | MoEFFN, Field(discriminator="kind")]


class Block(StrictModel):
    """One decoder layer: pre-norm attention then pre-norm FFN, each with a residual."""

    attention: Name = Field(description="Name of an entry in model.attention.")
    ffn: Name = Field(description="Name of an entry in model.ffn.")


class Norm(StrictModel):
    kind: Literal["rmsnorm"] = "rmsnorm"
    eps: PositiveFloat = 1e-5


class MTP(StrictModel):
    """Multi-token prediction: `num_blocks` chained blocks; block k predicts the token k+1 ahead.

    Each block: h = proj(concat[norm(embed(x_{t+k})), norm(h_prev)]), one decoder layer of kind
    `block`, a final norm and the shared LM head.
    """

    num_blocks: MTPDepth = Field(
        description="MTP blocks the model has (built, saved, served, accounted); a stage may train fewer."
    )
    block: Name = Field(description="Name of an entry in model.blocks used inside each MTP block.")
    loss_weight: NonNegativeFloat = Field(0.3, description="Default MTP loss weight; stages may override.")
    depth_weights: list[NonNegativeFloat] | None = Field(
        None,
        max_length=limits.MAX_MTP_BLOCKS,
        description="Relative weight of each depth's CE inside the MTP loss (normalised over the depths a "
        "stage trains); default: every depth alike (the mean).",
    )

    @model_validator(mode="after")
    def _check_depth_weights(self) -> MTP:
        problem = depth_weights_problem(self.depth_weights, self.num_blocks, "num_blocks")
        if problem is not None:
            raise ValueError(f"depth_weights: {problem}")
        return self


def depth_weights_problem(weights: list[float] | None, blocks: int, what: str) -> str | None:
    """Why per-depth MTP weights do not fit `blocks` trained depths (one weight each, not all zero)."""
    if weights is None:
        return None
    if len(weights) != blocks:
        return f"expected one weight per MTP block ({what} {blocks}), got {len(weights)}"
    if blocks and not math.fsum(weights) > 0:
        return "expected at least one positive weight, got all zero"
    return None


class ModelSpec(StrictModel):
    vocab_size: VocabSize
    hidden_size: HiddenSize
    max_position_embeddings: Positions
    norm: Norm = Norm()
    tie_word_embeddings: Bool = False
    init_std: PositiveFloat = 0.02
    attention: dict[Name, AttentionKind] = Field(min_length=1, max_length=limits.MAX_KINDS)
    ffn: dict[Name, FFNKind] = Field(min_length=1, max_length=limits.MAX_KINDS)
    blocks: dict[Name, Block] = Field(min_length=1, max_length=limits.MAX_KINDS)
    layers: Annotated[str, Strict()] = Field(
        description="Layer pattern over block names: `G0 S*4 G (S*5 G)*7` — names, `*N` repeats, parentheses; "
        f"at most {limits.MAX_LAYERS} layers."
    )
    mtp: MTP | None = None

    @model_validator(mode="after")
    def _check_references(self) -> ModelSpec:
        for name, block in self.blocks.items():
            if block.attention not in self.attention:
                raise ValueError(
                    f"blocks.{name}.attention: expected one of {sorted(self.attention)}, got {block.attention!r}"
                )
            if block.ffn not in self.ffn:
                raise ValueError(f"blocks.{name}.ffn: expected one of {sorted(self.ffn)}, got {block.ffn!r}")
        for name, a in self.attention.items():
            if isinstance(a, SlidingAttention) and a.window > self.max_position_embeddings:
                raise ValueError(
                    f"attention.{name}.window: expected at most max_position_embeddings "
                    f"({self.max_position_embeddings}), got {a.window}"
                )
        expand_pattern(self.layers, known=set(self.blocks))
        if self.mtp is not None and self.mtp.block not in self.blocks:
            raise ValueError(f"mtp.block: expected one of {sorted(self.blocks)}, got {self.mtp.block!r}")
        return self

    @property
    def layer_blocks(self) -> list[str]:
        """The pattern expanded once into one block name per layer."""
        return expand_pattern(self.layers, known=set(self.blocks))

    @property
    def num_layers(self) -> int:
        return len(self.layer_blocks)

    def layer_attention(self, i: int) -> GlobalAttention | SlidingAttention:
        return self.attention[self.blocks[self.layer_blocks[i]].attention]

    def layer_ffn(self, i: int) -> DenseFFN | MoEFFN:
        return self.ffn[self.blocks[self.layer_blocks[i]].ffn]


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

TokenCount = Annotated[Number, Field(ge=0, description="A token count; YAML may write 22e12.")]


class LRSchedule(StrictModel):
    """Learning rate over one stage, as a function of tokens seen in the stage.

    - constant: `peak` throughout.
    - cosine: linear warmup from `warmup_start` to `peak` over `warmup_tokens`, then cosine from
      `peak` to `final` over the rest of the stage.
    - linear: as cosine, with a linear decay.
    - wsd: warmup, stable at `peak`, then decay (`decay_shape`) to `final` over the stage's last
      `decay_tokens`.
    """

    kind: Literal["constant", "cosine", "linear", "wsd"]
    peak: PositiveFloat
    final: NonNegativeFloat = 0.0
    warmup_tokens: TokenCount = 0
    warmup_start: NonNegativeFloat = 0.0
    decay_tokens: TokenCount | None = None
    decay_shape: Literal["cosine", "linear"] = "cosine"

    @model_validator(mode="after")
    def _check(self) -> LRSchedule:
        if self.kind == "wsd" and self.decay_tokens is None:
            raise ValueError("decay_tokens: expected a token count for a wsd schedule, got nothing")
        if self.kind != "wsd" and self.decay_tokens is not None:
            raise ValueError(f"decay_tokens: expected only with kind wsd, got it with kind {self.kind}")
        if self.final > self.peak:
            raise ValueError(f"final: expected at most peak ({self.peak}), got {self.final}")
        return self


class BatchSchedule(StrictModel):
    """Batch size in sequences, ramped linearly from `warmup_start` over `warmup_tokens`."""

    size: BatchSize
    warmup_start: BatchSize | None = None
    warmup_tokens: TokenCount = 0

    @model_validator(mode="after")
    def _check(self) -> BatchSchedule:
        if self.warmup_start is not None and self.warmup_start > self.size:
            raise ValueError(f"warmup_start: expected at most size ({self.size}), got {self.warmup_start}")
        return self


class Balancing(StrictModel):
    """MoE load balancing: aux-loss-free bias updates plus a sequence-wise auxiliary loss."""

    bias_update: NonNegativeFloat = Field(0.001, description="Correction-bias step per update (sign rule).")
    seq_aux_coef: NonNegativeFloat = Field(0.0, description="Sequence-wise auxiliary loss coefficient.")


class StageOverrides(StrictModel):
    """Values that change at a stage boundary."""

    rope_theta: dict[Name, PositiveFloat] | None = Field(
        None, description="Per attention kind: new RoPE theta for this stage."
    )
    mtp_loss_weight: NonNegativeFloat | None = None
    bias_update: NonNegativeFloat | None = None
    seq_aux_coef: NonNegativeFloat | None = None
    mtp_num_blocks: MTPDepth | None = Field(
        None,
        description="MTP blocks this stage trains (the first ones; at most model.mtp.num_blocks, its default). The others "
        "are not run, get no gradient and stay as they are.",
    )
    mtp_init: Literal["keep", "replicate"] | None = Field(
        None,
        description="replicate: at the stage's first step, copy MTP block 0 into each block this stage trains "
        "that the stage before did not; keep (default): those blocks start from their own weights.",
    )
    mtp_depth_weights: list[NonNegativeFloat] | None = Field(
        None, max_length=limits.MAX_MTP_BLOCKS, description="Per-depth MTP weights for this stage."
    )


PathText = Annotated[str, Strict(), StringConstraints(min_length=1, max_length=limits.MAX_PATH_CHARS)]
URLText = Annotated[
    str, Strict(), StringConstraints(pattern=r"^https?://\S+$", max_length=limits.MAX_PATH_CHARS)
]


class Teacher(StrictModel):
    """A mopd stage's teacher for one domain: an earlier stage, a run or Hugging Face directory (`path`), or
    a server (`url`).

    The YAML writes a stage or directory as a bare string (`math: teacher_math`, `math: runs/teacher_math`)
    and a server as `{url: ...}`; a bare string that names an earlier stage is that stage's final weights.
    """

    path: PathText | None = None
    url: URLText | None = None

    @model_validator(mode="before")
    @classmethod
    def _bare_path(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"path": value}
        if not isinstance(value, dict):
            raise PydanticCustomError("teacher_type", "a run directory path or {url: ...}")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> Teacher:
        if (self.path is None) == (self.url is None):
            raise ValueError("url: expected a directory path or a url, not both and not neither")
        return self


# Fields only a stage of one kind may set, by kind; those marked required must be set there.
_KIND_FIELDS: dict[str, dict[str, bool]] = {
    "sft": {"data": True},
    "mopd": {
        "teachers": True,
        "prompts": True,
        "rollouts_per_prompt": True,
        "eps_low": True,
        "eps_high": True,
        "max_new_tokens": True,
        "alpha": False,
        "temperature": False,
    },
}
_KIND_HINTS = {
    "data": "a chat JSONL file",
    "teachers": "a mapping of domain to teacher",
    "prompts": "a JSONL file of prompt, domain, answer",
}


class Stage(StrictModel):
    name: Name
    kind: Literal["pretrain", "sft", "mopd"] = Field(
        "pretrain",
        description="pretrain: next-token loss on packed text (--data); sft: loss on assistant tokens of chat "
        "JSONL (`data`); mopd: on-policy distillation from per-domain teachers (`teachers`, `prompts`).",
    )
    init_from: PathText | None = Field(
        None,
        description="Weights the stage starts from: an earlier stage's name, a run directory or a Hugging Face "
        "directory; default: as the stage before left them (the first stage: fresh).",
    )
    data: PathText | None = Field(None, description="sft: chat JSONL (`messages`, or `prompt`/`completion`).")
    teachers: dict[Name, Teacher] | None = Field(
        None,
        max_length=limits.MAX_KINDS,
        description="mopd: the teacher of each prompt domain: an earlier stage's name, a run or Hugging Face "
        "directory, or {url: ...} of a server.",
    )
    prompts: PathText | None = Field(None, description="mopd: JSONL of `prompt`, `domain`, `answer`.")
    rollouts_per_prompt: _count(limits.MAX_ROLLOUTS) | None = None  # type: ignore[valid-type]
    alpha: NonNegativeFloat | None = Field(None, description="mopd: outcome-reward weight (default 0).")
    eps_low: NonNegativeFloat | None = Field(None, description="mopd: lowest importance ratio kept.")
    eps_high: PositiveFloat | None = Field(None, description="mopd: highest importance ratio kept.")
    max_new_tokens: Positions | None = Field(None, description="mopd: longest rollout completion.")
    temperature: PositiveFloat | None = Field(
        None, description="mopd: rollout sampling temperature (default 1)."
    )
    tokens: Annotated[Number, Field(gt=0.0)] = Field(description="Token budget of the stage.")
    seq_len: Positions = Field(description="Tokens per sequence; at most max_position_embeddings.")
    batch_size: BatchSchedule
    lr: LRSchedule
    overrides: StageOverrides = StageOverrides()
    mixture: dict[Name, PositiveFloat] | None = Field(
        None,
        description="Weights over training.sources (`all`: every document) of the stage's sequences; "
        "default: every document, in one stream.",
    )

    @model_validator(mode="after")
    def _check_kind(self) -> Stage:
        for kind, fields in _KIND_FIELDS.items():
            for name, required in fields.items():
                value = getattr(self, name)
                if self.kind == kind and required and value is None:
                    hint = _KIND_HINTS.get(name, "a value")
                    raise ValueError(f"{name}: expected {hint} for a {kind} stage, got nothing")
                if self.kind != kind and value is not None:
                    raise ValueError(
                        f"{name}: expected only in a {kind} stage, got it in a {self.kind} stage"
                    )
        if self.kind == "mopd":
            assert self.eps_low is not None and self.eps_high is not None and self.teachers is not None
            if not self.eps_low <= 1.0 <= self.eps_high:
                # An on-policy token has ratio 1: a band without it would discard every token.
                raise ValueError(
                    f"eps_low: expected eps_low <= 1 <= eps_high, got {self.eps_low:g} and {self.eps_high:g}"
                )
            if not self.teachers:
                raise ValueError("teachers: expected at least one domain, got none")
        return self

    @model_validator(mode="after")
    def _check(self) -> Stage:
        used = self.lr.warmup_tokens + (self.lr.decay_tokens or 0)
        if used > self.tokens * (1 + 1e-2):
            raise ValueError(
                f"lr: expected warmup_tokens + decay_tokens at most the stage's {self.tokens:g} tokens, "
                f"got {used:g}"
            )
        return self


Beta = Annotated[Number, Field(ge=0.0, lt=1.0, description="An AdamW moment decay, in [0, 1).")]


class Optimizer(StrictModel):
    kind: Literal["adamw"] = "adamw"
    betas: tuple[Beta, Beta] = (0.9, 0.95)
    eps: PositiveFloat = 1e-8
    weight_decay: NonNegativeFloat = 0.1


# The source every mixture may name without declaring it: all of the run's training documents.
ALL_SOURCE = "all"
ByteCount = _count(limits.MAX_FILE_BYTES * 1024, minimum=0)


class DataSource(StrictModel):
    """A named share of the run's training documents (`--data`, or the embedded corpus), for mixtures.

    A document belongs to the source when its name matches `match` (fnmatch; a file's path, or
    `path:line` for a JSONL record) and its UTF-8 size is within [min_bytes, max_bytes].
    """

    match: Annotated[str, Strict(), StringConstraints(min_length=1, max_length=1024)] | None = None
    min_bytes: ByteCount = 0
    max_bytes: ByteCount | None = None


ParallelSize = _count(limits.MAX_DEVICES)


class Parallel(StrictModel):
    """How the ranks of a run are laid out: a mesh of `data x fsdp x expert x tensor` ranks.

    - data: replicas that each hold a whole copy of the (sharded) model and see different rows;
    - fsdp: ranks that shard every parameter, gradient and optimizer state (FSDP2 / ZeRO-3);
    - expert: ranks that split the routed experts of every MoE kind, and see different rows (so for
      the dense weights they are more FSDP ranks);
    - tensor: ranks that split attention heads (and KV heads), the FFN widths and the vocabulary.

    The product must equal the world size at run time (`lmspec check --world-size N` checks it ahead).
    """

    data: ParallelSize = 1
    fsdp: ParallelSize = 1
    expert: ParallelSize = 1
    tensor: ParallelSize = 1

    @property
    def world_size(self) -> int:
        return self.data * self.fsdp * self.expert * self.tensor


def parallel_problem(model: ModelSpec, parallel: Parallel) -> tuple[str, str] | None:
    """The first size of `parallel` that `model` cannot be split by, as (field, message), else None.

    `expert` divides every MoE kind's `num_experts` (and is 1 without one); `tensor` divides every
    attention kind's `num_heads` and `num_kv_heads`, so each rank holds whole heads and whole KV groups.
    """
    moe = {name: f for name, f in model.ffn.items() if isinstance(f, MoEFFN)}
    if not moe and parallel.expert > 1:
        return "expert", f"expected 1 (the model has no MoE kind to split), got {parallel.expert}"
    for name, f in moe.items():
        if f.num_experts % parallel.expert:
            return "expert", (
                f"expected a divisor of model.ffn.{name}.num_experts ({f.num_experts}), got {parallel.expert}"
            )
    for name, a in model.attention.items():
        for heads in ("num_heads", "num_kv_heads"):
            if getattr(a, heads) % parallel.tensor:
                return "tensor", (
                    f"expected a divisor of model.attention.{name}.{heads} ({getattr(a, heads)}), "
                    f"got {parallel.tensor}"
                )
    return None


class TrainingSpec(StrictModel):
    optimizer: Optimizer = Optimizer()
    grad_clip: PositiveFloat | None = 1.0
    precision: Literal["fp32", "bf16"] = "fp32"
    balancing: Balancing = Balancing()
    seed: Seed = 0
    document_masking: Bool = Field(
        False,
        description="Packed sequences: attention stays inside each document and positions restart at each "
        "document, so a document trains as if it were alone in its sequence.",
    )
    sources: dict[Name, DataSource] = Field(default_factory=dict, max_length=limits.MAX_KINDS)
    compile: Bool = Field(
        False,
        description="torch.compile each micro-batch's forward and loss as one graph (fullgraph); the batch "
        "dimension is dynamic, so a stage compiles once; inductor's caches keep the result for the next run.",
    )
    activation_checkpointing: Literal["none", "full", "selective"] = Field(
        "none",
        description="Recompute activations in the backward, per decoder layer: `full` keeps only each layer's "
        "input, `selective` keeps matmul and attention outputs and recomputes the elementwise ops.",
    )
    parallel: Parallel | None = Field(
        None,
        description="The mesh of ranks (data x fsdp x expert x tensor); unset: every rank an FSDP shard.",
    )
    stages: list[Stage] = Field(min_length=1, max_length=limits.MAX_STAGES)

    @model_validator(mode="after")
    def _check_sources(self) -> TrainingSpec:
        if ALL_SOURCE in self.sources:
            raise ValueError(
                f"sources.{ALL_SOURCE}: expected another name ({ALL_SOURCE!r} is every document)"
            )
        known = sorted({ALL_SOURCE, *self.sources})
        for i, stage in enumerate(self.stages):
            for name in stage.mixture or {}:
                if name not in known:
                    raise ValueError(f"stages.{i}.mixture.{name}: expected one of {known}, got {name!r}")
        return self

    @model_validator(mode="after")
    def _check_steps(self) -> TrainingSpec:
        steps = math.fsum(s.tokens / (s.batch_size.size * s.seq_len) for s in self.stages)
        if steps > limits.MAX_STEPS:
            raise ValueError(
                f"stages: expected at most {limits.MAX_STEPS:,} steps at the stages' full batch sizes, "
                f"got {steps:.3g} (a token budget of {self.total_tokens:.3g})"
            )
        return self

    @model_validator(mode="after")
    def _check_init_from(self) -> TrainingSpec:
        names = [s.name for s in self.stages]
        for i, stage in enumerate(self.stages):
            if len(set(names[: i + 1])) <= i:
                raise ValueError(f"stages.{i}.name: expected a name no other stage has, got {stage.name!r}")
            refs = [("init_from", stage.init_from)] + [
                (f"teachers.{d}", t.path) for d, t in (stage.teachers or {}).items()
            ]
            for field, ref in refs:
                if ref in names[i:]:
                    which = "the stage itself" if ref == stage.name else "a later stage"
                    raise ValueError(
                        f"stages.{i}.{field}: expected an earlier stage, a run or a Hugging Face directory, "
                        f"got {ref!r} ({which})"
                    )
        return self

    def init_source(self, index: int) -> tuple[str, str] | None:
        """Where stage `index` takes its weights from: ("stage", name) or ("path", dir); None: it continues.

        A name of an earlier stage is that stage (write `./name` for a directory of that name).
        """
        ref = self.stages[index].init_from
        if ref is None:
            return None
        earlier = [s.name for s in self.stages[:index]]
        return ("stage", ref) if ref in earlier else ("path", ref)

    def teacher_source(self, index: int, domain: str) -> tuple[str, str]:
        """Stage `index`'s teacher of `domain`: ("stage", name), ("path", dir) or ("url", url).

        As for `init_from`, the name of an earlier stage is that stage's final weights.
        """
        teachers = self.stages[index].teachers or {}
        t = teachers[domain]
        if t.url is not None:
            return ("url", t.url)
        assert t.path is not None
        earlier = [s.name for s in self.stages[:index]]
        return ("stage", t.path) if t.path in earlier else ("path", t.path)

    def named_sources(self) -> set[str]:
        """The stages whose final weights a later stage starts from or learns from, by name."""
        named = set()
        for i, stage in enumerate(self.stages):
            sources = [self.init_source(i)] + [self.teacher_source(i, d) for d in stage.teachers or {}]
            named |= {ref for kind, ref in filter(None, sources) if kind == "stage"}
        return named

    @property
    def total_tokens(self) -> float:
        return math.fsum(s.tokens for s in self.stages)


class ServingSpec(StrictModel):
    speculative_depth: MTPDepth = Field(0, description="MTP blocks used as draft at decode time.")
    chat_template: str = Field(
        "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}",
        description="Jinja2 chat template over `messages` (role, content) and `add_generation_prompt` (the "
        "server renders prompts with it true; sft stages render conversations with it, see lmspec/train/sft.py).",
    )
    temperature: NonNegativeFloat = 1.0
    top_p: Annotated[Number, Field(gt=0.0, le=1.0)] = 1.0


class Spec(StrictModel):
    """A model and how it is trained and served."""

    name: Name
    model: ModelSpec
    training: TrainingSpec | None = None
    serving: ServingSpec = ServingSpec()

    def _requested_mtp_blocks(self, index: int) -> int:
        assert self.training is not None
        own = self.training.stages[index].overrides.mtp_num_blocks
        return (self.model.mtp.num_blocks if self.model.mtp else 0) if own is None else own

    def stage_mtp_blocks(self, index: int) -> int:
        """MTP blocks stage `index` trains, the first ones: its `mtp_num_blocks`, else all of
        `model.mtp.num_blocks`, and never more than the model has (so `--set model.mtp.num_blocks=1` makes
        every stage train the one block)."""
        declared = self.model.mtp.num_blocks if self.model.mtp else 0
        return min(self._requested_mtp_blocks(index), declared)

    @model_validator(mode="after")
    def _check_stage_mtp(self) -> Spec:
        if self.training is None:
            return self
        for i, stage in enumerate(self.training.stages):
            over, at = stage.overrides, f"training.stages.{i}.overrides"
            asked = self._requested_mtp_blocks(i)
            before = self._requested_mtp_blocks(i - 1) if i else 0
            if over.mtp_init == "replicate" and not 1 <= before < asked:
                raise ValueError(
                    f"{at}.mtp_init: expected replicate only where a stage trains more MTP blocks than the "
                    f"stage before, which trains at least one (here {before} -> {asked})"
                )
            blocks = self.stage_mtp_blocks(i)
            problem = depth_weights_problem(over.mtp_depth_weights, blocks, "this stage trains")
            if problem is not None:
                raise ValueError(f"{at}.mtp_depth_weights: {problem}")
            declared_weights = self.model.mtp.depth_weights if self.model.mtp else None
            if over.mtp_depth_weights is None and declared_weights and blocks:
                if not math.fsum(declared_weights[:blocks]) > 0:
                    raise ValueError(
                        f"{at}.mtp_num_blocks: expected a positive model.mtp.depth_weights among the "
                        f"{blocks} blocks the stage trains, got all zero (set mtp_depth_weights)"
                    )
        return self

    @model_validator(mode="after")
    def _check_cross(self) -> Spec:
        if self.training is not None:
            for i, stage in enumerate(self.training.stages):
                if stage.seq_len > self.model.max_position_embeddings:
                    raise ValueError(
                        f"training.stages.{i}.seq_len: expected at most model.max_position_embeddings "
                        f"({self.model.max_position_embeddings}), got {stage.seq_len}"
                    )
                for kind in stage.overrides.rope_theta or {}:
                    if kind not in self.model.attention:
                        raise ValueError(
                            f"training.stages.{i}.overrides.rope_theta.{kind}: expected an attention kind "
                            f"among {sorted(self.model.attention)}, got {kind!r}"
                        )
        mtp = self.model.mtp
        depth = mtp.num_blocks if mtp else 0
        if self.serving.speculative_depth > depth:
            raise ValueError(
                f"serving.speculative_depth: expected at most mtp.num_blocks ({depth}), "
                f"got {self.serving.speculative_depth}"
            )
        return self

    @model_validator(mode="after")
    def _check_parallel(self) -> Spec:
        parallel = self.training.parallel if self.training is not None else None
        problem = parallel_problem(self.model, parallel) if parallel is not None else None
        if problem is not None:
            raise ValueError(f"training.parallel.{problem[0]}: {problem[1]}")
        return self


def world_size_problem(parallel: Parallel | None, world_size: int) -> str | None:
    """Why `parallel` cannot run on `world_size` ranks (its product differs), else None.

    An unset layout runs on any world size: every rank is one FSDP shard.
    """
    if parallel is None or parallel.world_size == world_size:
        return None
    p = parallel
    return (
        f"expected data x fsdp x expert x tensor to equal the world size {world_size}, got "
        f"{p.data} x {p.fsdp} x {p.expert} x {p.tensor} = {p.world_size}"
    )
