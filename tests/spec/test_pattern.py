"""The layer-pattern grammar: the MiMo-V2-Flash layout, and errors at the offending character."""

from __future__ import annotations

import pytest

from lmspec.spec import PatternError, compress_layers, expand_pattern
from lmspec.spec.limits import MAX_LAYERS, MAX_NESTING, MAX_PATTERN_CHARS

from .conftest import TINY

GLOBAL_LAYERS = {0, 5, 11, 17, 23, 29, 35, 41, 47}


def test_mimo_layout(mimo):
    m = mimo.model
    assert m.num_layers == 48
    kinds = [m.layer_attention(i).kind for i in range(48)]
    assert {i for i, k in enumerate(kinds) if k == "global"} == GLOBAL_LAYERS
    assert kinds.count("sliding") == 39
    ffns = [m.layer_ffn(i).kind for i in range(48)]
    assert ffns[0] == "dense" and ffns[1:] == ["moe"] * 47
    sinks = [m.layer_attention(i).sink for i in range(48)]
    assert sinks == [k == "sliding" for k in kinds]  # sinks on SWA layers only
    # transformers' default rule for the hub layout: i == 0 or (i + 1) % 6 == 0.
    assert GLOBAL_LAYERS == {i for i in range(48) if i == 0 or (i + 1) % 6 == 0}
    assert m.layer_attention(1).window_keys == 129
    mtp_attention = m.attention[m.blocks[m.mtp.block].attention]
    assert mtp_attention.kind == "sliding" and mtp_attention.sink
    assert m.ffn[m.blocks[m.mtp.block].ffn].kind == "dense"


def test_tiny_layout(tiny):
    assert tiny.model.layer_blocks == ["G0", "S", "S", "G", "S", "S", "G"]
    assert tiny.model.layer_attention(1).window_keys == 33


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("A", ["A"]),
        ("A*3", ["A", "A", "A"]),
        ("A (B C)*2", ["A", "B", "C", "B", "C"]),
        ("((A)*2 B)*2", ["A", "A", "B", "A", "A", "B"]),
        ("  A\tB\n C  ", ["A", "B", "C"]),
        ("A*1 B*01", ["A", "B"]),
        ("x_y_1*2", ["x_y_1", "x_y_1"]),
    ],
)
def test_expansion(pattern, expected):
    assert expand_pattern(pattern) == expected


@pytest.mark.parametrize(
    ("pattern", "offset", "message"),
    [
        ("G0 (S*5 G", 3, "expected ')' to close this '(', got the end of the pattern"),
        ("S*x", 2, "expected a repeat count after '*', got 'x'"),
        ("S*", 2, "expected a repeat count after '*', got the end of the pattern"),
        ("S*0", 2, "expected a repeat count >= 1, got 0"),
        ("S 4", 2, "expected '*' before the repeat count, got '4'"),
        ("S G)", 3, "expected a '(' before this ')', got an unbalanced ')'"),
        ("S () G", 2, "expected block names inside '( )', got an empty group"),
        ("*2 S", 0, "expected a block name or '(', got '*'"),
        ("S+G", 1, "expected a block name, '(', ')', '*' or a count, got '+'"),
        ("   ", 0, "expected at least one block name, got an empty pattern"),
        ("S*100001", 2, f"expected at most {MAX_LAYERS} layers, got 1 x 100001 here"),
        ("(S*1000)*1000", 9, f"expected at most {MAX_LAYERS} layers, got 1000 x 1000 here"),
        ("S*" + "9" * 5000, 2, f"expected a repeat count of at most {MAX_LAYERS} layers, got '{'9' * 198}…"),
        ("S " * (MAX_LAYERS + 1), 2 * MAX_LAYERS, f"expected at most {MAX_LAYERS} layers, got more"),
        ("(" * 100 + "S" + ")" * 100, 64, f"expected at most {MAX_NESTING} nested '(', got more"),
        ("x.y", 1, "expected a block name, '(', ')', '*' or a count, got '.'"),  # names are identifiers
        ("G " * 800_000, 0, f"expected a pattern of at most {MAX_PATTERN_CHARS} characters, got 1600000"),
    ],
    ids=lambda v: v[:24] if isinstance(v, str) else str(v),
)
def test_syntax_errors_point_at_the_character(pattern, offset, message):
    with pytest.raises(PatternError) as info:
        expand_pattern(pattern)
    assert (info.value.offset, info.value.short) == (offset, message)
    # The caret sits under the character, in a window of the pattern at most 121 characters wide.
    _, shown, caret = str(info.value).splitlines()
    assert len(shown) <= 4 + 121
    at = caret.index("^")
    assert (shown[at:] or " ")[0] == (pattern[offset:] or " ")[0]


def test_unknown_block_name():
    with pytest.raises(PatternError) as info:
        expand_pattern("A B*2 C", known={"A", "B"})
    assert info.value.offset == 6
    assert info.value.short == "expected a block name among ['A', 'B'], got 'C'"


@pytest.mark.parametrize(
    ("written", "col_of_value"),
    [("layers: G0 (S*5 G", 11), ('layers: "G0 (S*5 G"', 12), ("layers:   'G0 (S*5 G'", 14)],
)
def test_yaml_column_of_a_pattern_error(tmp_path, run_cli, written, col_of_value):
    path = tmp_path / "spec.yaml"
    path.write_text(f"extends: {TINY}\nmodel:\n  {written}\n")
    code, _, err = run_cli("check", path)
    assert code == 2
    # The '(' is 3 characters into the pattern, whether the YAML scalar is plain or quoted.
    assert err.strip() == (
        f"{path}:3:{col_of_value + 3}: model.layers: expected ')' to close this '(', got the end of the pattern"
    )


@pytest.mark.parametrize(
    "names", [["A"], ["A", "A", "B", "A"], ["G0"] + ["S"] * 4 + ["G"] + (["S"] * 5 + ["G"]) * 7]
)
def test_compress_layers_round_trip(names):
    compressed = compress_layers(names)
    assert expand_pattern(compressed) == names
    assert len(compressed.split()) == sum(1 for i, n in enumerate(names) if i == 0 or names[i - 1] != n)
