"""Documents, packing, the held-out split and the resumable stream position."""

import json

import numpy as np
import pytest
import torch

from lmspec.errors import UsageError
from lmspec.runtime.tokenizer import ByteTokenizer
from lmspec.train.data import Corpus, Document, TokenStream, default_corpus, read_documents


def test_default_corpus_is_the_sorted_stdlib_and_capped():
    docs = default_corpus(max_bytes=300_000)
    names = [d.name for d in docs]
    assert names == sorted(names) and all(n.endswith(".py") for n in names)
    assert 0 < sum(len(d.text) for d in docs) <= 300_000
    assert default_corpus(max_bytes=300_000) == docs  # deterministic


def test_stream_packs_next_token_labels_and_resumes_exactly():
    tokens = np.arange(100, dtype=np.int64)
    s = TokenStream(tokens)
    x, y = s.take(3, 8)
    assert x.shape == y.shape == (3, 8)
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(x[1, :1], torch.tensor([8]))
    a = TokenStream(tokens, position=s.position)
    b1, b2 = s.take(5, 8), a.take(5, 8)
    assert all(torch.equal(p, q) for p, q in zip(b1, b2, strict=True))
    assert s.position == 64 and s.epoch == 0.64
    x, _ = s.take(10, 8)  # runs past the end: wraps around
    assert x[-1, -1].item() == (64 + 79) % 100


def test_held_out_documents_never_reach_training(tmp_path):
    docs = [Document(f"d{i}", f"<doc {i}>" + "x" * 50) for i in range(60)]
    c = Corpus(docs, ByteTokenizer(), seed=3)
    held = {d.name for d in c.val_docs}
    assert held == {"d24", "d49"}
    train_text = bytes(c.train_tokens.astype(np.uint8)).decode()
    assert "<doc 24>" not in train_text and "<doc 3>" in train_text
    # A different seed shuffles the training order but not the split.
    c2 = Corpus(docs, ByteTokenizer(), seed=4)
    assert {d.name for d in c2.val_docs} == held and c2.fingerprint == c.fingerprint
    assert not np.array_equal(c.train_tokens, c2.train_tokens)


def test_unigram_baseline_and_bytes(tmp_path):
    docs = [Document(f"d{i}", "ab" * 2000) for i in range(30)]
    c = Corpus(docs, ByteTokenizer())
    x, y = c.val_set(16, 64)
    assert y.shape[1] == 16 and c.token_bytes(y) == y.numel()
    assert c.unigram_bpb(y) == pytest.approx(1.0, abs=0.01)  # two equally likely bytes: one bit each


def test_read_documents_files_globs_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "b.txt").write_text("beta")
    (tmp_path / "c.jsonl").write_text(
        json.dumps({"text": "gamma"}) + "\n\n" + json.dumps({"text": "delta"}) + "\n"
    )
    docs = read_documents([str(tmp_path / "*.txt"), str(tmp_path / "c.jsonl")])
    assert [d.text for d in docs] == ["alpha", "beta", "gamma", "delta"]
    assert [d.text for d in read_documents([str(tmp_path)])][:2] == ["alpha", "beta"]


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: None, "no file matches"),
        (lambda p: (p / "x.jsonl").write_text("{not json\n"), "not JSON"),
        (lambda p: (p / "x.jsonl").write_text('{"content": "no text"}\n'), "field 'text'"),
        (lambda p: (p / "x.txt").write_text("only one"), "at least 2"),
    ],
)
def test_bad_data_is_one_clear_usage_error(tmp_path, setup, message):
    setup(tmp_path)
    with pytest.raises(UsageError, match=message):
        read_documents([str(tmp_path / "x.*")])
