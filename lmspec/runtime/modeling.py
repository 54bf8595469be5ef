"""Build generated models, and load/save them in the transformers MiMo-V2-Flash layout.

``build(spec)`` compiles the spec (cached) and instantiates the generated ``...ForCausalLM`` with fresh
weights; ``from_pretrained(dir)`` reads ``spec.yaml`` (or a transformers ``config.json``) plus
``model.safetensors`` (single file or sharded with ``model.safetensors.index.json``);
``save_pretrained(model, dir)`` writes ``spec.yaml``, ``config.json`` and ``model.safetensors``.

Two weight layouts, both read on load:

- ``native``: the generated model's own names, which are also the modules transformers 5.23 holds in memory
  (fused ``mlp.experts.gate_up_proj`` (E, 2I, H) / ``down_proj`` (E, H, I), ``self_attn.sinks``). Training
  checkpoints use it: one tensor per expert matrix stack, no split or copy.
- ``hub``: the names of the released checkpoint, which transformers' own ``save_pretrained`` writes and
  SGLang's and vLLM's loaders read: per-expert ``mlp.experts.{e}.{gate,up,down}_proj.weight``,
  ``self_attn.attention_sink_bias``, and ``pre_mlp_layernorm`` for an MTP block's second norm. ``lmspec
  export`` writes it; transformers converts it to its fused modules on load.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_save
from torch import Tensor, nn

from lmspec.codegen import compile_spec
from lmspec.errors import CheckpointError
from lmspec.files import write_atomic
from lmspec.runtime.model_base import CausalLMBase
from lmspec.spec import Spec, SpecError, dump_spec, load_spec, spec_to_data
from lmspec.spec.loader import apply_override, validate

__all__ = [
    "CheckpointError",
    "LAYOUTS",
    "build",
    "from_pretrained",
    "hub_state_dict",
    "load_hf_state_dict",
    "save_config",
    "save_pretrained",
]


SPEC_FILE = "spec.yaml"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
ROPE_METADATA = "lmspec_rope_theta"  # safetensors metadata: {attention kind: theta} at save time


def _resolve_spec(spec_or_path: Spec | str | Path, overrides: Sequence[str]) -> Spec:
    if isinstance(spec_or_path, Spec):
        if not overrides:
            return spec_or_path
        data = spec_to_data(spec_or_path)
        for assignment in overrides:
            data = apply_override(data, assignment)
        return validate(data, {}, "<overrides>")
    return load_spec(spec_or_path, list(overrides))


def build(
    spec_or_path: Spec | str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    backend: str = "torch",
    op_overrides: dict[str, str] | None = None,
    overrides: Sequence[str] = (),
    disable_passes: tuple[str, ...] = (),
) -> CausalLMBase:
    """The generated model for a spec with fresh weights (normal(0, init_std); deterministic under a seed).

    ``device="meta"`` allocates nothing (shapes only). ``disable_passes`` switches compiler passes off by
    name, e.g. ``("fusion",)`` for the unfused reference model.
    """
    spec = _resolve_spec(spec_or_path, overrides)
    spec_path = None if isinstance(spec_or_path, Spec) else str(spec_or_path)  # named in the code's header
    compiled = compile_spec(spec, spec_path=spec_path, disable=disable_passes)
    kernel_dir = compiled.kernel_dir
    dev = torch.device(device) if device is not None else torch.device("cpu")
    with dev:
        model = compiled.model_class(
            backend=backend,
            op_overrides=op_overrides,
            kernel_dir=None if kernel_dir is None else str(kernel_dir),
        )
    model.spec = spec
    if dev.type != "meta":
        model.init_weights()
    if dtype is not None:
        model.to(dtype)
        model.keep_fp32_buffers()
    return model


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

_EXPERT_RE = re.compile(
    r"^(?P<prefix>.*\.mlp\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$"
)
# An MTP block's pre-FFN norm: the released checkpoint (and vLLM, which reads nothing else) names it
# pre_mlp_layernorm, where the decoder layers and our MTP module say post_attention_layernorm.
_MTP_NORM_RE = re.compile(r"^(model\.mtp\.layers\.\d+)\.pre_mlp_layernorm\.")


def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        return [directory / name for name in sorted(set(weight_map.values()))]
    single = directory / WEIGHTS_FILE
    if single.exists():
        return [single]
    shards = sorted(directory.glob("*.safetensors"))
    if shards:
        return shards
    raise CheckpointError(f"{directory}: no {WEIGHTS_FILE} or {INDEX_FILE}")


def load_hf_state_dict(directory: str | Path) -> dict[str, Tensor]:
    """All tensors of a checkpoint folder, renamed to the generated model's names (see module docstring)."""
    directory = Path(directory)
    raw: dict[str, Tensor] = {}
    for path in _safetensors_files(directory):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    raw[name] = f.get_tensor(name)
        except (SafetensorError, OSError) as e:  # truncated, empty or not safetensors at all
            raise CheckpointError(f"{path}: not a readable safetensors file ({str(e)[:120]})") from None
    out: dict[str, Tensor] = {}
    experts: dict[str, dict[str, dict[int, Tensor]]] = {}
    for name, t in raw.items():
        m = _EXPERT_RE.match(name)
        if m:
            experts.setdefault(m["prefix"], {}).setdefault(m["proj"], {})[int(m["e"])] = t
            continue
        if name.endswith(".self_attn.attention_sink_bias"):
            name = name[: -len("attention_sink_bias")] + "sinks"
        name = _MTP_NORM_RE.sub(r"\1.post_attention_layernorm.", name)
        out[name] = t
    for prefix, projs in experts.items():
        n = len(projs.get("gate_proj", {}))
        if not n or any(
            sorted(projs.get(p, {})) != list(range(n)) for p in ("gate_proj", "up_proj", "down_proj")
        ):
            raise CheckpointError(f"{directory}: incomplete per-expert tensors under {prefix}")
        gate_up = [torch.cat([projs["gate_proj"][e], projs["up_proj"][e]], dim=0) for e in range(n)]
        out[f"{prefix}.gate_up_proj"] = torch.stack(gate_up)  # (E, 2I, H): gate rows first
        out[f"{prefix}.down_proj"] = torch.stack([projs["down_proj"][e] for e in range(n)])  # (E, H, I)
    return out


