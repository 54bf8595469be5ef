"""Run directories and crash-safe, verifiable checkpoints.

Layout of a run directory::

    RUN/spec.yaml                      the resolved (scaled) spec the run trains
    RUN/metrics.jsonl                  one JSON object per logged step
    RUN/checkpoints/step_00001234/     spec.yaml, config.json, model.safetensors (model.save_pretrained),
                                       optimizer.pt, trainer_state.json [, tokenizer.json], manifest.json
    RUN/checkpoints/LATEST             the name of the newest complete step directory

A checkpoint is written into a hidden temporary directory (`.tmp_*`), finished with `manifest.json` (every
other file's size and sha256), fsynced and renamed into place; only then is LATEST replaced (temp file +
`os.replace`). A crash at any moment therefore leaves LATEST naming a complete checkpoint, and leftover
temporary directories are debris that `remove_partial_saves` (run when training starts) deletes.

Loading checks the manifest (`verify_checkpoint`), so a truncated, emptied or edited file is refused by
name before anything reads it; a file the loaders read that the manifest does not list, or a manifest
whose step is not its directory's, is refused too (an edited manifest cannot vouch for less than the
checkpoint holds). `trainer_state.json` is checked field by field (`load_trainer_state`). LATEST must hold the bare name of a step directory of the same run: an
absolute path, a `..` or any other text is refused, never followed. Nothing here deletes or replaces a
finished checkpoint except the configured pruning (`keep`), which only ever removes checkpoints older than
the one just written.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lmspec.errors import CheckpointError
from lmspec.files import TEMP_PREFIX, fsync_dir, read_json, write_atomic

CHECKPOINTS = "checkpoints"
LATEST = "LATEST"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "lmspec-checkpoint/1"
# Keys every trainer_state.json carries (what a resumed step depends on besides weights and moments).
STATE_KEYS = ("step", "tokens", "data_position", "rng", "corpus", "spec_hash")
_STEP_RE = re.compile(r"step_(\d{8,})")
_HASH_CHUNK = 1 << 20
# Far above what a checkpoint writes (a manifest lists a handful of files; a trainer state is ~20 KB of
# RNG state), and bounded so an edited file cannot make loading read gigabytes.
MAX_JSON_BYTES = 1 << 20
# Files some loader reads from a checkpoint: each must be listed in (and so verified by) the manifest.
_READ_BY_LOADERS = re.compile(
    r"spec\.yaml|config\.json|tokenizer\.json|optimizer\.pt|trainer_state\.json|.*\.safetensors(\.index\.json)?"
    r"|sharded\.json|\.metadata|.*\.distcp"  # a sharded checkpoint's (lmspec.runtime.sharded)
)


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint directory's name says (`step_00001234` → 1234)."""
    m = _STEP_RE.fullmatch(path.name)
    if m is None:
        raise CheckpointError(f"{path}: not a checkpoint directory name (expected step_NNNNNNNN)")
    return int(m[1])


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _fsync_tree(path: Path) -> None:
    for p in path.iterdir():
        if p.is_file():
            with p.open("rb") as f:
                os.fsync(f.fileno())
    fsync_dir(path)


def write_text_atomic(path: Path, text: str) -> None:
    """`write_atomic(path, text, durable=True)`, under the name the sweep, results and evaluation modules
    of `lmspec.train` import."""
    write_atomic(path, text, durable=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_entries(paths: list[Path]) -> dict[str, dict[str, Any]]:
    """{file name: {size, sha256}} of `paths`, as `manifest.json` lists them."""
    return {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in paths}


def write_manifest(directory: Path, step: int, known: dict[str, dict[str, Any]] | None = None) -> None:
    """Record every file of a checkpoint directory with its size and sha256 in `manifest.json`.

    `known` gives entries other processes computed for the files they wrote (a sharded checkpoint's
    shards), so one process does not read them all again.
    """
    known = known or {}
    todo = [p for p in sorted(directory.iterdir()) if p.is_file() and p.name not in (MANIFEST_FILE, *known)]
    files = dict(sorted({**file_entries(todo), **known}.items()))
    manifest = {"format": MANIFEST_FORMAT, "step": step, "files": files}
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, sort_keys=True), encoding="utf-8")


