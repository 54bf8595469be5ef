"""MTP speculative decoding changes nothing but speed: greedy output is identical token for token,
sampled output has the same distribution (rejection sampling)."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmspec.serve.engine import Generator
from lmspec.serve.sampling import SamplingParams

from .conftest import small_model

_greedy_cases = dict(
    window=st.integers(1, 6),
    vocab=st.sampled_from([3, 5, 64]),  # small vocabularies make drafts agree often: partial acceptances
    depth=st.integers(1, 3),
    init_std=st.sampled_from([0.02, 0.5]),
    prompts=st.lists(st.lists(st.integers(0, 2), min_size=1, max_size=24), min_size=1, max_size=3),
    max_tokens=st.integers(1, 20),
    seed=st.integers(0, 3),
    prefill_chunk=st.sampled_from([2, 5, 256]),
)


def _check_greedy(window, vocab, depth, init_std, prompts, max_tokens, seed, prefill_chunk):
    model = small_model(seed, window=window, vocab=vocab, init_std=init_std)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    plain = [Generator(model, speculative_depth=0).generate(p, params).token_ids for p in prompts]
    # The same prompts batched together (ragged rows), prefilled in chunks, with speculation.
    gen = Generator(model, speculative_depth=depth, prefill_chunk=prefill_chunk)
    spec = gen.generate_batch(prompts, [params] * len(prompts))
    assert [c.token_ids for c in spec] == plain
    assert all(len(t) == max_tokens for t in plain)


@settings(max_examples=40)
@given(**_greedy_cases)
def test_speculative_greedy_equals_plain_greedy(**case):
    _check_greedy(**case)


@pytest.mark.slow
@settings(max_examples=400)
@given(**_greedy_cases)
def test_speculative_greedy_equals_plain_greedy_many_examples(**case):
    _check_greedy(**case)


def test_speculation_accepts_drafts_and_still_matches():
    """A 3-token vocabulary: drafts are often right, so rollbacks after partial acceptance are exercised."""
    model = small_model(1, window=2, vocab=3, init_std=0.5)
    params = SamplingParams(temperature=0.0, max_tokens=60)
    prompt = [0, 1, 2, 2, 1, 0, 1]
    plain = Generator(model, speculative_depth=0).generate(prompt, params)
    for depth in (1, 2, 3):
        out = Generator(model, speculative_depth=depth).generate(prompt, params)
        assert out.token_ids == plain.token_ids
        st_ = out.stats
        assert 0 < st_.accepted < st_.drafted  # some drafts kept, some rejected
        assert st_.acceptance_length == pytest.approx((st_.decode_steps + st_.accepted) / st_.decode_steps)
        assert st_.decode_steps < plain.stats.decode_steps


def _chi2_pvalue(counts: torch.Tensor, expected_p: torch.Tensor) -> float:
    """Pearson goodness of fit; cells expected under 5 are pooled."""
    n = counts.sum()
    exp = expected_p * n
    small = exp < 5
    obs = torch.cat([counts[~small], counts[small].sum()[None]])
    exp = torch.cat([exp[~small], exp[small].sum()[None]])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = ((obs - exp) ** 2 / exp).sum()
    df = obs.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


def _exact_marginals(model, prompt: list[int], steps: int, params: SamplingParams) -> list[torch.Tensor]:
    """P(x_1), ..., P(x_steps) by enumerating every continuation (vocab ** (steps - 1) sequences)."""
    from lmspec.serve.sampling import probs

    V = model.spec.model.vocab_size
    marginals = []
    seq_prob = {(): 1.0}
    with torch.inference_mode():
        for _ in range(steps):
            prefixes = list(seq_prob)
            ids = torch.tensor([prompt + list(p) for p in prefixes])
            p_next = probs(model(ids).logits[:, -1], params)  # (n, V)
            marg = torch.zeros(V, dtype=torch.float64)
            new = {}
            for i, pre in enumerate(prefixes):
                marg += seq_prob[pre] * p_next[i].double()
                for t in range(V):
                    new[pre + (t,)] = seq_prob[pre] * float(p_next[i, t])
            marginals.append(marg)
            seq_prob = new
    return marginals


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0, max_tokens=3),
        SamplingParams(temperature=0.7, top_p=0.9, top_k=8, max_tokens=3),
    ],
    ids=["t1", "t0.7-top_p-top_k"],
)
def test_speculative_sampling_keeps_the_distribution(params):
    model = small_model(2, window=3, vocab=16, init_std=0.3)
    prompt = [3, 1, 4, 1, 5]
    exact = _exact_marginals(model, prompt, 3, params)
    n = 3000
    seeded = [SamplingParams(**{**params.__dict__, "seed": s}) for s in range(n)]
    out = Generator(model, speculative_depth=2).generate_batch([prompt] * n, seeded)
    tokens = torch.tensor([c.token_ids for c in out])  # (n, 3)
    assert sum(c.stats.accepted for c in out) > 0.1 * n  # the draft is used, not just rejected
    for j in range(3):
        counts = torch.bincount(tokens[:, j], minlength=16).double()
        assert _chi2_pvalue(counts, exact[j]) > 1e-3, (
            f"token {j + 1}: {counts.tolist()} vs {exact[j].tolist()}"
        )


def test_a_wrong_rule_is_detected():
    """The test above has power: taking every draft (no rejection) fails it on the same model."""
    from lmspec.serve import engine as gen_mod

    model = small_model(2, window=3, vocab=16, init_std=0.3)
    prompt = [3, 1, 4, 1, 5]
    params = SamplingParams(temperature=1.0, max_tokens=3)
    exact = _exact_marginals(model, prompt, 3, params)

    def accept_all(p, q, drafts, generator):
        from lmspec.serve.sampling import sample

        return len(drafts), sample(p[len(drafts)], generator)

    mp = pytest.MonkeyPatch()
    mp.setattr(gen_mod, "accept_drafts", accept_all)
    try:
        n = 1200
        seeded = [SamplingParams(temperature=1.0, max_tokens=3, seed=s) for s in range(n)]
        out = Generator(model, speculative_depth=2).generate_batch([prompt] * n, seeded)
    finally:
        mp.undo()
    tokens = torch.tensor([c.token_ids for c in out])
    counts = torch.bincount(tokens[:, 1], minlength=16).double()
    assert _chi2_pvalue(counts, exact[1]) < 1e-3


def test_sampling_is_reproducible_per_seed_and_batch_independent():
    model = small_model(3, window=4, vocab=32, init_std=0.3)
    params = [SamplingParams(temperature=0.8, top_p=0.9, top_k=10, max_tokens=12, seed=s) for s in (7, 8)]
    alone = [Generator(model, speculative_depth=2).generate([1, 2, 3], p).token_ids for p in params]
    together = Generator(model, speculative_depth=2).generate_batch([[1, 2, 3], [1, 2, 3]], params)
    assert [c.token_ids for c in together] == alone
    assert alone[0] != alone[1]


def test_stop_strings_max_tokens_and_streaming_text():
    model = small_model(4, window=4, init_std=0.5)
    gen = Generator(model, speculative_depth=3)
    full = gen.generate("ab", SamplingParams(temperature=0.0, max_tokens=30))
    assert full.finish_reason == "length" and len(full.token_ids) == 30
    assert full.text == bytes(full.token_ids).decode("utf-8", errors="replace")
    pieces = list(gen.stream("ab", SamplingParams(temperature=0.0, max_tokens=30)))
    assert "".join(e.text for e in pieces) == full.text and pieces[-1].finished
    # Stop at a string that occurs in the greedy text: output ends right before it.
    text = full.text
    stop = next((text[i : i + 2] for i in range(3, len(text) - 2) if "\ufffd" not in text[: i + 2]), None)
    if stop is not None:
        cut = gen.generate("ab", SamplingParams(temperature=0.0, max_tokens=30, stop=(stop,)))
        assert cut.finish_reason == "stop" and cut.text == text[: text.find(stop)]
    assert (
        list(itertools.islice(gen.stream([1], SamplingParams(max_tokens=0)), 5))[-1].finish_reason == "length"
    )
