"""`lmspec plan`: the layouts of N devices that fit a spec, for training and serving, from the accounting."""

from __future__ import annotations

import argparse
import json
import re

from lmspec.cli.common import device_count, load, positive_int
from lmspec.errors import UsageError

# Units of --gpu-memory: SI (GB = 10^9 bytes, as accelerators are sold) and binary (GiB = 2^30).
_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
MAX_GPU_MEMORY = 2**50  # a PiB: far above any device, far below a float's trouble
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]+)\s*")


def gpu_memory(text: str) -> int:
    """An argparse type: a memory size with its unit, `141GB`, `80GiB`, `1.5TB`, as whole bytes."""
    match = _SIZE.fullmatch(text[:100])
    unit = match.group(2).upper() if match else ""
    if match is None or unit not in _UNITS:
        raise argparse.ArgumentTypeError(
            f"expected a size with a unit (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB) such as 141GB, got {text[:40]!r}"
        )
    value = float(match.group(1)) * _UNITS[unit]
    if not 1 <= value <= MAX_GPU_MEMORY:
        raise argparse.ArgumentTypeError(f"expected a size from 1 B to 1 PiB, got {text[:40]!r}")
    return int(value)


def layout_arg(text: str) -> tuple[int, int, int, int]:
    """An argparse type: `data,fsdp,expert,tensor`, e.g. `1,1,2,4`."""
    parts = text.split(",")
    if len(parts) != 4:
        raise argparse.ArgumentTypeError(
            f"expected data,fsdp,expert,tensor such as 1,1,2,4, got {text[:40]!r}"
        )
    return tuple(device_count(p) for p in parts)  # type: ignore[return-value]


def _gb(n: float) -> str:
    """Bytes as decimal GB (the unit devices are sold in), three significant digits."""
    if n == 0:
        return "0"
    if n >= 1e12:
        return f"{n / 1e12:.3g} TB"
    return f"{n / 1e9:.3g} GB" if n >= 1e8 else f"{n / 1e6:.3g} MB"


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    """Plain columns: the first left-aligned, the rest right-aligned."""
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return [line(headers), *(line(r) for r in rows)]


def _short(lay) -> str:
    return f"{lay.data}·{lay.fsdp}·{lay.expert}·{lay.tensor}"


def _training_rows(fits, shown) -> list[str]:
    headers = ["data·fsdp·expert·tensor", "params", "grads", "optimizer", "gathered", "acts", "acts ckpt"]
    headers += ["peak", "ckpt", "all-gather", "reduce-scatter", "all-reduce", "all-to-all", "tensor", "moved"]
    rows = []
    for f in shown:
        m, t = f.memory, f.traffic
        rows.append(
            [_short(f.layout), *map(_gb, (m.params, m.grads, m.optimizer, m.gathered, m.activations))]
            + [_gb(m.activations_checkpointed), _gb(f.peak), "yes" if f.checkpointing else "no"]
            + list(map(_gb, (t.all_gather, t.reduce_scatter, t.all_reduce, t.all_to_all, t.tensor, t.total)))
        )
    return _table(headers, rows)


def _serving_rows(shown) -> list[str]:
    headers = [
        "data·fsdp·expert·tensor",
        "weights",
        "KV / sequence",
        "free",
        "sequences / group",
        "sequences",
    ]
    rows = [
        [_short(s.layout), _gb(s.weights), _gb(s.kv_per_sequence), _gb(s.free)]
        + [f"{s.sequences_per_group:,}", f"{s.sequences:,}"]
        for s in shown
    ]
    return _table(headers, rows)


def _rank_of(items, lay) -> str:
    found = [i for i, x in enumerate(items) if x.layout == lay]
    return f"rank {found[0] + 1} of {len(items)}" if found else "does not fit"


