"""Training step: lmspec's generated model vs transformers' MiMoV2FlashForCausalLM on the same weights.

One training step = forward with labels + backward + AdamW step, on the same batch, in one process, the
models alternating step by step so that machine noise hits them alike; each figure is a ratio from one run.
transformers' model has no MTP blocks, so the like-for-like row is lmspec with `model.mtp.num_blocks=0`,
loaded with the very weights of the transformers model (its state dict, in transformers' layout); rows with
1 and 3 MTP blocks measure what the blocks add. Three configs (`CONFIGS`): the tiny spec, a wider one
(d=512, 16 experts) and a deeper one (12 layers). Transformers cannot express the tiny spec's equal
sliding/global KV heads, so every config sets sliding KV heads to twice the global ones (as MiMo-V2-Flash
does), which both implementations share.

Per config it also reports: `torch.profiler` attribution of one step of each model (share of self time in
GEMMs, matmul and op counts); with `--compile`, the compiled step (`training.compile`) and its compile
time; with `--memory`, step time and peak memory (torch's MemTracker: parameters, gradients, optimizer
state and live activations) for each `activation_checkpointing` mode.

    python benchmarks/train_throughput.py [--configs tiny wide deep] [--batch 8] [--seq 256] [--threads 2]
        [--steps 6] [--compile [CONFIG ...]] [--memory] [--out benchmarks/results/train_throughput.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

# Defaults point into the repository, from any working directory.
ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "mimo_v2_flash_tiny.yaml"

# Each config: --set overrides on the tiny spec, and the MTP block counts timed beside K = 0.
_SWA_KV = ["model.attention.swa.num_kv_heads=4"]  # 2 x global, so transformers builds the same model
CONFIGS: dict[str, tuple[list[str], tuple[int, ...]]] = {
    "tiny": (_SWA_KV, (1, 3)),
    "wide": (
        [
            "model.hidden_size=512",
            *(
                f"model.attention.{k}.{f}"
                for k in ("global", "swa")
                for f in ("num_heads=8", "qk_head_dim=64")
            ),
            "model.attention.global.num_kv_heads=2",
            "model.attention.swa.num_kv_heads=4",
            "model.attention.global.v_head_dim=64",
            "model.attention.swa.v_head_dim=64",
            "model.ffn.dense.intermediate_size=1536",
            "model.ffn.moe.num_experts=16",
            "model.ffn.moe.expert_intermediate_size=256",
        ],
        (),
    ),
    "deep": ([*_SWA_KV, "model.layers=G0 (S*2 G)*3 S*2"], ()),
}

# What the profiler counts as a GEMM: the dense matmul kernels (nn.Linear lowers to addmm/mm; the CPU
# backend's grouped expert GEMM calls mm once per expert). Attention kernels are reported apart.
GEMM_OPS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm"})
ATTENTION_OPS = frozenset(
    {
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
    }
)


def _spec(overrides: list[str], mtp_blocks: int):
    from lmspec.spec import load_spec

    depth = min(mtp_blocks, 3)
    return load_spec(
        TINY, [*overrides, f"model.mtp.num_blocks={mtp_blocks}", f"serving.speculative_depth={depth}"]
    )


def build_models(overrides: list[str], mtp: tuple[int, ...]) -> dict[str, tuple[torch.nn.Module, bool]]:
    """transformers' model and lmspec's on its weights, plus lmspec with each MTP block count."""
    from transformers import MiMoV2FlashConfig, MiMoV2FlashForCausalLM

    import lmspec
    from lmspec.codegen.hf import spec_to_config

    spec = _spec(overrides, 0)
    config = {k: v for k, v in spec_to_config(spec).items() if k not in ("architectures", "model_type")}
    if config.pop("lmspec_unsupported_by_transformers", None):
        raise SystemExit(
            "the benchmark config is not expressible in transformers: the comparison would be unfair"
        )
    hf_config = MiMoV2FlashConfig(**config)
    hf_config._attn_implementation = "eager"  # the only one transformers supports for this model (sinks)
    torch.manual_seed(0)
    hf = MiMoV2FlashForCausalLM(hf_config).train()
    ours = lmspec.build(spec).train()
    ours.load_state_dict(hf.state_dict(), strict=True)  # the same weights, in transformers' layout
    models = {"transformers": (hf, True), "lmspec": (ours, False)}
    for k in mtp:
        with_mtp = lmspec.build(_spec(overrides, k)).train()
        with_mtp.load_state_dict(hf.state_dict(), strict=False)  # the trunk's weights; MTP blocks fresh
        models[f"lmspec + {k} MTP"] = (with_mtp, False)
    return models


def step_fn(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, hf: bool, forward=None
) -> Callable[[], tuple[float, float]]:
    """One timed training step of ``model``; ``forward`` replaces lmspec's forward + loss (the compiled one)."""
    from lmspec.train.trainer import forward_loss

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    forward = forward or forward_loss
    mtp_weight = 0.3

    def step() -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        if hf:
            # transformers shifts labels itself: give it the unshifted sequence.
            loss = model(input_ids=x, labels=torch.cat([x[:, :1], y], dim=1)[:, :-1]).loss
        else:
            loss = forward(model, x, y, {}, mtp_weight, 1e-5)[0].total
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, time.process_time() - c0

    return step


