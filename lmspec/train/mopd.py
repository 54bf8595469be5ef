"""Multi-Teacher On-Policy Distillation (MOPD; MiMo-V2-Flash report §4.4, eqs. 5-9), one stage of it.

The student samples on-policy, the teacher of each prompt's domain grades every sampled token, and an
outcome verifier grades the whole answer. Notation: x a prompt, y ~ μ a response the rollout engine
sampled, π_θ the student in the training forward, π_d the teacher of x's domain, sg stop-gradient.

    Â_t  = sg[log π_d(y_t|x,y<t) − log π_θ(y_t|x,y<t)] + α · Â_ORM              (eqs. 8-9)
    w_t  = sg[π_θ/μ](y_t)  if ε_low <= π_θ/μ <= ε_high,  else 0                 (train/inference IS, discard)
    L    = −E_x E_{y~μ} [ (1/|y|) Σ_t w_t · Â_t · log π_θ(y_t|x,y<t) ]           (eq. 7)

Â_ORM is GRPO's group-normalised outcome reward: the ``rollouts_per_prompt`` responses of one prompt form a
group, and each reward is centred on its group's mean and divided by its standard deviation. With μ = π_θ
and α = 0 the gradient of L is the token-level reverse-KL policy gradient
E_y[(1/|y|) Σ_t ∇ log π_θ(y_t) · (log π_θ − log π_d)(y_t)], whose expectation over y_t is the exact
gradient of KL(π_θ || π_d) at each prefix (``tests/train/test_mopd.py`` checks both in float64).

Rollouts run on the serving ``DecodeEngine`` with ``record_rollout``: μ is each token's log-probability
under the distribution it was drawn from, and every position's routed experts are kept, so the training
forward replays them (R3, Rollout Routing Replay): the student's log-probabilities are those of the
experts that produced the sample. Each rollout's seed is a function of the stage seed, the step, the
prompt and the sample, so a resumed stage draws the same rollouts.

One step (``mopd_step``): rollouts → teacher scoring → surrogate loss → optimizer step, and its metrics.
``run_stage(trainer, stage)`` runs a spec's ``kind: mopd`` stage inside ``lmspec train``: the trainer's
counters, metrics file and checkpoints, so ``--resume`` after a kill -9 continues bitwise on CPU.
``run_mopd(model, optimizer, teachers, prompts, config, decode=..., run_dir=...)`` is the same loop with explicit
arguments and its own run directory (the trainer's checkpoint layout and rules), for scripts and tests.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from lmspec.errors import CheckpointError, UsageError
from lmspec.runtime.checkpoint import save_checkpoint
from lmspec.runtime.tokenizer import ByteTokenizer, Tokenizer
from lmspec.train.tasks import STOP, PromptRecord, verifier_for

__all__ = [
    "EndpointTeacher",
    "LocalTeacher",
    "MOPDConfig",
    "MOPDResult",
    "MOPDTerms",
    "Rollout",
    "Teacher",
    "group_advantages",
    "importance_weights",
    "load_teacher",
    "mopd_loss",
    "rollout_seed",
    "run_mopd",
    "run_stage",
    "sample_rollouts",
    "student_logprobs",
    "token_advantages",
]

# ---------------------------------------------------------------------------------------------
# The objective (eqs. 7-9), as pure functions over (sequences, response tokens) tensors
# ---------------------------------------------------------------------------------------------


def group_advantages(rewards: Tensor, group_size: int, eps: float = 1e-6) -> Tensor:
    """GRPO outcome advantages: (r − mean of its group) / (std of its group + eps); 0 where a group agrees.

    rewards (S,) with S = groups · group_size, each group contiguous. The std is the population std (a
    group of one has advantage 0).
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.view(-1, group_size)  # (G, n)
    centred = r - r.mean(dim=1, keepdim=True)
    return (centred / (r.std(dim=1, correction=0, keepdim=True) + eps)).view(-1)


def importance_weights(student_lp: Tensor, behaviour_lp: Tensor, eps_low: float, eps_high: float) -> Tensor:
    """w_t = sg[π_θ/μ] inside [eps_low, eps_high], else exactly 0 (the token is discarded)."""
    ratio = (student_lp.detach() - behaviour_lp).exp()
    inside = (ratio >= eps_low) & (ratio <= eps_high)
    return torch.where(inside, ratio, torch.zeros_like(ratio))


def token_advantages(student_lp: Tensor, teacher_lp: Tensor, orm: Tensor, alpha: float) -> Tensor:
    """Â_t = sg[log π_teacher − log π_θ] + α · Â_ORM; ``orm`` (S,) is broadcast over each response's tokens."""
    return (teacher_lp - student_lp).detach() + alpha * orm[:, None]


@dataclass
class MOPDTerms:
    """The surrogate and what the step logs about it; only ``loss`` and ``per_sequence`` carry gradients."""

    loss: Tensor  # scalar: the mean over sequences of (1/|y|) Σ_t -w_t Â_t log π_θ
    per_sequence: Tensor  # (S,) (1/|y|) Σ_t -w_t Â_t log π_θ, with its gradient
    weights: Tensor  # (S, T) w_t, 0 at padding
    clipped: Tensor  # (S, T) bool: a response token whose ratio left [eps_low, eps_high]
    reverse_kl: Tensor  # (S,) sampled estimate per response: mean_t (log π_θ − log π_teacher)(y_t)