def _training_text(plan, top: int) -> list[str]:
    p = plan.precision
    out = [
        f"training: {plan.micro_batch} x {plan.seq_len:,} tokens per micro-batch; {p.name}: params {p.param_bytes}"
        f" + grads {p.grad_bytes} + fp32 master {p.master_bytes} + AdamW moments {p.moment_bytes} = "
        f"{p.param_bytes + p.grad_bytes + p.optimizer_bytes} B per parameter; activations {p.activation_bytes} B",
        f"  parameters, gradients and optimizer state of the whole model: {_gb(plan.states_total)} "
        f"(at least {plan.min_training_gpus:,} devices of {_gb(plan.gpu_memory)})",
    ]
    fits = plan.training
    if not fits:
        return [
            *out,
            f"  no layout fits: none of the {plan.training_split} layouts that split the model fits in "
            f"{_gb(plan.gpu_memory)} per device, even with activation checkpointing",
        ]
    plain = sum(not f.checkpointing for f in fits)
    out.append(
        f"  {len(fits)} of {plan.training_split} layouts fit ({plain} without activation checkpointing); "
        f"the best {min(top, len(fits))}, ranked by bytes moved per device per micro-batch step:"
    )
    return out + ["  " + line for line in _training_rows(fits, fits[:top])]


def _serving_text(plan, top: int) -> list[str]:
    out = [
        f"serving: bf16 weights and KV cache, one sequence at the context {plan.context:,}; "
        "each data x expert group of tensor ranks holds its own sequences"
    ]
    fits = plan.serving
    if not fits:
        return [
            *out,
            f"  no layout fits: none of the {plan.serving_split} serving layouts holds the weights and "
            f"one sequence's KV cache in {_gb(plan.gpu_memory)} per device",
        ]
    out.append(
        f"  {len(fits)} of {plan.serving_split} layouts fit; the best {min(top, len(fits))}, by sequences held:"
    )
    return out + ["  " + line for line in _serving_rows(fits[:top])]


def print_plan(plan, *, top: int = 10, layout=None) -> None:
    """The plan as text: the training and serving tables, and where the declared or asked layout ranks."""
    print(
        f"{plan.name} on {plan.gpus:,} devices of {_gb(plan.gpu_memory)}: {plan.layouts:,} layouts "
        f"data x fsdp x expert x tensor = {plan.gpus:,}, {plan.training_split:,} of them split the model"
    )
    for line in [*_training_text(plan, top), "", *_serving_text(plan, top)]:
        print(line)
    for what, lay in (("training.parallel", plan.declared), ("--layout", layout)):
        if lay is None:
            continue
        print(
            f"{what} {lay.label}: training {_rank_of(plan.training, lay)}, serving {_rank_of(plan.serving, lay)}"
        )
        for lines in (
            _training_rows(plan.training, [f for f in plan.training if f.layout == lay]),
            _serving_rows([s for s in plan.serving if s.layout == lay]),
        ):
            if len(lines) > 1:
                print("\n".join("  " + line for line in lines))


def cmd_plan(args: argparse.Namespace) -> int:
    from lmspec.compiler.scale import Layout, plan_scale

    spec = load(args)
    layout = Layout(*args.layout) if args.layout is not None else None
    if layout is not None and layout.world_size != args.gpus:
        raise UsageError(
            f"--layout: expected data x fsdp x expert x tensor = --gpus {args.gpus}, got {layout.world_size}"
        )
    try:
        plan = plan_scale(
            spec,
            args.gpus,
            args.gpu_memory,
            seq_len=args.seq_len,
            micro_batch=args.micro_batch,
            precision=args.precision,
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print_plan(plan, top=args.top, layout=layout)
    return 0


def add_parsers(add) -> None:
    p = add(
        "plan",
        cmd_plan,
        "the layouts of N devices that fit a spec, for training and serving, from the accounting",
    )
    p.add_argument("--gpus", type=device_count, required=True, help="devices in all")
    p.add_argument(
        "--gpu-memory", type=gpu_memory, required=True, help="memory per device, e.g. 141GB or 80GiB"
    )
    p.add_argument(
        "--seq-len", type=positive_int, default=None, help="tokens per sequence (default: the first stage's)"
    )
    p.add_argument("--micro-batch", type=positive_int, default=1, help="sequences per device per micro-batch")
    p.add_argument(
        "--precision",
        choices=["bf16", "fp32"],
        default=None,
        help="bf16: bf16 params and grads + fp32 master and AdamW moments (16 B/param); fp32: fp32 params, "
        "grads and moments (16 B/param); default: training.precision",
    )
    p.add_argument("--top", type=positive_int, default=10, help="layouts shown per table")
    p.add_argument("--layout", type=layout_arg, default=None, metavar="D,F,E,T", help="also show this layout")
    p.add_argument("--json", action="store_true", help="print JSON: every fitting layout, ranked")
