"""Expert parallelism: routed experts split over the ranks of an expert group, tokens moved by all-to-all.

Each rank of a group of P ranks holds E / P whole experts, rank r the contiguous block
``[r * E/P, (r + 1) * E/P)``, as a DTensor ``Shard(0)`` of ``gate_up_proj`` (E, 2I, H) and ``down_proj``
(E, H, I) on a 1-D expert mesh. ``moe_experts`` then runs, for a rank's N tokens:

1. the sort by expert of the grouped GEMM (``cpu.expert_offsets``): the N*k (token, slot) assignments in
   expert order, which is also the order of the ranks holding them;
2. dispatch: the per-expert counts are exchanged (``all_to_all_single`` of an (E,) tensor), then the sorted
   hidden states with variable splits, so each rank receives the rows of its own experts, grouped by
   source rank and, within a source, by expert;
3. the local experts on the received rows: the base backend's own ``moe_experts`` with k = 1 and weight 1,
   whose stable sort by local expert regroups the rows (source, expert) -> (expert, source);
4. combine: the reverse ``all_to_all_single``, the un-permute, and the fp32 weighted sum over the k slots
   of the single-process op (``cpu._sum_slots``), rounded once to the input dtype.

Both all-to-alls are c10d's ``all_to_all_single`` inside a small autograd function (``_AllToAll``): its
backward is the same exchange with the splits swapped, which sends each gradient row back where its row
came from, so the expert weights' gradients are sums over the group's tokens and every rank's input gets its
own rows' gradients.

The split sizes are read on the host (one sync per MoE layer and direction): all-to-all with variable
splits needs them before it starts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from lmspec.runtime.ops.base import WrappedBackend
from lmspec.runtime.ops.cpu import _sum_slots, expert_offsets
from lmspec.runtime.ops.reference import _compute_dtype

__all__ = ["ExpertParallelBackend", "all_to_all", "dispatch_combine", "is_expert_sharded"]


class _AllToAll(torch.autograd.Function):
    """``dist.all_to_all_single`` with variable splits, differentiable: x (sum(in_splits), ...) ->
    (sum(out_splits), ...); the backward is the reverse exchange (itself differentiable)."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):  # type: ignore[override]
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        out_splits, in_splits = ctx.splits
        return _AllToAll.apply(grad.contiguous(), in_splits, out_splits, ctx.group), None, None, None


def all_to_all(x: Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup) -> Tensor:
    """Rows ``x[in_splits[r] block]`` go to rank r; the result holds ``out_splits[s]`` rows from each rank s."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


def is_expert_sharded(weight: Tensor) -> bool:
    """Whether ``weight`` is a DTensor split by whole experts over a 1-D mesh (the expert group)."""
    from torch.distributed.tensor import DTensor, Shard

    return (
        isinstance(weight, DTensor)
        and weight.device_mesh.ndim == 1
        and len(weight.placements) == 1
        and weight.placements[0] == Shard(0)
    )


def dispatch_combine(
    local_moe_experts,  # noqa: ANN001 - a backend's moe_experts (reference signature)
    x: Tensor,
    topk_weights: Tensor,
    topk_indices: Tensor,
    gate_up_local: Tensor,
    down_local: Tensor,
    group: dist.ProcessGroup,
) -> Tensor:
    """``moe_experts`` over an expert group: x (N, H), topk (N, k) over all E experts, this rank's
    gate_up_local (E/P, 2I, H) and down_local (E/P, H, I) -> (N, H), as one process with all E experts."""
    N, H = x.shape
    k = topk_indices.shape[1]
    ranks = dist.get_world_size(group)
    local = gate_up_local.shape[0]
    order, token_of, inverse, offsets = expert_offsets(topk_indices, ranks * local)
    counts = torch.diff(offsets.to(torch.int64), prepend=offsets.new_zeros(1, dtype=torch.int64))  # (E,)
    # Counts travel as one (E,) all-to-all: rank s sends rank r the counts of r's experts among its tokens.
    recv_counts = torch.empty_like(counts)
    dist.all_to_all_single(recv_counts, counts, group=group)
    send_splits = counts.view(ranks, local).sum(1).tolist()
    recv_splits = recv_counts.view(ranks, local).sum(1).tolist()
    x_sorted = x.index_select(0, token_of)  # (N*k, H) in expert order = destination-rank order
    x_recv = all_to_all(x_sorted, recv_splits, send_splits, group)
    # Each received row's local expert: the counts are (source, local expert) blocks in arrival order.
    ids = torch.arange(local, device=x.device).repeat(ranks)
    local_ids = ids.repeat_interleave(recv_counts.to(x.device), output_size=x_recv.shape[0])
    ones = torch.ones(x_recv.shape[0], 1, dtype=topk_weights.dtype, device=x.device)
    y_recv = local_moe_experts(x_recv, ones, local_ids[:, None], gate_up_local, down_local)  # (M, H)
    y_sorted = all_to_all(y_recv, send_splits, recv_splits, group)  # (N*k, H)
    y = y_sorted.index_select(0, inverse).view(N, k, H)  # back in (token, slot) order
    cdt = _compute_dtype(x.dtype)
    return _sum_slots(y.to(cdt), topk_weights.to(cdt)).to(x.dtype)


class ExpertParallelBackend(WrappedBackend):
    """``base`` for every op; ``moe_experts`` with expert-sharded weights dispatches over their mesh."""

    wraps = ("moe_experts",)
    label = "expert_parallel"

    def moe_experts(
        self, x: Tensor, topk_weights: Tensor, topk_indices: Tensor, gate_up_proj: Tensor, down_proj: Tensor
    ) -> Tensor:
        if not is_expert_sharded(gate_up_proj):
            return self.base.moe_experts(x, topk_weights, topk_indices, gate_up_proj, down_proj)
        group = gate_up_proj.device_mesh.get_group()
        return dispatch_combine(
            self.base.moe_experts,
            x,
            topk_weights,
            topk_indices,
            gate_up_proj.to_local(),
            down_proj.to_local(),
            group,
        )
