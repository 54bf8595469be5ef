"""The error types every layer raises and the CLI prints as one line with exit status 2.

- `SpecError`: a problem in a spec, located as `file:line:col: field: message`.
- `CompileError`: a spec that validates but lowers to a graph the runtime cannot run.
- `UsageError`: a user error outside the spec file (a bad flag value, a missing file).
- `CheckpointError`: a checkpoint or run directory that is damaged or does not fit its spec.

This module imports nothing from lmspec, so every stage can raise these without an arrow back up.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SpecError(Exception):
    """A problem in a spec, located in its file. Lines and columns are 1-based (0 = unknown).

    A value given on the command line as `--set PATH=VALUE` is located in it: `file` is `--set`,
    `line` says which `--set` (1-based, in command-line order) and `col` is the column in its text.
    """

    file: str
    line: int
    col: int
    field: str
    message: str

    def __str__(self) -> str:
        where = self.file
        if self.line:
            where += f":{self.line}:{self.col}"
        field = f" {self.field}:" if self.field else ""
        return one_line(f"{where}:{field} {self.message}")


def one_line(text: str) -> str:
    """`text` with every line-break character escaped, so an error is always exactly one line."""
    return "".join(c if c.splitlines() == [c] else repr(c)[1:-1] for c in text)


class CompileError(SpecError):
    """A spec that validates but lowers to a graph the runtime cannot run.

    Printed as `spec NAME: FIELD: message`; the graph keeps no file positions, so the spec's name
    and the field path the offending node came from stand in for `file:line:col`.
    """

    def __init__(self, spec_name: str, field: str, message: str) -> None:
        super().__init__(file=f"spec {spec_name}", line=0, col=0, field=field, message=message)


class UsageError(Exception):
    """A user error outside the spec file itself (bad flag value, missing checkpoint, ...)."""

    def __str__(self) -> str:
        return one_line(super().__str__())


class CheckpointError(UsageError, ValueError):
    """A checkpoint folder that is damaged or does not fit its spec."""
