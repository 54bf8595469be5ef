"""The files and directories a spec's stages name, checked against the spec.

The schema checks what a spec says; this checks what it points at: an `init_from` directory, a mopd
stage's teacher directories (a teacher or `init_from` naming an earlier stage is that stage, trained by the
same run), an sft stage's `data` and a mopd stage's `prompts`. A relative path is relative to the
folder of the file that writes it, as `extends` is (one given by `--set`: to the working directory);
`resolve_stage_paths` makes each one absolute in the spec a run trains, so `RUN/spec.yaml` names the same
files wherever it is read.

`lmspec check` calls `check_stage_paths(loaded, require=False)`: what exists must fit (a teacher or an
`init_from` with another vocabulary is refused), what does not exist yet may be made later (a teacher
trained after the check). `lmspec train` calls it with `require=True` before it writes anything, so a path
that points nowhere stops the run at once. Each failure is one `SpecError` at the field's file:line:col.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lmspec.errors import SpecError
from lmspec.files import not_regular
from lmspec.spec.limits import MAX_FILE_BYTES, quote
from lmspec.spec.loader import SET_FILE, LoadedSpec, Path_, load_spec, read_text
from lmspec.spec.schema import Spec

# A model directory says what it is in one of these files (lmspec writes spec.yaml; transformers config.json).
SPEC_FILE = "spec.yaml"
CONFIG_FILE = "config.json"


def _error(loaded: LoadedSpec, path: Path_, message: str) -> SpecError:
    field = ".".join(str(p) for p in path)
    for n in range(len(path), 0, -1):
        pos = loaded.positions.get(path[:n])
        if pos is not None:
            return SpecError(pos.file, pos.line, pos.col, field, message)
    return SpecError(loaded.path, 0, 0, field, message)


def model_vocab(directory: Path) -> int:
    """The vocabulary of the model a run, checkpoint or Hugging Face directory holds.

    ValueError saying why when the directory holds neither a `spec.yaml` nor a `config.json` with one.
    """
    spec_file = directory / SPEC_FILE
    if spec_file.is_file():
        return load_spec(spec_file).model.vocab_size
    config = directory / CONFIG_FILE
    if not config.is_file():
        raise ValueError(
            f"expected a run directory ({SPEC_FILE}) or a Hugging Face directory ({CONFIG_FILE}), "
            f"got {quote(str(directory))} with neither"
        )
    try:
        data = json.loads(read_text(config, MAX_FILE_BYTES, "config file"))
    except (json.JSONDecodeError, RecursionError, SpecError) as e:
        raise ValueError(f"expected a readable {config}, got {str(e)[:80]}") from None
    vocab = data.get("vocab_size") if isinstance(data, dict) else None
    if not isinstance(vocab, int) or isinstance(vocab, bool):
        raise ValueError(f"expected a vocab_size in {config}, got {quote(vocab)}")
    return vocab


def _model_dir(directory: str, require: bool) -> tuple[Path | None, str | None]:
    """(the directory, None) when it exists; (None, why) when it cannot be used; (None, None): skip it."""
    p = Path(directory)
    if not p.exists():
        if require:
            return (
                None,
                f"expected an existing run or Hugging Face directory, got {quote(directory)}, which does not exist",
            )
        return None, None
    if not p.is_dir():
        return (
            None,
            f"expected a run or Hugging Face directory, got {quote(directory)}, which is not a folder",
        )
    return p, None


def _check_file(loaded: LoadedSpec, where: Path_, path: str, what: str, require: bool) -> None:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        if require:
            raise _error(loaded, where, f"expected {what}, got {quote(path)}, which does not exist") from None
        return
    except (OSError, ValueError) as e:
        raise _error(loaded, where, f"expected {what}, got {quote(path)} ({e})") from None
    kind = not_regular(info.st_mode)
    if kind is not None:
        raise _error(loaded, where, f"expected {what}, got {quote(path)}, {kind}")


def _check_vocab(
    loaded: LoadedSpec, where: Path_, directory: str, require: bool, who: str, whose: str = "student"
) -> None:
    found, problem = _model_dir(directory, require)
    if problem is not None:
        raise _error(loaded, where, problem)
    if found is None:
        return
    try:
        vocab = model_vocab(found)
    except ValueError as e:
        raise _error(loaded, where, str(e)) from None
    except SpecError as e:
        raise _error(loaded, where, f"expected a valid {found / SPEC_FILE}, got: {e}") from None
    student = loaded.spec.model.vocab_size
    if vocab != student:
        raise _error(loaded, where, f"{who} has vocab {vocab} but the {whose} {student}")


def stage_path(loaded: LoadedSpec, where: Path_, value: str) -> str:
    """`value`, written at `where`, as an absolute path: relative to the folder of the file that wrote it."""
    if os.path.isabs(value):
        return value
    pos = loaded.positions.get(where)
    if pos is None or pos.file == SET_FILE or pos.file.startswith("<"):
        return os.path.abspath(value)
    return os.path.abspath(os.path.join(os.path.dirname(pos.file), value))


def resolve_stage_paths(loaded: LoadedSpec, spec: Spec) -> Spec:
    """`spec` (the loaded one, or it with its schedule scaled) with every stage path made absolute."""
    if spec.training is None:
        return spec
    stages = []
    for i, stage in enumerate(spec.training.stages):
        at: Any = ("training", "stages", i)
        update: dict[str, Any] = {}
        for name in ("data", "prompts"):
            if getattr(stage, name) is not None:
                update[name] = stage_path(loaded, (*at, name), getattr(stage, name))
        source = spec.training.init_source(i)
        if source is not None and source[0] == "path":
            update["init_from"] = stage_path(loaded, (*at, "init_from"), source[1])
        if stage.teachers:
            update["teachers"] = {
                d: t.model_copy(update={"path": stage_path(loaded, (*at, "teachers", d), t.path)})
                if spec.training.teacher_source(i, d)[0] == "path"
                else t
                for d, t in stage.teachers.items()
            }
        stages.append(stage.model_copy(update=update))
    return spec.model_copy(update={"training": spec.training.model_copy(update={"stages": stages})})


def check_stage_paths(loaded: LoadedSpec, *, require: bool) -> None:
    """Check every directory and file the stages name (see the module doc); SpecError on the first misfit."""
    training = loaded.spec.training
    if training is None:
        return
    for i, stage in enumerate(training.stages):
        at: Any = ("training", "stages", i)
        source = training.init_source(i)
        if source is not None and source[0] == "path":
            where = (*at, "init_from")
            found = stage_path(loaded, where, source[1])
            _check_vocab(loaded, where, found, require, f"init_from {quote(source[1])}", "spec")
        for domain, teacher in (stage.teachers or {}).items():
            if training.teacher_source(i, domain)[0] == "path":
                where = (*at, "teachers", domain)
                _check_vocab(
                    loaded, where, stage_path(loaded, where, teacher.path), require, f"teacher `{domain}`"
                )
        for name, what in (("data", "a chat JSONL file"), ("prompts", "a prompts JSONL file")):
            value = getattr(stage, name)
            if value is not None:
                where = (*at, name)
                _check_file(loaded, where, stage_path(loaded, where, value), what, require)
