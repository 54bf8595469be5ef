"""The schedule as a pure function of (spec, tokens), against the values MiMo-V2-Flash declares."""

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmspec.spec import dump_spec, load_spec, loads_spec
from lmspec.spec.schema import BatchSchedule, LRSchedule
from lmspec.train.schedule import (
    batch_size_at,
    lr_at,
    plan_steps,
    scale_factor,
    scale_schedule,
    schedule_at,
    stage_bounds,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
FULL = load_spec(EXAMPLES / "mimo_v2_flash.yaml")
TINY = load_spec(EXAMPLES / "mimo_v2_flash_tiny.yaml")


def test_full_schedule_matches_the_paper():
    # Paper §3.2: warmup 0 -> 3.2e-4 over 50B, constant to 12T, cosine to 1e-4 over the last 10T.
    assert schedule_at(FULL, 0).lr == 0.0
    assert schedule_at(FULL, 25e9).lr == pytest.approx(1.6e-4)
    assert schedule_at(FULL, 50e9).lr == pytest.approx(3.2e-4)
    assert schedule_at(FULL, 11.9e12).lr == pytest.approx(3.2e-4)
    assert schedule_at(FULL, 17e12).lr == pytest.approx((3.2e-4 + 1e-4) / 2)
    assert schedule_at(FULL, 22e12 - 1).lr == pytest.approx(1e-4, rel=1e-6)
    s2 = schedule_at(FULL, 22e12)
    assert (s2.stage, s2.stage_name, s2.lr) == (1, "midtrain", pytest.approx(1e-4))
    assert schedule_at(FULL, 26e12 - 1).lr == pytest.approx(3e-5, rel=1e-6)
    s3 = schedule_at(FULL, 26e12)
    assert (s3.stage, s3.seq_len, s3.batch_size) == (2, 262144, 256)
    assert s3.lr == pytest.approx(3e-5)


def test_full_schedule_switches_theta_mtp_and_balancing_per_stage():
    s1, s2, s3 = (schedule_at(FULL, t) for t in (1e12, 23e12, 26.5e12))
    assert s1.rope_theta == {"global": 640000.0, "swa": 10000.0}
    assert s3.rope_theta == {"global": 5.0e6, "swa": 10000.0}
    assert (s1.mtp_loss_weight, s2.mtp_loss_weight, s3.mtp_loss_weight) == (0.3, 0.1, 0.1)
    assert (s1.bias_update, s2.bias_update, s3.bias_update) == (1e-3, 1e-3, 1e-5)
    assert {s.seq_aux_coef for s in (s1, s2, s3)} == {1e-5}


def test_batch_ramp_is_linear_in_tokens():
    assert schedule_at(FULL, 0).batch_size == 64
    assert schedule_at(FULL, 250e9).batch_size == (64 + 2048) // 2
    assert schedule_at(FULL, 500e9).batch_size == 2048
    assert schedule_at(FULL, 23e12).batch_size == 2048


def test_absent_overrides_fall_back_to_training_defaults():
    spec = load_spec(
        EXAMPLES / "mimo_v2_flash_tiny.yaml",
        [
            "training.stages.1.overrides={}",
            "training.balancing.bias_update=0.25",
            "model.mtp.loss_weight=0.7",
        ],
    )
    s = schedule_at(spec, spec.training.stages[0].tokens + 1)
    assert s.rope_theta == {"global": 5.0e6, "swa": 10000.0}  # the model's own theta, not stage 1's
    assert (s.bias_update, s.mtp_loss_weight, s.seq_aux_coef) == (0.25, 0.7, 1e-5)


@pytest.mark.parametrize("kind", ["constant", "cosine", "linear", "wsd"])
def test_lr_kinds_hit_their_endpoints(kind):
    decay = 40.0 if kind == "wsd" else None
    lr = LRSchedule(kind=kind, peak=1.0, final=0.1, warmup_tokens=10, warmup_start=0.5, decay_tokens=decay)
    end = 1.0 if kind == "constant" else 0.1
    assert lr_at(lr, 100, 0) == (1.0 if kind == "constant" else 0.5)
    assert lr_at(lr, 100, 10) == pytest.approx(1.0)
    assert lr_at(lr, 100, 100) == pytest.approx(end)
    if kind == "wsd":
        assert lr_at(lr, 100, 59) == 1.0 and lr_at(lr, 100, 80) == pytest.approx(0.55)
    if kind == "linear":
        assert lr_at(lr, 100, 55) == pytest.approx(0.55)


@given(
    st.sampled_from(["cosine", "linear", "wsd"]),
    st.floats(0, 1e6),
    st.floats(1e-6, 1.0),
    st.floats(0, 1.0),
)
def test_lr_stays_between_final_and_peak_after_warmup(kind, t, peak, final_frac):
    lr = LRSchedule(
        kind=kind,
        peak=peak,
        final=peak * final_frac,
        warmup_tokens=1e3,
        decay_tokens=5e5 if kind == "wsd" else None,
    )
    v = lr_at(lr, 1e6, max(t, 1e3))
    assert lr.final - 1e-12 <= v <= lr.peak + 1e-12


@given(st.integers(1, 64), st.integers(0, 64), st.floats(0, 2e6))
def test_batch_ramp_monotone_and_bounded(start, extra, t):
    b = BatchSchedule(size=start + extra, warmup_start=start, warmup_tokens=1e6)
    assert start <= batch_size_at(b, t) <= start + extra
    assert batch_size_at(b, t) <= batch_size_at(b, t + 1e4)


def test_scaling_keeps_the_shape_of_the_schedule():
    # 27T of pre-training, then the 0.1T sft stage.
    f = scale_factor(FULL, max_tokens=27.1e6)
    small = scale_schedule(FULL, f)
    assert small.training.total_tokens == pytest.approx(27.1e6)
    assert [b for b, _ in stage_bounds(small)] == pytest.approx([0, 22e6, 26e6, 27e6])
    for frac in (0.0, 0.001, 0.3, 0.7, 0.81, 0.9, 0.97, 0.99, 0.999):
        a, b = schedule_at(FULL, frac * 27.1e12), schedule_at(small, frac * 27.1e6)
        assert (a.stage, a.batch_size, a.seq_len, a.rope_theta) == (
            b.stage,
            b.batch_size,
            b.seq_len,
            b.rope_theta,
        )
        assert a.lr == pytest.approx(b.lr, rel=1e-9, abs=1e-15)
    # The scaled spec is a valid spec and survives the run directory's YAML round trip.
    assert loads_spec(dump_spec(small)) == small


def test_scale_arguments_are_checked():
    assert scale_factor(TINY) == 1.0
    assert scale_factor(TINY, scale=0.5) == 0.5
    with pytest.raises(ValueError, match="not both"):
        scale_factor(TINY, max_tokens=1e5, scale=0.5)
    with pytest.raises(ValueError, match="positive"):
        scale_factor(TINY, max_tokens=0)


def test_plan_steps_counts_the_token_budget():
    spec = scale_schedule(TINY, scale_factor(TINY, max_tokens=60000))
    steps, tokens = plan_steps(spec), 0.0
    for _ in range(steps):
        s = schedule_at(spec, tokens)
        tokens += s.batch_size * s.seq_len
    assert tokens >= spec.training.total_tokens > tokens - 16 * 512
