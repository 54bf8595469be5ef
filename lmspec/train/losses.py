"""The training objective: next-token CE + weighted MTP losses + the sequence-wise auxiliary loss.

    total = ce + mtp_loss_weight * mean_k(mtp_k) + seq_aux_coef * aux

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


def training_loss(out, *, mtp_loss_weight: float, seq_aux_coef: float) -> LossParts:
    """Combine a `ModelOutput` computed with labels into the loss the optimizer minimises."""
    ce = out.loss
    mtp = list(out.mtp_losses or [])
    zero = ce.new_zeros(())
    aux = out.aux_loss if out.aux_loss is not None else zero
    total = ce + seq_aux_coef * aux
    if mtp and mtp_loss_weight:
        total = total + mtp_loss_weight * torch.stack(mtp).mean()
    return LossParts(total=total, ce=ce, mtp=mtp, aux=aux)
