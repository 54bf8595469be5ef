"""The trainer: a spec's declared schedule, run end to end.

One step:
 1. `schedule_at(spec, tokens)` gives the stage, LR, batch size, sequence length, RoPE theta, MTP weight and
    balancing factors of the step (a stage switch re-sets RoPE theta through `model.set_rope_theta`);
 2. the data stream yields the global batch; each rank keeps its rows and runs them in micro-batches;
 3. loss = CE + mtp_loss_weight * mean(MTP CEs) + seq_aux_coef * aux (losses.py), backward, grad clip,
    AdamW (decay on weights with >= 2 dims only);
 4. every MoE layer's correction bias moves by the sign rule on the step's global expert load
    (balancing.py);
 5. one metrics line; at intervals a held-out evaluation (loss, bits per byte) and a checkpoint.

Everything a step depends on — weights, optimizer moments, the data position, RNG states and the step
count — is in the checkpoint, and the step boundaries are a pure function of the spec, so a resumed run
writes the same metrics as an uninterrupted one (bitwise on CPU).
"""

from __future__ import annotations

import base64
import contextlib
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmspec.runtime.checkpoint import (
    latest_checkpoint,
    load_optimizer_state,
    load_trainer_state,
    save_checkpoint,
)
from lmspec.runtime.tokenizer import TOKENIZER_FILE, check_vocab, load_tokenizer
from lmspec.spec import Spec, dump_spec, load_spec, spec_hash
from lmspec.train import distributed
from lmspec.train.balancing import load_fractions, max_over_uniform, update_correction_bias
from lmspec.train.data import Corpus, TokenStream, bits_per_byte, read_documents
from lmspec.train.losses import training_loss
from lmspec.train.metrics import ConsoleReporter, MetricsWriter
from lmspec.train.schedule import StepSchedule, plan_steps, scale_factor, scale_schedule, schedule_at

DEFAULT_EVAL_TOKENS = 16384
EVALS_PER_RUN = 10
CHECKPOINTS_PER_RUN = 5


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path | None
    steps: int
    tokens: int
    loss: float
    val_loss: float | None
    val_bpb: float | None
    unigram_bpb: float | None
    max_load_ratio: float | None
    elapsed_s: float
    plot: Path | None = None
    history: list[dict[str, Any]] = field(default_factory=list, repr=False)


def _usage(msg: str) -> Exception:
    from lmspec.errors import UsageError

    return UsageError(msg)


# ---------------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------------


def resolve_spec(
    spec: Spec | str | Path,
    *,
    overrides: tuple[str, ...] | list[str] = (),
    max_tokens: float | None = None,
    scale: float | None = None,
) -> Spec:
    """The spec a run trains: loaded, overridden, with its token schedule scaled."""
    if not isinstance(spec, Spec):
        spec = load_spec(spec, list(overrides))
    elif overrides:
        raise ValueError("overrides apply to a spec file; apply them before building a Spec object")
    if spec.training is None:
        raise _usage(f"spec {spec.name!r} has no training section to follow")
    try:
        factor = scale_factor(spec, max_tokens=max_tokens, scale=scale)
    except ValueError as e:
        raise _usage(str(e)) from None
    return scale_schedule(spec, factor)


def make_optimizer(model: nn.Module, spec: Spec) -> torch.optim.Optimizer:
    """AdamW with the spec's betas/eps; weight decay only on matrices (>= 2 dims), as nanoGPT/torchtitan."""
    assert spec.training is not None
    opt = spec.training.optimizer
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": opt.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=0.0, betas=tuple(opt.betas), eps=opt.eps)


