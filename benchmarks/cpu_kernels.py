"""CPU op benchmark: each fast path of the CPU backend against the plain reference, forward + backward.

The ops of one training step at the benchmark configs' sizes (benchmarks/train_throughput.py): grouped-GEMM
MoE experts (tiny: 8 experts, H 128, I 96; wide: 16 experts, H 512, I 256; top-2 over 2048 tokens), sliding
and global attention with a sink, and the LM head + CE. Both implementations run in turn, call by call, and
the table reports median milliseconds and the ratio; the relative error of the fast output against the
reference is printed beside it, so a fast path that is fast because it is wrong shows.

    python benchmarks/cpu_kernels.py [--threads 2] [--repeats 10] [--out benchmarks/results/cpu_kernels.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TOKENS, TOP_K = 2048, 2


def _moe_case(experts: int, hidden: int, inter: int) -> tuple[list[torch.Tensor], dict]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(TOKENS, hidden, generator=g)
    logits = torch.randn(TOKENS, experts, generator=g)
    weights, indices = logits.sigmoid().topk(TOP_K, dim=-1)
    gate_up = torch.randn(experts, 2 * inter, hidden, generator=g) * hidden**-0.5
    down = torch.randn(experts, hidden, inter, generator=g) * inter**-0.5
    return [x, weights, gate_up, down], {"indices": indices}


def _attention_case(window: int | None) -> tuple[list[torch.Tensor], dict]:
    g = torch.Generator().manual_seed(0)
    b, t = 8, 256
    q = torch.randn(b, 4, t, 48, generator=g)
    k = torch.randn(b, 2, t, 48, generator=g)
    v = torch.randn(b, 2, t, 32, generator=g)
    sinks = torch.randn(4, generator=g)
    return [q, k, v, sinks], {"scale": 48**-0.5, "window_keys": window, "value_scale": 0.707}


def cases() -> dict[str, tuple[str, list[torch.Tensor], dict]]:
    """name -> (op, inputs, keywords)."""
    g = torch.Generator().manual_seed(0)
    ce = [torch.randn(TOKENS, 128, generator=g), torch.randn(256, 128, generator=g) * 128**-0.5]
    return {
        "moe_experts tiny (E8 H128 I96)": ("moe_experts", *_moe_case(8, 128, 96)),
        "moe_experts wide (E16 H512 I256)": ("moe_experts", *_moe_case(16, 512, 256)),
        "attention sliding 33 + sink": ("attention", *_attention_case(33)),
        "attention global + sink": ("attention", *_attention_case(None)),
        "lm_head_ce V256 (same op: noise)": (
            "lm_head_ce",
            ce,
            {"labels": torch.randint(0, 256, (TOKENS,), generator=g)},
        ),
    }


def _call(backend, op: str, inputs: list[torch.Tensor], kw: dict) -> torch.Tensor:
    if op == "moe_experts":
        x, w, gu, dp = inputs
        return backend.moe_experts(x, w, kw["indices"], gu, dp)
    if op == "lm_head_ce":
        return backend.lm_head_ce(*inputs, kw["labels"])
    return backend.attention(*inputs, **kw)


def _fwd_bwd(
    backend, op: str, inputs: list[torch.Tensor], kw: dict
) -> Callable[[], tuple[float, torch.Tensor]]:
    leaves = [t.clone().requires_grad_() for t in inputs]
    cot = None

    def run() -> tuple[float, torch.Tensor]:
        nonlocal cot
        t0 = time.perf_counter()
        out = _call(backend, op, leaves, kw)
        cot = torch.ones_like(out) if cot is None else cot
        torch.autograd.grad(out, leaves, cot)
        return time.perf_counter() - t0, out.detach()

    return run


def main() -> None:
    from lmspec.runtime.ops import CPUBackend, ReferenceBackend
    from lmspec.testing.compare import relative_error

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu_kernels.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = {}
    print(
        f"{'op (forward + backward)':<36}{'cpu (ms)':>10}{'reference (ms)':>16}{'speedup':>9}{'rel. error':>12}"
    )
    for name, (op, inputs, kw) in cases().items():
        fast, ref = _fwd_bwd(CPUBackend(), op, inputs, kw), _fwd_bwd(ReferenceBackend(), op, inputs, kw)
        times: dict[str, list[float]] = {"cpu": [], "reference": []}
        outs = {}
        for i in range(args.repeats + 2):
            for label, fn in (("cpu", fast), ("reference", ref)):
                t, outs[label] = fn()
                if i >= 2:
                    times[label].append(t)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        err = relative_error(outs["cpu"], outs["reference"])
        rows[name] = {"cpu_ms": med["cpu"], "reference_ms": med["reference"], "relative_error": err}
        rows[name]["speedup"] = med["reference"] / med["cpu"]
        print(
            f"{name:<36}{med['cpu']:>10.2f}{med['reference']:>16.2f}{rows[name]['speedup']:>8.2f}x{err:>12.1e}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "threads": args.threads,
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "load_average": os.getloadavg()[0],
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rows": rows,
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
