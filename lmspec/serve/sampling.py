"""Token sampling: logits -> the distribution actually sampled from, and the speculative accept rule.

Every decision goes through ``probs(logits, params)``, the warped distribution (temperature, then
top-k, then top-p). Speculative decoding compares the warped target distribution p with the warped
draft distribution q, so the tokens it emits are distributed exactly as plain sampling from p
(Leviathan et al. 2023, Chen et al. 2023). Temperature 0 is greedy: p and q are one-hot at the
argmax, and the same rule reduces to "accept while the draft equals the target's argmax".
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["SamplingParams", "accept_drafts", "probs", "sample"]


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples. ``temperature=0`` is greedy; ``top_k=0`` and ``top_p=1`` disable filters."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 128
    stop: tuple[str, ...] = field(default_factory=tuple)
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def probs(logits: Tensor, params: SamplingParams) -> Tensor:
    """The distribution sampled from, (..., V) float32 (float64 stays float64); rows sum to 1."""
    cdt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logits = logits.to(cdt)
    V = logits.shape[-1]
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), V).to(cdt)
    logits = logits / params.temperature
    if 0 < params.top_k < V:
        kth = logits.topk(params.top_k, dim=-1).values[..., -1:]  # (..., 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    p = logits.softmax(-1)
    if params.top_p < 1:
        sorted_p, order = p.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is < top_p.
        before = sorted_p.cumsum(-1) - sorted_p
        sorted_p = sorted_p.masked_fill(before >= params.top_p, 0.0)
        p = torch.zeros_like(p).scatter(-1, order, sorted_p)
        p = p / p.sum(-1, keepdim=True)
    return p


def sample(p: Tensor, generator: torch.Generator | None) -> int:
    """One token from the distribution ``p`` (V,)."""
    if (p == 1).any():  # one-hot (greedy): no random draw, so greedy output never depends on the seed
        return int(p.argmax())
    return int(torch.multinomial(p.float(), 1, generator=generator))


def accept_drafts(
    p: Tensor, q: Tensor, drafts: list[int], generator: torch.Generator | None
) -> tuple[int, int]:
    """Speculative accept/reject of ``drafts`` (D,) drawn from ``q`` (D, V) against targets ``p`` (D+1, V).

    Returns ``(accepted, next_token)``: drafts[:accepted] are kept, then ``next_token`` — sampled from
    norm(max(p_i - q_i, 0)) at the first rejection i, or from p_D (the bonus token) if all D are kept.
    """
    D = len(drafts)
    for i, d in enumerate(drafts):
        pi, qi = p[i], q[i]
        ratio = float(pi[d]) / max(float(qi[d]), 1e-30)
        if ratio >= 1.0:
            continue
        u = float(torch.rand((), generator=generator, dtype=torch.float64))
        if u < ratio:
            continue
        residual = (pi - qi).clamp_min(0)
        total = residual.sum()
        # p == q up to rounding: a rejection has vanishing probability; p is then the exact residual.
        residual = residual / total if total > 1e-12 else pi
        return i, sample(residual, generator)
    return D, sample(p[D], generator)
