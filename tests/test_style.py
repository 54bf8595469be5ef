"""Functions a reader can hold: no function or method in `lmspec/` is longer than `MAX_LINES`.

A function's length runs from its `def` line to its last line (decorators excluded, docstring and
nested functions included), as the AST reports it.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lmspec"
MAX_LINES = 80


def long_functions(source: str, path: str = "<string>") -> dict[str, int]:
    """`{"path::qualified.name": lines}` for every function of `source` longer than `MAX_LINES`."""
    found: dict[str, int] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    lines = child.end_lineno - child.lineno + 1
                    if lines > MAX_LINES:
                        found[f"{path}::{name}"] = lines
                visit(child, f"{name}.")
            else:
                visit(child, prefix)

    visit(ast.parse(source), "")
    return found


def test_the_measure_flags_one_line_over_the_limit():
    def function(body_lines: int) -> str:
        return "class C:\n    def f(self):\n" + "        x = 1\n" * body_lines

    assert long_functions(function(MAX_LINES - 1)) == {}
    assert long_functions(function(MAX_LINES)) == {"<string>::C.f": MAX_LINES + 1}


def test_no_function_in_the_package_is_longer_than_the_limit():
    root = PACKAGE.parent
    found: dict[str, int] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        found.update(long_functions(path.read_text(), path.relative_to(root).as_posix()))
    assert not found, "functions longer than {} lines:\n{}".format(
        MAX_LINES, "\n".join(f"  {name}: {n} lines" for name, n in sorted(found.items()))
    )
