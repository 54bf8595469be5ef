"""`metrics.jsonl`: one JSON object per line, appended and flushed per step.

Fields a training step writes: step, tokens (seen after the step), stage, stage_index, loss, ce, mtp (one
per MTP block), aux, lr, batch_size, seq_len, rope_theta, mtp_loss_weight, bias_update, seq_aux_coef,
grad_norm, tokens_per_s, elapsed_s, expert_load (per MoE layer, the fraction of routed tokens per expert),
and val_loss / val_bpb on steps that evaluate. The schedule fields are `schedule_at(spec, tokens - batch)`:
the values the step trained with.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
# Fields that measure the machine rather than the run: excluded when comparing two runs.
TIMING_FIELDS = frozenset({"tokens_per_s", "elapsed_s"})


class MetricsWriter:
    def __init__(self, run_dir: str | Path, *, truncate_after_step: int | None = None) -> None:
        """Open the run's metrics for appending; on resume, cut the lines logged after the checkpoint's step.

        A crash between a checkpoint and the next one leaves lines the resumed run will write again;
        cutting them keeps the file identical to an uninterrupted run's. The cut is a truncation at the
        first such line (or at a torn last line), so every byte before it stays as it was. A fresh run
        (`truncate_after_step=None`) never writes over logged lines: the run directory decides first
        (rundir.py), and this refuses if it did not.
        """
        self.path = Path(run_dir) / METRICS_FILE
        refuse_non_regular(self.path, resume=truncate_after_step is not None)
        if truncate_after_step is not None and self.path.exists():
            with self.path.open("r+b") as f:
                f.truncate(_cut_offset(f.read(), truncate_after_step))
        elif self.path.exists() and self.path.stat().st_size:
            from lmspec.errors import UsageError

            raise UsageError(f"{self.path}: already holds logged steps; refusing to write over them")
        self._f = self.path.open("a", encoding="utf-8")
        self._failed = False

    def write(self, row: dict[str, Any]) -> None:
        try:
            self._f.write(json.dumps(row) + "\n")
            self._f.flush()
        except OSError as e:  # a full disk: say which file, as the buffered writer does not
            self._failed = True
            raise OSError(e.errno, e.strerror, str(self.path)) from None

    def close(self) -> None:
        try:
            self._f.close()
        except OSError:
            if not self._failed:  # after a failed write, closing retries the same write: that error is out
                raise


def refuse_non_regular(path: Path, *, resume: bool) -> None:
    """Refuse a metrics file the run cannot safely log to, in one line naming it.

    Resuming cuts the file back and appends to it, so it must be the run's own regular file: never a
    symbolic link (to another run's metrics, say), a FIFO or a device. A fresh run only appends, so a link
    is followed, but not to a FIFO (the open would wait for a reader, and the run reads its metrics back
    for the plot), a directory or a socket.
    """
    import os
    import stat

    from lmspec.errors import UsageError
    from lmspec.files import not_regular

    try:
        mode = os.lstat(path).st_mode if resume else os.stat(path).st_mode
    except OSError:
        return  # absent (or a dangling link): opening it says what is wrong
    if resume:
        what = "a symbolic link" if stat.S_ISLNK(mode) else not_regular(mode)
    else:
        what = None if stat.S_ISREG(mode) or stat.S_ISCHR(mode) else not_regular(mode)
    if what is not None:
        raise UsageError(f"{path}: {what}, not a regular file; the run logs to a file of its own there")


def _cut_offset(data: bytes, after_step: int) -> int:
    """Byte offset of the first line logged after `after_step`, or of a torn (unterminated) last line."""
    offset = 0
    for line in data.split(b"\n")[:-1]:  # the last piece is "" or an unterminated (torn) line
        line += b"\n"
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            row = None  # a damaged line of unknown step: kept, as everything before the cut is
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] > after_step:
            return offset
        offset += len(line)
    return offset


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a metrics file (or of RUN/metrics.jsonl); a torn last line from a crash is skipped."""
    p = Path(path)
    if p.is_dir():
        p = p / METRICS_FILE
    rows = []
    for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rows.append(json.loads(line))
        except (ValueError, RecursionError):
            continue
    return rows


def without_timing(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in rows]


class ConsoleReporter:
    """Progress on the terminal: a rich bar on a TTY, else a log line every `log_every_s` seconds.

    The bar shows stage, tokens, loss, tokens/s and ETA; log lines carry the same numbers plus the latest
    held-out loss, so a batch job's log reads as a record of the run.
    """

    def __init__(self, *, enabled: bool = True, bar: bool | None = None, log_every_s: float = 10.0) -> None:
        import sys

        self.enabled = enabled
        self.use_bar = enabled and (bar if bar is not None else sys.stderr.isatty())
        self.log_every_s = log_every_s
        self._progress = None
        self._task = None
        self._last_log = 0.0
        self._total = 0.0
        self._t0 = 0.0
        self._done0 = 0.0

    def log(self, msg: str) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.console.print(msg, highlight=False)
        else:
            print(msg, flush=True)

    def start(self, total_tokens: float, done: float = 0.0) -> None:
        import time

        self._total, self._t0, self._done0 = total_tokens, time.perf_counter(), done
        self._last_log = self._t0
        if not self.use_bar:
            return
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("[bold]{task.fields[stage]}[/]"),
            BarColumn(),
            TextColumn("{task.completed:,.0f}/{task.total:,.0f} tok"),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[tps]} tok/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task(
            "train", total=total_tokens, completed=done, stage="", loss="-", tps="-"
        )

    def stage(self, sched) -> None:
        theta = ", ".join(f"{k} {v:g}" for k, v in sched.rope_theta.items())
        self.log(
            f"stage {sched.stage + 1} {sched.stage_name}: seq_len {sched.seq_len}, rope_theta {{{theta}}}, "
            f"mtp_loss_weight {sched.mtp_loss_weight:g}, bias_update {sched.bias_update:g}, "
            f"seq_aux_coef {sched.seq_aux_coef:g}"
        )

    def update(self, row: dict[str, Any]) -> None:
        import time

        if not self.enabled:
            return
        now = time.perf_counter()
        rate = (row["tokens"] - self._done0) / max(now - self._t0, 1e-9)
        if self._progress is not None and self._task is not None:
            self._progress.update(
                self._task,
                completed=min(row["tokens"], self._total),
                stage=row["stage"],
                loss=f"{row['loss']:.3f}",
                tps=f"{rate:,.0f}",
            )
            if "val_loss" in row:
                self.log(
                    f"step {row['step']}: held-out loss {row['val_loss']:.4f}, {row['val_bpb']:.3f} bits/byte"
                )
            return
        if "val_loss" in row or now - self._last_log >= self.log_every_s:
            self._last_log = now
            eta = (self._total - row["tokens"]) / max(rate, 1e-9)
            val = f" | val {row['val_loss']:.4f} ({row['val_bpb']:.3f} bpb)" if "val_loss" in row else ""
            self.log(
                f"step {row['step']:>6} | {row['stage']} | {row['tokens']:>12,}/{self._total:,.0f} tok | "
                f"loss {row['loss']:.4f} | lr {row['lr']:.2e} | bs {row['batch_size']} | {rate:,.0f} tok/s | "
                f"ETA {eta:,.0f} s{val}"
            )

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
