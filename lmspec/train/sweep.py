"""`lmspec sweep`: train every run of a sweep, side by side, and evaluate each one.

A sweep (`lmspec.spec.sweep`) is a list of runs: variant x axis point x seed, each a validated spec.
`plan_jobs` resolves each one exactly as `lmspec train` would (schedule scaled by the sweep's
`max_tokens` / `scale`, the schedule's length checked, the graph lowered and checked), so every run
is refused or accepted before the first one trains. Each run is an ordinary run directory,
`OUT/runs/<spec hash[:16]>`, holding what `lmspec train` writes plus:

    job.json      what the run is (label, seed, the resolved spec, data, threads, eval options)
    train.log     its console output, appended to by every attempt
    stages/NAME/  the weights at the end of each stage (what `lmspec eval --checkpoint NAME` reads)
    result.json   written last: the measured figures and the evaluation of the final weights and of
                  the weights before the last stage

A run with `result.json` is finished and is skipped; a run with checkpoints is resumed from the newest
(bitwise, as `lmspec train --resume`); anything else starts afresh. So a sweep killed at any point and
started again trains only what is missing, and every figure but the timings comes out the same.

The training loop is the Trainer's (`setup`, `step`, `evaluate`, `checkpoint`) with one addition: the
last step of every stage is evaluated on held-out data at that stage's `seq_len` and checkpointed, so
"bits per byte at the end of each stage" is measured where the stage ends, and is restored by a resume.

Runs go to worker processes: `--jobs N` at a time on this machine (`launcher="local"`, each
`python -m lmspec.train.sweep RUN_DIR` with `threads // N` intra-op threads, killed with the sweep),
or to Slurm through submitit (`launcher="submitit"`; its local executor where there is no Slurm).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lmspec.errors import UsageError
from lmspec.spec import dump_spec, spec_hash
from lmspec.spec.sweep import EvalOptions, Sweep

__all__ = [
    "Job",
    "SweepOutcome",
    "is_finished",
    "plan_jobs",
    "run_job",
    "run_sweep",
]

PLAN_FILE = "sweep.json"
RUNS_DIR = "runs"
JOB_FILE = "job.json"
RESULT_FILE = "result.json"
LOG_FILE = "train.log"
STAGES_DIR = "stages"
LOCK_FILE = ".lock"
# Checkpoints a sweep run keeps: the newest two are enough to resume; stage ends are kept in stages/.
KEEP_CHECKPOINTS = 2
HASH_CHARS = 16
POLL_S = 1.0


@dataclass(frozen=True)
class Job:
    """Everything a worker needs to train and evaluate one run; written to RUN/job.json."""

    run_dir: str
    label: str
    variant: str
    seed: int
    settings: list[list[Any]]
    spec_yaml: str
    spec_hash: str
    data: list[str] | None
    tokenizer: str | None
    threads: int
    eval: dict[str, Any]
    eval_tokens: int = 16384

    def save(self) -> None:
        from lmspec.runtime.checkpoint import write_text_atomic

        Path(self.run_dir).mkdir(parents=True, exist_ok=True)
        write_text_atomic(Path(self.run_dir) / JOB_FILE, json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, run_dir: str | Path) -> Job:
        path = Path(run_dir) / JOB_FILE
        try:
            return cls(**json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError) as e:
            raise UsageError(f"{path}: not a sweep job ({e})") from None


# ---------------------------------------------------------------------------------------------
# Planning: every run resolved and checked before anything trains
# ---------------------------------------------------------------------------------------------


def available_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _absolute(paths: list[str] | None, root: Path) -> list[str] | None:
    return None if paths is None else [str(p if Path(p).is_absolute() else (root / p)) for p in paths]


def plan_jobs(
    sweep: Sweep,
    out: str | Path,
    *,
    jobs: int = 1,
    threads: int | None = None,
    data: list[str] | None = None,
    tokenizer: str | None = None,
) -> list[Job]:
    """One Job per run of `sweep`, each resolved (scaled schedule) and checked as `lmspec train` would.

    `data` / `tokenizer` (command line) take the place of the sweep file's own, which are relative to it.
    """
    from lmspec.compiler import lower, run_passes
    from lmspec.train.trainer import check_schedule, resolve_spec

    s = sweep.spec
    per_job = max(1, (threads or available_threads()) // max(jobs, 1))
    data = data if data is not None else _absolute(s.data, sweep.root)
    tok = (
        tokenizer
        if tokenizer is not None
        else (_absolute([s.tokenizer], sweep.root)[0] if s.tokenizer else None)
    )
    planned: list[Job] = []
    seen: dict[str, str] = {}
    for p in sweep.points:
        spec = resolve_spec(p.spec, max_tokens=s.max_tokens, scale=s.scale)
        check_schedule(spec)
        run_passes(lower(spec))  # the check pass refuses what the runtime cannot execute
        h = spec_hash(spec)
        who = f"{p.label} seed {p.seed}"
        mopd = [st.name for st in spec.training.stages if st.kind == "mopd"] if spec.training else []
        if mopd:
            # A sweep run trains and evaluates text stages; distillation runs with `lmspec train`.
            raise UsageError(
                f"sweep {s.name}: {who}: expected pretrain and sft stages, got mopd stage {mopd[0]!r} "
                "(train a pipeline with mopd stages with `lmspec train`)"
            )
        if h in seen:
            raise UsageError(f"sweep {s.name}: {who} is the same spec as {seen[h]}; remove one of them")
        seen[h] = who
        planned.append(
            Job(
                run_dir=str(Path(out) / RUNS_DIR / h[:HASH_CHARS]),
                label=p.label,
                variant=p.variant,
                seed=p.seed,
                settings=[[k, v] for k, v in p.settings],
                spec_yaml=dump_spec(spec),
                spec_hash=h,
                data=data,
                tokenizer=tok,
                threads=per_job,
                eval=s.eval.model_dump(),
                eval_tokens=s.eval.eval_tokens,
            )
        )
    return planned


def write_plan(sweep: Sweep, out: Path, planned: list[Job]) -> Path:
    """OUT/sweep.json: the sweep's name, base and runs (what `lmspec compare OUT` reads back)."""
    from lmspec.runtime.checkpoint import write_text_atomic

    plan = {
        "name": sweep.spec.name,
        "file": sweep.file,
        "base_spec": dump_spec(sweep.base),
        "labels": sweep.labels,
        "runs": [
            {
                "run_dir": str(Path(j.run_dir).relative_to(out)),
                "label": j.label,
                "variant": j.variant,
                "seed": j.seed,
                "settings": j.settings,
                "spec_hash": j.spec_hash,
            }
            for j in planned
        ],
    }
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / PLAN_FILE, json.dumps(plan, indent=1) + "\n")
    return out / PLAN_FILE


