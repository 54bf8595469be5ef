"""What happens between a run's stages: their kinds, where their weights come from, and MTP replication.

- `check_stages` runs before a run writes anything: every path a stage names exists and fits the spec
  (`lmspec.spec.stages`), and a `mopd` stage has a trainer (`lmspec.train.mopd.run_stage`).
- `data_streams` gives the trainer one stream for all stages: the text stream of pretrain stages and one
  `SFTStream` per sft stage (`sft.py`).
- `StageEntry.enter(i)` runs once per stage, at its first step: it first saves the weights of the stage
  before if a later `init_from` or teacher names it, or a mopd stage continues from it (`RUN/stages/NAME/`,
  a model directory), then loads the stage's
  `init_from` (an earlier stage's saved weights, a run directory's latest checkpoint, or a Hugging Face
  directory) with a fresh optimizer state, then replicates MTP block 0 into the blocks this stage trains
  that the stage before did not (`overrides.mtp_init: replicate`). The stage last entered is in every
  checkpoint (`stage`), so a resumed run does none of it twice and stays bitwise identical.
- `count_zero_grads` is the "num-zeros" health metric of the MiMo-V2-Flash report: parameter elements
  whose gradient is exactly zero after the backward (a parameter with no gradient at all counts whole).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmspec.errors import UsageError
from lmspec.runtime.tokenizer import Tokenizer
from lmspec.spec import Spec, load
from lmspec.spec.loader import LoadedSpec
from lmspec.spec.stages import check_stage_paths, resolve_stage_paths
from lmspec.train import distributed
from lmspec.train.sft import SFTData, SFTStream, StagedStream

STAGES_DIR = "stages"
_MTP_PREFIX = "model.mtp.layers."


def check_stages(
    source: Spec | str | Path, overrides: Any, spec: Spec, decode: Callable[..., Any] | None = None
) -> tuple[Spec, Callable[..., Any] | None]:
    """Refuse, before anything is written, a stage whose paths point nowhere or whose kind has no trainer.

    Returns `spec` with its stage paths absolute (`resolve_stage_paths`), and
    `lmspec.train.mopd.run_stage` when the spec has a mopd stage (None otherwise), which needs
    `decode`, the rollout decoder.
    """
    loaded = (
        LoadedSpec(spec=spec, positions={}, path="<spec>", data={})
        if isinstance(source, Spec)
        else load(source, list(overrides))
    )
    check_stage_paths(loaded, require=True)
    spec = resolve_stage_paths(loaded, spec)
    assert spec.training is not None
    mopd = [i for i, s in enumerate(spec.training.stages) if s.kind == "mopd"]
    if not mopd:
        return spec, None
    if decode is None:
        name = spec.training.stages[mopd[0]].name
        raise UsageError(
            f"training.stages.{mopd[0]} ({name}): a mopd stage samples rollouts with a decoder; "
            "pass TrainConfig(decode=lmspec.serve.rollouts.decode_batch), as lmspec train does"
        )
    from lmspec.train.mopd import run_stage

    return spec, run_stage


def data_streams(
    corpus: Any, spec: Spec, tokenizer: Tokenizer, position: Any, make_stream: Callable[..., Any]
) -> tuple[Any, str]:
    """(the run's training stream, the fingerprint of its data) for a spec's stages."""
    assert spec.training is not None
    sft_stages = [s for s in spec.training.stages if s.kind == "sft"]
    if not sft_stages:
        return make_stream(corpus, spec, position), corpus.fingerprint
    text_position, sft_positions = StagedStream.split_position(position)
    loaded: dict[str, SFTData] = {}
    streams = {}
    for s in sft_stages:
        assert s.data is not None  # the schema requires it of a sft stage
        if s.data not in loaded:
            loaded[s.data] = SFTData(s.data, tokenizer, spec.serving.chat_template, seed=spec.training.seed)
        streams[s.name] = SFTStream(
            loaded[s.data], sft_positions.get(s.name, 0), masking=spec.training.document_masking
        )
    h = hashlib.sha256(corpus.fingerprint.encode())
    for path, data in loaded.items():
        h.update(f"{path}:{data.fingerprint}".encode())
    stream = StagedStream(make_stream(corpus, spec, text_position), streams)
    return stream, h.hexdigest()[:16]


def count_zero_grads(model: nn.Module, d: distributed.Dist) -> int:
    """Parameter elements whose gradient is exactly zero, over all ranks (a missing gradient is all zeros)."""
    zeros = torch.zeros((), dtype=torch.float64)
    for p in model.parameters():
        if not p.requires_grad:
            continue
        local = p.to_local() if hasattr(p, "to_local") else p
        g = p.grad
        if g is None:
            zeros += local.numel()
            continue
        g = g.to_local() if hasattr(g, "to_local") else g
        zeros += float((g == 0).sum())
    d.all_sum(zeros)
    return int(zeros.item())


class StageEntry:
    """The once-per-stage actions of a trainer's run (see the module doc); `entered` is checkpointed."""

    def __init__(self, trainer: Any, entered: int) -> None:
        self.trainer = trainer
        self.entered = entered

    def enter(self, stage: int) -> None:
        while self.entered < stage:
            self.entered += 1
            self._save_named(self.entered - 1)
            self._start(self.entered)

    def _training(self):
        training = self.trainer.spec.training
        assert training is not None
        return training

    def _save_named(self, index: int) -> None:
        """Save stage `index`'s final weights if a later stage starts from them or learns from them."""
        training = self._training()
        if index < 0:
            return
        name = training.stages[index].name
        if name not in training.named_sources() and not self._starts_mopd(index + 1):
            return
        t = self.trainer
        from lmspec.train.trainer import _model_writer

        writer = _model_writer(t.model, t.spec, t.d)
        if t.d.is_main:
            final = t.run_dir / STAGES_DIR / name
            tmp = final.with_name(f".tmp_{name}")
            shutil.rmtree(tmp, ignore_errors=True)
            writer(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            t.reporter.log(f"saved the weights of stage {name} to {final} (a later stage reads them)")
        t.d.barrier()

    def _starts_mopd(self, index: int) -> bool:
        """Whether stage `index` is a mopd stage continuing from the stage before: those weights are kept
        (`RUN/stages/NAME/`) as the student before distillation, which `lmspec eval --domains` grades."""
        training = self._training()
        if index >= len(training.stages) or training.stages[index].kind != "mopd":
            return False
        return training.init_source(index) is None

    def _start(self, index: int) -> None:
        t, training = self.trainer, self._training()
        stage = training.stages[index]
        source = training.init_source(index)
        if source is not None and not (index and source == ("stage", training.stages[index - 1].name)):
            directory = source_dir(t.run_dir, source)
            load_weights(t.model, directory, f"training.stages.{index}.init_from", t.d)
            from lmspec.train.trainer import make_optimizer

            t.optimizer = make_optimizer(t.model, t.spec)  # new weights: the old moments do not apply
            t.reporter.log(f"stage {stage.name}: weights from {directory}, fresh optimizer state")
        if stage.overrides.mtp_init == "replicate":
            before, now = t.spec.stage_mtp_blocks(index - 1), t.spec.stage_mtp_blocks(index)
            t.model.replicate_mtp_block(0, range(before, now))
            names = {id(p): n for n, p in t.model.named_parameters()}
            for p in list(t.optimizer.state):
                k = _mtp_index(names[id(p)])
                if k is not None and before <= k < now:
                    del t.optimizer.state[p]  # a copy starts with fresh moments, like a new parameter
            t.reporter.log(f"stage {stage.name}: MTP block 0 replicated into blocks {before}..{now - 1}")


def source_dir(run_dir: Path, source: tuple[str, str]) -> Path:
    """The directory of a stage's `init_from` or teacher source: an earlier stage's is `RUN/stages/NAME`."""
    kind, ref = source
    return run_dir / STAGES_DIR / ref if kind == "stage" else Path(ref)


def _mtp_index(name: str) -> int | None:
    if not name.startswith(_MTP_PREFIX):
        return None
    return int(name.removeprefix(_MTP_PREFIX).split(".")[0])


def load_weights(model: nn.Module, directory: Path, field: str, d: distributed.Dist) -> None:
    """Load a run's, checkpoint's or Hugging Face directory's weights into `model`, in place.

    The source may have fewer MTP blocks than the model (a pre-training run with one): the others keep
    their weights (a stage replicating block 0 then fills them). Anything else that differs is one line.
    """
    import lmspec

    try:
        source = lmspec.from_pretrained(directory, device="cpu", backend="torch")
    except (OSError, ValueError) as e:
        raise UsageError(f"{field}: {directory}: cannot load its weights ({str(e)[:100]})") from None
    theirs = source.state_dict()
    ours = model.state_dict()
    extra = sorted(set(theirs) - set(ours))
    missing = [k for k in ours if k not in theirs and _mtp_index(k) is None]
    if extra or missing:
        what = f"has {extra[0]}, which the model has not" if extra else f"lacks {missing[0]}"
        raise UsageError(f"{field}: {directory} {what}")
    for k, v in theirs.items():
        if tuple(v.shape) != tuple(ours[k].shape):
            raise UsageError(
                f"{field}: {directory}: {k} has shape {tuple(v.shape)}, the model {tuple(ours[k].shape)}"
            )
    if d.enabled:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, theirs, options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        model.load_state_dict(theirs, strict=False)
