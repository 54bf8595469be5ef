"""MoE load balancing without an auxiliary loss (DeepSeek-V3's bias rule).

After each optimizer step every MoE layer's correction bias — added to the router scores for expert
selection only — moves by a fixed step towards balance:

    bias_e += bias_update * sign(mean_load - load_e)

so an overloaded expert becomes less likely to be picked and an idle one more likely. `load` is the number
of tokens routed to each expert in the step's global batch (summed over micro-batches and ranks).
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def update_correction_bias(
    moe_layers: list[nn.Module], expert_load: torch.Tensor, bias_update: float
) -> None:
    """Apply the sign rule to each layer's `gate.e_score_correction_bias`; `expert_load` is (layers, experts)."""
    if bias_update == 0.0 or not moe_layers:
        return
    if expert_load.shape[0] != len(moe_layers):
        raise ValueError(
            f"expert_load has {expert_load.shape[0]} rows but the model has {len(moe_layers)} MoE layers"
        )
    for layer, load in zip(moe_layers, expert_load, strict=True):
        bias = getattr(layer.gate, "e_score_correction_bias", None)
        if bias is None:  # correction_bias: false in the spec
            continue
        load = load[: bias.numel()].to(device=bias.device, dtype=torch.float32)  # rows may be zero-padded
        step = bias_update * torch.sign(load.mean() - load)
        bias.add_(step.to(bias.dtype))


def load_fractions(expert_load: torch.Tensor) -> torch.Tensor:
    """Per layer, the fraction of routed token slots each expert received (rows sum to 1)."""
    load = expert_load.to(torch.float64)
    return load / load.sum(dim=-1, keepdim=True).clamp_min(1.0)


def max_over_uniform(expert_load: torch.Tensor) -> float:
    """The busiest expert's load divided by the uniform load, over all layers (1.0 = perfectly balanced)."""
    if expert_load.numel() == 0:
        return 1.0
    frac = load_fractions(expert_load)
    return float(frac.max() * expert_load.shape[-1])
