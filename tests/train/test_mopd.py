"""MOPD (lmspec/train/mopd.py): the objective's gradient identity, the importance-sampling discard, R3,
teachers in-process and served, and a stage that resumes bitwise after a crash."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

import lmspec
from lmspec.serve.rollouts import decode_batch
from lmspec.train import mopd
from lmspec.train.metrics import read_metrics
from lmspec.train.tasks import PromptRecord, exact_match, make_records

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "examples" / "mimo_v2_flash_tiny.yaml"


def small(seed: int, dtype: torch.dtype = torch.float32, vocab: int = 256, init_std: float = 0.02):
    """The tiny spec's layout (G0 S*2 G S*2 G, sink, 4 experts top-2) at a few thousand parameters."""
    overrides = [
        f"model.vocab_size={vocab}",
        "model.hidden_size=32",
        f"model.init_std={init_std}",
        "model.attention.swa.window=8",
        "model.ffn.dense.intermediate_size=32",
        "model.ffn.moe.num_experts=4",
        "model.ffn.moe.expert_intermediate_size=16",
    ]
    for kind in ("global", "swa"):
        overrides += [f"model.attention.{kind}.{k}" for k in ("num_heads=2", "num_kv_heads=1")]
        overrides += [f"model.attention.{kind}.qk_head_dim=16", f"model.attention.{kind}.v_head_dim=8"]
    torch.manual_seed(seed)
    return lmspec.build(TINY, dtype=dtype, overrides=overrides)


def _rollout(prompt: list[int], completion: list[int], routes: torch.Tensor, lp: list[float]) -> mopd.Rollout:
    return mopd.Rollout(0, 0, "d", "", prompt, completion, lp, routes)


# --- the objective -------------------------------------------------------------------------------


def test_surrogate_gradient_is_the_reverse_kl_gradient_in_float64():
    """mu = pi, alpha = 0: over every 2-token response y (vocab 16), sum_y pi(y) grad L(y) equals the
    analytic gradient of (1/2)[KL_1 + sum_{y1} sg pi(y1) KL_2(y1)], KL_t = KL(pi_theta || pi_teacher) at
    position t, to 1e-10. The student forward replays its own routes (R3 on the same weights)."""
    student, teacher = (
        small(0, torch.float64, vocab=16, init_std=0.3),
        small(1, torch.float64, vocab=16, init_std=0.3),
    )
    prompt = [3, 1, 4]
    ys = [list(y) for y in itertools.product(range(16), repeat=2)]
    seqs = torch.tensor([prompt + y for y in ys])  # (256, 5)
    with torch.no_grad():
        free = student(seqs[:, :-1], return_routes=True)
        lp_s = free.logits.log_softmax(-1)  # (256, 4, 16)
        lp_t = teacher(seqs[:, :-1]).logits.log_softmax(-1)
    rows = torch.arange(len(ys))
    tok = seqs[:, 3:]  # (256, 2) the response tokens
    mu = torch.stack([lp_s[rows, 2, tok[:, 0]], lp_s[rows, 3, tok[:, 1]]], 1)  # (256, 2)
    t_lp = torch.stack([lp_t[rows, 2, tok[:, 0]], lp_t[rows, 3, tok[:, 1]]], 1)
    rollouts = [_rollout(prompt, y, free.routes[i], mu[i].tolist()) for i, y in enumerate(ys)]
    sp = mopd.student_logprobs(student, rollouts)
    assert sp.replayed == 1.0
    terms = mopd.mopd_loss(
        sp.logprobs,
        mu,
        t_lp,
        sp.mask,
        torch.zeros(len(ys), dtype=torch.float64),
        alpha=0.0,
        eps_low=0.5,
        eps_high=2.0,
    )
    weight = mu.sum(1).exp()  # pi(y) = pi(y1) pi(y2 | y1), sums to 1 over the 256 responses
    assert abs(float(weight.sum()) - 1) < 1e-12
    params = [p for p in student.parameters() if p.requires_grad]
    grads = torch.autograd.grad((terms.per_sequence * weight).sum(), params, allow_unused=True)

    # The analytic side: closed-form KLs from one forward over the prompt and each y1.
    ctx = torch.tensor([prompt + [v] for v in range(16)])  # (16, 4)
    s_logp = student(ctx).logits.log_softmax(-1)  # (16, 4, 16), grad
    t_logp = teacher(ctx).logits.log_softmax(-1).detach()
    kl = lambda s, t: (s.exp() * (s - t)).sum(-1)  # noqa: E731
    kl1 = kl(s_logp[0, 2], t_logp[0, 2])
    kl2 = (s_logp[:, 2].detach().exp()[0] * kl(s_logp[:, 3], t_logp[:, 3])).sum()
    analytic = torch.autograd.grad(0.5 * (kl1 + kl2), params, allow_unused=True)
    worst = 0.0
    for g, a in zip(grads, analytic, strict=True):
        g = torch.zeros(()) if g is None else g
        a = torch.zeros(()) if a is None else a
        worst = max(worst, float((g - a).abs().max()))
    scale = max(float(a.abs().max()) for a in analytic if a is not None)
    assert scale > 1e-3  # the identity is not 0 == 0
    assert worst < 1e-10, f"max |grad surrogate - grad KL| = {worst:.3g} (grad scale {scale:.3g})"


