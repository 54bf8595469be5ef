"""End-to-end training runs of the tiny MiMo spec, through the `lmspec train` command.

One uninterrupted reference run (module fixture) is checked for schedule fidelity and loss composition,
then compared with: a run SIGKILLed at a random step and resumed, a run killed in the middle of writing a
checkpoint and resumed, and a 2-process FSDP2 (gloo) run. All use the same small schedule: the tiny spec's
three stages scaled to ~24K tokens (13 steps).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lmspec
from lmspec.runtime.checkpoint import latest_checkpoint, resolve_checkpoint
from lmspec.spec import load_spec
from lmspec.train.metrics import read_metrics, without_timing
from lmspec.train.schedule import schedule_at, stage_bounds

ROOT = Path(__file__).resolve().parents[2]
SPEC = str(ROOT / "examples" / "mimo_v2_flash_tiny.yaml")
SMALL = ["--max-tokens", "24000", "--eval-every", "5", "--eval-tokens", "2048", "--checkpoint-every", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _train_cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lmspec", "train", SPEC, "--out", str(out), "--no-progress", *SMALL, *extra]


def _run(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("runs") / "reference"
    proc = _run(_train_cmd(out))
    return out, proc.stdout


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(resolve_checkpoint(run) / "model.safetensors")


# ---------------------------------------------------------------------------------------------
# (1) schedule fidelity
# ---------------------------------------------------------------------------------------------


def test_logged_schedule_follows_the_spec_at_every_step(reference):
    run, stdout = reference
    spec = load_spec(run / "spec.yaml")  # the resolved, scaled spec the run trained
    declared = load_spec(SPEC)
    rows = read_metrics(run)
    assert rows[-1]["tokens"] >= spec.training.total_tokens == pytest.approx(24000)
    bounds = stage_bounds(spec)
    for r in rows:
        start = r["tokens"] - r["batch_size"] * r["seq_len"]
        s = schedule_at(spec, start)
        assert (r["stage"], r["stage_index"], r["batch_size"], r["seq_len"]) == (
            s.stage_name,
            s.stage,
            s.batch_size,
            s.seq_len,
        )
        assert r["lr"] == s.lr and r["rope_theta"] == s.rope_theta
        assert (r["mtp_loss_weight"], r["bias_update"], r["seq_aux_coef"]) == (
            s.mtp_loss_weight,
            s.bias_update,
            s.seq_aux_coef,
        )
        # ... and those are the values the spec file declares for that stage.
        stage = declared.training.stages[s.stage]
        assert r["seq_len"] == stage.seq_len and r["mtp_loss_weight"] == stage.overrides.mtp_loss_weight
        assert r["bias_update"] == stage.overrides.bias_update
        assert r["rope_theta"]["global"] == stage.overrides.rope_theta["global"]
    # Each stage switch happens within one step of its boundary.
    for i, (lo, _) in enumerate(bounds):
        first = next((r for r in rows if r["stage_index"] == i), None)
        if first is None:
            # A stage shorter than the step that reaches it is never entered at this budget (a step belongs
            # to the stage of its first token): one step spans it, or the run ends inside it.
            hi = bounds[i][1]
            spans = [r for r in rows if r["tokens"] - r["batch_size"] * r["seq_len"] < lo]
            assert spans and (spans[-1]["tokens"] >= hi or spans[-1] is rows[-1])
            continue
        start = first["tokens"] - first["batch_size"] * first["seq_len"]
        previous = [r for r in rows if r["step"] == first["step"] - 1]
        assert start >= lo
        if previous:
            assert start - lo < previous[0]["batch_size"] * previous[0]["seq_len"]
    assert rows[0]["stage"] == "pretrain"
    assert rows[0]["batch_size"] == 4 and max(r["batch_size"] for r in rows) == 16


def test_loss_is_ce_plus_weighted_mtp_and_aux(reference):
    rows = read_metrics(reference[0])
    for r in rows:
        # One MTP block in the pre-training stages, three in the sft stage (replicated from the one).
        n = 3 if r["stage"] == "sft" else 1
        assert len(r["mtp"]) == n
        expected = r["ce"] + r["mtp_loss_weight"] * sum(r["mtp"]) / n + r["seq_aux_coef"] * r["aux"]
        assert r["loss"] == pytest.approx(expected, rel=1e-5)
        assert len(r["expert_load"]) == 6 and all(abs(sum(layer) - 1) < 1e-4 for layer in r["expert_load"])
    assert rows[-1]["ce"] < rows[0]["ce"] - 1.0  # it learns
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [5, 10, len(rows)]


def test_correction_bias_moves_by_the_sign_rule(reference):
    rows = read_metrics(reference[0])
    weights = _final_weights(reference[0])
    biases = [v for k, v in weights.items() if k.endswith("e_score_correction_bias")]
    assert len(biases) == 6
    budget = sum(r["bias_update"] for r in rows)
    for b in biases:
        assert b.abs().max() <= budget + 1e-9 and b.abs().max() > 0


def test_command_reports_results_and_writes_the_run_dir(reference):
    run, stdout = reference
    assert "held-out:" in stdout and "unigram baseline" in stdout and "checkpoint:" in stdout
    assert (run / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpt = latest_checkpoint(run)
    assert {p.name for p in ckpt.iterdir()} >= {
        "spec.yaml",
        "config.json",
        "model.safetensors",
        "optimizer.pt",
        "trainer_state.json",
    }
    assert len(list((run / "checkpoints").glob("step_*"))) == 3  # keep the last 3


def test_checkpoint_loads_with_from_pretrained(reference):
    import lmspec

    model = lmspec.from_pretrained(resolve_checkpoint(reference[0]))
    weights = _final_weights(reference[0])
    state = model.state_dict()
    for name in ("model.embed_tokens.weight", "model.layers.1.mlp.experts.gate_up_proj", "lm_head.weight"):
        assert torch.equal(state[name], weights[name])


# ---------------------------------------------------------------------------------------------
# (2) resume
# ---------------------------------------------------------------------------------------------


def _kill_at_step(cmd: list[str], run: Path, step: int) -> None:
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= step:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-3000:]


def _assert_same_run(a: Path, b: Path) -> None:
    assert without_timing(read_metrics(a)) == without_timing(read_metrics(b))
    wa, wb = _final_weights(a), _final_weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_sigkill_at_a_random_step_then_resume_is_bitwise_identical(reference, tmp_path):
    n_steps = len(read_metrics(reference[0]))
    step = random.Random(os.environ.get("PYTEST_SEED", "lmspec")).randint(2, n_steps - 2)
    run = tmp_path / "killed"
    _kill_at_step(_train_cmd(run), run, step)
    assert latest_checkpoint(run) is not None
    # Without --resume the command refuses to overwrite the run.
    refused = subprocess.run(_train_cmd(run), env=ENV, capture_output=True, text=True, cwd=ROOT)
    assert refused.returncode == 2 and "--resume" in refused.stderr and "Traceback" not in refused.stderr
    _run(_train_cmd(run, "--resume"))
    _assert_same_run(reference[0], run)


CRASH_IN_CHECKPOINT = """
import os, signal, sys
import torch
import lmspec.runtime.checkpoint as ckpt
saves = []
real_save = torch.save
def save(obj, path, *a, **k):
    # Dies on the second checkpoint, after the model files and before the optimizer file.
    saves.append(path)
    if len(saves) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, path, *a, **k)
