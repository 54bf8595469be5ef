"""Names are identifiers: a hostile name is refused at `check`, on import from config.json, and when
a checkpoint's `spec.yaml` or `config.json` is loaded by `generate`, `serve` or `from_pretrained` —
with one line, exit 2, and nothing derived from the name ever run."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lmspec.codegen.hf import config_to_spec
from lmspec.spec import SpecError, load_spec, spec_to_data
from lmspec.spec.limits import NAME_PATTERN, identifier_from
from lmspec.spec.loader import to_yaml, validate

from .conftest import TINY


def injection(canary: Path) -> str:
    """A name that, pasted raw into generated code, would create `canary`."""
    return f'd"""; __import__("os").system("touch {canary}"); """'


HOSTILE = [
    "x'); __import__('os').system('id'); ('",
    "a\nb",
    "a\u2028b",
    "tab\there",
    "{{ 7 * 7 }}",
    "{% raw %}",
    "back\\slash",
    "a b",
    "a.b",
    "a-b",
    "1abc",
    "",
    "ünï",
    "a" * 65,
]


def _rename(mapping: dict, old: str, new: str) -> dict:
    return {new if k == old else k: v for k, v in mapping.items()}


def _hostile_data(where: str, name: str) -> dict:
    """The tiny spec's data with `name` put in one name field."""
    data = copy.deepcopy(spec_to_data(load_spec(TINY)))
    m = data["model"]
    if where == "spec":
        data["name"] = name
    elif where == "stage":
        data["training"]["stages"][0]["name"] = name
    elif where == "attention":
        m["attention"] = _rename(m["attention"], "swa", name)
        for b in m["blocks"].values():
            b["attention"] = name if b["attention"] == "swa" else b["attention"]
    elif where == "ffn":
        m["ffn"] = _rename(m["ffn"], "moe", name)
        for b in m["blocks"].values():
            b["ffn"] = name if b["ffn"] == "moe" else b["ffn"]
    elif where == "block":
        m["blocks"] = _rename(m["blocks"], "MTP", name)
        m["mtp"]["block"] = name
    elif where == "reference":
        m["blocks"]["G"]["ffn"] = name
    return data


WHERE = ["spec", "stage", "attention", "ffn", "block", "reference"]
FIELD = {
    "spec": "name",
    "stage": "training.stages.0.name",
    "attention": "model.attention.{}",
    "ffn": "model.ffn.{}",
    "block": "model.blocks.{}",
    "reference": "model.blocks.G.ffn",
}


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("name", HOSTILE, ids=lambda n: ascii(n)[1:20])
def test_check_refuses_a_hostile_name(tmp_path, run_cli, where, name):
    path = tmp_path / "spec.yaml"
    path.write_text(to_yaml(_hostile_data(where, name)), encoding="utf-8")
    code, out, err = run_cli("check", path)
    assert (code, out) == (2, "")
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and "Traceback" not in err, err
    with pytest.raises(SpecError) as info:
        load_spec(path)
    e = info.value
    assert e.line > 0 and e.col > 0  # file:line:col of the name itself
    assert e.field.startswith(FIELD[where].format(name)[:40])
    assert "expected a name matching" in e.message or "expected one of" in e.message


def test_check_refuses_the_injection_and_runs_nothing(tmp_path):
    canary = tmp_path / "CANARY"
    path = tmp_path / "spec.yaml"
    path.write_text(to_yaml(_hostile_data("ffn", injection(canary))), encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "lmspec", "check", str(path)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "expected a name matching [A-Za-z_][A-Za-z0-9_]{0,63}" in proc.stderr
    assert not canary.exists()


@pytest.mark.parametrize("name", ["a", "_", "G0", "swa_2", "A" * 64, "__init__"])
def test_identifiers_are_accepted(name):
    data = _hostile_data("ffn", name)
    assert name in validate(data, {}, "<test>").model.ffn


def test_the_documented_pattern_is_the_one_enforced():
    assert NAME_PATTERN == r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("MiMo-V2-Flash", "MiMo_V2_Flash"),
        ("7b model", "_7b_model"),
        ("", "imported"),
        ("ü", "_"),
        ("x" * 99, "x" * 64),
    ],
)
def test_folder_names_become_identifiers(text, name):
    assert identifier_from(text) == name


# ---------------------------------------------------------------------------------------------
# config.json import
# ---------------------------------------------------------------------------------------------


def test_import_refuses_an_embedded_spec_with_a_hostile_name(tmp_path):
    canary = tmp_path / "CANARY"
    config = {"lmspec_spec": _hostile_data("attention", injection(canary))}
    with pytest.raises(SpecError) as info:
        config_to_spec(config)
    assert "\n" not in str(info.value) and info.value.field.startswith("model.attention.")
    assert not canary.exists()


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("scoring_func", 'sigmoid"; __import__("os").system("id"); "'),
        ("topk_method", ["noaux_tc"]),
        ("layer_types", ["full_attention", "evil\nattention"]),
        ("num_hidden_layers", 1e9),
        ("hidden_size", True),
        ("model_type", "mimo_v2_flash\n"),
    ],
)
def test_import_refuses_hostile_values(run_cli, tmp_path, key, value):
    config = {"num_hidden_layers": 2, "layer_types": ["full_attention"] * 2, key: value}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    code, out, err = run_cli("import-hf", path, "-o", tmp_path / "spec.yaml")
    assert (code, out) == (2, "")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "spec.yaml").exists()


