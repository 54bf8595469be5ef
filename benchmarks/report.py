"""Write the benchmark results (benchmarks/results/*.json) into the tables of docs/performance.md.

Each table sits between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` in the page; everything outside the
markers is left as written. A result file that does not exist leaves its table as it was.

    python benchmarks/report.py [--results benchmarks/results] [--doc docs/performance.md]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _machine(r: dict) -> str:
    load = r.get("load_average_at_start", r.get("load_average"))
    end = r.get("load_average_at_end")
    loads = (
        f"load average {load:.1f}" + (f" -> {end:.1f}" if end is not None else "") if load is not None else ""
    )
    return (
        f"{r.get('when', '?')}: {r.get('processor', 'CPU')}, {r.get('cpus', '?')} cores, "
        f"{r.get('threads', '?')} threads, torch {r.get('torch', '?')}, {loads}"
    )


def train_table(r: dict) -> str:
    lines = [
        f"Measured {_machine(r)}; batch {r['batch']} x {r['seq_len']} tokens, fwd + bwd + AdamW, "
        f"models alternating step by step, {r.get('steps', '?')} timed steps each. Speed over transformers "
        "three ways: median wall time, best step (the least disturbed), median process CPU time.",
        "",
        "| config | model | median step (ms) | best (ms) | CPU (ms) | vs transformers: median | best | CPU |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, c in r["configs"].items():
        for model, row in c["rows"].items():
            ratios = [
                f"{row[k]:.2f}x" for k in ("vs_transformers", "vs_transformers_best", "vs_transformers_cpu")
            ]
            lines.append(
                f"| {name} | {model} | {row['median_step_s'] * 1e3:.1f} | {row['best_step_s'] * 1e3:.1f} | "
                f"{row['median_cpu_s'] * 1e3:.1f} | {' | '.join(ratios)} |"
            )
    for name, c in r["configs"].items():
        base = c["rows"]["lmspec"]
        extra = [
            f"{model.removeprefix('lmspec + ')} +{row['median_step_s'] / base['median_step_s'] - 1:.0%} "
            f"(best +{row['best_step_s'] / base['best_step_s'] - 1:.0%}, CPU +{row['median_cpu_s'] / base['median_cpu_s'] - 1:.0%})"
            for model, row in c["rows"].items()
            if model.startswith("lmspec + ")
        ]
        if extra:
            lines += ["", f"MTP blocks on {name}, step time over lmspec without them: {'; '.join(extra)}."]
    lines += [
        "",
        "`torch.profiler`, one step each: share of self CPU time in GEMMs (mm, addmm, bmm) and in the CPU "
        "flash-attention kernels.",
        "",
        "| config | model | GEMM share | attention share | matmul calls | aten calls |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, c in r["configs"].items():
        for model, p in c["profile"].items():
            lines.append(
                f"| {name} | {model} | {p['gemm_share']:.0%} | {p['attention_share']:.0%} | "
                f"{p['matmul_calls']} | {p['aten_calls']} |"
            )
    compiled = {n: c["compile_s"] for n, c in r["configs"].items() if "compile_s" in c}
    if compiled:
        lines += [
            "",
            "Compile time of the compiled step (dynamo + AOT autograd + inductor, forward and backward):",
        ]
        lines += [f"- {n}: {s:.0f} s" for n, s in compiled.items()]
    ac = {
        n: c["activation_checkpointing"] for n, c in r["configs"].items() if "activation_checkpointing" in c
    }
    if ac:
        lines += [
            "",
            "Activation checkpointing (lmspec, no MTP): step time and peak memory of one step (MemTracker).",
            "",
            "| config | mode | median step (ms) | best (ms) | CPU (ms) | peak (MiB) | activations at peak (MiB) |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for name, modes in ac.items():
            for mode, row in modes.items():
                mem = row["peak_mib"]
                lines.append(
                    f"| {name} | {mode} | {row['median_step_s'] * 1e3:.1f} | {row['best_step_s'] * 1e3:.1f} | "
                    f"{row['median_cpu_s'] * 1e3:.1f} | {mem['total']:.1f} | "
                    f"{mem.get('act', 0.0) + mem.get('temp', 0.0):.1f} |"
                )
    return "\n".join(lines)


def kernels_table(r: dict) -> str:
    lines = [
        f"Measured {_machine(r)}; forward + backward, the two alternating call by call, median.",
        "",
        "| op | CPU backend (ms) | reference (ms) | speedup | relative error |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in r["rows"].items():
        lines.append(
            f"| {name} | {row['cpu_ms']:.2f} | {row['reference_ms']:.2f} | {row['speedup']:.2f}x | "
            f"{row['relative_error']:.1e} |"
        )
    return "\n".join(lines)


def decode_table(r: dict) -> str:
    lines = [
        f"Measured {r.get('when', '?')} on {r['checkpoint']}: {r['prompts']} prompts x {r['max_tokens']} tokens, "
        f"greedy, {r['dtype']}, {r['threads']} thread(s)"
        + (f", load average {r['load_average_at_start']:.1f}" if "load_average_at_start" in r else "")
        + ". Depths on the eager engine (`Generator`):",
        "",
        "| depth | acceptance length | decode tokens/s | vs depth 0 | identical tokens |",
        "|---:|---:|---:|---:|---|",
    ]
    for row in r["rows"]:
        speed = f"{row['speedup']:.2f}x" if row.get("speedup") else "-"
        lines.append(
            f"| {row['depth']} | {row['acceptance_length']:.2f} | {row['decode_tokens_per_s']:.1f} | {speed} | "
            f"{str(row['identical_to_depth0']).lower()} |"
        )
    if "vs_transformers" in r:
        lines += ["", vs_transformers_table(r["vs_transformers"])]
    return "\n".join(lines)


def vs_transformers_table(v: dict) -> str:
    repeat = v.get("kv_head_repeat", 1)
    lines = [
        f"Against transformers' `generate` (`MiMoV2FlashForCausalLM`, eager attention) on the same weights: "
        f"greedy, {v['prompt_tokens']}-token prompts, {v['tokens']} new tokens per row, whole calls (prefill "
        f"included), the models alternating, the median of {v['repeats']} same-round ratios. lmspec is "
        "`StaticDecoder` (static KV cache, one `torch.compile`d step, inductor)"
        + (
            f"; both sides run each sliding KV head repeated {repeat}x, as transformers needs"
            if repeat > 1
            else ""
        )
        + ".",
        "",
        "| batch | depth | lmspec (s) | transformers (s) | vs transformers | acceptance length | identical tokens | compile (s) |",
        "|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for row in v["rows"]:
        lines.append(
            f"| {row['batch']} | {row['depth']} | {row['lmspec_s']:.3f} | {row['transformers_s']:.3f} | "
            f"{row['vs_transformers']:.2f}x | {row['acceptance_length']:.2f} | {str(row['identical']).lower()} | "
            f"{row['compile_s']:.0f} |"
        )
    c = v.get("per_token")
    if c:
        lines += [
            "",
            f"Per token at batch 1: the compiled greedy step {c['step_s'] * 1e3:.2f} ms; the host sampler "
            f"(`probs` + `sample`, temperature 0.8, top-p 0.95) {c['sampler_s'] * 1e3:.3f} ms "
            f"({c['sampler_s'] / c['step_s']:.0%} of a step); incremental text decoding "
            f"{c['text_s'] * 1e3:.3f} ms ({c['text_s'] / c['step_s']:.0%}).",
        ]
    return "\n".join(lines)


TABLES = {
    "train": ("train_throughput.json", train_table),
    "kernels": ("cpu_kernels.json", kernels_table),
    "decode": ("decode.json", decode_table),
}


def update(doc: str, name: str, body: str) -> str:
    """``doc`` with the text between the markers of table ``name`` replaced by ``body``."""
    pattern = re.compile(rf"(<!-- bench:{name} -->\n).*?(\n<!-- /bench:{name} -->)", re.DOTALL)
    if not pattern.search(doc):
        raise SystemExit(f"no <!-- bench:{name} --> ... <!-- /bench:{name} --> markers in the page")
    return pattern.sub(lambda m: m.group(1) + body + m.group(2), doc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--doc", default=str(ROOT / "docs" / "performance.md"))
    args = ap.parse_args()
    doc_path = Path(args.doc)
    doc = doc_path.read_text(encoding="utf-8")
    for name, (file, render) in TABLES.items():
        path = Path(args.results) / file
        if path.is_file():
            doc = update(doc, name, render(json.loads(path.read_text(encoding="utf-8"))))
            print(f"{doc_path}: table {name} from {path}")
    doc_path.write_text(doc, encoding="utf-8")


if __name__ == "__main__":
    main()
