"""Commands that train: train, plot, tokenizer."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lmspec.errors import UsageError


def cmd_train(args: argparse.Namespace) -> int:
    return train_command(args)


def cmd_plot(args: argparse.Namespace) -> int:
    return plot_command(args.run_dir, args.output)


def cmd_tokenizer(args: argparse.Namespace) -> int:
    return tokenizer_command(args)


def train_command(args: argparse.Namespace) -> int:
    """`lmspec train SPEC ...`: run the schedule, then print where the results are."""
    from lmspec.train.trainer import DEFAULT_EVAL_TOKENS, train

    progress = False if args.no_progress else None
    result = train(
        args.spec,
        data=args.data,
        out=args.out,
        max_tokens=args.max_tokens,
        scale=args.scale,
        resume=args.resume,
        backend=args.backend,
        tokenizer=args.tokenizer,
        device=args.device,
        overrides=tuple(args.overrides),
        progress=progress,
        eval_every=getattr(args, "eval_every", None),
        checkpoint_every=getattr(args, "checkpoint_every", None),
        micro_batch_size=getattr(args, "micro_batch_size", None),
        eval_tokens=getattr(args, "eval_tokens", None) or DEFAULT_EVAL_TOKENS,
    )
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    lines = [f"trained {result.steps} steps, {result.tokens:,} tokens in {result.elapsed_s:.0f} s"]
    if result.val_loss is not None:
        lines.append(
            f"held-out: loss {result.val_loss:.4f} nats/token, {result.val_bpb:.3f} bits/byte "
            f"(unigram baseline {result.unigram_bpb:.3f} bits/byte)"
        )
    if result.max_load_ratio is not None:
        lines.append(f"MoE load: busiest expert at {result.max_load_ratio:.2f}x uniform (last step)")
    lines.append(f"metrics:    {result.run_dir / 'metrics.jsonl'}")
    if result.plot is not None:
        lines.append(f"plot:       {result.plot}")
    if result.checkpoint is not None:
        lines.append(f"checkpoint: {result.checkpoint}")
    print("\n".join(lines), file=sys.stdout)
    return 0


def plot_command(run_dir: str, output: str | None) -> int:
    """`lmspec plot RUN_DIR [-o PNG]`."""
    from lmspec.train.metrics import METRICS_FILE
    from lmspec.train.plot import plot_run

    if not (Path(run_dir) / METRICS_FILE).is_file():
        raise UsageError(f"{run_dir}: not a run directory (no {METRICS_FILE})")
    print(plot_run(run_dir, output))
    return 0


def tokenizer_command(args: argparse.Namespace) -> int:
    """`lmspec tokenizer train --data ... --vocab-size N -o tok.json`."""
    from lmspec.runtime.tokenizer import train_bpe
    from lmspec.train.data import read_documents

    docs = read_documents(args.data)
    tok = train_bpe((d.text for d in docs), args.vocab_size, args.output)
    n_bytes = sum(len(d.text.encode("utf-8")) for d in docs)
    sample = docs[0].text[:20000]
    ratio = len(sample.encode("utf-8")) / max(len(tok.encode(sample)), 1)
    print(
        f"wrote {args.output}: {tok.vocab_size} tokens, trained on {len(docs)} documents "
        f"({n_bytes / 1e6:.1f} MB), {ratio:.2f} bytes/token on the first document"
    )
    return 0


def add_parsers(add) -> None:
    p = add("train", cmd_train, "train a spec on its declared schedule")
    p.add_argument(
        "--data", nargs="*", default=None, help="text files, globs or JSONL (default: embedded corpus)"
    )
    p.add_argument("--out", default=None, help="run directory (default: runs/<spec name>)")
    p.add_argument("--max-tokens", type=float, default=None, help="shrink the schedule to this many tokens")
    p.add_argument("--scale", type=float, default=None, help="multiply every token budget by this factor")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    p.add_argument("--backend", default=None, help="torch or triton (default: triton on CUDA, torch on CPU)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: byte-level)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--eval-every", type=int, default=None, metavar="STEPS", help="held-out evaluation interval"
    )
    p.add_argument(
        "--eval-tokens", type=int, default=None, help="held-out tokens per evaluation (default 16384)"
    )
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="STEPS", help="checkpoint interval")
    p.add_argument(
        "--micro-batch-size", type=int, default=None, help="sequences per forward (accumulate the rest)"
    )

    p = add("plot", cmd_plot, "plot a run's losses, LR, batch size and expert load", spec=False)
    p.add_argument("run_dir")
    p.add_argument("-o", "--output", default=None, help="PNG path (default: RUN_DIR/plot.png)")

    p = add("tokenizer", cmd_tokenizer, "train a BPE tokenizer with Hugging Face tokenizers", spec=False)
    p.add_argument("action", choices=["train"])
    p.add_argument("--data", nargs="*", default=None, help="text files or globs (default: embedded corpus)")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("-o", "--output", required=True, help="tokenizer.json to write")
