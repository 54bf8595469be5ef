"""Scale-out: one process per device, FSDP2 sharding and data-parallel batches.

`torchrun --nproc-per-node N -m lmspec train ...` sets RANK / WORLD_SIZE / LOCAL_RANK; `init()` then joins
the process group (NCCL on CUDA, gloo on CPU) and `shard(model)` applies `fully_shard` to every decoder
layer and MTP block, then to the root, so each layer's parameters are all-gathered just before it runs and
freed after. Gradients are reduce-scattered as an average over ranks, which is why the trainer scales each
rank's loss by `world_size * local_rows / global_rows` (see `Dist.loss_weight`).

`training.parallel: {data: D, fsdp: F}` lays the ranks out as a (data, fsdp) mesh: FSDP2 shards over the
F ranks of each replica and all-reduces gradients over the D replicas (HSDP); the product must equal the
world size. Unset, every rank is one FSDP shard.

`expert: P` adds a third mesh dimension, (data, fsdp, expert), as torchtitan's dp2ep:
- the routed experts of every MoE layer are split over `expert` (rank e of it holds experts
  [e E/P, (e + 1) E/P) as a DTensor `Shard(0)`), FSDP2-sharded over `fsdp` and replicated over `data`; the
  generated model's `experts(...)` call then dispatches tokens by all-to-all
  (`lmspec.runtime.ops.expert_parallel`);
- every other weight is FSDP2-sharded over `fsdp x expert` (the expert ranks see other rows, so for the
  dense weights they are more data-parallel shards) and replicated over `data`;
- both kinds of gradient are averaged over all ranks: the experts' reduce-scatter divides by the world size,
  since each expert's gradient already sums the tokens of its whole expert group.

A single process (no RANK in the environment) gets a `Dist` with world_size 1 whose collectives are no-ops,
so the trainer has one code path.
"""

from __future__ import annotations

import os
import warnings
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
    # Tensor parallelism (set by `shard`): the ranks of a tensor group are neighbours (the mesh's innermost
    # dimension) and read the same rows, so the batch splits over world_size / tensor ranks, and
    # `batch_group` holds one rank of each tensor group (those of this rank's tensor index).
    tensor: int = 1
    batch_group: Any = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def batch_ranks(self) -> int:
        """How many ranks read different rows: the world, less the tensor ranks that share them."""
        return self.world_size // self.tensor

    def rows(self, batch_size: int) -> slice:
        """This rank's contiguous share of a global batch's rows (sizes differ by at most one); the ranks of
        a tensor group get the same rows."""
        ranks, me = self.batch_ranks, self.rank // self.tensor
        base, extra = divmod(batch_size, ranks)
        start = me * base + min(me, extra)
        return slice(start, start + base + (1 if me < extra else 0))

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over the ranks that read different rows (each tensor group counts once)."""
        if not self.enabled:
            return t
        if self.tensor == 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        elif self.batch_ranks > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.batch_group)
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
    """Refuse, in one line, a `training.parallel` whose product is not the world size (the schema has
    already checked that each size divides what it splits)."""
    problem = world_size_problem(parallel, d.world_size)
    if problem is not None:
        raise UsageError(f"training.parallel: {problem} (the processes torchrun started)")


@dataclass
class Meshes:
    """The DeviceMeshes a layout shards over; None fields fall back to FSDP2's default (every rank)."""

    dense: DeviceMesh | None = None  # FSDP2 of every weight but the routed experts: (data, fsdp [x expert])
    experts: DeviceMesh | None = None  # FSDP2 of the routed experts: (data, fsdp)
    expert: DeviceMesh | None = None  # the 1-D expert group the routed experts split over
    tensor: DeviceMesh | None = None  # the 1-D tensor group heads, FFN widths and vocabulary split over
    batch: DeviceMesh | None = None  # with `tensor`: the ranks reading other rows (data x fsdp x expert)


def meshes(parallel: Parallel | None, d: Dist) -> Meshes:
    """The meshes of a declared layout. Without `expert`, a (data, fsdp) mesh: FSDP2 replicates over `data`
    and shards over `fsdp` (HSDP). With it, a (data, fsdp, expert) mesh whose `fsdp x expert` ranks shard
    the dense weights. An unset layout shards over every rank (FSDP2's default mesh)."""
    if parallel is None or not d.enabled:
        return Meshes()
    from torch.distributed.device_mesh import init_device_mesh

    dev = d.device.type
    if parallel.tensor > 1:
        return _tensor_meshes(parallel, dev)
    if parallel.expert == 1:
        return Meshes(
            dense=init_device_mesh(dev, (parallel.data, parallel.fsdp), mesh_dim_names=("data", "fsdp"))
        )
    shape = (parallel.data, parallel.fsdp, parallel.expert)
    root = init_device_mesh(dev, shape, mesh_dim_names=("data", "fsdp", "expert"))
    root["fsdp", "expert"]._flatten("dense_shard")
    return Meshes(dense=root["data", "dense_shard"], experts=root["data", "fsdp"], expert=root["expert"])


