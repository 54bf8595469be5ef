"""Sweep specs: a base spec, what to vary it by, the seeds and the token budget.

A sweep file is YAML, read by the same position-keeping loader as a spec and validated by the same
rules, so every mistake is one `file:line:col: field: expected X, got Y` line:

    name: window_sink                      # the sweep's name (an identifier)
    base: ../mimo_v2_flash_tiny.yaml       # the spec every variant starts from, relative to this file
    set: {training.document_masking: true} # overrides of that base for every run (not in any diff)
    seeds: 2                               # training.seed 0 and 1; or a list, e.g. [0, 7]
    max_tokens: 3.0e5                      # or scale: 0.25; every run's schedule shrunk alike
    combine: product                       # every combination of the axes' values; zip: the i-th of each
    axes:                                  # a spec field path -> the values it takes
      model.attention.swa.window: [16, 32, 64]
      model.attention.swa.sink: [true, false]
    variants:                              # named variants for what a grid cannot say
      all_global: {set: {model.layers: "G0 G*6"}}
      other: {extends: ../some_other_spec.yaml}   # another spec file instead of base
    eval: {passkey_depths: [0.1, 0.5, 0.9]}       # options of `lmspec eval` on every finished run

The runs are: each variant (the base itself when there are none, labelled `base`) crossed with each
point of the axes, crossed with each seed. The sweep's `set`, a variant's `set` and an axis are all
`--set PATH=VALUE` overrides of the variant's spec file, applied in that order, then `training.seed`.

`load_sweep` validates the sweep file and then every run's spec, before anything trains: an unknown
field path is located at the axis or `set` key that names it, a value the spec refuses at that value
(each axis value has its own position), and a combination that breaks a rule of the base file (an
axis making `max_position_embeddings` smaller than a stage's `seq_len`) at the run's first override,
with the base file's own `file:line:col` in the message. `sweep_from_args` is the same for
`lmspec sweep BASE.yaml --vary PATH=v1,v2`, located as `--vary:N:col`.
"""

from __future__ import annotations

import copy
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, Strict, ValidationError, model_validator

from lmspec.errors import SpecError
from lmspec.spec import limits
from lmspec.spec.loader import (
    SET_FILE,
    Pos,
    _load_file,
    _parse_yaml,
    _translate,
    apply_override,
    read_text,
    suggest,
    validate,
)
from lmspec.spec.schema import Name, Number, Positions, Spec, StrictModel

__all__ = ["EvalOptions", "Sweep", "SweepPoint", "SweepSpec", "Variant", "load_sweep", "sweep_from_args"]

# A sweep is a handful to a few hundred runs; a product of long axes is a typo, refused before expanding.
MAX_SWEEP_RUNS = 1024
MAX_AXES = 16
MAX_AXIS_VALUES = 256
VARY_FILE = "--vary"
BASE_LABEL = "base"

Path_ = tuple[str | int, ...]
SeedList = Annotated[list[Annotated[int, Strict(), Field(ge=0, le=limits.MAX_SEED)]], Field(min_length=1)]
Text = Annotated[str, Strict(), Field(min_length=1, max_length=4096)]
Fraction = Annotated[Number, Field(ge=0.0, le=1.0)]
Count = Annotated[int, Strict(), Field(ge=1, le=100_000)]


class Variant(StrictModel):
    """A named variant: the base (or the `extends` file) with the `set` overrides applied."""

    extends: Text | None = Field(
        None, description="A spec file used instead of base (relative to the sweep)."
    )
    set: dict[Text, Any] = Field(
        default_factory=dict, description="Field path -> value, as `--set PATH=VALUE`."
    )


class EvalOptions(StrictModel):
    """What `lmspec eval` measures on every finished run (defaults: see lmspec.train.evaluate)."""

    eval_tokens: Count = Field(16384, description="Held-out tokens for the position-bucket bits/byte.")
    passkey_lengths: list[Positions] | None = Field(
        None, description="Passkey context lengths (default: doubling up to the longest stage's seq_len)."
    )
    passkey_depths: Annotated[list[Fraction], Field(min_length=1, max_length=64)] = [0.1, 0.5, 0.9]
    passkey_trials: Count = Field(8, description="Passkey sequences per length x depth.")
    mtp_prompts: Count = Field(4, description="Held-out prompts decoded greedily for the MTP acceptance.")
    mtp_new_tokens: Count = Field(48, description="Tokens generated per prompt for the MTP acceptance.")


