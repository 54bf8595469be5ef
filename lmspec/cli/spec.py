"""Commands on a spec: check, schema, stats, graph, compile, import-hf, test-kernels."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from lmspec.cli.common import device_count, load, output_path, positive_int, require_extra, spec_files
from lmspec.errors import UsageError
from lmspec.spec import Spec, dump_spec


def _machine_memory() -> tuple[int, str]:
    """Bytes of memory this machine gives a process: physical RAM, or a smaller cgroup limit."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < ram:
            return int(text), "memory limit (cgroup)"
    return ram, "RAM"


def _size(n: float) -> str:
    """A byte count for a person: `350 MB`, `76.1 GB`, `7.91 PB`."""
    scale, unit = next(((s, u) for s, u in ((1e15, "PB"), (1e12, "TB"), (1e9, "GB")) if n >= s), (1e6, "MB"))
    return f"{n / scale:.3g} {unit}"


def check_cpu_memory(spec: Spec, shown: str) -> str:
    """`check --target cpu`: the first stage's training-step memory against this machine's, from the
    accounting alone (nothing is allocated). Returns the summary line; raises UsageError when it cannot fit."""
    from lmspec.compiler.accounting import training_step_memory

    if spec.training is not None:
        stage = spec.training.stages[0]
        batch, seq_len = stage.batch_size.size, stage.seq_len
        what = f"stage {stage.name} (batch {batch} x seq_len {seq_len})"
    else:
        batch, seq_len, what = 0, 0, "no training section: parameters, gradients and AdamW state"
    mem = training_step_memory(spec, batch, seq_len)
    have, kind = _machine_memory()
    total, params, grads, adamw, acts, machine = map(
        _size, (mem.total, mem.params, mem.grads, mem.optimizer, mem.activations, have)
    )
    parts = f"{total} = parameters {params} + gradients {grads} + AdamW {adamw} + activations {acts}"
    if mem.total > have:
        one = training_step_memory(spec, min(batch, 1), seq_len).total
        raise UsageError(
            f"{shown}: --target cpu: one training step of {what} needs about {parts}, more than this "
            f"machine's {machine} of {kind} (with --micro-batch-size 1: about {_size(one)}); "
            "lower the batch size or seq_len, or train with --micro-batch-size"
        )
    return f"memory of one training step on cpu, {what}: about {parts}; fits in this machine's {machine} of {kind}"


def check_world_size(args: argparse.Namespace, world_size: int) -> str:
    """`check --world-size N`: the spec's `training.parallel` against N ranks; a file:line:col error if
    its product differs. Returns the summary line."""
    from lmspec.errors import SpecError
    from lmspec.spec import load as load_with_positions
    from lmspec.spec.schema import world_size_problem

    loaded = load_with_positions(args.spec, args.overrides)
    training = loaded.spec.training
    parallel = training.parallel if training is not None else None
    problem = world_size_problem(parallel, world_size)
    if problem is not None:
        # The section's own entry, else (set by --set alone) the first of its fields.
        here = [pos for path, pos in loaded.positions.items() if path[:2] == ("training", "parallel")]
        pos = loaded.positions.get(("training", "parallel")) or min(
            here, key=lambda p: (p.file, p.line, p.col)
        )
        raise SpecError(pos.file, pos.line, pos.col, "training.parallel", problem)
    if parallel is None:
        return f"layout on {world_size} ranks: training.parallel unset, every rank an FSDP shard"
    p = parallel
    return (
        f"layout on {world_size} ranks: data {p.data} x fsdp {p.fsdp} x expert {p.expert} x tensor {p.tensor}"
    )


