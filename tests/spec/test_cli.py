"""`lmspec check` and `lmspec schema`, and the spec stage's import boundary."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lmspec.spec import Spec

from .conftest import EXAMPLES, MIMO, TINY


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.stem)
def test_check_examples(run_cli, path):
    code, out, err = run_cli("check", path)
    assert (code, err) == (0, "")
    assert len(out.strip().splitlines()) == 1
    assert out.startswith(f"{path}: ok — ")


def test_check_summary(run_cli):
    code, out, _ = run_cli("check", MIMO)
    assert code == 0
    assert out.strip() == (
        f"{MIMO}: ok — mimo_v2_flash: 48 layers (1xG0, 39xS, 8xG), hidden 4096, vocab 152576, "
        "3 MTP blocks, 4 training stages"
    )
    code, out, _ = run_cli(
        "check", TINY, "--set", "model.mtp.num_blocks=1", "--set", "serving.speculative_depth=1"
    )
    assert code == 0 and "1 MTP blocks" in out


def test_schema_is_json_schema_of_the_spec(run_cli):
    code, out, _ = run_cli("schema")
    assert code == 0
    schema = json.loads(out)
    assert schema["type"] == "object"
    assert set(schema["properties"]) == {"name", "model", "training", "serving"}
    assert set(schema["required"]) == {"name", "model"}
    assert schema["additionalProperties"] is False
    assert schema == Spec.model_json_schema()
    sliding = schema["$defs"]["SlidingAttention"]
    assert {"window", "window_convention", "num_kv_heads", "qk_head_dim", "v_head_dim"} <= set(
        sliding["properties"]
    )


def test_spec_stage_imports_neither_torch_nor_jinja2():
    code = (
        "import sys, lmspec.spec, lmspec.spec.loader, lmspec.spec.schema, lmspec.spec.pattern; "
        f"lmspec.spec.load_spec({str(MIMO)!r}); "
        "print(sorted(m for m in ('torch', 'jinja2', 'triton', 'networkx') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_usage_errors_exit_2(run_cli):
    code, _, err = run_cli("check")
    assert code == 2 and "Traceback" not in err
