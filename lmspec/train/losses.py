"""The training objective: next-token CE + weighted MTP losses + the sequence-wise auxiliary loss.

    total = ce + mtp_loss_weight * mean_k(mtp_k) + seq_aux_coef * aux

With per-depth weights d_k (`model.mtp.depth_weights`, or a stage's `mtp_depth_weights`) the mean becomes
the weighted mean sum_k d_k * mtp_k / sum_k d_k over the blocks the stage trains, so `mtp_loss_weight`
keeps its meaning (the report's 0.3 / 0.1) and d only shapes it across depths.

`mtp_k` is block k's CE on the token k + 1 ahead (the model computes it from the shifted labels); `aux` is
the model's sum over MoE layers of the DeepSeek-V3 sequence-wise balance loss, unweighted. The weights come
from the step's schedule, so they switch at stage boundaries with everything else.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LossParts:
    total: torch.Tensor
    ce: torch.Tensor
    mtp: list[torch.Tensor]
    aux: torch.Tensor


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
    zero = ce.new_zeros(())
    aux = out.aux_loss if out.aux_loss is not None else zero
    total = ce + seq_aux_coef * aux
    if mtp and mtp_loss_weight:
        if mtp_depth_weights is None:
            total = total + mtp_loss_weight * torch.stack(mtp).mean()
        else:
            if len(mtp_depth_weights) != len(mtp):
                raise ValueError(f"{len(mtp_depth_weights)} MTP depth weights for {len(mtp)} MTP losses")
            d = torch.tensor(mtp_depth_weights, dtype=ce.dtype, device=ce.device)
            total = total + mtp_loss_weight * (torch.stack(mtp) * d).sum() / d.sum()
    return LossParts(total=total, ce=ce, mtp=mtp, aux=aux)
