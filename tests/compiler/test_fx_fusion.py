"""torch.fx fusion: the rewritten block computes the same values with fewer nodes."""

import pytest

torch = pytest.importorskip("torch")

from lmspec.compiler import fx_fusion  # noqa: E402
from lmspec.testing.compare import close  # noqa: E402


def _inputs(hidden=24, inter=40, tokens=7, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    return (
        r(2, tokens, hidden),
        r(2, tokens, hidden),
        1 + 0.1 * r(hidden),
        r(inter, hidden) / 5,
        r(inter, hidden) / 5,
        r(hidden, inter) / 5,
    )


@pytest.mark.parametrize("layers", [1, 3])
def test_rewrite_matches_values_and_shrinks_the_graph(layers):
    eps = 1e-5
    block = fx_fusion.reference_block(eps, layers)
    gm = fx_fusion.trace(block)
    args = _inputs()
    expected = block(*args)
    before = fx_fusion.node_count(gm)
    counts = fx_fusion.fuse(gm, eps)
    assert counts == {"add_rmsnorm": layers, "swiglu": layers}
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(fx_fusion.add_rmsnorm) == layers and targets.count(fx_fusion.swiglu) == layers
    # Per layer: add, pow, mean, add eps, rsqrt, mul, mul -> one add_rmsnorm + 2 getitems (7 -> 3);
    # silu, mul -> one swiglu (2 -> 1).
    assert fx_fusion.node_count(gm) == before - 5 * layers
    torch.testing.assert_close(gm(*args), expected, **close("float64_op"))


def test_patterns_match_only_the_traced_epsilon():
    gm = fx_fusion.trace(fx_fusion.reference_block(1e-6))
    assert fx_fusion.fuse(gm, 1e-5) == {"add_rmsnorm": 0, "swiglu": 1}


def test_caller_kernels_are_swapped_in():
    calls = []

    def my_add_rmsnorm(x, residual, weight, eps):
        calls.append("add_rmsnorm")
        return fx_fusion.add_rmsnorm(x, residual, weight, eps)

    gm = fx_fusion.trace(fx_fusion.reference_block(1e-5, layers=2))
    fx_fusion.fuse(gm, 1e-5, impls={"add_rmsnorm": my_add_rmsnorm})
    args = _inputs()
    torch.testing.assert_close(gm(*args), fx_fusion.reference_block(1e-5, layers=2)(*args))
    assert calls == ["add_rmsnorm", "add_rmsnorm"]
