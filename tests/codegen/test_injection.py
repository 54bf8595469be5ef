"""Names are data: hostile kind, block and spec names never become code in the generated module.

Validation rejects such names; these tests bypass it (a Spec copied with `model_copy`, which does not
validate, and block names patched into the lowered graph) to show that even then the output compiles,
importing it runs nothing, and every hostile name appears only inside a string literal or a one-line
comment.
"""

from __future__ import annotations

import ast
import io
import tokenize
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import lmspec
from lmspec.codegen import compile_graph
from lmspec.codegen.render import TemplateEmitError, jinja_env, py
from lmspec.compiler import lower, run_passes
from lmspec.spec import Spec

# Each hostile name is formatted with the payload, a statement that creates the canary file.
HOSTILE = [
    'd"""; {payload}; """',  # closes a triple-quoted docstring
    "q'''; {payload}; '''",
    'x"; {payload}; "',  # closes a double-quoted literal
    "y'; {payload}; '",
    "n\n{payload}\n#",  # a newline leaves a comment
    "r\r{payload}\r\n#",
    "u\u2028{payload}\u2029\x0c#",  # line separators some tools break lines at
    'b\\"; {payload}; #\\',  # backslashes that escape the closing quote
    "{{{{ {payload} }}}}{{% if true %}}{{{{ 'ev' ~ 'aluated' }}}}{{% endif %}}",  # Jinja syntax
    "z\x00{payload}",  # a NUL byte, which compile() refuses in source
    "\u202e{payload}",  # a right-to-left override that reorders what a reader sees
]
RENAMES = {"global": "g", "swa": "s", "dense": "d", "moe": "m", "G0": "0", "S": "S", "G": "G", "MTP": "M"}


def _payload(canary: Path) -> str:
    return f'__import__("os").system("touch {canary}")'


def _rename_kinds(spec: Spec, rename: dict[str, str], name: str) -> Spec:
    """A copy of `spec` with attention and FFN kinds renamed, without validation."""
    m = spec.model
    blocks = {
        b: blk.model_copy(update={"attention": rename[blk.attention], "ffn": rename[blk.ffn]})
        for b, blk in m.blocks.items()
    }
    model = m.model_copy(
        update={
            "attention": {rename[k]: v for k, v in m.attention.items()},
            "ffn": {rename[k]: v for k, v in m.ffn.items()},
            "blocks": blocks,
        }
    )
    return spec.model_copy(update={"name": name, "model": model})


def _hostile_graph(spec: Spec, template: str, canary: Path):
    """The passed graph of `spec` with every kind, block and the spec named after `template`."""
    base = template.format(payload=_payload(canary))
    rename = {k: f"{base}{v}" for k, v in RENAMES.items()}
    g = lower(_rename_kinds(spec, rename, f"{base}spec"))
    g.layers = [replace(x, block=rename[x.block]) for x in g.layers]
    g.mtp_layers = [replace(x, block=rename[x.block]) for x in g.mtp_layers]
    return run_passes(g), [*rename.values(), f"{base}spec"]


def _safe_spans(src: str) -> list[tuple[int, int]]:
    """Character spans of plain string literals and of comments (never f-strings)."""
    starts = [0]
    for line in src.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))
    spans = []
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        literal = tok.type == tokenize.STRING and "f" not in tok.string.split(tok.string[-1])[0].lower()
        if literal or tok.type == tokenize.COMMENT:
            spans.append((starts[tok.start[0] - 1] + tok.start[1], starts[tok.end[0] - 1] + tok.end[1]))
    return spans


def _assert_only_inside_literals(src: str, text: str) -> None:
    spans = _safe_spans(src)
    at = src.find(text)
    while at != -1:
        assert any(a <= at and at + len(text) <= b for a, b in spans), (
            f"{text!r} appears outside a string literal or comment at {at}: {src[max(0, at - 80) : at + 80]!r}"
        )
        at = src.find(text, at + 1)


@pytest.mark.parametrize("template", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_names_only_ever_appear_as_string_literals(tiny_spec, tmp_path, template):
    canary = tmp_path / "canary"
    graph, names = _hostile_graph(tiny_spec, template, canary)
    spec_path = f"{names[-1]}.yaml"  # the path the header names is data too
    compiled = compile_graph(graph, out_dir=tmp_path / "out", spec_path=spec_path)
    src = compiled.source
    for path in [compiled.model_path, *compiled.kernel_dir.glob("*.py")]:
        compile(path.read_text(), str(path), "exec")
    comments = [
        t.string for t in tokenize.generate_tokens(io.StringIO(src).readline) if t.type == tokenize.COMMENT
    ]
    assert all("\n" not in c and "\r" not in c for c in comments)
    for text in [*names, spec_path, _payload(canary), "__import__("]:
        _assert_only_inside_literals(src, text)
    called = {
        n.func.id
        for n in ast.walk(ast.parse(src))
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
    }
    assert not called & {"__import__", "exec", "eval", "compile", "open"}
    assert "evaluated" not in src  # Jinja syntax in a name is never evaluated
    assert compiled.module.__name__.startswith("lmspec_generated_") and not canary.exists()
    classes = {n.name for n in ast.parse(src).body if isinstance(n, ast.ClassDef)}
    assert all(c.isidentifier() and c.isascii() for c in classes)
    assert compiled.class_name in classes


def test_build_runs_a_hostile_spec_as_a_model_and_nothing_else(tiny_spec, tmp_path):
    """Names without dots are valid module keys: the model builds and runs, and the payload never does."""
    canary = tmp_path / "canary"
    payload = f"open({str(canary)!r}, 'w')"
    names = {k: f'{k}"""\'\n{payload}#{{{{ x }}}}\\' for k in RENAMES}
    spec = _rename_kinds(tiny_spec, names, f'spec"""\n{payload}')
    torch.manual_seed(0)
    model = lmspec.build(spec)
    out = model(torch.randint(0, 256, (1, 8)))
    assert out.logits.shape == (1, 8, 256) and not canary.exists()
    assert set(model.rope_thetas()) == {names["global"], names["swa"]}  # the names are data, kept exactly


def test_the_environment_refuses_strings_that_skip_the_filter():
    env = jinja_env()
    assert env is jinja_env()  # one shared environment
    with pytest.raises(TemplateEmitError, match="without the py filter"):
        env.from_string("x = {{ name }}").render(name="a")
    assert env.from_string("x = {{ name | py }}").render(name='a"b') == "x = 'a\"b'"
    assert env.from_string("# {{ name | py('text') }}").render(name="a\nb\"'\\c") == "# a?b???c"
    assert (
        env.from_string("{{ n }} {{ f }} {{ b }} {{ z }}").render(n=3, f=0.5, b=True, z=None)
        == "3 0.5 True None"
    )
    assert py(["a\n", "b"], "comment") == "# a?\n# b"
    with pytest.raises(TemplateEmitError):
        py("a b", "ident")
    with pytest.raises(TemplateEmitError):
        env.from_string("{{ x }}").render(x=float("nan"))
