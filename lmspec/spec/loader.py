"""Loading specs: safe YAML with source positions, `extends` composition, `--set` overrides.

Every failure — YAML syntax, duplicate keys, schema violations, a bad pattern, a circular
`extends`, an override on a path that does not exist — becomes one `SpecError` with the file,
line and column of the offending text.

Input is bounded before it costs anything (see `lmspec.spec.limits`): a path is `stat`ed before it
is opened and anything but a regular file is refused (so `/dev/zero` and FIFOs are never read); a
spec's files hold at most `MAX_FILE_BYTES` together; YAML is composed with its nodes counted and
its nesting bounded (`MAX_YAML_VALUES`, `MAX_NESTING`), so scanning stops at the limit, then built
with every value counted again, aliases expanded; `extends` chains are at most `MAX_EXTENDS_DEPTH`
files; `--set` values go through the same loader as files. What an error quotes from the input is
cut to `MAX_QUOTE_CHARS`.
"""

from __future__ import annotations

import difflib
import errno
import hashlib
import itertools
import json
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from lmspec.errors import SpecError
from lmspec.files import not_regular
from lmspec.spec.limits import (
    MAX_EXTENDS_DEPTH,
    MAX_FILE_BYTES,
    MAX_NESTING,
    MAX_QUOTE_CHARS,
    MAX_YAML_VALUES,
    NAME_PATTERN,
    clip,
    quote,
)
from lmspec.spec.pattern import PatternError
from lmspec.spec.schema import Spec

Path_ = tuple[str | int, ...]

# The "file" of a position inside a `--set PATH=VALUE`; its line is which --set (1-based).
SET_FILE = "--set"


@dataclass(frozen=True)
class Pos:
    """Where a mapping entry came from: its key, and the start of its value."""

    file: str
    line: int
    col: int
    value_line: int
    value_col: int
    value_style: str | None  # None for plain scalars, '"' or "'" for quoted ones


@dataclass(frozen=True)
class LoadedSpec:
    spec: Spec
    positions: dict[Path_, Pos]
    path: str
    data: dict


def _fmt_path(path: Path_) -> str:
    return clip(".".join(str(p) for p in path))


_SCALAR_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "timestamp")}


def _tag(node: yaml.Node) -> str:
    """A tag as the user wrote it: `!!binary`, `!foo`."""
    return node.tag.replace("tag:yaml.org,2002:", "!!")


class _Builder:
    """Plain Python data from a composed YAML node, recording the position of every path.

    Values are counted as they are built, so an alias bomb (`&a [*a, *a]` nested) stops at
    `MAX_YAML_VALUES` however small its text; a self-referencing alias stops at `MAX_NESTING`.
    """

    def __init__(self, file: str, positions: dict[Path_, Pos]) -> None:
        self.file = file
        self.positions = positions
        self.values = 0
        self.scalars = yaml.SafeLoader("")  # constructs plain scalars only; reused for every one

    def _error(self, node: yaml.Node, path: Path_, message: str) -> SpecError:
        return SpecError(
            self.file, node.start_mark.line + 1, node.start_mark.column + 1, _fmt_path(path), message
        )

    def _pos(self, key_node: yaml.Node, value_node: yaml.Node) -> Pos:
        style = value_node.style if isinstance(value_node, yaml.ScalarNode) else None
        return Pos(
            self.file,
            key_node.start_mark.line + 1,
            key_node.start_mark.column + 1,
            value_node.start_mark.line + 1,
            value_node.start_mark.column + 1,
            style,
        )

    def build(self, node: yaml.Node, path: Path_ = ()) -> Any:
        self.values += 1
        if self.values > MAX_YAML_VALUES:
            raise self._error(
                node, path, f"expected at most {MAX_YAML_VALUES} YAML values (aliases expanded), got more"
            )
        if len(path) > MAX_NESTING:
            raise self._error(node, path, f"expected at most {MAX_NESTING} levels of nesting, got more")
        if isinstance(node, yaml.MappingNode):
            if node.tag != "tag:yaml.org,2002:map":
                raise self._error(node, path, f"expected a plain mapping, got one tagged {_tag(node)!r}")
            return self._mapping(node, path)
        if isinstance(node, yaml.SequenceNode):
            if node.tag != "tag:yaml.org,2002:seq":
                raise self._error(node, path, f"expected a plain list, got one tagged {_tag(node)!r}")
            items = []
            for i, item in enumerate(node.value):
                self.positions[(*path, i)] = self._pos(item, item)
                items.append(self.build(item, (*path, i)))
            return items
        if node.tag not in _SCALAR_TAGS:
            raise self._error(node, path, f"expected a plain value, got one tagged {_tag(node)!r}")
        try:
            return self.scalars.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError, TypeError, OverflowError):
            # An explicit tag the text does not fit, such as `!!float x` or `!!timestamp 2020-99-99`.
            raise self._error(
                node, path, f"expected a value of type {node.tag.rsplit(':', 1)[-1]}, got {quote(node.value)}"
            ) from None

    def _mapping(self, node: yaml.MappingNode, path: Path_) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise self._error(
                    key_node, path, "expected plain keys, got a YAML merge key '<<' (use extends:)"
                )
            if not isinstance(key_node, yaml.ScalarNode):
                raise self._error(key_node, path, "expected a string key, got a complex key")
            key = str(key_node.value)  # the key as written: `1:` is the name "1", never the number
            child = (*path, key)
            if key in out:
                raise self._error(
                    key_node,
                    child,
                    f"expected each key once, got a duplicate of the key on line {self.positions[child].line}",
                )
            self.positions[child] = self._pos(key_node, value_node)
            out[key] = self.build(value_node, child)
        return out


