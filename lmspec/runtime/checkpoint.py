"""Run directories and crash-safe checkpoints.

Layout of a run directory::

    RUN/spec.yaml                      the resolved (scaled) spec the run trains
    RUN/metrics.jsonl                  one JSON object per logged step
    RUN/checkpoints/step_00001234/     spec.yaml, config.json, model.safetensors (model.save_pretrained),
                                       optimizer.pt, trainer_state.json [, tokenizer.json]
    RUN/checkpoints/LATEST             the name of the newest complete step directory

A checkpoint is written into a hidden temporary directory and renamed into place only once every file is
on disk, then LATEST is replaced (temp file + `os.replace`). A crash at any moment therefore leaves LATEST
naming a complete checkpoint; leftover temporary directories are ignored and cleaned by the next save.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

CHECKPOINTS = "checkpoints"
LATEST = "LATEST"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
_TMP_PREFIX = ".tmp_"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_dir(path: Path) -> None:
    # The rename itself must reach the disk, not just the files inside it.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for p in path.iterdir():
        if p.is_file():
            with p.open("rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` so that readers see either the old or the new content."""
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}.{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


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
    file copied beside them (the tokenizer).
    """
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f"{_TMP_PREFIX}*"):  # debris of a crashed save
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f"{_TMP_PREFIX}{final.name}.{os.getpid()}"
    tmp.mkdir()
    save_model(tmp)
    torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
    for name, src in (extra_files or {}).items():
        shutil.copyfile(src, tmp / name)
    (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=1, sort_keys=True), encoding="utf-8")
    _fsync_tree(tmp)
    if final.exists():  # a re-save of the same step after a resume: replace it whole
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    write_text_atomic(root / LATEST, final.name + "\n")
    if keep is not None:
        done = sorted(p for p in root.glob("step_*") if p.is_dir())
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint LATEST names in a run directory, or None when there is none yet."""
    root = Path(run_dir) / CHECKPOINTS
    latest = root / LATEST
    if not latest.is_file():
        return None
    path = root / latest.read_text(encoding="utf-8").strip()
    return path if (path / STATE_FILE).is_file() else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory, its `checkpoints/` folder or a checkpoint directory → the checkpoint directory.

    The result is what `lmspec.from_pretrained` reads (it holds `spec.yaml`/`config.json` and
    `model.safetensors`).
    """
    p = Path(path)
    if (p / "model.safetensors").is_file() or (p / "model.safetensors.index.json").is_file():
        return p
    found = latest_checkpoint(p.parent if p.name == CHECKPOINTS else p)
    if found is not None:
        return found
    from lmspec.errors import UsageError

    if not p.exists():
        raise UsageError(f"{path}: no such run or checkpoint directory")
    raise UsageError(f"{path}: no checkpoint found (expected model.safetensors or {CHECKPOINTS}/{LATEST})")


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))


def load_optimizer_state(ckpt: Path) -> dict[str, Any]:
    return torch.load(ckpt / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
