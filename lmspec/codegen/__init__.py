"""Codegen stage: render a Plan into a readable PyTorch model module and its Triton kernels.

``compile_spec(spec)`` lowers the spec and runs the compiler passes, the last of which plans the graph;
``compile_plan(plan)`` renders ``model.py`` from ``templates/model.py.jinja`` and the plan's kernel variants
into ``kernels/``, and writes them (atomically) under ``$LMSPEC_CACHE`` or ``~/.cache/lmspec``, at
``<key[:2]>/<key>/``. Nothing here reads the Spec: the plan is the whole input. The key covers the plan,
where the header points, the template sources and the lmspec/torch versions, so a second compile is a
cache hit that returns byte-identical code.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import lmspec
from lmspec.codegen.render import render_model, spec_locations, template_sources, torch_version
from lmspec.compiler import Graph, lower, run_passes
from lmspec.compiler.debug import log_generated
from lmspec.compiler.plan import Plan, planned
from lmspec.errors import UsageError
from lmspec.files import write_atomic
from lmspec.spec import Spec

if TYPE_CHECKING:
    import torch

__all__ = ["CompiledModel", "cache_key", "cache_root", "compile_graph", "compile_plan", "compile_spec"]


def cache_root() -> Path:
    return Path(os.environ.get("LMSPEC_CACHE") or Path.home() / ".cache" / "lmspec")


def _kernels_module() -> ModuleType | None:
    """The Triton kernel renderer, if this install has it (the torch path never needs it)."""
    try:
        from lmspec.codegen import kernels
    except ImportError:
        return None
    return kernels


def _kernel_template_bytes() -> bytes:
    templates = Path(__file__).parent / "templates"
    return b"".join(
        p.read_bytes() for p in sorted(templates.glob("*.jinja")) if not p.name.startswith("model")
    )


def cache_key(plan: Plan, spec_path: str | None, locations: dict[str, str] | None = None) -> str:
    """What the generated files depend on: the plan, where the header points, templates, versions."""
    h = hashlib.sha256()
    payload = {
        "plan": plan.to_data(),
        "spec_path": spec_path,
        "locations": locations or {},
        "lmspec": lmspec.__version__,
        "torch": torch_version(),
    }
    h.update(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode())
    h.update(template_sources())
    h.update(_kernel_template_bytes())
    return h.hexdigest()


@dataclass
class CompiledModel:
    """A rendered model module on disk, importable; ``model_class`` is the generated ``...ForCausalLM``."""

    plan: Plan
    key: str
    directory: Path
    cache_hit: bool
    kernel_files: list[Path] = field(default_factory=list)

    @property
    def model_path(self) -> Path:
        return self.directory / "model.py"

    @property
    def kernel_dir(self) -> Path | None:
        d = self.directory / "kernels"
        return d if d.is_dir() else None

    @property
    def source(self) -> str:
        return self.model_path.read_text()

    @property
    def class_name(self) -> str:
        return self.plan.class_name

    @property
    def module(self) -> ModuleType:
        """The generated module, imported once per key under a unique name."""
        name = f"lmspec_generated_{self.key[:20]}"
        mod = sys.modules.get(name)
        if mod is not None and getattr(mod, "__file__", None) == str(self.model_path):
            return mod
        loader_spec = importlib.util.spec_from_file_location(name, self.model_path)
        if loader_spec is None or loader_spec.loader is None:
            raise ImportError(f"cannot import generated model from {self.model_path}")
        mod = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = mod
        try:
            loader_spec.loader.exec_module(mod)
        except BaseException:
            del sys.modules[name]
            raise
        return mod

    @property
    def model_class(self) -> type[torch.nn.Module]:
        return getattr(self.module, self.class_name)

    def describe(self) -> str:
        p = self.plan
        lines = [
            f"{self.model_path} ({'cache hit' if self.cache_hit else 'written'})",
            f"  class {self.class_name}: {len(p.layers)} layers, hidden {p.hidden_size}, vocab {p.vocab_size}, "
            f"{p.mtp.num_blocks if p.mtp else 0} MTP blocks",
            f"  fused units: {', '.join(p.fused_units) or 'none'}",
            f"  key {self.key[:16]}  ({len(self.source.splitlines())} lines)",
        ]
        kd = self.kernel_dir
        if kd is not None:
            n = len([p for p in kd.glob("*.py")])
            lines.append(f"  kernels: {n} Triton modules in {kd}")
        return "\n".join(lines)


def _render_kernels(plan: Plan, directory: Path) -> list[Path]:
    kernels = _kernels_module()
    if kernels is None:
        return []
    return list(kernels.render_kernels(plan.kernels, directory / "kernels", spec_name=plan.name))


# Every module lmspec writes says so in its first lines (the model's docstring, a kernel's header comment);
# kernels.json opens with its spec name and module list.
_WRITTEN_BY_LMSPEC = (b"generated by lmspec", b'"modules"')


def _refuse_foreign(paths: list[Path]) -> None:
    """An output folder's files are replaced only if lmspec wrote them: `compile -o .` in a project with
    its own model.py is refused (before anything is written), never a silent overwrite. A link is fine:
    the write replaces the link, not what it points to."""
    for path in paths:
        if path.is_symlink() or not path.is_file():
            continue  # absent, a link, or a folder (the write then fails on its own, in one line)
        with path.open("rb") as f:
            head = f.read(1024).lower()
        if not any(mark in head for mark in _WRITTEN_BY_LMSPEC):
            raise UsageError(
                f"{path}: not written by lmspec; refusing to replace it (compile into another folder, or move it)"
            )


def compile_plan(
    plan: Plan, out_dir: str | Path | None = None, spec_path: str | None = None
) -> CompiledModel:
    """Render and write the model module and kernels of a plan (into ``out_dir``, else the cache)."""
    locations = spec_locations(spec_path)
    key = cache_key(plan, spec_path, locations)
    if out_dir is not None:
        directory = Path(out_dir)
        kernel_files = [directory / "kernels" / f"{v.name}.py" for v in plan.kernels]
        _refuse_foreign([directory / "model.py", *kernel_files, directory / "kernels" / "kernels.json"])
        write_atomic(directory / "model.py", render_model(plan, spec_path, locations))
        files = _render_kernels(plan, directory)
        return CompiledModel(plan, key, directory, cache_hit=False, kernel_files=files)
    directory = cache_root() / key[:2] / key
    model_path = directory / "model.py"
    kernels_done = _kernels_module() is None or (directory / "kernels" / "kernels.json").exists()
    if model_path.exists() and kernels_done:
        return CompiledModel(plan, key, directory, cache_hit=True)
    files = _render_kernels(plan, directory)
    # model.py is written last: its presence marks a complete entry.
    write_atomic(model_path, render_model(plan, spec_path, locations))
    return CompiledModel(plan, key, directory, cache_hit=False, kernel_files=files)


def compile_graph(
    graph: Graph, out_dir: str | Path | None = None, spec_path: str | None = None
) -> CompiledModel:
    """Render and write the module for an already lowered (and passed) graph: its plan, compiled."""
    return compile_plan(planned(graph), out_dir, spec_path)


def compile_spec(
    spec: Spec,
    out_dir: str | Path | None = None,
    spec_path: str | Path | None = None,
    *,
    disable: tuple[str, ...] = (),
) -> CompiledModel:
    """Lower ``spec``, run the compiler passes (minus ``disable``) and render its model module.

    With ``out_dir`` the files go there; otherwise into the cache (see module docstring).
    """
    graph = run_passes(lower(spec), disable=disable)
    return log_generated(compile_graph(graph, out_dir, None if spec_path is None else str(spec_path)))