def _rng_state() -> dict[str, Any]:
    state = {
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    raw = base64.b64decode(state["torch"])
    torch.set_rng_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(
            torch.frombuffer(bytearray(base64.b64decode(state["cuda"])), dtype=torch.uint8)
        )


def _chunks(rows: slice, n_chunks: int) -> list[slice]:
    n = rows.stop - rows.start
    base, extra = divmod(n, n_chunks)
    out, start = [], rows.start
    for i in range(n_chunks):
        size = base + (1 if i < extra else 0)
        out.append(slice(start, start + size))
        start += size
    return out


def _micro_slices(d: distributed.Dist, batch_size: int, micro: int | None) -> list[slice]:
    """This rank's rows of a global batch in micro-batches; every rank runs the same number (FSDP needs it)."""
    if batch_size < d.world_size:
        raise _usage(f"batch size {batch_size} is smaller than the {d.world_size} processes sharing it")
    rows = d.rows(batch_size)
    most, fewest = -(-batch_size // d.world_size), batch_size // d.world_size
    n = min(-(-most // micro) if micro else 1, fewest)
    return _chunks(rows, max(n, 1))


def _autocast(spec: Spec, device: torch.device):
    assert spec.training is not None
    if spec.training.precision == "bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    d: distributed.Dist,
    spec: Spec,
    micro: int | None,
    corpus: Corpus,
) -> tuple[float, float]:
    """(mean next-token CE in nats, bits per byte) on held-out sequences, split over ranks."""
    totals = torch.zeros(3, dtype=torch.float64)  # nats, tokens, bytes
    for sl in _micro_slices(d, inputs.shape[0], micro or 16):
        x, y = inputs[sl].to(d.device), labels[sl]
        with _autocast(spec, d.device):
            out = model(x, labels=y.to(d.device))
        totals += torch.tensor(
            [float(out.loss) * y.numel(), y.numel(), corpus.token_bytes(y)], dtype=torch.float64
        )
    if hasattr(model, "reshard"):
        # FSDP2 keeps the root's weights gathered after a forward until the backward that never comes in
        # evaluation; reshard so the parameters are the sharded ones the optimizer holds again.
        model.reshard()
    d.all_sum(totals)
    nats, n_tokens, n_bytes = totals.tolist()
    return nats / n_tokens, bits_per_byte(nats, int(n_bytes))


def _model_writer(model: nn.Module, spec: Spec, d: distributed.Dist):
    """What writes the model files of a checkpoint: `save_pretrained`, or under FSDP the gathered weights.

    Gathering is a collective, so every rank calls this; only rank 0's writer is ever run.
    """
    if not d.enabled:
        return model.save_pretrained
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    import lmspec

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def save(path: Path) -> None:
        plain = lmspec.build(spec, device="cpu", backend="torch")
        plain.load_state_dict(full)
        plain.save_pretrained(path)

    return save


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state keyed by parameter name, with whole (unsharded) tensors on the CPU.

    Keyed by name rather than index, and whole rather than sharded, so a checkpoint resumes under any number
    of processes.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    state = {
        names[id(p)]: {k: _full(v).detach().cpu().clone() if torch.is_tensor(v) else v for k, v in st.items()}
        for p, st in optimizer.state.items()
    }
    groups = [
        {**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(p)] for p in g["params"]]}
        for g in optimizer.param_groups
    ]
    return {"state": state, "param_groups": groups}


def _load_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Inverse of `_optimizer_state`: each rank keeps its shard of every whole tensor."""
    params = dict(model.named_parameters())
    for group, saved_group in zip(optimizer.param_groups, saved["param_groups"], strict=True):
        if [params[n] for n in saved_group["params"]] != group["params"]:
            raise ValueError("optimizer parameter groups do not match the checkpoint's")
        group.update({k: v for k, v in saved_group.items() if k != "params"})
    for name, st in saved["state"].items():
        p = params[name]
        restored = {}
        for k, v in st.items():
            if torch.is_tensor(v) and v.dim() > 0 and hasattr(p, "device_mesh"):
                from torch.distributed.tensor import distribute_tensor

                v = distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
            elif torch.is_tensor(v) and v.dim() > 0:
                v = v.to(p.device)
            restored[k] = v
        optimizer.state[p] = restored


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def train(
    spec: Spec | str | Path,
    *,
    data: list[str] | None = None,
    out: str | Path | None = None,
    max_tokens: float | None = None,
    scale: float | None = None,
    resume: bool = False,
    backend: str | None = None,
    tokenizer: str | Path | None = None,
    device: str | None = None,
    overrides: tuple[str, ...] | list[str] = (),
    progress: bool | None = None,
    eval_every: int | None = None,
    eval_tokens: int = DEFAULT_EVAL_TOKENS,
    checkpoint_every: int | None = None,
    keep_checkpoints: int | None = 3,
    micro_batch_size: int | None = None,
    plot: bool = True,
    quiet: bool = False,
) -> TrainResult:
    """Train `spec` on its declared schedule and return where the run is and how it ended.

    `max_tokens` / `scale` shrink every token quantity of the schedule (scale_schedule). `eval_every` and
    `checkpoint_every` are in steps (default: about 10 evaluations and 5 checkpoints per run, plus the end).
    `micro_batch_size` caps the sequences per forward (gradient accumulation; default: the whole batch).
    """
    import lmspec

    t_start = time.perf_counter()
    d = distributed.init(device)
    spec = resolve_spec(spec, overrides=overrides, max_tokens=max_tokens, scale=scale)
    assert spec.training is not None
    run_dir = Path(out) if out is not None else Path("runs") / spec.name
    reporter = ConsoleReporter(enabled=d.is_main and not quiet, bar=progress)

    # --- run directory: fresh, or resumed from LATEST -------------------------------------------------
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None and not resume:
        raise _usage(
            f"{run_dir} already holds checkpoints; pass --resume to continue it or choose another --out"
        )
    run_spec_file = run_dir / "spec.yaml"
    if ckpt is not None and run_spec_file.is_file():
        from lmspec.spec import loads_spec

        before = loads_spec(run_spec_file.read_text(encoding="utf-8"), str(run_spec_file))
        if spec_hash(before) != spec_hash(spec):
            raise _usage(
                f"{run_dir} was trained with a different spec or schedule (compare {run_spec_file}); "
                "resume with the same spec, --set, --max-tokens and --scale"
            )
    state: dict[str, Any] = load_trainer_state(ckpt) if ckpt is not None else {}

    # --- data (checked before anything is written) --------------------------------------------------
    tok = load_tokenizer(tokenizer)
    check_vocab(tok, spec.model.vocab_size)
    corpus = Corpus(read_documents(data), tok, seed=spec.training.seed)
    if state and state.get("corpus") != corpus.fingerprint:
        raise _usage(f"{run_dir}: the data or tokenizer differ from the ones the run started with")
    stream = TokenStream(corpus.train_tokens, position=int(state.get("data_position", 0)))
    if d.is_main and ckpt is None:  # a fresh start (also after a crash before the first checkpoint)
        run_dir.mkdir(parents=True, exist_ok=True)
        run_spec_file.write_text(dump_spec(spec), encoding="utf-8")
    d.barrier()
    reporter.log(f"data: {corpus.describe()}")

    # --- model and optimizer ------------------------------------------------------------------------
    dev = d.device
    backend = backend or ("triton" if dev.type == "cuda" else "torch")
    torch.manual_seed(spec.training.seed)
    if ckpt is not None:
        model = lmspec.from_pretrained(ckpt, device=dev, backend=backend)
    else:
        model = lmspec.build(spec, device=dev, backend=backend)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    distributed.shard(model, d)
    optimizer = make_optimizer(model, spec)
    if ckpt is not None:
        _load_optimizer(model, optimizer, load_optimizer_state(ckpt))
        _set_rng_state(state["rng"])
        reporter.log(f"resumed from {ckpt} at step {state['step']} ({state['tokens']:,} tokens)")
    moe_layers = model.moe_layers()

    total_tokens = spec.training.total_tokens
    total_steps = plan_steps(spec)
    eval_every = eval_every or max(1, total_steps // EVALS_PER_RUN)
    checkpoint_every = checkpoint_every or max(1, total_steps // CHECKPOINTS_PER_RUN)
    step = int(state.get("step", 0))
    tokens = int(state.get("tokens", 0))
    elapsed = float(state.get("elapsed_s", 0.0))
    metrics = (
        MetricsWriter(run_dir, truncate_after_step=step if ckpt is not None else None) if d.is_main else None
    )
    extra_files = {TOKENIZER_FILE: Path(tokenizer)} if tokenizer is not None else None
    reporter.log(
        f"{spec.name}: {n_params / 1e6:.2f}M parameters, {len(spec.training.stages)} stages, "
        f"{total_tokens:,.0f} tokens in {total_steps} steps on {dev} x{d.world_size} ({backend} backend)"
    )

    val_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    theta: dict[str, float] | None = None
    last: dict[str, Any] = {}
    last_val: tuple[float, float] | None = state.get("last_val")
    saved_at = step if ckpt is not None else -1
    history: list[dict[str, Any]] = []
    reporter.start(total_tokens, done=tokens)

    def checkpoint() -> None:
        # Both gathers are collectives: every rank takes part, rank 0 writes.
        opt_state = _optimizer_state(model, optimizer)
        writer = _model_writer(model, spec, d)
        if d.is_main:
            save_checkpoint(
                run_dir,
                step,
                save_model=writer,
                optimizer_state=opt_state,
                trainer_state={
                    "step": step,
                    "tokens": tokens,
                    "data_position": stream.position,
                    "rng": _rng_state(),
                    "corpus": corpus.fingerprint,
                    "spec_hash": spec_hash(spec),
                    "world_size": d.world_size,
                    "elapsed_s": elapsed,
                    "last_val": last_val,
                },
                extra_files=extra_files,
                keep=keep_checkpoints,
            )
        d.barrier()

    try:
        while tokens < total_tokens:
            t0 = time.perf_counter()
            sched = schedule_at(spec, tokens)
            if sched.rope_theta != theta:
                model.set_rope_theta(sched.rope_theta)
                theta = dict(sched.rope_theta)
                reporter.stage(sched)
            for g in optimizer.param_groups:
                g["lr"] = sched.lr
            inputs, labels = stream.take(sched.batch_size, sched.seq_len)
            parts = _train_step(model, inputs, labels, sched, d=d, spec=spec, micro=micro_batch_size)
            grad_clip = spec.training.grad_clip
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip else math.inf)
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            update_correction_bias(moe_layers, parts["expert_load"], sched.bias_update)

            step += 1
            tokens += sched.batch_size * sched.seq_len
            dt = time.perf_counter() - t0
            elapsed += dt
            row = _metrics_row(step, tokens, sched, parts, float(grad_norm), dt, elapsed)
            done = tokens >= total_tokens
            if step % eval_every == 0 or done:
                if sched.seq_len not in val_cache:
                    val_cache[sched.seq_len] = corpus.val_set(sched.seq_len, eval_tokens)
                vx, vy = val_cache[sched.seq_len]
                was_training = model.training
                model.eval()
                last_val = evaluate(model, vx, vy, d=d, spec=spec, micro=micro_batch_size, corpus=corpus)
                model.train(was_training)
                row["val_loss"], row["val_bpb"] = last_val
            if metrics is not None:
                metrics.write(row)
            history.append(row)
            last = row
            reporter.update(row)
            if step % checkpoint_every == 0 or done:
                checkpoint()
                saved_at = step
    finally:
        reporter.stop()
        if metrics is not None:
            metrics.close()

    final_ckpt = latest_checkpoint(run_dir) if saved_at >= 0 else None
    unigram = None
    if last_val is not None:
        seq = schedule_at(spec, max(tokens - 1, 0)).seq_len
        vx, vy = val_cache.get(seq) or corpus.val_set(seq, eval_tokens)
        unigram = corpus.unigram_bpb(vy)
    plot_path = None
    if plot and d.is_main and (run_dir / "metrics.jsonl").is_file():
        from lmspec.train.plot import plot_run

        plot_path = plot_run(run_dir)
    result = TrainResult(
        run_dir=run_dir,
        checkpoint=final_ckpt,
        steps=step,
        tokens=tokens,
        loss=float(last.get("loss", math.nan)),
        val_loss=last_val[0] if last_val else None,
        val_bpb=last_val[1] if last_val else None,
        unigram_bpb=unigram,
        max_load_ratio=last.get("max_load_ratio"),
        elapsed_s=time.perf_counter() - t_start,
        plot=plot_path,
        history=history,
    )
    distributed.shutdown(d)
    return result


def _train_step(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    sched: StepSchedule,
    *,
    d: distributed.Dist,
    spec: Spec,
    micro: int | None,
) -> dict[str, Any]:
    """Forward and backward over this rank's micro-batches; returns the global batch's loss parts."""
    batch = inputs.shape[0]
    n_mtp = spec.model.mtp.num_blocks if spec.model.mtp else 0
    # [total, ce, aux, mtp_1..mtp_K], summed over micro-batches weighted by their share of the global batch.
    sums = torch.zeros(3 + n_mtp, dtype=torch.float64)
    load: torch.Tensor | None = None
    for sl in _micro_slices(d, batch, micro):
        share = (sl.stop - sl.start) / batch
        x, y = inputs[sl].to(d.device), labels[sl].to(d.device)
        with _autocast(spec, d.device):
            out = model(x, labels=y)
            parts = training_loss(out, mtp_loss_weight=sched.mtp_loss_weight, seq_aux_coef=sched.seq_aux_coef)
        # FSDP averages gradients over ranks; scaling by world size makes the result the global-batch mean.
        (parts.total * (share * d.world_size)).backward()
        vals = [parts.total, parts.ce, parts.aux, *parts.mtp]
        sums += share * torch.tensor([float(v.detach()) for v in vals], dtype=torch.float64)
        if out.expert_load is not None:
            el = out.expert_load.detach().to("cpu", torch.float64)
            load = el if load is None else load + el
    d.all_sum(sums)
    if load is None:
        load = torch.zeros(0, 0, dtype=torch.float64)
    elif d.enabled:
        load = load.to(d.device)
        d.all_sum(load)
        load = load.cpu()
    return {
        "loss": sums[0].item(),
        "ce": sums[1].item(),
        "aux": sums[2].item(),
        "mtp": sums[3:].tolist(),
        "expert_load": load,
    }


def _metrics_row(
    step: int,
    tokens: int,
    sched: StepSchedule,
    parts: dict[str, Any],
    grad_norm: float,
    dt: float,
    elapsed: float,
) -> dict[str, Any]:
    load = parts["expert_load"]
    row: dict[str, Any] = {
        "step": step,
        "tokens": tokens,
        "stage": sched.stage_name,
        "stage_index": sched.stage,
        "loss": parts["loss"],
        "ce": parts["ce"],
        "mtp": parts["mtp"],
        "aux": parts["aux"],
        "lr": sched.lr,
        "batch_size": sched.batch_size,
        "seq_len": sched.seq_len,
        "rope_theta": sched.rope_theta,
        "mtp_loss_weight": sched.mtp_loss_weight,
        "bias_update": sched.bias_update,
        "seq_aux_coef": sched.seq_aux_coef,
        "grad_norm": grad_norm,
        "tokens_per_s": sched.batch_size * sched.seq_len / max(dt, 1e-9),
        "elapsed_s": elapsed,
    }
    if load.numel():
        row["expert_load"] = [[round(v, 6) for v in layer] for layer in load_fractions(load).tolist()]
        row["max_load_ratio"] = max_over_uniform(load)
    return row


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
