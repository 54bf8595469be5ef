"""Codegen stage: render a lowered spec into a readable PyTorch model module (and its Triton kernels).

``compile_spec(spec)`` lowers the spec, runs the compiler passes, renders ``model.py`` from
``templates/model.py.jinja`` and writes it (atomically) under ``$LMSPEC_CACHE`` or ``~/.cache/lmspec``, at
``<key[:2]>/<key>/model.py``. The key covers the canonical spec, the passes' choices, the template sources
and the lmspec/torch versions, so a second compile is a cache hit that returns byte-identical code. When the
kernel renderer is present its Triton sources go next to it, in ``kernels/``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch

import lmspec
from lmspec.codegen.render import class_name, render_model, spec_locations, template_sources
from lmspec.compiler import Graph, lower, run_passes
from lmspec.compiler.debug import log_generated
from lmspec.compiler.variants import kernel_variants
from lmspec.spec import Spec, spec_to_data

__all__ = ["CompiledModel", "cache_root", "compile_graph", "compile_spec"]


def cache_root() -> Path:
    return Path(os.environ.get("LMSPEC_CACHE") or Path.home() / ".cache" / "lmspec")


def _write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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


def cache_key(graph: Graph, spec_path: str | None, locations: dict[str, str] | None = None) -> str:
    """What the generated files depend on: spec, passes' choices, where the header points, templates, versions."""
    h = hashlib.sha256()
    payload = {
        "spec": spec_to_data(graph.spec),
        "fused_units": sorted(graph.fused_units),
        "spec_path": spec_path,
        "locations": locations or {},
        "lmspec": lmspec.__version__,
        "torch": torch.__version__,
    }
    h.update(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode())
    h.update(template_sources())
    h.update(_kernel_template_bytes())
    return h.hexdigest()


@dataclass
class CompiledModel:
    """A rendered model module on disk, importable; ``model_class`` is the generated ``...ForCausalLM``."""

    spec: Spec
    graph: Graph
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
        return class_name(self.spec.name) + "ForCausalLM"

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
        m = self.spec.model
        lines = [
            f"{self.model_path} ({'cache hit' if self.cache_hit else 'written'})",
            f"  class {self.class_name}: {m.num_layers} layers, hidden {m.hidden_size}, vocab {m.vocab_size}, "
            f"{len(self.graph.mtp_layers)} MTP blocks",
            f"  fused units: {', '.join(sorted(self.graph.fused_units)) or 'none'}",
            f"  key {self.key[:16]}  ({len(self.source.splitlines())} lines)",
        ]
        kd = self.kernel_dir
        if kd is not None:
            n = len([p for p in kd.glob("*.py")])
            lines.append(f"  kernels: {n} Triton modules in {kd}")
        return "\n".join(lines)


def _render_kernels(graph: Graph, directory: Path) -> list[Path]:
    kernels = _kernels_module()
    if kernels is None:
        return []
    variants = kernel_variants(graph)
    return list(kernels.render_kernels(variants, directory / "kernels", spec_name=graph.spec.name))


def compile_graph(
    graph: Graph, out_dir: str | Path | None = None, spec_path: str | None = None
) -> CompiledModel:
    """Render and write the module for an already lowered (and passed) graph."""
    locations = spec_locations(spec_path)
    key = cache_key(graph, spec_path, locations)
    if out_dir is not None:
        directory = Path(out_dir)
        _write_text_atomic(directory / "model.py", render_model(graph, spec_path, locations))
        files = _render_kernels(graph, directory)
        return CompiledModel(graph.spec, graph, key, directory, cache_hit=False, kernel_files=files)
    directory = cache_root() / key[:2] / key
    model_path = directory / "model.py"
    kernels_done = _kernels_module() is None or (directory / "kernels" / "kernels.json").exists()
    if model_path.exists() and kernels_done:
        return CompiledModel(graph.spec, graph, key, directory, cache_hit=True)
    files = _render_kernels(graph, directory)
    # model.py is written last: its presence marks a complete entry.
    _write_text_atomic(model_path, render_model(graph, spec_path, locations))
    return CompiledModel(graph.spec, graph, key, directory, cache_hit=False, kernel_files=files)


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
