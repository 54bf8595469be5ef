"""The trainer: a spec's declared schedule, run end to end.

`Trainer(TrainConfig(spec=...)).run()`: `setup()` resolves the spec, decides what the run directory allows
(rundir.py), loads the data and builds or restores the model; then `step()` until the schedule's tokens are
seen, with `evaluate()` and `checkpoint()` at their intervals. `train(spec, **fields)` is the one-call form.

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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmspec.errors import CheckpointError, UsageError
from lmspec.files import write_atomic
from lmspec.runtime import sharded
from lmspec.runtime.checkpoint import (
    CHECKPOINTS,
    OPTIMIZER_FILE,
    STATE_FILE,
    latest_checkpoint,
    load_optimizer_state,
    save_checkpoint,
    step_dir_name,
)
from lmspec.runtime.tokenizer import TOKENIZER_FILE, check_vocab, load_tokenizer
from lmspec.spec import Spec, dump_spec, limits, load_spec, spec_hash
from lmspec.train import distributed, sharded_checkpoint
from lmspec.train.balancing import load_fractions, max_over_uniform, update_correction_bias
from lmspec.train.config import DEFAULT_EVAL_TOKENS, TrainConfig
from lmspec.train.data import Batch, Corpus, bits_per_byte, make_stream, read_documents
from lmspec.train.footprint import state_bytes_by_rank
from lmspec.train.losses import LossParts, combine, loss_counts, shares, training_loss
from lmspec.train.metrics import METRICS_FILE, ConsoleReporter, MetricsWriter
from lmspec.train.rundir import apply_plan, lock_run_dir, plan_run
from lmspec.train.schedule import StepSchedule, plan_steps, scale_factor, scale_schedule, schedule_at
from lmspec.train.stages import StageEntry, check_stages, count_zero_grads, data_streams

__all__ = ["DEFAULT_EVAL_TOKENS", "TrainConfig", "TrainResult", "Trainer", "train"]

EVALS_PER_RUN = 10
CHECKPOINTS_PER_RUN = 5
# A schedule longer than this many steps is a typo (--max-tokens 1e30), not a run: planning it would not end.
# The schema holds a spec's own schedule to it; this holds the schedule scaled by --max-tokens or --scale.
MAX_STEPS = limits.MAX_STEPS


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
        raise UsageError(f"spec {spec.name!r} has no training section to follow")
    try:
        factor = scale_factor(spec, max_tokens=max_tokens, scale=scale)
    except ValueError as e:
        raise UsageError(str(e)) from None
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


def _decode_rng_state(state: dict[str, Any]) -> tuple[torch.Tensor, tuple, torch.Tensor | None]:
    """A checkpoint's RNG states, each tried on a throwaway generator; ValueError saying which is wrong."""
    try:
        cpu = torch.frombuffer(bytearray(base64.b64decode(state["torch"], validate=True)), dtype=torch.uint8)
        torch.Generator().set_state(cpu)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"torch: not a CPU generator state ({str(e)[:60] or type(e).__name__})") from None
    try:
        version, internal, gauss = state["python"]
        python = (version, tuple(internal), gauss)
        random.Random().setstate(python)
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise ValueError(f"python: not a random module state ({str(e)[:60] or type(e).__name__})") from None
    cuda = None
    if "cuda" in state:
        try:
            cuda = torch.frombuffer(
                bytearray(base64.b64decode(state["cuda"], validate=True)), dtype=torch.uint8
            )
        except (TypeError, ValueError) as e:
            raise ValueError(f"cuda: not a generator state ({str(e)[:60] or type(e).__name__})") from None
    return cpu, python, cuda