def interleaved(
    steps: dict[str, Callable[[], tuple[float, float]]], n: int, warmup: int = 2
) -> dict[str, list[tuple[float, float]]]:
    """(wall, process CPU) seconds of every model's steps, one step each in turn, ``warmup`` rounds discarded."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in steps}
    for i in range(n + warmup):
        for name, step in steps.items():
            t = step()
            if i >= warmup:
                times[name].append(t)
    return times


def profile_step(step: Callable[[], float]) -> dict[str, float]:
    """Share of one step's self CPU time in GEMMs and in attention kernels; matmul and op call counts."""
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    gemm = sum(e.self_cpu_time_total for e in events if e.key in GEMM_OPS)
    attn = sum(e.self_cpu_time_total for e in events if e.key in ATTENTION_OPS)
    aten = [e for e in events if e.key.startswith("aten::")]
    return {
        "gemm_share": gemm / total,
        "attention_share": attn / total,
        "matmul_calls": sum(e.count for e in events if e.key in GEMM_OPS),
        "aten_calls": sum(e.count for e in aten),
    }


def peak_memory(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Peak MiB of one training step by category (torch.distributed._tools.mem_tracker.MemTracker)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from lmspec.train.trainer import forward_loss

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for _ in range(2):  # the second step has optimizer state, as every later one
        tracker = MemTracker()
        tracker.track_external(model, opt)
        with tracker:
            forward_loss(model, x, y, {}, 0.3, 1e-5)[0].total.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    peak = tracker.get_tracker_snapshot("peak")
    by_device = next(iter(peak.values()))
    return {str(k).split(".")[-1].lower(): v / 2**20 for k, v in by_device.items()}


def summarize(times: dict[str, list[tuple[float, float]]], tokens: int) -> dict[str, dict[str, float]]:
    """Median and best wall time and median CPU time per model, each also as a ratio to transformers'.

    On a shared machine the median moves with the load; the best step (least disturbed) and the process
    CPU time (not counting time the process waited for a core) move much less: all three are kept.
    """
    stats = {
        name: {
            "median_step_s": statistics.median(w for w, _ in ts),
            "best_step_s": min(w for w, _ in ts),
            "median_cpu_s": statistics.median(c for _, c in ts),
            "steps": len(ts),
        }
        for name, ts in times.items()
    }
    rows = {}
    for name, row in stats.items():
        rows[name] = {**row, "tokens_per_s": tokens / row["median_step_s"]}
        if "transformers" in stats:
            base = stats["transformers"]
            rows[name]["vs_transformers"] = base["median_step_s"] / row["median_step_s"]
            rows[name]["vs_transformers_best"] = base["best_step_s"] / row["best_step_s"]
            rows[name]["vs_transformers_cpu"] = base["median_cpu_s"] / row["median_cpu_s"]
    return rows


def run_config(name: str, args: argparse.Namespace) -> dict:
    from lmspec.runtime.model_base import CompiledStep
    from lmspec.train.trainer import forward_loss

    overrides, mtp = CONFIGS[name]
    models = build_models(overrides, mtp)
    vocab = models["lmspec"][0].lm_head.weight.shape[0]
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, vocab, (args.batch, args.seq + 1), generator=g)
    inputs, labels = x[:, :-1].contiguous(), x[:, 1:].contiguous()
    steps = {n: step_fn(m, inputs, labels, hf) for n, (m, hf) in models.items()}
    result: dict = {"overrides": overrides}
    if args.compile is not None and (not args.compile or name in args.compile):
        import copy

        compiled = CompiledStep(forward_loss)
        model = copy.deepcopy(models["lmspec"][0])
        steps["lmspec compiled"] = step_fn(model, inputs, labels, False, compiled)
        steps["lmspec compiled"]()  # compiles (forward and backward graphs)
        result["compile_s"] = compiled.compile_s
    times = interleaved(steps, args.steps)
    result["rows"] = summarize(times, args.batch * args.seq)
    result["profile"] = {n: profile_step(steps[n]) for n in ("transformers", "lmspec")}
    if args.memory:
        result["activation_checkpointing"] = checkpointing_rows(models["lmspec"][0], inputs, labels, args)
    return result


