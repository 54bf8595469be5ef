"""compile_spec: rendering, the on-disk cache, the generated file's header and imports, the CLI."""

from __future__ import annotations

import ast
import os
import time
from pathlib import Path

import pytest

import lmspec
from lmspec.cli import main
from lmspec.codegen import cache_root, compile_spec
from lmspec.spec import load_spec, spec_hash

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
    compiled = compile_spec(tiny_spec, spec_path="examples/mimo_v2_flash_tiny.yaml")
    src = compiled.source
    tree = ast.parse(src)
    imports = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imports |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imports <= {"torch", "triton", "lmspec", "__future__"}
    assert "from lmspec.runtime" in src and "lmspec.compiler" not in src and "lmspec.spec" not in src
    assert (
        spec_hash(tiny_spec) in src
        and lmspec.__version__ in src
        and "examples/mimo_v2_flash_tiny.yaml" in src
    )
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
    lines = (EXAMPLES / "mimo_v2_flash_tiny.yaml").read_text().splitlines()
    line = next(i for i, text in enumerate(lines, 1) if text.strip().startswith("swa:"))
    assert (
        f"Spec: model.attention.swa (examples/mimo_v2_flash_tiny.yaml:{line})" in src
    )  # where the kind is set
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
