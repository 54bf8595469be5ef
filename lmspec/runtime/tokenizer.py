"""Tokenizers: byte-level by default, or a BPE tokenizer trained with Hugging Face `tokenizers`.

Both expose the same small surface (`vocab_size`, `encode`, `decode`, `eos_id`, `token_bytes`), where
`token_bytes[i]` is the number of UTF-8 bytes token i stands for — what bits-per-byte divides by.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import numpy as np

TOKENIZER_FILE = "tokenizer.json"
EOS = "<|endoftext|>"


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eos_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    @property
    def token_bytes(self) -> np.ndarray: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocab 256, no special tokens, lossless for any text."""

    name = "bytes"
    vocab_size = 256
    eos_id: int | None = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    @property
    def token_bytes(self) -> np.ndarray:
        return np.ones(256, dtype=np.int64)


class BPETokenizer:
    """A byte-level BPE `tokenizer.json` (Hugging Face `tokenizers`), with `<|endoftext|>` between documents."""

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self.path = Path(path)
        try:
            self._tok = HFTokenizer.from_file(str(self.path))
        except Exception as e:  # tokenizers raises a bare Exception on unreadable JSON
            from lmspec.errors import UsageError

            raise UsageError(f"{path}: not a tokenizers JSON file ({e})") from None
        self.name = self.path.name
        self.vocab_size = self._tok.get_vocab_size()
        self.eos_id = self._tok.token_to_id(EOS)
        self._bytes: np.ndarray | None = None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def token_bytes(self) -> np.ndarray:
        if self._bytes is None:
            special = {t.content for t in self._tok.get_added_tokens_decoder().values()}
            lengths = np.zeros(self.vocab_size, dtype=np.int64)
            for i in range(self.vocab_size):
                piece = self._tok.id_to_token(i)
                if piece is None or piece in special:
                    continue  # special tokens stand for no text
                lengths[i] = len(self._tok.decode([i]).encode("utf-8"))
            self._bytes = lengths
        return self._bytes


def load_tokenizer(path: str | Path | None) -> Tokenizer:
    """`None` gives the byte tokenizer; a path gives the BPE tokenizer saved there."""
    if path is None:
        return ByteTokenizer()
    p = Path(path)
    if not p.is_file():
        from lmspec.errors import UsageError

        raise UsageError(f"--tokenizer: no such file {path}")
    return BPETokenizer(p)


def check_vocab(tokenizer: Tokenizer, vocab_size: int) -> None:
    """The model's embedding must have a row for every token id."""
    if tokenizer.vocab_size > vocab_size:
        from lmspec.errors import UsageError

        raise UsageError(
            f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} tokens but the spec's model.vocab_size is "
            f"{vocab_size}; train the tokenizer with --vocab-size {vocab_size} or pass "
            f"--set model.vocab_size={tokenizer.vocab_size}"
        )


def train_bpe(texts: Iterable[str], vocab_size: int, output: str | Path) -> BPETokenizer:
    """Train a byte-level BPE with `<|endoftext|>` as its only special token and save it to `output`."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        from lmspec.errors import UsageError

        raise UsageError(f"--vocab-size: expected at least 257 (256 bytes + {EOS}), got {vocab_size}")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out))
    return BPETokenizer(out)