def saved_rope_thetas(directory: Path) -> dict[str, float]:
    """The RoPE thetas recorded by ``save_pretrained`` (empty for checkpoints written elsewhere)."""
    with safe_open(str(_safetensors_files(directory)[0]), framework="pt") as f:
        meta = f.metadata() or {}
    return {k: float(v) for k, v in json.loads(meta.get(ROPE_METADATA, "{}")).items()}


def _spec_from_dir(directory: Path) -> Spec:
    spec_file = directory / SPEC_FILE
    if spec_file.exists():
        return load_spec(spec_file)
    config_file = directory / CONFIG_FILE
    if config_file.exists():
        from lmspec.codegen.hf import config_to_spec, read_config

        return config_to_spec(read_config(config_file), name=directory.name or "imported")
    raise SpecError(
        str(directory), 1, 1, "", f"expected {SPEC_FILE} or {CONFIG_FILE} in the folder, found neither"
    )


def from_pretrained(
    directory: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    backend: str = "torch",
) -> CausalLMBase:
    """Load a model saved by ``save_pretrained`` or by transformers' ``MiMoV2FlashForCausalLM``.

    ``dtype=None`` keeps the dtype the weights were saved in. MTP weights missing from the folder (transformers drops ``model.mtp.*``) are freshly initialised with a
    warning; any other missing or unexpected tensor is an error.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise SpecError(str(directory), 1, 1, "", "expected a checkpoint folder, got no such directory")
    from lmspec.runtime import sharded

    has_weights = (directory / WEIGHTS_FILE).exists() or (directory / INDEX_FILE).exists()
    has_weights = has_weights or sharded.is_sharded(directory)
    if not has_weights and (directory / "checkpoints").is_dir():
        from lmspec.runtime.checkpoint import resolve_checkpoint

        directory = resolve_checkpoint(directory)  # a run directory: its newest complete checkpoint
    from lmspec.runtime.checkpoint import MANIFEST_FILE, verify_checkpoint

    if (directory / MANIFEST_FILE).exists():  # a training checkpoint: every file as it was written
        verify_checkpoint(directory)
    spec = _spec_from_dir(directory)
    # A sharded (DCP) checkpoint of a multi-process run holds our own names; whole tensors come back here.
    is_dcp = sharded.is_sharded(directory)
    state = sharded.load_model_state(directory) if is_dcp else load_hf_state_dict(directory)
    model = build(spec, device="meta", backend=backend)
    expected = model.state_dict()
    tied = model.TIE_WORD_EMBEDDINGS
    if tied:
        state.pop("lm_head.weight", None)
    missing = [k for k in expected if k not in state and not (tied and k == "lm_head.weight")]
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise CheckpointError(f"{directory}: tensors the spec has no place for: {unexpected[:8]}")
    bad_missing = [k for k in missing if not k.startswith("model.mtp.")]
    if bad_missing:
        raise CheckpointError(f"{directory}: tensors missing from the checkpoint: {bad_missing[:8]}")
    for name, t in state.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{directory}: {name}: expected shape {tuple(expected[name].shape)}, got {tuple(t.shape)}"
            )
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dtype is None:  # as transformers does by default: keep the dtype the weights were saved in
        saved = [
            t.dtype for k, t in state.items() if t.is_floating_point() and "e_score_correction_bias" not in k
        ]
        dtype = saved[0] if saved else None
    model.to_empty(device=dev)
    if dtype is not None:
        model.to(dtype)
    model.keep_fp32_buffers()  # before loading, so the saved fp32 balancing bias is not rounded
    if missing:
        warnings.warn(
            f"{directory}: no MTP weights in the checkpoint; MTP blocks are freshly initialised", stacklevel=2
        )
        model.init_weights()
    model.load_state_dict({k: v.to(dev) for k, v in state.items()}, strict=False)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    thetas = sharded.rope_thetas(directory) if is_dcp else saved_rope_thetas(directory)
    model.set_rope_theta({k: t for k, t in thetas.items() if k in model.rope_thetas()})
    return model


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------


def _spec_with_current_rope(model: CausalLMBase) -> Spec:
    """The model's spec with each attention kind's RoPE theta as the model has it now.

    A stage override (``set_rope_theta``) changes the function the weights compute, so a checkpoint saved
    mid-schedule records the theta it was trained with (config.json for transformers, and the
    ``lmspec_rope_theta`` safetensors metadata that ``from_pretrained`` re-applies).
    """
    spec: Spec = model.spec
    current = model.rope_thetas()
    if all(float(spec.model.attention[k].rope.theta) == t for k, t in current.items()):
        return spec
    data = spec_to_data(spec)
    for kind, theta in current.items():
        data["model"]["attention"][kind]["rope"]["theta"] = theta
    return validate(data, {}, "<save_pretrained>")


Layout = Literal["native", "hub"]
LAYOUTS: tuple[Layout, ...] = ("native", "hub")

_FUSED_EXPERTS_RE = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<proj>gate_up_proj|down_proj)$")
_MTP_POST_NORM_RE = re.compile(r"^(model\.mtp\.layers\.\d+)\.post_attention_layernorm\.")


def hub_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A native state dict under the released checkpoint's names (the ``hub`` layout of the module docstring).

    Each expert's matrices become their own tensors, as the engines' expert-parallel loaders pick experts by
    the index in the name; the split is a view until ``save_pretrained`` makes it contiguous.
    """
    out: dict[str, Tensor] = {}
    for name, t in state.items():
        m = _FUSED_EXPERTS_RE.match(name)
        if m and m["proj"] == "gate_up_proj":  # (E, 2I, H): gate rows first, as the loader stacks them
            half = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{m['prefix']}.{e}.gate_proj.weight"] = t[e, :half]
                out[f"{m['prefix']}.{e}.up_proj.weight"] = t[e, half:]
            continue
        if m:  # down_proj (E, H, I)
            for e in range(t.shape[0]):
                out[f"{m['prefix']}.{e}.down_proj.weight"] = t[e]
            continue
        if name.endswith(".self_attn.sinks"):
            name = name[: -len("sinks")] + "attention_sink_bias"
        out[_MTP_POST_NORM_RE.sub(r"\1.pre_mlp_layernorm.", name)] = t
    return out


