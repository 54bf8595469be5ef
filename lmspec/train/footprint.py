"""The bytes of training state each rank holds: its local shards of the parameters, their gradients and
the optimizer's state, as `lmspec plan` estimates them per device (`lmspec.compiler.scale.device_memory`).

A DTensor (an FSDP2 shard, a block of experts) counts its local part only; a plain tensor counts whole, as
every rank holds it. The optimizer's state includes AdamW's scalar step counts, a few bytes per tensor.
"""

from __future__ import annotations

import torch
from torch import nn

from lmspec.train import distributed

FIELDS = ("params", "grads", "optimizer")


def _bytes(t: torch.Tensor) -> int:
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def local_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """This rank's bytes of parameters, gradients (those not yet freed) and optimizer state."""
    params = list(model.parameters())  # each shared (tied) parameter once
    state = [v for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
    return {
        "params": sum(_bytes(p) for p in params),
        "grads": sum(_bytes(p.grad) for p in params if p.grad is not None),
        "optimizer": sum(_bytes(v) for v in state),
    }


def state_bytes_by_rank(
    model: nn.Module, optimizer: torch.optim.Optimizer, d: distributed.Dist
) -> dict[str, list[int]]:
    """Every rank's `local_state_bytes`, field by field in rank order; a collective, so every rank calls it."""
    mine = local_state_bytes(model, optimizer)
    # One all-reduce of a table where each rank fills its own row: float64 holds these counts exactly.
    table = torch.zeros(d.world_size, len(FIELDS), dtype=torch.float64)
    table[d.rank] = torch.tensor([float(mine[f]) for f in FIELDS], dtype=torch.float64)
    if d.enabled:
        import torch.distributed as dist

        # Over the whole world, not `d.all_sum`'s batch group: tensor ranks hold different shards.
        table = table.to(d.device)
        dist.all_reduce(table, op=dist.ReduceOp.SUM)
    return {f: [int(v) for v in table[:, i].tolist()] for i, f in enumerate(FIELDS)}