# ---------------------------------------------------------------------------------------------
# Checkpoints: spec.yaml and config.json edited after saving
# ---------------------------------------------------------------------------------------------

SMALL = {
    "name": "small",
    "model": {
        "vocab_size": 64,
        "hidden_size": 16,
        "max_position_embeddings": 64,
        "attention": {
            "global": {
                "kind": "global",
                "num_heads": 2,
                "num_kv_heads": 1,
                "qk_head_dim": 8,
                "v_head_dim": 8,
                "rope": {"theta": 10000.0},
            },
            "swa": {
                "kind": "sliding",
                "window": 4,
                "window_convention": "previous_plus_self",
                "num_heads": 2,
                "num_kv_heads": 2,
                "qk_head_dim": 8,
                "v_head_dim": 8,
                "rope": {"theta": 10000.0},
                "sink": True,
            },
        },
        "ffn": {
            "dense": {"kind": "dense", "intermediate_size": 24},
            "moe": {"kind": "moe", "num_experts": 4, "top_k": 2, "expert_intermediate_size": 8},
        },
        "blocks": {"G0": {"attention": "global", "ffn": "dense"}, "S": {"attention": "swa", "ffn": "moe"}},
        "layers": "G0 S",
    },
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, Path]:
    """A real checkpoint of a two-layer spec (build + save_pretrained), and that spec's file."""
    import lmspec

    root = tmp_path_factory.mktemp("names")
    spec_file = root / "small.yaml"
    spec_file.write_text(to_yaml(SMALL))
    model = lmspec.build(load_spec(spec_file))
    model.save_pretrained(root / "ckpt")
    return root / "ckpt", spec_file


def _hostile_copy(checkpoint: Path, tmp_path: Path, canary: Path, place: str) -> Path:
    """A copy of the checkpoint with the injection in its spec.yaml, or in its config.json alone."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for f in checkpoint.iterdir():
        (ckpt / f.name).write_bytes(f.read_bytes())
    name = injection(canary)
    if place == "spec.yaml":
        data = yaml.safe_load((ckpt / "spec.yaml").read_text())
        data["model"]["ffn"] = _rename(data["model"]["ffn"], "moe", name)
        data["model"]["blocks"]["S"]["ffn"] = name
        (ckpt / "spec.yaml").write_text(to_yaml(data))
    else:
        (ckpt / "spec.yaml").unlink()  # config.json is what from_pretrained reads then
        config = json.loads((ckpt / "config.json").read_text())
        spec = copy.deepcopy(SMALL)
        spec["model"]["attention"] = _rename(spec["model"]["attention"], "swa", name)
        spec["model"]["blocks"]["S"]["attention"] = name
        config["lmspec_spec"] = spec
        (ckpt / "config.json").write_text(json.dumps(config))
    return ckpt


PLACES = ["spec.yaml", "config.json"]


@pytest.mark.parametrize("place", PLACES)
def test_from_pretrained_refuses_a_hostile_checkpoint(checkpoint, tmp_path, place):
    import lmspec

    canary = tmp_path / "CANARY"
    ckpt = _hostile_copy(checkpoint[0], tmp_path, canary, place)
    with pytest.raises(SpecError) as info:
        lmspec.from_pretrained(ckpt)
    assert len(str(info.value).splitlines()) == 1
    assert "expected a name matching" in info.value.message
    assert not canary.exists()


def _lmspec(*args: str | Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "lmspec", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("command", ["generate", "serve"])
def test_generate_and_serve_refuse_a_hostile_checkpoint(checkpoint, tmp_path, place, command):
    canary = tmp_path / "CANARY"
    ckpt = _hostile_copy(checkpoint[0], tmp_path, canary, place)
    extra = ["--prompt", "hi", "--max-tokens", "2"] if command == "generate" else ["--port", "8765"]
    proc = _lmspec(command, checkpoint[1], "--checkpoint", ckpt, *extra)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "expected a name matching" in lines[0]
    assert "serving on" not in proc.stdout
    assert not canary.exists()


GARBLED = {
    "truncated": b'{"num_hidden_layers": ',
    "not_an_object": b"[1, 2]",
    "deep": b"[" * 100_000,
    "binary": bytes(range(256)) * 4,
}


@pytest.mark.parametrize("content", list(GARBLED.values()), ids=list(GARBLED))
def test_a_garbled_config_json_is_one_line(checkpoint, tmp_path, content):
    import lmspec

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for f in checkpoint[0].iterdir():
        if f.name != "spec.yaml":  # config.json is what is read then
            (ckpt / f.name).write_bytes(f.read_bytes())
    (ckpt / "config.json").write_bytes(content)
    with pytest.raises(SpecError) as info:
        lmspec.from_pretrained(ckpt)
    assert str(info.value).startswith(f"{ckpt / 'config.json'}") and "\n" not in str(info.value)
    proc = _lmspec("generate", checkpoint[1], "--checkpoint", ckpt, "--prompt", "hi")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