ckpt.torch.save = save
from lmspec.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(reference, tmp_path):
    run = tmp_path / "torn"
    cmd = _train_cmd(run)
    proc = subprocess.run(
        [sys.executable, "-c", CRASH_IN_CHECKPOINT, *cmd[3:]],
        env=ENV,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=240,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    root = run / "checkpoints"
    assert (root / "LATEST").read_text().strip() == "step_00000002"
    torn = list(root.glob(".tmp_step_00000004*"))
    assert torn and (torn[0] / "model.safetensors").is_file() and not (torn[0] / "optimizer.pt").exists()
    import lmspec

    lmspec.from_pretrained(resolve_checkpoint(run))  # the previous checkpoint still loads
    _run(_train_cmd(run, "--resume"))
    _assert_same_run(reference[0], run)
    assert not list(root.glob(".tmp_*"))


# ---------------------------------------------------------------------------------------------
# (3) distributed
# ---------------------------------------------------------------------------------------------


def test_two_process_fsdp2_matches_one_process(reference, tmp_path):
    run = tmp_path / "fsdp"
    port = str(29500 + random.Random(str(tmp_path)).randint(0, 400))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        port,
        "-m",
        "lmspec",
        "train",
        SPEC,
        "--out",
        str(run),
        "--no-progress",
        *SMALL,
    ]
    _run(cmd, timeout=300)
    one, two = read_metrics(reference[0]), read_metrics(run)
    assert [r["tokens"] for r in one] == [r["tokens"] for r in two]
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "ce", "val_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4), (a["step"], key)
    # Each rank wrote its own shards; read back in one process they are a whole model.
    last = resolve_checkpoint(run)
    assert sorted(p.name for p in last.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    wa = lmspec.from_pretrained(reference[0]).state_dict()
    wb = lmspec.from_pretrained(run).state_dict()
    assert {k: v.shape for k, v in wa.items()} == {k: v.shape for k, v in wb.items()}


# ---------------------------------------------------------------------------------------------
# user errors
# ---------------------------------------------------------------------------------------------


def test_user_errors_are_one_line(tmp_path):
    from lmspec.runtime.tokenizer import train_bpe

    tok = tmp_path / "tok.json"
    train_bpe(["def f(x):\n    return x\n" * 50], 300, tok)
    cases = [
        ([*_train_cmd(tmp_path / "a"), "--tokenizer", str(tok)], "vocab_size"),
        ([*_train_cmd(tmp_path / "b"), "--data", str(tmp_path / "missing*.txt")], "no file matches"),
        ([*_train_cmd(tmp_path / "c"), "--scale", "0.5"], "not both"),
    ]
    for cmd, message in cases:
        proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr and "Traceback" not in proc.stderr
        assert not (Path(cmd[cmd.index("--out") + 1]) / "spec.yaml").exists()  # nothing written
        assert len(proc.stderr.strip().splitlines()) == 1