def _set_rng_state(state: dict[str, Any]) -> None:
    cpu, python, cuda = _decode_rng_state(state)
    torch.set_rng_state(cpu)
    random.setstate(python)
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)


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
        raise UsageError(f"batch size {batch_size} is smaller than the {d.world_size} processes sharing it")
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
def held_out_loss(
    model: nn.Module,
    batch: Batch,
    *,
    d: distributed.Dist,
    spec: Spec,
    micro: int | None,
    corpus: Corpus,
) -> tuple[float, float]:
    """(mean next-token CE in nats, bits per byte) on held-out sequences, split over ranks."""
    totals = torch.zeros(3, dtype=torch.float64)  # nats, tokens, bytes
    for sl in _micro_slices(d, batch.inputs.shape[0], micro or 16):
        x, y = batch.inputs[sl].to(d.device), batch.labels[sl]
        with _autocast(spec, d.device):
            out = model(x, labels=y.to(d.device), **batch.model_inputs(sl, d.device))
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


def _load_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, saved: Any) -> None:
    """Inverse of `_optimizer_state`: each rank keeps its shard of every whole tensor.

    ValueError (or KeyError for an unknown name) when `saved` is not such a state of this model.
    """
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    if not (
        isinstance(saved, dict)
        and isinstance(saved.get("state"), dict)
        and all(isinstance(st, dict) for st in saved["state"].values())
        and isinstance(groups, list)
        and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups)
    ):
        raise ValueError("not an optimizer state (expected state and param_groups by parameter name)")
    params = dict(model.named_parameters())
    for group, saved_group in zip(optimizer.param_groups, saved["param_groups"], strict=True):
        if [params[n] for n in saved_group["params"]] != group["params"]:
            raise ValueError("optimizer parameter groups do not match the checkpoint's")
        group.update({k: v for k, v in saved_group.items() if k != "params"})
    for name, st in saved["state"].items():
        p = params[name]
        restored = {}
        for k, v in st.items():
            if torch.is_tensor(v) and v.dim() > 0 and v.shape != p.shape:
                raise ValueError(f"{name}.{k} has shape {tuple(v.shape)}, the parameter {tuple(p.shape)}")
            if torch.is_tensor(v) and v.dim() > 0 and hasattr(p, "device_mesh"):
                from torch.distributed.tensor import distribute_tensor

                v = distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
            elif torch.is_tensor(v) and v.dim() > 0:
                v = v.to(p.device)
            restored[k] = v
        optimizer.state[p] = restored


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------


def check_schedule(spec: Spec) -> None:
    """Refuse a schedule too long to plan (a token budget that is a typo), before `plan_steps` loops on it."""
    assert spec.training is not None
    per_step = max(s.batch_size.size * s.seq_len for s in spec.training.stages)
    if spec.training.total_tokens / per_step > MAX_STEPS:
        raise UsageError(
            f"the schedule's {spec.training.total_tokens:.3g} tokens take more than {MAX_STEPS:,} steps; "
            "lower --max-tokens or --scale"
        )


