"""The training schedule as pure functions of (spec, tokens seen).

Everything that changes during training — stage, learning rate, batch size, sequence length, RoPE theta,
MTP loss weight and the two MoE balancing factors — is read from the spec by `schedule_at`, so a test can
check any step of a run against the spec without running the trainer.

Conventions:
- A stage covers `[start, start + stage.tokens)` in global tokens; a step belongs to the stage its first
  token falls in, so a stage switch happens at most one step after its boundary.
- The LR schedule is a function of the tokens seen *within* the stage (see `LRSchedule` in schema.py).
- The batch-size ramp is counted in tokens from the start of its stage; for the first stage (the only one
  MiMo ramps) that is the global token count, as in the paper's "over the first 500B tokens".
- A value a stage does not override falls back to the training-level default (`training.balancing`,
  `model.mtp.loss_weight`, the attention kind's own `rope.theta`, every one of `model.mtp.num_blocks`);
  overrides never carry over stages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lmspec.spec import Spec
from lmspec.spec.schema import BatchSchedule, LRSchedule, Stage, TrainingSpec


@dataclass(frozen=True)
class StepSchedule:
    """What one training step uses; `stage` is the index into `spec.training.stages`."""

    stage: int
    stage_name: str
    lr: float
    batch_size: int
    seq_len: int
    rope_theta: dict[str, float]
    mtp_loss_weight: float
    bias_update: float
    seq_aux_coef: float
    kind: str = "pretrain"
    mtp_blocks: int = 0  # MTP blocks the step trains (the first ones)
    mtp_depth_weights: tuple[float, ...] | None = None


def _training(spec: Spec) -> TrainingSpec:
    if spec.training is None:
        # A spec without a training section cannot be trained; callers turn this into a user error.
        raise ValueError(f"spec {spec.name!r} has no training section")
    return spec.training


def stage_bounds(spec: Spec) -> list[tuple[float, float]]:
    """Global [start, end) token range of each stage."""
    bounds, start = [], 0.0
    for stage in _training(spec).stages:
        bounds.append((start, start + stage.tokens))
        start += stage.tokens
    return bounds


def stage_index(spec: Spec, tokens: float) -> int:
    """The stage a step starting at `tokens` belongs to (the last one once the budget is spent)."""
    bounds = stage_bounds(spec)
    for i, (_, end) in enumerate(bounds):
        if tokens < end:
            return i
    return len(bounds) - 1


def _decay(shape: str, start: float, end: float, progress: float) -> float:
    progress = min(max(progress, 0.0), 1.0)
    if shape == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return start + (end - start) * progress


def lr_at(lr: LRSchedule, stage_tokens: float, tokens_in_stage: float) -> float:
    """Learning rate `tokens_in_stage` tokens into a stage of `stage_tokens` tokens."""
    t = max(tokens_in_stage, 0.0)
    if lr.kind == "constant":
        return lr.peak
    if lr.warmup_tokens > 0 and t < lr.warmup_tokens:
        return lr.warmup_start + (lr.peak - lr.warmup_start) * t / lr.warmup_tokens
    if lr.kind == "wsd":
        assert lr.decay_tokens is not None  # the schema requires it for wsd
        decay_start = stage_tokens - lr.decay_tokens
        if t < decay_start:
            return lr.peak
        return _decay(lr.decay_shape, lr.peak, lr.final, (t - decay_start) / max(lr.decay_tokens, 1e-12))
    span = stage_tokens - lr.warmup_tokens
    progress = (t - lr.warmup_tokens) / span if span > 0 else 1.0
    return _decay(lr.kind, lr.peak, lr.final, progress)


def batch_size_at(batch: BatchSchedule, tokens_in_stage: float) -> int:
    """Batch size in sequences: linear ramp from `warmup_start` to `size`, rounded down."""
    if batch.warmup_start is None or batch.warmup_tokens <= 0 or tokens_in_stage >= batch.warmup_tokens:
        return batch.size
    frac = max(tokens_in_stage, 0.0) / batch.warmup_tokens
    return max(batch.warmup_start, int(batch.warmup_start + (batch.size - batch.warmup_start) * frac))


def schedule_at(spec: Spec, tokens: float) -> StepSchedule:
    """The schedule of a step that starts after `tokens` global tokens."""
    training = _training(spec)
    i = stage_index(spec, tokens)
    stage: Stage = training.stages[i]
    start = stage_bounds(spec)[i][0]
    into = tokens - start
    over = stage.overrides
    theta = {name: attn.rope.theta for name, attn in spec.model.attention.items()}
    theta.update(over.rope_theta or {})
    mtp = spec.model.mtp
    default_mtp = mtp.loss_weight if mtp is not None and mtp.num_blocks > 0 else 0.0
    return StepSchedule(
        stage=i,
        stage_name=stage.name,
        lr=lr_at(stage.lr, stage.tokens, into),
        batch_size=batch_size_at(stage.batch_size, into),
        seq_len=stage.seq_len,
        rope_theta=theta,
        mtp_loss_weight=over.mtp_loss_weight if over.mtp_loss_weight is not None else default_mtp,
        bias_update=over.bias_update if over.bias_update is not None else training.balancing.bias_update,
        seq_aux_coef=over.seq_aux_coef if over.seq_aux_coef is not None else training.balancing.seq_aux_coef,
        kind=stage.kind,
        mtp_blocks=spec.stage_mtp_blocks(i),
        mtp_depth_weights=_depth_weights(spec, i),
    )


def _depth_weights(spec: Spec, index: int) -> tuple[float, ...] | None:
    """Stage `index`'s per-depth MTP weights: its own, else the model's cut to the blocks it trains."""
    assert spec.training is not None
    own = spec.training.stages[index].overrides.mtp_depth_weights
    if own is not None:
        return tuple(own)
    declared = spec.model.mtp.depth_weights if spec.model.mtp else None
    if declared is None:
        return None
    return tuple(declared[: spec.stage_mtp_blocks(index)])


def scale_factor(spec: Spec, *, max_tokens: float | None = None, scale: float | None = None) -> float:
    """The factor `--max-tokens N` or `--scale F` applies to every token quantity (1.0 for neither)."""
    if max_tokens is not None and scale is not None:
        raise ValueError("give --max-tokens or --scale, not both")
    if max_tokens is not None:
        if max_tokens <= 0:
            raise ValueError(f"--max-tokens: expected a positive token count, got {max_tokens:g}")
        return max_tokens / _training(spec).total_tokens
    if scale is not None:
        if scale <= 0:
            raise ValueError(f"--scale: expected a positive factor, got {scale:g}")
        return scale
    return 1.0


def scale_schedule(spec: Spec, factor: float) -> Spec:
    """The spec with every token quantity of its schedule multiplied by `factor`.

    Stage budgets, LR warmup and decay lengths and batch warm-up lengths shrink together, so the shape of
    the schedule (where each stage, warmup and decay begins, relative to the whole) is kept exactly.
    Sequence lengths, batch sizes and learning rates are not token quantities and stay as declared.
    """
    training = _training(spec)
    if factor == 1.0:
        return spec
    stages = []
    for s in training.stages:
        lr_update: dict = {"warmup_tokens": s.lr.warmup_tokens * factor}
        if s.lr.decay_tokens is not None:
            lr_update["decay_tokens"] = s.lr.decay_tokens * factor
        stages.append(
            s.model_copy(
                update={
                    "tokens": s.tokens * factor,
                    "lr": s.lr.model_copy(update=lr_update),
                    "batch_size": s.batch_size.model_copy(
                        update={"warmup_tokens": s.batch_size.warmup_tokens * factor}
                    ),
                }
            )
        )
    return spec.model_copy(update={"training": training.model_copy(update={"stages": stages})})


def plan_steps(spec: Spec) -> int:
    """How many optimizer steps the schedule takes: each step consumes batch_size * seq_len tokens."""
    total, tokens, steps = _training(spec).total_tokens, 0.0, 0
    while tokens < total:
        s = schedule_at(spec, tokens)
        tokens += s.batch_size * s.seq_len
        steps += 1
    return steps
