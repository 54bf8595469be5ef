"""Sweep and run results side by side: `results.{md,csv,json}` and plots, for `lmspec sweep` and `compare`.

One row per variant (runs that differ only in `training.seed` are one variant; in a sweep, one label):

- `variant`, `seeds`, `diff`: the overrides that make the variant from the base (a sweep's own
  settings; for hand-trained runs, the fields where its spec differs from the first run's);
- accounting, from `lmspec.compiler.accounting.account(spec, context)` — the function behind
  `lmspec stats --json` — at `context` = the longest stage's `seq_len`, under the same field names
  (`params_total`, `active_with_embedding_and_head`, `kv_bytes_at_context_total`,
  `flops_per_token_total`), so `lmspec stats SPEC --json --context N` prints the same numbers;
- measured, mean over seeds with `_std` beside it (sample standard deviation; empty for one seed):
  `bpb_<stage>` held-out bits/byte at the end of each stage, `bpb_pos_<lo>_<hi>` by position bucket
  and `bpb_beyond_<n>` past the pre-extension length (final weights, and `..._before` for the
  weights before the last stage), `passkey_exact` / `passkey_token_acc` (and `_before`),
  `mtp_accept_d<k>` (greedy self-speculation) and `mtp_accept_text_d<k>` (drafting held-out text),
  `max_expert_load` (busiest expert / uniform share, last step);
- timing (`TIMING_COLUMNS`): `tokens_per_s`, `train_s`, `eval_s`, `wall_s`. They measure the machine;
  every other column is a function of the specs, the data and the seeds.

Plots: `loss_curves.png` (training CE and held-out bits/byte against tokens, one colour per variant,
seeds averaged) and `pareto.png` (final bits/byte against KV bytes and against active parameters,
the Pareto front — no other variant both cheaper and better — drawn and ringed).
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmspec.errors import UsageError
from lmspec.spec import Spec, load_spec, loads_spec, spec_to_data

__all__ = ["TIMING_COLUMNS", "Variant", "collect", "summarize", "write_results"]

ACCOUNTING_COLUMNS = (
    "params_total",
    "active_with_embedding_and_head",
    "kv_bytes_at_context_total",
    "flops_per_token_total",
)
TIMING_COLUMNS = ("tokens_per_s", "train_s", "eval_s", "wall_s")


@dataclass
class RunRecord:
    run_dir: Path
    label: str
    seed: int
    settings: list[list[Any]] | None
    spec: Spec
    result: dict[str, Any] | None
    rows: list[dict[str, Any]]


@dataclass
class Variant:
    label: str
    runs: list[RunRecord] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Reading runs and sweeps
# ---------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _record(run_dir: Path, label: str | None, settings: list[list[Any]] | None) -> RunRecord | None:
    from lmspec.train.metrics import read_metrics

    if not (run_dir / "spec.yaml").is_file() or not (run_dir / "metrics.jsonl").is_file():
        return None
    spec = load_spec(run_dir / "spec.yaml")
    result = _read_json(run_dir / "result.json")
    if result is None and (run_dir / "eval.json").is_file():
        result = {"eval": {"final": _read_json(run_dir / "eval.json")}}  # `lmspec eval RUN` wrote it
    seed = spec.training.seed if spec.training is not None else 0
    return RunRecord(run_dir, label or run_dir.name, seed, settings, spec, result, read_metrics(run_dir))


def _from_sweep(out: Path) -> tuple[list[RunRecord], Spec | None]:
    plan = _read_json(out / "sweep.json")
    if plan is None:
        raise UsageError(f"{out}/sweep.json: not a sweep plan")
    records = []
    for r in plan.get("runs", []):
        rec = _record(out / r["run_dir"], r["label"], r["settings"])
        if rec is not None:
            records.append(rec)
    base = loads_spec(plan["base_spec"], str(out / "sweep.json")) if "base_spec" in plan else None
    return records, base


def collect(paths: list[str | Path]) -> tuple[list[Variant], Spec | None]:
    """Runs from sweep folders (with sweep.json) and run directories, grouped into variants in order."""
    records: list[RunRecord] = []
    base: Spec | None = None
    for p in map(Path, paths):
        if (p / "sweep.json").is_file():
            found, sweep_base = _from_sweep(p)
            records += found
            base = base or sweep_base
        else:
            rec = _record(p, None, None)
            if rec is None:
                raise UsageError(
                    f"{p}: neither a sweep folder (sweep.json) nor a run directory (spec.yaml, metrics.jsonl)"
                )
            records.append(rec)
    if not records:
        raise UsageError("no finished or running runs found in " + ", ".join(map(str, paths)))
    return _group(records), base


def _without_seed(spec: Spec) -> str:
    data = spec_to_data(spec)
    data.get("training", {}).pop("seed", None)
    return json.dumps(data, sort_keys=True)


def _group(records: list[RunRecord]) -> list[Variant]:
    """Sweep runs group by label; other runs by spec without the seed (named by the first run)."""
    groups: dict[str, Variant] = {}
    names: dict[str, str] = {}
    for rec in records:
        key = rec.label if rec.settings is not None else names.setdefault(_without_seed(rec.spec), rec.label)
        groups.setdefault(key, Variant(key)).runs.append(rec)
    return list(groups.values())


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(data, list) and data and all(isinstance(x, dict) for x in data):
        out = {}
        for i, v in enumerate(data):
            out.update(_flatten(v, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: data}


def _text(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def spec_diff(base: Spec, spec: Spec) -> str:
    """`path=value; ...` for every field where `spec` differs from `base` (the seed left out)."""
    a, b = _flatten(spec_to_data(base)), _flatten(spec_to_data(spec))
    keys = [k for k in b if k != "training.seed" and a.get(k, object()) != b[k]]
    keys += [k for k in a if k not in b]
    return "; ".join(f"{k}={_text(b.get(k))}" for k in keys) or "(base)"


def _diff(v: Variant, base: Spec | None) -> str:
    settings = v.runs[0].settings
    if settings is not None:
        return "; ".join(f"{k}={_text(val)}" for k, val in settings if k != "training.seed") or "(base)"
    return spec_diff(base, v.runs[0].spec) if base is not None else "(base)"


def accounting_columns(spec: Spec) -> dict[str, Any]:
    """The accounting columns of a spec: `account(spec, context)` at its longest stage `seq_len`."""
    from lmspec.compiler.accounting import account

    assert spec.training is not None
    context = max(s.seq_len for s in spec.training.stages)
    acc = account(spec, context).to_dict()
    return {"context": context, **{k: acc[k] for k in ACCOUNTING_COLUMNS}}


def _stage_bpb(rec: RunRecord) -> dict[str, float]:
    if rec.result is not None and "stage_bpb" in rec.result:
        return rec.result["stage_bpb"]
    out: dict[str, float] = {}
    for r in rec.rows:  # a hand-trained run: the last evaluation logged in each stage
        if "val_bpb" in r:
            out[r["stage"]] = r["val_bpb"]
    return out


def _eval_columns(report: dict[str, Any] | None, suffix: str) -> dict[str, float | None]:
    if not report:
        return {}
    pos, pk = report["position_bpb"], report["passkey"]
    out: dict[str, float | None] = {}
    if not suffix:
        for lo, hi, v in zip(pos["edges"], pos["edges"][1:], pos["bpb"], strict=False):
            out[f"bpb_pos_{lo}_{hi}"] = v
    if pos.get("beyond_from") is not None:
        out[f"bpb_beyond_{pos['beyond_from']}{suffix}"] = pos["beyond"]
    out[f"passkey_exact{suffix}"] = pk["mean_exact"]
    out[f"passkey_token_acc{suffix}"] = pk["mean_token_accuracy"]
    if report.get("mtp") and not suffix:
        for d, v in zip(report["mtp"]["depths"], report["mtp"]["acceptance_length"], strict=True):
            out[f"mtp_accept_d{d}"] = v
        for d, v in zip(
            report["mtp"]["depths"], report["mtp"].get("acceptance_length_text", []), strict=False
        ):
            out[f"mtp_accept_text_d{d}"] = v
    return out


def _measured(rec: RunRecord) -> dict[str, float | None]:
    """The measured figures of one run, by column name."""
    out: dict[str, float | None] = {f"bpb_{k}": v for k, v in _stage_bpb(rec).items()}
    evaluation = (rec.result or {}).get("eval") or {}
    out.update(_eval_columns(evaluation.get("final"), ""))
    out.update(_eval_columns(evaluation.get("before_last_stage"), "_before"))
    last = rec.rows[-1] if rec.rows else {}
    out["max_expert_load"] = last.get("max_load_ratio")
    result = rec.result or {}
    train_s = result.get("train_s", last.get("elapsed_s"))
    out["tokens_per_s"] = last.get("tokens", 0) / train_s if train_s else None
    out["train_s"] = train_s
    out["eval_s"] = result.get("eval_s")
    out["wall_s"] = result.get("wall_s", train_s)
    return out


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    xs = [v for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return None, None
    mean = math.fsum(xs) / len(xs)
    if len(xs) < 2:
        return mean, None
    return mean, math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (len(xs) - 1))


def summarize(variants: list[Variant], base: Spec | None = None) -> list[dict[str, Any]]:
    """One row per variant: label, seeds, diff, accounting columns, then measured mean and _std columns."""
    table = []
    base = base or (variants[0].runs[0].spec if variants else None)
    for v in variants:
        row: dict[str, Any] = {"variant": v.label, "seeds": len(v.runs), "diff": _diff(v, base)}
        row.update(accounting_columns(v.runs[0].spec))
        per_run = [_measured(r) for r in v.runs]
        names = list(dict.fromkeys(k for m in per_run for k in m))
        for name in names:
            mean, std = _mean_std([m.get(name) for m in per_run])
            row[name] = mean
            if name not in TIMING_COLUMNS:
                row[f"{name}_std"] = std
        table.append(row)
    return table


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(k for r in rows for k in r))


def to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=_columns(rows), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: "" if v is None else (repr(v) if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


def _cell(row: dict[str, Any], name: str) -> str:
    v, std = row.get(name), row.get(f"{name}_std")
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if isinstance(v, int) or name in ACCOUNTING_COLUMNS:
        return f"{int(v):,}" if float(v).is_integer() else f"{v:,.0f}"
    digits = 0 if name in ("tokens_per_s", "train_s", "eval_s", "wall_s") else 3
    return f"{v:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def display_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The columns a reader compares, in table order (the _std columns ride along in each cell)."""
    return [c for c in _columns(rows) if not c.endswith("_std") and c != "context"]