class _TooMany(Exception):
    def __init__(self, mark: yaml.Mark, message: str) -> None:
        self.mark = mark
        self.message = message


class _BoundedLoader(yaml.SafeLoader):
    """A SafeLoader whose composer stops at `MAX_YAML_VALUES` nodes or `MAX_NESTING` levels.

    PyYAML composes the whole document before anything is built, and scans lazily: stopping here
    means a 1 MiB list of numbers is refused after its first few kilobytes, not after 20 s and
    hundreds of MB of nodes. (Aliases are counted again, expanded, by `_Builder`.)
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.nodes = 0
        self.depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        self.nodes += 1
        if self.nodes > MAX_YAML_VALUES:
            mark = self.peek_event().start_mark
            raise _TooMany(
                mark, f"expected at most {MAX_YAML_VALUES} YAML values (aliases expanded), got more"
            )
        if self.depth > MAX_NESTING:
            raise _TooMany(
                self.peek_event().start_mark, f"expected at most {MAX_NESTING} levels of nesting, got more"
            )
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _compose(text: str) -> yaml.Node | None:
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_node()
    finally:
        loader.dispose()


def _parse_yaml(text: str, file: str) -> tuple[Any, dict[Path_, Pos]]:
    if len(text) > MAX_FILE_BYTES:
        raise SpecError(
            file, 0, 0, "", f"expected at most {MAX_FILE_BYTES} characters of YAML, got {len(text)}"
        )
    try:
        node = _compose(text)
    except _TooMany as e:
        raise SpecError(file, e.mark.line + 1, e.mark.column + 1, "", e.message) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (0, 0)
        problem = clip((e.problem or "invalid YAML").strip())
        raise SpecError(file, line, col, "", f"YAML syntax: {problem}") from None
    except yaml.YAMLError as e:
        raise SpecError(file, 0, 0, "", f"YAML syntax: {clip(str(e))}") from None
    positions: dict[Path_, Pos] = {}
    if node is None:
        return {}, positions
    builder = _Builder(file, positions)
    try:
        return builder.build(node), positions
    finally:
        builder.scalars.dispose()


def _deep_merge(base: Any, over: Any, path: Path_ = (), replaced: list[Path_] | None = None) -> Any:
    """Mappings merge key by key; anything else in `over` replaces what `base` had.

    Paths where `over` replaced a value of `base` are appended to `replaced`, so the positions
    recorded under them in the base file can be dropped.
    """
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = _deep_merge(base[k], v, (*path, k), replaced) if k in base else v
        return out
    if replaced is not None:
        replaced.append(path)
    return over


def read_text(path: Path, limit: int = MAX_FILE_BYTES, what: str = "spec file") -> str:
    """The UTF-8 text of a spec file, refusing before reading anything that is not a small regular file.

    The path is `stat`ed first, so `/dev/zero`, a FIFO or a directory is never opened; the file is
    then opened non-blocking (a FIFO swapped in after the `stat` cannot hang the read), checked
    again on its descriptor, and read to at most `limit` + 1 bytes (`MAX_FILE_BYTES` by default).
    """
    shown = clip(str(path))
    data = b""

    def refuse(message: str) -> SpecError:
        return SpecError(shown, 0, 0, "", message)

    try:
        info = os.stat(path)
        if not_regular(info.st_mode) is None and info.st_size <= limit:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
            with os.fdopen(fd, "rb") as f:
                info = os.fstat(fd)
                data = f.read(limit + 1) if not_regular(info.st_mode) is None else b""
    except FileNotFoundError:
        raise refuse(f"expected a {what}, got a path that does not exist") from None
    except OSError as e:
        reason = os.strerror(e.errno) if e.errno else type(e).__name__
        if e.errno == errno.ENOENT:
            reason = "a path that does not exist"
        raise refuse(f"expected a readable {what}, got {reason.lower()}") from None
    except ValueError:  # a NUL character in the path
        raise refuse("expected a file path, got one with a NUL character") from None
    kind = not_regular(info.st_mode)
    if kind is not None:
        raise refuse(f"expected a regular file, got {kind}")
    if info.st_size > limit or len(data) > limit:
        if limit < MAX_FILE_BYTES:  # the files before it in an extends chain used the rest
            raise refuse(
                f"expected the files of one spec to hold at most {MAX_FILE_BYTES} bytes together, got more"
            )
        raise refuse(f"expected a {what} of at most {limit} bytes, got {max(info.st_size, len(data))}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise SpecError(
            shown, line, col, "", f"expected UTF-8 text, got the byte 0x{data[e.start]:02x}"
        ) from None


def _resolved(path: Path) -> Path:
    """`path` with symlinks resolved; as given when that fails (the read then says why)."""
    try:
        return path.resolve()
    except (OSError, RuntimeError, ValueError):  # RuntimeError: a symlink loop (Python < 3.13)
        return path


def _load_file(
    path: Path, stack: tuple[Path, ...], budget: int = MAX_FILE_BYTES
) -> tuple[dict, dict[Path_, Pos]]:
    """Read one file and, first, the files it extends (`stack`: the files extending this one).

    `budget` is what is left of `MAX_FILE_BYTES` for this file and its parents: a spec's files hold
    at most that much together, so a chain of extends costs no more than one file.
    """
    shown = clip(str(path))
    text = read_text(path, budget)
    data, positions = _parse_yaml(text, shown)
    if not isinstance(data, dict):
        raise SpecError(shown, 1, 1, "", f"expected a mapping at the top level, got {type(data).__name__}")
    parent = data.pop("extends", None)
    if parent is None:
        return data, positions
    pos = positions[("extends",)]
    if not isinstance(parent, str):
        raise SpecError(shown, pos.line, pos.col, "extends", f"expected a file path, got {quote(parent)}")
    chain = (*stack, _resolved(path))
    if len(chain) >= MAX_EXTENDS_DEPTH:
        raise SpecError(
            shown,
            pos.value_line,
            pos.value_col,
            "extends",
            f"expected a chain of at most {MAX_EXTENDS_DEPTH} files through extends, got more",
        )
    parent_path = path.parent / parent
    if _resolved(parent_path) in chain:
        # Point at the `extends` that closes the loop, in the file that wrote it.
        names = " -> ".join(p.name for p in (*chain, _resolved(parent_path)))
        raise SpecError(
            shown,
            pos.value_line,
            pos.value_col,
            "extends",
            clip(f"expected an acyclic chain of extends, got a cycle: {names}"),
        )
    try:
        base, base_positions = _load_file(parent_path, chain, budget - len(text.encode("utf-8")))
    except SpecError as e:
        if e.line == 0 and e.file == clip(str(parent_path)):
            # The parent could not be read: say so at the `extends` that names it.
            message = (
                f"expected an existing spec file, got {quote(parent)}"
                if "does not exist" in e.message
                else f"{e.message} ({quote(parent)})"
            )
            raise SpecError(shown, pos.value_line, pos.value_col, "extends", message) from None
        raise
    replaced: list[Path_] = []
    merged = _deep_merge(base, data, (), replaced)
    for prefix in replaced:
        for stale in [p for p in base_positions if p[: len(prefix)] == prefix]:
            del base_positions[stale]
    base_positions.update(positions)
    return merged, base_positions


# ---------------------------------------------------------------------------------------------
# --set overrides
# ---------------------------------------------------------------------------------------------


def _annotation_at(path: Path_, data: Any) -> Any:
    """The type that describes the value at `path` (following the data's `kind` through unions)."""
    cls: Any = Spec
    node = data
    for part in path:
        ann = _field_annotation(cls, part, node)
        if ann is None:
            return None
        node = (
            node.get(part)
            if isinstance(node, dict)
            else (
                node[part] if isinstance(node, list) and isinstance(part, int) and part < len(node) else None
            )
        )
        cls = _resolve(ann, node)
    return cls


def _model_for(path: Path_, data: Any) -> type[BaseModel] | None:
    """The Pydantic model that describes the mapping at `path`, if a model does."""
    cls = _annotation_at(path, data)
    return cls if isinstance(cls, type) and issubclass(cls, BaseModel) else None


def _strip(ann: Any) -> Any:
    while typing.get_origin(ann) is typing.Annotated:
        ann = typing.get_args(ann)[0]
    return ann


def _resolve(ann: Any, node: Any) -> Any:
    ann = _strip(ann)
    origin = typing.get_origin(ann)
    if origin in (typing.Union, types.UnionType):
        options = [_strip(a) for a in typing.get_args(ann) if a is not type(None)]
        models = [a for a in options if isinstance(a, type) and issubclass(a, BaseModel)]
        if isinstance(node, dict) and "kind" in node:
            for m in models:
                kind = m.model_fields.get("kind")
                if kind is not None and kind.default == node["kind"]:
                    return m
        if len(options) == 1:
            return _resolve(options[0], node)
        return models[0] if len(models) == 1 else ann
    return ann


def _field_annotation(cls: Any, part: str | int, node: Any) -> Any:
    cls = _resolve(cls, node)
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        return field.annotation if field is not None else None
    origin = typing.get_origin(cls)
    if origin is dict:
        return typing.get_args(cls)[1]
    if origin in (list, tuple) and isinstance(part, int):
        return typing.get_args(cls)[0]
    return None


def allowed_keys(path: Path_, data: Any) -> list[str]:
    model = _model_for(path, data)
    return sorted(model.model_fields) if model is not None else []


def suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _accepts_any_key(path: Path_, data: Any) -> bool:
    """Whether the mapping at `path` is a free-form dict (`model.blocks`, ...) rather than a model."""
    return typing.get_origin(_strip(_annotation_at(path, data))) is dict


def _set_pos(index: int, col: int, value_col: int, raw: str) -> Pos:
    """A position inside the index-th `--set` (line = which --set, col = column in its text)."""
    text = raw.lstrip()
    style = text[0] if text[:1] in ('"', "'") else None
    return Pos(SET_FILE, index, col, index, value_col, style)


def _set_value(raw: str, index: int, value_col: int, dotted: str) -> Any:
    """The YAML value of a `--set`, built by the same capped builder as a file (alias bombs stop)."""
    if not raw.strip():
        return ""
    try:
        value, _ = _parse_yaml(raw, SET_FILE)
    except SpecError as e:
        # Re-point the error from the value's own text at its column inside this --set.
        col = value_col + (e.col - 1 if e.line == 1 else 0)
        syntax = e.message.startswith("YAML syntax")
        message = f"expected a YAML value, got {quote(raw)}" if syntax else e.message
        raise SpecError(SET_FILE, index, max(col, 1), clip(dotted), message) from None
    return value


def apply_override(
    data: dict, assignment: str, positions: dict[Path_, Pos] | None = None, index: int = 1
) -> dict:
    """Apply one `path.to.field=value` (value parsed as YAML) to `data`; the path must exist.

    With `positions`, the overridden path (and everything under it) is re-pointed at this
    `--set`, so a later error in the value says `--set:<index>:<col>` instead of the file.
    """
    if "=" not in assignment:
        raise SpecError(SET_FILE, index, 1, clip(assignment), "expected path.to.field=value, got no '='")
    dotted, raw = assignment.split("=", 1)
    field = clip(dotted)
    value_col = len(dotted) + 2 + len(raw) - len(raw.lstrip())
    names = dotted.split(".")
    starts = list(itertools.accumulate((len(n) + 1 for n in names[:-1]), initial=1))
    # A list index is a short run of digits; a 5000-digit "index" stays a name (and is not found).
    parts: list[str | int] = [
        int(p) if p.strip().isdigit() and len(p.strip()) < 10 else p.strip() for p in names
    ]
    if any(p == "" for p in parts):
        bad = next(i for i, p in enumerate(parts) if p == "")
        raise SpecError(
            SET_FILE, index, starts[bad], field, "expected a dotted path of field names, got an empty name"
        )
    value = _set_value(raw, index, value_col, dotted)
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        here = tuple(parts[:i])
        col = starts[i]
        if isinstance(node, list):
            if not isinstance(part, int) or not 0 <= part < len(node):
                raise SpecError(
                    SET_FILE,
                    index,
                    col,
                    field,
                    f"expected an index below {len(node)} at {_fmt_path((*here, part))}, got {quote(part)}",
                )
        elif isinstance(node, dict):
            if part not in node:
                keys = allowed_keys(here, data)
                if not last and part in keys and _model_for((*here, part), data) is not None:
                    # A section left to its defaults (`training.parallel`): --set one of its fields.
                    node[part] = {}
                elif not (last and (part in keys or _accepts_any_key(here, data))):
                    options = sorted(set(keys) | {str(k) for k in node})
                    raise SpecError(
                        SET_FILE,
                        index,
                        col,
                        field,
                        f"expected an existing field at {_fmt_path((*here, part))}, got {quote(part)}"
                        + suggest(str(part), options),
                    )
        else:
            raise SpecError(
                SET_FILE,
                index,
                col,
                field,
                f"expected a mapping or list at {_fmt_path(here) or 'the top level'}, got a value",
            )
        if last:
            node[part] = value
        else:
            node = node[part]
    if positions is not None:
        target = tuple(parts)
        for path in [p for p in positions if p[: len(target)] == target]:
            del positions[path]
        positions[target] = _set_pos(index, 1, value_col, raw)
    return data


# ---------------------------------------------------------------------------------------------
# Validation errors -> SpecError
# ---------------------------------------------------------------------------------------------

_EXPECTED = {
    "int_parsing": "an integer",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_parsing": "a number",
    "float_type": "a number",
    "bool_parsing": "true or false",
    "bool_type": "true or false",
    "string_type": "a string",
    "dict_type": "a mapping",
    "list_type": "a list",
    "tuple_type": "a list",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "finite_number": "a finite number",
}


def _position_for(loc: Path_, positions: dict[Path_, Pos]) -> Pos | None:
    """The position of `loc`, else of its nearest ancestor that has one."""
    for n in range(len(loc), 0, -1):
        if loc[:n] in positions:
            return positions[loc[:n]]
    return None


def _clean_loc(loc: tuple, data: Any) -> Path_:
    """Drop Pydantic's union-branch tags (e.g. 'sliding', 'function-after[...]') from a location."""
    out: list[str | int] = []
    node = data
    for part in loc:
        if part == "[key]":  # a dict key that failed validation: the key itself is the location
            continue
        if isinstance(node, dict) and part in node:
            out.append(part)
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int):
            out.append(part)
            node = node[part] if part < len(node) else None
        elif (
            isinstance(node, dict)
            and isinstance(part, str)
            and not (
                part.startswith("function-")
                or part in ("global", "sliding", "dense", "moe")
                and part == node.get("kind")
            )
        ):
            out.append(part)
            node = None
    return tuple(out)


