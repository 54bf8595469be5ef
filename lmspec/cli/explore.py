"""Commands that compare architectures: sweep, compare, eval."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lmspec.cli.common import positive_int, require_extra
from lmspec.errors import UsageError


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text[:40]!r}") from None


def _key_value(text: str) -> tuple[str, object]:
    """`KEY=VALUE` with the value read as YAML (`timeout_min=60`, `slurm_partition=gpu`)."""
    import yaml

    key, sep, raw = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text[:60]!r}")
    try:
        return key, yaml.safe_load(raw)
    except yaml.YAMLError:
        raise argparse.ArgumentTypeError(f"{key}: expected a YAML value, got {raw[:60]!r}") from None


def _load_sweep(args: argparse.Namespace):
    from lmspec.spec.loader import read_text
    from lmspec.spec.sweep import is_sweep_file, load_sweep, sweep_from_args

    read_text(Path(args.file))  # a missing or unreadable file: said of the file itself
    if is_sweep_file(args.file):
        given = [
            f
            for f, v in (("--vary", args.vary), ("--max-tokens", args.max_tokens), ("--scale", args.scale))
            if v
        ]
        if given or args.seeds is not None:
            raise UsageError(
                f"{args.file} is a sweep file: its axes, seeds and budget are in it; drop {(given or ['--seeds'])[0]}"
            )
        return load_sweep(args.file)
    name = Path(args.out).name if args.out else f"{Path(args.file).stem}_sweep"
    return sweep_from_args(
        args.file,
        args.vary or [],
        name=name,
        seeds=args.seeds or 1,
        max_tokens=args.max_tokens,
        scale=args.scale,
        combine=args.combine,
    )


def cmd_sweep(args: argparse.Namespace) -> int:
    from lmspec.train.results import collect, format_table, write_results
    from lmspec.train.sweep import plan_jobs, run_sweep

    if args.launcher == "submitit":
        require_extra("sweep", "sweep --launcher submitit")
    sweep = _load_sweep(args)
    out = Path(args.out) if args.out else Path("sweeps") / sweep.spec.name
    if args.dry_run:
        for job in plan_jobs(
            sweep, out, jobs=args.jobs, threads=args.threads, data=args.data, tokenizer=args.tokenizer
        ):
            print(f"{job.label} seed {job.seed}: {job.run_dir}")
        print(f"{len(sweep.points)} runs checked; nothing trained (--dry-run)")
        return 0
    parameters = dict(args.submitit or [])
    outcome = run_sweep(
        sweep,
        out,
        jobs=args.jobs,
        launcher=args.launcher,
        threads=args.threads,
        data=args.data,
        tokenizer=args.tokenizer,
        submitit_parameters=parameters,
        submitit_cluster=parameters.pop("cluster", None),  # "local" runs the jobs here (tests, no Slurm)
        live=False if args.no_live else None,
    )
    variants, base = collect([out])
    rows, files = write_results(variants, out, base, plots=not args.no_plots)
    print(format_table(rows))
    for f in files:
        print(f"wrote {f}")
    print(
        f"{len(outcome.done)} of {len(outcome.jobs)} runs finished "
        f"({len(outcome.skipped)} earlier, {len(outcome.done) - len(outcome.skipped)} now)"
    )
    for run_dir, reason in outcome.failed.items():
        print(f"failed: {run_dir}: {reason}", file=sys.stderr)
    return 1 if outcome.failed else 0


def cmd_compare(args: argparse.Namespace) -> int:
    from lmspec.spec import load_spec
    from lmspec.train.results import collect, format_table, write_results

    variants, base = collect(args.runs)
    if args.base is not None:
        base = load_spec(args.base)
    rows, files = write_results(variants, Path(args.output), base, plots=not args.no_plots)
    print(format_table(rows))
    for f in files:
        print(f"wrote {f}")
    return 0


def _eval_options(args: argparse.Namespace):
    from lmspec.spec.sweep import EvalOptions

    fields = {
        "passkey_lengths": args.passkey_lengths,
        "passkey_depths": args.passkey_depths,
        "passkey_trials": args.passkey_trials,
        "eval_tokens": args.eval_tokens,
    }
    try:
        return EvalOptions(**{k: v for k, v in fields.items() if v is not None})
    except ValueError as e:  # pydantic's ValidationError: one line naming the flag
        err = e.errors()[0]  # type: ignore[attr-defined]
        flag = "--" + str(err["loc"][0]).replace("_", "-")
        raise UsageError(f"{flag}: {err['msg']}, got {err.get('input')!r}") from None


def cmd_eval(args: argparse.Namespace) -> int:
    from lmspec.train.evaluate import EVAL_FILE, evaluate_run, format_report, write_report

    run = Path(args.run)
    if not run.exists():
        raise UsageError(f"{run}: no such run directory")
    if args.domains:
        return _eval_domains(run, args)
    report = evaluate_run(
        run, checkpoint=args.checkpoint, data=args.data, options=_eval_options(args), device=args.device
    )
    print(format_report(report))
    default = EVAL_FILE if args.checkpoint is None else f"eval_{Path(args.checkpoint).name}.json"
    path = write_report(report, Path(args.output) if args.output else run / default)
    print(f"wrote {path}")
    return 0


def _eval_domains(run: Path, args: argparse.Namespace) -> int:
    from lmspec.serve.rollouts import decode_batch
    from lmspec.train.domains import DOMAINS_FILE, domain_report, format_domain_report
    from lmspec.train.evaluate import write_report

    report = domain_report(run, decode=decode_batch, checkpoint=args.checkpoint, device=args.device)
    print(format_domain_report(report))
    path = write_report(report, Path(args.output) if args.output else run / DOMAINS_FILE)
    print(f"wrote {path}")
    return 0


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text[:60]!r}") from None


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text[:60]!r}") from None


def add_parsers(add) -> None:
    p = add("sweep", cmd_sweep, "train and evaluate every variant of a sweep, and tabulate them", spec=False)
    p.add_argument("file", help="a sweep file (examples/sweeps/*.yaml), or a base spec with --vary")
    p.add_argument(
        "--vary", action="append", metavar="PATH=V1,V2", help="an axis over a base spec (repeatable)"
    )
    p.add_argument("--seeds", type=positive_int, default=None, help="seeds per variant (with a base spec)")
    p.add_argument("--max-tokens", type=_number, default=None, help="shrink every run's schedule to this")
    p.add_argument("--scale", type=_number, default=None, help="multiply every run's token budgets")
    p.add_argument("--combine", choices=["product", "zip"], default="product", help="how axes combine")
    p.add_argument("--out", default=None, help="sweep folder (default: sweeps/<name>)")
    p.add_argument(
        "--jobs", type=positive_int, default=1, help="runs at once (threads are split between them)"
    )
    p.add_argument("--threads", type=positive_int, default=None, help="threads in all (default: every core)")
    p.add_argument("--launcher", choices=["local", "submitit"], default="local")
    p.add_argument(
        "--submitit", type=_key_value, action="append", metavar="KEY=VALUE", help="submitit parameter"
    )
    p.add_argument(
        "--data", nargs="*", default=None, help="training data for every run (default: the sweep's)"
    )
    p.add_argument("--tokenizer", default=None, help="tokenizer.json for every run")
    p.add_argument("--dry-run", action="store_true", help="check every run, train nothing")
    p.add_argument("--no-live", action="store_true", help="log lines instead of the live table")
    p.add_argument("--no-plots", action="store_true")

    p = add("compare", cmd_compare, "tabulate and plot runs and sweeps side by side", spec=False)
    p.add_argument("runs", nargs="+", metavar="RUN_OR_SWEEP")
    p.add_argument("-o", "--output", default="sweeps/compare", help="folder for results.* and plots")
    p.add_argument("--base", default=None, help="spec the diff column is taken against (default: the first)")
    p.add_argument("--no-plots", action="store_true")

    p = add(
        "eval", cmd_eval, "bits/byte by position, passkey retrieval and MTP acceptance of a run", spec=False
    )
    p.add_argument("run", help="run directory")
    p.add_argument("--checkpoint", default=None, help="step_N, a stage name (sweep runs) or a folder")
    p.add_argument("--data", nargs="*", default=None, help="the run's data (default: embedded corpus)")
    p.add_argument("--device", default=None, help="cpu or cuda")
    p.add_argument("--passkey-lengths", type=_ints, default=None, metavar="N,N")
    p.add_argument("--passkey-depths", type=_floats, default=None, metavar="F,F")
    p.add_argument("--passkey-trials", type=positive_int, default=None)
    p.add_argument("--eval-tokens", type=positive_int, default=None)
    p.add_argument(
        "--domains",
        action="store_true",
        help="exact match per domain of the run's mopd stages: student before and after, each teacher",
    )
    p.add_argument("-o", "--output", default=None, help="JSON report (default: RUN/eval.json)")