def save_pretrained(model: nn.Module, directory: str | Path, *, layout: Layout = "native") -> Path:
    """Write ``spec.yaml``, ``config.json`` (transformers ``mimo_v2_flash``) and ``model.safetensors``.

    ``layout`` names the weights (module docstring): ``native`` for training checkpoints, ``hub`` for a folder
    that transformers, SGLang and vLLM all load.
    """

    if not isinstance(model, CausalLMBase) or model.spec is None:
        raise ValueError("save_pretrained needs a model built by lmspec (with model.spec set)")
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {', '.join(LAYOUTS)}, got {layout!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = model.hf_state_dict()
    if layout == "hub":
        state = hub_state_dict(state)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    dtype = next(iter(state.values())).dtype if state else torch.float32
    metadata = {"format": "pt", ROPE_METADATA: json.dumps(model.rope_thetas(), sort_keys=True)}
    write_atomic(directory / WEIGHTS_FILE, safetensors_save(state, metadata=metadata))
    save_config(model, directory, dtype)
    return directory


def save_config(model: CausalLMBase, directory: str | Path, dtype: torch.dtype) -> None:
    """Write ``config.json`` (transformers) and ``spec.yaml``: ``save_pretrained`` without the weights, which
    a sharded checkpoint keeps in its own files."""
    from lmspec.codegen.hf import spec_to_config

    directory = Path(directory)
    # transformers reads RoPE from config.json, so it gets the current thetas; spec.yaml stays the spec.
    config = spec_to_config(_spec_with_current_rope(model), dtype=str(dtype).removeprefix("torch."))
    write_atomic(directory / CONFIG_FILE, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    write_atomic(directory / SPEC_FILE, dump_spec(model.spec).encode())
