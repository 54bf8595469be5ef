"""Decode speed and MTP acceptance at speculative depths 0..D on a trained checkpoint, in one run.

    python benchmarks/decode.py                       # runs/demo (written by `make demo`)
    python benchmarks/decode.py --checkpoint RUN_DIR --max-tokens 256 --json out.json

Greedy decoding of the same prompts at every depth; the output must be identical token for token
(speculation changes speed, never text), and the table reports acceptance length (tokens per
main-model forward) and decode tokens/s with the speedup over depth 0.

Then the comparison with transformers' `generate` (greedy, `--hf-batches` rows of `--hf-tokens` new tokens,
prompts cut to one length so neither side pads): transformers' `MiMoV2FlashForCausalLM` (eager attention)
on the checkpoint's weights, against lmspec's `StaticDecoder` (static KV cache, one `torch.compile`d
step) at depth 0 and at the deepest speculative depth. The models alternate run by run and every ratio
is a median of same-round ratios; the tokens of every run must be identical. A checkpoint whose sliding
layers have fewer KV heads than transformers can express (it derives them as twice the global ones:
the tiny spec has equal counts) is run by both sides with each sliding KV head repeated, which computes
the same function on the same weights. It also measures the sampler's and the text decoding's cost per
token against the compiled step's.

Without a checkpoint at --checkpoint, the script trains the tiny spec for --train-tokens tokens on
the default corpus into --train-out first (minutes on a CPU; it never writes into runs/demo, which
belongs to `make demo`) and says so. A model that short-trained mostly repeats whitespace, which
flatters acceptance; the demo's fully trained model is the meaningful measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

# Defaults point into the repository, from any working directory.
ROOT = Path(__file__).resolve().parents[1]

PROMPTS = [
    "def __init__(self, ",
    "import os\nimport sys\n\n\ndef main():\n    ",
    'class Queue:\n    """A simple FIFO queue."""\n\n    def __init__(self):\n        self.',
    "    for i in range(len(",
    "        if not isinstance(value, str):\n            raise TypeError(",
    "# Copyright (c) ",
]


def _has_checkpoint(path: Path) -> bool:
    from lmspec.runtime.checkpoint import latest_checkpoint

    return (path / "model.safetensors").is_file() or latest_checkpoint(path) is not None


def _checkpoint(path: Path, spec: str, train_tokens: float, train_out: Path) -> Path:
    from lmspec.runtime.checkpoint import resolve_checkpoint

    if _has_checkpoint(path):
        return resolve_checkpoint(path)
    if not _has_checkpoint(train_out):
        print(
            f"{path}: no checkpoint; training {spec} for {train_tokens:g} tokens into {train_out} first "
            f"(a quick model: expect inflated acceptance on repeated whitespace)",
            file=sys.stderr,
        )
        from lmspec.train.trainer import train

        train(spec, out=train_out, max_tokens=train_tokens, progress=False, plot=False, quiet=True)
    else:
        print(f"{path}: no checkpoint; using the quick model in {train_out}", file=sys.stderr)
    return resolve_checkpoint(train_out)


def hf_expressible(model: torch.nn.Module) -> tuple[torch.nn.Module, int]:
    """The model itself, or an lmspec model of the same function whose sliding KV heads transformers can
    express (twice the global ones: each head repeated), and the repeat factor."""
    import lmspec
    from lmspec.codegen.hf import export_issues
    from lmspec.spec.schema import GlobalAttention, SlidingAttention

    spec = model.spec
    if not any("sliding num_kv_heads" in issue for issue in export_issues(spec)):
        return model, 1
    att = spec.model.attention
    glob = next(n for n, a in att.items() if isinstance(a, GlobalAttention))
    slid = next(n for n, a in att.items() if isinstance(a, SlidingAttention))
    repeat, rest = divmod(2 * att[glob].num_kv_heads, att[slid].num_kv_heads)
    if rest:
        raise SystemExit("sliding KV heads do not divide twice the global ones: no exact transformers model")
    wide = lmspec.build(spec, overrides=[f"model.attention.{slid}.num_kv_heads={2 * att[glob].num_kv_heads}"])
    target = wide.state_dict()
    state = {}
    for name, t in model.state_dict().items():
        if (
            t.shape != target[name].shape
        ):  # a sliding layer's k_proj / v_proj: (Hkv * D, ...) -> (r * Hkv * D, ...)
            heads = att[slid].num_kv_heads
            t = (
                t.reshape(heads, -1, *t.shape[1:])
                .repeat_interleave(repeat, dim=0)
                .reshape(target[name].shape)
            )
        state[name] = t
    wide.load_state_dict(state, strict=True)
    wide.set_rope_theta(model.rope_thetas())
    return wide.to(next(model.parameters()).dtype).eval(), repeat


def transformers_model(model: torch.nn.Module) -> torch.nn.Module:
    """transformers' MiMoV2FlashForCausalLM (eager attention) with ``model``'s trunk weights."""
    from transformers import MiMoV2FlashConfig, MiMoV2FlashForCausalLM

    from lmspec.codegen.hf import spec_to_config
    from lmspec.runtime.modeling import _spec_with_current_rope

    config = spec_to_config(_spec_with_current_rope(model))
    config = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
    hf_config = MiMoV2FlashConfig(**config)
    hf_config._attn_implementation = "eager"  # the only one transformers has for this model (sinks)
    hf = MiMoV2FlashForCausalLM(hf_config).to(next(model.parameters()).dtype).eval()
    state = {k: v for k, v in model.hf_state_dict().items() if not k.startswith("model.mtp.")}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight" or not model.TIE_WORD_EMBEDDINGS]:
        raise SystemExit(
            f"transformers' model does not take lmspec's weights: {missing[:4]} {unexpected[:4]}"
        )
    return hf


def _same_length_prompts(batch: int, tokenizer) -> list[list[int]]:
    ids = [tokenizer.encode(p) for p in PROMPTS]
    n = min(len(i) for i in ids)
    return [ids[r % len(ids)][:n] if r < len(ids) else ids[r % len(ids)][-n:] for r in range(batch)]


def _per_token_costs(decoder, tokenizer, prompt: list[int], tokens: int) -> dict[str, float]:
    """Seconds per token of the compiled greedy step, the host sampler and incremental text decoding."""
    from lmspec.serve.engine import _TextState
    from lmspec.serve.sampling import SamplingParams, probs, sample

    res = decoder.generate([prompt], tokens)
    step = res.times.decode_s / max(1, res.times.steps)
    logits = torch.randn(1, decoder.model.spec.model.vocab_size)
    params = SamplingParams(temperature=0.8, top_p=0.95)
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for _ in range(tokens):
        sample(probs(logits[0], params), gen)
    sampler = (time.perf_counter() - t0) / tokens
    text = _TextState(tokenizer, ())
    t0 = time.perf_counter()
    for t in res.token_ids[0]:
        text.feed_new([t])
    text_s = (time.perf_counter() - t0) / tokens
    return {"step_s": step, "sampler_s": sampler, "text_s": text_s}


def _hf_generate(hf: torch.nn.Module, ids: torch.Tensor, tokens: int) -> list[list[int]]:
    with torch.inference_mode():
        out = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return out[:, ids.shape[1] :].tolist()


def _compare_batch(ours, hf, prompts: list[list[int]], depths: list[int], tokens: int, repeats: int):
    """Alternating rounds of transformers and each depth's decoder; (rows, the depth-0 decoder)."""
    from lmspec.serve.static_decode import StaticDecoder

    batch, ids = len(prompts), torch.tensor(prompts)
    decoders = {
        d: StaticDecoder(
            ours, batch_size=batch, max_len=ids.shape[1] + tokens, speculative_depth=d, compile=True
        )
        for d in depths
    }
    compile_s = {d: dec.generate(prompts, tokens).times.compile_s for d, dec in decoders.items()}
    _hf_generate(hf, ids, tokens)  # warm-up
    times: dict[int | str, list[float]] = {"hf": [], **{d: [] for d in depths}}
    identical, accept = True, {}
    for _ in range(repeats):
        t0 = time.perf_counter()
        want = _hf_generate(hf, ids, tokens)
        times["hf"].append(time.perf_counter() - t0)
        for d, dec in decoders.items():
            t0 = time.perf_counter()
            res = dec.generate(prompts, tokens)
            times[d].append(time.perf_counter() - t0)
            identical &= res.token_ids == want
            accept[d] = (sum(res.rounds) + sum(res.accepted)) / max(1, sum(res.rounds))
    hf_s = statistics.median(times["hf"])
    rows = []
    for d in depths:
        ratios = [h / o for h, o in zip(times["hf"], times[d], strict=True)]
        ours_s = statistics.median(times[d])
        rows.append(
            {
                "batch": batch,
                "depth": d,
                "identical": identical,
                "lmspec_s": ours_s,
                "transformers_s": hf_s,
                "vs_transformers": statistics.median(ratios),
                "ratios": ratios,
                "acceptance_length": accept[d],
                "compile_s": compile_s[d],
                "lmspec_tokens_per_s": batch * tokens / ours_s,
                "transformers_tokens_per_s": batch * tokens / hf_s,
            }
        )
    return rows, decoders[0]