class SweepSpec(StrictModel):
    """A sweep file, validated; the runs it stands for come from `load_sweep`."""

    name: Name
    base: Text = Field(description="The spec file every variant starts from, relative to the sweep file.")
    set: dict[Text, Any] = Field(
        default_factory=dict,
        description="Overrides of the base for every run (part of the base, not a diff).",
    )
    seeds: Annotated[int, Strict(), Field(ge=1, le=MAX_SWEEP_RUNS)] | SeedList = 1
    max_tokens: Annotated[Number, Field(gt=0.0)] | None = None
    scale: Annotated[Number, Field(gt=0.0)] | None = None
    combine: Literal["product", "zip"] = "product"
    axes: Annotated[
        dict[Text, Annotated[list[Any], Field(min_length=1, max_length=MAX_AXIS_VALUES)]],
        Field(max_length=MAX_AXES),
    ] = Field(default_factory=dict)
    variants: Annotated[dict[Name, Variant], Field(max_length=MAX_SWEEP_RUNS)] = Field(default_factory=dict)
    data: list[Text] | None = Field(None, description="Training data (files, globs), relative to the sweep.")
    tokenizer: Text | None = Field(None, description="tokenizer.json, relative to the sweep file.")
    eval: EvalOptions = EvalOptions()

    @model_validator(mode="after")
    def _check(self) -> SweepSpec:
        if self.max_tokens is not None and self.scale is not None:
            raise ValueError("scale: expected max_tokens or scale, not both, got both")
        if isinstance(self.seeds, list) and len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: expected distinct seeds, got {self.seeds}")
        lengths = {len(v) for v in self.axes.values()}
        if self.combine == "zip" and len(lengths) > 1:
            raise ValueError(
                f"axes: expected lists of one length with combine: zip, got lengths {sorted(lengths)}"
            )
        if self.points * max(len(self.variants), 1) * len(self.seed_list) > MAX_SWEEP_RUNS:
            raise ValueError(f"axes: expected at most {MAX_SWEEP_RUNS} runs in all, got more")
        return self

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)

    @property
    def points(self) -> int:
        """How many points the axes make (1 without axes)."""
        sizes = [len(v) for v in self.axes.values()]
        if not sizes:
            return 1
        return min(sizes) if self.combine == "zip" else _product(sizes)


def _product(sizes: list[int]) -> int:
    n = 1
    for s in sizes:
        n = min(n * s, MAX_SWEEP_RUNS + 1)  # no more than needed to know it is too many
    return n


@dataclass(frozen=True)
class SweepPoint:
    """One run of a sweep: a variant at one point of the axes, with one seed.

    `label` names the variant and point (`all_global`, `window=16,sink=false`, `wide/window=16`); runs
    that differ only in their seed share it. `settings` are the overrides as (path, value), in the
    order applied. `spec` is validated, unscaled, with `training.seed = seed`.
    """

    label: str
    variant: str
    settings: tuple[tuple[str, Any], ...]
    seed: int
    spec: Spec
    spec_file: str


@dataclass(frozen=True)
class Sweep:
    """A validated sweep: its spec, where its relative paths start, the base spec and every run."""

    spec: SweepSpec
    file: str
    root: Path
    base: Spec
    points: list[SweepPoint] = field(default_factory=list)

    def path(self, relative: str) -> Path:
        """A path the sweep file wrote, relative to the sweep file's folder."""
        return self.root / relative

    @property
    def labels(self) -> list[str]:
        """Variant labels in run order, each once."""
        return list(dict.fromkeys(p.label for p in self.points))


# ---------------------------------------------------------------------------------------------
# Validation of the sweep file itself
# ---------------------------------------------------------------------------------------------

_SECTIONS: dict[str, type[StrictModel]] = {"variants": Variant, "eval": EvalOptions}


def _known_fields(loc: Path_) -> list[str]:
    """The field names allowed at `loc` (for the closest-name hint of an unknown key)."""
    if len(loc) == 0:
        return sorted(SweepSpec.model_fields)
    if loc[0] == "eval" and len(loc) == 1:
        return sorted(EvalOptions.model_fields)
    if loc[0] == "variants" and len(loc) == 2:
        return sorted(Variant.model_fields)
    return []


def _validate(data: Any, positions: dict[Path_, Pos], file: str) -> SweepSpec:
    if not isinstance(data, dict):
        raise SpecError(file, 1, 1, "", f"expected a mapping at the top level, got {type(data).__name__}")
    try:
        return SweepSpec.model_validate(data)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        located = _translate(err, data, positions, file)
        if err["type"] == "extra_forbidden":
            key = str(err["loc"][-1])
            options = _known_fields(tuple(err["loc"][:-1]))
            located.message = f"expected one of the known fields, got unknown key {key!r}" + suggest(
                key, options
            )
        raise located from None


