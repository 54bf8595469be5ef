"""What every command module shares: the one-line-error parser and the spec arguments."""

from __future__ import annotations

import argparse
import importlib.util
import sys

from lmspec.errors import UsageError, one_line
from lmspec.spec import Spec, load_spec


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own exit code is 2 too; keep one line
        print(f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


# Optional extras (pyproject.toml) and the modules each brings; a command that needs one checks first.
EXTRAS: dict[str, tuple[str, ...]] = {
    "kernels": ("hypothesis", "triton"),
    "triton": ("triton",),
    "sweep": ("submitit",),
}


def require_extra(extra: str, command: str) -> None:
    """Refuse, in one line naming `lmspec[extra]`, when a module of that extra is not installed.

    `find_spec` looks without importing, so triton is not imported before the interpreter is chosen.
    """
    missing = [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"{command} needs {' and '.join(missing)}: install lmspec[{extra}]")


def extra_for(module: str | None) -> str | None:
    """The extra that installs `module` (a top-level name), if any: the smallest one."""
    top = (module or "").split(".")[0]
    found = [e for e, mods in EXTRAS.items() if top in mods]
    return min(found, key=lambda e: len(EXTRAS[e])) if found else None


def verbose_arg(p: argparse.ArgumentParser, *, top: bool = False) -> None:
    """`-v`/`-vv`/`-vvv`: the debug level, as `LMSPEC_DEBUG=1|2|3` (lmspec.compiler.debug) sets it.

    Accepted before the command (`lmspec -vv compile`) and after it (`lmspec compile -vv`); a command's
    own flag leaves the earlier count alone unless given (argparse.SUPPRESS).
    """
    p.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0 if top else argparse.SUPPRESS,
        help="debug output on stderr: -v pass timings, -vv also the IR after each pass, "
        "-vvv also the plan and the generated files (as LMSPEC_DEBUG=1, 2, 3)",
    )


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


def _bounded(kind: type, low: float, what: str):
    """An argparse type: a `kind` number >= `low`, finite; argparse turns the ValueError into one line."""

    def parse(text: str):
        try:
            value = kind(float(text)) if kind is int and text.strip().lower().count("e") == 1 else kind(text)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text[:40]!r}") from None
        if value != value or value in (float("inf"), float("-inf")) or value < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text[:40]!r}")
        return value

    parse.__name__ = what  # argparse names the type in its messages
    return parse


positive_int = _bounded(int, 1, "a positive integer")
nonnegative_int = _bounded(int, 0, "a non-negative integer")
positive_float = _bounded(float, 1e-300, "a positive finite number")
