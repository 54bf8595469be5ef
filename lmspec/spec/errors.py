"""User-facing errors: one value with a position, printed as `file:line:col: field: message`."""

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