class _RecordingFile:
    """A file for `torch.save` that remembers the OSError a write raised, created at the first write.

    `torch.save` turns a failed write (a full disk) into an opaque RuntimeError ("unexpected pos ...");
    writing through this lets the caller raise the real OSError ("No space left on device") instead.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.f: Any = None
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            if self.f is None:
                self.f = self.path.open("wb")
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        if self.f is not None:
            self.f.flush()


def _torch_save(obj: Any, path: Path) -> None:
    out = _RecordingFile(path)
    try:
        torch.save(obj, out)
    except RuntimeError:
        if out.error is not None:
            raise out.error from None
        raise
    finally:
        if out.f is not None:
            out.f.close()


def remove_partial_saves(run_dir: str | Path) -> list[Path]:
    """Delete the temporary directories and files of saves that never finished; returns what was removed."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    stale = sorted(root.glob(f"{TEMP_PREFIX}*"))
    for p in stale:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(
            missing_ok=True
        )
    return stale


def _prune(root: Path, newest: Path, keep: int) -> None:
    """Keep the `keep` newest checkpoints up to `newest`; never touch one newer than it."""
    upto = checkpoint_step(newest)
    done = [p for p in step_dirs(root.parent) if checkpoint_step(p) <= upto]
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    save_model: Callable[[Path], None],
    optimizer_state: dict[str, Any],
    trainer_state: dict[str, Any],
    extra_files: dict[str, Path] | None = None,
    keep: int | None = 3,
) -> Path:
    """Write checkpoint `step` atomically, point LATEST at it and keep the newest `keep` checkpoints.

    `save_model(dir)` writes the model files (`model.save_pretrained`); `extra_files` maps a file name to a
    file copied beside them (the tokenizer). A checkpoint directory that already exists is never replaced
    (CheckpointError). If writing fails (a full disk), the partial directory is removed, LATEST keeps
    naming the previous checkpoint and the error propagates.
    """
    tmp = begin_checkpoint(run_dir, step)
    try:
        save_model(tmp)
        _torch_save(optimizer_state, tmp / OPTIMIZER_FILE)
        write_common_files(tmp, trainer_state, extra_files)
        write_manifest(tmp, step)
        _fsync_tree(tmp)
    except BaseException:
        # A full disk is the usual cause: free what this save took at once (the next start would anyway).
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return publish_checkpoint(tmp, run_dir, step, keep)


def begin_checkpoint(run_dir: str | Path, step: int) -> Path:
    """The fresh temporary directory checkpoint `step` is written into (debris of earlier saves removed);
    CheckpointError when that step's checkpoint already exists."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    remove_partial_saves(run_dir)
    final = root / step_dir_name(step)
    if final.exists():
        raise CheckpointError(f"{final}: already exists; a checkpoint is never replaced")
    tmp = root / f"{TEMP_PREFIX}{final.name}.{os.getpid()}"
    tmp.mkdir()
    return tmp


def write_common_files(tmp: Path, trainer_state: dict[str, Any], extra_files: dict[str, Path] | None) -> None:
    """The trainer state and the extra files (the tokenizer) every checkpoint holds."""
    for name, src in (extra_files or {}).items():
        shutil.copyfile(src, tmp / name)
    (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=1, sort_keys=True), encoding="utf-8")


def publish_checkpoint(tmp: Path, run_dir: str | Path, step: int, keep: int | None) -> Path:
    """Rename a finished (manifested, fsynced) temporary directory into place, point LATEST at it and keep
    the newest `keep` checkpoints."""
    root = Path(run_dir) / CHECKPOINTS
    final = root / step_dir_name(step)
    os.rename(tmp, final)
    fsync_dir(root)
    write_atomic(root / LATEST, final.name + "\n", durable=True)
    if keep is not None:
        _prune(root, final, keep)
    return final


def fsync_tree(path: Path) -> None:
    """fsync every file of a directory, then the directory."""
    _fsync_tree(path)


# ---------------------------------------------------------------------------------------------
# Reading and verifying
# ---------------------------------------------------------------------------------------------


def step_dirs(run_dir: str | Path) -> list[Path]:
    """The finished checkpoint directories of a run (intact or not), oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_RE.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]
    return sorted(found, key=checkpoint_step)


