"""(4) The demo: the tiny spec's whole declared budget (what `make demo` trains). Slow: minutes on 2 cores.

Run in CI with `pytest -m slow tests/train/test_demo.py`.
"""

import pytest

from lmspec.train.metrics import read_metrics
from lmspec.train.trainer import train


@pytest.mark.slow
def test_demo_learns_far_below_the_unigram_baseline_with_balanced_experts(tmp_path, examples_dir):
    result = train(examples_dir / "mimo_v2_flash_tiny.yaml", out=tmp_path / "demo", progress=False)
    print(
        f"\ndemo: {result.steps} steps, {result.tokens:,} tokens in {result.elapsed_s:.0f} s; held-out "
        f"{result.val_loss:.4f} nats/token = {result.val_bpb:.3f} bits/byte vs unigram {result.unigram_bpb:.3f}; "
        f"busiest expert {result.max_load_ratio:.2f}x uniform"
    )
    assert result.val_bpb < 0.7 * result.unigram_bpb  # measured: 2.74 vs 4.50 bits/byte
    rows = read_metrics(result.run_dir)
    assert list(dict.fromkeys(r["stage"] for r in rows)) == ["pretrain", "midtrain", "long_context", "sft"]
    # With the bias rule on, every MoE layer's busiest expert ends within 2x of the uniform share, averaged
    # over the last 50 steps (one step's load is noisy at this batch size).
    tail = rows[-50:]
    for layer in range(len(rows[-1]["expert_load"])):
        share = sum(max(r["expert_load"][layer]) for r in tail) / len(tail)
        assert share * len(rows[-1]["expert_load"][layer]) < 2.0, layer
    assert result.plot is not None and result.plot.is_file()