def to_markdown(rows: list[dict[str, Any]]) -> str:
    cols = display_columns(rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r, c).replace("|", "\\|") for c in cols) + " |")
    context = {r.get("context") for r in rows}
    note = f"\nAccounting at context {', '.join(map(str, sorted(context)))} tokens (`lmspec stats SPEC --json --context N`)."
    return "\n".join(lines) + "\n" + note + "\n"


def write_results(
    variants: list[Variant], out: str | Path, base: Spec | None = None, *, plots: bool = True
) -> tuple[list[dict[str, Any]], list[Path]]:
    """Write OUT/results.{md,csv,json} (and the plots); returns the rows and the files written."""
    from lmspec.runtime.checkpoint import write_text_atomic

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = summarize(variants, base)
    runs = [
        {"variant": v.label, "seed": r.seed, "run_dir": str(r.run_dir), "measured": _measured(r)}
        for v in variants
        for r in v.runs
    ]
    files = [out / "results.md", out / "results.csv", out / "results.json"]
    write_text_atomic(files[0], to_markdown(rows))
    write_text_atomic(files[1], to_csv(rows))
    doc = {
        "timing_columns": list(TIMING_COLUMNS),
        "accounting_columns": list(ACCOUNTING_COLUMNS),
        "rows": rows,
        "runs": runs,
    }
    write_text_atomic(files[2], json.dumps(doc, indent=1) + "\n")
    if plots:
        files.append(plot_loss_curves(variants, out / "loss_curves.png"))
        files.append(plot_pareto(rows, out / "pareto.png"))
    return rows, files