def test_tokens_outside_the_ratio_band_get_exactly_zero_gradient():
    torch.manual_seed(0)
    S, T = 6, 9
    student = (torch.randn(S, T, dtype=torch.float64) - 2).requires_grad_()
    shift = torch.randn(S, T, dtype=torch.float64) * 1.5  # log(pi / mu): many ratios leave [0.5, 2]
    mask = torch.rand(S, T) < 0.85
    mask[:, 0] = True
    behaviour = student.detach() - shift
    teacher = torch.randn(S, T, dtype=torch.float64) - 2
    teacher[~mask] = -math.inf  # padding may hold anything, -inf included
    terms = mopd.mopd_loss(
        student,
        behaviour,
        teacher,
        mask,
        torch.randn(S, dtype=torch.float64),
        alpha=0.7,
        eps_low=0.5,
        eps_high=2.0,
    )
    (grad,) = torch.autograd.grad(terms.loss, student)
    ratio = shift.exp()
    outside = mask & ((ratio < 0.5) | (ratio > 2.0))
    assert outside.sum() >= 10 and (mask & ~outside).sum() >= 10
    assert torch.equal(terms.clipped, outside)
    assert bool((grad[outside] == 0).all()) and bool((grad[~mask] == 0).all())
    assert bool((grad[mask & ~outside] != 0).all())
    assert torch.isfinite(terms.loss)


def test_group_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    a = mopd.group_advantages(r, 4)
    std = math.sqrt(0.1875)
    assert torch.allclose(
        a[:4], torch.tensor([0.75, -0.25, -0.25, -0.25], dtype=torch.float64) / (std + 1e-6)
    )
    assert bool((a[4:] == 0).all())  # a group that agrees carries no outcome signal
    with pytest.raises(ValueError):
        mopd.group_advantages(r, 3)


# --- rollouts and R3 -----------------------------------------------------------------------------

PROMPTS = [PromptRecord("12+7=", "addition", "19"), PromptRecord("rev abc=", "reversal", "cba")]


def _sample(model, step: int = 0, seed: int = 0) -> list[mopd.Rollout]:
    from lmspec.runtime.tokenizer import ByteTokenizer

    return mopd.sample_rollouts(
        model, list(enumerate(PROMPTS)), group=3, max_new_tokens=10, temperature=1.0, seed=seed, step=step,
        tokenizer=ByteTokenizer(), decode=decode_batch,
    )  # fmt: skip


def test_r3_replays_every_expert_choice_and_matches_behaviour_logprobs():
    """float32, same weights: every (token, MoE layer) choice of the training forward is the rollout's, and
    |log pi - log mu| <= 1e-5 on every response token."""
    model = small(0)
    rollouts = _sample(model)
    assert [len(r.completion) for r in rollouts] and all(r.routes.shape[1:] == (6, 2) for r in rollouts)
    for r in rollouts:
        assert r.routes.shape[0] == len(r.prompt) + len(r.completion) - 1
    sp = mopd.student_logprobs(model, rollouts)
    assert sp.replayed == 1.0
    mu = torch.zeros_like(sp.logprobs)
    for i, r in enumerate(rollouts):
        mu[i, : len(r.behaviour_lp)] = torch.tensor(r.behaviour_lp)
    gap = float(torch.where(sp.mask, (sp.logprobs.detach() - mu).abs(), torch.zeros_like(mu)).max())
    assert gap <= 1e-5, gap
    assert sp.router_agreement is not None and 0 < sp.router_agreement <= 1


