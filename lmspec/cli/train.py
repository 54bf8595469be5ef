"""Commands that train: train, plot, tokenizer, export."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lmspec.cli.common import output_path
from lmspec.errors import UsageError


def cmd_train(args: argparse.Namespace) -> int:
    return train_command(args)


def cmd_plot(args: argparse.Namespace) -> int:
    return plot_command(args.run_dir, args.output)


def cmd_tokenizer(args: argparse.Namespace) -> int:
    return tokenizer_command(args)


def cmd_export(args: argparse.Namespace) -> int:
    return export_command(args.checkpoint, args.out)


def export_command(checkpoint: str, out_arg: str) -> int:
    """Write a checkpoint (a run's LATEST, a step directory, sharded or not) in the transformers layout:
    config.json, model.safetensors and spec.yaml, and the tokenizer the checkpoint carries."""
    import shutil

    from safetensors import SafetensorError

    from lmspec.codegen.hf import export_issues
    from lmspec.errors import CheckpointError
    from lmspec.runtime.checkpoint import resolve_checkpoint
    from lmspec.runtime.modeling import from_pretrained
    from lmspec.runtime.sharded import is_sharded
    from lmspec.runtime.tokenizer import TOKENIZER_FILE

    out = Path(out_arg)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {out}: exists and is not an empty directory")
    ckpt = resolve_checkpoint(checkpoint)
    try:
        model = from_pretrained(ckpt)  # a sharded checkpoint's shards are read into whole tensors here
    except (SafetensorError, OSError, EOFError, CheckpointError) as e:
        raise UsageError(f"{ckpt}: cannot read the weights ({' '.join(str(e).split())[:200]})") from None
    issues = export_issues(model.spec)
    if issues:  # transformers' MiMo-V2-Flash could not load the folder
        raise UsageError(f"{ckpt}: the model has no transformers layout: {'; '.join(issues)}")
    # The released checkpoint's names: what transformers, SGLang and vLLM each load (docs/scale.md).
    model.save_pretrained(out, layout="hub")
    if (ckpt / TOKENIZER_FILE).is_file():
        shutil.copyfile(ckpt / TOKENIZER_FILE, out / TOKENIZER_FILE)
    kind = "sharded checkpoint" if is_sharded(ckpt) else "checkpoint"
    n = sum(t.numel() for t in model.state_dict().values())
    print(f"wrote {out}: {n:,} values from the {kind} {ckpt}, in the transformers layout")
    return 0


def _number(text: str) -> int | float:
    """A flag's number as typed: `4096`, `4e3`, `-1`, `inf` all parse; what is allowed is TrainConfig's call.

    argparse would print a usage block for a value its own type rejects; this lets every value that is a
    number reach the one place that checks it, whose error is one line.
    """
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    return int(value) if value.is_integer() else value


# How torch words an allocation failure: CUDA ("CUDA out of memory"), the CPU allocator ("can't allocate
# memory", "not enough memory") and the OS (errno 12, "Cannot allocate memory").
_OOM_WORDS = ("out of memory", "not enough memory", "can't allocate memory", "cannot allocate memory")


def _out_of_memory(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and any(w in text for w in _OOM_WORDS))


def train_command(args: argparse.Namespace) -> int:
    """`lmspec train SPEC ...`: run the schedule, then print where the results are."""
    from lmspec.serve.rollouts import decode_batch
    from lmspec.train.trainer import DEFAULT_EVAL_TOKENS, TrainConfig, Trainer

    config = TrainConfig(
        spec=args.spec,
        data=args.data,
        out=args.out,
        max_tokens=args.max_tokens,
        scale=args.scale,
        resume=args.resume,
        resume_from=args.resume_from,
        overwrite=args.overwrite,
        backend=args.backend,
        tokenizer=args.tokenizer,
        device=args.device,
        overrides=tuple(args.overrides),
        progress=False if args.no_progress else None,
        eval_every=args.eval_every,
        eval_tokens=DEFAULT_EVAL_TOKENS if args.eval_tokens is None else args.eval_tokens,
        checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints,
        micro_batch_size=args.micro_batch_size,
        compile=True if args.compile else None,
        activation_checkpointing=args.activation_checkpointing,
        decode=decode_batch,
    )
    try:
        result = Trainer(config).run()
    except OSError as e:  # a full disk or a vanished directory in the middle of a run
        where = f"{e.filename}: " if e.filename else ""
        raise UsageError(f"{where}{e.strerror or e}") from None
    except (MemoryError, RuntimeError) as e:
        if not _out_of_memory(e):
            raise
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UsageError(
            f"out of memory while training ({first}); lower the stages' seq_len or batch size, "
            "or pass --micro-batch-size"
        ) from None
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    print(_report(result), file=sys.stdout)
    return 0


def _report(result) -> str:
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
    return "\n".join(lines)


def plot_command(run_dir: str, output: str | None) -> int:
    """`lmspec plot RUN_DIR [-o PNG]`."""
    from lmspec.train.metrics import METRICS_FILE
    from lmspec.train.plot import plot_run

    if not (Path(run_dir) / METRICS_FILE).is_file():
        raise UsageError(f"{run_dir}: not a run directory (no {METRICS_FILE})")
    if output is not None:
        output = _picture_path(output_path("-o", output, (Path(run_dir) / METRICS_FILE,)))
    try:
        print(plot_run(run_dir, output))
    except OSError as e:
        raise UsageError(f"{e.filename or output or run_dir}: {e.strerror or e}") from None
    return 0


def _picture_path(path: Path) -> Path:
    """`-o` of `plot`: a file type matplotlib writes; no suffix means PNG (said in the path it prints)."""
    from matplotlib.backend_bases import FigureCanvasBase

    if not path.suffix:
        return path.with_name(path.name + ".png")
    kinds = FigureCanvasBase.get_supported_filetypes()
    if path.suffix[1:].lower() not in kinds:
        raise UsageError(
            f"-o {path}: expected a picture file ({', '.join(sorted(kinds))}), got {path.suffix!r}"
        )
    return path


# Hugging Face tokenizers aborts the process (rc 134) when it cannot allocate a vocabulary this large;
# 2**20 is 7x MiMo-V2-Flash's 152K and still trains in memory.
MAX_BPE_VOCAB = 1 << 20


def _check_output(path: Path) -> None:
    """Prove `-o` writable before minutes of training: create its folder and a probe file beside it."""
    import tempfile

    if path.is_dir():
        raise UsageError(f"-o {path}: is a directory; expected the tokenizer.json file to write")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"):
            pass
    except OSError as e:
        raise UsageError(f"-o {path}: {e.strerror or e}") from None


def tokenizer_command(args: argparse.Namespace) -> int:
    """`lmspec tokenizer train --data ... --vocab-size N -o tok.json`."""
    from lmspec.runtime.tokenizer import EOS, train_bpe
    from lmspec.train.data import read_documents

    vocab = args.vocab_size
    if not (isinstance(vocab, int) and 257 <= vocab <= MAX_BPE_VOCAB):
        raise UsageError(f"--vocab-size: expected 257 (256 bytes + {EOS}) to {MAX_BPE_VOCAB:,}, got {vocab}")
    out = output_path("-o", args.output, tuple(args.data or ()))
    _check_output(out)
    docs = read_documents(args.data)
    try:
        tok = train_bpe((d.text for d in docs), vocab, out)
    except OSError as e:
        raise UsageError(f"-o {out}: {e.strerror or e}") from None
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
    p.add_argument("--max-tokens", type=_number, default=None, help="shrink the schedule to this many tokens")
    p.add_argument("--scale", type=_number, default=None, help="multiply every token budget by this factor")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint LATEST names")
    p.add_argument(
        "--resume-from", default=None, metavar="step_N", help="continue from this checkpoint of the run"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="allow deleting the run directory's checkpoints and metrics (start afresh, or with --resume-from "
        "discard the checkpoints after it)",
    )
    p.add_argument("--backend", default=None, help="torch or triton (default: triton on CUDA, torch on CPU)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: byte-level)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--eval-every", type=_number, default=None, metavar="STEPS", help="held-out evaluation interval"
    )
    p.add_argument(
        "--eval-tokens", type=_number, default=None, help="held-out tokens per evaluation (default 16384)"
    )
    p.add_argument(
        "--checkpoint-every", type=_number, default=None, metavar="STEPS", help="checkpoint interval"
    )
    p.add_argument(
        "--keep-checkpoints", type=_number, default=3, metavar="N", help="checkpoints to retain (default 3)"
    )
    p.add_argument(
        "--micro-batch-size", type=_number, default=None, help="sequences per forward (accumulate the rest)"
    )
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the training step (as training.compile: true)"
    )
    p.add_argument(
        "--activation-checkpointing",
        default=None,
        metavar="MODE",
        help="none, full or selective (default: the spec's training.activation_checkpointing)",
    )

    p = add(
        "export",
        cmd_export,
        "write a checkpoint (sharded or not) as a transformers folder: config.json, model.safetensors",
        spec=False,
    )
    p.add_argument("checkpoint", help="a run directory (its LATEST checkpoint) or a checkpoint directory")
    p.add_argument("--out", required=True, help="the folder to write (new or empty)")

    p = add("plot", cmd_plot, "plot a run's losses, LR, batch size and expert load", spec=False)
    p.add_argument("run_dir")
    p.add_argument("-o", "--output", default=None, help="PNG path (default: RUN_DIR/plot.png)")

    p = add("tokenizer", cmd_tokenizer, "train a BPE tokenizer with Hugging Face tokenizers", spec=False)
    p.add_argument("action", choices=["train"])
    p.add_argument("--data", nargs="*", default=None, help="text files or globs (default: embedded corpus)")
    p.add_argument("--vocab-size", type=_number, default=4096)
    p.add_argument("-o", "--output", required=True, help="tokenizer.json to write")
