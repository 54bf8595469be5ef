"""Commands that serve a checkpoint: generate, serve."""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from lmspec.errors import UsageError
from lmspec.spec import load_spec

if TYPE_CHECKING:  # torch and the runtime load only when a command serves: `lmspec check` stays small
    from torch import nn

    from lmspec.runtime.tokenizer import Tokenizer
    from lmspec.serve.sampling import SamplingParams


def cmd_generate(args: argparse.Namespace) -> int:
    return generate_command(args)


def cmd_serve(args: argparse.Namespace) -> int:
    return serve_command(args)


def _find_tokenizer(checkpoint_arg: Path, ckpt: Path) -> Tokenizer:
    from lmspec.runtime.tokenizer import TOKENIZER_FILE, ByteTokenizer, load_tokenizer

    for d in (ckpt, checkpoint_arg, ckpt.parent.parent):
        if (d / TOKENIZER_FILE).is_file():
            return load_tokenizer(d / TOKENIZER_FILE)
    return ByteTokenizer()


def _utf8(text: str, flag: str) -> str:
    """``text`` from argv, refused when it is not valid UTF-8 (Python keeps such bytes as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start].encode("utf-8", "surrogateescape")
        raise UsageError(f"{flag}: not valid UTF-8 (byte 0x{bad.hex()} at character {e.start})") from None
    return text


def _load_checkpoint(checkpoint: str) -> tuple[nn.Module, Path]:
    """The checkpoint's model; a damaged weights file is a one-line error."""
    from safetensors import SafetensorError

    from lmspec.runtime.checkpoint import resolve_checkpoint
    from lmspec.runtime.modeling import from_pretrained

    ckpt = resolve_checkpoint(checkpoint)
    try:
        return from_pretrained(ckpt).eval(), ckpt
    except (SafetensorError, OSError, EOFError) as e:
        raise UsageError(f"{ckpt}: cannot read the weights ({' '.join(str(e).split())[:200]})") from None


def load_serving_model(args: argparse.Namespace) -> tuple[nn.Module, Tokenizer, int]:
    """The checkpoint's model (checked against the SPEC's architecture), its tokenizer and the draft depth.

    The checkpoint's weights and architecture are authoritative; the SPEC argument supplies the
    serving section (speculative depth, chat template, sampling defaults) and must describe the same
    model.
    """
    from lmspec.runtime.tokenizer import check_vocab
    from lmspec.serve.engine import decode_threads

    spec = load_spec(args.spec, args.overrides)
    model, ckpt = _load_checkpoint(args.checkpoint)
    if model.spec.model != spec.model:
        raise UsageError(
            f"{args.checkpoint}: the checkpoint's model differs from {args.spec}'s model section; "
            f"serve it with the spec.yaml of its run directory"
        )
    model.spec = spec  # keep the caller's serving section
    tokenizer = _find_tokenizer(Path(args.checkpoint), ckpt)
    check_vocab(tokenizer, spec.model.vocab_size)
    depth = spec.serving.speculative_depth if args.speculative_depth is None else args.speculative_depth
    available = spec.model.mtp.num_blocks if spec.model.mtp else 0
    if not 0 <= depth <= available:
        raise UsageError(f"--speculative-depth: expected 0..{available} (the spec's MTP blocks), got {depth}")
    decode_threads(model)
    return model, tokenizer, depth


def _generate_params(args: argparse.Namespace, serving) -> SamplingParams:
    from lmspec.serve.sampling import SamplingParams

    flags = {
        "temperature": "--temperature",
        "top_p": "--top-p",
        "top_k": "--top-k",
        "max_tokens": "--max-tokens",
    }
    try:
        return SamplingParams(
            temperature=serving.temperature if args.temperature is None else args.temperature,
            top_p=serving.top_p if args.top_p is None else args.top_p,
            top_k=0 if args.top_k is None else args.top_k,
            max_tokens=args.max_tokens,
            stop=tuple(_utf8(s, "--stop") for s in args.stop),
            seed=args.seed,
        )
    except ValueError as e:  # "top_p must be in (0, 1], got 0.0" -> "--top-p: top_p must be ..."
        field = str(e).split(" ", 1)[0]
        raise UsageError(f"{flags.get(field, '--' + field)}: {e}") from None


def generate_command(args: argparse.Namespace) -> int:
    """`lmspec generate`: stream a completion to stdout, then print timing and acceptance stats."""
    from lmspec.serve.engine import Generator

    prompt = _utf8(args.prompt, "--prompt")
    model, tokenizer, depth = load_serving_model(args)
    params = _generate_params(args, model.spec.serving)
    generator = Generator(model, tokenizer, speculative_depth=depth, compile=args.compile)
    ids = tokenizer.encode(prompt)
    if not ids:
        raise UsageError("--prompt: expected at least one token, got an empty prompt")
    limit = model.spec.model.max_position_embeddings
    if len(ids) + params.max_tokens > limit:
        raise UsageError(
            f"--max-tokens: prompt ({len(ids)} tokens) + max tokens ({params.max_tokens}) exceeds the context of {limit}"
        )
    sys.stdout.write(prompt)
    sys.stdout.flush()
    last = None
    for ev in generator.stream(ids, params):
        sys.stdout.write(ev.text)
        sys.stdout.flush()
        last = ev
    sys.stdout.write("\n")
    if last is not None and last.error is not None:
        raise UsageError(f"generation failed: {last.error}")
    if last is not None:
        st = last.stats
        print(
            f"[{st.completion_tokens} tokens, {st.tokens_per_s:.1f} tok/s "
            f"(decode {st.decode_tokens_per_s:.1f} tok/s), speculative depth {depth}, "
            f"acceptance length {st.acceptance_length:.2f}, finish: {last.finish_reason}]",
            file=sys.stderr,
        )
    return 0


