"""Serving fixtures: small variants of the tiny spec."""

from __future__ import annotations

from pathlib import Path

import torch

import lmspec

TINY = Path(__file__).resolve().parents[2] / "examples" / "mimo_v2_flash_tiny.yaml"


def small_overrides(
    *, window: int = 32, vocab: int = 256, init_std: float = 0.02, hidden: int = 32
) -> list[str]:
    """The tiny spec's layout (G0 S*2 G S*2 G, sink, MoE top-2, 3 MTP blocks) at a few thousand parameters."""
    out = [
        f"model.attention.swa.window={window}",
        f"model.hidden_size={hidden}",
        f"model.vocab_size={vocab}",
        f"model.init_std={init_std}",
        "model.ffn.dense.intermediate_size=32",
        "model.ffn.moe.num_experts=4",
        "model.ffn.moe.expert_intermediate_size=16",
    ]
    for kind in ("global", "swa"):
        out += [
            f"model.attention.{kind}.num_heads=2",
            f"model.attention.{kind}.num_kv_heads=1",
            f"model.attention.{kind}.qk_head_dim=24",
            f"model.attention.{kind}.v_head_dim=8",
        ]
    return out


def small_model(seed: int = 0, dtype: torch.dtype = torch.float64, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return lmspec.build(TINY, dtype=dtype, overrides=small_overrides(**kw)).eval()
