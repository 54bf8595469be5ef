"""The Triton backend: the op surface of ``lmspec.runtime.ops.base.Backend``, served by kernels rendered for one spec.

``TritonBackend(kernel_dir)`` imports the modules that ``lmspec.codegen.kernels.render_kernels`` wrote into
``kernel_dir`` and indexes them by the ``key`` each one has in ``kernels.json``: ``(family, *constants)``
with the constants in the order of the variant's fields (``lmspec.compiler.variants``). Each call states
what it knows under the spec's names (head dims from the shapes, the window and value scale from the
keywords, ...); the key is those facts in the order of the family's fields, one dict lookup. A constant
added to a variant is found here without an edit as long as the call knows it. A call no rendered variant serves raises ``LookupError``:
kernels are specialised per spec, so a mismatch is a wiring bug, not a reason to fall back silently.

Attention with explicit positions (decode, prefill into a cache) runs the forward-only decode kernel; when a
gradient is needed through it, the reference runs instead (training uses dense positions).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

import lmspec.runtime.ops.triton_support  # noqa: F401  (selects the interpreter before triton loads)
from lmspec.runtime.ops import reference
from lmspec.runtime.ops.base import AttentionKeywords, Backend, RouteKeywords, keyword_defaults

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack for **kwargs needs Python 3.11

MANIFEST = "kernels.json"

Key = tuple[Any, ...]


def _load_module(path: Path, unique: str) -> ModuleType:
    name = f"lmspec_kernels_{unique}_{path.stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import rendered kernel module {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # triton's jit looks its functions up by module
    spec.loader.exec_module(module)
    return module


class TritonBackend(Backend):
    """Rendered Triton kernels for one spec: every op of ``Backend`` has a kernel family here.

    ``modules`` maps each rendered variant's key to its imported module; ``kernel(key)`` looks one up.
    """

    name = "triton"

    def __init__(self, kernel_dir: str | Path) -> None:
        self.kernel_dir = Path(kernel_dir)
        manifest_path = self.kernel_dir / MANIFEST
        if not manifest_path.exists():
            raise FileNotFoundError(f"{manifest_path} not found: render the kernels first (render_kernels)")
        manifest = json.loads(manifest_path.read_text())
        unique = hashlib.sha256(
            manifest_path.read_bytes() + str(self.kernel_dir.resolve()).encode()
        ).hexdigest()[:10]
        self.spec_name: str = manifest.get("spec", "")
        self.modules: dict[Key, ModuleType] = {}
        self._names: dict[str, list[str]] = {}  # family -> rendered names, for error messages
        self._fields: dict[str, tuple[str, ...]] = {}  # family -> its variants' field names, key order
        # Every MoE variant of a (num_experts, top_k) has the same experts kernel; the call knows only those.
        self._experts: dict[tuple[int, int], ModuleType] = {}
        for m in manifest["modules"]:
            module = _load_module(self.kernel_dir / m["file"], unique)
            self.modules[tuple(m["key"])] = module
            self._names.setdefault(m["family"], []).append(m["name"])
            self._fields[m["family"]] = tuple(m["constants"])
            if m["family"] == "moe":
                c = m["constants"]
                self._experts.setdefault((c["num_experts"], c["top_k"]), module)

    def kernel(self, key: Key) -> ModuleType:
        """The module rendered for ``key`` (a variant's ``key``); LookupError naming what was rendered."""
        module = self.modules.get(key)
        if module is None:
            family = key[0] if key else "?"
            raise LookupError(
                f"no rendered {family} kernel for key {key} in {self.kernel_dir}; "
                f"rendered: {self._names.get(family, [])}"
            )
        return module

    def _serving(self, family: str, **facts: Any) -> ModuleType:
        """The module of ``family`` whose constants equal these facts about the call (the spec's names)."""
        fields = self._fields.get(family, ())
        unknown = [f for f in fields if f not in facts]
        if unknown:
            raise LookupError(f"{family} kernels are keyed by {unknown}, which a {family} call does not know")
        return self.kernel((family, *(facts[f] for f in fields)))

    def rmsnorm(self, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        return self._serving("rmsnorm", eps=float(eps), hidden_size=x.shape[-1]).rmsnorm(x, weight, eps)

    def add_rmsnorm(
        self, x: Tensor, residual: Tensor | None, weight: Tensor, eps: float
    ) -> tuple[Tensor, Tensor]:
        module = self._serving("rmsnorm", eps=float(eps), hidden_size=x.shape[-1])
        return module.add_rmsnorm(x, residual, weight, eps)

    def swiglu(self, gate: Tensor, up: Tensor) -> Tensor:
        return self._serving("swiglu").swiglu(gate, up)

    def rope(self, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        facts = {"num_heads": q.shape[1], "num_kv_heads": k.shape[1]}
        module = self._serving("rope", rope_dim=cos.shape[-1], qk_head_dim=q.shape[-1], **facts)
        return module.rope(q, k, cos, sin)

    def attention(
        self, q: Tensor, k: Tensor, v: Tensor, sinks: Tensor | None, **kw: Unpack[AttentionKeywords]
    ) -> Tensor:
        given = {**keyword_defaults(reference.attention), **kw}
        if given["segment_ids"] is not None:
            # No kernel masks packed documents yet: the reference computes it (correct, not fast).
            return reference.attention(q, k, v, sinks, **kw)
        kw = {name: value for name, value in kw.items() if name != "segment_ids"}  # type: ignore[assignment]
        window_keys, q_pos, k_pos = given["window_keys"], given["q_pos"], given["k_pos"]
        facts = {
            "window_keys": window_keys,
            "sink": sinks is not None,
            "qk_head_dim": q.shape[-1],
            "v_head_dim": v.shape[-1],
            "value_scale": float(given["value_scale"]),
            "scale": float(given["scale"]),
            "num_heads": q.shape[1],
            "num_kv_heads": k.shape[1],
        }
        if q_pos is None and k_pos is None and q.shape[2] == k.shape[2]:
            # The training kernel takes no positions: they are implied.
            module = self._serving("attention", **facts)
            return module.attention(
                q, k, v, sinks, scale=kw["scale"], value_scale=facts["value_scale"], window_keys=window_keys
            )
        needs_grad = any(t is not None and t.requires_grad for t in (q, k, v, sinks))
        if needs_grad and torch.is_grad_enabled():
            return reference.attention(q, k, v, sinks, **kw)
        return self._serving("decode_attention", **facts).attention(q, k, v, sinks, **kw)

    def route(
        self, x: Tensor, weight: Tensor, correction_bias: Tensor | None, **kw: Unpack[RouteKeywords]
    ) -> tuple[Tensor, Tensor, Tensor]:
        facts = {**keyword_defaults(reference.route), **kw}
        facts["routed_scaling_factor"] = float(facts["routed_scaling_factor"])
        module = self._serving("moe", num_experts=weight.shape[0], hidden_size=x.shape[-1], **facts)
        return module.route(x, weight, correction_bias, **kw)

    def moe_experts(
        self, x: Tensor, topk_weights: Tensor, topk_indices: Tensor, gate_up_proj: Tensor, down_proj: Tensor
    ) -> Tensor:
        experts = (gate_up_proj.shape[0], topk_indices.shape[1])
        module = self._experts.get(experts)
        if module is None:
            raise LookupError(
                f"no rendered moe kernel for num_experts={experts[0]}, top_k={experts[1]} in {self.kernel_dir}; "
                f"rendered: {self._names.get('moe', [])}"
            )
        return module.moe_experts(x, topk_weights, topk_indices, gate_up_proj, down_proj)

    def lm_head_ce(
        self,
        hidden: Tensor,
        weight: Tensor,
        labels: Tensor,
        *,
        ignore_index: int = -100,
        chunk_size: int = 4096,
    ) -> Tensor:
        module = self._serving("lm_head_ce", vocab_size=weight.shape[0], hidden_size=hidden.shape[-1])
        return module.lm_head_ce(hidden, weight, labels, ignore_index=ignore_index, chunk_size=chunk_size)
