"""What `check` accepts, `train` runs: every valid spec, at tiny dimensions, builds and takes one
training step (forward with labels, backward, AdamW step) on a few random tokens."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lmspec
from lmspec.spec import Spec
from lmspec.spec.loader import validate

from .strategies import tiny_spec_data

FAST = settings(max_examples=20, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SLOW = settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _one_step(data: dict, batch: int, seq_len: int, seed: int) -> None:
    spec = validate(data, {}, "<drawn>")  # what `check` runs: a SpecError here fails the test
    assert isinstance(spec, Spec)
    seq_len = min(seq_len, spec.model.max_position_embeddings)
    torch.manual_seed(seed)
    model = lmspec.build(spec)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randint(0, spec.model.vocab_size, (2, batch, seq_len), generator=gen)
    out = model(x, labels=y)
    loss = out.loss + sum(out.mtp_losses) + (0 if out.aux_loss is None else out.aux_loss)
    assert loss.dim() == 0
    assert len(out.mtp_losses) == (spec.model.mtp.num_blocks if spec.model.mtp else 0)
    loss.backward()
    opt.step()
    assert any(p.grad is not None for p in model.parameters())


@FAST
@given(data=tiny_spec_data(), batch=st.integers(1, 2), seq_len=st.integers(1, 24), seed=st.integers(0, 2**16))
def test_every_valid_spec_takes_a_training_step(data, batch, seq_len, seed):
    _one_step(data, batch, seq_len, seed)


@pytest.mark.slow
@SLOW
@given(data=tiny_spec_data(), batch=st.integers(1, 3), seq_len=st.integers(1, 80), seed=st.integers(0, 2**16))
def test_every_valid_spec_takes_a_training_step_long(data, batch, seq_len, seed):
    _one_step(data, batch, seq_len, seed)