def has_checkpoints(run_dir: str | Path) -> bool:
    """Whether a run directory holds any checkpoint or a LATEST pointer (a run a fresh start would clobber)."""
    root = Path(run_dir) / CHECKPOINTS
    return bool(step_dirs(run_dir)) or (root / LATEST).exists() or (root / LATEST).is_symlink()


def _manifest(ckpt: Path) -> dict[str, dict[str, Any]]:
    path = ckpt / MANIFEST_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing, so the checkpoint cannot be verified")
    try:
        manifest = read_json(path, MAX_JSON_BYTES)
        if not isinstance(manifest, dict):
            raise ValueError
        files, step = manifest["files"], manifest.get("step")
        if manifest.get("format") != MANIFEST_FORMAT or not all(
            _is_int(v.get("size")) and isinstance(v.get("sha256"), str) for v in files.values()
        ):
            raise ValueError
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        why = (
            str(e)
            if isinstance(e, ValueError) and str(e)
            else f"expected {MANIFEST_FORMAT} with files' size and sha256"
        )
        raise CheckpointError(f"{path}: garbled ({why})") from None
    named = _STEP_RE.fullmatch(ckpt.name)
    if named and step != int(named[1]):
        raise CheckpointError(f"{path}: says step {str(step)[:20]}, but the directory is {ckpt.name}")
    return files


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def verify_checkpoint(ckpt: str | Path) -> None:
    """Check every file of a checkpoint against its `manifest.json`; CheckpointError names the first bad one.

    A file a loader reads (`_READ_BY_LOADERS`) that the manifest leaves out is refused too: an edited
    manifest that lists nothing would otherwise vouch for anything.
    """
    ckpt = Path(ckpt)
    files = _manifest(ckpt)
    for name, want in sorted(files.items()):
        path = ckpt / name
        if Path(name).name != name or name in ("", ".", ".."):
            raise CheckpointError(f"{ckpt / MANIFEST_FILE}: lists {name[:60]!r}, which is not a file name")
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (listed in {MANIFEST_FILE})")
        size = path.stat().st_size
        if size != want["size"]:
            what = "empty" if size == 0 else "truncated" if size < want["size"] else "longer than written"
            raise CheckpointError(f"{path}: {what} ({size:,} bytes, {MANIFEST_FILE} says {want['size']:,})")
        if _sha256(path) != want["sha256"]:
            raise CheckpointError(f"{path}: contents differ from the sha256 in {MANIFEST_FILE}")
    unlisted = sorted(
        p.name for p in ckpt.iterdir() if _READ_BY_LOADERS.fullmatch(p.name) and p.name not in files
    )
    if unlisted:
        raise CheckpointError(
            f"{ckpt / unlisted[0]}: not listed in {MANIFEST_FILE}, so it cannot be verified"
        )


# What each trainer_state.json field must hold (a resumed run reads them as these types).
def _count(v: object) -> bool:
    return _is_int(v) and v >= 0  # type: ignore[operator]


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


_STATE_FIELDS: dict[str, tuple[Callable[[object], bool], str]] = {
    "step": (_count, "a whole number >= 0"),
    "tokens": (_count, "a whole number >= 0"),
    "data_position": (lambda v: _count(v) or isinstance(v, dict), "a whole number >= 0 or a mixture's state"),
    "rng": (lambda v: isinstance(v, dict), "an object of RNG states"),
    "corpus": (lambda v: isinstance(v, str), "a string"),
    "spec_hash": (lambda v: isinstance(v, str), "a string"),
    "stage": (lambda v: _is_int(v) and v >= -1, "a whole number >= -1"),  # type: ignore[operator]
    "elapsed_s": (lambda v: _number(v) and v >= 0, "a number >= 0"),  # type: ignore[operator]
    "world_size": (lambda v: _is_int(v) and v >= 1, "a whole number >= 1"),  # type: ignore[operator]
    "last_val": (
        lambda v: v is None or (isinstance(v, list) and len(v) == 2 and all(map(_number, v))),
        "null or [loss, bits per byte]",
    ),
}


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    """The trainer state of a checkpoint; CheckpointError when it is missing, garbled or incomplete.

    Every field must have its type (`_STATE_FIELDS`), and `step` must be the directory's step.
    """
    path = Path(ckpt) / STATE_FILE
    try:
        state = read_json(path, MAX_JSON_BYTES)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{path}: garbled ({e})") from None
    missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path}: garbled (no {', '.join(missing)})")
    assert isinstance(state, dict)
    for key, (ok, expected) in _STATE_FIELDS.items():
        if key in state and not ok(state[key]):
            raise CheckpointError(f"{path}: {key}: expected {expected}, got {str(state[key])[:40]!r}")
    named = _STEP_RE.fullmatch(Path(ckpt).name)
    if named and state["step"] != int(named[1]):
        raise CheckpointError(f"{path}: step {state['step']}, but the directory is {Path(ckpt).name}")
    return state


