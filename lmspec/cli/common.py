"""What every command module shares: the one-line-error parser and the spec arguments."""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib.util
import os
import stat
import sys
from pathlib import Path

from lmspec.errors import UsageError, one_line
from lmspec.spec import Spec, load_spec
from lmspec.spec import load as load_with_positions


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


def spec_files(args: argparse.Namespace) -> tuple[Spec, tuple[str, ...]]:
    """The spec, and every file it was read from (the file itself and its `extends` chain)."""
    loaded = load_with_positions(args.spec, args.overrides)
    return loaded.spec, (args.spec, *sorted({pos.file for pos in loaded.positions.values()}))


# Write ends of FIFOs that `output_path` found a reader on, held until the process exits (see there).
_HELD_WRITE_ENDS: list[int] = []


def output_path(flag: str, text: str | Path, inputs: tuple[str | Path, ...] = ()) -> Path:
    """Where a command will write, refused in one line when writing there would lose data or never end.

    - An empty path: it would quietly mean the current directory.
    - The same file as one of the command's `inputs` (the spec and its `extends`, a config, the data):
      writing would replace what the command reads.
    - A FIFO that nothing reads: opening it to write would wait forever. A FIFO with a reader
      (`-o >(gzip > f)`, `/dev/stdout` into a pipe) is fine; the probe's write end stays open until the
      process exits, so the reader sees no end of file before the real write.
    """
    if not str(text).strip():
        raise UsageError(f"{flag}: expected a path, got an empty one")
    path = Path(text)
    for source in inputs:
        with contextlib.suppress(OSError, ValueError):  # an input that is not a file cannot be written over
            if os.path.samefile(path, source):
                raise UsageError(f"{flag} {path}: is the input {source}; writing there would replace it")
    try:
        mode = path.stat().st_mode
    except OSError:
        return path  # not there yet (or unreachable): the write itself says why, in one line
    if stat.S_ISFIFO(mode):
        try:
            _HELD_WRITE_ENDS.append(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        except OSError as e:
            if e.errno == errno.ENXIO:
                raise UsageError(
                    f"{flag} {path}: a FIFO that nothing reads; writing to it would wait forever"
                ) from None
            raise UsageError(f"{flag} {path}: {e.strerror or e}") from None
    return path


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


def device_count(text: str) -> int:
    """An argparse type: a number of ranks or GPUs, 1 to `MAX_DEVICES`."""
    from lmspec.spec.limits import MAX_DEVICES

    value = positive_int(text)
    if value > MAX_DEVICES:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_DEVICES:,}, got {text[:40]!r}")
    return value


device_count.__name__ = "a device count"