def vs_transformers(model: torch.nn.Module, batches: list[int], tokens: int, repeats: int) -> dict:
    """transformers' generate vs lmspec's compiled StaticDecoder at depth 0 and D, alternating."""
    from lmspec.runtime.tokenizer import ByteTokenizer

    ours, repeat = hf_expressible(model)
    hf = transformers_model(ours)
    tokenizer = ByteTokenizer()
    blocks = ours.spec.model.mtp.num_blocks if ours.spec.model.mtp else 0
    depths = sorted({0, min(blocks, 3)})
    rows, costs = [], None
    for batch in batches:
        prompts = _same_length_prompts(batch, tokenizer)
        batch_rows, decoder = _compare_batch(ours, hf, prompts, depths, tokens, repeats)
        rows += batch_rows
        if batch == 1:
            costs = _per_token_costs(decoder, tokenizer, prompts[0], tokens)
    return {
        "tokens": tokens,
        "repeats": repeats,
        "kv_head_repeat": repeat,
        "prompt_tokens": len(_same_length_prompts(1, tokenizer)[0]),
        "rows": rows,
        "per_token": costs,
    }


def print_vs_transformers(r: dict) -> None:
    print(
        f"vs transformers generate: {r['tokens']} new tokens, greedy, medians of {r['repeats']} alternating rounds"
    )
    print(
        f"{'batch':>5} {'depth':>5} {'lmspec s':>9} {'hf s':>8} {'ratio':>7} {'accept':>7} {'identical':>9}"
    )
    for row in r["rows"]:
        print(
            f"{row['batch']:>5} {row['depth']:>5} {row['lmspec_s']:>9.3f} {row['transformers_s']:>8.3f} "
            f"{row['vs_transformers']:>6.2f}x {row['acceptance_length']:>7.2f} {str(row['identical']).lower():>9}"
        )
    c = r.get("per_token")
    if c:
        print(
            f"per token (batch 1): compiled step {c['step_s'] * 1e3:.2f} ms, sampler {c['sampler_s'] * 1e3:.3f} ms "
            f"({c['sampler_s'] / c['step_s']:.0%}), text decoding {c['text_s'] * 1e3:.3f} ms "
            f"({c['text_s'] / c['step_s']:.0%})"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(ROOT / "runs" / "demo"), help="run or checkpoint directory")
    p.add_argument(
        "--spec",
        default=str(ROOT / "examples" / "mimo_v2_flash_tiny.yaml"),
        help="spec to train when there is no checkpoint",
    )
    p.add_argument("--train-tokens", type=float, default=3e5)
    p.add_argument(
        "--train-out", default=str(ROOT / "runs" / "decode_bench"), help="where the quick model is trained"
    )
    p.add_argument("--depths", type=int, nargs="+", default=None, help="default: 0..num MTP blocks")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=1, help="timed passes over the prompts per depth")
    p.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (1: steady timings on a shared CPU)"
    )
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--hf-batches", type=int, nargs="*", default=[1, 8], help="batch sizes vs transformers")
    p.add_argument("--hf-tokens", type=int, default=128, help="new tokens per row vs transformers")
    p.add_argument("--hf-repeats", type=int, default=3, help="alternating rounds vs transformers")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]

    from lmspec.runtime.modeling import from_pretrained
    from lmspec.serve.engine import Generator
    from lmspec.serve.sampling import SamplingParams

    ckpt = _checkpoint(Path(args.checkpoint), args.spec, args.train_tokens, Path(args.train_out))
    model = from_pretrained(ckpt, dtype=getattr(torch, args.dtype)).eval()
    blocks = model.spec.model.mtp.num_blocks if model.spec.model.mtp else 0
    depths = args.depths if args.depths is not None else list(range(blocks + 1))
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)

    # Warm up every code path once (allocator, first-call overheads) before timing.
    for d in depths:
        Generator(model, speculative_depth=d).generate(
            PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=8)
        )

    rows, outputs = [], {}
    for d in depths:
        gen = Generator(model, speculative_depth=d)
        tokens = steps = accepted = 0
        decode_s = 0.0
        texts = []
        for _ in range(args.repeats):
            texts = []
            for prompt in PROMPTS:
                out = gen.generate(prompt, params)
                st = out.stats
                texts.append(out.token_ids)
                # Decode time: from the first token to the last (the prefill is the same at every depth).
                decode_s += st.finished_at - st.first_token_at
                tokens += st.completion_tokens - 1
                steps += st.decode_steps
                accepted += st.accepted
        outputs[d] = texts
        rows.append(
            {
                "depth": d,
                "acceptance_length": (steps + accepted) / steps if steps else 0.0,
                "decode_tokens_per_s": tokens / decode_s if decode_s else 0.0,
                "decode_tokens": tokens,
                "decode_steps": steps,
                "seconds": decode_s,
            }
        )
    base = next((r["decode_tokens_per_s"] for r in rows if r["depth"] == 0), None)
    for r in rows:
        r["speedup"] = r["decode_tokens_per_s"] / base if base else None
        r["identical_to_depth0"] = outputs[r["depth"]] == outputs.get(0, outputs[r["depth"]])

    result = {
        "checkpoint": str(ckpt),
        "spec": model.spec.name,
        "dtype": args.dtype,
        "threads": args.threads,
        "max_tokens": args.max_tokens,
        "prompts": len(PROMPTS),
        "repeats": args.repeats,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "load_average_at_start": load_start,
        "rows": rows,
    }
    print(
        f"decode benchmark: {model.spec.name} ({ckpt}), {len(PROMPTS)} prompts x {args.max_tokens} tokens, greedy, "
        f"{args.dtype}, {args.threads} thread(s)"
    )
    print(f"{'depth':>5} {'accept len':>10} {'tok/s':>9} {'speedup':>8} {'identical':>9}")
    for r in rows:
        sp = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
        print(
            f"{r['depth']:>5} {r['acceptance_length']:>10.2f} {r['decode_tokens_per_s']:>9.1f} {sp:>8} "
            f"{str(r['identical_to_depth0']).lower():>9}"
        )
    if args.hf_batches:
        result["vs_transformers"] = vs_transformers(model, args.hf_batches, args.hf_tokens, args.hf_repeats)
        print_vs_transformers(result["vs_transformers"])
    result["load_average_at_end"] = os.getloadavg()[0]
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    identical = all(r["identical_to_depth0"] for r in rows)
    identical &= all(r["identical"] for r in result.get("vs_transformers", {}).get("rows", []))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