def cmd_check(args: argparse.Namespace) -> int:
    from lmspec.spec import load as load_with_positions
    from lmspec.spec.stages import check_stage_paths

    loaded = load_with_positions(args.spec, args.overrides)
    check_stage_paths(loaded, require=False)  # what the stages point at must fit, where it exists yet
    spec = loaded.spec
    ranks = check_world_size(args, args.world_size) if args.world_size is not None else None
    memory = check_cpu_memory(spec, args.spec) if args.target == "cpu" else None
    m = spec.model
    kinds: dict[str, int] = {}
    for name in m.layer_blocks:
        kinds[name] = kinds.get(name, 0) + 1
    layout = ", ".join(f"{n}x{k}" for k, n in kinds.items())
    stages = len(spec.training.stages) if spec.training else 0
    mtp = m.mtp.num_blocks if m.mtp else 0
    print(
        f"{args.spec}: ok — {spec.name}: {m.num_layers} layers ({layout}), hidden {m.hidden_size}, "
        f"vocab {m.vocab_size}, {mtp} MTP blocks, {stages} training stages"
    )
    for line in (ranks, memory):
        if line is not None:
            print(line)
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    print(json.dumps(Spec.model_json_schema(), indent=2))
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from lmspec.compiler.accounting import print_stats

    if args.context < 1:
        raise UsageError(f"--context: expected a positive token count, got {args.context}")
    if args.kv_dtype_bytes is not None and args.kv_dtype_bytes < 1:
        raise UsageError(f"--kv-dtype-bytes: expected a positive byte count, got {args.kv_dtype_bytes}")
    spec = load(args)
    code = print_stats(spec, as_json=args.json, context=args.context, kv_dtype_bytes=args.kv_dtype_bytes)
    if not args.json and spec.model.mtp is not None and spec.training is not None:
        # The figures count every block the model has; a stage may train fewer (overrides.mtp_num_blocks).
        trained = [f"{s.name} {spec.stage_mtp_blocks(i)}" for i, s in enumerate(spec.training.stages)]
        print(
            f"MTP figures are for model.mtp.num_blocks = {spec.model.mtp.num_blocks}, the model as built, saved "
            f"and served; MTP blocks trained per stage: {', '.join(trained)}"
        )
    return code


def cmd_graph(args: argparse.Namespace) -> int:
    spec, sources = spec_files(args)
    output = None if args.output is None else str(output_path("-o", args.output, sources))
    return draw_command(spec, fmt=args.format, layers=args.layers, output=output, renderer=args.renderer)


def cmd_compile(args: argparse.Namespace) -> int:
    from lmspec.codegen import compile_spec

    out_dir = None if args.output is None else output_path("-o", args.output)
    compiled = compile_spec(load(args), out_dir=out_dir, spec_path=args.spec)
    print(compiled.describe())
    return 0


def cmd_import_hf(args: argparse.Namespace) -> int:
    return import_hf_command(args.config, output_path("-o", args.output, (args.config,)))


def cmd_test_kernels(args: argparse.Namespace) -> int:
    require_extra("kernels", "test-kernels")
    return test_kernels_command(load(args), examples=args.examples, seq_len=args.seq_len)


def draw_command(
    spec: Spec,
    fmt: str = "text",
    layers: str | None = None,
    output: str | None = None,
    renderer: str = "auto",
) -> int:
    """`lmspec graph`: compile `spec` and write its graph as text, DOT, SVG or PNG."""
    from lmspec.compiler import lower, run_passes
    from lmspec.compiler.draw import RENDERERS, parse_layers, render

    graph = run_passes(lower(spec))
    try:
        selected = parse_layers(layers, len(graph.layers))
    except ValueError as e:
        raise UsageError(str(e)) from None
    path = Path(output) if output else (Path(f"{spec.name}.{fmt}") if fmt in ("svg", "png") else None)
    if path is not None and not path.parent.exists():
        raise UsageError(f"-o: directory {str(path.parent)!r} does not exist")
    if fmt not in ("text", "dot", "svg", "png"):
        raise UsageError(f"--format: expected text, dot, svg or png, got {fmt!r}")
    if renderer not in RENDERERS:
        raise UsageError(f"--renderer: expected one of {', '.join(RENDERERS)}, got {renderer!r}")
    try:
        src = render(graph, fmt, selected, path, renderer)
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None
    if src is not None:
        sys.stdout.write(src)
    else:
        print(f"wrote {path}")
    return 0


