"""Training data: documents in, packed token sequences out, with an exact, resumable position.

- `read_documents(paths)` reads text files, globs, directories and JSONL (`text` field); with no paths it
  returns the embedded default corpus: this Python's own standard library sources (`*.py`, sorted by path,
  capped at `DEFAULT_CORPUS_BYTES`), so `lmspec train` runs with no data argument and no download.
- `Corpus` holds out every `HOLDOUT_EVERY`-th document, shuffles the rest once with the run's seed and
  concatenates them (with the tokenizer's end-of-text token between documents, when it has one) into one
  token stream.
- `TokenStream` cuts that stream into sequences of any length: a sequence of length L reads L + 1 tokens
  (inputs and their next-token labels) and advances the position by L. The position is one integer, so it
  is the whole data state of a checkpoint; the stream wraps around when it runs out.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmspec.files import not_regular
from lmspec.runtime.tokenizer import Tokenizer

DEFAULT_CORPUS_BYTES = 4_000_000
HOLDOUT_EVERY = 25
_SKIP_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__"}


@dataclass(frozen=True)
class Document:
    name: str
    text: str


def default_corpus(max_bytes: int = DEFAULT_CORPUS_BYTES) -> list[Document]:
    """The standard library's `*.py` sources, sorted by relative path, up to `max_bytes` of text."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        (p for p in root.rglob("*.py") if not _SKIP_DIRS.intersection(p.relative_to(root).parts[:-1])),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    docs, total = [], 0
    for p in files:
        text = p.read_text(encoding="utf-8", errors="replace")
        if total + len(text) > max_bytes:
            break
        docs.append(Document(p.relative_to(root).as_posix(), text))
        total += len(text)
    return docs


def _usage(msg: str) -> Exception:
    from lmspec.errors import UsageError

    return UsageError(msg)


