"""Run a check on every rank of a gloo process group, spawned from a test, and fail the test with each
rank's traceback."""

from __future__ import annotations

import os
import random
import traceback
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, check: Callable[[int, int], None], world: int, port: int, errors) -> None:  # noqa: ANN001 - a manager list
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        check(rank, world)
        dist.destroy_process_group()
    except BaseException:
        errors.append(f"rank {rank}: {traceback.format_exc()}")


def run_on_ranks(
    check: Callable[[int, int], None], world: int, tmp_path: Path, ports: tuple[int, int]
) -> None:
    """``check(rank, world)`` (a module-level function, so spawn can pickle it) on ``world`` processes,
    on a port drawn from ``ports`` by the test's own directory (tests running side by side differ)."""
    port = 29500 + random.Random(str(tmp_path)).randint(*ports)
    with mp.Manager() as manager:
        errors = manager.list()
        mp.start_processes(_worker, args=(check, world, port, errors), nprocs=world, start_method="spawn")
        assert not list(errors), "\n".join(errors)
