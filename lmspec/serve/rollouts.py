"""Offline batched decoding: a list of prompts in, a list of finished completions out.

On-policy post-training (`lmspec.train.mopd`) samples its rollouts and grades its answers with the same
`DecodeEngine` the server runs, through `decode_batch`. train and serve are siblings, so train never
imports this module: `lmspec train` hands `decode_batch` to the trainer (`TrainConfig.decode`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import Tensor, nn

from lmspec.runtime.tokenizer import Tokenizer
from lmspec.serve.engine import DecodeEngine
from lmspec.serve.sampling import SamplingParams

__all__ = ["Decoded", "decode_batch"]


@dataclass
class Decoded:
    """One finished completion: its tokens and text; with ``record``, each token's behaviour
    log-probability and the experts every position (prompt and completion) was routed to."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    behaviour_logprobs: list[float] = field(default_factory=list)
    routes: Tensor | None = None


def decode_batch(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompts: Sequence[Sequence[int]],
    *,
    temperature: float,
    max_tokens: int,
    stop: Sequence[str] = (),
    seeds: Sequence[int | None] | None = None,
    record: bool = False,
    max_batch: int = 64,
) -> list[Decoded]:
    """Decode every prompt (token ids) to its end, at most ``max_batch`` rows at a time; in prompt order.

    ``seeds[i]`` seeds prompt i's sampling, so a completion depends only on its own seed, never on which
    prompts shared its batch. A row that fails raises ``RuntimeError`` naming the prompt.
    """
    if not prompts:
        return []
    seeds = list(seeds) if seeds is not None else [None] * len(prompts)
    longest = max(len(p) for p in prompts) + max_tokens
    engine = DecodeEngine(
        model,
        max_batch=min(max_batch, len(prompts)),
        max_len=longest,
        tokenizer=tokenizer,
        record_rollout=record,
    )
    out = [Decoded() for _ in prompts]
    index: dict[int, int] = {}
    queue = list(range(len(prompts)))
    was_training = model.training
    model.eval()
    try:
        while queue or engine.active:
            while queue and engine.free_rows:
                i = queue.pop(0)
                params = SamplingParams(
                    temperature=temperature, max_tokens=max_tokens, stop=tuple(stop), seed=seeds[i]
                )
                index[engine.add(list(prompts[i]), params)] = i
            for ev in engine.step():
                i = index[ev.rid]
                if ev.error is not None:
                    raise RuntimeError(f"decoding prompt {i} failed: {ev.error}")
                d = out[i]
                d.token_ids += ev.token_ids
                d.text += ev.text
                d.behaviour_logprobs += ev.behaviour_logprobs or []
                if ev.routes is not None:
                    d.routes = ev.routes
    finally:
        model.train(was_training)
    return out