def _read_jsonl(path: Path) -> list[Document]:
    docs = []
    with path.open(encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise _usage(f"{path}:{n}: not JSON ({e.msg})") from None
            except RecursionError:
                raise _usage(f"{path}:{n}: not JSON (nested too deeply)") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise _usage(f"{path}:{n}: expected an object with a string field 'text'")
            docs.append(Document(f"{path}:{n}", row["text"]))
    return docs


def regular_file_problem(path: str | Path) -> str | None:
    """Why `path` is not a readable regular file ("a FIFO", "no such file", ...), or None when it is one.

    Asked before opening anything: reading /dev/zero never ends and opening a FIFO blocks until a writer
    comes, so anything but a regular file is refused by what it is, without a read.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "no such file"
    except OSError as e:
        return e.strerror or type(e).__name__
    kind = not_regular(mode)
    return None if kind is None else f"{kind}, not a regular file"


def _data_files(spec: str) -> list[Path]:
    """The regular files one `--data` argument names: a file, a glob, or every regular file under a folder."""
    matches = sorted(glob.glob(spec, recursive=True)) if glob.has_magic(spec) else [spec]
    if not matches:
        raise _usage(f"--data: no file matches {spec}")
    files: list[Path] = []
    for m in matches:
        p = Path(m)
        if p.is_dir():
            # FIFOs, devices and sockets under a folder are skipped by what they are, never opened.
            found = sorted(q for q in p.rglob("*") if regular_file_problem(q) is None)
            if not found and not glob.has_magic(spec):
                raise _usage(f"--data {m}: no regular file under this folder")
            files.extend(found)
            continue
        problem = regular_file_problem(p)
        if problem is not None:
            raise _usage(f"--data {m}: {problem}")
        files.append(p)
    return files


def read_documents(paths: list[str] | tuple[str, ...] | None) -> list[Document]:
    """Documents from files, globs, directories (every regular file below, sorted) and JSONL; none → default."""
    if not paths:
        return default_corpus()
    files = [f for spec in paths for f in _data_files(spec)]
    docs: list[Document] = []
    for p in files:
        try:
            if p.suffix == ".jsonl":
                docs.extend(_read_jsonl(p))
            else:
                docs.append(Document(str(p), p.read_text(encoding="utf-8", errors="replace")))
        except OSError as e:
            raise _usage(f"--data {p}: {e.strerror or type(e).__name__}") from None
    docs = [d for d in docs if d.text]
    if len(docs) < 2:
        raise _usage(f"--data: need at least 2 non-empty documents (one is held out), got {len(docs)}")
    return docs


def _encode(tokenizer: Tokenizer, docs: list[Document]) -> np.ndarray:
    parts = []
    for d in docs:
        parts.append(np.asarray(tokenizer.encode(d.text), dtype=np.int64))
        if tokenizer.eos_id is not None:
            parts.append(np.asarray([tokenizer.eos_id], dtype=np.int64))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


class TokenStream:
    """An endless stream of packed sequences over one token array; `position` is its whole state."""

    def __init__(self, tokens: np.ndarray, position: int = 0) -> None:
        if len(tokens) < 2:
            raise _usage("the data has fewer than 2 tokens")
        self.tokens = tokens
        self.position = position

    def take(self, batch_size: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels), each (batch_size, seq_len) int64; labels[:, t] = inputs[:, t + 1]."""
        starts = self.position + seq_len * np.arange(batch_size)[:, None]
        idx = starts + np.arange(seq_len + 1)[None, :]  # (B, L + 1)
        window = np.take(self.tokens, idx, mode="wrap")
        self.position += batch_size * seq_len
        t = torch.from_numpy(window)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()

    @property
    def epoch(self) -> float:
        return self.position / len(self.tokens)


class Corpus:
    """Tokenized train and held-out streams of a document set."""

    def __init__(self, docs: list[Document], tokenizer: Tokenizer, *, seed: int = 0) -> None:
        held = [d for i, d in enumerate(docs) if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1]
        train = [d for i, d in enumerate(docs) if i % HOLDOUT_EVERY != HOLDOUT_EVERY - 1]
        if not held:  # fewer than HOLDOUT_EVERY documents: hold out the last one
            held, train = train[-1:], train[:-1]
        order = np.random.default_rng(seed).permutation(len(train))
        self.train_docs = [train[i] for i in order]
        self.val_docs = held
        self.tokenizer = tokenizer
        self.train_tokens = _encode(tokenizer, self.train_docs)
        self.val_tokens = _encode(tokenizer, self.val_docs)
        h = hashlib.sha256()
        for d in docs:
            h.update(d.name.encode())
            h.update(hashlib.sha256(d.text.encode("utf-8", errors="replace")).digest())
        h.update(tokenizer.name.encode())
        self.fingerprint = h.hexdigest()[:16]

    def describe(self) -> str:
        return (
            f"{len(self.train_docs)} train / {len(self.val_docs)} held-out documents, "
            f"{len(self.train_tokens) / 1e6:.2f}M / {len(self.val_tokens) / 1e3:.0f}K tokens "
            f"({self.tokenizer.name} tokenizer)"
        )

    def val_set(self, seq_len: int, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Non-overlapping held-out sequences (no wrap-around), about `max_tokens` tokens in all."""
        usable = len(self.val_tokens) - 1
        seq_len = min(seq_len, usable)
        n = max(1, min(max_tokens, usable) // seq_len)
        stream = TokenStream(self.val_tokens)
        return stream.take(n, seq_len)

    def unigram_bpb(self, labels: torch.Tensor) -> float:
        """Bits per byte of an add-one unigram model fitted on the train stream, scored on `labels`."""
        vocab = self.tokenizer.vocab_size
        counts = np.bincount(self.train_tokens, minlength=vocab).astype(np.float64) + 1.0
        logp = np.log2(counts / counts.sum())
        y = labels.reshape(-1).numpy()
        return float(-logp[y].sum() / self.token_bytes(labels))

    def token_bytes(self, labels: torch.Tensor) -> int:
        """UTF-8 bytes the label tokens stand for: the denominator of bits per byte."""
        return int(self.tokenizer.token_bytes[labels.reshape(-1).numpy()].sum())


def bits_per_byte(total_nats: float, n_bytes: int) -> float:
    return total_nats / math.log(2) / max(n_bytes, 1)
