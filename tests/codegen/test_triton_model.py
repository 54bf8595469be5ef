"""The generated model on the Triton backend (interpreter on CPU) matches the torch backend end to end."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import lmspec
from lmspec.testing.compare import close

# Not importorskip: importing triton here, before the backend selects the interpreter, would break it.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def test_triton_backend_matches_torch(tiny_spec):
    torch.manual_seed(0)
    model = lmspec.build(
        tiny_spec, overrides=["model.layers=G0 S G", "model.mtp.num_blocks=1", "serving.speculative_depth=1"]
    )
    x = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(0))  # past the 33-key window
    with torch.no_grad():
        ref = model(x)
        ref_loss = model(x, labels=x)
    try:
        model.set_backend("triton")
    except RuntimeError as e:  # triton imported earlier in this process without the interpreter
        pytest.skip(str(e))
    with torch.no_grad():
        out = model(x)
        loss = model(x, labels=x)
    torch.testing.assert_close(out.logits, ref.logits, **close("float32_model"))
    torch.testing.assert_close(out.expert_load, ref.expert_load, **close("exact"))
    torch.testing.assert_close(loss.loss, ref_loss.loss, **close("float32"))
    torch.testing.assert_close(loss.mtp_losses[0], ref_loss.mtp_losses[0], **close("float32"))
    # op families can be mixed: attention from torch, the rest from the rendered kernels
    model.set_backend("triton", op_overrides={"attention": "torch"})
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref.logits, **close("float32_model"))
