"""Token sampling: logits -> the distribution actually sampled from, and the speculative accept rule.

Every decision goes through ``probs(logits, params)``, the warped distribution (temperature, then
top-k, then top-p). It is numerically safe for every valid setting: the most likely token always
survives top-p (even ``top_p=1e-300``, which rounds to 0 in float32), a tiny temperature divides the
logits' distance to their maximum (never the logits themselves) by a floor of the dtype's smallest
normal number, so no setting turns a finite row into NaN; logits that are NaN or +inf (a model that
overflowed) raise ``FloatingPointError`` for that row alone. Speculative decoding compares the warped target distribution p with the warped
draft distribution q, so the tokens it emits are distributed exactly as plain sampling from p
(Leviathan et al. 2023, Chen et al. 2023). Temperature 0 is greedy: p and q are one-hot at the
argmax, and the same rule reduces to "accept while the draft equals the target's argmax".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["MAX_LOGPROBS", "SEED_RANGE", "SamplingParams", "accept_drafts", "probs", "sample"]

# torch.Generator.manual_seed takes any integer in [-2**63, 2**64): what a seed may be.
SEED_RANGE = (-(2**63), 2**64)
# Alternatives reported per token with log-probabilities (the OpenAI API's top_logprobs limit).
MAX_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples. ``temperature=0`` is greedy; ``top_k=0`` and ``top_p=1`` disable filters.

    ``logprobs=k`` reports, for every generated token, its log-probability under the model's raw
    logits (before temperature, top-k and top-p) and the k most likely alternatives; ``prompt_logprobs=k``
    does the same for every prompt token after the first (prompt scoring). ``None`` reports nothing.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 128
    stop: tuple[str, ...] = field(default_factory=tuple)
    seed: int | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:  # NaN fails this too
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed < SEED_RANGE[1]:
            raise ValueError(f"seed must be in [-2**63, 2**64), got {self.seed}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and not 0 <= k <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be in 0..{MAX_LOGPROBS}, got {k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def probs(logits: Tensor, params: SamplingParams) -> Tensor:
    """The distribution sampled from, (..., V) float32 (float64 stays float64); rows sum to 1."""
    cdt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logits = logits.to(cdt)
    V = logits.shape[-1]
    if bool(torch.isnan(logits).any() | (logits == math.inf).any() | (logits == -math.inf).all(-1).any()):
        raise FloatingPointError("the model produced non-finite logits (NaN or +inf, or every logit -inf)")
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), V).to(cdt)
    # Distances to the row maximum are <= 0 and the maximum's is exactly 0, so dividing by any positive
    # temperature leaves the top token at 0 (never 0/0) and sends the others to at most -inf.
    temperature = max(params.temperature, torch.finfo(cdt).tiny)
    logits = (logits - logits.amax(-1, keepdim=True)) / temperature
    if 0 < params.top_k < V:
        kth = logits.topk(params.top_k, dim=-1).values[..., -1:]  # (..., 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    p = logits.softmax(-1)
    if params.top_p < 1:
        sorted_p, order = p.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is < top_p.
        # The first token always stays: a top_p below the dtype's resolution rounds to 0.
        before = sorted_p.cumsum(-1) - sorted_p
        drop = before >= params.top_p
        drop[..., 0] = False
        sorted_p = sorted_p.masked_fill(drop, 0.0)
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
