"""Training throughput: lmspec's generated model vs transformers' MiMoV2FlashForCausalLM, same config.

One training step = forward with labels + backward + AdamW step, on the same batch, in the same process,
alternating the two models so that machine noise hits both alike. transformers' model has no MTP blocks, so
the like-for-like comparison uses the spec with `model.mtp.num_blocks=0`; lmspec with its MTP blocks (what
`lmspec train` runs) is reported as an extra row.

    python benchmarks/train_throughput.py [--spec examples/mimo_v2_flash_tiny.yaml] [--batch 16] [--seq 128] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

# Defaults point into the repository, from any working directory.
ROOT = Path(__file__).resolve().parents[1]


def _step_fn(model, x, y, hf: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> float:
        t0 = time.perf_counter()
        if hf:
            # transformers shifts labels itself: give it the unshifted sequence.
            loss = model(input_ids=x, labels=torch.cat([x[:, :1], y], dim=1)[:, :-1]).loss
        else:
            out = model(x, labels=y)
            loss = out.loss + 0.1 * (torch.stack(out.mtp_losses).mean() if out.mtp_losses else 0.0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default=str(ROOT / "examples" / "mimo_v2_flash_tiny.yaml"))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per model (after 2 warm-up steps)")
    ap.add_argument(
        "--threads", type=int, default=0, help="intra-op threads for both models (0: torch's default)"
    )
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_throughput.json"))
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    from transformers import MiMoV2FlashConfig, MiMoV2FlashForCausalLM

    import lmspec
    from lmspec.codegen.hf import spec_to_config
    from lmspec.spec import load_spec

    torch.manual_seed(0)
    spec_mtp = load_spec(args.spec)
    spec = load_spec(args.spec, ["model.mtp.num_blocks=0", "serving.speculative_depth=0"])
    config = spec_to_config(spec)
    config.pop("architectures", None)
    hf_config = MiMoV2FlashConfig(**{k: v for k, v in config.items() if k != "model_type"})
    hf_config._attn_implementation = "eager"  # the only one transformers supports for this model (sinks)
    models = {
        "transformers": (MiMoV2FlashForCausalLM(hf_config).train(), True),
        "lmspec": (lmspec.build(spec).train(), False),
        "lmspec + 3 MTP blocks": (lmspec.build(spec_mtp).train(), False),
    }
    x = torch.randint(0, spec.model.vocab_size, (args.batch, args.seq + 1))
    inputs, labels = x[:, :-1].contiguous(), x[:, 1:].contiguous()
    steps = {name: _step_fn(m, inputs, labels, hf) for name, (m, hf) in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    for i in range(args.steps + 2):
        for name, step in steps.items():
            t = step()
            if i >= 2:
                times[name].append(t)

    tokens = args.batch * args.seq
    rows = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        rows[name] = {"median_step_s": med, "tokens_per_s": tokens / med, "steps": len(ts)}
    base = rows["transformers"]["tokens_per_s"]
    for r in rows.values():
        r["vs_transformers"] = r["tokens_per_s"] / base

    print(
        f"one training step (fwd+bwd+AdamW), {spec.name}, batch {args.batch} x {args.seq} tokens, "
        f"{torch.get_num_threads()} threads, {args.steps} timed steps"
    )
    print(f"{'model':<24}{'step (ms)':>12}{'tokens/s':>12}{'vs transformers':>18}")
    for name, r in rows.items():
        print(
            f"{name:<24}{r['median_step_s'] * 1e3:>12.1f}{r['tokens_per_s']:>12,.0f}{r['vs_transformers']:>17.2f}x"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "spec": args.spec,
                "batch": args.batch,
                "seq_len": args.seq,
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "results": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
