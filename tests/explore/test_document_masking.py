"""Long context made real: packed documents do not attend to each other (`training.document_masking`), and
stage mixtures draw sequences from named sources in the declared proportions.

The model check is the issue's acceptance test: a document's logits are the same (<= 1e-6) whether or not
another document precedes it in the pack, on the CPU backend (its segment-mask SDPA path), the reference, and
the Triton backend (which hands segment-masked attention to the reference).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import lmspec
from lmspec.errors import SpecError
from lmspec.runtime.ops import cpu
from lmspec.runtime.tokenizer import ByteTokenizer
from lmspec.spec import load_spec
from lmspec.train.data import Corpus, Document, MixtureStream, TokenStream, document_positions, make_stream

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "examples" / "mimo_v2_flash_tiny.yaml"
NOT_TRITON = {"rmsnorm": "cpu", "swiglu": "cpu", "rope": "cpu", "moe": "cpu", "lm_head_ce": "cpu"}


def _pack(*docs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = torch.cat(docs)[None]
    pos = torch.cat([torch.arange(len(d)) for d in docs])[None]
    seg = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    return ids, pos, seg


@pytest.mark.parametrize("backend", ["torch", "reference", "triton"])
def test_a_document_computes_the_same_with_or_without_a_document_before_it(backend):
    pytest.importorskip("triton") if backend == "triton" else None
    torch.manual_seed(0)
    overrides = NOT_TRITON if backend == "triton" else None
    model = lmspec.build(TINY, backend=backend, op_overrides=overrides).eval()
    doc1, doc2 = torch.randint(0, 256, (70,)), torch.randint(0, 256, (96,))
    packed, alone = _pack(doc1, doc2), _pack(doc2)
    before = Counter(cpu.PATH_CALLS)
    with torch.no_grad():
        a = model(packed[0], position_ids=packed[1], segment_ids=packed[2], return_mtp=True)
        b = model(alone[0], position_ids=alone[1], segment_ids=alone[2], return_mtp=True)
        plain = model(packed[0])
    assert (a.logits[:, 70:] - b.logits).abs().max() <= 1e-6
    for ma, mb in zip(a.mtp_logits, b.mtp_logits, strict=True):  # the last k positions see padding
        assert (ma[:, 70:-3] - mb[:, :-3]).abs().max() <= 1e-6
    assert (plain.logits[:, 70:] - b.logits).abs().max() > 1e-2  # without the mask, document 1 leaks in
    if backend == "torch":
        assert (Counter(cpu.PATH_CALLS) - before)["sdpa_segments"] > 0


def test_the_cpu_segment_path_computes_the_reference():
    torch.manual_seed(1)
    B, Hq, Hkv, T = 2, 4, 2, 40
    q, k, v = torch.randn(B, Hq, T, 12), torch.randn(B, Hkv, T, 12), torch.randn(B, Hkv, T, 8)
    sinks = torch.randn(Hq)
    seg = torch.tensor(np.sort(np.random.default_rng(0).integers(0, 4, (B, T)), axis=1))
    pos = torch.from_numpy(document_positions(seg.numpy()))
    for window, s in ((None, None), (7, sinks), (None, sinks), (5, None)):
        kw = {"scale": 0.3, "window_keys": window, "q_pos": pos, "k_pos": pos, "segment_ids": seg}
        got = cpu.attention(q, k, v, s, **kw)
        want = lmspec.runtime.ops.reference.attention(
            q.double(), k.double(), v.double(), s if s is None else s.double(), **kw
        )
        assert (got.double() - want).abs().max() < 1e-5


def test_batches_mark_documents_and_restart_positions():
    tokens = np.arange(20)
    starts = np.array([0, 5, 12])  # documents [0, 5) [5, 12) [12, 20)
    stream = TokenStream(tokens, starts=starts, masking=True)
    b = stream.take_batch(2, 8)
    assert b.inputs.tolist() == [list(range(8)), list(range(8, 16))]
    assert b.segment_ids.tolist() == [[0, 0, 0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 2, 2, 2, 2]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 1, 2, 3]]
    b = stream.take_batch(1, 8)  # wraps around: the first document again, as another document
    assert b.segment_ids.tolist() == [[2, 2, 2, 2, 3, 3, 3, 3]]
    assert TokenStream(tokens, starts=starts).take_batch(1, 8).segment_ids is None  # masking off


def _corpus() -> Corpus:
    docs = [Document(f"d{i}.py" if i % 3 else f"long/d{i}.txt", "x" * (200 + 50 * i)) for i in range(30)]
    return Corpus(docs, ByteTokenizer(), seed=0)


def test_a_mixture_gives_each_source_its_share_and_resumes_exactly():
    spec = load_spec(
        TINY,
        [
            "training.sources={long: {match: 'long/*'}, big: {min_bytes: 1000}}",
            "training.stages.2.mixture={all: 1, long: 2, big: 1}",
        ],
    )
    corpus = _corpus()
    stream = make_stream(corpus, spec)
    assert isinstance(stream, MixtureStream)
    got: Counter[str] = Counter()
    for _ in range(7):
        got.update(stream.take_batch(4, 32, "long_context").source_tokens)
    assert got == {"all": 7 * 32, "long": 14 * 32, "big": 7 * 32}  # 28 sequences in the ratio 1:2:1
    assert stream.take_batch(3, 32, "pretrain").source_tokens == {"all": 96}  # no mixture: every document
    saved = json.loads(json.dumps(stream.position))
    again = make_stream(corpus, spec, saved)
    a, b = stream.take_batch(5, 16, "long_context"), again.take_batch(5, 16, "long_context")
    assert torch.equal(a.inputs, b.inputs) and a.source_tokens == b.source_tokens
    long_docs = {d.text for d in corpus.train_docs if d.name.startswith("long/")}
    src = corpus.source("long", spec.training.sources["long"])
    assert len(src.tokens) == sum(len(t) for t in long_docs)


def test_mixture_and_source_mistakes_are_located(tmp_path):
    with pytest.raises(SpecError, match=r"mixture\.lng: expected one of \['all', 'long'\]"):
        load_spec(TINY, ["training.sources={long: {min_bytes: 1}}", "training.stages.0.mixture={lng: 1}"])
    with pytest.raises(SpecError, match=r"sources\.all: expected another name"):
        load_spec(TINY, ["training.sources={all: {min_bytes: 1}}"])


def test_training_logs_tokens_per_source_in_the_declared_proportions(tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "lmspec", "train", str(TINY), "--out", str(out), "--no-progress",
        "--max-tokens", "3e4", "--eval-tokens", "1024",
        "--set", "training.document_masking=true",
        "--set", "training.sources={long: {min_bytes: 30000}}",
        "--set", "training.stages.2.mixture={all: 1, long: 3}",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    total: Counter[str] = Counter()
    for r in rows:
        if r["stage"] == "long_context":
            total.update(r["source_tokens"])
    assert total["long"] == 3 * total["all"] > 0
    assert all("source_tokens" in r for r in rows)
