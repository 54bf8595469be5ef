"""Stage kinds, init_from, sft data, mopd fields and per-stage MTP blocks: each misuse is one line, exit 2."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from lmspec.spec import load_spec

from .conftest import TINY

STAGE = "tokens: 1.0e4, seq_len: 64, batch_size: {size: 4}, lr: {kind: constant, peak: 1.0e-3}"


def _spec(tmp_path: Path, stages: str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    body = textwrap.indent(textwrap.dedent(stages).strip("\n"), "    ")
    path.write_text(f"extends: {TINY}\ntraining:\n  stages:\n{body}\n".replace("STAGE", STAGE))
    return path


def _error(run_cli, *args) -> str:
    code, out, err = run_cli(*args)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


MOPD = "{name: m, kind: mopd, prompts: p.jsonl, rollouts_per_prompt: 4, eps_low: 0.5, eps_high: 2, max_new_tokens: 8, STAGE"

CASES = [
    (
        "- {name: a, kind: rl, STAGE}",
        "4:17: training.stages.0.kind: expected 'pretrain', 'sft' or 'mopd', got 'rl'",
    ),
    (
        "- {name: a, kind: sft, STAGE}",
        "4:7: training.stages.0.data: expected a chat JSONL file for a sft stage",
    ),
    ("- {name: a, data: c.jsonl, STAGE}", "4:17: training.stages.0.data: expected only in a sft stage"),
    (
        f"- {MOPD}}}",
        "4:7: training.stages.0.teachers: expected a mapping of domain to teacher for a mopd stage",
    ),
    (
        f"- {MOPD}, teachers: {{math: 5}}}}",
        "training.stages.0.teachers.math: expected a run directory path or",
    ),
    (f"- {MOPD}, teachers: {{math: {{uri: x}}}}}}", "unknown key 'uri' (did you mean 'url'?)"),
    (
        f"- {MOPD}, teachers: {{math: {{url: ftp://x}}}}}}",
        "training.stages.0.teachers.math.url: expected a name",
    ),
    (f"- {MOPD}, teachers: {{}}}}", "training.stages.0.teachers: expected at least one domain"),
    (
        "- {name: a, init_from: a, STAGE}",
        "training.stages.0.init_from: expected an earlier stage, a run or a Hugging",
    ),
    ("- {name: a, init_from: b, STAGE}\n- {name: b, STAGE}", "got 'b' (a later stage)"),
    (
        f"- {MOPD}, teachers: {{math: b}}}}\n- {{name: b, STAGE}}",
        "training.stages.0.teachers.math: expected an earlier stage, a run or a Hugging Face directory, got 'b' "
        "(a later stage)",
    ),
    (f"- {MOPD}, teachers: {{math: m}}}}", "training.stages.0.teachers.math: expected an earlier stage"),
    ("- {name: a, STAGE}\n- {name: a, STAGE}", "training.stages.1.name: expected a name no other stage has"),
    ("- {name: a, init_from: 7, STAGE}", "training.stages.0.init_from: expected a string, got 7"),
    (
        "- {name: a, STAGE, overrides: {mtp_init: replicate}}",
        "training.stages.0.overrides.mtp_init: expected replicate only where a stage trains more MTP blocks",
    ),
    (
        "- {name: a, STAGE, overrides: {mtp_num_blocks: 2}}\n- {name: b, STAGE, overrides: {mtp_num_blocks: 1, mtp_init: replicate}}",
        "(here 2 -> 1)",
    ),
    (
        "- {name: a, STAGE, overrides: {mtp_num_blocks: 2, mtp_depth_weights: [1, 0.5, 0.25]}}",
        "training.stages.0.overrides.mtp_depth_weights: expected one weight per MTP block (this stage trains 2), got 3",
    ),
    (
        "- {name: a, STAGE, overrides: {mtp_depth_weights: [0, 0, 0]}}",
        "expected at least one positive weight, got all zero",
    ),
]


@pytest.mark.parametrize(("stages", "message"), CASES)
def test_stage_errors_are_one_line(run_cli, tmp_path, stages, message):
    path = _spec(tmp_path, stages)
    line = _error(run_cli, "check", path)
    assert line.startswith(str(path)), line
    assert message in line, line


def _model_dir(tmp_path: Path, name: str, vocab: int) -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"vocab_size": vocab}))
    return d


def test_teacher_and_init_from_with_another_vocab_are_refused_at_check(run_cli, tmp_path):
    _model_dir(tmp_path, "teacher_math", 512)
    path = _spec(tmp_path, f"- {MOPD}, teachers: {{math: teacher_math, code: {{url: 'http://h:8000'}}}}}}")
    assert _error(run_cli, "check", path).endswith(
        "training.stages.0.teachers.math: teacher `math` has vocab 512 but the student 256"
    )
    _model_dir(tmp_path, "base", 1024)
    path = _spec(tmp_path, "- {name: a, init_from: base, STAGE}")
    line = _error(run_cli, "check", path)
    assert (
        f"training.stages.0.init_from: init_from '{tmp_path / 'base'}' has vocab 1024 but the spec 256"
        in line
    )
    (tmp_path / "empty").mkdir()
    path = _spec(tmp_path, "- {name: a, init_from: empty, STAGE}")
    assert "expected a run directory (spec.yaml) or a Hugging Face directory (config.json)" in _error(
        run_cli, "check", path
    )


def test_paths_that_do_not_exist_pass_check_and_stop_train(run_cli, tmp_path):
    path = _spec(tmp_path, "- {name: a, init_from: runs/nowhere, STAGE}")
    code, out, _ = run_cli("check", path)
    assert code == 0 and "1 training stages" in out
    line = _error(run_cli, "train", path, "--out", tmp_path / "run", "--no-progress")
    assert "training.stages.0.init_from: expected an existing run or Hugging Face directory" in line
    assert "runs/nowhere" in line and not (tmp_path / "run").exists()
    path = _spec(tmp_path, "- {name: a, kind: sft, data: missing.jsonl, STAGE}")
    assert "training.stages.0.data: expected a chat JSONL file" in _error(
        run_cli, "train", path, "--out", tmp_path / "run", "--no-progress"
    )


def test_bad_chat_data_stops_train_in_one_line(run_cli, tmp_path):
    chat = tmp_path / "chat.jsonl"
    for text, message in [
        ("", "expected at least one conversation, got an empty file"),
        ("not json\n", "chat.jsonl:1: not JSON"),
        (
            '{"messages": [{"role": "user", "content": "hi"}]}\n',
            "chat.jsonl:1: expected at least one assistant",
        ),
    ]:
        chat.write_text(text)
        path = _spec(tmp_path, f"- {{name: a, kind: sft, data: {chat}, STAGE}}")
        assert message in _error(run_cli, "train", path, "--out", tmp_path / "run", "--no-progress")


def test_paths_are_relative_to_the_file_that_writes_them(tmp_path):
    sub = tmp_path / "sub"
    sub.mkdir()
    path = _spec(sub, "- {name: a, kind: sft, data: chat.jsonl, STAGE}")
    assert load_spec(path).training.stages[0].data == str(sub / "chat.jsonl")


def test_the_examples_train_one_mtp_block_then_three():
    for spec in (load_spec(TINY), load_spec(Path(TINY).with_name("mimo_v2_flash.yaml"))):
        kinds = [s.kind for s in spec.training.stages]
        assert kinds == ["pretrain", "pretrain", "pretrain", "sft"]
        assert [spec.stage_mtp_blocks(i) for i in range(4)] == [1, 1, 1, 3]
        assert spec.training.stages[3].overrides.mtp_init == "replicate"
    sft = load_spec(Path(TINY).with_name("mimo_v2_flash.yaml")).training.stages[3]
    assert (sft.lr.kind, sft.lr.peak, sft.lr.final, sft.batch_size.size) == ("cosine", 5e-5, 5e-6, 128)
    assert (sft.overrides.bias_update, sft.overrides.seq_aux_coef) == (1e-4, 1e-6)


def test_a_teacher_may_be_an_earlier_stage_of_the_same_run(run_cli, tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "1+1=", "domain": "math", "answer": "2"}\n')
    path = _spec(
        tmp_path,
        f"""
        - {{name: base, STAGE}}
        - {{name: teacher, STAGE}}
        - {MOPD}, init_from: base, teachers: {{math: teacher, code: {{url: 'http://h:8000'}}}}}}
        """,
    )
    code, out, err = run_cli("check", path)
    assert code == 0, err
    training = load_spec(path).training
    assert training.teacher_source(2, "math") == ("stage", "teacher")
    assert training.teacher_source(2, "code") == ("url", "http://h:8000")
    assert training.named_sources() == {"base", "teacher"}
