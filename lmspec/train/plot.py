"""`lmspec plot RUN_DIR`: one PNG that tells a run's story.

Left column, against tokens seen, with the stage boundaries drawn in each panel: training loss (CE and
total) with the held-out loss, the learning rate, and the batch size. Right column: the held-out bits per
byte, and the expert-load heatmap (MoE layers x experts, share of routed tokens at the last logged step,
centred on the uniform share).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lmspec.train.metrics import METRICS_FILE


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


# Fields every plotted row needs, as counts (the axes and the stage boundaries come from them).
_REQUIRED = ("step", "tokens", "batch_size", "seq_len")
# Fields that may be non-finite (a diverged run logs nan losses) but must be numbers.
_NUMBERS = ("loss", "ce", "lr")
_OPTIONAL = ("val_loss", "val_bpb")


def _number(value: Any, *, finite: bool) -> bool:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    return ok and (not finite or math.isfinite(value))


def _count(value: Any) -> bool:
    """A count the axes are drawn against: a whole number in [0, 2**53), exact as a float."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**53


def _row_problem(row: Any) -> str | None:
    if not isinstance(row, dict):
        return f"expected a JSON object, found {type(row).__name__}"
    for key in _REQUIRED + _NUMBERS + _OPTIONAL:
        if key not in row:
            if key in _OPTIONAL:
                continue
            return f"no field {key!r}"
        if key in _REQUIRED and not _count(row[key]):
            return f"{key}: expected a whole number >= 0, found {str(row[key])[:40]!r}"
        if not _number(row[key], finite=False):
            return f"{key}: expected a number, found {str(row[key])[:40]!r}"
    load = row.get("expert_load")
    if load is not None:
        rect = (
            isinstance(load, list)
            and all(isinstance(r, list) for r in load)
            and len({len(r) for r in load}) <= 1
        )
        if not rect or not all(_number(v, finite=True) for r in load for v in r):
            return "expert_load: expected a rectangular list of lists of finite numbers"
    return None


def read_run_rows(path: Path) -> list[dict[str, Any]]:
    """A run's metrics, each row checked; UsageError names the first bad line. A torn last line is skipped."""
    from lmspec.errors import UsageError

    lines = path.read_bytes().split(b"\n")
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8", errors="replace"))
        except (ValueError, RecursionError):
            if n == len(lines):  # no newline after it: the line a crash cut short
                continue
            raise UsageError(f"{path}:{n}: not JSON: {line[:60]!r}") from None
        problem = _row_problem(row)
        if problem is not None:
            raise UsageError(f"{path}:{n}: {problem}")
        rows.append(row)
    if not rows:
        raise UsageError(f"{path}: no training steps logged yet")
    return rows


