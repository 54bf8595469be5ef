"""What rendered kernel modules share: interpreter set-up, launch sizes and small helpers.

Rendered modules import this module before ``triton`` so that on a machine without CUDA the Triton
interpreter is switched on (``TRITON_INTERPRET=1``) before triton and its library functions load.
"""

from __future__ import annotations

import os
import sys

import torch


def ensure_triton_runtime() -> None:
    """Select the Triton interpreter when no CUDA device exists; must run before anything imports triton.

    Triton decorates its own library functions (``tl.sum``, ...) when ``triton.language`` is imported, and
    they run in the interpreter only if ``TRITON_INTERPRET=1`` was set by then. So on a CUDA-less machine
    where triton was imported without it, this raises instead of letting kernels fail later. Import this
    module first (test conftests, entry points) to be safe.
    """
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return
    if "triton.language" in sys.modules:
        raise RuntimeError(
            "no CUDA device, and triton was imported before TRITON_INTERPRET=1 was set (often via transformers "
            "or torch._dynamo). Set TRITON_INTERPRET=1 in the environment, or import "
            "lmspec.runtime.ops.triton_support before anything that imports triton."
        )
    os.environ["TRITON_INTERPRET"] = "1"


def interpreting() -> bool:
    """True when kernels run in the Triton interpreter (numpy on the CPU)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (at least 16, the smallest ``tl.dot`` operand size)."""
    return max(16, 1 << (max(1, n) - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def row_programs(rows: int) -> int:
    """Programs for row-parallel kernels that loop over rows: few in the interpreter, many on a GPU."""
    if interpreting():
        return max(1, min(rows, 4))
    return max(1, min(rows, 8 * torch.cuda.get_device_properties(0).multi_processor_count))


ensure_triton_runtime()
