"""What generated models call to run under torch.distributed's tensor parallelism."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["local_shard", "tensor_plan"]


def tensor_plan(model: nn.Module, *, recurse: bool = True) -> dict[str, str]:
    """Every weight tensor parallelism splits, by qualified name -> how (`colwise`, `rowwise`, `heads`,
    `vocab`; see lmspec.train.tensor_parallel), in module order.

    The generated classes carry it as `TENSOR_PLAN`, rendered from the compiled plan, so it names the
    projections of the layers that have each attention and FFN kind, whatever the model's layout.
    """
    modules = model.named_modules() if recurse else [("", model)]
    plan: dict[str, str] = {}
    for name, module in modules:
        cls = type(module)
        for attr, style in (cls.TENSOR_PLAN if hasattr(cls, "TENSOR_PLAN") else {}).items():
            plan[f"{name}.{attr}" if name else attr] = style
    return plan


def local_shard(t: Tensor) -> Tensor:
    """This rank's part of a parameter the ops read directly (an attention kind's sinks).

    Under tensor parallelism that parameter is a DTensor split with its heads, whose local part matches the
    rank's local query heads; otherwise it is `t` itself. `to_local` is differentiable, so the gradient
    lands on the shard.
    """
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t
