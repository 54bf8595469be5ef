"""The scale-out planner: layouts, per-device bytes tied to the accounting's totals, ranking, the CLI."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from lmspec.cli import main
from lmspec.compiler.accounting import account, param_count
from lmspec.compiler.scale import (
    PRECISIONS,
    Layout,
    activation_elements,
    device_memory,
    device_params,
    device_traffic,
    layouts,
    param_split,
    plan_scale,
    split_layouts,
)
from lmspec.spec import load_spec
from lmspec.spec.schema import Parallel, parallel_problem

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
FULL = EXAMPLES / "mimo_v2_flash.yaml"
TINY = EXAMPLES / "mimo_v2_flash_tiny.yaml"
GB = 10**9


@pytest.fixture(scope="module")
def mimo():
    return load_spec(FULL)


@pytest.fixture(scope="module")
def tiny():
    return load_spec(TINY)


def _ordered_factorisations(n: int) -> int:
    return sum(
        1 for a in range(1, n + 1) for b in range(1, n + 1) for c in range(1, n + 1) if n % (a * b * c) == 0
    )


@pytest.mark.parametrize("n", [1, 2, 12, 16, 64, 97])
def test_layouts_are_every_ordered_factorisation(n):
    found = layouts(n)
    assert len(found) == len(set(found)) == _ordered_factorisations(n)
    assert all(lay.world_size == n for lay in found)


def test_a_layout_that_does_not_divide_is_never_listed(mimo):
    listed = set(split_layouts(mimo, 64))
    for lay in layouts(64):
        divides = 256 % lay.expert == 0 and 4 % lay.tensor == 0  # 256 experts; 4 KV heads in the global kind
        assert (lay in listed) == divides, lay
        assert (parallel_problem(mimo.model, Parallel(**lay.__dict__)) is None) == divides
    assert all(lay.fsdp == 1 for lay in split_layouts(mimo, 64, serving=True))


@pytest.mark.parametrize("which", ["tiny", "mimo"])
def test_the_classes_sum_to_the_accounting(which, request):
    spec = request.getfixturevalue(which)
    assert param_split(spec).total == param_count(spec) == account(spec).params_total


@pytest.mark.parametrize(("which", "n"), [("tiny", 8), ("mimo", 64), ("mimo", 16)])
def test_bytes_per_device_summed_over_devices_are_the_totals(which, n, request):
    """Sharded classes add up to the model once per data replica; replicated ones once per tensor rank too."""
    spec = request.getfixturevalue(which)
    split = param_split(spec)
    prec = PRECISIONS["bf16"]
    for lay in split_layouts(spec, n):
        expected = lay.data * (split.tensor_split + lay.tensor * split.replicated + split.experts)
        summed = n * device_params(split, lay)
        assert expected <= summed < expected + 3 * n, lay  # each class rounded up by less than a parameter
        mem = device_memory(spec, lay, prec, 64, 1)
        assert mem.params == device_params(split, lay) * 2 and mem.grads == mem.params
        assert mem.optimizer == device_params(split, lay) * 12
        if lay.data == 1 and lay.tensor == 1 and which == "mimo":  # MiMo's sizes divide: exact
            assert n * mem.params == 2 * param_count(spec)


def test_one_device_holds_everything_and_moves_nothing(tiny):
    mem = device_memory(tiny, Layout(), PRECISIONS["fp32"], 128, 2)
    n = param_count(tiny)
    assert (mem.params, mem.grads, mem.optimizer, mem.gathered) == (4 * n, 4 * n, 8 * n, 0)
    assert mem.activations == 2 * 128 * activation_elements(tiny, checkpointing=False) * 4
    assert device_traffic(tiny, Layout(), PRECISIONS["fp32"], 128, 2).total == 0


def test_each_dimension_moves_its_own_bytes(mimo):
    prec = PRECISIONS["bf16"]

    def traffic(**dims):
        return device_traffic(mimo, Layout(**dims), prec, 4096, 1)

    assert traffic(fsdp=8).all_to_all == traffic(fsdp=8).tensor == traffic(fsdp=8).all_reduce == 0
    assert traffic(fsdp=8).all_gather == 2 * traffic(fsdp=8).reduce_scatter > 0
    assert (
        traffic(expert=8).all_to_all > 0 and traffic(tensor=4).tensor > 0 and traffic(data=2).all_reduce > 0
    )
    # Experts split over more ranks leave a rank more often, but each rank gathers fewer expert bytes.
    assert traffic(expert=16).all_to_all > traffic(expert=2).all_to_all
    assert traffic(fsdp=2, expert=8).all_gather < traffic(fsdp=16).all_gather


def test_activations_split_over_tensor_ranks_and_shrink_with_checkpointing(mimo):
    prec = PRECISIONS["bf16"]
    one, four = (device_memory(mimo, Layout(tensor=t), prec, 32768, 1) for t in (1, 4))
    assert four.activations == -(-one.activations // 4)
    assert one.activations_checkpointed < one.activations / 10
    assert device_memory(mimo, Layout(), prec, 32768, 2).activations == 2 * one.activations


def test_the_reports_serving_layout_is_the_best_on_eight_gpus(mimo):
    """SGLang's MiMo-V2-Flash launch: --tp 8 --dp 2 --enable-dp-attention with DeepEP: 8 GPUs whose attention
    is 2 groups of tensor 4 and whose experts are split 8 ways (expert 2 x tensor 4 here)."""
    plan = plan_scale(mimo, 8, 141 * GB)
    assert plan.serving[0].layout == Layout(data=1, fsdp=1, expert=2, tensor=4)
    acc = account(mimo, mimo.model.max_position_embeddings)
    kv = acc.kv_bytes_at_context_total + acc.mtp_kv_bytes_at_context
    assert plan.serving[0].kv_per_sequence == -(-kv // 4)
    assert plan.training == []  # 4.96 TB of training state does not fit on 8 x 141 GB
    assert plan.min_training_gpus == 36


def test_sixty_four_gpus_train_the_full_model(mimo):
    plan = plan_scale(mimo, 64, 141 * GB)
    assert plan.training, "no training layout fits on 64 x 141 GB"
    assert all(f.peak <= 141 * GB for f in plan.training)
    assert all(f.layout.world_size == 64 for f in plan.training)
    keys = [(f.checkpointing, f.traffic.total) for f in plan.training]
    assert keys == sorted(keys)
    assert plan.states_total == 16 * param_count(mimo)


def test_a_spec_that_fits_nowhere_says_so(run_plan):
    code, out, _ = run_plan(FULL, "--gpus", "4", "--gpu-memory", "1GB")
    assert code == 0
    assert out.count("no layout fits") == 2


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"gpus": 0}, "--gpus"),
        ({"gpus": 70000}, "--gpus"),
        ({"gpu_memory": 0}, "--gpu-memory"),
        ({"seq_len": 10**9}, "--seq-len"),
        ({"micro_batch": 0}, "--micro-batch"),
        ({"precision": "fp8"}, "--precision"),
    ],
)
def test_inputs_out_of_range_are_value_errors(mimo, kwargs, fragment):
    args = {"gpus": 8, "gpu_memory": 141 * GB, **kwargs}
    with pytest.raises(ValueError, match=fragment):
        plan_scale(mimo, args.pop("gpus"), args.pop("gpu_memory"), **args)


@pytest.fixture
def run_plan(capsys):
    def run(*args):
        try:
            code = main(["plan", *map(str, args)])
        except SystemExit as e:
            code = int(e.code or 0)
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.mark.parametrize("gpus", ["64", "16"])
def test_the_command_answers_for_the_full_model_in_under_five_seconds(run_plan, gpus):
    start = time.perf_counter()
    code, out, err = run_plan(
        FULL, "--gpus", gpus, "--gpu-memory", "141GB", "--layout", f"{int(gpus) // 8},1,2,4"
    )
    assert time.perf_counter() - start < 5
    assert code == 0, err
    assert "serving:" in out and "data·fsdp·expert·tensor" in out
    assert f"--layout data {int(gpus) // 8} · fsdp 1 · expert 2 · tensor 4" in out


def test_json_lists_every_fitting_layout(run_plan, mimo):
    code, out, _ = run_plan(FULL, "--gpus", "64", "--gpu-memory", "141GB", "--json")
    data = json.loads(out)
    plan = plan_scale(mimo, 64, 141 * GB)
    assert len(data["training"]) == len(plan.training) and len(data["serving"]) == len(plan.serving)
    assert data["training"][0]["layout"] == plan.training[0].layout.__dict__
    assert data["precision"]["name"] == "bf16" and data["min_training_gpus"] == 36


def test_the_declared_layout_is_placed(run_plan):
    code, out, _ = run_plan(TINY, "--gpus", "4", "--gpu-memory", "1GB", "--set", "training.parallel.fsdp=4")
    assert code == 0
    assert "training.parallel data 1 · fsdp 4 · expert 1 · tensor 1: training rank" in out
