"""`training.parallel`: the layout's sizes are checked against the model, the world size and the run."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from lmspec.errors import SpecError, UsageError
from lmspec.spec import load_spec
from lmspec.spec.schema import Parallel, parallel_problem, world_size_problem
from lmspec.train.distributed import Dist, check_layout

from .conftest import MIMO, TINY


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(textwrap.dedent(text).lstrip("\n").replace("TINY", str(TINY)))
    return path


def _one_line(run_cli, *args) -> str:
    code, out, err = run_cli(*args)
    assert code == 2, (out, err)
    assert out == "" and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_defaults_are_one_and_unset_means_none(tiny):
    assert tiny.training.parallel is None
    assert Parallel().world_size == 1
    assert (Parallel().data, Parallel().fsdp, Parallel().expert, Parallel().tensor) == (1, 1, 1, 1)


@pytest.mark.parametrize(
    ("yaml_layout", "where", "fragment"),
    [
        ("{expert: 3}", "3:14: training.parallel.expert:", "divisor of model.ffn.moe.num_experts (8), got 3"),
        ("{tensor: 8}", "3:14: training.parallel.tensor:", "divisor of model.attention.global.num_heads (4)"),
        ("{tensor: 4}", "3:14: training.parallel.tensor:", "model.attention.global.num_kv_heads (2), got 4"),
        ("{fsdp: 0}", "3:14: training.parallel.fsdp:", "expected a value >= 1, got 0"),
        ("{data: 1.5}", "3:14: training.parallel.data:", "expected an integer"),
        ("{data: true}", "3:14: training.parallel.data:", "expected an integer"),
        ("{experts: 2}", "3:14: training.parallel.experts:", "did you mean 'expert'?"),
    ],
)
def test_sizes_the_model_cannot_split_are_positioned_errors(run_cli, tmp_path, yaml_layout, where, fragment):
    path = _write(tmp_path, f"extends: TINY\ntraining:\n  parallel: {yaml_layout}\n")
    line = _one_line(run_cli, "check", path)
    assert line.startswith(f"{path}:{where}"), line
    assert fragment in line, line


def test_expert_needs_a_moe_kind(tiny):
    dense = tiny.model.model_copy(update={"ffn": {"dense": tiny.model.ffn["dense"]}})
    assert parallel_problem(dense, Parallel(expert=2)) == (
        "expert",
        "expected 1 (the model has no MoE kind to split), got 2",
    )
    assert parallel_problem(dense, Parallel(tensor=2)) is None


def test_the_full_model_splits_by_its_heads_and_experts():
    mimo = load_spec(MIMO, ["training.parallel.expert=256", "training.parallel.tensor=4"])
    assert mimo.training.parallel.world_size == 1024
    # The global kind has 4 KV heads: tensor 8 would split a KV head.
    with pytest.raises(SpecError, match="global.num_kv_heads \\(4\\), got 8"):
        load_spec(MIMO, ["training.parallel.tensor=8"])


@pytest.mark.parametrize("field", ["data", "fsdp", "expert", "tensor"])
def test_each_size_has_a_set(field):
    spec = load_spec(TINY, [f"training.parallel.{field}=2"])
    assert getattr(spec.training.parallel, field) == 2
    assert spec.training.parallel.world_size == 2


def test_a_bad_set_is_located_in_the_set(run_cli):
    line = _one_line(run_cli, "check", TINY, "--set", "training.parallel.tensor=3")
    assert line.startswith("--set:1:1: training.parallel.tensor: expected a divisor"), line
    line = _one_line(run_cli, "check", TINY, "--set", "training.parallel.tensr=2")
    assert "did you mean 'tensor'?" in line


def test_check_world_size(run_cli, tmp_path):
    code, out, _ = run_cli(
        "check",
        TINY,
        "--world-size",
        "4",
        "--set",
        "training.parallel.fsdp=2",
        "--set",
        "training.parallel.expert=2",
    )
    assert code == 0 and "layout on 4 ranks: data 1 x fsdp 2 x expert 2 x tensor 1" in out
    code, out, _ = run_cli("check", TINY, "--world-size", "8")
    assert code == 0 and "training.parallel unset" in out
    path = _write(tmp_path, "extends: TINY\ntraining:\n  parallel: {expert: 2, tensor: 2}\n")
    line = _one_line(run_cli, "check", path, "--world-size", "2")
    assert line == (
        f"{path}:3:3: training.parallel: expected data x fsdp x expert x tensor to equal the world size 2, "
        "got 1 x 1 x 2 x 2 = 4"
    )
    line = _one_line(run_cli, "check", TINY, "--set", "training.parallel.data=2", "--world-size", "3")
    assert line.startswith("--set:1:1: training.parallel:"), line
    for bad in ("0", "-1", "1e9", "two", "2.5"):
        assert "--world-size" in _one_line(run_cli, "check", TINY, "--world-size", bad)


def test_the_run_refuses_a_layout_of_another_world_size():
    assert world_size_problem(None, 7) is None
    check_layout(None, Dist(world_size=1))
    check_layout(Parallel(data=2, fsdp=2), Dist(rank=0, world_size=4))
    with pytest.raises(UsageError, match="equal the world size 1, got 2 x 1 x 1 x 1 = 2"):
        check_layout(Parallel(data=2), Dist(world_size=1))
    check_layout(Parallel(fsdp=2, expert=2), Dist(rank=0, world_size=4))
    # Tensor parallelism trains: only the product is checked (the schema checked what it divides).
    check_layout(Parallel(tensor=2), Dist(rank=1, world_size=2))
    check_layout(Parallel(expert=2, tensor=2), Dist(rank=0, world_size=4))
    with pytest.raises(UsageError, match="equal the world size 2, got 1 x 2 x 1 x 2 = 4"):
        check_layout(Parallel(fsdp=2, tensor=2), Dist(world_size=2))
