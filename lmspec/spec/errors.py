"""User-facing errors: one value with a position, printed as `file:line:col: field: message`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SpecError(Exception):
    """A problem in a spec, located in its file. Lines and columns are 1-based (0 = unknown)."""

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
        return f"{where}:{field} {self.message}"