_SHORT = {
    "params_total": "params_total (stats)",
    "active_with_embedding_and_head": "active_with_embedding_and_head (stats)",
    "kv_bytes_at_context_total": "kv_bytes_at_context_total (stats)",
    "flops_per_token_total": "flops_per_token_total (stats)",
}


def format_table(rows: list[dict[str, Any]], width: int = 160) -> str:
    """The results as text, one column per variant and one line per figure (a sweep has few variants and
    many figures); the files hold the same table the other way round."""
    from rich.console import Console
    from rich.table import Table

    console = Console(record=True, width=width, file=io.StringIO())
    t = Table(title="held-out bits/byte and accuracies: mean ± std over seeds", title_justify="left")
    t.add_column("")
    for r in rows:
        t.add_column(str(r["variant"]), justify="right", overflow="fold")
    for c in display_columns(rows):
        if c in ("variant", "diff"):
            continue
        t.add_row(_SHORT.get(c, c), *[_cell(r, c) for r in rows])
    console.print(t)
    diffs = "\n".join(f"  {r['variant']}: {r['diff']}" for r in rows)
    return console.export_text() + "variants:\n" + diffs + "\n"


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


def _mean_curve(runs: list[RunRecord], key: str) -> tuple[list[float], list[float]]:
    """(tokens, mean of `key` over seeds) at the steps every seed logged (seeds share one schedule)."""
    n = min(len(r.rows) for r in runs)
    tokens = [runs[0].rows[i]["tokens"] for i in range(n)]
    values = [math.fsum(r.rows[i][key] for r in runs) / len(runs) for i in range(n)]
    return tokens, values


