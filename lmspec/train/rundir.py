"""What a training run may do with its run directory: start afresh, resume, or overwrite on request.

The contract, so that no run ever loses what an earlier one produced:

- A run directory's checkpoints and `metrics.jsonl` are never deleted or overwritten, except by
  `--overwrite` and by the configured retention (`keep` prunes checkpoints older than the newest one).
- A fresh start into a run directory that holds checkpoints or metrics is refused: pass `--resume` to
  continue it, or `--overwrite` to delete them first.
- `--resume` continues from the checkpoint LATEST names, once its manifest and trainer state verify;
  `--resume-from step_N` from that checkpoint. Otherwise the run stops before writing anything and says
  which file is wrong, which checkpoints are intact, and the `--resume-from` that would work.
- Continuing from a checkpoint older than another step directory of the run would replace the newer one
  when the run reaches its step, so it is refused unless `--overwrite` is given (which then discards the
  newer ones).
- Resuming rewrites the `metrics.jsonl` lines logged after the resumed step: a crash lost the state
  that produced them, and the resumed run writes them again, identically on CPU.
- One process at a time: a run holds an exclusive lock on `RUN/.train.lock` from before it decides
  what the directory allows until it ends, so a second `lmspec train` on the same `--out` is refused
  instead of interleaving its metrics and checkpoints with the first's.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmspec.errors import CheckpointError, UsageError
from lmspec.files import write_atomic
from lmspec.runtime.checkpoint import (
    CHECKPOINTS,
    LATEST,
    checkpoint_problem,
    checkpoint_step,
    describe_intact,
    has_checkpoints,
    intact_checkpoints,
    latest_checkpoint,
    load_trainer_state,
    remove_partial_saves,
    step_dir_name,
    step_dirs,
)
from lmspec.train.metrics import METRICS_FILE, refuse_non_regular

# What a training run writes into its run directory: all that --overwrite deletes (nothing else is touched).
RUN_OUTPUTS = ("spec.yaml", METRICS_FILE, "plot.png", CHECKPOINTS)
# Held (flock) by the process training the run. Not the sweep's RUN/.lock: a sweep worker holds that one
# around the Trainer it drives, and two flocks on one file conflict even inside one process.
LOCK_FILE = ".train.lock"
_RESUME_FROM = re.compile(r"(?:step_)?(\d{1,12})")


def checkpoint_name(text: str) -> str:
    """`--resume-from` text (`step_00000040`, `step_40` or `40`) → the step directory name."""
    m = _RESUME_FROM.fullmatch(text.strip())
    if m is None:
        raise UsageError(f"--resume-from {text!r}: expected step_N, a checkpoint of the run directory")
    return step_dir_name(int(m[1]))


@dataclass(frozen=True)
class RunPlan:
    """How a run will use its directory, decided before anything is written."""

    run_dir: Path
    checkpoint: Path | None = None  # the verified checkpoint to continue from; None for a fresh start
    state: dict[str, Any] = field(default_factory=dict)  # its trainer state
    discard: tuple[Path, ...] = ()  # what --overwrite deletes before the run writes


def _metrics_logged(run_dir: Path) -> bool:
    path = run_dir / METRICS_FILE
    return path.is_file() and path.stat().st_size > 0


def _fresh(run_dir: Path, *, overwrite: bool) -> RunPlan:
    if not overwrite:  # (--overwrite deletes it)
        refuse_non_regular(run_dir / METRICS_FILE, resume=False)
    held = ["checkpoints"] if has_checkpoints(run_dir) else []
    held += [METRICS_FILE] if _metrics_logged(run_dir) else []
    if held and not overwrite:
        raise UsageError(
            f"{run_dir} already holds {' and '.join(held)}; pass --resume to continue the run, "
            "or --overwrite to delete them and start afresh"
        )
    discard = tuple(run_dir / name for name in RUN_OUTPUTS if (run_dir / name).exists()) if overwrite else ()
    return RunPlan(run_dir, discard=discard)


def _advice(run_dir: Path) -> str:
    """The intact checkpoints and the flags that would continue from the newest of them."""
    intact = intact_checkpoints(run_dir)
    if not intact:
        return f"{describe_intact(run_dir)}; pass --overwrite to start afresh"
    newest = intact[-1]
    newer = [p for p in step_dirs(run_dir) if checkpoint_step(p) > checkpoint_step(newest)]
    flags = f"--resume-from {newest.name}" + (" --overwrite" if newer else "")
    also = f" (discards the damaged {', '.join(p.name for p in newer)})" if newer else ""
    return f"{describe_intact(run_dir)}; pass {flags}{also}"


def _chosen(run_dir: Path, resume_from: str | None) -> Path:
    if resume_from is None:
        try:
            ckpt = latest_checkpoint(run_dir)
        except CheckpointError as e:
            raise CheckpointError(f"{e}; {_advice(run_dir)}") from None
        assert ckpt is not None
        return ckpt
    ckpt = run_dir / CHECKPOINTS / resume_from
    if ckpt not in step_dirs(run_dir):
        raise CheckpointError(f"--resume-from {resume_from}: {ckpt} does not exist; {_advice(run_dir)}")
    return ckpt


def _resumed(run_dir: Path, resume_from: str | None, *, overwrite: bool) -> RunPlan:
    refuse_non_regular(run_dir / METRICS_FILE, resume=True)  # a resumed run cuts it back and appends
    if not has_checkpoints(run_dir):
        if resume_from is not None or _metrics_logged(run_dir):
            raise UsageError(
                f"{run_dir}: no checkpoint to resume from, but {METRICS_FILE} holds logged steps; "
                "pass --overwrite to start afresh"
                if resume_from is None
                else f"--resume-from {resume_from}: {run_dir} holds no checkpoint"
            )
        return RunPlan(run_dir)  # nothing to resume yet: --resume starts the run (idempotent job scripts)
    ckpt = _chosen(run_dir, resume_from)
    problem = checkpoint_problem(ckpt)
    if problem is not None:
        raise CheckpointError(f"{problem}; {_advice(run_dir)}")
    newer = [p for p in step_dirs(run_dir) if checkpoint_step(p) > checkpoint_step(ckpt)]
    if newer and not overwrite:
        names = ", ".join(p.name for p in newer)
        intact = intact_checkpoints(run_dir)
        other = (
            f"pass --resume-from {intact[-1].name} to continue from the newest intact one, or "
            if intact and intact[-1] != ckpt
            else ""
        )
        raise CheckpointError(
            f"{run_dir}: continuing from {ckpt.name} would replace the newer {names}; "
            f"{other}add --overwrite to discard the newer ones"
        )
    return RunPlan(run_dir, checkpoint=ckpt, state=load_trainer_state(ckpt), discard=tuple(newer))


def plan_run(run_dir: Path, *, resume: bool, resume_from: str | None, overwrite: bool) -> RunPlan:
    """Decide, reading only, how the run uses `run_dir`; UsageError / CheckpointError when it may not."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--out {run_dir}: exists and is not a directory")
    if resume or resume_from is not None:
        return _resumed(run_dir, resume_from, overwrite=overwrite)
    return _fresh(run_dir, overwrite=overwrite)


