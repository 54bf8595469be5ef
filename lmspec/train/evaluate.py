"""`lmspec eval RUN`: what a trained model can do at the lengths its schedule claims.

Three measurements, each on held-out data and the run's own tokenizer, all deterministic (a fixed RNG
seed, greedy decisions), so a run evaluated twice gives the same figures:

- **Bits per byte by position bucket.** Held-out sequences of the longest stage's `seq_len`; the
  next-token loss of each position is summed into buckets whose edges are the stages' sequence
  lengths and halvings of the longest (`0 64 128 256 512` for the tiny spec), and divided by the
  bytes the labels stand for. `beyond` pools every position past the first stage's `seq_len`: what
  the long-context stage is there to improve.
- **Passkey retrieval** (needle in a haystack, scaled down). A sequence of `length` tokens of
  held-out text holds, at `depth` (0 = start, 1 = end) of it, the sentence `The pass key is 48213.
  Remember it. 48213 is the pass key.`, and ends with `What is the pass key? The pass key is 48213`.
  Under teacher forcing, the key is *retrieved* when the model's argmax is right at every key token,
  which is exactly when greedy decoding after the question would write the key; `token_accuracy`
  is the share of key tokens whose argmax is right (chance is about 1 in 10 per digit). A random
  5-digit key per trial; `trials` sequences per length x depth.
- **MTP acceptance length** at draft depths 1..K. Held-out prompts are continued greedily by the
  main model; one teacher-forced forward over each continuation gives every MTP block's prediction,
  and greedy self-speculative decoding is replayed on it: at each verify step the first `d` drafts
  are accepted while each equals the main model's token, and the step yields the accepted drafts + 1
  tokens. Acceptance length = generated tokens / verify steps (1.0 = no draft ever accepted; the
  report's figure is ~3.6 at depth 3 on low-entropy text). It is the figure `lmspec serve` reaches
  with greedy sampling, up to the rounding differences between a cached decode and a full forward.

`evaluate_model` measures a model in memory (the sweep calls it at the end of every run);
`evaluate_run` loads a run's checkpoint, its tokenizer and the held-out documents first.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmspec.errors import UsageError
from lmspec.runtime.tokenizer import TOKENIZER_FILE, Tokenizer, check_vocab, load_tokenizer
from lmspec.spec import Spec
from lmspec.spec.sweep import EvalOptions
from lmspec.train.data import Corpus, bits_per_byte, read_documents

__all__ = [
    "EVAL_FILE",
    "evaluate_model",
    "evaluate_run",
    "format_report",
    "passkey_lengths",
    "position_edges",
    "pre_extension_len",
]

EVAL_FILE = "eval.json"
NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\nWhat is the pass key? The pass key is "
KEY_DIGITS = 5
PASSKEY_SEED = 1234
# Sequences per forward in evaluation; the tiny models' activations at 512 tokens fit many times over.
EVAL_BATCH = 8
MTP_PROMPT_TOKENS = 64


def _longest(spec: Spec) -> int:
    assert spec.training is not None
    return max(s.seq_len for s in spec.training.stages)


def _first(spec: Spec) -> int:
    assert spec.training is not None
    return spec.training.stages[0].seq_len


def position_edges(spec: Spec) -> list[int]:
    """Bucket edges: 0, the stages' sequence lengths, and the longest halved down to an eighth."""
    longest = _longest(spec)
    assert spec.training is not None
    edges = {0, longest, *(s.seq_len for s in spec.training.stages)}
    edges |= {longest // d for d in (2, 4, 8) if longest // d > 0}
    return sorted(edges)


def pre_extension_len(spec: Spec) -> int | None:
    """The longest `seq_len` of the stages before the first one at the longest `seq_len`: what the context
    extension extends from (stages after it, such as a shorter sft stage, extend nothing)."""
    assert spec.training is not None
    stages = spec.training.stages
    first_long = next(i for i, s in enumerate(stages) if s.seq_len == _longest(spec))
    shorter = [s.seq_len for s in stages[:first_long]]
    return max(shorter) if shorter else None


def passkey_lengths(spec: Spec) -> list[int]:
    """Default passkey lengths: the first stage's `seq_len` doubled up to the longest stage's."""
    lengths, n = [], _first(spec)
    while n < _longest(spec):
        lengths.append(n)
        n *= 2
    return [*lengths, _longest(spec)]


def _forward_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).logits.float()  # (B, T, V)