def test_replay_changes_the_experts_a_forward_uses():
    """Routes that are not the router's own are the ones used (and the loss still reaches the router)."""
    model = small(0)
    ids = torch.tensor([[5, 6, 7, 8]])
    own = model(ids, return_routes=True).routes
    forced = (own + 1) % 4  # other experts everywhere
    out = model(ids, routes=forced, return_routes=True)
    # Layer 0 sees the same input, so its router still chooses as before; later layers' inputs changed.
    assert torch.equal(out.routes, forced) and torch.equal(out.router_routes[:, :, 0], own[:, :, 0])
    out.logits.sum().backward()
    assert all(
        m.gate.weight.grad is not None and m.gate.weight.grad.abs().sum() > 0 for m in model.moe_layers()
    )


def test_rollouts_are_reproducible_by_seed_and_step():
    model = small(0)
    a, b, c = _sample(model), _sample(model), _sample(model, step=1)
    assert [r.completion for r in a] == [r.completion for r in b]
    assert [r.behaviour_lp for r in a] == [r.behaviour_lp for r in b]
    assert all(torch.equal(x.routes, y.routes) for x, y in zip(a, b, strict=True))
    assert [r.completion for r in a] != [r.completion for r in c]


# --- teachers ------------------------------------------------------------------------------------


def test_local_and_served_teachers_score_alike(tmp_path):
    from fastapi.testclient import TestClient

    from lmspec.runtime.tokenizer import ByteTokenizer
    from lmspec.serve.server import create_app

    model = small(3)
    model.save_pretrained(tmp_path / "teacher")
    local = mopd.load_teacher("addition", tmp_path / "teacher", decode=decode_batch)
    seqs, starts = [list(b"12+7=19\n"), list(b"rev abc=cba\n")], [5, 8]
    want = local.score(seqs, starts)
    direct = mopd.LocalTeacher(model.eval(), decode=decode_batch).score(seqs, starts)
    assert all(torch.allclose(w, d, atol=1e-6, rtol=0) for w, d in zip(want, direct, strict=True))
    with TestClient(create_app(model, ByteTokenizer())) as client:
        served = mopd.EndpointTeacher("http://testserver", name="addition")

        def request(path, body=None):  # the same wire format, through the test client
            return client.get(path).json() if body is None else client.post(path, json=body).json()

        served._request = request
        got = served.score(seqs, starts)
        assert served.answer(["12+7="], 4) == local.answer(["12+7="], 4)
    for w, g in zip(want, got, strict=True):
        assert w.shape == g.shape and float((w - g).abs().max()) < 1e-5


# --- the stage -----------------------------------------------------------------------------------


def _stage(run_dir: Path | None, *, steps: int = 4, resume: bool = False, on_step=None, per_step: int = 2):
    records = [
        PromptRecord(r["prompt"], r["domain"], r["answer"]) for r in make_records("addition", 6, seed=1)
    ]
    records += [
        PromptRecord(r["prompt"], r["domain"], r["answer"]) for r in make_records("reversal", 6, seed=1)
    ]
    student = small(0)
    optimizer = torch.optim.AdamW(student.parameters(), lr=0.0)
    teachers = {
        "addition": mopd.LocalTeacher(small(1), decode=decode_batch),
        "reversal": mopd.LocalTeacher(small(2), decode=decode_batch),
    }
    config = mopd.MOPDConfig(
        steps=steps, prompts_per_step=per_step, rollouts_per_prompt=2, max_new_tokens=6, lr=3e-3, checkpoint_every=2,
        eval_every=2, micro_batch_size=3,
    )  # fmt: skip
    result = mopd.run_mopd(
        student, optimizer, teachers, records, config, run_dir=run_dir, resume=resume,
        eval_prompts=records[:2] + records[6:8], on_step=on_step, decode=decode_batch,
    )  # fmt: skip
    return student, result


def test_stage_logs_what_the_report_asks_for(tmp_path):
    _, result = _stage(tmp_path / "run", steps=2, per_step=6)
    row = result.history[-1]
    for key in ("loss", "reward", "reverse_kl", "clip_fraction", "r3_replayed", "r3_router_agreement"):
        assert key in row, key
    assert set(row["reward"]) == set(row["reverse_kl"]) <= {"addition", "reversal"}
    assert {d for r in result.history for d in r["reward"]} == {"addition", "reversal"}
    assert set(row["student_exact_match"]) == set(row["teacher_exact_match"]) == {"addition", "reversal"}
    assert row["r3_replayed"] == 1.0 and row["max_logprob_gap"] <= 1e-5
    assert len(read_metrics(tmp_path / "run")) == 2


