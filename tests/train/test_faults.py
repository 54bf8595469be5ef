"""Fault injection for `lmspec train`, `plot` and `tokenizer`: damaged run directories, a full disk and bad
flags. Every case ends in exit status 2 with exactly one line on stderr and no traceback, and the
data-loss cases prove that every byte of the run's earlier checkpoints and `metrics.jsonl` survived.

Runs go through `lmspec.cli.main` in-process on the tiny spec scaled to 3 steps (checkpoints at every
step), so a case costs seconds; a resumed or overwritten run is compared bitwise with one uninterrupted
reference run.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file

import lmspec
from lmspec.cli import main
from lmspec.errors import CheckpointError
from lmspec.runtime import checkpoint as ckpt_mod
from lmspec.runtime import modeling
from lmspec.runtime.checkpoint import latest_checkpoint, save_checkpoint, step_dirs
from lmspec.train.metrics import read_metrics, without_timing

ROOT = Path(__file__).resolve().parents[2]
SPEC = str(ROOT / "examples" / "mimo_v2_flash_tiny.yaml")
# 3 steps (512 + 2048 + 2048 tokens), a checkpoint after each, evaluations at steps 2 and 3.
SMALL = ["--max-tokens", "3000", "--no-progress", "--eval-tokens", "512", "--eval-every", "2"]
SMALL += ["--checkpoint-every", "1"]
STEP = [f"step_{i:08d}" for i in range(4)]


def _train(out: Path, *extra: str) -> list[str]:
    return ["train", SPEC, "--out", str(out), *SMALL, *extra]


def lmspec_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def assert_refused(result: tuple[int, str, str], *needles: str) -> str:
    rc, _, err = result
    assert rc == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def snapshot(run: Path) -> dict[str, str]:
    """sha256 of every file under a run directory, by relative path."""
    return {
        str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run.rglob("*"))
        if p.is_file()
    }


def weights(run_or_ckpt: Path) -> dict[str, torch.Tensor]:
    path = run_or_ckpt if (run_or_ckpt / "model.safetensors").is_file() else latest_checkpoint(run_or_ckpt)
    return load_file(path / "model.safetensors")


def assert_same_run(a: Path, b: Path) -> None:
    assert without_timing(read_metrics(a)) == without_timing(read_metrics(b))
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One uninterrupted 3-step run: the bytes every other case is compared with."""
    out = tmp_path_factory.mktemp("reference") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as every test runs (conftest), before its function-scoped fixture exists
    try:
        assert main(_train(out)) == 0
    finally:
        torch.set_num_threads(threads)
    assert [p.name for p in step_dirs(out)] == STEP[1:]
    return out


@pytest.fixture
def run(reference, tmp_path) -> Path:
    """A private copy of the reference run, to damage."""
    copy = tmp_path / "run"
    shutil.copytree(reference, copy)
    return copy


