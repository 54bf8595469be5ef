"""Scale-out: one process per device, FSDP2 sharding and data-parallel batches.

`torchrun --nproc-per-node N -m lmspec train ...` sets RANK / WORLD_SIZE / LOCAL_RANK; `init()` then joins
the process group (NCCL on CUDA, gloo on CPU) and `shard(model)` applies `fully_shard` to every decoder
layer and MTP block, then to the root, so each layer's parameters are all-gathered just before it runs and
freed after. Gradients are reduce-scattered as an average over ranks, which is why the trainer scales each
rank's loss by `world_size * local_rows / global_rows` (see `Dist.loss_weight`).

`training.parallel: {data: D, fsdp: F}` lays the ranks out as a (data, fsdp) mesh: FSDP2 shards over the
F ranks of each replica and all-reduces gradients over the D replicas (HSDP); the product must equal the
world size. Unset, every rank is one FSDP shard.

A single process (no RANK in the environment) gets a `Dist` with world_size 1 whose collectives are no-ops,
so the trainer has one code path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from lmspec.errors import UsageError
from lmspec.spec.schema import Parallel, world_size_problem


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def rows(self, batch_size: int) -> slice:
        """This rank's contiguous share of a global batch's rows (sizes differ by at most one)."""
        base, extra = divmod(batch_size, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast_object(self, obj: Any) -> Any:
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def init(device: str | None = None) -> Dist:
    """Join the process group torchrun describes, or return the single-process `Dist`."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if world <= 1:
        dev = torch.device(device) if device else torch.device("cuda" if want_cuda else "cpu")
        return Dist(device=dev)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if want_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if want_cuda else "gloo", device_id=dev if want_cuda else None)
    return Dist(rank=rank, world_size=world, local_rank=local_rank, device=dev)


# Methods other than `forward` through which the generated model runs a sharded block.
_ENTRY_METHODS = ("predict",)


def check_layout(parallel: Parallel | None, d: Dist) -> None:
    """Refuse, in one line, a `training.parallel` this run cannot use: a product other than the world
    size, or the expert and tensor dimensions, which training does not split by yet."""
    problem = world_size_problem(parallel, d.world_size)
    if problem is not None:
        raise UsageError(f"training.parallel: {problem} (the processes torchrun started)")
    if parallel is not None and (parallel.expert > 1 or parallel.tensor > 1):
        raise UsageError(
            f"training.parallel: expected expert 1 and tensor 1 (training splits ranks by data and fsdp), "
            f"got expert {parallel.expert}, tensor {parallel.tensor}; `lmspec plan` sizes such layouts"
        )


def mesh(parallel: Parallel | None, d: Dist) -> DeviceMesh | None:
    """The (data, fsdp) DeviceMesh of a declared layout: FSDP2 replicates over `data` and shards over
    `fsdp` (HSDP). None for an unset layout, which shards over every rank (FSDP2's default mesh)."""
    if parallel is None or not d.enabled:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(d.device.type, (parallel.data, parallel.fsdp), mesh_dim_names=("data", "fsdp"))


def shard(model: nn.Module, d: Dist, parallel: Parallel | None = None) -> nn.Module:
    """FSDP2: shard each decoder layer and MTP block, then the root (embedding, final norm, LM head)."""
    if not d.enabled:
        return model
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    device_mesh = mesh(parallel, d)

    inner = model.model
    blocks = list(inner.layers)
    mtp = getattr(inner, "mtp", None)
    if mtp is not None:
        blocks.extend(mtp.layers)
    for block in blocks:
        fully_shard(block, mesh=device_mesh)
        # MTP blocks are entered through `predict`, not `forward`; FSDP must gather their weights there too.
        for method in _ENTRY_METHODS:
            if callable(getattr(block, method, None)):
                register_fsdp_forward_method(block, method)
    fully_shard(model, mesh=device_mesh)
    return model


def shutdown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
