"""Every kind of bad input gives one line, `file:line:col: field: expected X, got Y`, and exit 2."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from lmspec.spec.limits import MAX_YAML_VALUES

from .conftest import TINY


def _write(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n").replace("TINY", str(TINY)))
    return path


def _error(run_cli, *args) -> str:
    code, out, err = run_cli("check", *args)
    assert code == 2, (out, err)
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# (name, YAML text, expected "line:col: field:" after the file name, expected message fragment)
CASES = [
    (
        "yaml_syntax",
        """
        name: x
        model: {hidden_size: 4
        """,
        "3:1:",
        "YAML syntax: expected ',' or '}', but got '<stream end>'",
    ),
    (
        "duplicate_key",
        """
        extends: TINY
        name: a
        model:
          hidden_size: 64
          hidden_size: 32
        """,
        "5:3: model.hidden_size:",
        "expected each key once, got a duplicate of the key on line 4",
    ),
    (
        "unknown_key",
        """
        extends: TINY
        model:
          attention:
            swa: {windw: 16}
        """,
        "4:11: model.attention.swa.windw:",
        "expected one of the known fields, got unknown key 'windw' (did you mean 'window'?)",
    ),
    (
        "wrong_type",
        """
        extends: TINY
        model:
          hidden_size: wide
        """,
        "3:3: model.hidden_size:",
        "expected an integer, got 'wide'",
    ),
    (
        "wrong_kind",
        """
        extends: TINY
        model:
          ffn:
            moe: {kind: mixture}
        """,
        "4:5: model.ffn.moe:",
        "expected kind one of 'dense', 'moe', got 'mixture'",
    ),
    (
        "missing_field",
        """
        name: x
        model:
          vocab_size: 256
          hidden_size: 64
          attention: {g: {kind: global, num_heads: 2, num_kv_heads: 1, qk_head_dim: 8, v_head_dim: 8, rope: {theta: 1.0e4}}}
          ffn: {d: {kind: dense, intermediate_size: 32}}
          blocks: {G: {attention: g, ffn: d}}
          layers: G*2
        """,
        "2:1: model.max_position_embeddings:",
        "expected this required field, got nothing",
    ),
    (
        "kv_heads_not_dividing",
        """
        extends: TINY
        model:
          attention:
            swa:
              num_kv_heads: 3
        """,
        "5:7: model.attention.swa.num_kv_heads:",
        "expected a divisor of num_heads (4), got 3",
    ),
    (
        "top_k_above_experts",
        """
        extends: TINY
        model:
          ffn:
            moe: {top_k: 9}
        """,
        "4:11: model.ffn.moe.top_k:",
        "expected at most num_experts (8), got 9",
    ),
    (
        "groups_of_one_expert",
        """
        extends: TINY
        model:
          ffn:
            moe: {num_groups: 8, top_k_groups: 2}
        """,
        "4:11: model.ffn.moe.num_groups:",
        "expected groups of at least 2 experts (num_experts 8 / num_groups), got 8 groups of 1",
    ),
    (
        "non_positive_window",
        """
        extends: TINY
        model:
          attention:
            swa: {window: 0}
        """,
        "4:11: model.attention.swa.window:",
        "expected a value >= 1, got 0",
    ),
    (
        "undefined_block_in_pattern",
        """
        extends: TINY
        model:
          layers: "G0 S*2 X G"
        """,
        "3:19: model.layers:",
        "expected a block name among ['G', 'G0', 'MTP', 'S'], got 'X'",
    ),
    (
        "unclosed_group",
        """
        extends: TINY
        model:
          layers: G0 (S*5 G
        """,
        "3:14: model.layers:",
        "expected ')' to close this '(', got the end of the pattern",
    ),
    (
        "bad_repeat_count",
        """
        extends: TINY
        model:
          layers: 'G0 S*x'
        """,
        "3:17: model.layers:",
        "expected a repeat count after '*', got 'x'",
    ),
    (
        "block_naming_unknown_attention",
        """
        extends: TINY
        model:
          blocks:
            S: {attention: sliding, ffn: moe}
        """,
        "4:9: model.blocks.S.attention:",
        "expected one of ['global', 'swa'], got 'sliding'",
    ),
    (
        "stage_lr_invalid",
        """
        extends: TINY
        training:
          stages:
            - name: only
              tokens: 1.0e6
              seq_len: 128
              batch_size: {size: 4}
              lr: {kind: cosine, peak: -3.0e-4}
        """,
        "8:26: training.stages.0.lr.peak:",
        "expected a value > 0.0, got -0.0003",
    ),
    (
        "stage_lr_final_above_peak",
        """
        extends: TINY
        training:
          stages:
            - name: only
              tokens: 1.0e6
              seq_len: 128
              batch_size: {size: 4}
              lr: {kind: cosine, peak: 1.0e-4, final: 1.0e-3}
        """,
        "8:40: training.stages.0.lr.final:",
        "expected at most peak (0.0001), got 0.001",
    ),
    (
        "stage_token_budget_invalid",
        """
        extends: TINY
        training:
          stages:
            - name: only
              tokens: 0
              seq_len: 128
              batch_size: {size: 4}
              lr: {kind: constant, peak: 1.0e-4}
        """,
        "5:7: training.stages.0.tokens:",
        "expected a value > 0.0, got 0",
    ),
    (
        "stage_schedule_over_budget",
        """
        extends: TINY
        training:
          stages:
            - name: only
              tokens: 1.0e6
              seq_len: 128
              batch_size: {size: 4}
              lr: {kind: wsd, peak: 1.0e-4, warmup_tokens: 1.0e6, decay_tokens: 5.0e5}
        """,
        "8:7: training.stages.0.lr:",
        "expected warmup_tokens + decay_tokens at most the stage's 1e+06 tokens, got 1.5e+06",
    ),
    (
        "no_stages",
        """
        extends: TINY
        training:
          stages: []
        """,
        "3:3: training.stages:",
        "expected at least 1 item(s), got 0",
    ),
    (
        "rope_override_unknown_kind",
        """
        extends: TINY
        training:
          stages:
            - name: only
              tokens: 1.0e6
              seq_len: 128
              batch_size: {size: 4}
              lr: {kind: constant, peak: 1.0e-4}
              overrides: {rope_theta: {globl: 1.0e6}}
        """,
        "9:32: training.stages.0.overrides.rope_theta.globl:",
        "expected an attention kind among ['global', 'swa'], got 'globl'",
    ),
    (
        "speculative_deeper_than_mtp",
        """
        extends: TINY
        serving: {speculative_depth: 4}
        """,
        "2:11: serving.speculative_depth:",
        "expected at most mtp.num_blocks (3), got 4",
    ),
    (
        "python_tag",
        """
        name: !!python/object/apply:os.system [echo]
        """,
        "1:7: name:",
        "expected a plain list, got one tagged '!!python/object/apply:os.system'",
    ),
    (
        "tag_that_does_not_fit",
        """
        extends: TINY
        model: {init_std: !!float small}
        """,
        "2:19: model.init_std:",
        "expected a value of type float, got 'small'",
    ),
    (
        "infinite_number",
        """
        extends: TINY
        model: {init_std: .inf}
        """,
        "2:9: model.init_std:",
        "expected a finite number, got inf",
    ),
    (
        "merge_key",
        """
        extends: TINY
        model:
          <<: {hidden_size: 64}
        """,
        "3:3: model:",
        "expected plain keys, got a YAML merge key '<<' (use extends:)",
    ),
    (
        "self_referencing_alias",
        """
        name: &a [*a]
        """,
        "1:7: " + ".".join(["name"] + ["0"] * 64) + ":",
        "expected at most 64 levels of nesting, got more",
    ),
    (
        "missing_top_level_field",
        """
        name: x
        """,
        "1:1: model:",
        "expected this required field, got nothing",
    ),
    (
        "top_level_not_a_mapping",
        """
        - a
        - b
        """,
        "1:1:",
        "expected a mapping at the top level, got list",
    ),
]


@pytest.mark.parametrize(("name", "text", "where", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_file(tmp_path, run_cli, name, text, where, message):
    path = _write(tmp_path, text)
    line = _error(run_cli, path)
    assert line == f"{path}:{where} {message}"


def test_circular_extends(tmp_path, run_cli):
    a = _write(tmp_path, "extends: b.yaml\nname: a\n", "a.yaml")
    _write(tmp_path, "name: b\nextends: a.yaml\n", "b.yaml")
    line = _error(run_cli, a)
    assert line == (
        f"{tmp_path / 'b.yaml'}:2:10: extends: expected an acyclic chain of extends, got a cycle: "
        "a.yaml -> b.yaml -> a.yaml"
    )


def test_extends_missing_file(tmp_path, run_cli):
    path = _write(tmp_path, "name: a\nextends: nowhere.yaml\n")
    assert (
        _error(run_cli, path) == f"{path}:2:10: extends: expected an existing spec file, got 'nowhere.yaml'"
    )


def test_spec_file_missing(tmp_path, run_cli):
    path = tmp_path / "absent.yaml"
    assert _error(run_cli, path) == f"{path}: expected a spec file, got a path that does not exist"


def test_error_in_a_parent_file_points_into_the_parent(tmp_path, run_cli):
    _write(
        tmp_path,
        """
        extends: TINY
        model:
          hidden_size: -8
        """,
        "base.yaml",
    )
    child = _write(tmp_path, "extends: base.yaml\nname: child\n", "child.yaml")
    line = _error(run_cli, child)
    assert line == f"{tmp_path / 'base.yaml'}:3:3: model.hidden_size: expected a value >= 1, got -8"


def test_child_replacing_a_list_drops_the_parents_positions(tmp_path, run_cli):
    # The parent's stage 0 had `lr` at another line; the error must point at the child's text.
    path = _write(
        tmp_path,
        """
        extends: TINY
        training:
          stages:
            - {name: a, tokens: 1.0e6, seq_len: 128, batch_size: {size: 4}, lr: {kind: cosine}}
        """,
    )
    line = _error(run_cli, path)
    assert line.startswith(f"{path}:4:69: training.stages.0.lr.peak: "), line
    assert line.endswith("expected this required field, got nothing")


# --set: errors in the assignment point into it as `--set:<which>:<column>`.
SET_CASES = [
    (
        "path_does_not_exist",
        "model.attention.swa.windw=16",
        "--set:2:21: model.attention.swa.windw:",
        "expected an existing field at model.attention.swa.windw, got 'windw' (did you mean 'window'?)",
    ),
    (
        "unknown_section",
        "modle.hidden_size=64",
        "--set:2:1: modle.hidden_size:",
        "expected an existing field at modle, got 'modle' (did you mean 'model'?)",
    ),
    (
        "index_out_of_range",
        "training.stages.5.tokens=1",
        "--set:2:17: training.stages.5.tokens:",
        "expected an index below 4 at training.stages.5, got 5",
    ),
    (
        "through_a_value",
        "name.first=x",
        "--set:2:6: name.first:",
        "expected a mapping or list at name, got a value",
    ),
    (
        "no_equals",
        "model.hidden_size",
        "--set:2:1: model.hidden_size:",
        "expected path.to.field=value, got no '='",
    ),
    (
        "bad_yaml_value",
        "model.hidden_size=[64",
        "--set:2:22: model.hidden_size:",
        "expected a YAML value, got '[64'",
    ),
    (
        "invalid_value",
        "model.attention.swa.window=0",
        "--set:2:1: model.attention.swa.window:",
        "expected a value >= 1, got 0",
    ),
    (
        "validator_on_set_value",
        "model.attention.global.num_kv_heads=3",
        "--set:2:1: model.attention.global.num_kv_heads:",
        "expected a divisor of num_heads (4), got 3",
    ),
    (
        "pattern_in_set",
        "model.layers=G0 (S*2 G",
        "--set:2:17: model.layers:",
        "expected ')' to close this '(', got the end of the pattern",
    ),
    (
        "quoted_pattern_in_set",
        "model.layers='S S*x'",
        "--set:2:19: model.layers:",
        "expected a repeat count after '*', got 'x'",
    ),
    (
        "mapping_set_missing_field",
        "model.attention.swa={kind: sliding}",
        "--set:2:1: model.attention.swa.num_heads:",
        "expected this required field, got nothing",
    ),
]


@pytest.mark.parametrize(("name", "assignment", "where", "message"), SET_CASES, ids=[c[0] for c in SET_CASES])
def test_bad_set(run_cli, name, assignment, where, message):
    line = _error(run_cli, TINY, "--set", "model.vocab_size=300", "--set", assignment)
    assert line == f"{where} {message}"


def test_set_adds_an_entry_to_a_free_form_mapping(run_cli):
    code, out, err = run_cli(
        "check",
        TINY,
        "--set",
        "model.blocks.X={attention: swa, ffn: dense}",
        "--set",
        "model.layers=G0 X*3 G",
    )
    assert code == 0, err
    assert "5 layers (1xG0, 3xX, 1xG)" in out


def test_file_positions_survive_unrelated_sets(run_cli):
    line = _error(run_cli, TINY, "--set", "model.hidden_size=64", "--set", "model.ffn.moe.top_k=9")
    assert line.startswith("--set:2:1: model.ffn.moe.top_k: ")
    line = _error(run_cli, TINY, "--set", "model.attention.swa.num_heads=3")
    # num_heads came from --set, but the rejected field (num_kv_heads) is still the file's.
    assert line.startswith(f"{TINY}:13:"), line
    assert "model.attention.swa.num_kv_heads: expected a divisor of num_heads (3), got 2" in line


def test_alias_bomb(tmp_path, run_cli):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    path = _write(tmp_path, "\n".join(lines) + "\nname: *a8\n")
    assert _error(run_cli, path).endswith(
        f"expected at most {MAX_YAML_VALUES} YAML values (aliases expanded), got more"
    )


def test_deep_nesting(tmp_path, run_cli):
    path = _write(tmp_path, "name: " + "[" * 5000 + "]" * 5000 + "\n")
    assert _error(run_cli, path) == f"{path}:1:71: expected at most 64 levels of nesting, got more"