@contextlib.contextmanager
def tmpfs(path: Path, size: str, *, read_only: bool = False):
    """A small tmpfs mounted at `path` (root only); skips the test where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if read_only else "")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


# ---------------------------------------------------------------------------------------------
# A run directory that already holds a run
# ---------------------------------------------------------------------------------------------


def test_fresh_start_into_a_finished_run_is_refused(run, capsys):
    before = snapshot(run)
    assert_refused(lmspec_cli(_train(run), capsys), "already holds checkpoints", "--resume", "--overwrite")
    shutil.rmtree(run / "checkpoints")  # metrics alone are data too
    before = snapshot(run)
    assert_refused(lmspec_cli(_train(run), capsys), "metrics.jsonl", "--overwrite")
    assert snapshot(run) == before


def test_resume_without_a_checkpoint_keeps_logged_metrics(run, capsys):
    shutil.rmtree(run / "checkpoints")
    before = snapshot(run)
    assert_refused(lmspec_cli(_train(run, "--resume"), capsys), "no checkpoint to resume from", "--overwrite")
    assert snapshot(run) == before


def test_overwrite_starts_afresh_and_matches_the_reference(run, reference, capsys):
    (run / "notes.txt").write_text("mine")  # not the run's: --overwrite leaves it alone
    rc, out, err = lmspec_cli(_train(run, "--overwrite"), capsys)
    assert rc == 0, err
    assert_same_run(reference, run)
    assert (run / "notes.txt").read_text() == "mine"


@contextlib.contextmanager
def locked_by_another_process(run: Path):
    """Another process holding the run directory's lock the way a running `lmspec train` does."""
    import sys

    code = (
        "import sys; from pathlib import Path; from lmspec.train.rundir import lock_run_dir; "
        "lock_run_dir(Path(sys.argv[1])); print('locked', flush=True); sys.stdin.read()"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(run)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        yield
    finally:
        proc.communicate("")  # its stdin closes: it exits, and the lock goes with it


@pytest.mark.parametrize("flags", [[], ["--resume"], ["--overwrite"]], ids=["fresh", "resume", "overwrite"])
def test_a_second_train_on_the_same_run_directory_is_refused(run, capsys, flags):
    """Two processes on one --out would interleave metrics and checkpoints: the second is refused."""
    before = snapshot(run)
    with locked_by_another_process(run):
        assert_refused(lmspec_cli(_train(run, *flags), capsys), "another process is training", ".train.lock")
        assert snapshot(run) == before
    # Once the other process has gone, the run directory is free again.
    rc, _, err = lmspec_cli(_train(run, "--resume"), capsys)
    assert rc == 0, err


def test_the_lock_of_a_new_run_directory_is_refused_too(tmp_path, capsys):
    out = tmp_path / "new" / "run"
    with locked_by_another_process(out):
        assert_refused(lmspec_cli(_train(out), capsys), "another process is training")
        assert [p.name for p in out.iterdir()] == [".train.lock"]


# ---------------------------------------------------------------------------------------------
# --resume on a damaged run directory: refused by name, nothing touched
# ---------------------------------------------------------------------------------------------


def _garble(path: Path) -> None:
    path.write_bytes(b"\x00\xff garbled \x9c" * 3)


LATEST_DAMAGE = {
    "garbled": lambda run, other: _garble(run / "checkpoints" / "LATEST"),
    "deleted": lambda run, other: (run / "checkpoints" / "LATEST").unlink(),
    "empty": lambda run, other: (run / "checkpoints" / "LATEST").write_text(""),
    "absolute path": lambda run, other: (run / "checkpoints" / "LATEST").write_text(
        str(other / "checkpoints" / STEP[3])
    ),
    "dot-dot": lambda run, other: (run / "checkpoints" / "LATEST").write_text(
        f"../../{other.name}/checkpoints/{STEP[3]}\n"
    ),
    "missing step": lambda run, other: (run / "checkpoints" / "LATEST").write_text("step_00000009\n"),
    "a directory": lambda run, other: (
        (run / "checkpoints" / "LATEST").unlink(),
        (run / "checkpoints" / "LATEST").mkdir(),
    ),
}


@pytest.mark.parametrize("damage", sorted(LATEST_DAMAGE))
def test_bad_latest_is_refused_and_offers_resume_from(run, tmp_path, capsys, damage):
    other = tmp_path / "other"
    shutil.copytree(run, other)
    LATEST_DAMAGE[damage](run, other)
    before, before_other = snapshot(run), snapshot(other)
    err = assert_refused(
        lmspec_cli(_train(run, "--resume"), capsys),
        "LATEST",
        f"intact checkpoints: {STEP[1]}, {STEP[2]}, {STEP[3]}",
        f"--resume-from {STEP[3]}",
    )
    assert "Traceback" not in err
    assert snapshot(run) == before and snapshot(other) == before_other
    # The offered flag works: the run is complete, so it resumes at its end and LATEST is repaired.
    rc, out, err = lmspec_cli(_train(run, "--resume-from", STEP[3]), capsys)
    assert rc == 0, err
    assert (run / "checkpoints" / "LATEST").read_text() == STEP[3] + "\n"
    assert {k: v for k, v in snapshot(run).items() if "LATEST" not in k and k != "plot.png"} == {
        k: v for k, v in before.items() if "LATEST" not in k and k != "plot.png"
    }


FILE_DAMAGE = {
    "model.safetensors truncated": ("model.safetensors", lambda p: p.write_bytes(p.read_bytes()[:1000])),
    "model.safetensors empty": ("model.safetensors", lambda p: p.write_bytes(b"")),
    "optimizer.pt truncated": ("optimizer.pt", lambda p: p.write_bytes(p.read_bytes()[:-1])),
    "optimizer.pt flipped byte": (
        "optimizer.pt",
        lambda p: p.write_bytes(p.read_bytes()[:-9] + b"\x00" + p.read_bytes()[-8:]),
    ),
    "trainer_state.json garbled": ("trainer_state.json", _garble),
    "trainer_state.json deleted": ("trainer_state.json", lambda p: p.unlink()),
    "manifest.json garbled": ("manifest.json", _garble),
    "manifest.json deleted": ("manifest.json", lambda p: p.unlink()),
}


@pytest.mark.parametrize("damage", sorted(FILE_DAMAGE))
def test_damaged_newest_checkpoint_is_refused_by_name(run, capsys, damage):
    name, spoil = FILE_DAMAGE[damage]
    spoil(run / "checkpoints" / STEP[3] / name)
    before = snapshot(run)
    assert_refused(
        lmspec_cli(_train(run, "--resume"), capsys),
        f"{STEP[3]}/{name}",
        f"intact checkpoints: {STEP[1]}, {STEP[2]}",
        f"--resume-from {STEP[2]} --overwrite",
    )
    assert snapshot(run) == before


def _edit_json(path: Path, **fields) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


# An edited manifest.json: it cannot vouch for less than the checkpoint holds, nor be read without bound.
MANIFEST_EDITS = {
    "lists nothing": (lambda m: _edit_json(m, files={}), "not listed in manifest.json"),
    "another step": (lambda m: _edit_json(m, step=99), "says step 99"),
    "nested deep": (lambda m: m.write_text("[" * 100_000 + "]" * 100_000), "nested too deeply"),
    "2 MB": (lambda m: m.write_text(json.dumps({"pad": "x" * 2_000_000})), "larger than"),
    "a size of 1e30": (
        lambda m: _edit_json(
            m, files={**json.loads(m.read_text())["files"], "config.json": {"size": 10**30, "sha256": "0"}}
        ),
        "truncated",
    ),
}


@pytest.mark.parametrize("edit", sorted(MANIFEST_EDITS))
def test_an_edited_manifest_is_refused(run, capsys, edit):
    spoil, needle = MANIFEST_EDITS[edit]
    spoil(run / "checkpoints" / STEP[3] / "manifest.json")
    before = snapshot(run)
    assert_refused(lmspec_cli(_train(run, "--resume"), capsys), STEP[3], needle, f"--resume-from {STEP[2]}")
    assert snapshot(run) == before


def _rewrite_consistently(ckpt: Path, name: str, spoil) -> None:
    """Edit a checkpoint file and its manifest to match: only the content checks can catch it."""
    spoil(ckpt / name)
    ckpt_mod.write_manifest(ckpt, ckpt_mod.checkpoint_step(ckpt))


def _optimizer(path: Path, change) -> None:
    saved = torch.load(path, weights_only=True)
    torch.save(change(saved), path)


def _first_moment_reshaped(saved: dict) -> dict:
    name = next(iter(saved["state"]))
    saved["state"][name]["exp_avg"] = torch.zeros(3, 5)
    return saved


# Files whose manifest was rewritten to match: each field of the state and the optimizer's structure is
# still checked, by name, before training resumes.
CONSISTENT_EDITS = {
    "step as a string": ("trainer_state.json", lambda p: _edit_json(p, step="3"), "step: expected"),
    "negative step": ("trainer_state.json", lambda p: _edit_json(p, step=-5), "step: expected"),
    "another step": ("trainer_state.json", lambda p: _edit_json(p, step=2), "the directory is"),
    "tokens as text": ("trainer_state.json", lambda p: _edit_json(p, tokens="many"), "tokens: expected"),
    "data_position < 0": ("trainer_state.json", lambda p: _edit_json(p, data_position=-1), "data_position"),
    "elapsed_s as text": ("trainer_state.json", lambda p: _edit_json(p, elapsed_s="x"), "elapsed_s"),
    "last_val as text": ("trainer_state.json", lambda p: _edit_json(p, last_val="x"), "last_val"),
    "torch rng short": (
        "trainer_state.json",
        lambda p: _edit_json(p, rng={**json.loads(p.read_text())["rng"], "torch": "AAAA"}),
        "rng: torch",
    ),
    "torch rng not base64": (
        "trainer_state.json",
        lambda p: _edit_json(p, rng={**json.loads(p.read_text())["rng"], "torch": "!!"}),
        "rng: torch",
    ),
    "python rng short": (
        "trainer_state.json",
        lambda p: _edit_json(p, rng={**json.loads(p.read_text())["rng"], "python": [3, [1, 2], None]}),
        "rng: python",
    ),
    "state nested deep": ("trainer_state.json", lambda p: p.write_text("[" * 100_000), "nested too deeply"),
    "optimizer an empty dict": ("optimizer.pt", lambda p: torch.save({}, p), "not an optimizer state"),
    "optimizer a tensor": ("optimizer.pt", lambda p: torch.save(torch.zeros(3), p), "not an optimizer state"),
    "optimizer unknown names": (
        "optimizer.pt",
        lambda p: _optimizer(p, lambda s: {"state": {"nope": {}}, "param_groups": s["param_groups"]}),
        "does not fit the model",
    ),
    "optimizer moment of another shape": (
        "optimizer.pt",
        lambda p: _optimizer(p, _first_moment_reshaped),
        "has shape (3, 5)",
    ),
}


@pytest.mark.parametrize("edit", sorted(CONSISTENT_EDITS))
def test_checkpoint_contents_are_checked_even_when_the_manifest_agrees(run, capsys, edit):
    name, spoil, needle = CONSISTENT_EDITS[edit]
    _rewrite_consistently(run / "checkpoints" / STEP[3], name, spoil)
    before = snapshot(run)
    assert_refused(lmspec_cli(_train(run, "--resume"), capsys), f"{STEP[3]}/{name}", needle)
    assert snapshot(run) == before


def test_metrics_that_are_not_a_regular_file_are_never_written_through(run, tmp_path, capsys):
    """A metrics.jsonl linked to another run's would be cut back and appended to: refused, both intact."""
    other = tmp_path / "other_metrics.jsonl"
    shutil.copyfile(run / "metrics.jsonl", other)
    kept = other.read_bytes()
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").symlink_to(other)
    assert_refused(lmspec_cli(_train(run, "--resume-from", STEP[1], "--overwrite"), capsys), "symbolic link")
    assert other.read_bytes() == kept and (run / "checkpoints" / STEP[3]).is_dir()
    (run / "metrics.jsonl").unlink()
    os.mkfifo(run / "metrics.jsonl")  # would block an open for appending
    assert_refused(lmspec_cli(_train(run, "--resume"), capsys), "a FIFO, not a regular file")
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    os.mkfifo(fresh / "metrics.jsonl")
    assert_refused(lmspec_cli(_train(fresh), capsys), "a FIFO, not a regular file")


def test_a_linked_spec_yaml_is_replaced_not_written_through(tmp_path, capsys):
    mine = tmp_path / "mine.yaml"
    mine.write_text("# my notes, not a spec\n")
    out = tmp_path / "run"
    out.mkdir()
    (out / "spec.yaml").symlink_to(mine)
    rc, _, err = lmspec_cli(_train(out), capsys)
    assert rc == 0, err
    assert mine.read_text() == "# my notes, not a spec\n"
    assert (
        not (out / "spec.yaml").is_symlink() and "name: mimo_v2_flash_tiny" in (out / "spec.yaml").read_text()
    )


def test_offered_resume_from_continues_bitwise(run, reference, capsys):
    """LATEST garbled and the newest checkpoint truncated: the advice given resumes to the same bytes."""
    _garble(run / "checkpoints" / "LATEST")
    FILE_DAMAGE["model.safetensors truncated"][1](run / "checkpoints" / STEP[3] / "model.safetensors")
    kept = {k: v for k, v in snapshot(run).items() if k.startswith(f"checkpoints/{STEP[1]}/")}
    err = assert_refused(lmspec_cli(_train(run, "--resume"), capsys), "--resume-from")
    flags = err.split("pass ")[-1].split(" (")[0].split()
    assert flags == ["--resume-from", STEP[2], "--overwrite"]
    # Without --overwrite the newer (damaged) checkpoint is not replaced.
    assert_refused(lmspec_cli(_train(run, *flags[:2]), capsys), "would replace the newer", STEP[3])
    rc, _, err = lmspec_cli(_train(run, *flags), capsys)
    assert rc == 0, err
    assert_same_run(reference, run)
    assert {k: v for k, v in snapshot(run).items() if k.startswith(f"checkpoints/{STEP[1]}/")} == kept


def test_a_newer_intact_checkpoint_than_latest_is_not_replaced(run, capsys):
    """A crash between renaming a checkpoint into place and updating LATEST leaves LATEST one behind."""
    (run / "checkpoints" / "LATEST").write_text(STEP[2] + "\n")
    before = snapshot(run)
    assert_refused(
        lmspec_cli(_train(run, "--resume"), capsys),
        f"would replace the newer {STEP[3]}",
        f"--resume-from {STEP[3]}",
    )
    assert snapshot(run) == before


def test_resume_from_names_only_checkpoints_of_the_run(run, capsys):
    before = snapshot(run)
    for bad in ("../other/step_00000001", "/tmp", "step_x"):
        assert_refused(lmspec_cli(_train(run, "--resume-from", bad), capsys), "--resume-from")
    assert_refused(lmspec_cli(_train(run, "--resume-from", "step_7"), capsys), "does not exist")
    assert snapshot(run) == before


def test_partial_saves_are_cleaned_when_training_starts(run, capsys):
    debris = run / "checkpoints" / ".tmp_step_00000004.12345"
    debris.mkdir()
    (debris / "model.safetensors").write_bytes(b"partial")
    rc, _, err = lmspec_cli(_train(run, "--resume"), capsys)
    assert rc == 0, err
    assert not list((run / "checkpoints").glob(".tmp_*"))


def test_generate_and_from_pretrained_refuse_a_truncated_checkpoint(run, capsys):
    model_file = run / "checkpoints" / STEP[3] / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[: model_file.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: truncated"):
        lmspec.from_pretrained(run)
    argv = ["generate", SPEC, "--checkpoint", str(run), "--prompt", "def", "--max-tokens", "2"]
    assert_refused(lmspec_cli(argv, capsys), "model.safetensors: truncated")
    (run / "checkpoints" / "LATEST").write_text("/etc\n")  # never followed outside the run
    assert_refused(lmspec_cli(argv, capsys), "LATEST: names '/etc'", f"e.g. {run / 'checkpoints' / STEP[2]}")


def test_pruning_never_removes_checkpoints_newer_than_the_one_written(tmp_path):
    state = {"step": 0, "tokens": 0, "data_position": 0, "rng": {}, "corpus": "c", "spec_hash": "h"}

    def save(step: int) -> Path:
        return save_checkpoint(
            tmp_path,
            step,
            save_model=lambda d: (d / "model.safetensors").write_bytes(b"w"),
            optimizer_state={},
            trainer_state={**state, "step": step},
            keep=2,
        )

    for step in (5, 6):
        save(step)
    for step in (1, 2, 3):
        save(step)
    # Retention counts only checkpoints up to the one just written: 1 went, 5 and 6 were never candidates.
    assert [p.name for p in step_dirs(tmp_path)] == [f"step_0000000{i}" for i in (2, 3, 5, 6)]
    with pytest.raises(CheckpointError, match="never replaced"):
        save(6)


# ---------------------------------------------------------------------------------------------
# A full disk while writing a checkpoint
# ---------------------------------------------------------------------------------------------


def _enospc_on_second_checkpoint(monkeypatch, target: str) -> None:
    """Make the second checkpoint's `torch.save` (optimizer.pt) or safetensors write hit a full disk."""
    module, name = (ckpt_mod.torch, "save") if target == "torch.save" else (modeling, "write_atomic")
    real = getattr(module, name)
    calls = {"n": 0}
    per_checkpoint = 1 if target == "torch.save" else 3  # save_pretrained writes 3 files

    def full(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == per_checkpoint + 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, full)


@pytest.mark.parametrize("target", ["torch.save", "safetensors write"])
def test_disk_full_keeps_the_previous_checkpoint_and_resume_is_bitwise(
    reference, tmp_path, monkeypatch, capsys, target
):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _enospc_on_second_checkpoint(m, target)
        assert_refused(
            lmspec_cli(_train(out), capsys),
            "No space left on device",
            f"{STEP[2]}: ",
            f"LATEST still names {STEP[1]}",
        )
    assert (out / "checkpoints" / "LATEST").read_text() == STEP[1] + "\n"
    assert not list((out / "checkpoints").glob(".tmp_*"))
    assert latest_checkpoint(out).name == STEP[1]
    rc, _, err = lmspec_cli(_train(out, "--resume"), capsys)
    assert rc == 0, err
    assert_same_run(reference, out)


def test_disk_full_while_logging_metrics_names_the_file(tmp_path, capsys):
    """/dev/full fails every write with ENOSPC: a real full-disk error, on the metrics file."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").symlink_to("/dev/full")
    assert_refused(lmspec_cli(_train(out), capsys), "metrics.jsonl: No space left on device")


def test_a_real_full_tmpfs(reference, tmp_path, capsys):
    """On a 90 MB tmpfs the third 37 MB checkpoint does not fit; after growing it, --resume finishes."""
    mount = tmp_path / "small"
    with tmpfs(mount, "90m"):
        out = mount / "run"
        assert_refused(
            lmspec_cli(_train(out), capsys), "No space left on device", f"LATEST still names {STEP[2]}"
        )
        kept = snapshot(out)
        assert not list((out / "checkpoints").glob(".tmp_*"))
        subprocess.run(["mount", "-o", "remount,size=200m", str(mount)], check=True)
        rc, _, err = lmspec_cli(_train(out, "--resume"), capsys)
        assert rc == 0, err
        assert_same_run(reference, out)
        after = snapshot(out)
        assert all(after[k] == v for k, v in kept.items() if k.startswith("checkpoints/step_"))


# ---------------------------------------------------------------------------------------------
# Bad flags: one line, exit 2, nothing written
# ---------------------------------------------------------------------------------------------


BAD_FLAGS = [
    (["--device", "banana"], "--device"),
    (["--device", "meta"], "--device meta"),
    (["--backend", "banana"], "--backend"),
    (["--max-tokens", "inf"], "--max-tokens"),
    (["--max-tokens", "nan"], "--max-tokens"),
    (["--max-tokens", "-1"], "--max-tokens"),
    (["--max-tokens", "0"], "--max-tokens"),
    (["--max-tokens", "1e30"], "steps"),
    (["--scale", "-0.5"], "--scale"),
    (["--eval-every", "0"], "--eval-every"),
    (["--eval-every", "-1"], "--eval-every"),
    (["--eval-every", "2.5"], "--eval-every"),
    (["--checkpoint-every", "0"], "--checkpoint-every"),
    (["--checkpoint-every", "-3"], "--checkpoint-every"),
    (["--micro-batch-size", "0"], "--micro-batch-size"),
    (["--micro-batch-size", "-1"], "--micro-batch-size"),
    (["--eval-tokens", "0"], "--eval-tokens"),
    (["--eval-tokens", "-5"], "--eval-tokens"),
    (["--keep-checkpoints", "0"], "--keep-checkpoints"),
    (["--data", "/dev/zero"], "character device"),
    (["--tokenizer", "/dev/zero"], "character device"),
    (["--resume-from", "../elsewhere"], "--resume-from"),
    (["--set", "training.stages.0.seq_len=1000000"], "seq_len"),
]


@pytest.mark.parametrize(("flags", "needle"), BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_train_flags(tmp_path, capsys, flags, needle):
    out = tmp_path / "run"
    assert_refused(lmspec_cli([*_train(out), *flags], capsys), needle)
    assert not out.exists()


def test_data_that_is_not_regular_files(tmp_path, capsys):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    empty = tmp_path / "empty"
    empty.mkdir()
    only_fifo = tmp_path / "only_fifo"
    only_fifo.mkdir()
    os.mkfifo(only_fifo / "pipe")
    out = tmp_path / "run"
    assert_refused(lmspec_cli([*_train(out), "--data", str(fifo)], capsys), "a FIFO, not a regular file")
    for folder in (empty, only_fifo):
        assert_refused(lmspec_cli([*_train(out), "--data", str(folder)], capsys), "no regular file")
    assert_refused(lmspec_cli([*_train(out), "--data", str(tmp_path / "none.txt")], capsys), "no such file")
    assert not out.exists()


def test_out_that_cannot_hold_a_run(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert_refused(lmspec_cli(_train(a_file), capsys), "not a directory")
    assert a_file.read_text() == "x"
    assert_refused(lmspec_cli(_train(Path("/proc/lmspec_run")), capsys), "cannot write the run directory")
    assert_refused(lmspec_cli(_train(a_file / "run"), capsys), "cannot write the run directory")


def test_out_on_a_read_only_filesystem(tmp_path, capsys):
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        assert_refused(lmspec_cli(_train(ro / "run"), capsys), "Read-only file system")


def test_triton_on_a_cpu_without_the_interpreter_is_refused(tmp_path, capsys, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device runs the Triton kernels natively")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out = tmp_path / "run"
    assert_refused(lmspec_cli([*_train(out), "--backend", "triton"], capsys), "TRITON_INTERPRET=1")
    assert not out.exists()


def test_an_allocation_failure_is_one_line(tmp_path):
    """A real allocation failure: a 1M-token stage in a process capped at 3 GB of address space."""
    import resource
    import sys

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

    out = tmp_path / "run"
    big = ["--set", "model.max_position_embeddings=1000000", "--set", "training.stages.0.seq_len=1000000"]
    proc = subprocess.run(
        [sys.executable, "-m", "lmspec", *_train(out), *big],
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        preexec_fn=cap,
    )
    assert_refused((proc.returncode, proc.stdout, proc.stderr), "out of memory while training", "seq_len")


def test_optimizer_values_adamw_refuses_are_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    argv = [*_train(out), "--set", "training.optimizer.betas=[2.0,-1.0]"]
    rc, _, err = lmspec_cli(argv, capsys)
    assert_refused((rc, "", err), "betas")


# ---------------------------------------------------------------------------------------------
# plot and tokenizer
# ---------------------------------------------------------------------------------------------


def test_plot_of_garbled_metrics_names_the_line(run, capsys):
    metrics = run / "metrics.jsonl"
    lines = metrics.read_bytes().split(b"\n")
    cases = {
        b"\x00\xffnot json": "metrics.jsonl:2: not JSON",
        b"[1, 2]": "expected a JSON object",
        b'{"step": 2}': "no field",
        json.dumps({**json.loads(lines[1]), "tokens": "many"}).encode(): "tokens",
        json.dumps({**json.loads(lines[1]), "expert_load": [[1], [1, 2]]}).encode(): "expert_load",
        b"[" * 100_000: "not JSON",
    }
    for bad, needle in cases.items():
        metrics.write_bytes(b"\n".join([lines[0], bad, *lines[2:]]))
        assert_refused(lmspec_cli(["plot", str(run)], capsys), needle)
    # A torn last line (a crash mid-write) is not an error.
    metrics.write_bytes(b"\n".join(lines[:-1]) + b'\n{"step": 4, "lo')
    assert lmspec_cli(["plot", str(run)], capsys)[0] == 0


@given(
    cut=st.integers(0, 10_000),
    junk=st.binary(max_size=40),
    keep=st.integers(0, 3),
)
def test_plot_never_crashes_on_damaged_metrics(reference, tmp_path_factory, cut, junk, keep):
    """Any cut and splice of a real metrics file either plots or is refused in one line."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    run = tmp_path_factory.mktemp("plot")
    data = (reference / "metrics.jsonl").read_bytes()
    cut = cut % (len(data) + 1)
    (run / "metrics.jsonl").write_bytes(data[:cut] + junk + data[cut:][: keep * 800])
    err = io.StringIO()
    with redirect_stdout(io.StringIO()), redirect_stderr(err):
        rc = main(["plot", str(run), "-o", str(run / "p.png")])
    assert rc in (0, 2)
    if rc == 2:
        assert len(err.getvalue().strip().splitlines()) == 1


def test_plot_to_a_read_only_place(run, capsys):
    assert_refused(lmspec_cli(["plot", str(run), "-o", "/proc/lmspec_plot/p.png"], capsys), "/proc")


@pytest.mark.parametrize(
    ("vocab", "needle"), [("1e8", "1,048,576"), ("0", "257"), ("256", "257"), ("-3", "257"), ("3.5", "257")]
)
def test_tokenizer_vocab_size_out_of_range(tmp_path, capsys, vocab, needle):
    out = tmp_path / "tok.json"
    assert_refused(
        lmspec_cli(["tokenizer", "train", "--vocab-size", vocab, "-o", str(out)], capsys),
        "--vocab-size",
        needle,
    )
    assert not out.exists()


def test_tokenizer_output_that_cannot_be_written(tmp_path, capsys):
    data = tmp_path / "d.txt"
    data.write_text("def f(x):\n    return x\n" * 20)
    argv = ["tokenizer", "train", "--data", str(data), str(data), "--vocab-size", "300", "-o"]
    assert_refused(lmspec_cli([*argv, "/proc/lmspec/tok.json"], capsys), "-o /proc/lmspec/tok.json")
    assert_refused(lmspec_cli([*argv, str(tmp_path)], capsys), "is a directory")
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        assert_refused(lmspec_cli([*argv, str(ro / "tok.json")], capsys), "Read-only file system")
