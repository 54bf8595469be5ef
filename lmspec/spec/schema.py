"""The spec schema: what a model and its training schedule may say, and nothing more.

Every class is strict (`extra="forbid"`) and frozen. Field names are the names used everywhere
downstream — IR attributes, template variables and kernel constants — so one parameter can be
followed from the YAML file to the kernel with grep.

Derived values (`window_keys`, `rope_dim`, the expanded layer list) are pure functions or
properties; they never overwrite what the user wrote.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, model_validator

from lmspec.spec.pattern import expand_pattern


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)


# ---------------------------------------------------------------------------------------------
# Architecture
# ---------------------------------------------------------------------------------------------


class Rope(StrictModel):
    """Rotary embedding applied to the leading `rope_dim` dims of each q/k head (rotate-half style)."""

    theta: PositiveFloat = Field(description="RoPE base frequency.")
    fraction: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="Fraction of qk_head_dim that is rotated; rope_dim = int(qk_head_dim * fraction).",
    )


class AttentionBase(StrictModel):
    num_heads: PositiveInt = Field(description="Query heads.")
    num_kv_heads: PositiveInt = Field(description="Key/value heads (GQA); must divide num_heads.")
    qk_head_dim: PositiveInt = Field(description="Per-head dim of queries and keys.")
    v_head_dim: PositiveInt = Field(description="Per-head dim of values (independent of qk_head_dim).")
    rope: Rope
    value_scale: PositiveFloat = Field(1.0, description="Values are multiplied by this before attention.")
    sink: bool = Field(False, description="Learnable per-head sink logit in the softmax denominator.")
    bias: bool = Field(False, description="Bias on the q/k/v projections (o_proj never has one).")
    softmax_scale: PositiveFloat | None = Field(None, description="Logit scale; default qk_head_dim ** -0.5.")

    @model_validator(mode="after")
    def _check_heads(self) -> AttentionBase:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_kv_heads: expected a divisor of num_heads ({self.num_heads}), got {self.num_kv_heads}"
            )
        rope_dim = int(self.qk_head_dim * self.rope.fraction)
        if rope_dim % 2 or rope_dim == 0:
            raise ValueError(
                f"rope.fraction: expected a fraction giving an even, non-zero rope_dim, got "
                f"int({self.qk_head_dim} * {self.rope.fraction}) = {rope_dim}"
            )
        return self

    @property
    def rope_dim(self) -> int:
        """Rotated dims per head; int() truncation as in transformers' partial_rotary_factor."""
        return int(self.qk_head_dim * self.rope.fraction)

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
    window: PositiveInt = Field(description="Window size, read by window_convention.")
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
    intermediate_size: PositiveInt
    activation: Literal["silu"] = "silu"


class MoEFFN(StrictModel):
    """Routed mixture of SwiGLU experts, optionally with always-on shared experts."""

    kind: Literal["moe"] = "moe"
    num_experts: PositiveInt = Field(description="Routed experts.")
    top_k: PositiveInt = Field(description="Experts chosen per token.")
    expert_intermediate_size: PositiveInt
    num_shared_experts: int = Field(0, ge=0)
    score_function: Literal["sigmoid", "softmax"] = "sigmoid"
    correction_bias: bool = Field(
        True, description="Aux-loss-free balancing bias, added to scores for selection only."
    )
    renormalize: bool = Field(True, description="Renormalise the chosen top-k weights to sum to 1.")
    routed_scaling_factor: PositiveFloat = 1.0
    num_groups: PositiveInt = Field(1, description="Group-limited routing: expert groups.")
    top_k_groups: PositiveInt = Field(1, description="Group-limited routing: groups kept per token.")
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
        if self.num_groups > 1 and self.top_k > self.top_k_groups * per_group:
            raise ValueError(
                f"top_k: expected at most the experts in the kept groups ({self.top_k_groups} x {per_group}), "
                f"got {self.top_k}"
            )
        return self


FFNKind = Annotated[DenseFFN | MoEFFN, Field(discriminator="kind")]


class Block(StrictModel):
    """One decoder layer: pre-norm attention then pre-norm FFN, each with a residual."""

    attention: str = Field(description="Name of an entry in model.attention.")
    ffn: str = Field(description="Name of an entry in model.ffn.")


class Norm(StrictModel):
    kind: Literal["rmsnorm"] = "rmsnorm"
    eps: PositiveFloat = 1e-5


