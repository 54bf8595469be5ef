"""Checkpoints of a multi-process run: every rank writes its own shards with torch Distributed Checkpoint.

No rank gathers the model or the optimizer state. The save is as atomic as a single process's
(`lmspec.runtime.checkpoint`):

1. rank 0 makes the temporary directory and tells every rank its name;
2. every rank writes its shards of {"model", "optimizer"} there (`dcp.save`, fsynced), then hashes the
   files it wrote; the hashes are gathered on rank 0, so no rank reads another's shards;
3. rank 0 writes `spec.yaml`, `config.json`, `sharded.json`, the trainer state and the manifest, fsyncs,
   renames the directory into place and points LATEST at it.

A rank that fails at step 2 makes every rank raise, and rank 0 removes the temporary directory: LATEST
keeps naming the previous checkpoint. Loading (`load`) reads each rank's part of every tensor into the
layout the resumed run has, which may differ from the one that saved.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lmspec.errors import CheckpointError
from lmspec.runtime import sharded
from lmspec.runtime.checkpoint import (
    begin_checkpoint,
    file_entries,
    fsync_tree,
    publish_checkpoint,
    write_common_files,
    write_manifest,
)
from lmspec.runtime.modeling import save_config
from lmspec.train.distributed import Dist

__all__ = ["load", "save"]


def _state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """The sharded state DCP saves and loads in place: DTensors stay this rank's shards."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return {sharded.MODEL_KEY: get_model_state_dict(model)}
    model_state, optim_state = get_state_dict(model, optimizer)
    return {sharded.MODEL_KEY: model_state, sharded.OPTIMIZER_KEY: optim_state}


def _write_shards(tmp: Path, model: nn.Module, optimizer: torch.optim.Optimizer, d: Dist) -> Any:
    """This rank's shards, written and fsynced; returns their manifest entries, or the error as text."""
    import torch.distributed.checkpoint as dcp

    try:
        dcp.save(_state(model, optimizer), storage_writer=dcp.FileSystemWriter(str(tmp), sync_files=True))
        # DCP names each rank's files __RANK_I.distcp; the coordinator (rank 0) writes .metadata.
        mine = sorted(tmp.glob(f"__{d.rank}_*.distcp"))
        if d.is_main:
            mine.append(tmp / sharded.DCP_METADATA)
        return file_entries(mine)
    except (OSError, RuntimeError, ValueError) as e:
        return f"rank {d.rank}: {type(e).__name__}: {str(e)[:160]}"


def save(
    run_dir: Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    d: Dist,
    trainer_state: dict[str, Any],
    layout: dict[str, int],
    extra_files: dict[str, Path] | None = None,
    keep: int | None = 3,
) -> Path | None:
    """Write checkpoint `step` of a multi-process run (a collective); returns its directory on rank 0.

    OSError (rank 0's writes) or CheckpointError (naming the rank whose shards failed) on every rank when
    the save failed; LATEST then still names the previous checkpoint.
    """
    tmp_name: Any = None
    if d.is_main:
        try:
            tmp_name = str(begin_checkpoint(run_dir, step))
        except (OSError, CheckpointError) as e:
            tmp_name = e
    tmp_name = d.broadcast_object(tmp_name)
    if isinstance(tmp_name, BaseException):
        raise tmp_name
    tmp = Path(tmp_name)
    entries = _write_shards(tmp, model, optimizer, d)
    gathered: list[Any] = [None] * d.world_size
    dist.all_gather_object(gathered, entries)
    failed = [g for g in gathered if isinstance(g, str)]
    final = None
    if d.is_main:
        try:
            if failed:
                raise CheckpointError(f"{tmp}: {failed[0]}")
            known = {name: e for g in gathered for name, e in g.items()}
            dtype = next(iter(model.parameters())).dtype
            save_config(model, tmp, dtype)
            (tmp / sharded.SHARDED_FILE).write_text(sharded.info_text(model.rope_thetas(), layout))
            write_common_files(tmp, trainer_state, extra_files)
            write_manifest(tmp, step, known)
            fsync_tree(tmp)
            final = publish_checkpoint(tmp, run_dir, step, keep)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            final = e
    outcome = d.broadcast_object(None if final is None or isinstance(final, Path) else repr(final))
    if isinstance(final, BaseException):
        raise final
    if outcome is not None:
        raise CheckpointError(f"{tmp}: the save failed on rank 0 ({outcome[:160]})")
    return final


def load(ckpt: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Restore the model's weights and the optimizer's state from a sharded checkpoint, in place, into
    this run's layout (a collective under torchrun; one process reads whole tensors)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = _state(model, optimizer)
    reader = dcp.FileSystemReader(str(ckpt))
    try:
        _only_saved_moments(state[sharded.OPTIMIZER_KEY], reader.read_metadata().state_dict_metadata)
        dcp.load(state, storage_reader=reader)
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(
            f"{ckpt}: cannot load the sharded state ({type(e).__name__}: {str(e)[:120]})"
        ) from None
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state[sharded.MODEL_KEY],
        optim_state_dict=state[sharded.OPTIMIZER_KEY],
        # Not strict: parameters without moments (see _only_saved_moments) are meant to have none. A
        # missing weight still fails, in dcp.load.
        options=StateDictOptions(strict=False),
    )


def _only_saved_moments(optim_state: dict[str, Any], saved: dict[str, Any]) -> None:
    """Keep, of the state to load into, the parameters the checkpoint has moments for.

    AdamW holds no state for a parameter that never had a gradient (MTP blocks a stage does not train
    yet); the target state has one for every parameter, so those are dropped and stay without state, as
    in the run that saved.
    """
    prefix = f"{sharded.OPTIMIZER_KEY}.state."
    have = {key.removeprefix(prefix) for key in saved if key.startswith(prefix)}
    for name in list(optim_state["state"]):
        if not any(key.startswith(f"{name}.") for key in have):
            del optim_state["state"][name]
