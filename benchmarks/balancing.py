"""MoE load balance with and without the aux-loss-free bias update, on the tiny MiMo spec.

Trains the spec's schedule (scaled to --max-tokens) twice from the same initialisation and data: once as
declared (bias_update 1e-3 / 1e-3 / 1e-5 per stage) and once with bias_update 0 in every stage (the
sequence-wise aux loss stays on in both, as in the paper). Expert load is read from each run's metrics:
per step, the busiest expert's share of routed tokens over the uniform share (1.0 = perfect balance),
maximised over MoE layers.

    python benchmarks/balancing.py [--max-tokens 300000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np

# Defaults point into the repository, from any working directory.
ROOT = Path(__file__).resolve().parents[1]


def _summary(rows: list[dict]) -> dict:
    loads = [np.array(r["expert_load"]) * len(r["expert_load"][0]) for r in rows if r.get("expert_load")]
    worst = [float(x.max()) for x in loads]
    tail = worst[-max(1, len(worst) // 5) :]
    last = loads[-1]
    return {
        "steps": len(rows),
        "final_max_over_uniform": worst[-1],
        "last20pct_mean_max_over_uniform": statistics.fmean(tail),
        "last20pct_worst_max_over_uniform": max(tail),
        "final_min_over_uniform": float(last.min()),
        "final_per_layer_max_over_uniform": [round(float(v), 3) for v in last.max(axis=1)],
        "final_val_loss": next((r["val_loss"] for r in reversed(rows) if "val_loss" in r), None),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default=str(ROOT / "examples" / "mimo_v2_flash_tiny.yaml"))
    ap.add_argument("--max-tokens", type=float, default=300_000)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "balancing.json"))
    args = ap.parse_args()

    from lmspec.spec import load_spec
    from lmspec.train.trainer import train

    n_stages = len(load_spec(args.spec).training.stages)
    off = [f"training.stages.{i}.overrides.bias_update=0" for i in range(n_stages)]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in (("bias balancing on", []), ("bias balancing off", off)):
            res = train(
                args.spec,
                out=Path(tmp) / name.replace(" ", "_"),
                max_tokens=args.max_tokens,
                overrides=overrides,
                progress=False,
                quiet=True,
                plot=False,
                eval_every=10**9,
                eval_tokens=8192,
                checkpoint_every=10**9,
                keep_checkpoints=1,
            )
            results[name] = _summary(res.history)

    print(
        f"expert load on {args.spec}, {args.max_tokens:,.0f} tokens "
        "(busiest expert's share / uniform share, max over MoE layers)"
    )
    print(
        f"{'setting':<22}{'final':>8}{'mean last 20%':>15}{'worst last 20%':>16}{'min share final':>17}"
        f"{'val loss':>10}"
    )
    for name, r in results.items():
        print(
            f"{name:<22}{r['final_max_over_uniform']:>8.2f}{r['last20pct_mean_max_over_uniform']:>15.2f}"
            f"{r['last20pct_worst_max_over_uniform']:>16.2f}{r['final_min_over_uniform']:>17.2f}"
            f"{r['final_val_loss']:>10.4f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"spec": args.spec, "max_tokens": args.max_tokens, "results": results}, indent=2)
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