class Trainer:
    """One training run of `config`: `run()` does it all; `setup`, `step`, `evaluate` and `checkpoint` are
    its parts, for a caller that wants to drive the loop itself.

    Attributes after `setup()`: `spec` (resolved and scaled), `run_dir`, `model`, `optimizer`, `corpus`,
    `stream`, and the counters `steps`, `tokens`, `elapsed` that a checkpoint saves.
    """

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.ready = False

    # --- setup ---------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Resolve the spec, decide what the run directory allows, load data, build or restore the model."""
        c = self.config
        self.t_start = time.perf_counter()
        self.d = distributed.init(c.device)
        self.spec = resolve_spec(c.spec, overrides=c.overrides, max_tokens=c.max_tokens, scale=c.scale)
        check_schedule(self.spec)
        # Paths exist (and become absolute), a mopd stage has a trainer: before anything is written.
        self.spec, self.run_stage = check_stages(c.spec, c.overrides, self.spec, c.decode)
        distributed.check_layout(self.spec.training.parallel, self.d)
        self.run_dir = c.out if c.out is not None else Path("runs") / self.spec.name
        self.reporter = ConsoleReporter(enabled=self.d.is_main and not c.quiet, bar=c.progress)
        # Locked before deciding what the directory allows, so no other process changes it in between.
        self.lock = lock_run_dir(self.run_dir) if self.d.is_main else None
        try:
            self.plan = plan_run(
                self.run_dir, resume=c.resume, resume_from=c.resume_from, overwrite=c.overwrite
            )
            state = self.plan.state
            if state and not _same_training(state, self.spec):
                raise UsageError(
                    f"{self.plan.checkpoint} was trained with a different spec or schedule (compare "
                    f"{self.run_dir / 'spec.yaml'}); resume with the same spec, --set, --max-tokens and --scale"
                )
            if state:
                try:  # before anything is written: a state that cannot be restored stops the run here
                    _decode_rng_state(state["rng"])
                except ValueError as e:
                    raise CheckpointError(f"{self.plan.checkpoint}/{STATE_FILE}: rng: {e}") from None
            self._load_data(state)
            if self.d.is_main:
                self._prepare_run_dir()
            self.d.barrier()
            self.reporter.log(f"data: {self.corpus.describe()}")
            self._build_model(state)
            self._start_counters(state)
        except BaseException:
            self.close(failed=True)
            raise
        self.ready = True

    def close(self, *, failed: bool = False) -> None:
        """Release the run directory's lock: `run()` does at its end; a caller driving the loop, when done.

        `failed` (a setup that stopped before training) also removes the folder the lock created, if
        nothing else was written into it.
        """
        lock = getattr(self, "lock", None)
        if lock is not None:
            lock.release(failed=failed)

    def _load_data(self, state: dict[str, Any]) -> None:
        """Tokenizer and corpus, checked before anything is written (and against a resumed run's)."""
        assert self.spec.training is not None
        tok = load_tokenizer(self.config.tokenizer)
        check_vocab(tok, self.spec.model.vocab_size)
        self.corpus = Corpus(read_documents(self.config.data), tok, seed=self.spec.training.seed)
        self.stream, self.data_fingerprint = data_streams(
            self.corpus, self.spec, tok, state.get("data_position", 0), make_stream
        )
        if state and state.get("corpus") != self.data_fingerprint:
            raise UsageError(
                f"{self.run_dir}: the data or tokenizer differ from the ones the run started with"
            )

    def _prepare_run_dir(self) -> None:
        """Apply the run-directory plan and write RUN/spec.yaml: the first writes of the run."""
        spec_file = self.run_dir / "spec.yaml"
        try:
            apply_plan(self.plan)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if self.plan.checkpoint is None or not spec_file.is_file():
                write_atomic(spec_file, dump_spec(self.spec))  # replaces a link, never writes through it
        except OSError as e:
            raise UsageError(f"--out {self.run_dir}: cannot write the run directory ({_reason(e)})") from None

    def _build_model(self, state: dict[str, Any]) -> None:
        import lmspec

        assert self.spec.training is not None
        dev = self.d.device
        self.backend = self.config.backend or ("triton" if dev.type == "cuda" else "torch")
        torch.manual_seed(self.spec.training.seed)
        ckpt = self.plan.checkpoint
        # A sharded checkpoint is read after sharding, each rank its own part (sharded_checkpoint.load).
        dcp = ckpt is not None and sharded.is_sharded(ckpt)
        if ckpt is not None and not dcp:
            self.model = lmspec.from_pretrained(ckpt, device=dev, backend=self.backend)
        else:
            self.model = lmspec.build(self.spec, device=dev, backend=self.backend)
        self.model.train()
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self._speed_options()
        distributed.shard(self.model, self.d, self.spec.training.parallel)
        for line in distributed.describe_experts(self.model, self.d):
            self.reporter.log(line)
        try:
            self.optimizer = make_optimizer(self.model, self.spec)
        except ValueError as e:  # AdamW's own checks (betas, eps) on values the schema let through
            raise UsageError(f"training.optimizer: {e}") from None
        if dcp:
            sharded_checkpoint.load(ckpt, self.model, self.optimizer)  # into this run's layout
        elif ckpt is not None:
            saved = load_optimizer_state(ckpt)
            try:
                _load_optimizer(self.model, self.optimizer, saved)
            except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
                # Names, groups or shapes that are not this model's: an edited or foreign optimizer.pt.
                why = str(e)[:100] if isinstance(e, ValueError) else f"{type(e).__name__}: {str(e)[:80]}"
                raise CheckpointError(f"{ckpt / OPTIMIZER_FILE}: does not fit the model ({why})") from None
        if ckpt is not None:
            _set_rng_state(state["rng"])
            self.reporter.log(f"resumed from {ckpt} at step {state['step']} ({state['tokens']:,} tokens)")
        self.moe_layers = self.model.moe_layers()

    def _speed_options(self) -> None:
        """Activation checkpointing and torch.compile: the config's choice, else the spec's."""
        from lmspec.runtime.model_base import CompiledStep

        assert self.spec.training is not None
        c, t = self.config, self.spec.training
        checkpointing = c.activation_checkpointing or t.activation_checkpointing
        self.model.set_activation_checkpointing(checkpointing)
        compiled = t.compile if c.compile is None else c.compile
        self.forward_loss = CompiledStep(forward_loss) if compiled else forward_loss
        if compiled or checkpointing != "none":
            self.reporter.log(
                f"torch.compile: {'on' if compiled else 'off'}; activation checkpointing: {checkpointing}"
            )

    def _start_counters(self, state: dict[str, Any]) -> None:
        assert self.spec.training is not None
        c, resumed = self.config, self.plan.checkpoint is not None
        self.total_tokens = self.spec.training.total_tokens
        total_steps = plan_steps(self.spec)
        self.eval_every = c.eval_every or max(1, total_steps // EVALS_PER_RUN)
        self.checkpoint_every = c.checkpoint_every or max(1, total_steps // CHECKPOINTS_PER_RUN)
        self.steps = int(state.get("step", 0))
        self.tokens = int(state.get("tokens", 0))
        self.elapsed = float(state.get("elapsed_s", 0.0))
        self.metrics = (
            MetricsWriter(self.run_dir, truncate_after_step=self.steps if resumed else None)
            if self.d.is_main
            else None
        )
        self.extra_files = {TOKENIZER_FILE: c.tokenizer} if c.tokenizer is not None else None
        self.reporter.log(
            f"{self.spec.name}: {self.n_params / 1e6:.2f}M parameters, {len(self.spec.training.stages)} stages, "
            f"{self.total_tokens:,.0f} tokens in {total_steps} steps on {self.d.device} x{self.d.world_size} "
            f"({self.backend} backend)"
        )
        self.val_cache: dict[int, Batch] = {}
        self.theta: dict[str, float] | None = None
        self.last: dict[str, Any] = {}
        self.last_val: tuple[float, float] | None = state.get("last_val")
        self.saved_at = self.steps if resumed else -1
        self.history: list[dict[str, Any]] = []
        self.entry = StageEntry(self, int(state.get("stage", -1)) if resumed else -1)

    # --- the loop's parts --------------------------------------------------------------------------

    def step(self) -> dict[str, Any]:
        """One optimizer step on the next batch of the schedule; returns its metrics row."""
        spec, model, optimizer = self.spec, self.model, self.optimizer
        assert spec.training is not None
        t0 = time.perf_counter()
        sched = schedule_at(spec, self.tokens)
        self.entry.enter(sched.stage)  # init_from, MTP replication: once, at a stage's first step
        optimizer = self.optimizer  # entering a stage may start a fresh one
        model.set_trained_mtp_blocks(sched.mtp_blocks if model.num_mtp_blocks else None)
        if sched.rope_theta != self.theta:
            # Only the kinds the layers use have a RoPE table: a declared kind no layer uses has none.
            model.set_rope_theta({k: t for k, t in sched.rope_theta.items() if k in model.rope_thetas()})
            self.theta = dict(sched.rope_theta)
            self.reporter.stage(sched)
        for g in optimizer.param_groups:
            g["lr"] = sched.lr
        batch = self.stream.take_batch(sched.batch_size, sched.seq_len, sched.stage_name)
        compile_before = getattr(self.forward_loss, "compile_s", None)
        if self.d.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.d.device)
        parts = _train_step(
            model,
            batch,
            sched,
            d=self.d,
            spec=spec,
            micro=self.config.micro_batch_size,
            forward=self.forward_loss,
        )
        num_zeros = count_zero_grads(model, self.d)  # before clipping, which keeps zeros zero anyway
        grad_clip = spec.training.grad_clip
        grad_norm = distributed.clip_grad_norm(model, grad_clip if grad_clip else math.inf, self.d)
        optimizer.step()
        # The first step of a sharded run logs each rank's state bytes, once the optimizer holds its state
        # and before the gradients are freed: what `lmspec plan` estimates per device.
        state_bytes = (
            state_bytes_by_rank(model, optimizer, self.d) if self.d.enabled and not self.steps else None
        )
        optimizer.zero_grad(set_to_none=True)
        update_correction_bias(self.moe_layers, parts["expert_load"], sched.bias_update)
        self.steps += 1
        self.tokens += sched.batch_size * sched.seq_len
        dt = time.perf_counter() - t0
        self.elapsed += dt
        row = _metrics_row(self.steps, self.tokens, sched, parts, float(grad_norm), dt, self.elapsed)
        row["num_zeros"] = num_zeros
        if state_bytes is not None:
            row["state_bytes"] = state_bytes
        if sched.kind != "pretrain":
            row["stage_kind"] = sched.kind
            row["target_tokens"] = int((batch.labels != -100).sum())
        if batch.source_tokens:  # a stage mixture: the tokens each source gave this step
            row["source_tokens"] = batch.source_tokens
        if self.d.device.type == "cuda":  # the CPU allocator keeps no peak: benchmarks/ measures it there
            row["peak_memory_mib"] = torch.cuda.max_memory_allocated(self.d.device) / 2**20
        if compile_before is not None:
            row["compile_s"] = self.forward_loss.compile_s
            if row["compile_s"] > compile_before:
                self.reporter.log(
                    f"torch.compile: step {self.steps} ({sched.stage_name}, seq_len {sched.seq_len}) compiled in "
                    f"{row['compile_s'] - compile_before:.1f} s"
                )
        return row

    def evaluate(self, seq_len: int) -> tuple[float, float]:
        """Held-out (loss in nats/token, bits per byte) at `seq_len`; the model is left in the mode it was in."""
        if seq_len not in self.val_cache:
            self.val_cache[seq_len] = self._val_batch(seq_len)
        was_training = self.model.training
        self.model.eval()
        self.last_val = held_out_loss(
            self.model,
            self.val_cache[seq_len],
            d=self.d,
            spec=self.spec,
            micro=self.config.micro_batch_size,
            corpus=self.corpus,
        )
        self.model.train(was_training)
        return self.last_val

    def _val_batch(self, seq_len: int) -> Batch:
        assert self.spec.training is not None
        masking = self.spec.training.document_masking
        return self.corpus.val_batch(seq_len, self.config.eval_tokens, masking=masking)

    def checkpoint(self) -> Path | None:
        """Save the run's whole state at the current step; returns the checkpoint on rank 0. One process writes
        `save_pretrained` files; several write their own shards (`sharded_checkpoint`, a collective).

        A failed write (a full disk) leaves LATEST naming the previous checkpoint and raises a one-line
        CheckpointError; `--resume` then continues from that checkpoint.
        """
        path = None
        try:
            if self.d.enabled:  # every rank writes its own shards; nothing is gathered
                path = sharded_checkpoint.save(
                    self.run_dir,
                    self.steps,
                    model=self.model,
                    optimizer=self.optimizer,
                    d=self.d,
                    trainer_state=self._trainer_state(),
                    layout=self._layout(),
                    extra_files=self.extra_files,
                    keep=self.config.keep_checkpoints,
                )
            else:
                path = save_checkpoint(
                    self.run_dir,
                    self.steps,
                    save_model=self.model.save_pretrained,
                    optimizer_state=_optimizer_state(self.model, self.optimizer),
                    trainer_state=self._trainer_state(),
                    extra_files=self.extra_files,
                    keep=self.config.keep_checkpoints,
                )
        except OSError as e:
            target = self.run_dir / CHECKPOINTS / step_dir_name(self.steps)
            before = latest_checkpoint(self.run_dir)
            kept = f"LATEST still names {before.name}" if before else "no checkpoint was written before"
            raise CheckpointError(
                f"{target}: {_reason(e)} while writing the checkpoint; {kept}; "
                "fix that, then pass --resume to continue"
            ) from None
        self.d.barrier()
        self.saved_at = self.steps
        return path

    def _layout(self) -> dict[str, int]:
        p = self.spec.training.parallel
        sizes = {"data": p.data, "fsdp": p.fsdp, "expert": p.expert, "tensor": p.tensor} if p else {}
        return {"world_size": self.d.world_size, **sizes}

    def _trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.steps,
            "tokens": self.tokens,
            "data_position": self.stream.position,
            "rng": _rng_state(),
            "corpus": self.data_fingerprint,
            "spec_hash": spec_hash(self.spec),
            "schedule_hash": _schedule_hash(self.spec),
            "stage": self.entry.entered,
            "world_size": self.d.world_size,
            "elapsed_s": self.elapsed,
            "last_val": self.last_val,
        }

    # --- the loop ----------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        """Train to the end of the schedule (from where a resumed run stopped) and report how it ended."""
        if not self.ready:
            self.setup()
        try:
            self._train_to_end()
            return self._result()
        finally:
            self.close()

    def _train_to_end(self) -> None:
        self.reporter.start(self.total_tokens, done=self.tokens)
        try:
            while self.tokens < self.total_tokens:
                sched = schedule_at(self.spec, self.tokens)
                if sched.kind == "mopd":
                    # lmspec.train.mopd runs a mopd stage to its end, steps, metrics and checkpoints included.
                    self.entry.enter(sched.stage)
                    self.run_stage(self, sched.stage)
                    continue
                row = self.step()
                done = self.tokens >= self.total_tokens
                if self.steps % self.eval_every == 0 or done:
                    row["val_loss"], row["val_bpb"] = self.evaluate(row["seq_len"])
                if self.metrics is not None:
                    self.metrics.write(row)
                self.history.append(row)
                self.last = row
                self.reporter.update(row)
                if self.steps % self.checkpoint_every == 0 or done:
                    self.checkpoint()
        finally:
            self.reporter.stop()
            if self.metrics is not None:
                self.metrics.close()

    def _result(self) -> TrainResult:
        final_ckpt = latest_checkpoint(self.run_dir) if self.saved_at >= 0 else None
        unigram = None
        if self.last_val is not None:
            seq = schedule_at(self.spec, max(self.tokens - 1, 0)).seq_len
            val = self.val_cache.get(seq) or self._val_batch(seq)
            unigram = self.corpus.unigram_bpb(val.labels)
        plot_path = None
        if self.config.plot and self.d.is_main and (self.run_dir / METRICS_FILE).is_file():
            from lmspec.train.plot import plot_run

            plot_path = plot_run(self.run_dir)
        result = TrainResult(
            run_dir=self.run_dir,
            checkpoint=final_ckpt,
            steps=self.steps,
            tokens=self.tokens,
            loss=float(self.last.get("loss", math.nan)),
            val_loss=self.last_val[0] if self.last_val else None,
            val_bpb=self.last_val[1] if self.last_val else None,
            unigram_bpb=unigram,
            max_load_ratio=self.last.get("max_load_ratio"),
            elapsed_s=time.perf_counter() - self.t_start,
            plot=plot_path,
            history=self.history,
        )
        distributed.shutdown(self.d)
        return result


