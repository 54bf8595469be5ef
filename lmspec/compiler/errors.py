"""Compile errors: a graph the runtime cannot execute, reported like a spec error (one line, exit 2)."""

from __future__ import annotations

from lmspec.spec import SpecError


class CompileError(SpecError):
    """A spec that validates but lowers to a graph the runtime cannot run.

    Printed as `spec NAME: FIELD: message`; the graph keeps no file positions, so the spec's name
    and the field path the offending node came from stand in for `file:line:col`.
    """

    def __init__(self, spec_name: str, field: str, message: str) -> None:
        super().__init__(file=f"spec {spec_name}", line=0, col=0, field=field, message=message)