def load_optimizer_state(ckpt: Path) -> dict[str, Any]:
    path = Path(ckpt) / OPTIMIZER_FILE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except Exception as e:  # torch raises RuntimeError, EOFError or pickle errors for a damaged file
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__})") from None


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (its manifest or trainer state), or None when it is intact."""
    try:
        verify_checkpoint(ckpt)
        load_trainer_state(ckpt)
    except CheckpointError as e:
        return str(e)
    return None


def intact_checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's checkpoints that pass `checkpoint_problem`, oldest first."""
    return [p for p in step_dirs(run_dir) if checkpoint_problem(p) is None]


def describe_intact(run_dir: str | Path) -> str:
    intact = intact_checkpoints(run_dir)
    if not intact:
        return "no intact checkpoint in the run"
    return "intact checkpoints: " + ", ".join(p.name for p in intact)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint LATEST names in a run directory, or None when the run has no checkpoint yet.

    CheckpointError when LATEST is missing although checkpoints exist, unreadable, or names anything but an
    existing step directory of this run (an absolute path or `..` is never followed).
    """
    root = Path(run_dir) / CHECKPOINTS
    latest = root / LATEST
    if not latest.exists() and not latest.is_symlink():
        if step_dirs(run_dir):
            raise CheckpointError(f"{latest}: missing, though the run holds checkpoints")
        return None
    if latest.is_symlink() or not latest.is_file():
        raise CheckpointError(f"{latest}: not a regular file")
    try:
        name = latest.read_bytes()[:256].decode("utf-8").strip()
    except (UnicodeDecodeError, OSError):
        raise CheckpointError(f"{latest}: garbled (not a step directory name)") from None
    if not _STEP_RE.fullmatch(name):
        quoted = repr(name[:60]) + ("..." if len(name) > 60 else "")
        where = (
            "outside the run directory" if "/" in name or name.startswith("..") else "not a step directory"
        )
        raise CheckpointError(f"{latest}: names {quoted}, {where}; refusing to follow it")
    path = root / name
    if not path.is_dir() or path.is_symlink():
        raise CheckpointError(f"{latest}: names {name}, which does not exist")
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory, its `checkpoints/` folder or a checkpoint directory → the checkpoint directory.

    The result is what `lmspec.from_pretrained` reads (it holds `spec.yaml`/`config.json` and
    `model.safetensors`). A damaged LATEST is refused with the run's intact checkpoints named.
    """
    from lmspec.errors import UsageError

    p = Path(path)
    if (p / "model.safetensors").is_file() or (p / "model.safetensors.index.json").is_file():
        return p
    if (p / "sharded.json").is_file():  # a sharded checkpoint (lmspec.runtime.sharded)
        return p
    run = p.parent if p.name == CHECKPOINTS else p
    try:
        found = latest_checkpoint(run)
    except CheckpointError as e:
        intact = intact_checkpoints(run)
        hint = f"; load one directly, e.g. {intact[-1]}" if intact else ""
        raise CheckpointError(f"{e}; {describe_intact(run)}{hint}") from None
    if found is not None:
        return found
    if not p.exists():
        raise UsageError(f"{path}: no such run or checkpoint directory")
    raise UsageError(f"{path}: no checkpoint found (expected model.safetensors or {CHECKPOINTS}/{LATEST})")
