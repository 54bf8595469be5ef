"""Exact match per domain around a run's mopd stages: the MiMo-V2-Flash report's Table 7, in miniature.

For each `kind: mopd` stage of a run, `lmspec eval RUN --domains` grades, greedily and on the stage's
held-out prompts (every `HELD_OUT`-th record of its prompts file, which the stage never trains on):

- the student before distillation: the weights the stage started from (`RUN/stages/NAME/`, kept by the
  trainer for this; or the `init_from` directory);
- each domain's teacher, on its own domain;
- the student after distillation: the run's newest checkpoint, or `--checkpoint`.

Prompts are rendered with the spec's chat template, as the stage's rollouts were. The grade is the
domain's verifier (`lmspec.train.tasks.verifier_for`) on the completion cut at its first newline.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from lmspec.errors import UsageError
from lmspec.spec import Spec, load_spec
from lmspec.train.mopd import (
    HELD_OUT,
    Decode,
    chat_prompts,
    exact_match_by_domain,
    load_teacher,
    stage_teacher_sources,
)
from lmspec.train.stages import source_dir
from lmspec.train.tasks import PromptRecord, read_prompt_records

DOMAINS_FILE = "domains.json"


def _start_dir(spec: Spec, run: Path, stage: int) -> Path:
    """Where mopd stage `stage` took its weights from."""
    training = spec.training
    assert training is not None
    source = training.init_source(stage)
    return source_dir(run, source if source is not None else ("stage", training.stages[stage - 1].name))


def _grade(
    name: str,
    source: str | Path | dict[str, str],
    records: list[PromptRecord],
    max_new_tokens: int,
    decode: Decode,
    device: torch.device,
) -> dict[str, float]:
    """Exact match per domain of the model in `source`: a checkpoint, run or stage directory, or a server."""
    model = load_teacher(name, source, decode=decode, device=device)
    return exact_match_by_domain(model.answer([r.prompt for r in records], max_new_tokens), records)


def _stage_report(
    spec: Spec, run: Path, stage: int, after: Path, decode: Decode, device: torch.device
) -> dict[str, Any]:
    training = spec.training
    assert training is not None
    st = training.stages[stage]
    assert st.prompts is not None and st.max_new_tokens is not None
    held_out = chat_prompts(read_prompt_records(st.prompts), spec.serving.chat_template)[::HELD_OUT]
    start = _start_dir(spec, run, stage)
    if not start.exists():
        raise UsageError(f"{run}: stage {st.name} has not started (no {start})")
    before = _grade("student", start, held_out, st.max_new_tokens, decode, device)
    final = _grade("student", after, held_out, st.max_new_tokens, decode, device)
    teachers: dict[str, float] = {}
    for domain, source in stage_teacher_sources(spec, run, stage).items():
        mine = [r for r in held_out if r.domain == domain]
        if mine:
            teachers.update(_grade(domain, source, mine, st.max_new_tokens, decode, device))
    rows = {
        d: {"before": before.get(d), "after": final.get(d), "teacher": teachers.get(d)}
        for d in sorted(set(before) | set(final))
    }
    return {
        "stage": st.name,
        "prompts": len(held_out),
        "before": str(start),
        "after": str(after),
        "domains": rows,
    }


def domain_report(
    run: str | Path, *, decode: Decode, checkpoint: str | None = None, device: str | None = None
) -> dict[str, Any]:
    """The exact-match table of every mopd stage of the run in `run` (see the module doc)."""
    from lmspec.runtime.checkpoint import resolve_checkpoint

    run = Path(run)
    spec_file = run / "spec.yaml"
    if not spec_file.is_file():
        raise UsageError(f"{run}: expected a run directory (with spec.yaml)")
    spec = load_spec(spec_file)
    training = spec.training
    stages = [i for i, s in enumerate(training.stages) if s.kind == "mopd"] if training else []
    if not stages:
        raise UsageError(f"{run}: --domains grades mopd stages, and this run's spec has none")
    after = resolve_checkpoint(checkpoint if checkpoint is not None else run)
    dev = torch.device(device or "cpu")
    return {"run": str(run), "stages": [_stage_report(spec, run, i, after, decode, dev) for i in stages]}


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def format_domain_report(report: dict[str, Any]) -> str:
    """One table per mopd stage: exact match (%) before, after, the teacher, and after / teacher."""
    from rich.console import Console
    from rich.table import Table

    console = Console(record=True, width=110, file=io.StringIO())  # recorded, then exported as text
    for st in report["stages"]:
        t = Table(title=f"{st['stage']}: greedy exact match (%) on {st['prompts']} held-out prompts")
        for col in ("domain", "student before", "student after", "teacher", "after / teacher", "gain (pts)"):
            t.add_column(col, justify="left" if col == "domain" else "right")
        for domain, r in st["domains"].items():
            b, a, te = r["before"], r["after"], r["teacher"]
            ratio = "-" if a is None or not te else f"{a / te:.2f}"
            gain = "-" if a is None or b is None else f"{100 * (a - b):+.1f}"
            t.add_row(domain, _pct(b), _pct(a), _pct(te), ratio, gain)
        console.print(t)
    return console.export_text()
