"""The `lmspec` command: a thin layer over each stage's public functions.

Every user error (a bad spec, a missing file, a bad flag) prints one line and exits with status 2;
nothing a user can type produces a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from lmspec.spec import SpecError, load_spec


class UsageError(Exception):
    """A user error outside the spec file itself (bad flag value, missing checkpoint, ...)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own exit code is 2 too; keep one line
        self.print_usage(sys.stderr)
        print(f"lmspec: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="spec YAML file")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
        help="override a field, e.g. --set model.hidden_size=256 (repeatable)",
    )


def _load(args: argparse.Namespace):
    return load_spec(args.spec, args.overrides)


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
    spec = _load(args)
    m = spec.model
    kinds = {}
    for name in m.layer_blocks:
        kinds[name] = kinds.get(name, 0) + 1
    layout = ", ".join(f"{n}x{k}" for k, n in kinds.items())
    stages = len(spec.training.stages) if spec.training else 0
    mtp = m.mtp.num_blocks if m.mtp else 0
    print(f"{args.spec}: ok — {spec.name}: {m.num_layers} layers ({layout}), hidden {m.hidden_size}, "
          f"vocab {m.vocab_size}, {mtp} MTP blocks, {stages} training stages")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from lmspec.spec import Spec

    print(json.dumps(Spec.model_json_schema(), indent=2))
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from lmspec.compiler.accounting import print_stats

    if args.context < 1:
        raise UsageError(f"--context: expected a positive token count, got {args.context}")
    if args.kv_dtype_bytes is not None and args.kv_dtype_bytes < 1:
        raise UsageError(f"--kv-dtype-bytes: expected a positive byte count, got {args.kv_dtype_bytes}")
    return print_stats(_load(args), as_json=args.json, context=args.context, kv_dtype_bytes=args.kv_dtype_bytes)


def cmd_graph(args: argparse.Namespace) -> int:
    from lmspec.compiler.draw import draw_command

    return draw_command(_load(args), fmt=args.format, layers=args.layers, output=args.output,
                        renderer=args.renderer)


def cmd_compile(args: argparse.Namespace) -> int:
    from lmspec.codegen import compile_spec

    compiled = compile_spec(_load(args), out_dir=args.output, spec_path=args.spec)
    print(compiled.describe())
    return 0


def cmd_import_hf(args: argparse.Namespace) -> int:
    from lmspec.codegen.hf import import_hf_command

    return import_hf_command(args.config, args.output)


def cmd_train(args: argparse.Namespace) -> int:
    from lmspec.runtime.train import train_command

    return train_command(args)


def cmd_plot(args: argparse.Namespace) -> int:
    from lmspec.runtime.plot import plot_command

    return plot_command(args.run_dir, args.output)


def cmd_tokenizer(args: argparse.Namespace) -> int:
    from lmspec.runtime.tokenizer import tokenizer_command

    return tokenizer_command(args)


def cmd_generate(args: argparse.Namespace) -> int:
    from lmspec.runtime.generate import generate_command

    return generate_command(args)


def cmd_serve(args: argparse.Namespace) -> int:
    from lmspec.runtime.server import serve_command

    return serve_command(args)


def cmd_test_kernels(args: argparse.Namespace) -> int:
    from lmspec.testing import test_kernels_command

    return test_kernels_command(_load(args), examples=args.examples, seq_len=args.seq_len)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lmspec", description="A declarative model-spec compiler for LLMs.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def add(name: str, fn: Callable[[argparse.Namespace], int], help: str, spec: bool = True):
        p = sub.add_parser(name, help=help, description=help)
        if spec:
            _spec_args(p)
        p.set_defaults(fn=fn)
        return p

    add("check", cmd_check, "validate a spec and print a one-line summary")
    add("schema", cmd_schema, "print the JSON Schema of the spec language", spec=False)

    p = add("stats", cmd_stats, "parameters, active parameters, KV cache and FLOPs, from the spec alone")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--context", type=int, default=262144, help="context length for KV-cache totals")
    p.add_argument("--kv-dtype-bytes", type=int, default=None, help="bytes per cached element (default: 2, bf16)")

    p = add("graph", cmd_graph, "draw the lowered graph")
    p.add_argument("--format", choices=["text", "dot", "svg", "png"], default="text")
    p.add_argument("--layers", default=None, help="layer range to draw, e.g. 0-6")
    p.add_argument("-o", "--output", default=None, help="output file (default: stdout or SPEC.FORMAT)")
    p.add_argument("--renderer", choices=["auto", "dot", "matplotlib"], default="auto",
                   help="svg/png drawing: graphviz dot (auto: when installed) or matplotlib")

    p = add("compile", cmd_compile, "generate the model module (and kernels) for a spec")
    p.add_argument("-o", "--output", default=None, help="write into this directory instead of the cache")

    p = add("import-hf", cmd_import_hf, "turn a transformers mimo_v2_flash config.json into a spec", spec=False)
    p.add_argument("config", help="config.json")
    p.add_argument("-o", "--output", required=True, help="spec YAML to write")

    p = add("train", cmd_train, "train a spec on its declared schedule")
    p.add_argument("--data", nargs="*", default=None, help="text files, globs or JSONL (default: embedded corpus)")
    p.add_argument("--out", default=None, help="run directory (default: runs/<spec name>)")
    p.add_argument("--max-tokens", type=float, default=None, help="shrink the schedule to this many tokens")
    p.add_argument("--scale", type=float, default=None, help="multiply every token budget by this factor")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    p.add_argument("--backend", default=None, help="torch or triton (default: triton on CUDA, torch on CPU)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: byte-level)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--eval-every", type=int, default=None, metavar="STEPS", help="held-out evaluation interval")
    p.add_argument("--eval-tokens", type=int, default=None, help="held-out tokens per evaluation (default 16384)")
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="STEPS", help="checkpoint interval")
    p.add_argument("--micro-batch-size", type=int, default=None, help="sequences per forward (accumulate the rest)")

    p = add("plot", cmd_plot, "plot a run's losses, LR, batch size and expert load", spec=False)
    p.add_argument("run_dir")
    p.add_argument("-o", "--output", default=None, help="PNG path (default: RUN_DIR/plot.png)")

    p = add("tokenizer", cmd_tokenizer, "train a BPE tokenizer with Hugging Face tokenizers", spec=False)
    p.add_argument("action", choices=["train"])
    p.add_argument("--data", nargs="*", default=None, help="text files or globs (default: embedded corpus)")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("-o", "--output", required=True, help="tokenizer.json to write")

    p = add("generate", cmd_generate, "generate text from a checkpoint, streaming to the terminal")
    p.add_argument("--checkpoint", required=True, help="run directory or checkpoint directory")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speculative-depth", type=int, default=None, help="MTP draft depth (default: spec's serving)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")

    p = add("serve", cmd_serve, "serve a checkpoint with an OpenAI-compatible HTTP API")
    p.add_argument("--checkpoint", required=True, help="run directory or checkpoint directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--speculative-depth", type=int, default=None)
    p.add_argument("--max-batch", type=int, default=8)

    p = add("test-kernels", cmd_test_kernels, "property-test the kernels generated for a spec")
    p.add_argument("--examples", type=int, default=50, help="Hypothesis examples per kernel")
    p.add_argument("--seq-len", type=int, default=None, help="cap sequence lengths (for full-size specs)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except SpecError as e:
        print(str(e), file=sys.stderr)
        return 2
    except UsageError as e:
        print(f"lmspec: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmspec: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
