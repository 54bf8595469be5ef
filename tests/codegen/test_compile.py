"""compile_spec: rendering, the on-disk cache, the generated file's header and imports, the CLI."""

from __future__ import annotations

import ast
import os
import time
from pathlib import Path

import pytest
import torch

import lmspec
from lmspec.cli import main
from lmspec.codegen import cache_root, compile_graph, compile_spec
from lmspec.codegen.render import format_source
from lmspec.compiler import lower, run_passes
from lmspec.spec import load_spec, spec_hash, spec_to_data
from lmspec.spec.loader import validate

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_second_compile_is_a_byte_identical_cache_hit(tiny_spec):
    first = compile_spec(tiny_spec)
    text = first.model_path.read_bytes()
    mtime = os.stat(first.model_path).st_mtime_ns
    second = compile_spec(tiny_spec)
    assert second.cache_hit and second.model_path == first.model_path
    assert second.model_path.read_bytes() == text and os.stat(second.model_path).st_mtime_ns == mtime
    assert first.model_path.parent.parent.name == first.key[:2]
    assert first.model_path.is_relative_to(cache_root())
    assert not list(first.directory.glob(".*tmp"))  # no temp files left behind


def test_key_depends_on_spec_and_passes(tiny_spec):
    base = compile_spec(tiny_spec)
    unfused = compile_spec(tiny_spec, disable=("fusion",))
    other = compile_spec(lmspec.build(tiny_spec, device="meta", overrides=["model.hidden_size=64"]).spec)
    assert len({base.key, unfused.key, other.key}) == 3
    assert base.module is not unfused.module


def test_generated_code_is_readable_and_self_describing(tiny_spec):
    path = EXAMPLES / "mimo_v2_flash_tiny.yaml"
    compiled = compile_spec(tiny_spec, spec_path=path)
    src = compiled.source
    tree = ast.parse(src)
    imports = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imports |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imports <= {"torch", "triton", "lmspec", "__future__"}
    assert "from lmspec.runtime" in src and "lmspec.compiler" not in src and "lmspec.spec" not in src
    assert spec_hash(tiny_spec) in src and lmspec.__version__ in src and str(path) in src
    classes = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    assert {
        "GlobalAttention",
        "SwaAttention",
        "DenseFFN",
        "MoeFFN",
        "G0Block",
        "GBlock",
        "SBlock",
        "MTPBlock",
        "MTPLayer",
        "MimoV2FlashTinyForCausalLM",
    } <= classes
    assert "window=32 previous_plus_self -> 33 keys; sink: learnable" in src
    lines = path.read_text().splitlines()
    line = next(i for i, text in enumerate(lines, 1) if text.strip().startswith("swa:"))
    assert f"Spec: model.attention.swa ({path}:{line})" in src  # where the kind is set
    assert "for e in range" not in src  # experts run as grouped GEMMs in the backend


def test_kernels_are_rendered_next_to_the_model(tiny_spec):
    compiled = compile_spec(tiny_spec)
    assert compiled.kernel_dir is not None and (compiled.kernel_dir / "kernels.json").exists()


def test_out_dir_and_cli(tmp_path, capsys):
    assert main(["compile", str(EXAMPLES / "mimo_v2_flash_tiny.yaml"), "-o", str(tmp_path)]) == 0
    assert (tmp_path / "model.py").exists()
    assert str(tmp_path / "model.py") in capsys.readouterr().out
    assert main(["compile", str(tmp_path / "missing.yaml")]) == 2


def test_full_size_compile_is_fast():
    spec = load_spec(EXAMPLES / "mimo_v2_flash.yaml")
    start = time.perf_counter()
    compiled = compile_spec(spec, spec_path="examples/mimo_v2_flash.yaml")
    assert compiled.model_class.__name__ == "MimoV2FlashForCausalLM"
    assert time.perf_counter() - start < 10


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("mimo_v2_flash*.yaml")))
def test_every_example_compiles_and_counts_match(example):
    from lmspec.compiler.accounting import param_count

    model = lmspec.build(EXAMPLES / example, device="meta")
    assert model.num_parameters() == param_count(model.spec)