def _translate(err: dict, data: dict, positions: dict[Path_, Pos], file: str) -> SpecError:
    loc = _clean_loc(tuple(err["loc"]), data)
    field = _fmt_path(loc)
    pos = _position_for(loc, positions)
    kind = err["type"]
    got = err.get("input")
    if kind == "extra_forbidden":
        key = str(loc[-1]) if loc else "?"
        options = allowed_keys(loc[:-1], data)
        message = f"expected one of the known fields, got unknown key {quote(key)}" + suggest(key, options)
    elif kind == "missing":
        parent = _position_for(loc[:-1], positions)
        message = "expected this required field, got nothing"
        # A field missing at the top level: point at the start of the file.
        pos = parent if parent is not None or len(loc) > 1 else Pos(file, 1, 1, 1, 1, None)
    elif kind == "union_tag_invalid" or kind == "union_tag_not_found":
        ctx = err.get("ctx", {})
        message = (
            f"expected kind one of {ctx.get('expected_tags', '?')}, got {quote(ctx.get('tag', 'no kind'))}"
        )
    elif kind == "literal_error":
        message = f"expected {err['ctx']['expected']}, got {quote(got)}"
    elif kind == "string_pattern_mismatch":
        message = f"expected a name matching {NAME_PATTERN.strip('^$')}, got {quote(got)}"
    elif kind in _EXPECTED:
        message = f"expected {_EXPECTED[kind]}, got {quote(got)}"
    elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        sym = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[
            kind
        ]
        bound = next(iter(err["ctx"].values()))
        message = f"expected a value {sym} {bound}, got {quote(got)}"
    elif kind in ("too_short", "too_long"):
        ctx = err.get("ctx", {})
        bound = ctx.get("min_length") if kind == "too_short" else ctx.get("max_length")
        size = ctx.get("actual_length", len(got) if isinstance(got, (list, dict, str)) else "?")
        what = "item" if isinstance(got, list) else "entry"
        message = f"expected {'at least' if kind == 'too_short' else 'at most'} {bound} {what}(s), got {size}"
    elif kind == "value_error":
        cause = err.get("ctx", {}).get("error")
        if isinstance(cause, PatternError):
            layers = positions.get(("model", "layers"))
            if layers is not None:
                opening = 1 if layers.value_style in ('"', "'") else 0
                return SpecError(
                    layers.file,
                    layers.value_line,
                    layers.value_col + opening + cause.offset,
                    "model.layers",
                    cause.short,
                )
            return SpecError(file, 0, 0, "model.layers", cause.short)
        message = str(cause) if cause is not None else err["msg"]
        # Validators name the sub-field they reject as "sub.field: message"; locate it precisely.
        head, sep, rest = message.partition(": ")
        if sep and " " not in head:
            sub = tuple(int(p) if p.isdigit() else p for p in head.split("."))
            for candidate in ((*loc, *sub), sub):
                if candidate in positions:
                    return SpecError(
                        positions[candidate].file,
                        positions[candidate].line,
                        positions[candidate].col,
                        _fmt_path(candidate),
                        rest,
                    )
            field = _fmt_path((*loc, *sub))
            message = rest
    else:
        message = f"expected {err['msg'][0].lower() + err['msg'][1:]}, got {quote(got)}"
    message = clip(message, 4 * MAX_QUOTE_CHARS)  # validators' messages list names; keep the line short
    if pos is None:
        return SpecError(file, 0, 0, field, message)
    return SpecError(pos.file, pos.line, pos.col, field, message)


