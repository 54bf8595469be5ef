"""Op-level fusion on torch.fx graphs: the same units as the IR's fusion pass, on traced PyTorch code.

The IR pass decides *which* units a spec uses; this module shows the rewrite where op-level
rewriting pays: a decoder block written as plain tensor math (a residual add, then RMSNorm as
pow/mean/rsqrt/mul, then `silu(gate) * up`) is traced with `torch.fx`, and
`torch.fx.subgraph_rewriter.replace_pattern` swaps each matched subgraph for one call to a fused
op. The fused ops default to the plain PyTorch functions below; a caller may pass kernels with the
runtime backend's signatures (`add_rmsnorm(x, residual, weight, eps) -> (normed, sum)`,
`swiglu(gate, up)`) through `impls`.

torch is imported inside the functions, so importing the compiler never imports torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Fn = Callable[..., Any]


def _rmsnorm(h: Any, weight: Any, eps: float) -> Any:
    import torch

    return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps))


def add_rmsnorm(x: Any, residual: Any, weight: Any, eps: float) -> tuple[Any, Any]:
    """Fused residual add + RMSNorm: returns (rmsnorm(x + residual), x + residual)."""
    h = x + residual
    return _rmsnorm(h, weight, eps), h


def swiglu(gate: Any, up: Any) -> Any:
    """Fused silu(gate) * up."""
    import torch.nn.functional as F

    return F.silu(gate) * up


def reference_block(eps: float, layers: int = 1) -> Fn:
    """A decoder block's residual/FFN half in plain tensor math, repeated `layers` times.

    Per layer: h = x + residual; n = RMSNorm(h); x = down(silu(gate(n)) * up(n)); residual = h.
    Returns f(x, residual, norm_weight, gate_weight, up_weight, down_weight) -> x + residual.
    """

    def block(x, residual, norm_weight, gate_weight, up_weight, down_weight):
        import torch.nn.functional as F

        for _ in range(layers):
            h = x + residual
            n = norm_weight * (h * (h.pow(2).mean(-1, keepdim=True) + eps).rsqrt())
            x = F.linear(F.silu(F.linear(n, gate_weight)) * F.linear(n, up_weight), down_weight)
            residual = h
        return x + residual

    return block


def _call_graph(fn: Fn, n_inputs: int, extra: tuple[Any, ...], n_outputs: int) -> Any:
    """A GraphModule that is one call_function node `fn(*inputs, *extra)` (its outputs unpacked)."""
    import operator

    import torch
    from torch import fx

    graph = fx.Graph()
    args = [graph.placeholder(f"arg{i}") for i in range(n_inputs)]
    call = graph.call_function(fn, (*args, *extra))
    if n_outputs == 1:
        graph.output(call)
    else:
        graph.output(tuple(graph.call_function(operator.getitem, (call, i)) for i in range(n_outputs)))
    return fx.GraphModule(torch.nn.Module(), graph)


def _patterns(eps: float, impls: dict[str, Fn]) -> list[tuple[str, Fn, Any]]:
    """(unit, pattern in plain tensor math, replacement GraphModule calling the fused op once)."""
    import torch.nn.functional as F

    def add_rmsnorm_pattern(x, residual, weight):
        h = x + residual
        return weight * (h * (h.pow(2).mean(-1, keepdim=True) + eps).rsqrt()), h

    def swiglu_pattern(gate, up):
        return F.silu(gate) * up

    return [
        ("add_rmsnorm", add_rmsnorm_pattern, _call_graph(impls["add_rmsnorm"], 3, (eps,), 2)),
        ("swiglu", swiglu_pattern, _call_graph(impls["swiglu"], 2, (), 1)),
    ]


def trace(fn: Fn) -> Any:
    """Symbolically trace a function of tensors into a GraphModule."""
    import torch
    from torch import fx

    return fx.GraphModule(torch.nn.Module(), fx.Tracer().trace(fn))


def fuse(gm: Any, eps: float, impls: dict[str, Fn] | None = None) -> dict[str, int]:
    """Rewrite `gm` in place: residual add + RMSNorm -> add_rmsnorm, silu(gate) * up -> swiglu.

    `eps` must be the RMSNorm epsilon written in the traced code (patterns match constants exactly).
    Returns the number of matches replaced per unit.
    """
    from torch.fx import subgraph_rewriter

    impls = {"add_rmsnorm": add_rmsnorm, "swiglu": swiglu, **(impls or {})}
    counts = {}
    for unit, pattern, replacement in _patterns(eps, impls):
        counts[unit] = len(subgraph_rewriter.replace_pattern(gm, pattern, replacement))
    gm.graph.lint()
    gm.recompile()
    return counts


def node_count(gm: Any) -> int:
    """Compute nodes of a GraphModule (placeholders and the output excluded)."""
    return sum(n.op not in ("placeholder", "output") for n in gm.graph.nodes)