def read_result(run_dir: str | Path) -> dict[str, Any] | None:
    path = Path(run_dir) / RESULT_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # a damaged result is redone


def is_finished(job: Job) -> bool:
    result = read_result(job.run_dir)
    return result is not None and result.get("spec_hash") == job.spec_hash


# ---------------------------------------------------------------------------------------------
# One run (in a worker process)
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(run_dir: Path) -> Iterator[None]:
    """Hold RUN/.lock for the run's lifetime: two processes never train one run directory."""
    import fcntl

    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOCK_FILE, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"{run_dir}: another process is running this run") from None
        yield


def _save_stage(trainer, run_dir: Path, stage: str) -> None:
    """The weights at a stage's end, under RUN/stages/STAGE (replaced whole, never half-written)."""
    final = run_dir / STAGES_DIR / stage
    tmp = run_dir / STAGES_DIR / f".tmp_{stage}"
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.model.save_pretrained(tmp)
    if trainer.extra_files:
        for name, src in trainer.extra_files.items():
            shutil.copyfile(src, tmp / name)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def _train(job: Job, run_dir: Path):
    """Train the run to the end of its schedule (resuming when it has checkpoints); returns the Trainer."""
    from lmspec.runtime.checkpoint import has_checkpoints
    from lmspec.spec import loads_spec
    from lmspec.train.schedule import schedule_at
    from lmspec.train.trainer import TrainConfig, Trainer

    resume = has_checkpoints(run_dir)
    config = TrainConfig(
        spec=loads_spec(job.spec_yaml, str(run_dir / JOB_FILE)),
        data=job.data,
        out=run_dir,
        resume=resume,
        overwrite=not resume,  # no checkpoint: whatever an interrupted first attempt logged is redone
        tokenizer=job.tokenizer,
        progress=False,
        eval_tokens=job.eval_tokens,
        keep_checkpoints=KEEP_CHECKPOINTS,
        plot=False,
    )
    t = Trainer(config)
    t.setup()
    t.reporter.start(t.total_tokens, done=t.tokens)
    try:
        while t.tokens < t.total_tokens:
            row = t.step()
            stage_end = (
                schedule_at(t.spec, t.tokens).stage != row["stage_index"] or t.tokens >= t.total_tokens
            )
            if t.steps % t.eval_every == 0 or stage_end:
                row["val_loss"], row["val_bpb"] = t.evaluate(row["seq_len"])
            if t.metrics is not None:
                t.metrics.write(row)
            t.reporter.update(row)
            if stage_end and t.d.is_main:
                _save_stage(t, run_dir, row["stage"])
            if t.steps % t.checkpoint_every == 0 or stage_end:
                t.checkpoint()
    finally:
        t.reporter.stop()
        if t.metrics is not None:
            t.metrics.close()
    return t


