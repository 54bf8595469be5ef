"""Serving fixtures: small variants of the tiny spec, a server on loopback, the greedy reference."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

import lmspec
from lmspec.serve.engine import Completion, Generator
from lmspec.serve.sampling import SamplingParams

TINY = Path(__file__).resolve().parents[2] / "examples" / "mimo_v2_flash_tiny.yaml"


def small_overrides(
    *, window: int = 32, vocab: int = 256, init_std: float = 0.02, hidden: int = 32
) -> list[str]:
    """The tiny spec's layout (G0 S*2 G S*2 G, sink, MoE top-2, 3 MTP blocks) at a few thousand parameters."""
    out = [
        f"model.attention.swa.window={window}",
        f"model.hidden_size={hidden}",
        f"model.vocab_size={vocab}",
        f"model.init_std={init_std}",
        "model.ffn.dense.intermediate_size=32",
        "model.ffn.moe.num_experts=4",
        "model.ffn.moe.expert_intermediate_size=16",
    ]
    for kind in ("global", "swa"):
        out += [
            f"model.attention.{kind}.num_heads=2",
            f"model.attention.{kind}.num_kv_heads=1",
            f"model.attention.{kind}.qk_head_dim=24",
            f"model.attention.{kind}.v_head_dim=8",
        ]
    return out


def small_model(seed: int = 0, dtype: torch.dtype = torch.float64, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return lmspec.build(TINY, dtype=dtype, overrides=small_overrides(**kw)).eval()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(app) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port in a thread; yields the base URL."""
    import threading
    import time

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(600):  # up to 30 s
            if server.started:
                break
            assert thread.is_alive(), "the server thread died while starting"
            time.sleep(0.05)
        assert server.started, "the server did not start"
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        app.state.scheduler.close()


def greedy(model: torch.nn.Module, prompt, n: int) -> Completion:
    """The reference: plain greedy decoding of one request alone, no speculation."""
    return Generator(model, speculative_depth=0).generate(
        prompt, SamplingParams(temperature=0.0, max_tokens=n)
    )