def _schedule_hash(spec: Spec) -> str:
    """The spec's hash without `training.parallel`: what a run may keep when resumed on another layout."""
    assert spec.training is not None
    return spec_hash(
        spec.model_copy(update={"training": spec.training.model_copy(update={"parallel": None})})
    )


def _same_training(state: dict[str, Any], spec: Spec) -> bool:
    """Whether a checkpoint's run trained `spec`: the same spec, or the same one on another layout."""
    return state["spec_hash"] == spec_hash(spec) or state.get("schedule_hash") == _schedule_hash(spec)


def train(spec: Spec | str | Path, **options: Any) -> TrainResult:
    """`Trainer(TrainConfig(spec=spec, **options)).run()`, for scripts and tests that want one call."""
    return Trainer(TrainConfig(spec=spec, **options)).run()


def _reason(e: OSError) -> str:
    """An OSError as a short reason ("No space left on device"), without the path it repeats."""
    return e.strerror or str(e) or type(e).__name__


def forward_loss(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    inputs: dict[str, torch.Tensor],
    mtp_loss_weight: float,
    seq_aux_coef: float,
    mtp_depth_weights: tuple[float, ...] | None = None,
) -> tuple[LossParts, torch.Tensor | None]:
    """One micro-batch's forward and loss: what `training.compile` hands torch.compile as one graph."""
    out = model(x, labels=y, **inputs)
    loss = training_loss(
        out, mtp_loss_weight=mtp_loss_weight, seq_aux_coef=seq_aux_coef, mtp_depth_weights=mtp_depth_weights
    )
    return loss, out.expert_load