def _stage_figures(run_dir: Path) -> dict[str, Any]:
    """Held-out bits/byte at the end of each stage, and the last step's figures, from metrics.jsonl."""
    from lmspec.train.metrics import read_metrics

    rows = read_metrics(run_dir)
    stage_bpb: dict[str, float] = {}
    for r in rows:
        if "val_bpb" in r:
            stage_bpb[r["stage"]] = r["val_bpb"]  # the last evaluation in the stage: its end
    last = rows[-1] if rows else {}
    return {
        "stage_bpb": stage_bpb,
        "steps": last.get("step", 0),
        "tokens": last.get("tokens", 0),
        "max_load_ratio": last.get("max_load_ratio"),
        "train_s": last.get("elapsed_s", 0.0),
    }


def _evaluate(t, job: Job, run_dir: Path) -> dict[str, Any]:
    """The final weights' evaluation, and that of the weights before the last stage (when there is one)."""
    import lmspec
    from lmspec.train.evaluate import evaluate_model

    options = EvalOptions(**job.eval)
    report = {"final": evaluate_model(t.model, t.spec, t.corpus, options, t.d.device)}
    stages = t.spec.training.stages
    before = run_dir / STAGES_DIR / stages[-2].name if len(stages) > 1 else None
    if before is not None and before.is_dir():
        model = lmspec.from_pretrained(before, device=t.d.device, backend=t.backend)
        report["before_last_stage"] = {
            "stage": stages[-2].name,
            **evaluate_model(model, t.spec, t.corpus, options, t.d.device),
        }
    return report


def run_job(run_dir: str | Path, *, log: bool = False) -> dict[str, Any]:
    """Train and evaluate one run of a sweep (skip it when finished); returns and writes its result.

    `log`: append this process's output to RUN/train.log (under submitit, whose own logs are elsewhere).
    """
    run_dir = Path(run_dir)
    job = Job.load(run_dir)
    with contextlib.ExitStack() as stack:
        if log:
            f = stack.enter_context(open(run_dir / LOG_FILE, "a", encoding="utf-8"))
            stack.enter_context(contextlib.redirect_stdout(f))
            stack.enter_context(contextlib.redirect_stderr(f))
        stack.enter_context(_locked(run_dir))
        if is_finished(job):
            print(f"{job.label} seed {job.seed}: finished earlier, nothing to do", flush=True)
            return read_result(run_dir) or {}
        return _run_locked(job, run_dir)


