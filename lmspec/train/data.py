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
- With `training.document_masking`, a `Batch` also carries each token's document (`segment_ids`) and its
  position inside that document's part of the sequence (`position_ids`, restarting at 0 where a document
  starts), so attention stays inside documents and a document computes exactly as if alone.
- With stage `mixture`s over `training.sources` (named shares of the documents), `MixtureStream` draws
  each sequence from one source, in the stage's proportions: sequence n of a stage goes to the source
  furthest behind its share (largest `weight * (n + 1) - drawn`, ties to the first), so after any number
  of sequences every source is within one sequence of its weight. Each source is its own `TokenStream`;
  the positions and the per-stage counts are the stream's state (`position`, JSON) in a checkpoint.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import json
import math
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmspec.files import not_regular
from lmspec.runtime.tokenizer import Tokenizer
from lmspec.spec import Spec
from lmspec.spec.schema import ALL_SOURCE, DataSource

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


def jsonl_rows(path: str | Path, *, errors: str = "replace") -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of every non-blank line of a JSONL file; a line that is not JSON is a
    `UsageError` naming `path:line`. `errors` is how undecodable bytes are read (`strict` raises)."""
    with open(path, encoding="utf-8", errors=errors) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise _usage(f"{path}:{n}: not JSON ({e.msg})") from None
            except RecursionError:
                raise _usage(f"{path}:{n}: not JSON (nested too deeply)") from None


def _read_jsonl(path: Path) -> list[Document]:
    docs = []
    for n, row in jsonl_rows(path):
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


def _encode(tokenizer: Tokenizer, docs: list[Document]) -> tuple[np.ndarray, np.ndarray]:
    """(tokens of every document, end-of-text after each when the tokenizer has one; each one's start)."""
    parts = []
    for d in docs:
        parts.append(np.asarray(tokenizer.encode(d.text), dtype=np.int64))
        if tokenizer.eos_id is not None:
            parts[-1] = np.append(parts[-1], np.int64(tokenizer.eos_id))
    lengths = np.array([len(p) for p in parts], dtype=np.int64)
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1])) if parts else np.zeros(0, dtype=np.int64)
    return (np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)), starts


@dataclass(frozen=True)
class Batch:
    """Packed sequences: inputs and labels (B, L); with document masking, each token's document and its
    position in that document's run of the row (both (B, L) int64)."""

    inputs: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor | None = None
    segment_ids: torch.Tensor | None = None
    source_tokens: dict[str, int] = field(default_factory=dict)

    def model_inputs(self, rows: slice, device: torch.device | str) -> dict[str, torch.Tensor]:
        """The forward's keyword arguments besides input_ids and labels, for `rows` on `device`."""
        if self.segment_ids is None or self.position_ids is None:
            return {}
        return {
            "position_ids": self.position_ids[rows].to(device),
            "segment_ids": self.segment_ids[rows].to(device),
        }


def document_positions(segments: np.ndarray) -> np.ndarray:
    """Position of each token in its document's run of the row: 0 where a row or a document starts."""
    B, L = segments.shape
    t = np.arange(L)[None, :].repeat(B, 0)
    new = np.ones_like(segments, dtype=bool)
    new[:, 1:] = segments[:, 1:] != segments[:, :-1]
    run_start = np.maximum.accumulate(np.where(new, t, 0), axis=1)
    return t - run_start


