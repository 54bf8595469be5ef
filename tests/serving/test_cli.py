"""`lmspec generate` and `lmspec serve` on a saved checkpoint: output, stats line, one-line user errors
(bad flag values, invalid UTF-8 in argv, damaged weights, a port in use, a batch that cannot fit) and
the API key."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch

import lmspec
from lmspec.cli import main
from lmspec.cli.serve import _is_loopback
from lmspec.serve.engine import Generator
from lmspec.serve.sampling import SamplingParams

from .conftest import TINY, free_port, small_model, small_overrides


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
        (["--top-p", "0"], "--top-p: top_p"),
        (["--top-p", "nan"], "--top-p"),
        (["--max-tokens", "99999"], "context"),
        (["--max-tokens", "-1"], "--max-tokens"),
        (["--seed", str(2**64)], "--seed"),
        (["--seed", str(-(2**63) - 1)], "--seed"),
        (["--temperature", "nan"], "--temperature"),
        (["--temperature", "inf"], "--temperature"),
        (["--temperature", "-1"], "--temperature"),
        (["--top-k", "-1"], "--top-k"),
        (["--prompt", "caf\udcc3"], "--prompt: not valid UTF-8 (byte 0xc3"),  # argv bytes b"caf\xc3"
        (["--stop", "\udcff"], "--stop: not valid UTF-8"),
        (["--prompt", ""], "--prompt"),
    ],
)
def test_generate_user_errors_are_one_line_with_status_2(checkpoint, capsys, extra, message):
    _, path = checkpoint
    rc = main(["generate", str(path / "spec.yaml"), "--checkpoint", str(path), "--prompt", "hi", *extra])
    out = capsys.readouterr()
    err = out.err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert out.out == ""  # refused before any output


def test_invalid_utf8_in_real_argv_is_one_line(checkpoint):
    _, path = checkpoint
    argv = [sys.executable, "-m", "lmspec", "generate", str(path / "spec.yaml"), "--checkpoint", str(path)]
    r = subprocess.run([*argv, "--prompt", b"hi\xff"], capture_output=True, timeout=120)
    assert r.returncode == 2 and r.stderr.decode().strip() == (
        "lmspec: error: --prompt: not valid UTF-8 (byte 0xff at character 2)"
    )


def test_a_tiny_top_p_decodes_greedily(checkpoint, capsys):
    model, path = checkpoint
    args = [
        "generate",
        str(path / "spec.yaml"),
        "--checkpoint",
        str(path),
        "--prompt",
        "hello",
        "--max-tokens",
        "8",
    ]
    rc = main([*args, "--top-p", "1e-300", "--temperature", "1.0"])
    out = capsys.readouterr().out
    want = Generator(model).generate("hello", SamplingParams(temperature=0, max_tokens=8)).text
    assert rc == 0 and out == "hello" + want + "\n"


@pytest.mark.parametrize("damage", ["random", "truncated", "empty"])
def test_damaged_weights_are_one_line(checkpoint, capsys, tmp_path, damage):
    _, path = checkpoint
    bad = tmp_path / "ckpt"
    shutil.copytree(path, bad)
    weights = bad / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(
        {"random": os.urandom(len(data)), "truncated": data[: len(data) // 2], "empty": b""}[damage]
    )
    rc = main(["generate", str(bad / "spec.yaml"), "--checkpoint", str(bad), "--prompt", "hi"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err and str(bad) in err


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


def _serve_args(path, port: int, *extra: str) -> list[str]:
    return ["serve", str(path / "spec.yaml"), "--checkpoint", str(path), "--port", str(port), *extra]


def test_a_port_in_use_is_one_line_before_serving(checkpoint, capsys):
    _, path = checkpoint
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        rc = main(_serve_args(path, taken.getsockname()[1]))
    out = capsys.readouterr()
    assert rc == 2 and out.out == ""  # nothing printed: no "lmspec: serving ... on ..." line
    err = out.err.strip()
    assert len(err.splitlines()) == 1 and "cannot listen on 127.0.0.1" in err and "in use" in err


@pytest.mark.parametrize("rows", ["100000", "0", "-3"])
def test_max_batch_is_bounded(checkpoint, capsys, rows):
    _, path = checkpoint
    rc = main(_serve_args(path, free_port(), "--max-batch", rows))
    err = capsys.readouterr().err.strip()
    assert (
        rc == 2
        and len(err.splitlines()) == 1
        and "--max-batch: expected 1..1024" in err
        and "KV cache" in err
    )


def test_a_batch_whose_kv_cache_cannot_fit_is_refused_before_allocating(tmp_path, capsys):
    """4M positions x 1024 rows of KV cache is terabytes: refused from the accounting, nothing allocated."""
    torch.manual_seed(0)
    overrides = small_overrides(window=4) + ["model.max_position_embeddings=4194304"]
    path = tmp_path / "long"
    lmspec.build(TINY, dtype=torch.float32, overrides=overrides).save_pretrained(path)
    rc = main(_serve_args(path, free_port(), "--max-batch", "1024"))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "GiB of KV cache" in err and "expected at most" in err


def test_loopback_hosts():
    assert _is_loopback("127.0.0.1") and _is_loopback("localhost") and _is_loopback("::1")
    assert not _is_loopback("0.0.0.0") and not _is_loopback("192.168.1.5") and not _is_loopback("example.org")


def test_serve_requires_the_api_key_from_the_environment(checkpoint):
    _, path = checkpoint
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LMSPEC_API_KEY": "k-123"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmspec", *_serve_args(path, port, "--max-batch", "1")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(600):  # up to 60 s
            try:
                httpx.get(f"{base}/health", timeout=1)
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stderr.read().decode()
                time.sleep(0.1)
        name = httpx.get(f"{base}/health").json()["model"]
        body = {"model": name, "prompt": "ab", "max_tokens": 2}
        assert httpx.post(f"{base}/v1/completions", json=body).status_code == 401
        ok = httpx.post(f"{base}/v1/completions", json=body, headers={"Authorization": "Bearer k-123"})
        assert ok.status_code == 200
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=20)
    assert out.decode().startswith("lmspec: serving ") and "API key required" in out.decode()
    assert "warning" not in err.decode()  # loopback: no warning