# Each row holds a full-context KV cache and every step walks every row in Python, so a batch beyond
# this many rows costs more than it serves on any machine lmspec targets; memory is checked as well.
MAX_BATCH = 1024


def _check_batch(max_batch: int) -> None:
    if not 1 <= max_batch <= MAX_BATCH:
        raise UsageError(
            f"--max-batch: expected 1..{MAX_BATCH}, got {max_batch} (each row holds a full-context KV cache, "
            f"and every engine step visits every row)"
        )


def _available_memory() -> int | None:
    """Bytes of RAM the kernel says are available (Linux MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _check_cache_fits(model: nn.Module, depth: int, max_batch: int) -> None:
    """Refuse a batch whose KV cache cannot fit in the available memory, before allocating it."""
    from lmspec.runtime.kv_cache import kv_cache_bytes

    spec = model.spec
    param = next(model.parameters())
    context = spec.model.max_position_embeddings + depth + 1  # what the engine allocates per row
    per_row = kv_cache_bytes(
        spec, context, 1, dtype_bytes=param.element_size(), speculative_depth=depth, mtp_blocks=depth
    )
    available = _available_memory() if param.device.type == "cpu" else None
    if available is not None and per_row * max_batch > available:
        raise UsageError(
            f"--max-batch: {max_batch} rows need {per_row * max_batch / 2**30:.1f} GiB of KV cache "
            f"({per_row / 2**20:.1f} MiB per row at a {context}-token context), more than the "
            f"{available / 2**30:.1f} GiB available; expected at most {max(1, available // per_row)}"
        )


def _bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, so a port in use is a one-line error before anything is printed."""
    if not 0 < port < 65536:
        raise UsageError(f"--port: expected 1..65535, got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no conflict
    try:
        sock.bind((host, port))
    except OSError as e:  # in use, not an address of this machine, a privileged port, an unknown name
        sock.close()
        reason = e.strerror or str(e)
        raise UsageError(f"--host/--port: cannot listen on {host}:{port}: {reason}") from None
    return sock


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve_command(args: argparse.Namespace) -> int:
    """`lmspec serve`: load the checkpoint and serve it until interrupted."""
    import uvicorn

    from lmspec.serve.server import create_app

    _check_batch(args.max_batch)
    limits = {} if args.max_body_bytes is None else {"max_body_bytes": args.max_body_bytes}
    if args.max_body_bytes is not None and args.max_body_bytes < 1024:
        raise UsageError(f"--max-body-bytes: expected at least 1024, got {args.max_body_bytes}")
    api_key = args.api_key if args.api_key is not None else os.environ.get("LMSPEC_API_KEY") or None
    sock = _bind(args.host, args.port)
    try:
        model, tokenizer, depth = load_serving_model(args)
        _check_cache_fits(model, depth, args.max_batch)
        app = create_app(
            model,
            tokenizer,
            speculative_depth=depth,
            max_batch=args.max_batch,
            api_key=api_key,
            **limits,
            **({"compile": True} if args.compile else {}),
        )
        if api_key is None and not _is_loopback(args.host):
            print(
                f"lmspec: warning: serving on {args.host} without an API key: anyone who can reach this "
                f"port can use the model; pass --api-key or set LMSPEC_API_KEY",
                file=sys.stderr,
            )
        print(
            f"lmspec: serving {model.spec.name} on http://{args.host}:{args.port}/v1 "
            f"(speculative depth {depth}, max batch {args.max_batch}"
            f"{', API key required' if api_key else ''})",
            flush=True,
        )
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0


def add_parsers(add) -> None:
    p = add("generate", cmd_generate, "generate text from a checkpoint, streaming to the terminal")
    p.add_argument("--checkpoint", required=True, help="run directory or checkpoint directory")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--speculative-depth", type=int, default=None, help="MTP draft depth (default: spec's serving)"
    )
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="decode with a static KV cache and one torch.compile'd step (compiles on first use)",
    )

    p = add("serve", cmd_serve, "serve a checkpoint with an OpenAI-compatible HTTP API")
    p.add_argument("--checkpoint", required=True, help="run directory or checkpoint directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--speculative-depth", type=int, default=None)
    p.add_argument("--max-batch", type=int, default=8, help=f"engine rows, 1..{MAX_BATCH} (default 8)")
    p.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on every endpoint but /health (default: $LMSPEC_API_KEY)",
    )
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=None,
        help="largest request body accepted, in bytes (default 8 MiB)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="static KV cache, decode and verify forwards through torch.compile (compiles on first use)",
    )
