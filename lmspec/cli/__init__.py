"""The `lmspec` command: every parser and command, a thin layer over each stage's public functions.

Every user error (a bad spec, a missing file, a bad flag) prints one line and exits with status 2;
nothing a user can type produces a traceback. Commands live by what they work on: `spec` (check,
schema, stats, graph, compile, import-hf, test-kernels), `train` (train, plot, tokenizer) and `serve`
(generate, serve).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from lmspec.cli import serve, spec, train
from lmspec.cli.common import Parser, spec_args
from lmspec.errors import SpecError, UsageError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="lmspec", description="A declarative model-spec compiler for LLMs.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    def add(name: str, fn: Callable[[argparse.Namespace], int], help: str, spec: bool = True):
        p = sub.add_parser(name, help=help, description=help)
        if spec:
            spec_args(p)
        p.set_defaults(fn=fn)
        return p

    for module in (spec, train, serve):
        module.add_parsers(add)
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