def _train_step(
    model: nn.Module,
    data: Batch,
    sched: StepSchedule,
    *,
    d: distributed.Dist,
    spec: Spec,
    micro: int | None,
    forward: Callable[..., tuple[LossParts, torch.Tensor | None]] = forward_loss,
) -> dict[str, Any]:
    """Forward and backward over this rank's micro-batches; returns the global batch's loss parts."""
    inputs, labels = data.inputs, data.labels
    n_mtp = sched.mtp_blocks if spec.model.mtp else 0
    weights = {
        "mtp_loss_weight": sched.mtp_loss_weight,
        "seq_aux_coef": sched.seq_aux_coef,
        "mtp_depth_weights": sched.mtp_depth_weights,
    }
    # [ce, aux, mtp_1..mtp_K]: each micro-batch's means weighted by its share of the global batch's counts
    # (losses.shares), so their sum is the global mean however the rows are split over ranks and
    # micro-batches, also where rows train different numbers of tokens (sft).
    sums = torch.zeros(2 + n_mtp, dtype=torch.float64)
    whole = loss_counts(labels, n_mtp)
    load: torch.Tensor | None = None
    for sl in _micro_slices(d, inputs.shape[0], micro):
        s_ce, s_aux, s_mtp = shares(loss_counts(labels[sl], n_mtp), whole)
        x, y = inputs[sl].to(d.device), labels[sl].to(d.device)
        with _autocast(spec, d.device):
            parts, expert_load = forward(
                model,
                x,
                y,
                data.model_inputs(sl, d.device),
                sched.mtp_loss_weight,
                sched.seq_aux_coef,
                sched.mtp_depth_weights,
            )
        mtp = [m * s for m, s in zip(parts.mtp, s_mtp, strict=True)]
        total = combine(parts.ce * s_ce, parts.aux * s_aux, mtp, **weights)
        # FSDP averages gradients over ranks; scaling by world size makes their sum over ranks and
        # micro-batches the gradient of the global batch's loss.
        (total * d.world_size).backward()
        vals = [(parts.ce, s_ce), (parts.aux, s_aux), *zip(parts.mtp, s_mtp, strict=True)]
        sums += torch.tensor([float(v.detach()) * s for v, s in vals], dtype=torch.float64)
        if expert_load is not None:
            el = expert_load.detach().to("cpu", torch.float64)
            load = el if load is None else load + el
    d.all_sum(sums)
    if load is None:
        load = torch.zeros(0, 0, dtype=torch.float64)
    elif d.enabled:
        load = load.to(d.device)
        d.all_sum(load)
        load = load.cpu()
    ce, aux, mtp = sums[0], sums[1], list(sums[2:])
    return {
        "loss": combine(ce, aux, mtp, **weights).item(),
        "ce": ce.item(),
        "aux": aux.item(),
        "mtp": sums[2:].tolist(),
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