# ---------------------------------------------------------------------------------------------
# Expansion and validation of every run
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Override:
    path: str
    value: Any
    key_pos: Pos | None  # where the path is written
    value_pos: Pos | None  # where the value is written


def _at(file: str, pos: Pos | None, field_: str, message: str, *, value: bool) -> SpecError:
    if pos is None:
        return SpecError(file, 0, 0, field_, message)
    line, col = (pos.value_line, pos.value_col) if value else (pos.line, pos.col)
    return SpecError(pos.file, line, col, field_, message)


def _spec_for(
    sweep_file: str,
    overrides: list[_Override],
    spec_file: Path,
    cache: dict[Path, tuple[dict, dict]],
    label: str,
) -> Spec:
    """Apply `overrides` to `spec_file` and validate, locating every error in the sweep where it can."""
    if spec_file not in cache:
        cache[spec_file] = _load_file(spec_file, ())
    data, positions = copy.deepcopy(cache[spec_file][0]), dict(cache[spec_file][1])
    for index, o in enumerate(overrides, start=1):
        try:
            apply_override(data, f"{o.path}={json.dumps(o.value)}", positions, index)
        except SpecError as e:
            # e.col is the column of the offending name inside the path (a plain key): point at it.
            at = _at(sweep_file, o.key_pos, e.field, e.message, value=False)
            raise SpecError(
                at.file, at.line, at.col + max(e.col - 1, 0) if at.line else 0, at.field, at.message
            ) from None
    try:
        return validate(data, positions, str(spec_file))
    except SpecError as e:
        error = e
    if error.file == SET_FILE and 1 <= error.line <= len(overrides):
        o = overrides[error.line - 1]
        raise _at(sweep_file, o.value_pos, error.field, f"{error.message} (in {label})", value=True)
    if not overrides:
        raise error
    # A rule of the spec file that the combination breaks: point at the run's first override.
    first = overrides[0]
    raise _at(sweep_file, first.value_pos, first.path, f"{label} breaks {error}", value=True)


def _axis_points(s: SweepSpec, positions: dict[Path_, Pos]) -> list[list[_Override]]:
    """The axes' points, each a list of overrides in axis order."""
    per_axis = [
        [
            _Override(path, v, positions.get(("axes", path)), positions.get(("axes", path, i)))
            for i, v in enumerate(values)
        ]
        for path, values in s.axes.items()
    ]
    if not per_axis:
        return [[]]
    combos = zip(*per_axis, strict=False) if s.combine == "zip" else itertools.product(*per_axis)
    return [list(c) for c in combos]


def _short_names(paths: list[str]) -> dict[str, str]:
    """Each axis path by its last name, or the whole path where two axes share a last name."""
    last = [p.rsplit(".", 1)[-1] for p in paths]
    return {p: (n if last.count(n) == 1 else p) for p, n in zip(paths, last, strict=True)}


def _value_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _label(variant: str | None, point: list[_Override], names: dict[str, str]) -> str:
    grid = ",".join(f"{names[o.path]}={_value_text(o.value)}" for o in point)
    if variant is None:
        return grid or BASE_LABEL
    return f"{variant}/{grid}" if grid else variant


def _seed_override(s: SweepSpec, seed: int, index: int, positions: dict[Path_, Pos]) -> _Override:
    pos = positions.get(("seeds", index)) or positions.get(("seeds",))
    return _Override("training.seed", seed, pos, pos)


def _base_sets(s: SweepSpec, positions: dict[Path_, Pos]) -> list[_Override]:
    return [_Override(p, v, positions.get(("set", p)), positions.get(("set", p))) for p, v in s.set.items()]


def _expand(
    s: SweepSpec, file: str, root: Path, positions: dict[Path_, Pos], base_file: Path
) -> list[SweepPoint]:
    names = _short_names(list(s.axes))
    variants: list[tuple[str | None, Variant]] = list(s.variants.items()) or [(None, Variant())]
    cache: dict[Path, tuple[dict, dict]] = {}
    out: list[SweepPoint] = []
    for name, v in variants:
        spec_file = base_file if v.extends is None else root / v.extends
        if v.extends is not None:
            _check_readable(
                spec_file, file, positions.get(("variants", name, "extends")), f"variants.{name}.extends"
            )
        sets = [
            _Override(
                p,
                val,
                positions.get(("variants", name, "set", p)),
                positions.get(("variants", name, "set", p)),
            )
            for p, val in v.set.items()
        ]
        for point in _axis_points(s, positions):
            label = _label(name, point, names)
            for i, seed in enumerate(s.seed_list):
                overrides = [*_base_sets(s, positions), *sets, *point, _seed_override(s, seed, i, positions)]
                spec = _spec_for(file, overrides, spec_file, cache, label)
                settings = tuple((o.path, o.value) for o in (*sets, *point))
                out.append(SweepPoint(label, name or BASE_LABEL, settings, seed, spec, str(spec_file)))
    return out