class TokenStream:
    """An endless stream of packed sequences over one token array; `position` is its whole state.

    `starts` (each document's first token) lets `take_batch` mark documents when `masking` is on.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        position: int = 0,
        *,
        starts: np.ndarray | None = None,
        masking: bool = False,
    ) -> None:
        if len(tokens) < 2:
            raise _usage("the data has fewer than 2 tokens")
        if masking and starts is None:
            raise ValueError("document masking needs the documents' starts")
        self.tokens = tokens
        self.position = position
        self.starts = starts
        self.masking = masking

    def take_batch(self, batch_size: int, seq_len: int, stage: str | None = None) -> Batch:
        """The next `batch_size` sequences of `seq_len` as a `Batch` (`stage` matters to mixtures only)."""
        first = self.position
        inputs, labels = self.take(batch_size, seq_len)
        if not self.masking:
            return Batch(inputs, labels)
        assert self.starts is not None
        idx = first + seq_len * np.arange(batch_size)[:, None] + np.arange(seq_len)[None, :]  # (B, L)
        n = len(self.tokens)
        doc = np.searchsorted(self.starts, idx % n, side="right") - 1
        segments = (idx // n) * len(self.starts) + doc  # a wrapped-around document is another one
        return Batch(
            inputs,
            labels,
            position_ids=torch.from_numpy(document_positions(segments)),
            segment_ids=torch.from_numpy(segments),
        )

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
        self.train_tokens, self.train_starts = _encode(tokenizer, self.train_docs)
        self.val_tokens, self.val_starts = _encode(tokenizer, self.val_docs)
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

    def val_batch(self, seq_len: int, max_tokens: int, *, masking: bool = False) -> Batch:
        """`val_set` as a `Batch`, with the held-out documents marked when `masking`."""
        usable = len(self.val_tokens) - 1
        seq_len = min(seq_len, usable)
        n = max(1, min(max_tokens, usable) // seq_len)
        return TokenStream(self.val_tokens, starts=self.val_starts, masking=masking).take_batch(n, seq_len)

    def source(self, name: str, source: DataSource) -> TokenStream:
        """The training documents of one source, in the corpus's order, as their own stream."""
        pick = [
            i
            for i, d in enumerate(self.train_docs)
            if (source.match is None or fnmatch.fnmatchcase(d.name, source.match))
            and source.min_bytes <= len(d.text.encode("utf-8")) <= (source.max_bytes or math.inf)
        ]
        ends = np.append(self.train_starts[1:], len(self.train_tokens))
        pieces = [self.train_tokens[self.train_starts[i] : ends[i]] for i in pick]
        if not pieces or sum(len(p) for p in pieces) < 2:
            raise _usage(f"training.sources.{name}: no training document matches it")
        lengths = np.array([len(p) for p in pieces], dtype=np.int64)
        starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        return TokenStream(np.concatenate(pieces), starts=starts)

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


class MixtureStream:
    """Sequences from named sources in each stage's proportions (see the module doc); `position` is JSON."""

    def __init__(
        self, streams: dict[str, TokenStream], mixtures: dict[str, dict[str, float]], position: Any = None
    ):
        self.streams = streams
        self.mixtures = mixtures  # stage name -> weights over sources; a stage absent here reads `all`
        state = position if isinstance(position, dict) else {}
        for name, pos in state.get("positions", {}).items():
            self.streams[name].position = int(pos)
        self.drawn: dict[str, dict[str, int]] = {k: dict(v) for k, v in state.get("drawn", {}).items()}

    @property
    def position(self) -> dict[str, Any]:
        return {"positions": {n: s.position for n, s in self.streams.items()}, "drawn": self.drawn}

    def _choose(self, stage: str, count: int) -> list[str]:
        weights = self.mixtures.get(stage, {ALL_SOURCE: 1.0})
        total = math.fsum(weights.values())
        drawn = self.drawn.setdefault(stage, {})
        picks = []
        for _ in range(count):
            n = sum(drawn.values())
            name = max(weights, key=lambda s: weights[s] / total * (n + 1) - drawn.get(s, 0))
            drawn[name] = drawn.get(name, 0) + 1
            picks.append(name)
        return picks

    def take_batch(self, batch_size: int, seq_len: int, stage: str | None = None) -> Batch:
        picks = self._choose(stage or "", batch_size)
        parts = {
            name: self.streams[name].take_batch(picks.count(name), seq_len) for name in dict.fromkeys(picks)
        }
        order = {name: iter(range(picks.count(name))) for name in parts}
        rows = [(parts[name], next(order[name])) for name in picks]  # each row from its source, in turn

        def stack(attr: str) -> torch.Tensor | None:
            got = [getattr(b, attr) for b, _ in rows]
            return (
                None if got[0] is None else torch.stack([g[i] for g, (_, i) in zip(got, rows, strict=True)])
            )

        source_tokens = {name: picks.count(name) * seq_len for name in parts}
        return Batch(
            stack("inputs"), stack("labels"), stack("position_ids"), stack("segment_ids"), source_tokens
        )


def make_stream(corpus: Corpus, spec: Spec, position: Any = 0) -> TokenStream | MixtureStream:
    """The training stream a spec asks for: one stream over every document, or a mixture of sources.

    `position` is a checkpoint's data position (an int for one stream, the mixture's JSON state otherwise).
    """
    training = spec.training
    assert training is not None
    masking = training.document_masking
    mixtures = {s.name: dict(s.mixture) for s in training.stages if s.mixture}
    if not mixtures:
        pos = int(position) if isinstance(position, (int, float)) else 0
        return TokenStream(corpus.train_tokens, position=pos, starts=corpus.train_starts, masking=masking)
    used = {name for m in mixtures.values() for name in m} | {ALL_SOURCE}
    streams = {}
    for name in sorted(used):
        if name == ALL_SOURCE:
            streams[name] = TokenStream(corpus.train_tokens, starts=corpus.train_starts, masking=masking)
        else:
            stream = corpus.source(name, training.sources[name])
            stream.masking = masking
            streams[name] = stream
    return MixtureStream(streams, mixtures, position)