def test_a_crashed_stage_resumes_bitwise(tmp_path):
    """A stage stopped after step 3 (its last checkpoint at step 2) and resumed writes the same metrics
    and ends with the same weights as an uninterrupted one."""
    whole, _ = _stage(tmp_path / "whole")

    def crash(row):
        if row["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _stage(tmp_path / "cut", on_step=crash)
    assert len(read_metrics(tmp_path / "cut")) == 3
    resumed, _ = _stage(tmp_path / "cut", resume=True)
    timing = {"elapsed_s", "tokens_per_s"}
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    assert strip(read_metrics(tmp_path / "cut")) == strip(read_metrics(tmp_path / "whole"))
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_a_stage_needs_a_teacher_for_every_domain():
    from lmspec.errors import UsageError

    with pytest.raises(UsageError, match="no teacher for domain"):
        mopd.run_mopd(small(0), None, {}, PROMPTS, mopd.MOPDConfig(steps=1), decode=decode_batch)  # type: ignore[arg-type]


def test_tasks_are_seeded_and_checkable():
    a, b = make_records("addition", 20, seed=3), make_records("addition", 20, seed=3)
    assert a == b and a != make_records("addition", 20, seed=4)
    for r in a:
        x, y = r["prompt"][:-1].split("+")
        assert int(r["answer"]) == int(x) + int(y) and r["completion"] == r["answer"] + "\n"
    for r in make_records("reversal", 20, seed=3):
        assert r["prompt"] == f"rev {r['answer'][::-1]}="
    assert exact_match("19\ngarbage", "19") == 1.0 and exact_match("191\n", "19") == 0.0


# --- a spec's mopd stage under the trainer -------------------------------------------------------

SMALL_MODEL = """
  hidden_size: 32
  attention:
    global: {num_heads: 2, num_kv_heads: 1, qk_head_dim: 16, v_head_dim: 8}
    swa: {num_heads: 2, num_kv_heads: 1, qk_head_dim: 16, v_head_dim: 8, window: 8}
  ffn:
    dense: {intermediate_size: 32}
    moe: {num_experts: 4, expert_intermediate_size: 16}
"""


def _pipeline(tmp_path: Path) -> tuple[Path, tuple[str, ...]]:
    """One pretrain step, then a mopd stage of 4 steps (2 prompts x 2 rollouts) with two teachers."""
    from lmspec.train.tasks import write_records

    for seed, domain in ((1, "addition"), (2, "reversal")):
        small(seed).save_pretrained(tmp_path / f"teacher_{domain}")
    records = make_records("addition", 20, seed=0) + make_records("reversal", 20, seed=0)
    write_records(tmp_path / "prompts.jsonl", records)
    texts = [json.dumps({"text": r["prompt"] + r["completion"]}) + "\n" for r in records]
    (tmp_path / "text.jsonl").write_text("".join(texts))
    spec = tmp_path / "mopd.yaml"
    spec.write_text(
        f"extends: {TINY}\nname: mopd_pipeline\nmodel:{SMALL_MODEL}training:\n  stages:\n"
        "    - {name: pretrain, tokens: 128, seq_len: 32, batch_size: {size: 4}, lr: {kind: constant, peak: 1.0e-3}}\n"
        "    - {name: distill, kind: mopd, prompts: prompts.jsonl, rollouts_per_prompt: 2, eps_low: 0.5, eps_high: 2.0,\n"
        "       max_new_tokens: 6, alpha: 0.5, tokens: 512, seq_len: 32, batch_size: {size: 4},\n"
        "       lr: {kind: constant, peak: 1.0e-3},\n"
        "       teachers: {addition: teacher_addition, reversal: teacher_reversal}}\n"
    )  # fmt: skip
    return spec, (str(tmp_path / "text.jsonl"),)


def _trainer(spec: Path, data: tuple[str, ...], out: Path, **kw):
    from lmspec.train.trainer import TrainConfig, Trainer

    config = TrainConfig(spec=spec, data=data, out=out, eval_every=2, eval_tokens=64, checkpoint_every=1, quiet=True, plot=False, decode=decode_batch, **kw)  # fmt: skip
    return Trainer(config)


def test_a_spec_mopd_stage_runs_under_the_trainer_and_resumes_bitwise(tmp_path):
    """pretrain (1 step) -> mopd (4 steps) through lmspec's Trainer; stopped after step 3 and resumed with
    --resume, the metrics (rollouts' rewards and KLs included) and final weights equal an uninterrupted run's."""
    spec, data = _pipeline(tmp_path)
    whole = _trainer(spec, data, tmp_path / "whole")
    result = whole.run()
    rows = read_metrics(tmp_path / "whole")
    assert [r.get("kind", "pretrain") for r in rows] == ["pretrain"] + ["mopd"] * 4 and result.steps == 5
    assert rows[-1]["r3_replayed"] == 1.0 and set(rows[-1]["teacher_exact_match"]) == {"addition", "reversal"}

    cut = _trainer(spec, data, tmp_path / "cut")
    cut.setup()
    real = cut.checkpoint

    def checkpoint_then_die():
        if cut.steps == 4:
            raise KeyboardInterrupt  # metrics of step 4 written, its checkpoint not: the last one is step 3
        return real()

    cut.checkpoint = checkpoint_then_die
    with pytest.raises(KeyboardInterrupt):
        cut.run()
    assert len(read_metrics(tmp_path / "cut")) == 4
    _trainer(spec, data, tmp_path / "cut", resume=True).run()
    timing = {"elapsed_s", "tokens_per_s"}
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    assert strip(read_metrics(tmp_path / "cut")) == strip(rows)
    a = lmspec.from_pretrained(tmp_path / "whole").state_dict()
    b = lmspec.from_pretrained(tmp_path / "cut").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_mopd_stage_that_starts_a_run_decodes_at_its_own_rope_theta(tmp_path):
    """A spec whose first stage is mopd (init_from a saved student): the student runs at the stage's RoPE
    theta (the one its weights were trained at), not the model's base theta, from the first rollout on."""
    spec, data = _pipeline(tmp_path)
    student = small(0)
    student.set_rope_theta({"global": 640000.0})
    student.save_pretrained(tmp_path / "student")
    spec.write_text(
        f"extends: {TINY}\nname: mopd_first\nmodel:{SMALL_MODEL}training:\n  stages:\n"
        "    - {name: distill, kind: mopd, init_from: student, prompts: prompts.jsonl, rollouts_per_prompt: 2,\n"
        "       eps_low: 0.5, eps_high: 2.0,\n"
        "       max_new_tokens: 6, tokens: 128, seq_len: 32, batch_size: {size: 4}, lr: {kind: constant, peak: 1.0e-3},\n"
        "       overrides: {rope_theta: {global: 640000.0}},\n"
        "       teachers: {addition: teacher_addition, reversal: teacher_reversal}}\n"
    )  # fmt: skip
    trainer = _trainer(spec, data, tmp_path / "run")
    trainer.setup()
    assert trainer.model.rope_thetas()["global"] != 640000.0  # the model's base theta before the stage
    trainer.run()
    assert trainer.model.rope_thetas()["global"] == 640000.0
    saved = lmspec.from_pretrained(tmp_path / "run")
    assert saved.rope_thetas()["global"] == 640000.0


@pytest.mark.slow
def test_a_mopd_stage_killed_with_sigkill_resumes_bitwise(tmp_path):
    """`lmspec train` on the pretrain -> mopd spec, SIGKILLed once the mopd stage has logged 2 steps, then
    `--resume`: the same metrics and weights as an uninterrupted `lmspec train`, rollouts included."""
    import os
    import signal
    import subprocess
    import sys
    import time

    spec, data = _pipeline(tmp_path)
    flags = [
        "--data",
        *data,
        "--eval-every",
        "2",
        "--eval-tokens",
        "64",
        "--checkpoint-every",
        "1",
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def train(out: str, *extra: str) -> subprocess.Popen:
        cmd = [
            sys.executable,
            "-m",
            "lmspec",
            "train",
            str(spec),
            "--out",
            str(tmp_path / out),
            *flags,
            *extra,
        ]
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    assert train("whole").wait(timeout=300) == 0
    proc = train("cut")
    metrics = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if metrics.is_file() and metrics.read_text().count("\n") >= 3:  # pretrain + 2 mopd steps
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed"
    resumed = train("cut", "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()[-2000:]
    timing = {"elapsed_s", "tokens_per_s"}
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    assert strip(read_metrics(tmp_path / "cut")) == strip(read_metrics(tmp_path / "whole"))
    a = lmspec.from_pretrained(tmp_path / "whole").state_dict()
    b = lmspec.from_pretrained(tmp_path / "cut").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
