"""Synthetic post-training tasks with checkable answers, and the verifiers that grade them.

Two domains, generated here from a seed (nothing is downloaded), written for the byte tokenizer:

| domain | prompt | completion |
|---|---|---|
| ``addition`` | ``"417+38="`` | ``"455\\n"`` |
| ``reversal`` | ``"rev kqzt="`` | ``"tzqk\\n"`` |

A record is ``{"prompt", "completion", "domain", "answer"}``: ``prompt``/``completion`` is what SFT trains
on, ``prompt``/``domain``/``answer`` what an MOPD stage samples and grades. A completion ends at its first
newline; ``exact_match`` compares the text before it with the answer.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from lmspec.errors import UsageError

__all__ = [
    "DOMAINS",
    "VERIFIERS",
    "PromptRecord",
    "exact_match",
    "make_records",
    "read_prompt_records",
    "verifier_for",
    "write_records",
]

DOMAINS = ("addition", "reversal")
STOP = "\n"  # a completion's end
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class PromptRecord:
    """One prompt of an MOPD stage: its text, the domain (which teacher grades it) and the checkable answer."""

    prompt: str
    domain: str
    answer: str


def _addition(rng: random.Random, digits: int) -> tuple[str, str]:
    a, b = (rng.randrange(10 ** rng.randint(1, digits)) for _ in range(2))
    return f"{a}+{b}=", str(a + b)


def _reversal(rng: random.Random, length: int) -> tuple[str, str]:
    word = "".join(rng.choice(_LETTERS) for _ in range(rng.randint(2, length)))
    return f"rev {word}=", word[::-1]


def make_records(domain: str, n: int, *, seed: int, size: int | None = None) -> list[dict[str, str]]:
    """``n`` records of ``domain``, the same for the same seed. ``size``: at most this many digits per
    addend (default 3) or letters per word (default 6)."""
    makers = {"addition": (_addition, 3), "reversal": (_reversal, 6)}
    if domain not in makers:
        raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")
    make, default = makers[domain]
    # The domain's name is part of the seed, so two domains with one seed are independent streams.
    rng = random.Random(f"{domain}:{seed}")
    out = []
    for _ in range(n):
        prompt, answer = make(rng, size or default)
        out.append({"prompt": prompt, "completion": answer + STOP, "domain": domain, "answer": answer})
    return out


def write_records(path: str | Path, records: Iterable[dict[str, str]]) -> Path:
    """One JSON object per line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records), encoding="utf-8")
    return path


def read_prompt_records(path: str | Path) -> list[PromptRecord]:
    """An MOPD prompts file (JSONL with string ``prompt``, ``domain`` and ``answer``); UsageError at a bad line."""
    path = Path(path)
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}:{n}: not JSON ({e.msg})") from None
        fields = ("prompt", "domain", "answer")
        if not isinstance(obj, dict) or not all(isinstance(obj.get(k), str) for k in fields):
            raise UsageError(f"{path}:{n}: expected an object with string prompt, domain and answer")
        if not obj["prompt"]:
            raise UsageError(f"{path}:{n}: prompt: expected at least one character, got ''")
        records.append(PromptRecord(obj["prompt"], obj["domain"], obj["answer"]))
    if not records:
        raise UsageError(f"{path}: holds no prompt records")
    return records


def exact_match(completion: str, answer: str) -> float:
    """1.0 when the completion's text before its first newline is the answer, else 0.0."""
    return 1.0 if completion.split(STOP, 1)[0] == answer else 0.0


# Outcome verifiers by domain: (completion text, reference answer) -> reward in [0, 1].
VERIFIERS: dict[str, Callable[[str, str], float]] = {"addition": exact_match, "reversal": exact_match}


def verifier_for(domain: str) -> Callable[[str, str], float]:
    """The domain's verifier; exact match for a domain without its own."""
    return VERIFIERS.get(domain, exact_match)
