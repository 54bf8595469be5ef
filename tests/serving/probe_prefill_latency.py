"""Measure a short request's latency alone and while a long prompt prefills on the same server.

Not a test (timings belong in docs, never in assertions). Run from the repository root:

    OMP_NUM_THREADS=1 python -m tests.serving.probe_prefill_latency [--long 4000] [--repeats 3]

It serves a randomly initialised tiny-spec model (float32, byte tokenizer, the spec's speculative
depth, max batch 8) on a free loopback port, then times a greedy 16-token completion of a short
prompt: first alone, then sent just after a request whose prompt has ``--long`` tokens. It prints the
median latencies and the long request's own latency.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import threading
import time
from pathlib import Path

import httpx
import torch
import uvicorn

import lmspec
from lmspec.runtime.tokenizer import ByteTokenizer
from lmspec.serve.server import create_app

TINY = Path(__file__).resolve().parents[2] / "examples" / "mimo_v2_flash_tiny.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(base: str, name: str, prompt: str, max_tokens: int) -> float:
    t0 = time.perf_counter()
    r = httpx.post(
        f"{base}/v1/completions",
        json={"model": name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0},
        timeout=600,
    )
    r.raise_for_status()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--long", type=int, default=4000, help="tokens in the long prompt")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--interleaved-chunk", type=int, default=None, help="the engine's interleaved_prefill_chunk"
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = lmspec.build(TINY, dtype=torch.float32).eval()
    name = model.spec.name
    options = {} if args.interleaved_chunk is None else {"interleaved_prefill_chunk": args.interleaved_chunk}
    depth = model.spec.serving.speculative_depth
    app = create_app(model, ByteTokenizer(), speculative_depth=depth, max_batch=8, **options)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port}"
    _post(base, name, "warm up", 4)
    alone = [_post(base, name, "hello there", 16) for _ in range(args.repeats)]
    beside, long_s = [], []
    for _ in range(args.repeats):
        out: list[float] = []
        t = threading.Thread(target=lambda out=out: out.append(_post(base, name, "x" * args.long, 1)))
        t.start()
        time.sleep(0.3)  # let the long request be admitted and start its prefill
        beside.append(_post(base, name, "hello there", 16))
        t.join()
        long_s.append(out[0])
    print(f"short request alone:               median {statistics.median(alone):.3f} s  {alone}")
    print(
        f"short request during {args.long}-token prefill: median {statistics.median(beside):.3f} s  {beside}"
    )
    print(f"the long request itself:           median {statistics.median(long_s):.3f} s")
    server.should_exit = True


if __name__ == "__main__":
    main()