def _run_locked(job: Job, run_dir: Path) -> dict[str, Any]:
    import torch

    from lmspec.runtime.checkpoint import write_text_atomic
    from lmspec.train import distributed
    from lmspec.train.plot import plot_run

    torch.set_num_threads(job.threads)
    t = _train(job, run_dir)
    t0 = time.perf_counter()
    evaluation = _evaluate(t, job, run_dir) if t.d.is_main else {}
    eval_s = time.perf_counter() - t0
    distributed.shutdown(t.d)
    if not t.d.is_main:
        return {}
    plot_run(run_dir)
    figures = _stage_figures(run_dir)
    result = {
        "label": job.label,
        "variant": job.variant,
        "seed": job.seed,
        "settings": job.settings,
        "spec_hash": job.spec_hash,
        **figures,
        "tokens_per_s": figures["tokens"] / max(figures["train_s"], 1e-9),
        "eval_s": eval_s,
        "wall_s": figures["train_s"] + eval_s,
        "eval": evaluation,
    }
    write_text_atomic(run_dir / RESULT_FILE, json.dumps(result, indent=1) + "\n")
    print(f"{job.label} seed {job.seed}: done; result in {run_dir / RESULT_FILE}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    """`python -m lmspec.train.sweep RUN_DIR`: what each local worker process runs."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m lmspec.train.sweep RUN_DIR", file=sys.stderr)
        return 2
    try:
        run_job(argv[0])
    except UsageError as e:  # SpecError cannot happen: the spec was validated before the job was written
        print(f"lmspec: error: {e}", file=sys.stderr)
        return 2
    return 0


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the sweep process dies (Linux), so a kill -9 of the
    sweep leaves no orphan training on; a rerun then takes over the run directory."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class LocalLauncher:
    """Worker processes on this machine: `python -m lmspec.train.sweep RUN_DIR`, output to RUN/train.log."""

    name = "local"

    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, job: Job) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": str(job.threads), "MKL_NUM_THREADS": str(job.threads)}
        with open(Path(job.run_dir) / LOG_FILE, "a", encoding="utf-8") as log:
            self.procs[job.run_dir] = subprocess.Popen(
                [sys.executable, "-m", "lmspec.train.sweep", job.run_dir],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,  # noqa: PLW1509
            )

    def poll(self) -> dict[str, str | None]:
        """Finished runs since the last poll: run_dir -> None (success) or the reason it failed."""
        done: dict[str, str | None] = {}
        for run_dir, p in list(self.procs.items()):
            rc = p.poll()
            if rc is not None:
                del self.procs[run_dir]
                done[run_dir] = None if rc == 0 else _failure(run_dir, f"exit status {rc}")
        return done

    def stop(self) -> None:
        for p in self.procs.values():
            p.terminate()
        for p in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=30)


def _failure(run_dir: str, what: str) -> str:
    """The last line of a failed run's log that says why (an `lmspec: error:` line or an exception)."""
    try:
        lines = (Path(run_dir) / LOG_FILE).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        lines = []
    reasons = [ln for ln in lines if ln.startswith("lmspec: error:") or "Error" in ln.split(":")[0]]
    return f"{what}: {reasons[-1][:300]}" if reasons else f"{what} (see {Path(run_dir) / LOG_FILE})"


class SubmititLauncher:
    """Each run a submitit job: Slurm where `sbatch` exists, else submitit's local executor.

    `parameters` go to `executor.update_parameters` (`timeout_min`, `slurm_partition`, `gpus_per_node`,
    `tasks_per_node`, ...). With several tasks, every task runs the run as one rank of a torch.distributed
    job (submitit exports RANK / WORLD_SIZE / MASTER_ADDR, as torchrun would), and the trainer shards it
    with FSDP2.
    """

    name = "submitit"

    def __init__(
        self, folder: Path, parameters: dict[str, Any] | None = None, cluster: str | None = None
    ) -> None:
        import submitit

        self.executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
        self.executor.update_parameters(**{"timeout_min": 24 * 60, **(parameters or {})})
        self.jobs: dict[str, Any] = {}

    def start(self, job: Job) -> None:
        self.executor.update_parameters(name=f"lmspec-{Path(job.run_dir).name}")
        self.jobs[job.run_dir] = self.executor.submit(submitit_entry, job.run_dir)

    def poll(self) -> dict[str, str | None]:
        done: dict[str, str | None] = {}
        for run_dir, j in list(self.jobs.items()):
            if j.done():
                del self.jobs[run_dir]
                error = j.exception()
                done[run_dir] = (
                    None if error is None else _failure(run_dir, str(error).strip().splitlines()[-1][:300])
                )
        return done

    def stop(self) -> None:
        for j in self.jobs.values():
            with contextlib.suppress(Exception):
                j.cancel()


