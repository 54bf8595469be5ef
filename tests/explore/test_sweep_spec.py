"""Sweep files are validated like specs: every mistake is one `file:line:col` line, exit 2, before anything trains.

Each bad sweep runs through `lmspec sweep` in-process; the test checks the located line, that nothing was
written under `--out` (no run started), and the expansion of good sweeps into runs.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lmspec.cli import main
from lmspec.errors import SpecError
from lmspec.spec.sweep import is_sweep_file, load_sweep, sweep_from_args

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "examples" / "mimo_v2_flash_tiny.yaml"


def _sweep(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(f"name: s\nbase: {TINY}\n{body}")
    return path


def _refused(argv: list[str], capsys) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, (rc, err)
    return lines[0]


# (sweep body after name/base, line, col of the error, words the message must hold)
BAD = [
    ("axes:\n  model.attention.swa.windw: [16, 32]\n", 4, 23, "did you mean 'window'"),
    ("axes:\n  model.attention.swa.window: [16, banana]\n", 4, 36, "expected an integer, got 'banana'"),
    ("axes:\n  model.attention.swa.window: [16, 5000]\n", 4, 36, "at most max_position_embeddings"),
    ("axes:\n  model.attention.swa.sink: [true, maybe]\n", 4, 36, "expected true or false"),
    ("axes:\n  model.max_position_embeddings: [256]\n", 4, 35, "breaks"),
    ("seeds: 2\nsedes: 3\n", 4, 1, "did you mean 'seeds'"),
    ("max_tokens: 1e4\nscale: 0.5\n", 4, 1, "not both"),
    (
        "combine: zip\naxes:\n  model.hidden_size: [64, 96]\n  model.attention.swa.window: [8]\n",
        4,
        1,
        "one length",
    ),
    ("variants:\n  w: {set: {model.attention.swa.windw: 8}}\n", 4, 33, "did you mean 'window'"),
    ("variants:\n  w: {sett: {}}\n", 4, 7, "did you mean 'set'"),
    ("variants:\n  w: {extends: no_such.yaml}\n", 4, 16, "does not exist"),
    ("seeds: [0, 0]\n", 3, 1, "distinct"),
]


@pytest.mark.parametrize("body,line,col,words", BAD, ids=[b[3] for b in BAD])
def test_a_bad_sweep_is_one_located_line_and_nothing_trains(body, line, col, words, tmp_path, capsys):
    path = _sweep(tmp_path, body)
    out = tmp_path / "out"
    msg = _refused(["sweep", str(path), "--out", str(out)], capsys)
    assert msg.startswith(f"{path}:{line}:{col}: "), msg
    assert words in msg
    assert not out.exists()


def test_a_missing_base_is_located_at_base(tmp_path, capsys):
    path = tmp_path / "sweep.yaml"
    path.write_text("name: s\nbase: nowhere.yaml\n")
    msg = _refused(["sweep", str(path), "--out", str(tmp_path / "out")], capsys)
    assert msg.startswith(f"{path}:2:7: base: ") and "does not exist" in msg


def test_vary_on_the_command_line_is_located_in_its_argument(tmp_path, capsys):
    out = str(tmp_path / "out")
    msg = _refused(["sweep", str(TINY), "--vary", "model.attention.swa.window=16,abc", "--out", out], capsys)
    assert msg.startswith("--vary:1:31: model.attention.swa.window: expected an integer, got 'abc'"), msg
    msg = _refused(
        [
            "sweep",
            str(TINY),
            "--vary",
            "model.hidden_size=64",
            "--vary",
            "model.ffn.dense.intermediat=1",
            "--out",
            out,
        ],
        capsys,
    )
    assert msg.startswith("--vary:2:") and "did you mean 'intermediate_size'" in msg
    assert not Path(out).exists()


def test_a_schedule_too_long_to_run_is_refused_before_training(tmp_path, capsys):
    path = _sweep(tmp_path, "max_tokens: 1.0e30\n")
    out = tmp_path / "out"
    msg = _refused(["sweep", str(path), "--out", str(out)], capsys)
    assert "more than" in msg and "steps" in msg
    assert not (out / "runs").exists()


def test_two_runs_of_one_spec_are_refused(tmp_path, capsys):
    path = _sweep(tmp_path, "variants:\n  a: {}\n  b: {set: {model.attention.swa.window: 32}}\n")
    msg = _refused(["sweep", str(path), "--out", str(tmp_path / "out")], capsys)
    assert "b seed 0 is the same spec as a seed 0" in msg


def test_a_sweep_over_a_pipeline_with_a_mopd_stage_is_refused(tmp_path, capsys):
    pipeline = Path(__file__).resolve().parents[2] / "examples" / "posttrain_tiny" / "pipeline.yaml"
    path = tmp_path / "sweep.yaml"
    path.write_text(f"name: distill\nbase: {pipeline}\nvariants: {{a: {{}}}}\n")
    out = tmp_path / "out"
    msg = _refused(["sweep", str(path), "--out", str(out), "--dry-run"], capsys)
    assert "a seed 0: expected pretrain and sft stages, got mopd stage 'mopd'" in msg
    assert not (out / "runs").exists()


def test_a_sweep_file_with_command_line_axes_is_refused(tmp_path, capsys):
    path = _sweep(tmp_path, "")
    msg = _refused(
        ["sweep", str(path), "--vary", "model.hidden_size=64", "--out", str(tmp_path / "o")], capsys
    )
    assert "drop --vary" in msg


def test_product_zip_variants_and_seeds_expand_in_order(tmp_path):
    path = _sweep(
        tmp_path,
        "seeds: [3, 7]\naxes:\n  model.attention.swa.window: [16, 64]\n  model.attention.swa.sink: [true, false]\n",
    )
    s = load_sweep(path)
    labels = [(p.label, p.seed) for p in s.points]
    assert labels == [
        (f"window={w},sink={k}", seed) for w in (16, 64) for k in ("true", "false") for seed in (3, 7)
    ]
    assert all(p.spec.training.seed == p.seed for p in s.points)
    assert (
        s.points[2].spec.model.attention["swa"].window == 16
        and not s.points[2].spec.model.attention["swa"].sink
    )

    path = _sweep(
        tmp_path,
        "combine: zip\naxes:\n  model.hidden_size: [64, 96]\n  model.attention.swa.window: [8, 24]\n",
    )
    assert [p.label for p in load_sweep(path).points] == [
        "hidden_size=64,window=8",
        "hidden_size=96,window=24",
    ]

    path = _sweep(
        tmp_path,
        "variants:\n  g: {set: {model.layers: 'G0 G*6', model.blocks.MTP.attention: global}}\n  s: {}\n"
        "axes:\n  model.attention.global.rope.theta: [1.0e4]\n",
    )
    s = load_sweep(path)
    assert [p.label for p in s.points] == ["g/theta=1.0e4", "s/theta=1.0e4"]
    assert s.points[0].spec.model.layers == "G0 G*6" and s.points[0].settings[0] == ("model.layers", "G0 G*6")


def test_axes_that_share_a_last_name_are_labelled_by_path(tmp_path):
    s = sweep_from_args(
        TINY,
        ["model.attention.swa.num_heads=4", "model.attention.global.num_heads=4"],
        name="x",
    )
    assert [p.label for p in s.points] == [
        "model.attention.swa.num_heads=4,model.attention.global.num_heads=4"
    ]


def test_sweep_files_are_told_from_specs():
    assert is_sweep_file(ROOT / "examples" / "sweeps" / "micro.yaml")
    assert not is_sweep_file(TINY)


@pytest.mark.parametrize("path", sorted((ROOT / "examples" / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_sweeps_load(path):
    s = load_sweep(path)
    assert s.points and all(p.spec.training is not None for p in s.points)


def test_errors_carry_positions_not_tracebacks(tmp_path):
    path = _sweep(tmp_path, "axes:\n  model.attention.swa.window: [16, 5000]\n")
    with pytest.raises(SpecError) as e:
        load_sweep(path)
    assert re.fullmatch(rf"{re.escape(str(path))}:4:36: model\.attention\.swa\.window: .*", str(e.value))