def _ema(values: list[float], span: int) -> list[float]:
    alpha, avg, out = 2.0 / (span + 1), 0.0, []
    for i, v in enumerate(values, 1):
        avg = alpha * v + (1 - alpha) * avg
        out.append(avg / (1 - (1 - alpha) ** i))
    return out


def plot_loss_curves(variants: list[Variant], path: Path) -> Path:
    """Training CE (smoothed) and held-out bits/byte against tokens, one colour per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_ce, ax_bpb) = plt.subplots(1, 2, figsize=(13, 4.8), layout="constrained")
    try:
        for i, v in enumerate(variants):
            colour = f"C{i % 10}"
            runs = [r for r in v.runs if r.rows]
            if not runs:
                continue
            tokens, ce = _mean_curve(runs, "ce")
            ax_ce.plot(
                [t / 1e6 for t in tokens],
                _ema(ce, max(1, len(ce) // 40)),
                color=colour,
                lw=1.4,
                label=v.label,
            )
            val = [[(r["tokens"], r["val_bpb"]) for r in run.rows if "val_bpb" in r] for run in runs]
            n = min(len(x) for x in val)
            if n:
                xs = [val[0][i][0] / 1e6 for i in range(n)]
                ys = [math.fsum(x[i][1] for x in val) / len(val) for i in range(n)]
                ax_bpb.plot(xs, ys, "o-", color=colour, ms=3, lw=1.2, label=v.label)
        _stage_lines((ax_ce, ax_bpb), variants[0].runs[0].rows if variants and variants[0].runs else [])
        ax_ce.set(
            xlabel="tokens seen (M)", ylabel="training CE (nats/token, smoothed)", title="training loss"
        )
        ax_bpb.set(
            xlabel="tokens seen (M)", ylabel="bits per byte", title="held-out bits per byte (mean over seeds)"
        )
        for ax in (ax_ce, ax_bpb):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path


def _stage_lines(axes, rows: list[dict[str, Any]]) -> None:
    seen = None
    for r in rows:
        if r.get("stage") != seen:
            if seen is not None:
                start = (r["tokens"] - r["batch_size"] * r["seq_len"]) / 1e6
                for ax in axes:
                    ax.axvline(start, color="k", lw=0.8, ls="--", alpha=0.4)
            seen = r.get("stage")


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: none with cost <= and bpb <= and one of them <."""
    front = []
    for i, (c, b) in enumerate(points):
        beaten = any(
            c2 <= c and b2 <= b and (c2 < c or b2 < b) for j, (c2, b2) in enumerate(points) if j != i
        )
        if not beaten:
            front.append(i)
    return sorted(front, key=lambda i: points[i])


def _final_bpb_column(rows: list[dict[str, Any]]) -> str | None:
    stages = [
        c
        for c in display_columns(rows)
        if c.startswith("bpb_") and not c.startswith(("bpb_pos_", "bpb_beyond_"))
    ]
    return stages[-1] if stages else None


def plot_pareto(rows: list[dict[str, Any]], path: Path) -> Path:
    """Final held-out bits/byte against KV bytes and against active parameters; Pareto front ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator, StrMethodFormatter

    ycol = _final_bpb_column(rows)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), layout="constrained")
    try:
        for ax, xcol, xlabel in (
            (axes[0], "kv_bytes_at_context_total", "KV cache bytes at the longest context"),
            (axes[1], "active_with_embedding_and_head", "active parameters per token"),
        ):
            pts = [(r, r[xcol], r.get(ycol)) for r in rows if ycol and r.get(ycol) is not None]
            for i, (r, x, y) in enumerate(pts):
                ax.errorbar(
                    x,
                    y,
                    yerr=r.get(f"{ycol}_std") or 0.0,
                    fmt="o",
                    color=f"C{i % 10}",
                    capsize=3,
                    label=r["variant"],
                )
            front = pareto_front([(x, y) for _, x, y in pts])
            if front:
                fx, fy = [pts[i][1] for i in front], [pts[i][2] for i in front]
                ax.step(fx, fy, where="post", color="k", lw=1.0, ls="--", label="Pareto front")
                ax.scatter(fx, fy, s=160, facecolors="none", edgecolors="k", lw=1.2)
            ax.set(
                xlabel=xlabel,
                ylabel=f"held-out bits/byte ({ycol})",
                title=f"{ycol} vs {xlabel.split(' ')[0]}",
            )
            # Counts as written (1,093,520), not as 1e6 plus an offset; few enough ticks not to overlap.
            ax.xaxis.set_major_locator(MaxNLocator(5))
            ax.xaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path
