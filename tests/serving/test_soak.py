"""Soak: 8 clients for 60 s against `lmspec serve`, mixing good requests (streamed and not, completions
and chat), bad requests and clients that disconnect mid-request. Every good request gets exactly its
greedy reference text, every bad one an OpenAI-shaped 4xx, the server's RSS grows by less than 10%
after warm-up, and it answers /health at the end with no row still held."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch

from lmspec.runtime.modeling import from_pretrained

from .conftest import free_port, greedy, small_model

CLIENTS = 8
SOAK_S = 60.0
WARMUP_S = 8.0
PROMPTS = ["The cat", "hello there", "0123", "a longer prompt about nothing much", "x", "é ü ß"]
CHAT = [{"role": "user", "content": "hi"}]
CHAT_PROMPT = "<|user|>\nhi\n<|assistant|>\n"
BAD = [  # (body, expected status)
    ('{"model": "{name}", "prompt": "\\ud800"}', 400),
    ("[" * 50_000 + "]" * 50_000, 400),
    ('{"model": "{name}", "prompt": "hi", "seed": 18446744073709551616}', 400),
    ('{"model": "{name}", "prompt": [true, false]}', 400),
    ('{"model": "{name}", "prompt": "hi", "stream": "yes"}', 400),
    ('{"model": "{name}", "prompt": "hi", "tools": [{"type": "function"}]}', 400),
    ('{"model": "{name}", "prompt": "hi", "max_tokens": 100000}', 400),
    ('{"model": "nope", "prompt": "hi"}', 404),
    ("{broken", 400),
]


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class _Client:
    """One client's loop: random actions until the deadline; problems are collected, not raised."""

    def __init__(self, base: str, name: str, refs: dict, seed: int) -> None:
        self.base, self.name, self.refs = base, name, refs
        self.rng = random.Random(seed)
        self.oa = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
        self.counts = {"good": 0, "bad": 0, "gone": 0}
        self.problems: list[str] = []

    def run(self, until: float) -> None:
        actions = [
            self.good,
            self.good_stream,
            self.good_chat,
            self.bad,
            self.bad,
            self.leave,
            self.leave_stream,
        ]
        while time.monotonic() < until:
            action = self.rng.choice(actions)
            try:
                action()
            except Exception as e:  # noqa: BLE001 - reported by the test, with the action's name
                self.problems.append(f"{action.__name__}: {type(e).__name__}: {e}")

    def _pick(self) -> tuple[str, int]:
        return self.rng.choice(PROMPTS), self.rng.choice([1, 5, 16])

    def _expect(self, got: str, prompt: str, n: int) -> None:
        if got != self.refs[(prompt, n)]:
            self.problems.append(f"{prompt!r}/{n}: got {got!r}, want {self.refs[(prompt, n)]!r}")
        self.counts["good"] += 1

    def good(self) -> None:
        prompt, n = self._pick()
        out = self.oa.completions.create(model=self.name, prompt=prompt, max_tokens=n, temperature=0)
        self._expect(out.choices[0].text, prompt, n)

    def good_stream(self) -> None:
        prompt, n = self._pick()
        stream = self.oa.completions.create(
            model=self.name, prompt=prompt, max_tokens=n, temperature=0, stream=True
        )
        self._expect("".join(chunk.choices[0].text for chunk in stream), prompt, n)

    def good_chat(self) -> None:
        n = self.rng.choice([1, 5, 16])
        stream = self.oa.chat.completions.create(
            model=self.name, messages=CHAT, max_tokens=n, temperature=0, stream=True
        )
        self._expect("".join(chunk.choices[0].delta.content or "" for chunk in stream), CHAT_PROMPT, n)

    def bad(self) -> None:
        body, status = self.rng.choice(BAD)
        r = httpx.post(
            f"{self.base}/v1/completions",
            content=body.replace("{name}", self.name),
            timeout=60,
            headers={"content-type": "application/json"},
        )
        err = r.json().get("error", {})
        if r.status_code != status or set(err) != {"message", "type", "param", "code"}:
            self.problems.append(f"bad request {body[:40]!r}: {r.status_code} {r.text[:200]}")
        self.counts["bad"] += 1

    def leave(self) -> None:
        body = {"model": self.name, "prompt": self.rng.choice(PROMPTS), "max_tokens": 3000}
        try:
            httpx.post(f"{self.base}/v1/completions", json=body, timeout=self.rng.uniform(0.05, 0.4))
        except httpx.TimeoutException:
            pass
        self.counts["gone"] += 1

    def leave_stream(self) -> None:
        body = {"model": self.name, "prompt": self.rng.choice(PROMPTS), "max_tokens": 3000, "stream": True}
        with httpx.stream("POST", f"{self.base}/v1/completions", json=body, timeout=60) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i >= self.rng.randint(0, 6):
                    break
        self.counts["gone"] += 1


def _traffic(base: str, name: str, refs: dict, seconds: float, seed: int) -> list[_Client]:
    clients = [_Client(base, name, refs, seed * 100 + i) for i in range(CLIENTS)]
    until = time.monotonic() + seconds
    threads = [threading.Thread(target=c.run, args=(until,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + 300)
    assert not any(t.is_alive() for t in threads), "a client is stuck"
    return clients


@pytest.mark.slow
def test_soak_eight_clients_good_bad_and_leaving(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "ckpt"
    small_model(5, window=4, init_std=0.5, dtype=torch.float64).save_pretrained(path)
    model = from_pretrained(path)  # the reference reads the same weights as the server
    refs = {(p, n): greedy(model, p, n).text for p in [*PROMPTS, CHAT_PROMPT] for n in (1, 5, 16)}
    port = free_port()
    argv = [
        "serve",
        str(path / "spec.yaml"),
        "--checkpoint",
        str(path),
        "--port",
        str(port),
        "--max-batch",
        "4",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmspec", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):  # up to 60 s to start
            try:
                name = httpx.get(f"{base}/health", timeout=1).json()["model"]
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stderr.read().decode()
                time.sleep(0.1)
        warm = _traffic(base, name, refs, WARMUP_S, seed=1)
        rss_before = _rss(proc.pid)
        soak = _traffic(base, name, refs, SOAK_S, seed=2)
        rss_after = _rss(proc.pid)
        problems = [p for c in warm + soak for p in c.problems]
        assert not problems, "\n".join(problems[:20])
        counts = {k: sum(c.counts[k] for c in soak) for k in ("good", "bad", "gone")}
        assert counts["good"] >= 50 and counts["bad"] >= 20 and counts["gone"] >= 20, counts
        assert rss_after < 1.10 * rss_before, (rss_before, rss_after)
        for _ in range(300):  # the last disconnects free their rows within a poll
            health = httpx.get(f"{base}/health", timeout=5).json()
            if health["running"] == 0 and health["waiting"] == 0:
                break
            time.sleep(0.1)
        assert health == {"status": "ok", "model": name, "running": 0, "waiting": 0}
        print(json.dumps({**counts, "rss_before_mb": rss_before / 2**20, "rss_after_mb": rss_after / 2**20}))
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
