"""Render the model module from a Plan: the one Jinja environment, its escaping filter, formatting.

The model template reads only the `Plan` (`lmspec.compiler.plan`), never a Spec: what is generated
is what the compiler decided.

Names are data, never code. `jinja_env()` is the one environment every template renders in (the
model here, the Triton kernels in `kernels.py`). Its `finalize` guard sees every `{{ ... }}` value:
numbers, booleans and None print as Python literals, an `Identifier` (a class name from
`lmspec.compiler.plan.class_name`, only `[A-Za-z0-9_]`) as itself, and any other string only after
the one escaping filter, `py`, has made it safe for where it goes:

- `{{ x | py }}`: a Python literal, quoted and escaped (`ascii()`), for code: `ATTENTION = {{ a.name | py }}`;
- `{{ x | py("text") }}`: one line of text for a docstring or a comment: printable ASCII without quotes
  or backslashes, anything else becomes `?`, so it can neither close a docstring nor leave a comment;
- `{{ x | py("comment") }}`: a str or lines, as `# `-prefixed comment lines (each one `text`);
- `{{ x | py("ident") }}`: an identifier, checked, for a name the template builds code from.

A string that reaches the output without the filter raises `TemplateEmitError` naming it, so a template
cannot paste data into code by forgetting a filter. Data is never parsed as a template either: a name
holding `{{ ... }}` is emitted as those characters.
"""

from __future__ import annotations

import functools
import importlib.metadata
import math
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import jinja2

import lmspec
from lmspec.compiler.plan import BlockPlan, Identifier, Plan

__all__ = [
    "MODEL_TEMPLATE",
    "TEMPLATE_DIR",
    "TemplateEmitError",
    "compress_indices",
    "format_source",
    "ir_lines",
    "jinja_env",
    "model_context",
    "py",
    "render_model",
    "spec_locations",
    "template_sources",
    "torch_version",
]

TEMPLATE_DIR = Path(__file__).parent / "templates"
MODEL_TEMPLATE = "model.py.jinja"


# -- names are data: the escaping filter and the guard ------------------------------------------------


class TemplateEmitError(TypeError):
    """A template tried to emit a value that did not go through the `py` filter (a template bug)."""


class Py(str):
    """Text the `py` filter made safe for the place the template puts it."""


_TEXT_CHARS = frozenset(chr(c) for c in range(0x20, 0x7F)) - set("\"'\\")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def _text(value: Any) -> str:
    return "".join(c if c in _TEXT_CHARS else "?" for c in str(value))


def _literal(value: Any) -> str:
    """The Python literal of a value; ASCII only, so no character can reorder or break the line."""
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, int):
        return repr(int(value))
    if isinstance(value, float):
        if not math.isfinite(value):
            raise TemplateEmitError(f"no Python literal for the float {value!r}")
        return repr(float(value))
    if isinstance(value, str):
        return ascii(str(value))
    if isinstance(value, list):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    if isinstance(value, tuple):
        return "(" + "".join(_literal(v) + ", " for v in value).rstrip(" ") + ")"
    raise TemplateEmitError(f"no Python literal for a {type(value).__name__}: {value!r}")


def py(value: Any, place: str = "literal") -> Py:
    """The escaping filter: `value` made safe for `place` (`literal`, `text`, `comment` or `ident`)."""
    if place == "literal":
        return Py(_literal(value))
    if place == "text":
        return Py(_text(value))
    if place == "comment":
        lines = value.splitlines() if isinstance(value, str) else list(value)
        return Py("\n".join(f"# {_text(line)}".rstrip() for line in lines))
    if place == "ident":
        if not isinstance(value, str) or not _IDENTIFIER.match(value):
            raise TemplateEmitError(f"not an identifier: {value!r}")
        return Py(value)
    raise ValueError(f"py: unknown place {place!r}; expected literal, text, comment or ident")


def _finalize(value: Any) -> str:
    """Applied by Jinja to every `{{ ... }}` value: see the module docstring."""
    if isinstance(value, Py):
        return value
    if isinstance(value, Identifier):
        return Identifier(str(value))  # re-checked: only [A-Za-z0-9_]
    if isinstance(value, str):
        raise TemplateEmitError(
            f"template emits the string {value!r} without the py filter: write "
            '`| py` (a literal), `| py("text")` (docstring or comment) or `| py("ident")`'
        )
    return _literal(value)


