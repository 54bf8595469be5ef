"""Sharded checkpoints: the weights and optimizer state as torch Distributed Checkpoint (DCP) shards.

A run of more than one process saves each rank's own shards, with no rank gathering the model:

    step_N/.metadata, step_N/__R_I.distcp   DCP: {"model": model state, "optimizer": AdamW state}, by name
    step_N/sharded.json                     format, the RoPE thetas at save time, the layout that wrote it
    step_N/spec.yaml, step_N/config.json    as `save_pretrained` writes them (config.json without weights)

DCP keeps each tensor's global shape and every shard's offsets, so a checkpoint loads into any layout: a
run of another number of ranks or another expert split, or one process with whole tensors
(`load_model_state`, which `from_pretrained` uses; `lmspec export` then writes the transformers layout).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lmspec.errors import CheckpointError
from lmspec.files import read_json

__all__ = ["SHARDED_FILE", "SHARDED_FORMAT", "is_sharded", "load_model_state", "read_sharded_info"]

SHARDED_FILE = "sharded.json"
SHARDED_FORMAT = "lmspec-dcp/1"
DCP_METADATA = ".metadata"
MODEL_KEY = "model"  # the top-level keys of the saved state
OPTIMIZER_KEY = "optimizer"


def is_sharded(directory: str | Path) -> bool:
    """Whether `directory` holds a sharded (DCP) checkpoint rather than `model.safetensors`."""
    return (Path(directory) / SHARDED_FILE).is_file()


def read_sharded_info(directory: str | Path) -> dict[str, Any]:
    """`sharded.json`: its format checked; CheckpointError in one line when garbled."""
    path = Path(directory) / SHARDED_FILE
    try:
        info = read_json(path, 1 << 20)
        if not isinstance(info, dict) or info.get("format") != SHARDED_FORMAT:
            raise ValueError(f"expected format {SHARDED_FORMAT}")
        if not isinstance(info.get("rope_theta"), dict):
            raise ValueError("expected rope_theta: {attention kind: theta}")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: garbled ({e})") from None
    return info


def load_model_state(directory: str | Path) -> dict[str, Tensor]:
    """The model's whole tensors from a sharded checkpoint, in this process (no process group needed):
    each tensor allocated at its global shape and filled from every rank's shards by DCP."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    directory = Path(directory)
    reader = dcp.FileSystemReader(str(directory))
    try:
        metadata = reader.read_metadata()
    except (OSError, ValueError, RuntimeError, EOFError) as e:
        raise CheckpointError(f"{directory / DCP_METADATA}: unreadable ({type(e).__name__})") from None
    prefix = MODEL_KEY + "."
    state: dict[str, Tensor] = {}
    for key, meta in metadata.state_dict_metadata.items():
        if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata):
            state[key.removeprefix(prefix)] = torch.empty(meta.size, dtype=meta.properties.dtype)
    if not state:
        raise CheckpointError(f"{directory}: the sharded checkpoint holds no model tensors")
    with warnings.catch_warnings():  # DCP warns that it loads in one process: what is meant here
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({MODEL_KEY: state}, storage_reader=reader, no_dist=True)
    return state


def rope_thetas(directory: str | Path) -> dict[str, float]:
    """The RoPE thetas the model had when the sharded checkpoint was saved."""
    return {k: float(v) for k, v in read_sharded_info(directory)["rope_theta"].items()}


def info_text(rope: dict[str, float], layout: dict[str, int]) -> str:
    """The text of `sharded.json`."""
    info = {"format": SHARDED_FORMAT, "rope_theta": rope, "layout": layout}
    return json.dumps(info, indent=1, sort_keys=True) + "\n"