def _check_readable(path: Path, file: str, pos: Pos | None, field_: str) -> None:
    """A spec file the sweep names must be a readable file; say so at the name, not inside the file."""
    try:
        read_text(path)
    except SpecError as e:
        if e.line == 0:
            raise _at(file, pos, field_, f"{e.message} ({limits.clip(str(path))})", value=True) from None
        raise


def _check_training(points: list[SweepPoint], file: str, positions: dict[Path_, Pos]) -> None:
    for p in points:
        if p.spec.training is None:
            raise _at(
                file,
                positions.get(("base",)),
                "base",
                f"expected a spec with a training section, got none in {p.spec_file}",
                value=True,
            )


def _build(data: Any, positions: dict[Path_, Pos], file: str, root: Path) -> Sweep:
    s = _validate(data, positions, file)
    base_file = root / s.base
    _check_readable(base_file, file, positions.get(("base",)), "base")
    cache: dict[Path, tuple[dict, dict]] = {}
    base = _spec_for(file, _base_sets(s, positions), base_file, cache, BASE_LABEL)
    points = _expand(s, file, root, positions, base_file)
    _check_training(points, file, positions)
    return Sweep(spec=s, file=file, root=root, base=base, points=points)


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep file and every run's spec; SpecError (file:line:col) on any mistake."""
    path = Path(path)
    shown = limits.clip(str(path))
    data, positions = _parse_yaml(read_text(path), shown)
    return _build(data, positions, shown, path.parent)


def is_sweep_file(path: str | Path) -> bool:
    """Whether `path` is a sweep file (a top-level `base:`) rather than a spec; False when unreadable."""
    try:
        data, _ = _parse_yaml(read_text(Path(path)), str(path))
    except SpecError:
        return False
    return isinstance(data, dict) and "base" in data


def _vary(index: int, text: str) -> tuple[str, list[Any], dict[Path_, Pos]]:
    """One `--vary PATH=v1,v2,...`: the path, its values, and their positions in `--vary:index:col`."""
    if "=" not in text:
        raise SpecError(VARY_FILE, index, 1, limits.clip(text), "expected PATH=v1,v2,..., got no '='")
    path, raw = text.split("=", 1)
    start = len(path) + 2  # the column of the first value
    try:
        values, inner = _parse_yaml(f"[{raw}]", VARY_FILE)
    except SpecError as e:
        raise SpecError(VARY_FILE, index, start + max(e.col - 2, 0), limits.clip(path), e.message) from None
    positions: dict[Path_, Pos] = {("axes", path): Pos(VARY_FILE, index, 1, index, start, None)}
    for i in range(len(values)):
        col = start + inner[(i,)].value_col - 2
        positions[("axes", path, i)] = Pos(VARY_FILE, index, col, index, col, None)
    return path, values, positions


def sweep_from_args(
    base: str | Path,
    vary: list[str],
    *,
    name: str,
    seeds: int = 1,
    max_tokens: float | None = None,
    scale: float | None = None,
    combine: str = "product",
) -> Sweep:
    """The sweep `lmspec sweep BASE.yaml --vary PATH=v1,v2 ...` stands for, validated as a file would be."""
    axes: dict[str, list[Any]] = {}
    positions: dict[Path_, Pos] = {}
    for index, text in enumerate(vary, start=1):
        path, values, pos = _vary(index, text)
        if path in axes:
            raise SpecError(VARY_FILE, index, 1, limits.clip(path), "expected each path once, got it again")
        axes[path] = values
        positions.update(pos)
    data: dict[str, Any] = {
        "name": limits.identifier_from(name),
        "base": str(base),
        "seeds": seeds,
        "combine": combine,
    }
    data.update({"axes": axes} if axes else {})
    data.update({k: v for k, v in (("max_tokens", max_tokens), ("scale", scale)) if v is not None})
    return _build(data, positions, "lmspec sweep", Path("."))
