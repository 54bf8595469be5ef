"""A step's loss and gradient do not depend on how its batch is split into micro-batches (or ranks, which
split it the same way): every part of the loss is a mean over the global batch's own count, also where rows
train different numbers of tokens, as packed sft rows do."""

from __future__ import annotations

import pytest
import torch

import lmspec
from lmspec.spec import load_spec
from lmspec.train.data import Batch
from lmspec.train.distributed import Dist
from lmspec.train.losses import loss_counts, shares, training_loss
from lmspec.train.schedule import StepSchedule
from lmspec.train.trainer import _train_step

B, T, MTP = 8, 24, 3


def _sft_batch() -> Batch:
    """Rows with 0 to about 20 trained labels in runs, like packed conversations' assistant turns."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (B, T + 1), generator=g)
    labels = x[:, 1:].clone()
    keep = torch.rand(B, T, generator=g) < torch.linspace(0.05, 0.95, B)[:, None]
    labels[~keep] = -100
    labels[2] = -100  # a row with nothing trained
    return Batch(x[:, :-1].contiguous(), labels)


@pytest.fixture(scope="module")
def model(examples_dir):
    torch.manual_seed(0)
    m = lmspec.build(examples_dir / "mimo_v2_flash_tiny.yaml").double()
    m.set_trained_mtp_blocks(MTP)
    return m


def _step(model, spec, batch: Batch, micro: int) -> tuple[dict, torch.Tensor]:
    sched = StepSchedule(
        stage=3,
        stage_name="sft",
        lr=0.0,
        batch_size=B,
        seq_len=T,
        rope_theta={},
        mtp_loss_weight=0.3,
        bias_update=0.0,
        seq_aux_coef=0.01,
        kind="sft",
        mtp_blocks=MTP,
    )
    model.zero_grad(set_to_none=True)
    parts = _train_step(model, batch, sched, d=Dist(), spec=spec, micro=micro)
    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return parts, grad


def test_the_step_is_the_same_for_every_micro_batch_split(model, examples_dir):
    spec = load_spec(examples_dir / "mimo_v2_flash_tiny.yaml")
    batch = _sft_batch()
    whole, g_whole = _step(model, spec, batch, B)
    # The whole batch in one forward is the definition: each part the mean over its own count.
    out = model(batch.inputs, labels=batch.labels)
    want = training_loss(out, mtp_loss_weight=0.3, seq_aux_coef=0.01).total.detach()
    assert whole["loss"] == pytest.approx(float(want), rel=1e-12)
    for micro in (3, 1):  # uneven micro-batches (3, 3, 2), and one row each
        parts, grad = _step(model, spec, batch, micro)
        for key in ("loss", "ce", "aux"):
            assert parts[key] == pytest.approx(whole[key], rel=1e-12, abs=1e-15), (micro, key)
        assert parts["mtp"] == pytest.approx(whole["mtp"], rel=1e-12), micro
        assert ((grad - g_whole).norm() / g_whole.norm()).item() < 1e-12, micro


def test_counts_follow_the_models_mtp_targets():
    labels = torch.tensor([[1, 2, -100, 4, 5, 6], [-100, -100, -100, -100, -100, -100]])
    c = loss_counts(labels, 3)
    # Block k's target labels[t + k] counts where it and its input labels[t + k - 1] are trained.
    assert (c.rows, c.ce, c.mtp) == (2, 5, (3, 2, 2))
    assert shares(loss_counts(labels[1:], 3), c) == (0.0, 0.5, (0.0, 0.0, 0.0))
    assert shares(loss_counts(labels[1:], 3), loss_counts(labels[1:], 3)) == (0.0, 1.0, (0.0, 0.0, 0.0))
