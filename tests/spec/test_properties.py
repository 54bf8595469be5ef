"""Property tests: round trips of valid specs, clean errors for corrupted ones, and accounting that
depends on the layers a pattern denotes, not on how it is written."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmspec.compiler.accounting import account, param_count
from lmspec.spec import (
    GlobalAttention,
    SlidingAttention,
    Spec,
    SpecError,
    compress_layers,
    dump_spec,
    expand_pattern,
    load_spec,
    loads_spec,
    spec_hash,
)
from lmspec.spec.loader import to_yaml

from .strategies import expand, pattern_trees, render, rewrites, spec_data, specs

FAST = settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------


def _round_trip(spec: Spec) -> None:
    text = dump_spec(spec)
    again = loads_spec(text)
    assert again == spec
    assert spec_hash(again) == spec_hash(spec)
    assert dump_spec(again) == text  # canonical: a second dump changes nothing


@FAST
@given(spec=specs())
def test_dump_load_round_trip(spec):
    _round_trip(spec)


@pytest.mark.slow
@SLOW
@given(spec=specs())
def test_dump_load_round_trip_long(spec):
    _round_trip(spec)


@FAST
@given(data=spec_data())
def test_file_and_data_agree(data):
    # What a user writes (sparse YAML, defaults left out) loads to the same spec as the data itself.
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "spec.yaml"
        path.write_text(to_yaml(data))
        assert load_spec(path) == Spec.model_validate(data)


# ---------------------------------------------------------------------------------------------
# Corruptions: always one SpecError, never another exception
# ---------------------------------------------------------------------------------------------

JUNK = st.one_of(
    st.text(max_size=8),
    st.integers(-10, 10),
    st.floats(allow_nan=True),
    st.booleans(),
    st.none(),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


def _paths(node, prefix=()) -> list[tuple]:
    """Every path to a mapping entry or list item in plain data."""
    out = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        out.append((*prefix, key))
        out.extend(_paths(value, (*prefix, key)))
    return out


def _parent(data, path):
    node = data
    for part in path[:-1]:
        node = node[part]
    return node


@st.composite
def corrupted(draw) -> str:
    """YAML text for a valid spec with one corruption applied."""
    data = copy.deepcopy(draw(spec_data()))
    paths = _paths(data)
    how = draw(st.sampled_from(["delete", "unknown", "retype", "negate", "pattern", "text"]))
    if how == "delete":
        path = draw(st.sampled_from(paths))
        parent = _parent(data, path)
        del parent[path[-1]]
    elif how == "unknown":
        mappings = [()] + [p for p in paths if isinstance(_parent(data, (*p, None)), dict)]
        where = draw(st.sampled_from(mappings))
        _parent(data, (*where, None))[draw(st.text(min_size=1, max_size=8))] = draw(JUNK)
    elif how == "retype":
        path = draw(st.sampled_from(paths))
        _parent(data, path)[path[-1]] = draw(JUNK)
    elif how == "negate":
        numeric = [
            p
            for p in paths
            if isinstance(_parent(data, p)[p[-1]], (int, float))
            and not isinstance(_parent(data, p)[p[-1]], bool)
        ]
        if numeric:
            path = draw(st.sampled_from(numeric))
            value = _parent(data, path)[path[-1]]
            _parent(data, path)[path[-1]] = -value if value else -1
    elif how == "pattern":
        data["model"]["layers"] = draw(st.text(alphabet="()*0123456789 ab_GS\t\n+-.", max_size=20))
    text = to_yaml(data)
    if how == "text":
        at = draw(st.integers(0, len(text)))
        cut = draw(st.integers(0, 5))
        text = text[:at] + draw(st.text(alphabet=":{}[]-'\"\t\n #&*!|>%@`,", max_size=4)) + text[at + cut :]
    return text


def _check_clean(fn) -> None:
    try:
        fn()
    except SpecError as e:
        shown = str(e)
        assert "\n" not in shown.strip(), shown
        assert e.line >= 0 and e.col >= 0
        assert e.message.startswith(("expected", "YAML syntax")), shown


@FAST
@given(text=corrupted())
def test_corruptions_give_a_spec_error(text):
    _check_clean(lambda: loads_spec(text))


@pytest.mark.slow
@SLOW
@given(text=corrupted())
def test_corruptions_give_a_spec_error_long(text):
    _check_clean(lambda: loads_spec(text))


@FAST
@given(data=spec_data(), key=st.from_regex(r"[a-z_]{1,10}", fullmatch=True))
def test_unknown_key_in_a_model_is_named(data, key):
    data["model"]["attention"][next(iter(data["model"]["attention"]))][key] = 1
    name = next(iter(data["model"]["attention"]))
    if key in GlobalAttention.model_fields or key in SlidingAttention.model_fields:
        return
    with pytest.raises(SpecError) as info:
        loads_spec(to_yaml(data))
    assert info.value.field == f"model.attention.{name}.{key}"
    assert f"got unknown key {key!r}" in info.value.message


@FAST
@given(data=spec_data(), choice=st.data())
def test_set_overrides_give_a_spec_error(data, choice):
    """`--set` on any existing or made-up path with any value: a Spec or a SpecError."""
    paths = [".".join(map(str, p)) for p in _paths(data)]
    dotted = choice.draw(
        st.sampled_from(paths) | st.from_regex(r"[a-z_]{1,6}(\.[a-z0-9_]{1,6}){0,3}", fullmatch=True)
    )
    value = choice.draw(
        st.sampled_from(["-1", "0", "x", "[1, 2", "{a: 1}", "null", "1e400", "'S*'", "true", ""])
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "spec.yaml"
        path.write_text(to_yaml(data))
        _check_clean(lambda: load_spec(path, [f"{dotted}={value}"]))


# ---------------------------------------------------------------------------------------------
# Accounting depends on the expanded layers only
# ---------------------------------------------------------------------------------------------


@FAST
@given(data=spec_data(), choice=st.data(), context=st.integers(1, 1 << 19))
def test_accounting_invariant_under_pattern_rewrites(data, choice, context):
    tree = choice.draw(pattern_trees(sorted(data["model"]["blocks"])))
    spellings = [render(tree), choice.draw(rewrites(tree)), compress_layers(expand(tree))]
    results = []
    for layers in spellings:
        data["model"]["layers"] = layers
        spec = Spec.model_validate(data)
        assert spec.model.layer_blocks == expand(tree)
        acc = account(spec, context).to_dict()
        assert acc["params_total"] == param_count(spec)
        results.append(acc)
    assert results[0] == results[1] == results[2]


@FAST
@given(tree=pattern_trees(["A", "B", "C"]), choice=st.data())
def test_pattern_rewrites_expand_alike(tree, choice):
    names = expand(tree)
    assert expand_pattern(render(tree)) == names
    assert expand_pattern(choice.draw(rewrites(tree))) == names
    assert expand_pattern(compress_layers(names)) == names
