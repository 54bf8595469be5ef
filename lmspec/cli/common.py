"""What every command module shares: the one-line-error parser and the spec arguments."""

from __future__ import annotations

import argparse
import sys

from lmspec.spec import Spec, load_spec


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own exit code is 2 too; keep one line
        self.print_usage(sys.stderr)
        print(f"lmspec: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="spec YAML file")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="PATH=VALUE",
        help="override a field, e.g. --set model.hidden_size=256 (repeatable)",
    )


def load(args: argparse.Namespace) -> Spec:
    return load_spec(args.spec, args.overrides)
