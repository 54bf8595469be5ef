"""The `lmspec` command: every parser and command, a thin layer over each stage's public functions.

Every user error (a bad spec, a missing file, a bad flag) prints one line and exits with status 2;
nothing a user can type produces a traceback. Commands live by what they work on: `spec` (check,
schema, stats, graph, compile, import-hf, test-kernels), `train` (train, plot, tokenizer) and `serve`
(generate, serve).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from lmspec.cli import explore, plan, serve, spec, train
from lmspec.cli.common import Parser, extra_for, spec_args, verbose_arg
from lmspec.compiler.debug import set_debug_level
from lmspec.errors import SpecError, UsageError, one_line

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="lmspec", description="A declarative model-spec compiler for LLMs.")
    verbose_arg(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    def add(name: str, fn: Callable[[argparse.Namespace], int], help: str, spec: bool = True):
        p = sub.add_parser(name, help=help, description=help)
        verbose_arg(p)
        if spec:
            spec_args(p)
        p.set_defaults(fn=fn)
        return p

    for module in (spec, plan, train, explore, serve):
        module.add_parsers(add)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    set_debug_level(args.verbose or None)  # no flag: LMSPEC_DEBUG decides
    try:
        return int(args.fn(args) or 0)
    except SpecError as e:
        print(str(e), file=sys.stderr)
        return 2
    except UsageError as e:
        print(f"lmspec: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`lmspec stats ... | head`): nothing left to say to it.
        _silence_stdout()
        return 0
    except OSError as e:
        # A path the user named cannot be read or written (read-only, missing, a device, disk full).
        print(f"lmspec: error: {os_error_line(e)}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        extra = extra_for(e.name)
        if extra is None:
            raise  # not an optional dependency: a bug, and its traceback is the report
        print(f"lmspec: error: {e.name} is not installed: install lmspec[{extra}]", file=sys.stderr)
        return 2
    except MemoryError:
        print("lmspec: error: out of memory; reduce the sizes in the spec or the flags", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmspec: interrupted", file=sys.stderr)
        return 130


def os_error_line(e: OSError) -> str:
    """`[Errno 30] Read-only file system: 'x'` -> `x: Read-only file system`, quoted paths cut short."""
    reason = e.strerror or str(e)
    path = e.filename if e.filename is not None else None
    return one_line(f"{str(path)[:200]}: {reason}" if path is not None else reason)


def _silence_stdout() -> None:
    # Python flushes stdout again at exit; point it at devnull so that flush cannot fail a second time.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
