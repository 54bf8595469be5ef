"""Byte and BPE tokenizers, the vocab check and `lmspec tokenizer train`."""

import pytest

from lmspec.cli import main
from lmspec.errors import UsageError
from lmspec.runtime.tokenizer import ByteTokenizer, check_vocab, load_tokenizer, train_bpe

TEXT = ["def f(x):\n    return x + 1\n", "héllo wörld ✓\n", "class A:\n    pass\n"] * 20


def test_byte_tokenizer_round_trips_any_text():
    tok = ByteTokenizer()
    for t in TEXT[:3]:
        ids = tok.encode(t)
        assert max(ids) < 256 and tok.decode(ids) == t and len(ids) == len(t.encode())


def test_bpe_round_trips_and_counts_bytes(tmp_path):
    tok = train_bpe(TEXT, 300, tmp_path / "tok.json")
    assert tok.vocab_size <= 300 and tok.eos_id is not None
    for t in TEXT[:3]:
        ids = tok.encode(t)
        assert tok.decode(ids) == t
        assert int(tok.token_bytes[ids].sum()) == len(t.encode())
        assert len(ids) < len(t.encode())
    assert tok.token_bytes[tok.eos_id] == 0
    assert load_tokenizer(tmp_path / "tok.json").encode(TEXT[0]) == tok.encode(TEXT[0])


def test_vocab_check_names_the_fix(tmp_path):
    tok = train_bpe(TEXT, 300, tmp_path / "tok.json")
    check_vocab(tok, 300)
    with pytest.raises(UsageError, match=r"--set model.vocab_size=\d+"):
        check_vocab(tok, 256)
    with pytest.raises(UsageError, match="no such file"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(UsageError, match="not a tokenizers JSON"):
        load_tokenizer(tmp_path / "bad.json")


def test_tokenizer_command(tmp_path, capsys):
    for i, t in enumerate(TEXT[:3]):
        (tmp_path / f"{i}.txt").write_text(t * 5)
    out = tmp_path / "tok.json"
    assert (
        main(["tokenizer", "train", "--data", str(tmp_path / "*.txt"), "--vocab-size", "280", "-o", str(out)])
        == 0
    )
    assert out.is_file() and "280 tokens" in capsys.readouterr().out
    assert (
        main(["tokenizer", "train", "--data", str(tmp_path / "*.txt"), "--vocab-size", "10", "-o", str(out)])
        == 2
    )