@torch.no_grad()
def position_bpb(
    model: nn.Module,
    corpus: Corpus,
    edges: list[int],
    eval_tokens: int,
    device: torch.device,
    beyond_from: int | None = None,
    masking: bool = False,
) -> dict[str, Any]:
    """Held-out bits per byte of each position bucket [edges[i], edges[i+1]) at seq_len edges[-1], and
    of every position from `beyond_from` on. With `masking` (the run's document masking) the documents
    of each sequence are masked as in training and a token's position is its position in its document."""
    seq_len = edges[-1]
    batch = corpus.val_batch(seq_len, max(eval_tokens, seq_len), masking=masking)
    inputs, labels = batch.inputs, batch.labels
    T = inputs.shape[1]  # shorter than seq_len only when the held-out text is
    where = batch.position_ids if batch.position_ids is not None else torch.arange(T).expand_as(inputs)
    nats = torch.zeros(T, dtype=torch.float64)  # by position
    byte_counts = torch.zeros(T, dtype=torch.float64)
    token_bytes = torch.from_numpy(corpus.tokenizer.token_bytes[labels.numpy()]).double()  # (N, T)
    for s in range(0, inputs.shape[0], EVAL_BATCH):
        rows = slice(s, s + EVAL_BATCH)
        x, y = inputs[rows].to(device), labels[rows].to(device)
        logits = model(x, **batch.model_inputs(rows, device)).logits.float()  # (b, T, V)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")
        nats.index_add_(0, where[rows].reshape(-1), ce.double().cpu())
        byte_counts.index_add_(0, where[rows].reshape(-1), token_bytes[rows].reshape(-1))

    def bucket(lo: int, hi: int) -> float | None:
        n_bytes = int(byte_counts[min(lo, T) : min(hi, T)].sum())
        return bits_per_byte(float(nats[min(lo, T) : min(hi, T)].sum()), n_bytes) if n_bytes else None

    return {
        "seq_len": T,
        "sequences": int(inputs.shape[0]),
        "edges": edges,
        "bpb": [bucket(lo, hi) for lo, hi in zip(edges, edges[1:], strict=False)],
        "beyond_from": beyond_from,
        "beyond": bucket(beyond_from, T) if beyond_from is not None else None,
    }


def _answer_tokens(tok: Tokenizer, key: str) -> tuple[list[int], list[int]]:
    """(question tokens, key tokens) as the tokenizer splits the question followed by the key."""
    question = tok.encode(QUESTION)
    both = tok.encode(QUESTION + key)
    common = 0
    while common < min(len(question), len(both)) and question[common] == both[common]:
        common += 1
    return both[:common], both[common:]


def _passkey_sequence(
    tok: Tokenizer, filler: np.ndarray, length: int, depth: float, key: str, offset: int
) -> tuple[list[int], int, int] | None:
    """Token ids of one passkey sequence and the [start, end) of the key tokens after the question."""
    needle = tok.encode(NEEDLE.format(key=key))
    question, answer = _answer_tokens(tok, key)
    room = length - len(needle) - len(question) - len(answer)
    if room < 0 or not answer:
        return None
    text = np.take(filler, np.arange(offset, offset + room), mode="wrap").tolist()
    at = round(depth * room)
    ids = text[:at] + needle + text[at:] + question + answer
    return ids, len(ids) - len(answer), len(ids)


@torch.no_grad()
def passkey(
    model: nn.Module,
    corpus: Corpus,
    lengths: list[int],
    depths: list[float],
    trials: int,
    device: torch.device,
) -> dict[str, Any]:
    """Retrieval (all key tokens right) and per-token accuracy, by length x depth."""
    rng = np.random.default_rng(PASSKEY_SEED)
    tok, filler = corpus.tokenizer, corpus.val_tokens
    exact = [[None] * len(depths) for _ in lengths]
    token_acc = [[None] * len(depths) for _ in lengths]
    for li, length in enumerate(lengths):
        for di, depth in enumerate(depths):
            made = []
            for _ in range(trials):
                key = "".join(str(d) for d in rng.integers(0, 10, KEY_DIGITS))
                seq = _passkey_sequence(tok, filler, length, depth, key, int(rng.integers(0, len(filler))))
                if seq is not None:
                    made.append(seq)
            if not made:
                continue
            hits = _key_hits(model, made, device)
            exact[li][di] = float(np.mean([h.all() for h in hits]))
            token_acc[li][di] = float(np.mean(np.concatenate(hits)))
    return {
        "lengths": lengths,
        "depths": depths,
        "trials": trials,
        "exact": exact,
        "token_accuracy": token_acc,
        "mean_exact": _mean(exact),
        "mean_token_accuracy": _mean(token_acc),
    }