@functools.cache
def jinja_env() -> jinja2.Environment:
    """The one Jinja environment of every generated-code template, with the `py` filter and its guard."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,  # HTML escaping means nothing in Python; `py` and `_finalize` do the escaping
        finalize=_finalize,
    )
    env.filters["py"] = py
    return env


# -- what the comments and docstrings say -------------------------------------------------------------


def compress_indices(indices: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    runs: list[str] = []
    start = prev = indices[0]
    for i in [*indices[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        runs.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ", ".join(runs)


_LAYER = re.compile(r"(?P<stem>.*?\.layers)\.(?P<index>\d+)\.(?P<rest>.+)\Z")


def _fold(names: list[str]) -> str:
    """['self_attn.q_proj', 'self_attn.attention'] -> 'self_attn.{attention, q_proj}'."""
    if len(names) == 1:
        return names[0]
    parts = [n.split(".") for n in names]
    common = 0
    while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    head = ".".join(parts[0][:common])
    tails = ", ".join(sorted(".".join(p[common:]) for p in parts))
    return f"{head}.{{{tails}}}" if head else f"{{{tails}}}"


def ir_lines(nodes: tuple[str, ...] | list[str], width: int = 100) -> list[str]:
    """IR node ids folded for a docstring, `IR: ` first: `model.layers.{1-2, 4}.self_attn.{attention, ...}`.

    Layers with the same members share one entry; entries wrap at `width` with an indented continuation.
    """
    layers: dict[str, dict[int, list[str]]] = {}
    other: list[str] = []
    for n in nodes:
        m = _LAYER.match(n)
        if m is None:
            other.append(n)
        else:
            layers.setdefault(m["stem"], {}).setdefault(int(m["index"]), []).append(m["rest"])
    entries: list[str] = []
    for stem, by_index in layers.items():
        groups: dict[str, list[int]] = {}
        for index, rest in sorted(by_index.items()):
            groups.setdefault(_fold(rest), []).append(index)
        for members, indices in groups.items():
            shown = compress_indices(indices)
            entries.append(f"{stem}.{shown if len(indices) == 1 else '{' + shown + '}'}.{members}")
    if other:
        entries.append(", ".join(other))
    lines: list[str] = []
    for entry in entries:
        lines += textwrap.wrap(
            entry,
            width,
            initial_indent="IR: ",
            subsequent_indent="    ",
            break_on_hyphens=False,
            break_long_words=False,
        )
    return lines


def spec_locations(spec_path: str | None) -> dict[str, str]:
    """`model.attention.swa` -> `examples/x.yaml:24` for the kinds and blocks of a spec file (empty if unreadable).

    Reads the YAML file's positions only (the loader's source map), not a Spec.
    """
    if spec_path is None or not Path(spec_path).is_file():
        return {}
    from lmspec.spec import SpecError
    from lmspec.spec.loader import load

    try:
        positions = load(spec_path).positions
    except SpecError:  # valid only with overrides: the header then names the file without lines
        return {}
    return {
        ".".join(map(str, path)): f"{pos.file}:{pos.line}"
        for path, pos in positions.items()
        if len(path) == 3 and path[0] == "model" and path[1] in ("attention", "ffn", "blocks")
    }


def _used_by(block: BlockPlan) -> str:
    parts = []
    if block.layers:
        parts.append(f"layers {compress_indices(list(block.layers))}")
    if block.in_mtp:
        parts.append("the MTP blocks")
    return " and ".join(parts)


def model_context(
    plan: Plan, spec_path: str | None = None, locations: dict[str, str] | None = None
) -> dict[str, Any]:
    """Everything the model template reads: the plan, and how comments name spec fields and IR nodes."""
    where = locations or {}

    def spec_ref(field: str) -> str:
        return f"{field} ({where[field]})" if field in where else field

    return {
        "plan": plan,
        "spec_path": spec_path,
        "version": lmspec.__version__,
        "torch_version": torch_version(),
        "template": MODEL_TEMPLATE,
        "spec_ref": spec_ref,
        "ir": ir_lines,
        "used_by": _used_by,
    }


@functools.cache
def torch_version() -> str:
    """torch's version from its installed metadata: rendering, and `lmspec compile`, never import torch."""
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:  # a source checkout on sys.path
        import torch

        return torch.__version__


def template_sources() -> bytes:
    """The bytes of every model template: part of the cache key."""
    return b"".join(p.read_bytes() for p in sorted(TEMPLATE_DIR.glob("model*.jinja")))


def _ruff() -> list[str] | None:
    exe = shutil.which("ruff")
    if exe:
        return [exe]
    try:
        import ruff  # noqa: F401
    except ImportError:
        return None
    return [sys.executable, "-m", "ruff"]


def format_source(text: str) -> str:
    """`ruff format` the rendered text when ruff is available; the template is tidy enough without it."""
    cmd = _ruff()
    if cmd is None:
        return text
    try:
        done = subprocess.run(
            [*cmd, "format", "--line-length", "110", "--isolated", "-"],
            input=text,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return text
    return done.stdout if done.returncode == 0 and done.stdout else text


def render_model(
    plan: Plan,
    spec_path: str | None = None,
    locations: dict[str, str] | None = None,
    *,
    format: bool = True,
) -> str:
    """Source text of the model module for this plan (``locations``: see ``spec_locations``)."""
    text = jinja_env().get_template(MODEL_TEMPLATE).render(**model_context(plan, spec_path, locations))
    text = re.sub(r"\n{4,}", "\n\n\n", text)
    return format_source(text) if format else text