def import_hf_command(config_path: str | Path, output: str | Path) -> int:
    """`lmspec import-hf CONFIG.json -o spec.yaml`: write the spec (no training section) as YAML."""
    from lmspec.codegen.hf import config_to_spec, export_issues, read_config

    path = Path(config_path)
    config = read_config(path)  # a regular file (stat first: /dev/zero, FIFOs refused), JSON, an object
    # A model folder's config.json is named for its folder; any other JSON file for itself.
    folder = path.resolve().parent.name
    name = folder if path.stem == "config" and folder else path.stem
    spec = config_to_spec(config, name=re.sub(r"[^0-9A-Za-z_]+", "_", name) or "imported")
    data = dump_spec(spec).replace("training: null\n", "")
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"# Imported from {path} by `lmspec import-hf`.\n" + data)
    issues = export_issues(spec)
    print(
        f"{out}: {spec.name}: {spec.model.num_layers} layers, hidden {spec.model.hidden_size}"
        + (f"; note: {', '.join(issues)}" if issues else "")
    )
    return 0


def test_kernels_command(
    spec: Any, *, examples: int = 50, seq_len: int | None = None, dtypes: tuple[str, ...] = ("float32",)
) -> int:
    """``lmspec test-kernels SPEC``: run the suite on the kernel variants of the spec's IR, print the table.

    Returns the exit status: 0 when every kernel passes, 1 otherwise. ``seq_len`` caps sequence lengths.
    """
    from rich.console import Console

    from lmspec.compiler import lower, run_passes
    from lmspec.compiler.variants import kernel_variants
    from lmspec.testing import print_kernel_table, run_kernel_suite

    console = Console()
    name = getattr(spec, "name", "spec")
    console.print(
        f"property-testing the kernels of {name}: {examples} examples per kernel, dtypes {', '.join(dtypes)}"
    )
    variants = kernel_variants(run_passes(lower(spec)))
    rows = run_kernel_suite(variants, examples, dtypes=dtypes, max_seq=seq_len)
    print_kernel_table(rows, console=console)
    return 0 if all(r.verdict == "pass" for r in rows) else 1


def add_parsers(add) -> None:
    p = add("check", cmd_check, "validate a spec and print a one-line summary")
    p.add_argument(
        "--target",
        choices=["cpu"],
        default=None,
        help="also estimate the memory of one training step (first stage) and refuse when it cannot fit here",
    )
    p.add_argument(
        "--world-size",
        type=device_count,
        default=None,
        metavar="N",
        help="also check that training.parallel (data x fsdp x expert x tensor) equals N ranks",
    )
    add("schema", cmd_schema, "print the JSON Schema of the spec language", spec=False)

    p = add("stats", cmd_stats, "parameters, active parameters, KV cache and FLOPs, from the spec alone")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--context", type=positive_int, default=262144, help="context length for KV-cache totals")
    p.add_argument(
        "--kv-dtype-bytes", type=int, default=None, help="bytes per cached element (default: 2, bf16)"
    )

    p = add("graph", cmd_graph, "draw the lowered graph")
    p.add_argument("--format", choices=["text", "dot", "svg", "png"], default="text")
    p.add_argument("--layers", default=None, help="layer range to draw, e.g. 0-6")
    p.add_argument("-o", "--output", default=None, help="output file (default: stdout or SPEC.FORMAT)")
    p.add_argument(
        "--renderer",
        choices=["auto", "dot", "matplotlib"],
        default="auto",
        help="svg/png drawing: graphviz dot (auto: when installed) or matplotlib",
    )

    p = add("compile", cmd_compile, "generate the model module (and kernels) for a spec")
    p.add_argument("-o", "--output", default=None, help="write into this directory instead of the cache")

    p = add(
        "import-hf", cmd_import_hf, "turn a transformers mimo_v2_flash config.json into a spec", spec=False
    )
    p.add_argument("config", help="config.json")
    p.add_argument("-o", "--output", required=True, help="spec YAML to write")

    p = add("test-kernels", cmd_test_kernels, "property-test the kernels generated for a spec")
    p.add_argument("--examples", type=positive_int, default=50, help="Hypothesis examples per kernel")
    p.add_argument(
        "--seq-len", type=positive_int, default=None, help="cap sequence lengths (for full-size specs)"
    )
