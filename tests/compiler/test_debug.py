"""Debug levels (`lmspec.compiler.debug`): each level prints what the table promises, level 0 nothing.

The CLI runs in-process; `LMSPEC_DEBUG` is set per test and the loggers are put back afterwards, so
no other test sees debug output.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lmspec.cli import main
from lmspec.compiler import lower, run_passes
from lmspec.compiler.debug import apply_debug_level, set_debug_level
from lmspec.compiler.passes import PIPELINE
from lmspec.compiler.plan import planned

from .conftest import EXAMPLES

TINY = EXAMPLES / "mimo_v2_flash_tiny.yaml"
PASS_LINE = re.compile(r"^\[lmspec\.compiler\.passes\] pass (\w+): [0-9.]+ ms, (\d+) nodes$")
IR_LINE = re.compile(r"^\[lmspec\.compiler\.passes\] IR (before the passes|after (\w+)): (\d+) nodes: (.*)$")


@pytest.fixture(autouse=True)
def _debug_env(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LMSPEC_DEBUG", "0")  # recorded, so teardown restores the variable as it was
    yield
    set_debug_level(None)
    monkeypatch.setenv("LMSPEC_DEBUG", "0")
    apply_debug_level()  # loggers back to how they were before any level was applied


@pytest.fixture(scope="module")
def final_graph(tiny):
    return run_passes(lower(tiny))


def _run(capsys, *args: str) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def _counts(graph) -> str:
    return ", ".join(f"{op}={n}" for op, n in sorted(graph.op_counts().items()))


def _check_level(err: str, level: int, graph) -> None:
    lines = err.splitlines()
    passes = [m.groups() for m in map(PASS_LINE.match, lines) if m]
    irs = [m for m in map(IR_LINE.match, lines) if m]
    assert level == 0 or [p for p, _ in passes] == list(PIPELINE)
    if level >= 1:
        assert passes[-1][1] == str(graph.nx.number_of_nodes())
    if level >= 2:
        # The IR before the passes, then after each one; the last one is the final graph.
        assert [m.group(2) for m in irs] == [None, *PIPELINE]
        assert irs[-1].group(3) == str(graph.nx.number_of_nodes()) and irs[-1].group(4) == _counts(graph)
        assert "  model.layers.0  [G0: attention global, ffn dense]" in lines
        assert any(line.strip().startswith("self_attn.attention") for line in lines)
    else:
        assert not irs and "model.layers.0" not in err
    plan = planned(graph)
    assert (f"plan of {plan.name} ({plan.class_name})" in err) == (level >= 3)
    if level >= 3:
        assert all(k.name in err for k in plan.kernels)
    else:
        assert "[lmspec.compiler.plan]" not in err and "[lmspec.codegen]" not in err


@pytest.mark.parametrize("level", [0, 1, 2])
def test_each_level_prints_what_it_promises(level, capsys, monkeypatch, final_graph):
    monkeypatch.setenv("LMSPEC_DEBUG", str(level))
    code, err = _run(capsys, "graph", TINY)
    assert code == 0
    if level == 0:
        assert err == ""
    _check_level(err, level, final_graph)


def test_level_3_adds_the_plan_and_every_generated_file(capsys, monkeypatch, tmp_path, final_graph):
    monkeypatch.setenv("LMSPEC_DEBUG", "3")
    code, err = _run(capsys, "compile", TINY, "-o", tmp_path / "out")
    assert code == 0
    _check_level(err, 3, final_graph)
    written = sorted(str(p) for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert f"[lmspec.codegen] wrote {len(written)} generated files in {tmp_path / 'out'}:" in err
    listed = [line.strip() for line in err.splitlines() if line.startswith(f"  {tmp_path}")]
    assert listed == written and any(p.endswith("model.py") for p in listed)


def test_level_3_names_the_cache_entry_it_writes_then_reuses(capsys, monkeypatch):
    # A width no other test compiles, so the first compile of this session writes the entry.
    monkeypatch.setenv("LMSPEC_DEBUG", "3")
    args = ("compile", TINY, "--set", "model.ffn.dense.intermediate_size=200")
    for verb in ("wrote", "reused"):
        code, err = _run(capsys, *args)
        assert code == 0
        found = re.search(rf"^\[lmspec\.codegen\] {verb} (\d+) generated files in (.+):$", err, re.M)
        assert found, err[-2000:]
        entry = sorted(str(p) for p in Path(found.group(2)).rglob("*") if p.is_file())
        listed = [line.strip() for line in err.splitlines() if line.startswith(f"  {found.group(2)}")]
        assert listed == entry and int(found.group(1)) == len(entry)


def test_level_0_compiles_without_a_word_on_stderr(capsys, tmp_path):
    code, err = _run(capsys, "compile", TINY, "-o", tmp_path / "out")
    assert code == 0 and err == ""


@pytest.mark.parametrize(
    "args,level",
    [(("-v", "graph"), 1), (("graph", "-vv"), 2), (("-vvv", "graph"), 3), (("--verbose", "graph"), 1)],
)
def test_the_flag_sets_the_same_levels(args, level, capsys, final_graph):
    code, err = _run(capsys, *args, TINY)
    assert code == 0
    _check_level(err, level, final_graph)


def test_the_flag_wins_over_the_variable_and_lasts_one_command(capsys, monkeypatch, final_graph):
    monkeypatch.setenv("LMSPEC_DEBUG", "3")
    _, err = _run(capsys, "-v", "graph", TINY)
    _check_level(err, 1, final_graph)
    monkeypatch.setenv("LMSPEC_DEBUG", "0")
    _, err = _run(capsys, "graph", TINY)
    assert err == ""


def test_library_callers_get_the_levels_too(capsys, monkeypatch, tiny):
    monkeypatch.setenv("LMSPEC_DEBUG", "1")
    graph = run_passes(lower(tiny))
    _check_level(capsys.readouterr().err, 1, graph)


@pytest.mark.parametrize("value", ["x", "-1", "1.5"])
def test_a_bad_level_is_one_line_and_exit_2(value, capsys, monkeypatch):
    monkeypatch.setenv("LMSPEC_DEBUG", value)
    code, err = _run(capsys, "graph", TINY)
    assert code == 2
    assert err == f"lmspec: error: LMSPEC_DEBUG: expected 0, 1, 2 or 3, got {value!r}\n"
