"""Tensor parallelism: attention heads, FFN widths and the vocabulary split over a 1-D tensor mesh.

The split is torch's own: DTensor `parallelize_module` with `ColwiseParallel` / `RowwiseParallel`, and
`loss_parallel` for the vocab-parallel cross-entropy. What is split comes from the generated model: every
class the compiler emits for an attention kind, a SwiGLU FFN or the LM head carries a `TENSOR_PLAN`
(attribute -> how it is split), which codegen renders from the compiled plan (`AttentionPlan.tensor_plan`
and friends), so a model with other layer kinds gets its own plan without any per-model table here:

- `colwise`: a linear's output features (q/k/v projections, by whole heads; gate/up, by width); the rank
  keeps its columns and its output stays local;
- `rowwise`: a linear's input features (o_proj, down_proj); the partial outputs are all-reduced, so the
  residual stream is whole (replicated) on every tensor rank;
- `heads`: a per-head parameter (the learnable sinks) split with its heads as a DTensor `Shard(0)`; the
  generated code reads its local part (`local_shard`), and each attention module's `num_heads` /
  `num_kv_heads` become this rank's share;
- `vocab`: the LM head's rows. Training never builds whole logits: the fused `lm_head_ce` op becomes
  `vocab_parallel_ce`, each rank's (N, V / T) logits under `loss_parallel`. A plain forward (logits
  wanted) all-gathers them.

Everything else (embedding, norms, routers, the routed experts, `eh_proj`) is whole on every tensor rank and
computed alike there; the tensor ranks of a group read the same rows (`Dist.rows`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh

from lmspec.compiler.plan import COLWISE, HEADS, ROWWISE, VOCAB
from lmspec.runtime.ops.base import WrappedBackend
from lmspec.runtime.ops.reference import _compute_dtype
from lmspec.runtime.parallel import tensor_plan

__all__ = ["TensorParallelBackend", "describe", "parallelize", "vocab_parallel_ce"]


def _styles(plan: dict[str, str]) -> dict[str, Any]:
    """The `parallelize_module` plan of the linear layers."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    styles: dict[str, Any] = {}
    for fqn, style in plan.items():
        if style == COLWISE:
            styles[fqn] = ColwiseParallel()
        elif style == ROWWISE:
            styles[fqn] = RowwiseParallel()
        elif style == VOCAB:
            # Weight rows split by vocabulary; a forward that returns logits gathers them whole.
            styles[fqn] = ColwiseParallel(output_layouts=Replicate())
        elif style != HEADS:
            raise ValueError(f"{fqn}: unknown tensor-parallel style {style!r}")
    return styles


def _split_heads(model: nn.Module, fqn: str, mesh: DeviceMesh) -> None:
    """Replace the per-head parameter `fqn` by a DTensor `Shard(0)`: rank t keeps the entries of its heads."""
    from torch.distributed.tensor import Shard, distribute_tensor

    owner_name, _, attr = fqn.rpartition(".")
    owner = model.get_submodule(owner_name)
    p = getattr(owner, attr)
    dt = distribute_tensor(p.detach(), mesh, [Shard(0)])
    setattr(owner, attr, nn.Parameter(dt, requires_grad=p.requires_grad))


def _divide_heads(model: nn.Module, ranks: int) -> None:
    """Each attention module's head counts become this rank's share of them (the schema checked that
    `tensor` divides every kind's `num_heads` and `num_kv_heads`)."""
    for module in model.modules():
        if tensor_plan(module, recurse=False).get("q_proj") == COLWISE and hasattr(module, "num_heads"):
            module.num_heads //= ranks
            module.num_kv_heads //= ranks


def parallelize(model: nn.Module, mesh: DeviceMesh) -> dict[str, str]:
    """Split `model` over the 1-D tensor mesh by its `tensor_plan` (see the module doc); returns the plan.
    Every rank built the same full weights (same seed), so each keeps its own part."""
    from torch.distributed.tensor.parallel import parallelize_module

    plan = tensor_plan(model)
    for fqn, style in plan.items():
        if style == HEADS:
            _split_heads(model, fqn, mesh)
    parallelize_module(model, mesh, _styles(plan))
    _divide_heads(model, mesh.size())
    model.ops = TensorParallelBackend(model.ops)
    model._share_ops()
    return plan


