"""Commands that serve a checkpoint: generate, serve."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from lmspec.errors import UsageError
from lmspec.spec import load_spec

if TYPE_CHECKING:  # torch and the runtime load only when a command serves: `lmspec check` stays small
    from torch import nn

    from lmspec.runtime.tokenizer import Tokenizer


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


def load_serving_model(args: argparse.Namespace) -> tuple[nn.Module, Tokenizer, int]:
    """The checkpoint's model (checked against the SPEC's architecture), its tokenizer and the draft depth.

    The checkpoint's weights and architecture are authoritative; the SPEC argument supplies the
    serving section (speculative depth, chat template, sampling defaults) and must describe the same
    model.
    """
    from lmspec.runtime.checkpoint import resolve_checkpoint
    from lmspec.runtime.modeling import from_pretrained
    from lmspec.runtime.tokenizer import check_vocab
    from lmspec.serve.engine import decode_threads

    spec = load_spec(args.spec, args.overrides)
    ckpt = resolve_checkpoint(args.checkpoint)
    model = from_pretrained(ckpt).eval()
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


def generate_command(args: argparse.Namespace) -> int:
    """`lmspec generate`: stream a completion to stdout, then print timing and acceptance stats."""
    from lmspec.serve.engine import Generator
    from lmspec.serve.sampling import SamplingParams

    model, tokenizer, depth = load_serving_model(args)
    serving = model.spec.serving
    try:
        params = SamplingParams(
            temperature=serving.temperature if args.temperature is None else args.temperature,
            top_p=serving.top_p if args.top_p is None else args.top_p,
            top_k=0 if args.top_k is None else args.top_k,
            max_tokens=args.max_tokens,
            stop=tuple(args.stop),
            seed=args.seed,
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    generator = Generator(model, tokenizer, speculative_depth=depth)
    ids = tokenizer.encode(args.prompt)
    if not ids:
        raise UsageError("--prompt: expected at least one token, got an empty prompt")
    limit = model.spec.model.max_position_embeddings
    if len(ids) + params.max_tokens > limit:
        raise UsageError(
            f"--max-tokens: prompt ({len(ids)} tokens) + max tokens ({params.max_tokens}) exceeds the context of {limit}"
        )
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    last = None
    for ev in generator.stream(ids, params):
        sys.stdout.write(ev.text)
        sys.stdout.flush()
        last = ev
    sys.stdout.write("\n")
    if last is not None:
        st = last.stats
        print(
            f"[{st.completion_tokens} tokens, {st.tokens_per_s:.1f} tok/s "
            f"(decode {st.decode_tokens_per_s:.1f} tok/s), speculative depth {depth}, "
            f"acceptance length {st.acceptance_length:.2f}, finish: {last.finish_reason}]",
            file=sys.stderr,
        )
    return 0


def serve_command(args: argparse.Namespace) -> int:
    """`lmspec serve`: load the checkpoint and serve it until interrupted."""
    import uvicorn

    from lmspec.serve.server import create_app

    if args.max_batch < 1:
        raise UsageError(f"--max-batch: expected at least 1, got {args.max_batch}")
    if not 0 < args.port < 65536:
        raise UsageError(f"--port: expected 1..65535, got {args.port}")
    model, tokenizer, depth = load_serving_model(args)
    app = create_app(model, tokenizer, speculative_depth=depth, max_batch=args.max_batch)
    print(
        f"lmspec: serving {model.spec.name} on http://{args.host}:{args.port}/v1 "
        f"(speculative depth {depth}, max batch {args.max_batch})"
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
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

    p = add("serve", cmd_serve, "serve a checkpoint with an OpenAI-compatible HTTP API")
    p.add_argument("--checkpoint", required=True, help="run directory or checkpoint directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--speculative-depth", type=int, default=None)
    p.add_argument("--max-batch", type=int, default=8)