def mopd_loss(
    student_lp: Tensor,
    behaviour_lp: Tensor,
    teacher_lp: Tensor,
    mask: Tensor,
    orm: Tensor,
    *,
    alpha: float,
    eps_low: float,
    eps_high: float,
    num_sequences: int | None = None,
) -> MOPDTerms:
    """Eq. 7 over S responses padded to T tokens: log-probs (S, T), ``mask`` (S, T) bool, ``orm`` (S,).

    Only ``student_lp`` carries a gradient. The loss is the sum of the per-response terms divided by
    ``num_sequences`` (default S), so micro-batches of one batch add up to the batch's mean.
    """
    zero = torch.zeros_like(student_lp)
    lengths = mask.sum(dim=-1).clamp_min(1).to(student_lp.dtype)  # (S,) |y|
    w = torch.where(mask, importance_weights(student_lp, behaviour_lp, eps_low, eps_high), zero)
    adv = torch.where(mask, token_advantages(student_lp, teacher_lp, orm, alpha), zero)
    # where(), not a product with the mask: padding may hold -inf log-probs, and 0 * -inf is NaN.
    per_token = torch.where(mask, -w * adv * student_lp, zero)
    per_sequence = per_token.sum(dim=-1) / lengths
    gap = torch.where(mask, (student_lp.detach() - teacher_lp), zero)
    return MOPDTerms(
        loss=per_sequence.sum() / (num_sequences or student_lp.shape[0]),
        per_sequence=per_sequence,
        weights=w.detach(),
        clipped=mask & (w == 0),
        reverse_kl=(gap.sum(dim=-1) / lengths).detach(),
    )


# ---------------------------------------------------------------------------------------------
# Rollouts
# ---------------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """One sampled response. ``routes`` (len(prompt) + len(completion) − 1, L, K): the experts of every
    position the engine read, i.e. of the training forward's inputs (the last token is never read)."""

    index: int  # the prompt record's index
    sample: int  # which of its rollouts_per_prompt
    domain: str
    answer: str
    prompt: list[int]
    completion: list[int]
    behaviour_lp: list[float]
    routes: Tensor
    text: str = ""
    reward: float = 0.0