def submitit_entry(run_dir: str) -> dict[str, Any]:
    """What a submitit job runs: one run, as one rank when the job has several tasks."""
    import submitit

    env = submitit.JobEnvironment()
    if env.num_tasks > 1:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return run_job(run_dir, log=env.global_rank == 0)


# ---------------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------------


def last_metrics_row(run_dir: str | Path) -> dict[str, Any] | None:
    """The last complete line of RUN/metrics.jsonl, with the latest held-out `val_bpb` of the lines read
    (read from the end: the file grows all run long)."""
    path = Path(run_dir) / "metrics.jsonl"
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 65536))
            tail = f.read()
    except OSError:
        return None
    rows = []
    for line in tail.split(b"\n")[:-1]:  # the piece after the last newline may be torn
        with contextlib.suppress(ValueError):
            row = json.loads(line)
            if isinstance(row, dict):
                rows.append(row)
    if not rows:
        return None
    val = [r["val_bpb"] for r in rows if "val_bpb" in r]
    return {**rows[-1], **({"val_bpb": val[-1]} if val else {})}


class Board:
    """One row per run: queued, running (stage, step, tokens, loss, held-out bits/byte), done or failed.

    On a terminal it is a rich table refreshed in place; otherwise (a log file, a batch job) each change
    of status is one line on stderr, and every `LOG_EVERY_S` a line per running run.
    """

    LOG_EVERY_S = 60.0

    def __init__(self, jobs: list[Job], *, live: bool | None = None) -> None:
        self.jobs = {j.run_dir: j for j in jobs}
        self.order = [j.run_dir for j in jobs]
        self.status: dict[str, tuple[str, str]] = {j.run_dir: ("queued", "") for j in jobs}
        self.started: dict[str, float] = {}
        self.live = sys.stderr.isatty() if live is None else live
        self._live = None
        self._last_log = time.monotonic()

    def __enter__(self) -> Board:
        if self.live:
            from rich.console import Console
            from rich.live import Live

            self._live = Live(self.table(), console=Console(stderr=True), refresh_per_second=2)
            self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.update(self.table())
            self._live.stop()
            self._live = None

    def _name(self, run_dir: str) -> str:
        j = self.jobs[run_dir]
        return f"[{self.order.index(run_dir) + 1}/{len(self.order)}] {j.label} seed {j.seed} ({Path(run_dir).name})"

    def set(self, run_dir: str, status: str, note: str) -> None:
        self.status[run_dir] = (status, note)
        if status == "running":
            self.started[run_dir] = time.monotonic()
        if self._live is None:
            print(
                f"{self._name(run_dir)}: {status}{': ' + note if note else ''}", file=sys.stderr, flush=True
            )
        else:
            self._live.update(self.table())

    def refresh(self) -> None:
        if self._live is not None:
            self._live.update(self.table())
            return
        if time.monotonic() - self._last_log < self.LOG_EVERY_S:
            return
        self._last_log = time.monotonic()
        for run_dir, (status, _) in self.status.items():
            row = last_metrics_row(run_dir) if status == "running" else None
            if row is not None:
                print(
                    f"{self._name(run_dir)}: {row.get('stage')} step {row.get('step')}, "
                    f"{row.get('tokens', 0):,} tokens, loss {row.get('loss', float('nan')):.3f}",
                    file=sys.stderr,
                    flush=True,
                )

    def table(self):
        from rich.table import Table

        t = Table(title="sweep", title_justify="left")
        for col in ("#", "run", "seed", "status", "stage", "step", "tokens", "loss", "held-out bpb", "time"):
            t.add_column(col, justify="right" if col in ("#", "seed", "step", "tokens", "loss") else "left")
        colours = {"queued": "dim", "running": "yellow", "done": "green", "skipped": "green", "failed": "red"}
        for i, run_dir in enumerate(self.order, 1):
            status, note = self.status[run_dir]
            row = last_metrics_row(run_dir) if status in ("running", "done", "skipped") else None
            row = row or {}
            elapsed = time.monotonic() - self.started[run_dir] if status == "running" else None
            t.add_row(
                str(i),
                self.jobs[run_dir].label,
                str(self.jobs[run_dir].seed),
                f"[{colours[status]}]{status}[/]" + (f" ({note[:60]})" if note else ""),
                str(row.get("stage", "")),
                str(row.get("step", "")),
                f"{row['tokens']:,}" if "tokens" in row else "",
                f"{row['loss']:.3f}" if "loss" in row else "",
                f"{row['val_bpb']:.3f}" if "val_bpb" in row else "",
                f"{elapsed:.0f} s" if elapsed is not None else "",
            )
        return t