def _tensor_meshes(parallel: Parallel, dev: str) -> Meshes:
    """A (data, fsdp, expert, tensor) mesh: `tensor` innermost, so a tensor group is neighbouring ranks
    (one node's fast links); FSDP2 shards the dense weights over `fsdp x expert` as without it."""
    from torch.distributed.device_mesh import init_device_mesh

    shape = (parallel.data, parallel.fsdp, parallel.expert, parallel.tensor)
    root = init_device_mesh(dev, shape, mesh_dim_names=("data", "fsdp", "expert", "tensor"))
    batch = root["data", "fsdp", "expert"]._flatten("batch")
    if parallel.expert == 1:
        return Meshes(dense=root["data", "fsdp"], tensor=root["tensor"], batch=batch)
    root["fsdp", "expert"]._flatten("dense_shard")
    return Meshes(
        dense=root["data", "dense_shard"],
        experts=root["data", "fsdp"],
        expert=root["expert"],
        tensor=root["tensor"],
        batch=batch,
    )


def _moe_experts(model: nn.Module) -> list[nn.Module]:
    """The routed-experts module (`gate_up_proj`, `down_proj`) of every MoE layer, in module order."""
    return [m for m in model.modules() if isinstance(getattr(m, "gate_up_proj", None), nn.Parameter)]


def split_experts(model: nn.Module, expert_mesh: DeviceMesh) -> None:
    """Keep this rank's block of routed experts as a DTensor `Shard(0)` on the expert mesh, and make the
    model's `moe_experts` dispatch over it. Every rank built the same full weights (same seed), so each
    slices its own block and nothing is sent."""
    from torch.distributed.tensor import DTensor, Shard

    from lmspec.runtime.ops.expert_parallel import ExpertParallelBackend

    ranks, me = expert_mesh.size(), expert_mesh.get_local_rank()
    for experts in _moe_experts(model):
        for name, p in list(experts.named_parameters(recurse=False)):
            n = p.shape[0] // ranks
            local = p.detach()[me * n : (me + 1) * n].clone()
            dt = DTensor.from_local(local, expert_mesh, [Shard(0)], run_check=False)
            setattr(experts, name, nn.Parameter(dt, requires_grad=p.requires_grad))
    model.ops = ExpertParallelBackend(model.ops)
    model._share_ops()


def _shard_experts(model: nn.Module, m: Meshes, d: Dist) -> None:
    """FSDP2 over (data, fsdp) for each MoE layer's experts, averaging their gradients over every rank."""
    from torch.distributed.fsdp import fully_shard

    assert m.expert is not None and m.experts is not None
    split_experts(model, m.expert)
    shard_ranks = m.experts["fsdp"].size()
    for experts in _moe_experts(model):
        fully_shard(experts, mesh=m.experts)
        # An expert's gradient sums its whole expert group's tokens, so FSDP's default average over the
        # (data, fsdp) ranks would leave it `expert` times the global mean: divide by every rank instead.
        experts.set_gradient_divide_factor(float(d.world_size))
        if shard_ranks > 1:
            # A plain sum and one division afterwards: gloo has no pre-multiplied sum.
            experts.set_force_sum_reduction_for_comms(True)


def shard(model: nn.Module, d: Dist, parallel: Parallel | None = None) -> nn.Module:
    """FSDP2: shard each decoder layer and MTP block, then the root (embedding, final norm, LM head); with
    an expert dimension, the routed experts first (see the module doc)."""
    if not d.enabled:
        return model
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    m = meshes(parallel, d)
    if m.tensor is not None:
        _split_tensor(model, m, d)
    if m.expert is not None:
        _shard_experts(model, m, d)

    inner = model.model
    blocks = list(inner.layers)
    mtp = getattr(inner, "mtp", None)
    if mtp is not None:
        blocks.extend(mtp.layers)
    for block in [*blocks, model]:
        fully_shard(block, mesh=m.dense)
        if m.tensor is not None:
            _divide_by_world(block, m, d)
        # MTP blocks are entered through `predict`, not `forward`; FSDP must gather their weights there too.
        for method in _ENTRY_METHODS if block is not model else ():
            if callable(getattr(block, method, None)):
                register_fsdp_forward_method(block, method)
    return model


def _split_tensor(model: nn.Module, m: Meshes, d: Dist) -> None:
    """Tensor parallelism over `m.tensor` (lmspec.train.tensor_parallel), before FSDP2 wraps the DTensor
    weights; `d` learns which ranks share rows."""
    from lmspec.train import tensor_parallel

    assert m.tensor is not None and m.batch is not None
    d.tensor, d.batch_group = m.tensor.size(), m.batch.get_group()
    tensor_parallel.parallelize(model, m.tensor)
    # A block's output is now the local view of a DTensor, which FSDP2 warns about because an in-place op
    # on it would skip its backward hook; the generated blocks and the ops never write their inputs.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(.*\) returned a view tensor")


