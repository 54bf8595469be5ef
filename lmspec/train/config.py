"""`TrainConfig`: every knob of a training run, checked in one place before anything runs.

Each field is the `lmspec train` flag of the same name (`eval_every` is `--eval-every`); a bad value is a
`UsageError` that names the flag, so the command line and the Python API refuse the same things the same
way. Checks that need the spec (the schedule's length) happen in `Trainer.setup`, once it is loaded.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmspec.errors import UsageError
from lmspec.spec import Spec
from lmspec.train.data import regular_file_problem
from lmspec.train.rundir import checkpoint_name

DEFAULT_EVAL_TOKENS = 16384
BACKENDS = ("torch", "triton")  # lmspec.runtime.ops.get_backend's names
DEVICE_TYPES = ("cpu", "cuda")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _whole(name: str, value: object, *, optional: bool = True) -> int | None:
    """A positive whole number (an integral float such as 4e3 from the command line is accepted)."""
    if value is None and optional:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value != int(value) or value < 1:  # type: ignore[arg-type]
        raise UsageError(f"{_flag(name)}: expected a positive whole number, got {value!r}")
    return int(value)  # type: ignore[arg-type]


def _positive(name: str, value: object) -> float | None:
    """A finite positive number (inf would run forever, nan for no steps)."""
    if value is None:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value <= 0:  # type: ignore[operator]
        raise UsageError(f"{_flag(name)}: expected a finite positive number, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def check_device(device: str | None) -> torch.device:
    """The device a run trains on: `device`, or CUDA when there is one, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise UsageError(
            f"--device {device!r}: expected one of {', '.join(DEVICE_TYPES)} or cuda:N"
        ) from None
    if dev.type not in DEVICE_TYPES:
        raise UsageError(
            f"--device {device}: training needs a device that holds data; expected cpu, cuda or cuda:N"
        )
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA device is available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: there are {torch.cuda.device_count()} CUDA devices")
    return dev


def check_backend(backend: str | None, device: torch.device) -> None:
    if backend is None:
        return
    if backend not in BACKENDS:
        raise UsageError(f"--backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "triton" and importlib.util.find_spec("triton") is None:
        raise UsageError("--backend triton: triton is not installed (pip install 'lmspec[triton]')")
    if backend == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise UsageError(
            "--backend triton on a CPU: the kernels run only in the Triton interpreter, about 100x slower than "
            "--backend torch; set TRITON_INTERPRET=1 to run them there anyway"
        )


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """A training run: the spec, how it is scaled and fed, where it writes, and how often it reports.

    `max_tokens` / `scale` shrink every token quantity of the schedule (scale_schedule). `eval_every` and
    `checkpoint_every` are in steps (default: about 10 evaluations and 5 checkpoints per run, plus the
    end); `keep_checkpoints` is how many checkpoints the run directory retains (None: all).
    `micro_batch_size` caps the sequences per forward (gradient accumulation; default: the whole batch).
    `resume`, `resume_from` and `overwrite` decide what happens to an existing run directory (rundir.py).
    `compile` and `activation_checkpointing` override the spec's `training.compile` and
    `training.activation_checkpointing` (None: the spec's); they change speed and memory, not the math,
    so a run may resume with a different choice.
    `decode` is the batched decoder a `kind: mopd` stage samples its rollouts with
    (`lmspec.serve.rollouts.decode_batch`, which `lmspec train` passes; train and serve are siblings).
    """

    spec: Spec | str | Path
    data: tuple[str, ...] | None = None
    out: Path | None = None
    max_tokens: float | None = None
    scale: float | None = None
    resume: bool = False
    resume_from: str | None = None
    overwrite: bool = False
    backend: str | None = None
    tokenizer: Path | None = None
    device: str | None = None
    overrides: tuple[str, ...] = ()
    progress: bool | None = None
    eval_every: int | None = None
    eval_tokens: int = DEFAULT_EVAL_TOKENS
    checkpoint_every: int | None = None
    keep_checkpoints: int | None = 3
    micro_batch_size: int | None = None
    compile: bool | None = None
    activation_checkpointing: str | None = None
    plot: bool = True
    quiet: bool = False
    decode: Callable[..., Any] | None = None

    def __post_init__(self) -> None:
        def put(name: str, value: object) -> None:
            object.__setattr__(self, name, value)  # frozen: normalise once, here

        for name in ("eval_every", "checkpoint_every", "keep_checkpoints", "micro_batch_size"):
            put(name, _whole(name, getattr(self, name)))
        put("eval_tokens", _whole("eval_tokens", self.eval_tokens, optional=False))
        put("max_tokens", _positive("max_tokens", self.max_tokens))
        put("scale", _positive("scale", self.scale))
        if self.max_tokens is not None and self.scale is not None:
            raise UsageError("give --max-tokens or --scale, not both")
        put("data", None if self.data is None else tuple(str(d) for d in self.data))
        put("overrides", tuple(self.overrides))
        if self.out is not None and not str(self.out).strip():
            raise UsageError("--out: expected a run directory, got an empty path")
        put("out", None if self.out is None else Path(self.out))
        if self.resume_from is not None:
            put("resume_from", checkpoint_name(str(self.resume_from)))
        if self.tokenizer is not None:
            put("tokenizer", Path(self.tokenizer))
            problem = regular_file_problem(self.tokenizer)
            if problem is not None:
                raise UsageError(f"--tokenizer {self.tokenizer}: {problem}")
        check_backend(self.backend, check_device(self.device))
        modes = ("none", "full", "selective")
        if self.activation_checkpointing is not None and self.activation_checkpointing not in modes:
            raise UsageError(
                f"--activation-checkpointing: expected one of {', '.join(modes)}, got {self.activation_checkpointing!r}"
            )
