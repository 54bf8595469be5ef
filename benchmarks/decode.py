"""Decode speed and MTP acceptance at speculative depths 0..D on a trained checkpoint, in one run.

    python benchmarks/decode.py                       # runs/demo (written by `make demo`)
    python benchmarks/decode.py --checkpoint RUN_DIR --max-tokens 256 --json out.json

Greedy decoding of the same prompts at every depth; the output must be identical token for token
(speculation changes speed, never text), and the table reports acceptance length (tokens per
main-model forward) and decode tokens/s with the speedup over depth 0.

Without a checkpoint at --checkpoint, the script trains the tiny spec for --train-tokens tokens on
the default corpus into --train-out first (minutes on a CPU; it never writes into runs/demo, which
belongs to `make demo`) and says so. A model that short-trained mostly repeats whitespace, which
flatters acceptance; the demo's fully trained model is the meaningful measurement.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

# Defaults point into the repository, from any working directory.
ROOT = Path(__file__).resolve().parents[1]

PROMPTS = [
    "def __init__(self, ",
    "import os\nimport sys\n\n\ndef main():\n    ",
    'class Queue:\n    """A simple FIFO queue."""\n\n    def __init__(self):\n        self.',
    "    for i in range(len(",
    "        if not isinstance(value, str):\n            raise TypeError(",
    "# Copyright (c) ",
]


def _has_checkpoint(path: Path) -> bool:
    from lmspec.runtime.checkpoint import latest_checkpoint

    return (path / "model.safetensors").is_file() or latest_checkpoint(path) is not None


def _checkpoint(path: Path, spec: str, train_tokens: float, train_out: Path) -> Path:
    from lmspec.runtime.checkpoint import resolve_checkpoint

    if _has_checkpoint(path):
        return resolve_checkpoint(path)
    if not _has_checkpoint(train_out):
        print(
            f"{path}: no checkpoint; training {spec} for {train_tokens:g} tokens into {train_out} first "
            f"(a quick model: expect inflated acceptance on repeated whitespace)",
            file=sys.stderr,
        )
        from lmspec.train.trainer import train

        train(spec, out=train_out, max_tokens=train_tokens, progress=False, plot=False, quiet=True)
    else:
        print(f"{path}: no checkpoint; using the quick model in {train_out}", file=sys.stderr)
    return resolve_checkpoint(train_out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(ROOT / "runs" / "demo"), help="run or checkpoint directory")
    p.add_argument(
        "--spec",
        default=str(ROOT / "examples" / "mimo_v2_flash_tiny.yaml"),
        help="spec to train when there is no checkpoint",
    )
    p.add_argument("--train-tokens", type=float, default=3e5)
    p.add_argument(
        "--train-out", default=str(ROOT / "runs" / "decode_bench"), help="where the quick model is trained"
    )
    p.add_argument("--depths", type=int, nargs="+", default=None, help="default: 0..num MTP blocks")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=1, help="timed passes over the prompts per depth")
    p.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (1: steady timings on a shared CPU)"
    )
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from lmspec.runtime.modeling import from_pretrained
    from lmspec.serve.engine import Generator
    from lmspec.serve.sampling import SamplingParams

    ckpt = _checkpoint(Path(args.checkpoint), args.spec, args.train_tokens, Path(args.train_out))
    model = from_pretrained(ckpt, dtype=getattr(torch, args.dtype)).eval()
    blocks = model.spec.model.mtp.num_blocks if model.spec.model.mtp else 0
    depths = args.depths if args.depths is not None else list(range(blocks + 1))
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)

    # Warm up every code path once (allocator, first-call overheads) before timing.
    for d in depths:
        Generator(model, speculative_depth=d).generate(
            PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=8)
        )

    rows, outputs = [], {}
    for d in depths:
        gen = Generator(model, speculative_depth=d)
        tokens = steps = accepted = 0
        decode_s = 0.0
        texts = []
        for _ in range(args.repeats):
            texts = []
            for prompt in PROMPTS:
                out = gen.generate(prompt, params)
                st = out.stats
                texts.append(out.token_ids)
                # Decode time: from the first token to the last (the prefill is the same at every depth).
                decode_s += st.finished_at - st.first_token_at
                tokens += st.completion_tokens - 1
                steps += st.decode_steps
                accepted += st.accepted
        outputs[d] = texts
        rows.append(
            {
                "depth": d,
                "acceptance_length": (steps + accepted) / steps if steps else 0.0,
                "decode_tokens_per_s": tokens / decode_s if decode_s else 0.0,
                "decode_tokens": tokens,
                "decode_steps": steps,
                "seconds": decode_s,
            }
        )
    base = next((r["decode_tokens_per_s"] for r in rows if r["depth"] == 0), None)
    for r in rows:
        r["speedup"] = r["decode_tokens_per_s"] / base if base else None
        r["identical_to_depth0"] = outputs[r["depth"]] == outputs.get(0, outputs[r["depth"]])

    result = {
        "checkpoint": str(ckpt),
        "spec": model.spec.name,
        "dtype": args.dtype,
        "threads": args.threads,
        "max_tokens": args.max_tokens,
        "prompts": len(PROMPTS),
        "repeats": args.repeats,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rows": rows,
    }
    print(
        f"decode benchmark: {model.spec.name} ({ckpt}), {len(PROMPTS)} prompts x {args.max_tokens} tokens, greedy, "
        f"{args.dtype}, {args.threads} thread(s)"
    )
    print(f"{'depth':>5} {'accept len':>10} {'tok/s':>9} {'speedup':>8} {'identical':>9}")
    for r in rows:
        sp = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
        print(
            f"{r['depth']:>5} {r['acceptance_length']:>10.2f} {r['decode_tokens_per_s']:>9.1f} {sp:>8} "
            f"{str(r['identical_to_depth0']).lower():>9}"
        )
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0 if all(r["identical_to_depth0"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
