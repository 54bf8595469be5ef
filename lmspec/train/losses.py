"""The training objective: next-token CE + weighted MTP losses + the sequence-wise auxiliary loss.

    total = ce + mtp_loss_weight * mean_k(mtp_k) + seq_aux_coef * aux

With per-depth weights d_k (`model.mtp.depth_weights`, or a stage's `mtp_depth_weights`) the mean becomes
the weighted mean sum_k d_k * mtp_k / sum_k d_k over the blocks the stage trains, so `mtp_loss_weight`
keeps its meaning (the report's 0.3 / 0.1) and d only shapes it across depths.

`mtp_k` is block k's CE on the token k + 1 ahead (the model computes it from the shifted labels); `aux` is
the model's sum over MoE layers of the DeepSeek-V3 sequence-wise balance loss, unweighted. The weights come
from the step's schedule, so they switch at stage boundaries with everything else.

Each part is a mean over its own global count for the step (`loss_counts`): CE over the batch's trained
labels, block k's MTP CE over its targets, the aux loss over rows. A micro-batch's means are weighted by
its share of those counts (`shares`) before the backward, as `num_items_in_batch` does in transformers, so
the loss and its gradient are the same for any number of processes and micro-batches. Every rank reads
the whole global batch's labels, so the counts need no collective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass
class LossParts:
    total: torch.Tensor
    ce: torch.Tensor
    mtp: list[torch.Tensor]
    aux: torch.Tensor


def combine(
    ce: torch.Tensor,
    aux: torch.Tensor,
    mtp: list[torch.Tensor],
    *,
    mtp_loss_weight: float,
    seq_aux_coef: float,
    mtp_depth_weights: tuple[float, ...] | None = None,
) -> torch.Tensor:
    """ce + seq_aux_coef * aux + mtp_loss_weight * (weighted) mean_k(mtp_k); linear in every part, so the
    sum over micro-batches of their scaled parts combined is the combination of the batch's parts."""
    total = ce + seq_aux_coef * aux
    if mtp and mtp_loss_weight:
        if mtp_depth_weights is None:
            total = total + mtp_loss_weight * torch.stack(mtp).mean()
        else:
            if len(mtp_depth_weights) != len(mtp):
                raise ValueError(f"{len(mtp_depth_weights)} MTP depth weights for {len(mtp)} MTP losses")
            d = torch.tensor(mtp_depth_weights, dtype=ce.dtype, device=ce.device)
            total = total + mtp_loss_weight * (torch.stack(mtp) * d).sum() / d.sum()
    return total


def training_loss(
    out,
    *,
    mtp_loss_weight: float,
    seq_aux_coef: float,
    mtp_depth_weights: tuple[float, ...] | None = None,
) -> LossParts:
    """Combine a `ModelOutput` computed with labels into the loss the optimizer minimises."""
    ce = out.loss
    mtp = list(out.mtp_losses or [])
    aux = out.aux_loss if out.aux_loss is not None else ce.new_zeros(())
    total = combine(
        ce,
        aux,
        mtp,
        mtp_loss_weight=mtp_loss_weight,
        seq_aux_coef=seq_aux_coef,
        mtp_depth_weights=mtp_depth_weights,
    )
    return LossParts(total=total, ce=ce, mtp=mtp, aux=aux)


@dataclass(frozen=True)
class LossCounts:
    """What each part of the loss averages over: rows (the sequence-wise aux loss), trained labels (CE) and
    each MTP block's targets."""

    rows: int
    ce: int
    mtp: tuple[int, ...]


def loss_counts(labels: torch.Tensor, mtp_blocks: int) -> LossCounts:
    """The counts of (B, T) shifted labels; block k's targets follow the model's rule: labels[:, t + k] where
    it and its input labels[:, t + k - 1] are both trained."""
    valid = labels != IGNORE_INDEX
    mtp = tuple(int((valid[:, k - 1 : -1] & valid[:, k:]).sum()) for k in range(1, mtp_blocks + 1))
    return LossCounts(rows=int(labels.shape[0]), ce=int(valid.sum()), mtp=mtp)


def shares(part: LossCounts, whole: LossCounts) -> tuple[float, float, tuple[float, ...]]:
    """(ce, aux, mtp_k) weights of a micro-batch's mean losses in the global batch's: its share of what each
    part averages over. Summing the weighted means gives the global means for any split of the batch over
    ranks and micro-batches, also where rows train different numbers of tokens (sft); a part with nothing
    to average over anywhere weighs 0 (its mean is 0 then)."""

    def share(n: int, total: int) -> float:
        return n / total if total else 0.0

    mtp = tuple(share(n, t) for n, t in zip(part.mtp, whole.mtp, strict=True))
    return share(part.ce, whole.ce), share(part.rows, whole.rows), mtp
