"""The package's folders are the pipeline, and imports only point downstream:
`spec ← compiler ← codegen ← runtime ← train / serve / testing ← cli`.

Every import counts, module-level or inside a function, `import x` or `from x import y` (relative
imports resolved). `lmspec.errors` and `lmspec.files` import nothing from lmspec and anyone may import
them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lmspec"

# Stage -> rank. A module may import its own stage and any stage of a lower rank; stages of equal
# rank are siblings and never import each other.
RANK = {
    "errors": 0,
    "files": 0,
    "spec": 1,
    "compiler": 2,
    "codegen": 3,
    "runtime": 4,
    "train": 5,
    "serve": 5,
    "testing": 5,
    "cli": 6,
}
TOP = {"__init__", "__main__"}  # the package facade and `python -m lmspec` sit above everything


def _stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "lmspec" else None


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every (line, absolute module) imported anywhere in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    me = _module_name(path).split(".")
    package = me if path.name == "__init__.py" else me[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((node.lineno, mod))
            # `from lmspec import codegen` imports the stage `codegen`
            if mod == "lmspec":
                out += [(node.lineno, f"lmspec.{a.name}") for a in node.names]
    return out


def _files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_stage_is_ranked() -> None:
    stages = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in _files()}
    assert stages - TOP <= set(RANK), f"unranked stages: {stages - TOP - set(RANK)}"


@pytest.mark.parametrize("path", _files(), ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_imports_point_downstream(path: Path) -> None:
    me = _stage(_module_name(path)) or path.stem
    if me in TOP and path.parent == PACKAGE:
        return
    bad = []
    for line, mod in _imports(path):
        other = _stage(mod)
        if other is None or other == me or other not in RANK:
            continue
        if RANK[other] >= RANK[me]:
            bad.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {me} imports {mod}")
    assert not bad, "imports pointing back up the pipeline:\n" + "\n".join(bad)


def test_spec_stage_needs_no_torch_or_jinja() -> None:
    for path in (PACKAGE / "spec").rglob("*.py"):
        for line, mod in _imports(path):
            assert mod.split(".")[0] not in {"torch", "jinja2", "triton"}, f"{path}:{line} imports {mod}"