def test_generated_module_runs_without_the_compiler(tiny_spec, tmp_path):
    """model.py needs only torch and lmspec.runtime: import it with the spec, compiler and codegen blocked."""
    import subprocess
    import sys

    compiled = compile_spec(tiny_spec, out_dir=tmp_path)
    script = f"""
import sys
for name in ("lmspec.spec", "lmspec.compiler", "lmspec.codegen", "jinja2", "pydantic"):
    sys.modules[name] = None  # any import of these now fails
import importlib.util, torch
spec = importlib.util.spec_from_file_location("generated", {str(compiled.model_path)!r})
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
torch.manual_seed(0)
model = mod.{compiled.class_name}()
model.init_weights()
out = model(torch.randint(0, 256, (1, 8)))
print(tuple(out.logits.shape))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(1, 8, 256)"


# -- codegen reads only the plan ------------------------------------------------------------------

CODEGEN = Path(__file__).resolve().parents[2] / "lmspec" / "codegen"


class _NoSpec:
    def __getattr__(self, name):
        raise AssertionError(f"codegen read graph.spec.{name}")


def test_codegen_renders_from_the_plan_alone(tiny_spec, tmp_path):
    graph = run_passes(lower(tiny_spec))
    graph.spec = _NoSpec()
    compiled = compile_graph(graph, out_dir=tmp_path / "plan")
    assert (
        "MimoV2FlashTinyForCausalLM" in compiled.describe()
        and compiled.class_name == compiled.plan.class_name
    )
    assert compiled.source == compile_spec(tiny_spec, out_dir=tmp_path / "spec").source
    assert compiled.key == compile_spec(tiny_spec).key


def test_codegen_source_never_touches_a_spec():
    """render.py and __init__.py access no `.spec` attribute and import nothing from the schema."""
    allowed = {"render.py": {"SpecError", "load"}, "__init__.py": {"Spec"}}  # load: the file's positions only
    for name, names in allowed.items():
        tree = ast.parse((CODEGEN / name).read_text())
        assert not [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "spec"], (
            name
        )
        imported = {
            a.name
            for n in ast.walk(tree)
            if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("lmspec.spec")
            for a in n.names
        }
        assert imported <= names, (name, imported - names)
    template = (CODEGEN / "templates" / "model.py.jinja").read_text()
    assert "spec." not in template.replace("lmspec.", "")


@pytest.mark.parametrize("disable", [(), ("fusion",)])
def test_generated_module_has_no_unused_constants_and_is_formatted(tiny_spec, disable):
    src = compile_spec(tiny_spec, disable=disable).source
    tree = ast.parse(src)
    runtime = Path(lmspec.__file__).parent / "runtime"
    read_by_runtime = {
        n.attr
        for p in runtime.rglob("*.py")
        for n in ast.walk(ast.parse(p.read_text()))
        if isinstance(n, ast.Attribute)
    }
    read_here = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    read_here |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    constants = [
        t.id
        for body in [tree.body, *(c.body for c in tree.body if isinstance(c, ast.ClassDef))]
        for n in body
        if isinstance(n, ast.Assign)
        for t in n.targets
        if isinstance(t, ast.Name) and t.id.isupper()
    ]
    assert constants and not [c for c in constants if c not in read_here | read_by_runtime]
    for gone in ("SPEC_NAME", "FUSED_UNITS", "WINDOW_KEYS", "TOP_K"):
        assert gone not in src
    assert format_source(src) == src  # ruff format leaves it as it is


def test_every_generated_class_names_its_ir_nodes(tiny_spec):
    compiled = compile_spec(tiny_spec, spec_path="examples/mimo_v2_flash_tiny.yaml")
    tree = ast.parse(compiled.source)
    docs = {c.name: ast.get_docstring(c) or "" for c in tree.body if isinstance(c, ast.ClassDef)}
    assert [name for name, doc in docs.items() if "IR: " not in doc] == ["MTPStack"]
    assert (
        "IR: model.layers.{1-2, 4-5}.self_attn.{attention, k_proj, o_proj, q_proj, rope_k, rope_q, v_proj,"
        in (docs["SwaAttention"])
    )
    assert "IR: model.layers.{1-6}.mlp.gate" in docs["MoeFFNRouter"]
    assert "IR: model.layers.{1-2, 4-5}.{input_layernorm, post_attention_layernorm}" in docs["SBlock"]
    # Every IR node id is named by some class: the IR lines cover the plan's partition of the graph.
    owners = compiled.plan.node_owners()
    text = " ".join(docs.values())
    for node in owners:
        tail = node.rsplit(".", 1)[-1]
        assert tail in text, node


def _mixed_kinds(tiny_spec):
    """The tiny spec plus a second sliding kind (8 keys, no sink, q/k/v bias) and a second MoE kind
    (4 experts top-1, softmax, no correction bias, no renormalisation, one shared expert)."""
    data = spec_to_data(tiny_spec)
    m = data["model"]
    m["attention"]["near"] = {
        **m["attention"]["swa"],
        "window": 8,
        "window_convention": "keys",
        "sink": False,
    }
    m["attention"]["near"]["bias"] = True
    m["ffn"]["narrow"] = {
        **m["ffn"]["moe"],
        **{"num_experts": 4, "top_k": 1, "score_function": "softmax", "correction_bias": False},
        **{"renormalize": False, "num_shared_experts": 1},
    }
    m["blocks"]["N"] = {"attention": "near", "ffn": "narrow"}
    m["layers"] = "G0 S N G S N G"
    return validate(data, {}, "<mixed kinds>")


def test_two_moe_and_two_sliding_kinds_compile_and_agree_fused_and_unfused(tiny_spec):
    spec = _mixed_kinds(tiny_spec)
    compiled = compile_spec(spec)
    src = compiled.source
    assert "window=8 keys -> 8 keys; sink: none" in src and "window=32 previous_plus_self -> 33 keys" in src
    assert "class NarrowFFNRouter" in src and "class NarrowFFNSharedExperts" in src
    assert (
        'score_function="softmax"' in src and "self.q_proj = nn.Linear(HIDDEN_SIZE, 4 * 48, bias=True)" in src
    )
    assert {k.name for k in compiled.plan.kernels if k.family == "moe"} == {
        "moe_sigmoid_e8_k2",
        "moe_softmax_e4_k1_raw",
    }
    torch.manual_seed(0)
    fused = lmspec.build(spec).eval()
    plain = lmspec.build(spec, disable_passes=("fusion",)).eval()
    plain.load_state_dict(fused.state_dict())
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = fused(x[:, :-1], labels=x[:, 1:]), plain(x[:, :-1], labels=x[:, 1:])
        torch.testing.assert_close(fused(x).logits, plain(x).logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.stack(a.mtp_losses), torch.stack(b.mtp_losses), rtol=1e-5, atol=1e-6)