# Locks this process holds, by run directory: [open lock file, holders]. A second Trainer of the same
# process on the same directory (a test, a sweep re-running a job) shares the lock; another process waits
# for nothing and is refused.
_HELD: dict[Path, list[Any]] = {}


@dataclass
class RunLock:
    """This process's hold on a run directory (`lock_run_dir`); `release()` once when done with it."""

    run_dir: Path
    created: tuple[Path, ...]  # folders the lock created, innermost first: removed again if still empty
    released: bool = False

    def release(self, *, failed: bool = False) -> None:
        """Drop this hold; with `failed`, also remove what taking it created, if the run wrote nothing."""
        if self.released:
            return
        self.released = True
        key = self.run_dir.resolve()
        held = _HELD.get(key)
        if held is None:
            return
        held[1] -= 1
        if held[1] > 0:
            return
        del _HELD[key]
        if failed and self.created:
            (self.run_dir / LOCK_FILE).unlink(missing_ok=True)  # ours alone: the folder is new
        held[0].close()  # closing the file drops the flock
        if failed:
            for folder in self.created:
                try:
                    folder.rmdir()  # only when empty: whatever the run wrote stays
                except OSError:
                    break


def lock_run_dir(run_dir: Path) -> RunLock:
    """Take the run directory's lock (creating the folder), or refuse: another process is training it."""
    import fcntl

    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--out {run_dir}: exists and is not a directory")
    created = []
    for folder in (run_dir, *run_dir.parents):
        if folder.exists():
            break
        created.append(folder)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        key = run_dir.resolve()
        if key in _HELD:
            _HELD[key][1] += 1
            return RunLock(run_dir, ())
        f = open(run_dir / LOCK_FILE, "a")  # noqa: SIM115 (held open for the run's lifetime)
    except OSError as e:
        raise UsageError(f"--out {run_dir}: cannot write the run directory ({e.strerror or e})") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        f.close()
        if isinstance(e, BlockingIOError):
            raise UsageError(
                f"--out {run_dir}: another process is training this run directory (it holds "
                f"{run_dir / LOCK_FILE}); wait for it to finish or stop it, or pick another --out"
            ) from None
        raise UsageError(f"--out {run_dir}: cannot lock the run directory ({e.strerror or e})") from None
    _HELD[key] = [f, 1]
    return RunLock(run_dir, tuple(created))


def apply_plan(plan: RunPlan) -> None:
    """Carry out the deletions a plan allows (rank 0 only), after every check of the run has passed.

    Removes the debris of interrupted saves, what `--overwrite` discards, and points LATEST at the resumed
    checkpoint (it may have been garbled, or have named a discarded newer one).
    """
    remove_partial_saves(plan.run_dir)
    for path in plan.discard:
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
    if plan.checkpoint is not None:
        latest = plan.run_dir / CHECKPOINTS / LATEST
        want = plan.checkpoint.name + "\n"
        if not latest.is_file() or latest.is_symlink() or latest.read_bytes() != want.encode():
            if latest.is_dir() and not latest.is_symlink():
                latest.rmdir()  # only an empty one: anything inside it is not the run's to delete
            write_atomic(latest, want, durable=True)
