"""`lmspec plot RUN_DIR`: one PNG that tells a run's story.

Left column, against tokens seen, with the stage boundaries drawn in each panel: training loss (CE and
total) with the held-out loss, the learning rate, and the batch size. Right column: the held-out bits per
byte, and the expert-load heatmap (MoE layers x experts, share of routed tokens at the last logged step,
centred on the uniform share).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmspec.train.metrics import METRICS_FILE, read_metrics


def _stage_starts(rows: list[dict[str, Any]]) -> list[tuple[float, str]]:
    """(tokens at which the stage's first step began, stage name) for each stage the run reached."""
    starts, seen = [], None
    for r in rows:
        if r.get("stage") != seen:
            seen = r.get("stage")
            starts.append((r["tokens"] - r["batch_size"] * r["seq_len"], str(seen)))
    return starts


def _smooth(values: list[float], span: int) -> list[float]:
    """Exponential moving average, debiased, so a noisy per-step loss reads as a curve."""
    if span <= 1:
        return values
    alpha, avg, out = 2.0 / (span + 1), 0.0, []
    for i, v in enumerate(values, 1):
        avg = alpha * v + (1 - alpha) * avg
        out.append(avg / (1 - (1 - alpha) ** i))
    return out


def plot_run(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Render RUN_DIR/metrics.jsonl to a PNG (default RUN_DIR/plot.png) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    run = Path(run_dir)
    rows = [r for r in read_metrics(run / METRICS_FILE) if "step" in r]
    if not rows:
        from lmspec.errors import UsageError

        raise UsageError(f"{run / METRICS_FILE}: no training steps logged yet")
    out = Path(output) if output is not None else run / "plot.png"
    tokens = np.array([r["tokens"] for r in rows], dtype=float)
    scale, unit = (1e6, "M") if tokens[-1] >= 1e5 else (1e3, "K")
    x = tokens / scale
    # LR, batch size and seq_len hold from the step's first token: draw them against where the step began.
    x_start = np.array([r["tokens"] - r["batch_size"] * r["seq_len"] for r in rows], dtype=float) / scale
    x_hold = np.append(x_start, x[-1])  # the last step's values hold until its last token

    def held(key: str) -> list[float]:
        values = [r[key] for r in rows]
        return values + values[-1:]

    stages = _stage_starts(rows)
    span = max(1, len(rows) // 50)

    fig = plt.figure(figsize=(13, 8.5), layout="constrained")
    grid = fig.add_gridspec(3, 2, width_ratios=[1.6, 1.0])
    ax_loss = fig.add_subplot(grid[0, 0])
    ax_lr = fig.add_subplot(grid[1, 0], sharex=ax_loss)
    ax_bs = fig.add_subplot(grid[2, 0], sharex=ax_loss)
    ax_bpb = fig.add_subplot(grid[0, 1], sharex=ax_loss)
    ax_load = fig.add_subplot(grid[1:, 1])

    ce = [r["ce"] for r in rows]
    total = [r["loss"] for r in rows]
    ax_loss.plot(x, ce, color="tab:blue", alpha=0.2, lw=0.8)
    ax_loss.plot(x, _smooth(ce, span), color="tab:blue", lw=1.6, label="train CE")
    ax_loss.plot(
        x, _smooth(total, span), color="tab:purple", lw=1.0, ls="--", label="train total (CE+MTP+aux)"
    )
    val = [(r["tokens"] / scale, r["val_loss"], r["val_bpb"]) for r in rows if "val_loss" in r]
    if val:
        vx, vl, vb = zip(*val, strict=True)
        ax_loss.plot(vx, vl, "o-", color="tab:red", ms=4, lw=1.4, label="held-out CE")
        ax_bpb.plot(vx, vb, "o-", color="tab:red", ms=4, lw=1.4, label="held-out")
        ax_bpb.annotate(
            f"{vb[-1]:.3f}",
            (vx[-1], vb[-1]),
            textcoords="offset points",
            xytext=(-4, 8),
            ha="right",
            fontsize=9,
            color="tab:red",
        )
    ax_loss.set_ylabel("loss (nats/token)")
    smooth_total = _smooth(total, span)
    lo = min(min(ce), min(vl) if val else min(ce))
    ax_loss.set_ylim(max(0.0, lo - 0.2), max(smooth_total) + 0.2)
    ax_loss.legend(loc="upper right", fontsize=8)
    ax_loss.set_title("loss")

    ax_lr.plot(x_hold, held("lr"), color="tab:green", lw=1.4)
    ax_lr.set_ylabel("learning rate")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax_lr.set_title("learning rate")

    ax_bs.step(x_hold, held("batch_size"), where="post", color="tab:orange", lw=1.4)
    ax_bs.set_ylim(0, max(r["batch_size"] for r in rows) * 1.15)
    ax_bs.set_ylabel("batch size (sequences)")
    ax_bs.set_xlabel(f"tokens seen ({unit})")
    ax_seq = ax_bs.twinx()
    ax_seq.step(x_hold, held("seq_len"), where="post", color="tab:gray", lw=1.2, ls="--")
    ax_seq.set_ylim(0, max(r["seq_len"] for r in rows) * 1.15)
    ax_seq.set_ylabel("seq_len (dashed)", color="tab:gray")
    ax_seq.tick_params(axis="y", colors="tab:gray")
    ax_bs.set_title("batch size (solid) and sequence length (dashed)")

    ax_bpb.set_ylabel("bits per byte")
    ax_bpb.set_title("held-out bits per byte")
    ax_bpb.set_xlabel(f"tokens seen ({unit})")

    for ax in (ax_loss, ax_lr, ax_bs, ax_bpb):
        ax.grid(alpha=0.3)
        for i, (start, _) in enumerate(stages):
            if i > 0:
                ax.axvline(start / scale, color="k", lw=0.8, ls="--", alpha=0.5)
    for start, name in stages:
        ax_lr.annotate(
            name,
            (start / scale, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(3, -3),
            textcoords="offset points",
            va="top",
            ha="left",
            fontsize=8,
            color="0.25",
            bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "0.8", "alpha": 0.9},
        )

    loads = [r for r in rows if r.get("expert_load")]
    if loads:
        last = loads[-1]
        load = np.array(last["expert_load"], dtype=float)
        n_exp = load.shape[1]
        ratio = load * n_exp  # 1.0 = the uniform share
        from matplotlib.colors import TwoSlopeNorm

        # White is the uniform share; blue under-used, red over-used; 2x uniform saturates unless exceeded.
        norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=max(2.0, float(ratio.max())))
        im = ax_load.imshow(ratio, cmap="RdBu_r", norm=norm, aspect="auto")
        ax_load.set_xlabel("expert")
        ax_load.set_ylabel("MoE layer")
        ax_load.set_xticks(range(n_exp) if n_exp <= 32 else np.linspace(0, n_exp - 1, 9, dtype=int))
        ax_load.set_yticks(range(load.shape[0]))
        if n_exp <= 16 and load.shape[0] <= 16:
            for (i, j), v in np.ndenumerate(ratio):
                ink = "white" if abs(v - 1.0) > 0.6 else "black"
                ax_load.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color=ink)
        fig.colorbar(im, ax=ax_load, shrink=0.8, label="load / uniform share")
        ax_load.set_title(f"expert load at step {last['step']} (max {ratio.max():.2f}x uniform)")
    else:
        ax_load.axis("off")
        ax_load.text(0.5, 0.5, "no MoE layers", ha="center", va="center")

    fig.suptitle(f"{run.name}: {rows[-1]['step']} steps, {tokens[-1]:,.0f} tokens", fontsize=12)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