def _finite(values: list[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def _plot_loss(ax_loss, ax_bpb, rows: list[dict[str, Any]], x, scale: float, span: int) -> None:
    ce = [r["ce"] for r in rows]
    total = [r["loss"] for r in rows]
    ax_loss.plot(x, ce, color="tab:blue", alpha=0.2, lw=0.8)
    ax_loss.plot(x, _smooth(ce, span), color="tab:blue", lw=1.6, label="train CE")
    ax_loss.plot(
        x, _smooth(total, span), color="tab:purple", lw=1.0, ls="--", label="train total (CE+MTP+aux)"
    )
    val = [
        (r["tokens"] / scale, r["val_loss"], r["val_bpb"]) for r in rows if "val_loss" in r and "val_bpb" in r
    ]
    vl: tuple[float, ...] = ()
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
    # Limits from finite values only: a diverged run's nan or inf losses would make them invalid.
    lows, highs = _finite(ce + list(vl)), _finite(_smooth(total, span))
    if lows and highs:
        ax_loss.set_ylim(max(0.0, min(lows) - 0.2), max(highs) + 0.2)
    ax_loss.legend(loc="upper right", fontsize=8)
    ax_loss.set_title("loss")
    ax_bpb.set_ylabel("bits per byte")
    ax_bpb.set_title("held-out bits per byte")


def _plot_schedule(ax_lr, ax_bs, rows: list[dict[str, Any]], x_hold) -> None:
    """The learning rate, and the batch size with the sequence length on a twin axis, held per step."""

    def held(key: str) -> list[float]:
        values = [r[key] for r in rows]
        return values + values[-1:]

    ax_lr.plot(x_hold, held("lr"), color="tab:green", lw=1.4)
    ax_lr.set_ylabel("learning rate")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax_lr.set_title("learning rate")

    ax_bs.step(x_hold, held("batch_size"), where="post", color="tab:orange", lw=1.4)
    ax_bs.set_ylim(0, max(max(r["batch_size"] for r in rows), 1) * 1.15)
    ax_bs.set_ylabel("batch size (sequences)")
    ax_seq = ax_bs.twinx()
    ax_seq.step(x_hold, held("seq_len"), where="post", color="tab:gray", lw=1.2, ls="--")
    ax_seq.set_ylim(0, max(max(r["seq_len"] for r in rows), 1) * 1.15)
    ax_seq.set_ylabel("seq_len (dashed)", color="tab:gray")
    ax_seq.tick_params(axis="y", colors="tab:gray")
    ax_bs.set_title("batch size (solid) and sequence length (dashed)")


def _mark_stages(axes, ax_lr, stages: list[tuple[float, str]], scale: float) -> None:
    for ax in axes:
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


def _plot_load(fig, ax_load, rows: list[dict[str, Any]]) -> None:
    """Heatmap of the last logged expert load, each cell as a multiple of the uniform share."""
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    loads = [r for r in rows if r.get("expert_load") and r["expert_load"][0]]
    if not loads:
        ax_load.axis("off")
        ax_load.text(0.5, 0.5, "no MoE layers", ha="center", va="center")
        return
    last = loads[-1]
    load = np.array(last["expert_load"], dtype=float)
    n_exp = load.shape[1]
    ratio = load * n_exp  # 1.0 = the uniform share
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


def plot_run(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Render RUN_DIR/metrics.jsonl to a PNG (default RUN_DIR/plot.png) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    run = Path(run_dir)
    rows = read_run_rows(run / METRICS_FILE)
    out = Path(output) if output is not None else run / "plot.png"
    tokens = np.array([r["tokens"] for r in rows], dtype=float)
    scale, unit = (1e6, "M") if tokens[-1] >= 1e5 else (1e3, "K")
    x = tokens / scale
    # LR, batch size and seq_len hold from the step's first token: draw them against where the step began.
    x_start = np.array([r["tokens"] - r["batch_size"] * r["seq_len"] for r in rows], dtype=float) / scale
    x_hold = np.append(x_start, x[-1])  # the last step's values hold until its last token

    fig = plt.figure(figsize=(13, 8.5), layout="constrained")
    grid = fig.add_gridspec(3, 2, width_ratios=[1.6, 1.0])
    ax_loss = fig.add_subplot(grid[0, 0])
    ax_lr = fig.add_subplot(grid[1, 0], sharex=ax_loss)
    ax_bs = fig.add_subplot(grid[2, 0], sharex=ax_loss)
    ax_bpb = fig.add_subplot(grid[0, 1], sharex=ax_loss)
    ax_load = fig.add_subplot(grid[1:, 1])
    try:
        _plot_loss(ax_loss, ax_bpb, rows, x, scale, span=max(1, len(rows) // 50))
        _plot_schedule(ax_lr, ax_bs, rows, x_hold)
        ax_bs.set_xlabel(f"tokens seen ({unit})")
        ax_bpb.set_xlabel(f"tokens seen ({unit})")
        _mark_stages((ax_loss, ax_lr, ax_bs, ax_bpb), ax_lr, _stage_starts(rows), scale)
        _plot_load(fig, ax_load, rows)
        fig.suptitle(f"{run.name}: {rows[-1]['step']} steps, {tokens[-1]:,.0f} tokens", fontsize=12)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=110)
    finally:
        plt.close(fig)
    return out