def _key_hits(
    model: nn.Module, made: list[tuple[list[int], int, int]], device: torch.device
) -> list[np.ndarray]:
    """For each sequence, whether the argmax at each key token is that token (teacher forcing)."""
    out = []
    for s in range(0, len(made), EVAL_BATCH):
        chunk = made[s : s + EVAL_BATCH]
        width = max(len(ids) for ids, _, _ in chunk)
        # Sequences of one length x depth have the same length except where the tokenizer merges
        # differently; left-pad with token 0 is never looked at (the key is at the right end).
        x = torch.tensor([[0] * (width - len(ids)) + ids for ids, _, _ in chunk], dtype=torch.long)
        pred = _forward_logits(model, x[:, :-1].to(device)).argmax(-1).cpu()  # (b, width - 1)
        for row, (ids, start, end) in enumerate(chunk):
            pad = width - len(ids)
            got = pred[row, pad + start - 1 : pad + end - 1]
            out.append((got == torch.tensor(ids[start:end])).numpy())
    return out


def _mean(table: list[list[float | None]]) -> float | None:
    values = [v for row in table for v in row if v is not None]
    return float(np.mean(values)) if values else None


@torch.no_grad()
def _greedy(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """`ids` (P, T) continued by `new_tokens` greedy tokens of the main model (full forward per token)."""
    for _ in range(new_tokens):
        nxt = model(ids, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


def _replay(hits: np.ndarray, start: int, end: int, depth: int) -> tuple[int, int]:
    """(tokens, verify steps) of greedy speculative decoding over positions [start, end).

    hits[k - 1, t]: block k's draft at position t equals the token at t + k + 1.
    """
    t, tokens, steps = start, 0, 0
    while t + 1 < end:
        accepted = 0
        while accepted < depth and t + accepted + 2 < end and hits[accepted, t]:
            accepted += 1
        tokens += accepted + 1
        steps += 1
        t += accepted + 1
    return tokens, steps


def _acceptance(model: nn.Module, seq: torch.Tensor, start: int, depth: int) -> list[float]:
    """Acceptance length at depths 1..`depth` of speculative decoding that writes `seq` from `start` on:
    a draft is accepted while it equals the next token of `seq` (one forward with every MTP block)."""
    out = model(seq, return_mtp=True)
    P, T = seq.shape
    hits = np.zeros((P, depth, T), dtype=bool)
    for k, logits in enumerate(out.mtp_logits, start=1):
        pred = logits.argmax(-1)  # (P, T): block k at t predicts the token at t + k + 1
        hits[:, k - 1, : T - k - 1] = (pred[:, : T - k - 1] == seq[:, k + 1 :]).cpu().numpy()
    lengths = []
    for d in range(1, depth + 1):
        tokens = steps = 0
        for p in range(P):
            n, s = _replay(hits[p], start, T, d)
            tokens, steps = tokens + n, steps + s
        lengths.append(tokens / max(steps, 1))
    return lengths


@torch.no_grad()
def mtp_acceptance(
    model: nn.Module, corpus: Corpus, prompts: int, new_tokens: int, device: torch.device
) -> dict[str, Any] | None:
    """MTP acceptance length at depths 1..K (None without MTP blocks), two ways:

    - `acceptance_length`: greedy self-speculation, the main model's own greedy continuation of held-out
      prompts (what `lmspec serve` reaches at temperature 0; a small model's greedy text repeats itself,
      which makes drafting easy);
    - `acceptance_length_text`: the held-out text's own continuation taken as what is being written,
      drafts accepted while they equal it (how far ahead the MTP blocks predict real text).
    """
    depth = getattr(model, "num_mtp_blocks", 0)
    if depth == 0:
        return None
    prompt_len = MTP_PROMPT_TOKENS
    val = corpus.val_tokens
    starts = np.linspace(0, max(len(val) - prompt_len - new_tokens - 1, 0), prompts).astype(np.int64)
    text = torch.tensor(
        np.stack([np.take(val, np.arange(s, s + prompt_len + new_tokens), mode="wrap") for s in starts])
    ).to(device)
    greedy = _greedy(model, text[:, :prompt_len], new_tokens)
    return {
        "depths": list(range(1, depth + 1)),
        "acceptance_length": _acceptance(model, greedy, prompt_len - 1, depth),
        "acceptance_length_text": _acceptance(model, text, prompt_len - 1, depth),
        "prompts": prompts,
        "new_tokens": new_tokens,
    }


def evaluate_model(
    model: nn.Module,
    spec: Spec,
    corpus: Corpus,
    options: EvalOptions | None = None,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """All three measurements of `model` (left in the mode it was in)."""
    options = options or EvalOptions()
    device = device or next(model.parameters()).device
    if spec.training is None:
        raise UsageError(f"spec {spec.name!r} has no training section: no sequence lengths to evaluate at")
    was_training = model.training
    model.eval()
    try:
        lengths = options.passkey_lengths or passkey_lengths(spec)
        too_long = [n for n in lengths if n > spec.model.max_position_embeddings]
        if too_long:
            raise UsageError(
                f"passkey length {too_long[0]}: above model.max_position_embeddings "
                f"({spec.model.max_position_embeddings})"
            )
        return {
            "position_bpb": position_bpb(
                model,
                corpus,
                position_edges(spec),
                options.eval_tokens,
                device,
                pre_extension_len(spec),
                masking=spec.training.document_masking,
            ),
            "passkey": passkey(
                model, corpus, lengths, list(options.passkey_depths), options.passkey_trials, device
            ),
            "mtp": mtp_acceptance(model, corpus, options.mtp_prompts, options.mtp_new_tokens, device),
            "rope_theta": dict(model.rope_thetas()) if hasattr(model, "rope_thetas") else None,
        }
    finally:
        model.train(was_training)


def _checkpoint_dir(run: Path, checkpoint: str | None) -> Path:
    from lmspec.runtime.checkpoint import resolve_checkpoint

    if checkpoint is None:
        return resolve_checkpoint(run)
    for candidate in (Path(checkpoint), run / "checkpoints" / checkpoint, run / "stages" / checkpoint):
        if (candidate / "model.safetensors").is_file():
            return candidate
    raise UsageError(
        f"--checkpoint {checkpoint}: no model.safetensors there, under {run}/checkpoints or {run}/stages"
    )


def evaluate_run(
    run: str | Path,
    *,
    checkpoint: str | None = None,
    data: list[str] | None = None,
    options: EvalOptions | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Load a run's checkpoint (default: the newest), its tokenizer and held-out data; evaluate."""
    import lmspec

    run = Path(run)
    ckpt = _checkpoint_dir(run, checkpoint)
    dev = torch.device(device or "cpu")
    model = lmspec.from_pretrained(ckpt, device=dev)
    spec: Spec = model.spec
    if spec.training is None and (run / "spec.yaml").is_file():
        from lmspec.spec import load_spec

        spec = load_spec(run / "spec.yaml")
    tok_file = ckpt / TOKENIZER_FILE
    tok = load_tokenizer(tok_file if tok_file.is_file() else None)
    check_vocab(tok, spec.model.vocab_size)
    seed = spec.training.seed if spec.training is not None else 0
    corpus = Corpus(read_documents(data), tok, seed=seed)
    report = evaluate_model(model, spec, corpus, options, dev)
    return {"run": str(run), "checkpoint": str(ckpt), "tokenizer": tok.name, **report}


def write_report(report: dict[str, Any], path: str | Path) -> Path:
    from lmspec.runtime.checkpoint import write_text_atomic

    path = Path(path)
    write_text_atomic(path, json.dumps(report, indent=2) + "\n")
    return path


def _fmt(v: float | None, digits: int = 3) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def format_report(report: dict[str, Any]) -> str:
    """The report as plain-text tables: position buckets, passkey length x depth, MTP acceptance."""
    from rich.console import Console
    from rich.table import Table

    console = Console(record=True, width=110, file=io.StringIO())  # recorded, then exported as text
    pos = report["position_bpb"]
    t = Table(
        title=f"held-out bits/byte by position (seq_len {pos['seq_len']}, {pos['sequences']} sequences)"
    )
    for lo, hi in zip(pos["edges"], pos["edges"][1:], strict=False):
        t.add_column(f"{lo}-{hi}", justify="right")
    beyond = [] if pos["beyond_from"] is None else [_fmt(pos["beyond"])]
    if beyond:
        t.add_column(f">= {pos['beyond_from']}", justify="right")
    t.add_row(*[_fmt(v) for v in pos["bpb"]], *beyond)
    console.print(t)
    pk = report["passkey"]
    t = Table(title=f"passkey retrieval: exact (token accuracy), {pk['trials']} trials per cell")
    t.add_column("length \\ depth")
    for d in pk["depths"]:
        t.add_column(f"{d:g}", justify="right")
    for length, ex, acc in zip(pk["lengths"], pk["exact"], pk["token_accuracy"], strict=True):
        t.add_row(str(length), *[f"{_fmt(e, 2)} ({_fmt(a, 2)})" for e, a in zip(ex, acc, strict=True)])
    console.print(t)
    if report.get("mtp"):
        m = report["mtp"]
        t = Table(title=f"MTP acceptance length ({m['prompts']} prompts x {m['new_tokens']} tokens)")
        for d in m["depths"]:
            t.add_column(f"depth {d}", justify="right")
        t.add_column("")
        t.add_row(*[_fmt(v, 2) for v in m["acceptance_length"]], "greedy continuation")
        if "acceptance_length_text" in m:
            t.add_row(*[_fmt(v, 2) for v in m["acceptance_length_text"]], "held-out text")
        console.print(t)
    return console.export_text()