def validate(data: dict, positions: dict[Path_, Pos], file: str) -> Spec:
    """The validated spec, its stages' paths made absolute (each relative to the file that writes it)."""
    try:
        spec = Spec.model_validate(data)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        raise _translate(errors[0], data, positions, file) from None
    from lmspec.spec.stages import resolve_stage_paths  # it imports this module

    return resolve_stage_paths(LoadedSpec(spec=spec, positions=positions, path=file, data=data), spec)


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> LoadedSpec:
    """Load, compose, override and validate a spec file; raise SpecError on any user error."""
    path = Path(path)
    data, positions = _load_file(path, ())
    for index, assignment in enumerate(overrides, start=1):
        data = apply_override(data, assignment, positions, index)
    spec = validate(data, positions, str(path))
    return LoadedSpec(spec=spec, positions=positions, path=str(path), data=data)


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Spec:
    """Load a spec file (with `extends` and `--set` overrides) into a validated `Spec`."""
    return load(path, overrides).spec


def loads_spec(text: str, name: str = "<string>") -> Spec:
    """Validate a spec given as YAML text (no `extends`)."""
    data, positions = _parse_yaml(text, name)
    if not isinstance(data, dict):
        raise SpecError(name, 1, 1, "", f"expected a mapping at the top level, got {type(data).__name__}")
    return validate(data, positions, name)


class _Dumper(yaml.SafeDumper):
    """Safe YAML out, with strings that hold a line-break character double-quoted.

    PyYAML writes U+0085 (NEL) raw in plain and single-quoted scalars, and its reader then takes
    it for a line break, so such a string would not load back as itself.
    """


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = '"' if any(c in value for c in "\x85\u2028\u2029") else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def to_yaml(data: Any) -> str:
    """YAML text for plain data that `yaml.safe_load` reads back equal; key order kept."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True)


def dump_spec(spec: Spec) -> str:
    """Canonical YAML for a spec: every field explicit, keys in schema order; loads back equal."""
    return to_yaml(spec_to_data(spec))


def spec_to_data(spec: Spec) -> dict:
    return json.loads(spec.model_dump_json())


def spec_hash(spec: Spec) -> str:
    """Content hash of the canonical spec (sha256 of its JSON with sorted keys)."""
    canonical = json.dumps(spec_to_data(spec), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
