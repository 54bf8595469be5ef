"""The Triton backend: the op surface of ``TorchBackend``, served by kernels rendered for one spec.

``TritonBackend(kernel_dir)`` imports the modules that ``lmspec.codegen.kernels.render_kernels`` wrote into
``kernel_dir`` (listed in its ``kernels.json``) and dispatches each call to the variant whose baked constants
match the call (window_keys, sink, head dims, value scale; rope_dim; vocab size). A call no rendered variant
serves raises ``LookupError``: kernels are specialised per spec, so a mismatch is a wiring bug, not a
reason to fall back silently.

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
from typing import Any

from torch import Tensor

import lmspec.runtime.ops.triton_support  # noqa: F401  (selects the interpreter before triton loads)
from lmspec.runtime.ops import torch_backend

MANIFEST = "kernels.json"


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


class TritonBackend:
    """Rendered Triton kernels for one spec; same surface as ``TorchBackend``."""

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
        self.modules: list[tuple[str, dict[str, Any], ModuleType]] = [
            (m["family"], m["constants"], _load_module(self.kernel_dir / m["file"], unique))
            for m in manifest["modules"]
        ]

    def _find(self, family: str, **want: Any) -> ModuleType:
        for fam, consts, module in self.modules:
            if fam == family and all(consts.get(k) == v for k, v in want.items()):
                return module
        have = [consts for fam, consts, _ in self.modules if fam == family]
        raise LookupError(f"no rendered {family} kernel for {want} in {self.kernel_dir}; rendered: {have}")

    def rmsnorm(self, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        return self._find("rmsnorm").rmsnorm(x, weight, eps)

    def add_rmsnorm(
        self, x: Tensor, residual: Tensor | None, weight: Tensor, eps: float
    ) -> tuple[Tensor, Tensor]:
        return self._find("rmsnorm").add_rmsnorm(x, residual, weight, eps)

    def swiglu(self, gate: Tensor, up: Tensor) -> Tensor:
        return self._find("swiglu").swiglu(gate, up)

    def rope(self, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        return self._find("rope", rope_dim=cos.shape[-1], qk_head_dim=q.shape[-1]).rope(q, k, cos, sin)

    def attention(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        sinks: Tensor | None,
        *,
        scale: float,
        value_scale: float = 1.0,
        window_keys: int | None = None,
        q_pos: Tensor | None = None,
        k_pos: Tensor | None = None,
    ) -> Tensor:
        variant = {
            "window_keys": window_keys,
            "sink": sinks is not None,
            "qk_head_dim": q.shape[-1],
            "v_head_dim": v.shape[-1],
            "value_scale": float(value_scale),
        }
        if q_pos is None and k_pos is None and q.shape[2] == k.shape[2]:
            module = self._find("attention", **variant)
            return module.attention(
                q, k, v, sinks, scale=scale, value_scale=value_scale, window_keys=window_keys
            )
        needs_grad = any(t is not None and t.requires_grad for t in (q, k, v, sinks))
        if needs_grad and torch_backend.torch.is_grad_enabled():
            return torch_backend.attention(
                q,
                k,
                v,
                sinks,
                scale=scale,
                value_scale=value_scale,
                window_keys=window_keys,
                q_pos=q_pos,
                k_pos=k_pos,
            )
        module = self._find("decode_attention", **variant)
        return module.attention(
            q,
            k,
            v,
            sinks,
            scale=scale,
            value_scale=value_scale,
            window_keys=window_keys,
            q_pos=q_pos,
            k_pos=k_pos,
        )

    def route(
        self,
        x: Tensor,
        weight: Tensor,
        correction_bias: Tensor | None,
        *,
        top_k: int,
        score_function: str = "sigmoid",
        renormalize: bool = True,
        routed_scaling_factor: float = 1.0,
        num_groups: int = 1,
        top_k_groups: int = 1,
    ) -> tuple[Tensor, Tensor, Tensor]:
        module = self._find("moe", num_experts=weight.shape[0], top_k=top_k, score_function=score_function)
        return module.route(
            x,
            weight,
            correction_bias,
            top_k=top_k,
            score_function=score_function,
            renormalize=renormalize,
            routed_scaling_factor=routed_scaling_factor,
            num_groups=num_groups,
            top_k_groups=top_k_groups,
        )

    def moe_experts(
        self, x: Tensor, topk_weights: Tensor, topk_indices: Tensor, gate_up_proj: Tensor, down_proj: Tensor
    ) -> Tensor:
        module = self._find("moe", num_experts=gate_up_proj.shape[0], top_k=topk_indices.shape[1])
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
        module = self._find("lm_head_ce", vocab_size=weight.shape[0])
        return module.lm_head_ce(hidden, weight, labels, ignore_index=ignore_index, chunk_size=chunk_size)
