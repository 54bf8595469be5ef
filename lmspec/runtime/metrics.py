"""`metrics.jsonl`: one JSON object per line, appended and flushed per step.

Fields a training step writes: step, tokens (seen after the step), stage, stage_index, loss, ce, mtp (one
per MTP block), aux, lr, batch_size, seq_len, rope_theta, mtp_loss_weight, bias_update, seq_aux_coef,
grad_norm, tokens_per_s, elapsed_s, expert_load (per MoE layer, the fraction of routed tokens per expert),
and val_loss / val_bpb on steps that evaluate. The schedule fields are `schedule_at(spec, tokens - batch)`:
the values the step trained with.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
# Fields that measure the machine rather than the run: excluded when comparing two runs.
TIMING_FIELDS = frozenset({"tokens_per_s", "elapsed_s"})


class MetricsWriter:
    def __init__(self, run_dir: str | Path, *, truncate_after_step: int | None = None) -> None:
        """Open the run's metrics for appending; on resume, drop lines past the checkpoint's step.

        A crash between a checkpoint and the next one leaves lines the resumed run will write again;
        dropping them keeps the file identical to an uninterrupted run's.
        """
        self.path = Path(run_dir) / METRICS_FILE
        if truncate_after_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= truncate_after_step]
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
            os.replace(tmp, self.path)
        elif truncate_after_step is None and self.path.exists():
            self.path.unlink()
        self._f = self.path.open("a", encoding="utf-8")

    def write(self, row: dict[str, Any]) -> None:
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a metrics file (or of RUN/metrics.jsonl); a torn last line from a crash is skipped."""
    p = Path(path)
    if p.is_dir():
        p = p / METRICS_FILE
    rows = []
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def without_timing(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in rows]