def _divide_by_world(module: nn.Module, m: Meshes, d: Dist) -> None:
    """Make FSDP2 divide `module`'s summed gradients by the world size, as it does the experts'.

    The trainer scales each rank's loss by world_size (x its share of the batch) for FSDP's average; with
    tensor parallelism FSDP's group is world / tensor ranks, and the tensor ranks of a group hold the same
    rows, so its default average would leave every gradient `tensor` times the global mean.
    """
    assert m.dense is not None
    module.set_gradient_divide_factor(float(d.world_size))
    if m.dense.size(m.dense.ndim - 1) > 1:
        # A plain sum and one division afterwards: gloo has no pre-multiplied sum. (On one shard rank
        # FSDP divides while copying, and forcing the sum there would divide twice.)
        module.set_force_sum_reduction_for_comms(True)


def _copies(t: torch.Tensor, world_size: int) -> int:
    """How many ranks hold each element of `t`'s local part: the world over the ranks it is sharded by."""
    placements = getattr(t, "placements", None)
    if placements is None:  # a plain tensor is whole on every rank
        return world_size
    mesh_ = t.device_mesh
    split = 1
    for dim, placement in enumerate(placements):
        # Anything but Replicate splits: Shard, and FSDP's _StridedShard over an expert-sharded tensor,
        # which is no Shard subclass. (A reduced gradient is never Partial.)
        if not placement.is_replicate():
            split *= mesh_.size(dim)
    return world_size // split


@torch.no_grad()
def clip_grad_norm(model: nn.Module, max_norm: float, d: Dist) -> torch.Tensor:
    """`nn.utils.clip_grad_norm_` (L2) over parameters sharded on different meshes; returns the total norm.

    One process uses torch's own. Under FSDP and expert parallelism the gradients are DTensors on
    different meshes (the experts' and the dense weights'), which torch's cannot mix; here each rank sums
    the squares of its local parts, each divided by how many ranks hold the same part, and one all-reduce
    over all ranks gives the global sum. The scale is then torch's: max_norm / (norm + 1e-6), at most 1.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    if not d.enabled:
        return nn.utils.clip_grad_norm_(params, max_norm)
    total = torch.zeros((), dtype=torch.float64, device=d.device)
    for p in params:
        g = p.grad
        local = g.to_local() if hasattr(g, "to_local") else g
        total += local.detach().double().pow(2).sum() / _copies(g, d.world_size)
    dist.all_reduce(total)
    norm = total.sqrt().float()
    scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for p in params:
        g = p.grad
        (g.to_local() if hasattr(g, "to_local") else g).mul_(scale.to(g.dtype))
    return norm


def describe_experts(model: nn.Module, d: Dist) -> list[str]:
    """What each rank holds of the split weights, as the trainer logs it: `_expert_lines`, then
    `describe_tensor`'s lines. A collective: every rank calls it."""
    return _expert_lines(model, d) + describe_tensor(model, d)


def _expert_lines(model: nn.Module, d: Dist) -> list[str]:
    """One line per rank: which routed experts it holds and the shape of its share of the first MoE layer's
    `gate_up_proj` (empty without expert parallelism)."""
    layers = _moe_experts(model)
    if not d.enabled or not layers or not hasattr(layers[0].gate_up_proj, "placements"):
        return []
    if d.tensor > 1 and "expert_parallel" not in model.ops.name:
        # Whole experts on every rank: FSDP2's shards of them are not an expert split.
        return []
    w = layers[0].gate_up_proj
    spmd = w.device_mesh
    names = spmd.mesh_dim_names or ()
    expert_dim = names.index("expert") if "expert" in names else spmd.ndim - 1
    ranks, me = spmd.size(expert_dim), spmd.get_local_rank(expert_dim)
    n = w.shape[0] // ranks
    mine = (
        f"rank {d.rank}: experts {me * n}-{(me + 1) * n - 1} of {w.shape[0]} in each of {len(layers)} MoE layers "
        f"(expert rank {me} of {ranks}); gate_up_proj local {tuple(w.to_local().shape)} of {tuple(w.shape)}"
    )
    lines: list[Any] = [None] * d.world_size
    dist.all_gather_object(lines, mine)
    return lines


def describe_tensor(model: nn.Module, d: Dist) -> list[str]:
    """One line per rank: its tensor rank and the local shape of the first weight of each tensor-parallel
    style, as FSDP2 also shards it (empty without tensor parallelism). A collective: every rank calls it."""
    if not d.enabled or d.tensor == 1:
        return []
    from lmspec.train import tensor_parallel

    mine = f"{tensor_parallel.describe(model, d.rank)} (tensor rank {d.rank % d.tensor} of {d.tensor})"
    lines: list[Any] = [None] * d.world_size
    dist.all_gather_object(lines, mine)
    return lines


def shutdown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