def _sum_ce(hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
    """Mean CE of `hidden @ weight.T` over labels != ignore_index (0 when none), `weight` split by vocabulary
    rows: this rank's (N, V / T) logits, and `loss_parallel`'s log-softmax and NLL across the tensor ranks."""
    from torch.distributed.tensor import DTensor, Replicate
    from torch.distributed.tensor.parallel import loss_parallel

    mesh = weight.device_mesh
    x = DTensor.from_local(hidden, mesh, [Replicate()], run_check=False)
    target = DTensor.from_local(labels, mesh, [Replicate()], run_check=False)
    cdt = _compute_dtype(hidden.dtype)  # as the fused op: fp32 logits and log-sum-exp for 16-bit inputs
    logits = F.linear(x.to(cdt), weight.to(cdt))  # (N, V) as Shard(-1): the local (N, V / T)
    with loss_parallel():
        # A sum and the division here: `mean` would be NaN where every label is ignored.
        total = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")
    count = (labels != ignore_index).sum().clamp_min(1).to(cdt)
    return (total.to_local() / count).to(hidden.dtype)


class _VocabParallelCE(torch.autograd.Function):
    """`_sum_ce` whose backward also runs under `loss_parallel` (its custom log-softmax and NLL backward
    only exist inside that context): the forward keeps its own small graph, the backward differentiates it
    there, so the trainer's plain `loss.backward()` needs no context of its own."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index):  # type: ignore[override]
        with torch.enable_grad():
            h = hidden.detach().requires_grad_(hidden.requires_grad)
            w = weight.detach().requires_grad_(weight.requires_grad)
            loss = _sum_ce(h, w, labels, ignore_index)
        ctx.graph = (h, w, loss)
        return loss.detach()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        from torch.distributed.tensor.parallel import loss_parallel

        h, w, loss = ctx.graph
        del ctx.graph
        wanted = [t for t in (h, w) if t.requires_grad]
        with loss_parallel():
            grads = iter(torch.autograd.grad(loss, wanted, grad))
        gh = next(grads) if h.requires_grad else None
        gw = next(grads) if w.requires_grad else None
        return gh, gw, None, None


def vocab_parallel_ce(hidden: Tensor, weight: Tensor, labels: Tensor, *, ignore_index: int = -100) -> Tensor:
    """`lm_head_ce` with the LM head split by vocabulary over a 1-D mesh (a DTensor `Shard(0)` weight):
    hidden (N, H) and labels (N,) whole on every rank -> the mean CE, the same on every rank."""
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _VocabParallelCE.apply(hidden, weight, labels, ignore_index)
    return _sum_ce(hidden, weight, labels, ignore_index)


def _is_vocab_split(weight: Tensor) -> bool:
    from torch.distributed.tensor import DTensor, Shard

    return isinstance(weight, DTensor) and weight.device_mesh.ndim == 1 and weight.placements == (Shard(0),)


class TensorParallelBackend(WrappedBackend):
    """`base` for every op; `lm_head_ce` with a vocabulary-split head is `vocab_parallel_ce`."""

    wraps = ("lm_head_ce",)
    label = "tensor_parallel"

    def lm_head_ce(self, hidden: Tensor, weight: Tensor, labels: Tensor, **kwargs: Any) -> Tensor:
        if not _is_vocab_split(weight):
            return self.base.lm_head_ce(hidden, weight, labels, **kwargs)
        return vocab_parallel_ce(hidden, weight, labels, ignore_index=kwargs.get("ignore_index", -100))


def describe(model: nn.Module, rank: int) -> str:
    """This rank's share of the first weight of each tensor-parallel style: `name local (..) of (..)`."""
    seen: dict[str, str] = {}
    for fqn, style in tensor_plan(model).items():
        if style in seen:
            continue
        owner, _, attr = fqn.rpartition(".")
        p = getattr(model.get_submodule(owner) if owner else model, attr)
        w = p.weight if isinstance(p, nn.Module) else p
        local = w.to_local() if hasattr(w, "to_local") else w
        seen[style] = f"{fqn} {style} local {tuple(local.shape)} of {tuple(w.shape)}"
    return f"rank {rank}: tensor " + "; ".join(seen.values())
