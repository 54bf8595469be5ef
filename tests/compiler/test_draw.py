"""`lmspec graph`: listing, DOT, pictures, and the command's user errors."""

import shutil

import pydot
import pytest

from lmspec.cli import main
from lmspec.compiler import lower, run_passes
from lmspec.compiler.draw import build_view, default_expanded, parse_layers, render, to_dot, to_text

from .conftest import EXAMPLES

TINY = str(EXAMPLES / "mimo_v2_flash_tiny.yaml")


@pytest.fixture(scope="module")
def graph(tiny):
    return run_passes(lower(tiny))


def test_parse_layers():
    assert parse_layers(None, 7) is None
    assert parse_layers("0-2,5", 7) == {0, 1, 2, 5}
    for bad in ("7", "3-1", "a", "1-x"):
        with pytest.raises(ValueError, match="--layers"):
            parse_layers(bad, 7)


def test_text_lists_every_op_once(graph):
    text = to_text(graph, None)
    assert text.splitlines()[0].startswith(
        "mimo_v2_flash_tiny: 151 ops after shapes, check, accounting, fusion"
    )
    op_lines = [line for line in text.splitlines()[1:] if "<-" in line]
    assert len(op_lines) == graph.nx.number_of_nodes()
    assert "  model.layers.3  [G: attention global, ffn moe]" in text
    assert "fuses linear + sigmoid + correction_bias + topk + renormalize" in text
    assert "hnorm" in text and "<- model.norm[sum]" in text  # MTP reads the residual sum of the fused norm


def test_text_collapses_layers_outside_the_range(graph):
    text = to_text(graph, {1})
    collapsed = [line for line in text.splitlines() if line.endswith("(collapsed)")]
    assert len(collapsed) == 6
    assert "model.layers.2  [S: attention swa, ffn moe]  12 ops, 357,636 params (collapsed)" in text


def test_view_collapses_and_keeps_edges_consistent(graph):
    assert default_expanded(graph) == {0, 1, 3}  # first G0, S and G layers
    view = build_view(graph, default_expanded(graph))
    assert view.collapsed == {
        "model.layers.2",
        "model.layers.4",
        "model.layers.5",
        "model.layers.6",
        "model.mtp.layers.1",
        "model.mtp.layers.2",
    }
    assert all(a in view.nodes and b in view.nodes and a != b for a, b in view.edges)
    assert ("model.layers.5", "model.layers.6") in view.edges
    fused = {n.id for n in view.nodes.values() if n.fused}
    assert "model.layers.1.mlp.gate" in fused and "loss" in fused


def test_dot_parses_with_clusters_and_marked_fused_units(graph):
    view = build_view(graph, {0, 1})
    (dot,) = pydot.graph_from_dot_data(to_dot(view))
    clusters = {s.get_name().strip('"') for s in dot.get_subgraphs()}
    assert {"cluster_model.layers.0", "cluster_model.layers.1", "cluster_model.mtp.layers.0"} <= clusters
    assert "cluster_model.layers.2" not in clusters
    nodes = {n.get_name().strip('"'): n for s in dot.get_subgraphs() for n in s.get_nodes()}
    nodes |= {n.get_name().strip('"'): n for n in dot.get_nodes()}
    assert set(view.nodes) <= set(nodes)
    assert nodes["model.layers.1.post_attention_layernorm"].get("penwidth") == "2"
    assert len(dot.get_edges()) == len(view.edges)


@pytest.mark.parametrize("fmt,magic", [("png", b"\x89PNG"), ("svg", b"<?xml")])
def test_matplotlib_pictures(graph, tmp_path, fmt, magic):
    path = tmp_path / f"g.{fmt}"
    render(graph, fmt, None, path, renderer="matplotlib")
    assert path.read_bytes().startswith(magic) and path.stat().st_size > 20_000


def test_command(tmp_path, capsys):
    assert main(["graph", TINY, "--format", "dot", "-o", str(tmp_path / "g.dot")]) == 0
    assert (tmp_path / "g.dot").read_text().startswith("digraph lmspec {")
    assert main(["graph", TINY, "--layers", "0"]) == 0
    assert "(collapsed)" in capsys.readouterr().out
    assert main(["graph", TINY, "--layers", "0-9"]) == 2
    err = capsys.readouterr().err
    assert err == "lmspec: error: --layers: expected indices within 0-6, got '0-9'\n"
    assert main(["graph", TINY, "--format", "png", "-o", str(tmp_path / "missing" / "g.png")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz's dot is not installed")
def test_graphviz_pictures(graph, tmp_path):
    path = tmp_path / "g.png"
    render(graph, "png", {0}, path, renderer="dot")
    assert path.read_bytes().startswith(b"\x89PNG")


def test_dot_renderer_without_graphviz_is_a_usage_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr("lmspec.compiler.draw.shutil.which", lambda name: None)
    out = tmp_path / "g.png"
    assert main(["graph", TINY, "--format", "png", "--renderer", "dot", "-o", str(out)]) == 2
    assert "dot is not installed" in capsys.readouterr().err and not out.exists()
    assert main(["graph", TINY, "--format", "png", "-o", str(out)]) == 0  # auto falls back to matplotlib
    assert out.read_bytes().startswith(b"\x89PNG")