# ---------------------------------------------------------------------------------------------
# The sweep
# ---------------------------------------------------------------------------------------------


@dataclass
class SweepOutcome:
    out: Path
    jobs: list[Job]
    done: list[str] = field(default_factory=list)  # run dirs finished (now or earlier)
    skipped: list[str] = field(default_factory=list)  # run dirs finished earlier
    failed: dict[str, str] = field(default_factory=dict)  # run dir -> reason


def run_sweep(
    sweep: Sweep,
    out: str | Path,
    *,
    jobs: int = 1,
    launcher: str = "local",
    threads: int | None = None,
    data: list[str] | None = None,
    tokenizer: str | None = None,
    submitit_parameters: dict[str, Any] | None = None,
    submitit_cluster: str | None = None,
    live: bool | None = None,
) -> SweepOutcome:
    """Plan, check and run every run of `sweep` under OUT (skipping finished ones); see the module doc."""
    out = Path(out)
    if jobs < 1:
        raise UsageError(f"--jobs: expected a positive number, got {jobs}")
    planned = plan_jobs(sweep, out, jobs=jobs, threads=threads, data=data, tokenizer=tokenizer)
    write_plan(sweep, out, planned)
    outcome = SweepOutcome(out=out, jobs=planned)
    board = Board(planned, live=live)
    pending = []
    for j in planned:
        if is_finished(j):
            outcome.done.append(j.run_dir)
            outcome.skipped.append(j.run_dir)
            board.set(j.run_dir, "skipped", "finished earlier")
        else:
            j.save()
            pending.append(j)
    if launcher == "local":
        runner: LocalLauncher | SubmititLauncher = LocalLauncher()
    elif launcher == "submitit":
        runner = SubmititLauncher(out / "submitit", submitit_parameters, submitit_cluster)
    else:
        raise UsageError(f"--launcher: expected local or submitit, got {launcher!r}")
    _drive(runner, pending, jobs, board, outcome)
    return outcome


def _drive(runner, pending: list[Job], jobs: int, board, outcome: SweepOutcome) -> None:
    """Keep `jobs` runs going until every pending run has finished or failed; refresh the board."""
    queue = list(pending)
    running = 0
    with board:
        try:
            while queue or running:
                while queue and running < jobs:
                    job = queue.pop(0)
                    runner.start(job)
                    board.set(job.run_dir, "running", "")
                    running += 1
                for run_dir, failure in runner.poll().items():
                    running -= 1
                    if failure is None and read_result(run_dir) is not None:
                        outcome.done.append(run_dir)
                        board.set(run_dir, "done", "")
                    else:
                        outcome.failed[run_dir] = failure or "finished without a result.json"
                        board.set(run_dir, "failed", outcome.failed[run_dir])
                board.refresh()
                if queue or running:
                    time.sleep(POLL_S)
        except BaseException:
            runner.stop()
            raise


if __name__ == "__main__":
    sys.exit(main())