def checkpointing_rows(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, args) -> dict:
    """Step time (interleaved) and peak memory of each activation_checkpointing mode."""
    import copy

    modes = ("none", "full", "selective")
    copies = {m: copy.deepcopy(model) for m in modes}
    for mode, m in copies.items():
        m.set_activation_checkpointing(mode)
    times = interleaved({mode: step_fn(m, x, y, False) for mode, m in copies.items()}, args.steps)
    rows = summarize(times, x.numel())
    for mode in modes:
        rows[mode]["peak_mib"] = peak_memory(copies[mode], x, y)
    return rows


def machine() -> dict:
    return {
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_average_at_start": os.getloadavg()[0],
    }


def print_config(name: str, r: dict, tokens: int) -> None:
    print(f"\n[{name}] {' '.join(r['overrides']) or 'tiny spec'}; {tokens} tokens per step")
    print(f"{'model':<22}{'median ms':>10}{'best ms':>9}{'cpu ms':>9}  vs transformers: median / best / cpu")
    for model, row in r["rows"].items():
        ratios = " / ".join(
            f"{row[k]:.2f}x" for k in ("vs_transformers", "vs_transformers_best", "vs_transformers_cpu")
        )
        print(
            f"{model:<22}{row['median_step_s'] * 1e3:>10.1f}{row['best_step_s'] * 1e3:>9.1f}"
            f"{row['median_cpu_s'] * 1e3:>9.1f}  {ratios}"
        )
    for model, p in r["profile"].items():
        print(
            f"  profile {model:<13} GEMM {p['gemm_share']:.0%} of self time, attention {p['attention_share']:.0%}, "
            f"{p['matmul_calls']} matmuls, {p['aten_calls']} aten calls"
        )
    if "compile_s" in r:
        print(f"  compile: {r['compile_s']:.1f} s")
    for mode, row in r.get("activation_checkpointing", {}).items():
        mem = row["peak_mib"]
        print(
            f"  activation_checkpointing {mode:<9} step {row['median_step_s'] * 1e3:8.1f} ms  peak {mem['total']:7.1f} MiB "
            f"(activations {mem.get('act', 0.0):.1f}, temporaries {mem.get('temp', 0.0):.1f})"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per model (after 2 warm-up steps)")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads for every model")
    ap.add_argument(
        "--compile",
        nargs="*",
        default=None,
        metavar="CONFIG",
        help="also time the compiled step (all configs, or these)",
    )
    ap.add_argument("--memory", action="store_true", help="also time and measure activation checkpointing")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_throughput.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result = {"batch": args.batch, "seq_len": args.seq, "steps": args.steps, **machine(), "configs": {}}
    for name in args.configs:
        result["configs"][name] = run_config(name, args)
        print_config(name, result["configs"][name], args.batch * args.seq)
    result["load_average_at_end"] = os.getloadavg()[0]
    result["when"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