def rollout_seed(seed: int, step: int, index: int, sample: int) -> int:
    """The sampling seed of one rollout: a hash of (stage seed, step, prompt, sample), so a resumed stage
    samples exactly what the uninterrupted one did, whatever ran before it in the process."""
    digest = hashlib.sha256(f"mopd:{seed}:{step}:{index}:{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # in [0, 2^63)


class Decoded(Protocol):
    """One finished completion, as a ``Decode`` returns it."""

    token_ids: list[int]
    text: str
    behaviour_logprobs: list[float]
    routes: Tensor | None


class Decode(Protocol):
    """Batched decoding to the end of every prompt, in prompt order (``lmspec.serve.rollouts.decode_batch``).

    Rollouts and greedy grading decode with the serving engine; train and serve are siblings, so the
    caller hands it in (``lmspec train`` does, through ``TrainConfig.decode``).
    """

    def __call__(
        self,
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
    ) -> Sequence[Decoded]: ...


def sample_rollouts(
    model: nn.Module,
    records: Sequence[tuple[int, PromptRecord]],
    *,
    decode: Decode,
    group: int,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    step: int,
    tokenizer: Tokenizer,
    max_batch: int = 64,
) -> list[Rollout]:
    """``group`` responses per (index, record), sampled by ``decode``; grouped by prompt, in order.

    A response ends at its first newline or after ``max_new_tokens``. Each is graded by its domain's
    verifier (``reward``).
    """
    jobs = [(i, j, r, tokenizer.encode(r.prompt)) for i, r in records for j in range(group)]
    done = decode(
        model,
        tokenizer,
        [ids for *_, ids in jobs],
        temperature=temperature,
        max_tokens=max_new_tokens,
        stop=(STOP,),
        seeds=[rollout_seed(seed, step, i, j) for i, j, *_ in jobs],
        record=True,
        max_batch=max_batch,
    )
    out = []
    for (i, j, rec, ids), d in zip(jobs, done, strict=True):
        r = Rollout(
            i, j, rec.domain, rec.answer, ids, list(d.token_ids), list(d.behaviour_logprobs), routes(d)
        )
        r.text = tokenizer.decode(r.completion)
        r.reward = verifier_for(r.domain)(r.text, r.answer)
        out.append(r)
    return out


def routes(d: Decoded) -> Tensor:
    """The rollout's recorded experts; empty for a model with no MoE layer."""
    return d.routes if d.routes is not None else torch.empty(0)


def greedy_answers(
    model: nn.Module, tokenizer: Tokenizer, prompts: Sequence[str], max_new_tokens: int, decode: Decode
) -> list[str]:
    """Each prompt's greedy completion (one ``decode`` call), cut at its first newline."""
    ids = [tokenizer.encode(p) for p in prompts]
    done = decode(model, tokenizer, ids, temperature=0.0, max_tokens=max_new_tokens, stop=(STOP,))
    return [d.text.split(STOP, 1)[0] for d in done]


# ---------------------------------------------------------------------------------------------
# Teachers
# ---------------------------------------------------------------------------------------------


class Teacher(Protocol):
    """What grades a domain: log-probabilities of given tokens, and its own greedy answers."""

    name: str

    def score(self, sequences: Sequence[list[int]], starts: Sequence[int]) -> list[Tensor]:
        """float64 log π(seq[t] | seq[:t]) for t = start .. len(seq) − 1 of each sequence."""
        ...

    def answer(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        """Greedy completions' text, each cut at its first newline or after ``max_new_tokens`` tokens."""
        ...


class LocalTeacher:
    """A teacher held in this process: a model loaded from a run or checkpoint directory."""

    def __init__(
        self, model: nn.Module, *, decode: Decode, name: str = "local", tokenizer: Tokenizer | None = None
    ) -> None:
        self.model = model.eval()
        self.name = name
        self.tokenizer = tokenizer or ByteTokenizer()
        self.decode = decode

    @torch.no_grad()
    def score(self, sequences: Sequence[list[int]], starts: Sequence[int]) -> list[Tensor]:
        device = next(self.model.parameters()).device
        T = max(len(s) for s in sequences) - 1
        ids = torch.zeros(len(sequences), T, dtype=torch.long)
        for i, s in enumerate(sequences):
            ids[i, : len(s) - 1] = torch.tensor(s[:-1])
        logits = self.model(ids.to(device)).logits.double().log_softmax(-1).cpu()  # (S, T, V)
        out = []
        for i, (s, start) in enumerate(zip(sequences, starts, strict=True)):
            targets = torch.tensor(s[start:], dtype=torch.long)
            out.append(logits[i, start - 1 : len(s) - 1].gather(-1, targets[:, None])[:, 0])
        return out

    def answer(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        return greedy_answers(self.model, self.tokenizer, prompts, max_new_tokens, self.decode)


class EndpointTeacher:
    """A teacher served elsewhere (``lmspec serve``), scored through /v1/completions with ``echo`` and
    ``logprobs``: the prompt-logprob API returns log π of every prompt token after the first. The served
    model's name comes from /v1/models."""

    def __init__(self, url: str, name: str = "endpoint", timeout: float = 120.0) -> None:
        self.url = url.rstrip("/")
        self.name = name
        self.timeout = timeout
        self._model: str | None = None

    def _request(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """GET (no body) or POST JSON to the server; UsageError naming the teacher when it fails."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            f"{self.url}{path}", data=data, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310 (the user's URL)
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            detail = e.read()[:300].decode("utf-8", "replace")
            raise UsageError(f"teacher {self.name} at {self.url}{path}: HTTP {e.code} {detail}") from None
        except OSError as e:
            raise UsageError(f"teacher {self.name} at {self.url}{path}: {e}") from None

    def _complete(self, body: dict[str, Any]) -> dict[str, Any]:
        if self._model is None:
            self._model = str(self._request("/v1/models")["data"][0]["id"])
        return self._request("/v1/completions", {"model": self._model, **body})["choices"][0]

    def score(self, sequences: Sequence[list[int]], starts: Sequence[int]) -> list[Tensor]:
        out = []
        for s, start in zip(sequences, starts, strict=True):
            choice = self._complete({"prompt": list(s), "max_tokens": 0, "echo": True, "logprobs": 0})
            lps = choice["logprobs"]["token_logprobs"]  # [None, lp(s[1]), ..., lp(s[-1])]
            if len(lps) != len(s):
                raise UsageError(f"teacher {self.name}: scored {len(lps)} tokens of {len(s)}")
            out.append(torch.tensor(lps[start:], dtype=torch.float64))
        return out

    def answer(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        body = {"max_tokens": max_new_tokens, "temperature": 0, "stop": [STOP]}
        return [self._complete({**body, "prompt": p})["text"] for p in prompts]


def load_teacher(
    name: str,
    source: str | Path | dict[str, str],
    *,
    decode: Decode,
    device: torch.device | str = "cpu",
    backend: str = "torch",
) -> Teacher:
    """A teacher from its spec entry: a run or checkpoint directory, or ``{url: ...}`` of a served model."""
    if isinstance(source, dict):
        if set(source) != {"url"} or not isinstance(source["url"], str):
            raise UsageError(f"teacher {name}: expected a run directory or {{url: ...}}, got {source!r}")
        return EndpointTeacher(source["url"], name=name)
    import lmspec
    from lmspec.runtime.checkpoint import resolve_checkpoint
    from lmspec.runtime.tokenizer import TOKENIZER_FILE, load_tokenizer

    ckpt = resolve_checkpoint(source)
    tok = ckpt / TOKENIZER_FILE
    tokenizer = load_tokenizer(tok if tok.is_file() else None)
    model = lmspec.from_pretrained(ckpt, device=device, backend=backend)
    return LocalTeacher(model, decode=decode, name=name, tokenizer=tokenizer)


# ---------------------------------------------------------------------------------------------
# The student's side: log-probabilities of the rollouts with their routes replayed (R3)
# ---------------------------------------------------------------------------------------------


@dataclass
class StudentPass:
    """The training forward over some rollouts: log π_θ of each response token, and how R3 went."""

    logprobs: Tensor  # (S, G) with grad; G = the longest response
    mask: Tensor  # (S, G) bool: a response token
    replayed: float | None  # fraction of (token, MoE layer) expert choices equal to the rollout's
    router_agreement: float | None  # fraction where the router's own top-k set is the rollout's
    positions: int  # input positions (tokens) those fractions are over


def _batch(rollouts: Sequence[Rollout]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Inputs (S, T), routes (S, T, L, K), valid inputs (S, T), response positions, targets, mask (S, G)."""
    S = len(rollouts)
    T = max(len(r.prompt) + len(r.completion) - 1 for r in rollouts)
    G = max(len(r.completion) for r in rollouts)
    L, K = rollouts[0].routes.shape[1:]
    ids = torch.zeros(S, T, dtype=torch.long)
    routes = torch.zeros(S, T, L, K, dtype=torch.long)  # expert 0 at padding: any valid id will do
    valid = torch.zeros(S, T, dtype=torch.bool)
    pos = torch.zeros(S, G, dtype=torch.long)
    targets = torch.zeros(S, G, dtype=torch.long)
    mask = torch.zeros(S, G, dtype=torch.bool)
    for i, r in enumerate(rollouts):
        seq, P, n = r.prompt + r.completion, len(r.prompt), len(r.completion)
        ids[i, : len(seq) - 1] = torch.tensor(seq[:-1])
        if r.routes.shape[0] < len(seq) - 1:
            raise ValueError(
                f"rollout {r.index}.{r.sample}: routes for {r.routes.shape[0]} of {len(seq) - 1} positions"
            )
        routes[i, : len(seq) - 1] = r.routes[: len(seq) - 1]
        valid[i, : len(seq) - 1] = True
        pos[i, :n] = torch.arange(P - 1, P - 1 + n)  # position P-1+j predicts response token j
        targets[i, :n] = torch.tensor(r.completion)
        mask[i, :n] = True
    return ids, routes, valid, pos, targets, mask


def student_logprobs(model: nn.Module, rollouts: Sequence[Rollout], *, replay: bool = True) -> StudentPass:
    """log π_θ of every response token in one forward over prompt + response, replaying the rollout's
    experts in every MoE layer (``replay=False`` lets the routers choose, to measure what R3 changes)."""
    device = next(model.parameters()).device
    ids, routes, valid, pos, targets, mask = _batch(rollouts)
    has_moe = routes.shape[2] > 0
    out = model(
        ids.to(device), routes=routes.to(device) if replay and has_moe else None, return_routes=has_moe
    )
    logits = out.logits
    cdt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logp = logits.to(cdt).log_softmax(-1)  # (S, T, V)
    rows = torch.arange(len(rollouts), device=device)[:, None]
    picked = logp[rows, pos.to(device)]  # (S, G, V)
    lp = picked.gather(-1, targets.to(device)[..., None])[..., 0]  # (S, G)
    replayed = agreement = None
    if has_moe:
        v = valid.to(device)
        want = routes.to(device)[v]  # (n, L, K)
        replayed = float((out.routes[v] == want).float().mean())
        own = out.router_routes[v].sort(dim=-1).values
        agreement = float((own == want.sort(dim=-1).values).all(dim=-1).float().mean())
    return StudentPass(lp, mask.to(device), replayed, agreement, int(valid.sum()))


# ---------------------------------------------------------------------------------------------
# One stage
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MOPDConfig:
    """An MOPD stage's hyperparameters (the spec's ``kind: mopd`` stage fields, plus the loop's own).

    The report gives none of α, ε_low, ε_high: the defaults are the usual importance-sampling band
    [0.5, 2] and an outcome term as strong as the distillation term.
    """

    steps: int
    prompts_per_step: int = 8
    rollouts_per_prompt: int = 4
    alpha: float = 1.0
    eps_low: float = 0.5
    eps_high: float = 2.0
    max_new_tokens: int = 32
    temperature: float = 1.0
    lr: float = 1e-4
    grad_clip: float | None = 1.0
    seed: int = 0
    micro_batch_size: int | None = None  # sequences per forward; None: the whole step's rollouts
    checkpoint_every: int | None = None  # default: 5 checkpoints per stage (and always at the end)
    eval_every: int | None = None  # greedy exact match on the eval prompts; default: 5 per stage
    keep_checkpoints: int | None = 3
    max_batch: int = 64  # rollout engine rows

    def __post_init__(self) -> None:
        counts = ("steps", "prompts_per_step", "rollouts_per_prompt", "max_new_tokens", "max_batch")
        for name in counts:
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"{name} must be a whole number >= 1, got {getattr(self, name)!r}")
        if not 0 <= self.eps_low <= 1 <= self.eps_high:
            raise ValueError(f"expected 0 <= eps_low <= 1 <= eps_high, got {self.eps_low}, {self.eps_high}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be > 0 (on-policy sampling), got {self.temperature}")
        if not (math.isfinite(self.alpha) and math.isfinite(self.lr) and self.lr >= 0):
            raise ValueError("alpha and lr must be finite, lr >= 0")

    def every(self, value: int | None) -> int:
        return value or max(1, self.steps // 5)


@dataclass
class MOPDResult:
    run_dir: Path | None
    steps: int
    checkpoint: Path | None
    history: list[dict[str, Any]] = field(default_factory=list, repr=False)
    teacher_exact_match: dict[str, float] = field(default_factory=dict)
    student_exact_match_before: dict[str, float] = field(default_factory=dict)


def prompt_indices(step: int, n_prompts: int, per_step: int, seed: int) -> list[int]:
    """The prompts of step ``step`` (0-based): epoch after epoch of a seeded permutation, in order."""
    import random

    out = []
    for p in range(step * per_step, (step + 1) * per_step):
        epoch, k = divmod(p, n_prompts)
        order = list(range(n_prompts))
        random.Random(f"mopd-order:{seed}:{epoch}").shuffle(order)
        out.append(order[k])
    return out


def _teacher_logprobs(teachers: dict[str, Teacher], rollouts: Sequence[Rollout], G: int) -> Tensor:
    """(S, G) float64 log π_teacher of each response token, each rollout scored by its domain's teacher."""
    out = torch.zeros(len(rollouts), G, dtype=torch.float64)
    by_domain: dict[str, list[int]] = {}
    for i, r in enumerate(rollouts):
        by_domain.setdefault(r.domain, []).append(i)
    for domain, rows in by_domain.items():
        seqs = [rollouts[i].prompt + rollouts[i].completion for i in rows]
        scored = teachers[domain].score(seqs, [len(rollouts[i].prompt) for i in rows])
        for i, lp in zip(rows, scored, strict=True):
            out[i, : lp.numel()] = lp
    return out


def _per_domain(domains: Sequence[str], values: Tensor) -> dict[str, float]:
    sums: dict[str, list[float]] = {}
    for d, v in zip(domains, values.tolist(), strict=True):
        sums.setdefault(d, []).append(v)
    return {d: sum(v) / len(v) for d, v in sorted(sums.items())}


def _backward(
    model: nn.Module, rollouts: list[Rollout], teacher_lp: Tensor, orm: Tensor, c: MOPDConfig
) -> dict[str, Any]:
    """Forward (with R3) and backward over micro-batches; the step's loss terms, summed over them."""
    S, micro = len(rollouts), c.micro_batch_size or len(rollouts)
    acc: dict[str, Any] = {
        "loss": 0.0,
        "kl": [],
        "clipped": 0,
        "tokens": 0,
        "gap": 0.0,
        "nll": 0.0,
        "r3": [],
        "agree": [],
    }
    for lo in range(0, S, micro):
        part = rollouts[lo : lo + micro]
        sp = student_logprobs(model, part)
        G = sp.logprobs.shape[1]
        dev = sp.logprobs.device
        mu = torch.zeros(len(part), G, dtype=torch.float64)
        for i, r in enumerate(part):
            mu[i, : len(r.behaviour_lp)] = torch.tensor(r.behaviour_lp, dtype=torch.float64)
        mu, t_lp = mu.to(dev, sp.logprobs.dtype), teacher_lp[lo : lo + micro, :G].to(dev, sp.logprobs.dtype)
        terms = mopd_loss(
            sp.logprobs,
            mu,
            t_lp,
            sp.mask,
            orm[lo : lo + micro].to(dev, sp.logprobs.dtype),
            alpha=c.alpha,
            eps_low=c.eps_low,
            eps_high=c.eps_high,
            num_sequences=S,
        )
        terms.loss.backward()
        acc["loss"] += float(terms.loss.detach())
        acc["kl"].append(terms.reverse_kl.cpu())
        acc["clipped"] += int(terms.clipped.sum())
        acc["tokens"] += int(sp.mask.sum())
        acc["nll"] -= float(torch.where(sp.mask, sp.logprobs.detach(), torch.zeros_like(mu)).sum())
        gap = torch.where(sp.mask, (sp.logprobs.detach() - mu).abs(), torch.zeros_like(mu))
        acc["gap"] = max(acc["gap"], float(gap.max()))
        acc["r3"].append((sp.replayed, sp.positions))
        acc["agree"].append((sp.router_agreement, sp.positions))
    return acc


def _mean_of(pairs: list[tuple[float | None, int]]) -> float | None:
    if any(v is None for v, _ in pairs):
        return None
    return sum(v * n for v, n in pairs) / sum(n for _, n in pairs)  # type: ignore[operator]


def mopd_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    teachers: dict[str, Teacher],
    prompts: Sequence[PromptRecord],
    c: MOPDConfig,
    step: int,
    tokenizer: Tokenizer,
    decode: Decode,
) -> dict[str, Any]:
    """One MOPD step (0-based ``step``): rollouts, teacher scores, surrogate, optimizer step; its metrics."""
    t0 = time.perf_counter()
    chosen = prompt_indices(step, len(prompts), c.prompts_per_step, c.seed)
    rollouts = sample_rollouts(
        model,
        [(i, prompts[i]) for i in chosen],
        decode=decode,
        group=c.rollouts_per_prompt,
        max_new_tokens=c.max_new_tokens,
        temperature=c.temperature,
        seed=c.seed,
        step=step,
        tokenizer=tokenizer,
        max_batch=c.max_batch,
    )
    rewards = torch.tensor([r.reward for r in rollouts], dtype=torch.float64)
    orm = group_advantages(rewards, c.rollouts_per_prompt)
    teacher_lp = _teacher_logprobs(teachers, rollouts, max(len(r.completion) for r in rollouts))
    for g in optimizer.param_groups:
        g["lr"] = c.lr
    acc = _backward(model, rollouts, teacher_lp, orm, c)
    domains = [r.domain for r in rollouts]
    clip = c.grad_clip if c.grad_clip else math.inf
    grad_norm = float(nn.utils.clip_grad_norm_(model.parameters(), clip))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {
        "step": step + 1,
        "loss": acc["loss"],
        # The student's cross-entropy on its own sampled responses (an on-policy entropy estimate).
        "ce": acc["nll"] / max(acc["tokens"], 1),
        "reward_mean": float(rewards.mean()),
        "reward": _per_domain(domains, rewards),
        "reverse_kl": _per_domain(domains, torch.cat(acc["kl"])),
        "clip_fraction": acc["clipped"] / max(acc["tokens"], 1),
        "r3_replayed": _mean_of(acc["r3"]),
        "r3_router_agreement": _mean_of(acc["agree"]),
        "max_logprob_gap": acc["gap"],
        "response_tokens": acc["tokens"],
        "lr": c.lr,
        "grad_norm": grad_norm,
        "step_s": time.perf_counter() - t0,
    }


def exact_match_by_domain(answers: Sequence[str], records: Sequence[PromptRecord]) -> dict[str, float]:
    """Mean verifier score per domain of greedy ``answers`` to ``records``."""
    scores = torch.tensor(
        [verifier_for(r.domain)(a, r.answer) for a, r in zip(answers, records, strict=True)],
        dtype=torch.float64,
    )
    return _per_domain([r.domain for r in records], scores)


def _fingerprint(prompts: Sequence[PromptRecord]) -> str:
    h = hashlib.sha256()
    for r in prompts:
        h.update(json.dumps([r.prompt, r.domain, r.answer]).encode() + b"\n")
    return h.hexdigest()[:16]


def _stage_hash(c: MOPDConfig, spec_hash: str | None, teachers: dict[str, Teacher]) -> str:
    """What a resumed stage must share with the one that wrote the checkpoint."""
    what = {
        "config": asdict(c),
        "spec": spec_hash,
        "teachers": sorted((d, t.name) for d, t in teachers.items()),
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class _Run:
    """The run directory side of a stage: its lock, metrics file and where it resumes from."""

    run_dir: Path
    lock: Any
    metrics: Any
    state: dict[str, Any]
    checkpoint: Path | None
    corpus: str  # the prompts' fingerprint
    stage_hash: str


def _open_run(run_dir: Path, *, resume: bool, overwrite: bool, stage_hash: str, corpus: str) -> _Run:
    """Decide what the run directory allows (rundir.py's rules) and take its lock, before any write."""
    from lmspec.train.metrics import MetricsWriter
    from lmspec.train.rundir import apply_plan, lock_run_dir, plan_run

    lock = lock_run_dir(run_dir)
    try:
        plan = plan_run(run_dir, resume=resume, resume_from=None, overwrite=overwrite)
        state = plan.state
        if state and (state.get("spec_hash") != stage_hash or state.get("corpus") != corpus):
            raise UsageError(
                f"{plan.checkpoint} was written by an MOPD stage with other settings, teachers or prompts; "
                "resume with the same ones"
            )
        apply_plan(plan)
        metrics = MetricsWriter(run_dir, truncate_after_step=state["step"] if state else None)
    except BaseException:
        lock.release(failed=True)
        raise
    return _Run(run_dir, lock, metrics, dict(state), plan.checkpoint, corpus, stage_hash)


def _restore(model: nn.Module, optimizer: torch.optim.Optimizer, ckpt: Path, state: dict[str, Any]) -> None:
    """Weights, AdamW moments and RNG states of a verified checkpoint, into the stage's own objects."""
    from lmspec.runtime.checkpoint import load_optimizer_state
    from lmspec.runtime.modeling import load_hf_state_dict
    from lmspec.train.trainer import _load_optimizer, _set_rng_state

    weights = load_hf_state_dict(ckpt)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = getattr(model, "TIE_WORD_EMBEDDINGS", False)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise CheckpointError(
            f"{ckpt}: does not fit the model (missing {missing[:4]}, unexpected {unexpected[:4]})"
        )
    try:
        _load_optimizer(model, optimizer, load_optimizer_state(ckpt))
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
        raise CheckpointError(f"{ckpt}: optimizer.pt does not fit the model ({str(e)[:100]})") from None
    _set_rng_state(state["rng"])


def _save(
    run: _Run,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    c: MOPDConfig,
    tokenizer_file: Path | None,
) -> Path:
    from lmspec.train.trainer import _optimizer_state, _rng_state

    return save_checkpoint(
        run.run_dir,
        state["step"],
        save_model=model.save_pretrained,
        optimizer_state=_optimizer_state(model, optimizer),
        trainer_state={
            **state,
            "data_position": state["step"] * c.prompts_per_step,  # prompts drawn so far
            "corpus": run.corpus,
            "spec_hash": run.stage_hash,
            "rng": _rng_state(),
            "world_size": 1,
            "last_val": None,
        },
        extra_files={"tokenizer.json": tokenizer_file} if tokenizer_file is not None else None,
        keep=c.keep_checkpoints,
    )


def _exact_match_rows(
    model: nn.Module,
    teachers: dict[str, Teacher],
    evals: Sequence[PromptRecord],
    c: MOPDConfig,
    tok: Tokenizer,
    decode: Decode,
) -> tuple[dict[str, float], dict[str, float]]:
    """(student, teachers) greedy exact match per domain on ``evals``; each domain by its own teacher."""
    if not evals:
        return {}, {}
    texts = [r.prompt for r in evals]
    student = exact_match_by_domain(greedy_answers(model, tok, texts, c.max_new_tokens, decode), evals)
    teacher: dict[str, float] = {}
    for domain in sorted({r.domain for r in evals}):
        mine = [r for r in evals if r.domain == domain]
        answers = teachers[domain].answer([r.prompt for r in mine], c.max_new_tokens)
        teacher.update(exact_match_by_domain(answers, mine))
    return student, teacher


def run_mopd(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    teachers: dict[str, Teacher],
    prompts: Sequence[PromptRecord],
    config: MOPDConfig,
    *,
    decode: Decode,
    run_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    eval_prompts: Sequence[PromptRecord] = (),
    tokenizer: Tokenizer | None = None,
    tokenizer_file: Path | None = None,
    spec_hash: str | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> MOPDResult:
    """Run one MOPD stage of ``config.steps`` steps on ``model`` with ``optimizer``; see the module docs.

    ``teachers`` maps every domain of ``prompts`` and ``eval_prompts`` to its teacher. With ``run_dir``,
    each step is a line of ``RUN/metrics.jsonl`` and checkpoints go to ``RUN/checkpoints`` (what a run
    directory may hold follows the trainer's rules: ``resume`` continues from LATEST, ``overwrite``
    starts afresh). Without it the stage runs in memory and returns its metrics.
    """
    c, tok = config, tokenizer or ByteTokenizer()
    missing = sorted({p.domain for p in [*prompts, *eval_prompts]} - set(teachers))
    if missing:
        raise UsageError(f"no teacher for domain(s) {missing}; the stage's teachers: {sorted(teachers)}")
    corpus, stage_hash = _fingerprint(prompts), _stage_hash(c, spec_hash, teachers)
    run = None
    if run_dir is not None:
        run = _open_run(
            Path(run_dir), resume=resume, overwrite=overwrite, stage_hash=stage_hash, corpus=corpus
        )
    state: dict[str, Any] = run.state if run else {}
    history: list[dict[str, Any]] = []
    try:
        if run is not None and run.checkpoint is not None:
            _restore(model, optimizer, run.checkpoint, state)
        info = dict(state.get("mopd") or {})
        if "teacher_exact_match" not in info:
            before, info["teacher_exact_match"] = _exact_match_rows(
                model, teachers, eval_prompts, c, tok, decode
            )
            info["student_exact_match_before"] = before
        step, tokens = int(state.get("step", 0)), int(state.get("tokens", 0))
        elapsed, last = float(state.get("elapsed_s", 0.0)), run.checkpoint if run else None
        model.train()
        while step < c.steps:
            row = mopd_step(model, optimizer, teachers, prompts, c, step, tok, decode)
            dt = row.pop("step_s")
            step, tokens, elapsed = step + 1, tokens + row["response_tokens"], elapsed + dt
            row.update(tokens=tokens, tokens_per_s=row["response_tokens"] / max(dt, 1e-9), elapsed_s=elapsed)
            if eval_prompts and (step % c.every(c.eval_every) == 0 or step == c.steps):
                answers = greedy_answers(
                    model, tok, [r.prompt for r in eval_prompts], c.max_new_tokens, decode
                )
                row["student_exact_match"] = exact_match_by_domain(answers, eval_prompts)
                row["teacher_exact_match"] = info["teacher_exact_match"]
            history.append(row)
            if run is not None:
                run.metrics.write(row)
                if step % c.every(c.checkpoint_every) == 0 or step == c.steps:
                    saved = {"step": step, "tokens": tokens, "elapsed_s": elapsed, "mopd": info}
                    last = _save(run, model, optimizer, saved, c, tokenizer_file)
            if on_step is not None:
                on_step(row)
    finally:
        if run is not None:
            run.metrics.close()
            run.lock.release()
    return MOPDResult(
        run.run_dir if run else None,
        step,
        last,
        history,
        info["teacher_exact_match"],
        info.get("student_exact_match_before", {}),
    )


# ---------------------------------------------------------------------------------------------
# A spec's mopd stage inside `lmspec train`
# ---------------------------------------------------------------------------------------------

# Every HELD_OUT-th prompt record is held out of training and graded greedily (exact match per domain).
HELD_OUT = 10


def stage_config(stage: Any, sched: Any, *, steps: int, seed: int, grad_clip: float | None) -> MOPDConfig:
    """The MOPDConfig of one step of a spec's mopd ``stage`` (its fields, the schedule's LR and batch).

    The stage's batch size counts rollouts: ``batch_size // rollouts_per_prompt`` prompts per step.
    """
    group = stage.rollouts_per_prompt
    return MOPDConfig(
        steps=steps,
        prompts_per_step=max(1, sched.batch_size // group),
        rollouts_per_prompt=group,
        alpha=stage.alpha if stage.alpha is not None else 0.0,
        eps_low=stage.eps_low,
        eps_high=stage.eps_high,
        max_new_tokens=stage.max_new_tokens,
        temperature=stage.temperature if stage.temperature is not None else 1.0,
        lr=sched.lr,
        grad_clip=grad_clip,
        seed=seed,
    )


def stage_teacher_sources(spec: Any, run_dir: Path, stage: int) -> dict[str, str | Path | dict[str, str]]:
    """Each domain's teacher of mopd stage ``stage``: a directory (an earlier stage's is
    ``RUN/stages/NAME``) or ``{"url": ...}``."""
    from lmspec.train.stages import source_dir

    training = spec.training
    out: dict[str, str | Path | dict[str, str]] = {}
    for domain in training.stages[stage].teachers:
        source = training.teacher_source(stage, domain)
        out[domain] = {"url": source[1]} if source[0] == "url" else source_dir(run_dir, source)
    return out


def chat_prompts(records: Sequence[PromptRecord], chat_template: str) -> list[PromptRecord]:
    """``records`` with each prompt rendered as a user turn of the spec's chat template (``render_prompt``):
    a mopd stage's student and teachers see a prompt as they are served it and as sft trained them."""
    from lmspec.train.sft import compile_template, render_prompt

    template = compile_template(chat_template)
    return [replace(r, prompt=render_prompt(template, r.prompt)) for r in records]


def _stage_teachers(trainer: Any, stage: int) -> dict[str, Teacher]:
    vocab = trainer.spec.model.vocab_size
    teachers: dict[str, Teacher] = {}
    for domain, source in stage_teacher_sources(trainer.spec, trainer.run_dir, stage).items():
        teacher = load_teacher(
            domain, source, decode=trainer.config.decode, device=trainer.d.device, backend=trainer.backend
        )
        theirs = getattr(getattr(teacher, "model", None), "spec", None)
        if theirs is not None and theirs.model.vocab_size != vocab:
            raise UsageError(
                f"{trainer.spec.training.stages[stage].name}: teacher {domain} has vocab {theirs.model.vocab_size} but the student {vocab}"
            )
        teachers[domain] = teacher
    return teachers


def _enter_rope(trainer: Any, sched: Any) -> None:
    """Set the stage's RoPE thetas on the student, as the trainer's own step does at a stage switch.

    The weights a mopd stage starts from (``init_from``) come in through ``load_state_dict``, which
    carries no theta: without this the student would decode and train at whatever theta the model held
    before (the spec's base theta when the mopd stage is the run's first), not the one it was trained at.
    """
    if sched.rope_theta == trainer.theta:
        return
    model = trainer.model
    model.set_rope_theta({k: t for k, t in sched.rope_theta.items() if k in model.rope_thetas()})
    trainer.theta = dict(sched.rope_theta)
    trainer.reporter.stage(sched)


def run_stage(trainer: Any, stage: int) -> None:
    """Run stage ``stage`` (kind mopd) of ``trainer``'s spec from where its counters are to its end.

    Each step counts the schedule's ``batch_size · seq_len`` tokens, as every stage does, so the stage
    ends where the schedule says; rollout seeds and prompts follow the run's step count, so a run
    resumed from a checkpoint inside the stage draws what the uninterrupted one drew.
    """
    from lmspec.train.schedule import schedule_at, stage_bounds
    from lmspec.train.tasks import read_prompt_records

    spec, model, optimizer = trainer.spec, trainer.model, trainer.optimizer
    decode = trainer.config.decode
    st = spec.training.stages[stage]
    records = chat_prompts(read_prompt_records(st.prompts), spec.serving.chat_template)
    evals, prompts = records[::HELD_OUT], [r for i, r in enumerate(records) if i % HELD_OUT] or records
    teachers = _stage_teachers(trainer, stage)
    tok = trainer.corpus.tokenizer
    end = stage_bounds(spec)[stage][1]
    seed, grad_clip = spec.training.seed, spec.training.grad_clip
    first = schedule_at(spec, trainer.tokens)
    _enter_rope(trainer, first)
    probe = stage_config(st, first, steps=1, seed=seed, grad_clip=grad_clip)
    info = {"teacher_exact_match": _exact_match_rows(model, teachers, evals, probe, tok, decode)[1]}
    trainer.reporter.log(
        f"{st.name}: mopd, teachers {sorted(teachers)}, teacher exact match {info['teacher_exact_match']}"
    )
    while trainer.tokens < end:
        sched = schedule_at(spec, trainer.tokens)
        c = stage_config(st, sched, steps=trainer.steps + 1, seed=seed, grad_clip=grad_clip)
        row = mopd_step(model, optimizer, teachers, prompts, c, trainer.steps, tok, decode)
        dt = row.pop("step_s")
        trainer.steps += 1
        trainer.tokens += sched.batch_size * sched.seq_len
        trainer.elapsed += dt
        done = trainer.tokens >= end
        row.update(
            step=trainer.steps,
            tokens=trainer.tokens,
            stage=sched.stage_name,
            stage_index=sched.stage,
            kind="mopd",
            batch_size=sched.batch_size,
            seq_len=sched.seq_len,
            elapsed_s=trainer.elapsed,
            tokens_per_s=row["response_tokens"] / max(dt, 1e-9),
        )
        if evals and (trainer.steps % trainer.eval_every == 0 or done):
            answers = greedy_answers(model, tok, [r.prompt for r in evals], c.max_new_tokens, decode)
            row["student_exact_match"] = exact_match_by_domain(answers, evals)
            row["teacher_exact_match"] = info["teacher_exact_match"]
        if trainer.metrics is not None:
            trainer.metrics.write(row)
        trainer.history.append(row)
        trainer.last = row
        trainer.reporter.update(row)
        if trainer.steps % trainer.checkpoint_every == 0 or done:
            trainer.checkpoint()