class MTP(StrictModel):
    """Multi-token prediction: `num_blocks` chained blocks; block k predicts the token k+1 ahead.

    Each block: h = proj(concat[norm(embed(x_{t+k})), norm(h_prev)]), one decoder layer of kind
    `block`, a final norm and the shared LM head.
    """

    num_blocks: int = Field(ge=0)
    block: str = Field(description="Name of an entry in model.blocks used inside each MTP block.")
    loss_weight: float = Field(0.3, ge=0.0, description="Default MTP loss weight; stages may override.")


class ModelSpec(StrictModel):
    vocab_size: PositiveInt
    hidden_size: PositiveInt
    max_position_embeddings: PositiveInt
    norm: Norm = Norm()
    tie_word_embeddings: bool = False
    init_std: PositiveFloat = 0.02
    attention: dict[str, AttentionKind] = Field(min_length=1)
    ffn: dict[str, FFNKind] = Field(min_length=1)
    blocks: dict[str, Block] = Field(min_length=1)
    layers: str = Field(
        description="Layer pattern over block names: `G0 S*4 G (S*5 G)*7` — names, `*N` repeats, parentheses."
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

TokenCount = Annotated[float, Field(ge=0, description="A token count; YAML may write 22e12.")]


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
    final: float = Field(0.0, ge=0.0)
    warmup_tokens: TokenCount = 0
    warmup_start: float = Field(0.0, ge=0.0)
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

    size: PositiveInt
    warmup_start: PositiveInt | None = None
    warmup_tokens: TokenCount = 0

    @model_validator(mode="after")
    def _check(self) -> BatchSchedule:
        if self.warmup_start is not None and self.warmup_start > self.size:
            raise ValueError(f"warmup_start: expected at most size ({self.size}), got {self.warmup_start}")
        return self


class Balancing(StrictModel):
    """MoE load balancing: aux-loss-free bias updates plus a sequence-wise auxiliary loss."""

    bias_update: float = Field(0.001, ge=0.0, description="Correction-bias step per update (sign rule).")
    seq_aux_coef: float = Field(0.0, ge=0.0, description="Sequence-wise auxiliary loss coefficient.")


class StageOverrides(StrictModel):
    """Values that change at a stage boundary."""

    rope_theta: dict[str, PositiveFloat] | None = Field(
        None, description="Per attention kind: new RoPE theta for this stage."
    )
    mtp_loss_weight: float | None = Field(None, ge=0.0)
    bias_update: float | None = Field(None, ge=0.0)
    seq_aux_coef: float | None = Field(None, ge=0.0)


class Stage(StrictModel):
    name: str
    tokens: float = Field(gt=0, description="Token budget of the stage.")
    seq_len: PositiveInt
    batch_size: BatchSchedule
    lr: LRSchedule
    overrides: StageOverrides = StageOverrides()

    @model_validator(mode="after")
    def _check(self) -> Stage:
        used = self.lr.warmup_tokens + (self.lr.decay_tokens or 0)
        if used > self.tokens * (1 + 1e-2):
            raise ValueError(
                f"lr: expected warmup_tokens + decay_tokens at most the stage's {self.tokens:g} tokens, "
                f"got {used:g}"
            )
        return self


class Optimizer(StrictModel):
    kind: Literal["adamw"] = "adamw"
    betas: tuple[float, float] = (0.9, 0.95)
    eps: PositiveFloat = 1e-8
    weight_decay: float = Field(0.1, ge=0.0)


class TrainingSpec(StrictModel):
    optimizer: Optimizer = Optimizer()
    grad_clip: PositiveFloat | None = 1.0
    precision: Literal["fp32", "bf16"] = "fp32"
    balancing: Balancing = Balancing()
    seed: int = 0
    stages: list[Stage] = Field(min_length=1)

    @property
    def total_tokens(self) -> float:
        return math.fsum(s.tokens for s in self.stages)


class ServingSpec(StrictModel):
    speculative_depth: int = Field(0, ge=0, description="MTP blocks used as draft at decode time.")
    chat_template: str = Field(
        "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}\n{% endfor %}<|assistant|>\n",
        description="Jinja2 chat template over `messages` (role, content).",
    )
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)


class Spec(StrictModel):
    """A model and how it is trained and served."""

    name: str
    model: ModelSpec
    training: TrainingSpec | None = None
    serving: ServingSpec = ServingSpec()

    @model_validator(mode="after")
    def _check_cross(self) -> Spec:
        if self.training is not None:
            for i, stage in enumerate(self.training.stages):
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
