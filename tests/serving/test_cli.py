"""`lmspec generate` and `lmspec serve` on a saved checkpoint: output, stats line and one-line user errors."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch

from lmspec.cli import main
from lmspec.serve.engine import Generator
from lmspec.serve.sampling import SamplingParams

from .conftest import small_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = small_model(6, window=4, init_std=0.5, dtype=torch.float32)
    path = tmp_path_factory.mktemp("run") / "ckpt"
    model.save_pretrained(path)
    return model, path


def test_generate_streams_the_greedy_text_and_prints_stats(checkpoint, capsys):
    model, path = checkpoint
    rc = main(
        [
            "generate",
            str(path / "spec.yaml"),
            "--checkpoint",
            str(path),
            "--prompt",
            "hello",
            "--max-tokens",
            "12",
            "--temperature",
            "0",
            "--speculative-depth",
            "2",
        ]
    )
    out = capsys.readouterr()
    assert rc == 0
    want = (
        Generator(model, speculative_depth=0)
        .generate("hello", SamplingParams(temperature=0, max_tokens=12))
        .text
    )
    assert out.out == "hello" + want + "\n"
    assert "12 tokens" in out.err and "acceptance length" in out.err and "speculative depth 2" in out.err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--speculative-depth", "7"], "--speculative-depth"),
        (["--top-p", "0"], "top_p"),
        (["--max-tokens", "99999"], "context"),
    ],
)
def test_generate_user_errors_are_one_line_with_status_2(checkpoint, capsys, extra, message):
    _, path = checkpoint
    rc = main(["generate", str(path / "spec.yaml"), "--checkpoint", str(path), "--prompt", "hi", *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_generate_rejects_a_checkpoint_of_another_model(checkpoint, capsys, tmp_path, examples_dir):
    _, path = checkpoint
    tiny = str(examples_dir / "mimo_v2_flash_tiny.yaml")
    rc = main(["generate", tiny, "--checkpoint", str(path), "--prompt", "hi"])
    assert rc == 2 and "differs" in capsys.readouterr().err
    rc = main(["generate", str(path / "spec.yaml"), "--checkpoint", str(tmp_path / "nope"), "--prompt", "hi"])
    assert rc == 2 and "no such run" in capsys.readouterr().err


def test_serve_command_answers_on_loopback(checkpoint):
    _, path = checkpoint
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lmspec",
            "serve",
            str(path / "spec.yaml"),
            "--checkpoint",
            str(path),
            "--port",
            str(port),
            "--speculative-depth",
            "1",
            "--max-batch",
            "2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        deadline = time.time() + 60
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stderr.read().decode()
                assert time.time() < deadline, "lmspec serve did not start"
                time.sleep(0.2)
        assert r.json()["status"] == "ok"
        name = r.json()["model"]
        out = httpx.post(
            f"http://127.0.0.1:{port}/v1/completions",
            json={"model": name, "prompt": "ab", "max_tokens": 4, "temperature": 0},
            timeout=30,
        )
        assert out.status_code == 200 and out.json()["usage"]["completion_tokens"] == 4
    finally:
        proc.terminate()
        proc.wait(timeout=20)
