"""Runtime support imported by every generated model module.

The generated ``model.py`` holds the architecture (one class per attention kind, FFN kind and block kind, with
the spec's constants baked in); this module holds what does not depend on the spec: the output dataclass,
RoPE tables, the router-statistics collector, weight init, backend switching and the ``save_pretrained`` /
state-dict helpers shared with ``lmspec.runtime.modeling``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import Tensor, nn
from torch.utils import checkpoint as torch_checkpoint

from lmspec.runtime.ops import Backend, get_backend

# What a generated submodule calls before its model shares its own backend with it (the CPU backend).
DEFAULT_OPS: Backend = get_backend("cpu")

__all__ = [
    "ACTIVATION_CHECKPOINTING",
    "DEFAULT_OPS",
    "CausalLMBase",
    "CompiledStep",
    "KVCache",
    "ModelOutput",
    "MoEStats",
    "RMSNorm",
    "RotaryEmbedding",
    "expert_counts",
    "seq_aux_loss",
]


class KVCache(Protocol):
    """What the generated attention needs from a KV cache (``lmspec.runtime.kv_cache.HybridKVCache``).

    ``update`` stores this step's keys (after RoPE) and raw values for ``layer_key`` (the module path,
    ``model.layers.3`` / ``model.mtp.layers.0``) and returns everything the step may attend to:
    k_all (B, Hkv, Tk, Dqk), v_all (B, Hkv, Tk, Dv), k_pos (B, Tk) int64 with -1 for empty slots.
    """

    def update(
        self, layer_key: str, k: Tensor, v: Tensor, position_ids: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]: ...


@dataclass
class ModelOutput:
    """What ``model(input_ids, ...)`` returns; see the forward contract in the package docs.

    logits (B, T, V) is None on the training path (labels given): the loss is computed chunk by chunk.
    hidden (B, T, H) is the last decoder layer's output before the final norm (MTP block 1's input).
    """

    logits: Tensor | None = None
    hidden: Tensor | None = None
    loss: Tensor | None = None
    mtp_losses: list[Tensor] = field(default_factory=list)
    mtp_logits: list[Tensor] = field(default_factory=list)
    aux_loss: Tensor | None = None
    expert_load: Tensor | None = None
    # With return_routes: (B, T, L, K) int64 expert ids per token and MoE layer, as used and as the router
    # itself chose them (they differ only where `routes` replayed others); K = the widest top_k, -1 pads.
    routes: Tensor | None = None
    router_routes: Tensor | None = None


class RMSNorm(nn.Module):
    """Holds an RMSNorm weight; the computation is the backend's ``rmsnorm`` / ``add_rmsnorm``."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


def rope_inv_freq(
    theta: float, rope_dim: int, device: torch.device | None = None, freq_dim: int | None = None
) -> Tensor:
    """Inverse frequencies (rope_dim / 2,) in float32, computed exactly as transformers does.

    ``theta ** (-2i / freq_dim)`` for i < rope_dim / 2; ``freq_dim`` defaults to ``rope_dim``. transformers
    takes an odd d = int(head_dim * partial_rotary_factor) as the exponent's denominator and rotates d + 1
    dims: ``arange(0, d, 2) / d`` is ``arange(0, d + 1, 2) / d``, i.e. rope_dim = d + 1, freq_dim = d.
    """
    steps = torch.arange(0, rope_dim, 2, dtype=torch.float, device=device)
    return 1.0 / (theta ** (steps / (rope_dim if freq_dim is None else freq_dim)))


class RotaryEmbedding(nn.Module):
    """cos/sin tables for one attention kind: (B, T, rope_dim), computed in float32 then cast (transformers).

    The frequencies are recomputed from ``theta`` on every call (rope_dim / 2 values) rather than kept in a
    buffer, so a dtype cast of the model can never round them and ``set_theta`` needs no bookkeeping.
    """

    def __init__(self, theta: float, rope_dim: int, freq_dim: int | None = None) -> None:
        super().__init__()
        self.theta = float(theta)
        self.rope_dim = rope_dim
        self.freq_dim = rope_dim if freq_dim is None else freq_dim  # see rope_inv_freq

    def set_theta(self, theta: float) -> None:
        self.theta = float(theta)

    def forward(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        inv_freq = rope_inv_freq(self.theta, self.rope_dim, position_ids.device, self.freq_dim)
        freqs = position_ids[..., None].float() * inv_freq  # (B, T, rope_dim / 2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, rope_dim)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def extra_repr(self) -> str:
        odd = f", freq_dim={self.freq_dim}" if self.freq_dim != self.rope_dim else ""
        return f"theta={self.theta:g}, rope_dim={self.rope_dim}{odd}"


def seq_aux_loss(scores: Tensor, topk_indices: Tensor, batch: int, top_k: int) -> Tensor:
    """Sequence-wise balance loss (DeepSeek-V3), averaged over the batch; unweighted.

    scores (B*T, E) raw router scores, topk_indices (B*T, k). Per sequence:
    f_i = E / (k * T) * #tokens choosing i, P_i = mean_t s_i,t / sum_j s_j,t, L = sum_i f_i * P_i.
    """
    n, num_experts = scores.shape
    seq = n // batch
    probs = scores / scores.sum(-1, keepdim=True).clamp_min(1e-20)  # (B*T, E)
    p = probs.view(batch, seq, num_experts).mean(1)  # (B, E)
    counts = torch.zeros(batch, num_experts, device=scores.device, dtype=scores.dtype)
    counts.scatter_add_(
        1, topk_indices.view(batch, seq * top_k), torch.ones_like(counts[:, :1]).expand(batch, seq * top_k)
    )
    f = counts * (num_experts / (top_k * seq))  # (B, E)
    return (f * p).sum(-1).mean()


def expert_counts(topk_indices: Tensor, num_experts: int) -> Tensor:
    """(num_experts,) float32 count of the assignments each expert received, without a gradient.

    A scatter-add into a (num_experts,) buffer rather than ``bincount``, whose output length depends on the
    data: torch.compile would stop its graph there to read it on the host.
    """
    flat = topk_indices.reshape(-1)
    ones = torch.ones(flat.shape, dtype=torch.float32, device=flat.device)
    return torch.zeros(num_experts, dtype=torch.float32, device=flat.device).scatter_add_(0, flat, ones)


class MoEStats:
    """Collects each MoE layer's aux loss and expert load during one forward, in layer order.

    It also carries Rollout Routing Replay (R3): with ``routes`` (B, T, L, K), the expert ids a rollout
    recorded per token and MoE layer, ``route`` makes layer l use ``routes[:, :, l]`` instead of the router's
    own choice, so a training forward runs the experts the rollout ran; with ``record``, ``routes_taken``
    returns what every layer used and what its router chose.
    """

    def __init__(self, routes: Tensor | None = None, record: bool = False) -> None:
        self.aux: list[Tensor] = []
        self.load: list[Tensor] = []
        self.replay = routes
        self.record_routes = record
        self.used: list[Tensor] = []
        self.chosen: list[Tensor] = []
        self.layer = 0  # the next MoE layer `route` sees

    def route(
        self,
        scores: Tensor,
        topk_weights: Tensor,
        topk_indices: Tensor,
        *,
        renormalize: bool,
        routed_scaling_factor: float,
    ) -> tuple[Tensor, Tensor]:
        """This layer's (weights, expert ids): the router's, or with ``routes`` the replayed ones.

        Replayed weights are the scores at the replayed experts, renormalised and scaled exactly as the
        router does, so the gradient reaches the router through them as it would through its own choice.
        """
        layer, k = self.layer, topk_indices.shape[-1]
        self.layer += 1
        indices, weights = topk_indices, topk_weights
        if self.replay is not None:
            forced = self.replay.reshape(-1, *self.replay.shape[-2:])  # (N, L, K)
            if forced.shape[0] != scores.shape[0] or layer >= forced.shape[1]:
                raise ValueError(
                    f"routes of shape {tuple(self.replay.shape)} do not cover MoE layer {layer} "
                    f"over {scores.shape[0]} tokens"
                )
            indices = forced[:, layer, :k].to(topk_indices.device, topk_indices.dtype).contiguous()
            weights = scores.gather(1, indices)
            if renormalize:
                weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
            if routed_scaling_factor != 1.0:
                weights = weights * routed_scaling_factor
        if self.record_routes:
            self.used.append(indices)
            self.chosen.append(topk_indices)
        return weights, indices

    def routes_taken(self, batch: int, seq: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """(used, router's own) expert ids, each (B, T, L, K) int64 with -1 where a layer's top_k < K."""

        def stack(per_layer: list[Tensor]) -> Tensor:
            if not per_layer:
                return torch.zeros(batch, seq, 0, 0, dtype=torch.long, device=like.device)
            width = max(t.shape[-1] for t in per_layer)
            padded = [torch.nn.functional.pad(t, (0, width - t.shape[-1]), value=-1) for t in per_layer]
            return torch.stack(padded, dim=1).view(batch, seq, len(per_layer), width)  # (B, T, L, K)

        return stack(self.used), stack(self.chosen)

    def record(self, scores: Tensor, topk_indices: Tensor, batch: int, top_k: int) -> None:
        self.aux.append(seq_aux_loss(scores, topk_indices, batch, top_k))
        self.load.append(expert_counts(topk_indices, scores.shape[-1]))

    def aux_loss(self, like: Tensor) -> Tensor:
        """Sum over MoE layers; a zero scalar (on ``like``'s device) for a model without MoE layers."""
        return torch.stack(self.aux).sum() if self.aux else like.new_zeros((), dtype=torch.float32)

    def expert_load(self, like: Tensor) -> Tensor:
        """(num_moe_layers, num_experts) token counts; (0, 0) for a model without MoE layers.

        With MoE kinds of different sizes, rows of smaller layers are zero-padded to the widest layer."""
        if not self.load:
            return like.new_zeros((0, 0), dtype=torch.float32)
        width = max(t.numel() for t in self.load)
        return torch.stack([torch.nn.functional.pad(t, (0, width - t.numel())) for t in self.load])


# --- activation checkpointing ----------------------------------------------------------------------

ACTIVATION_CHECKPOINTING = ("none", "full", "selective")


@functools.cache
def _selective_policy() -> tuple[Any, ...]:
    """The ops whose outputs ``selective`` keeps: GEMMs and attention, whose recompute costs about as much
    as the forward itself. Every other op (norms, RoPE, SwiGLU, routing) is recomputed: its output is as
    large as a GEMM's and it costs a memory pass, so these are the cheap bytes to drop."""
    aten = torch.ops.aten
    ops = [
        aten.mm.default,
        aten.addmm.default,
        aten.bmm.default,
        aten._scaled_dot_product_flash_attention_for_cpu.default,
    ]
    ops += [
        aten._scaled_dot_product_efficient_attention.default,
        aten._scaled_dot_product_flash_attention.default,
    ]
    grouped = getattr(torch.ops.lmspec, "grouped_mm", None)  # the CPU backend's expert GEMM
    return tuple(ops) + ((grouped.default,) if grouped is not None else ())


def _save_gemm_outputs(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
    policy = torch_checkpoint.CheckpointPolicy
    return policy.MUST_SAVE if op in _selective_policy() else policy.PREFER_RECOMPUTE


def _checkpointed(forward: Callable[..., Any], mode: str) -> Callable[..., Any]:
    """``forward`` recomputed in the backward (non-reentrant ``torch.utils.checkpoint``); plain without grad."""
    if mode == "selective":
        context = functools.partial(torch_checkpoint.create_selective_checkpoint_contexts, _save_gemm_outputs)
    else:
        context = torch_checkpoint.noop_context_fn

    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return torch_checkpoint.checkpoint(forward, *args, use_reentrant=False, context_fn=context, **kwargs)

    return run


# --- torch.compile ---------------------------------------------------------------------------------


def enable_compile_caches() -> None:
    """Inductor's FX graph cache and AOT autograd's cache: a second run of the same graphs (same shapes,
    code and torch) loads the compiled kernels from disk instead of compiling them again."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    functorch_config.enable_autograd_cache = True


def _compile_seconds() -> float:
    """Seconds torch.compile has spent in this process: dynamo, AOT autograd and inductor (this torch
    compiles the backward graph together with the forward, inside the first call)."""
    from torch._dynamo.utils import compilation_time_metrics

    return sum(compilation_time_metrics.get("_compile.compile_inner", ()))


class CompiledStep:
    """``fn`` under ``torch.compile(fullgraph=True)``: a graph break is an error, not a silent slow path.

    Before each call, dim 0 (the batch) of every tensor argument is marked dynamic, so batch sizes that
    change within a stage (a batch-size warmup, a short last micro-batch) reuse one graph; a new sequence
    length or new Python constants (a stage's loss weights, a RoPE theta) compile a new one. ``compile_s``
    is the compile time spent so far (forward and backward), ``graphs`` the graphs compiled.
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        enable_compile_caches()
        self.fn = torch.compile(fn, fullgraph=True)
        self._base_s = _compile_seconds()

    @property
    def compile_s(self) -> float:
        return _compile_seconds() - self._base_s

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        for value in (*args, *kwargs.values()):
            tensors = value.values() if isinstance(value, dict) else (value,)
            for t in tensors:
                if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] > 1:
                    torch._dynamo.maybe_mark_dynamic(t, 0)
        return self.fn(*args, **kwargs)


class CausalLMBase(nn.Module):
    """Spec-independent behaviour of a generated ``...ForCausalLM``: backend, RoPE, init, saving.

    Subclasses (generated) define ``self.model`` (embed_tokens, layers, norm, rotary, optional mtp),
    ``self.lm_head`` and ``forward`` / ``mtp_forward``; class attributes ``SPEC_HASH``, ``INIT_STD`` and
    ``TIE_WORD_EMBEDDINGS`` carry what the spec chose.
    """

    SPEC_HASH: str = ""
    INIT_STD: float = 0.02
    TIE_WORD_EMBEDDINGS: bool = False

    def __init__(
        self,
        backend: str = "cpu",
        op_overrides: dict[str, str] | None = None,
        kernel_dir: str | Path | None = None,
    ) -> None:
        super().__init__()
        self.kernel_dir = None if kernel_dir is None else str(kernel_dir)
        self.backend_name = backend
        self.op_overrides = dict(op_overrides or {})
        self.ops: Backend = get_backend(backend, kernel_dir=self.kernel_dir, overrides=op_overrides)
        self.spec: Any = None  # set by lmspec.build / from_pretrained

    # --- backend -------------------------------------------------------------------------------

    def _share_ops(self) -> None:
        """Every submodule calls ops through ``self.ops``; they all share the top module's backend."""
        for module in self.modules():
            if module is not self and hasattr(module, "ops"):
                module.ops = self.ops

    def set_backend(self, name: str, op_overrides: dict[str, str] | None = None) -> None:
        """Switch every op to backend ``name`` (``op_overrides`` maps an op family to another backend)."""
        self.ops = get_backend(name, kernel_dir=self.kernel_dir, overrides=op_overrides)
        self.backend_name = name
        self.op_overrides = dict(op_overrides or {})
        self._share_ops()

    def set_activation_checkpointing(self, mode: str) -> None:
        """Recompute each decoder and MTP layer's activations in the backward (see ACTIVATION_CHECKPOINTING).

        ``full`` keeps only each layer's inputs; ``selective`` also keeps its GEMM and attention outputs;
        ``none`` (the default) keeps everything. The layers' own ``forward`` is wrapped per instance, so
        parameter names, the state dict and the generated code stay as they are.
        """
        if mode not in ACTIVATION_CHECKPOINTING:
            raise ValueError(
                f"activation_checkpointing must be one of {ACTIVATION_CHECKPOINTING}, got {mode!r}"
            )
        mtp = getattr(self.model, "mtp", None)
        layers = [*self.model.layers, *(mtp.layers if mtp is not None else ())]
        for layer in layers:
            layer.__dict__.pop("forward", None)  # back to the class's own forward
            if mode != "none":
                layer.forward = _checkpointed(layer.forward, mode)
        self.activation_checkpointing = mode

    # --- RoPE ----------------------------------------------------------------------------------

    def set_rope_theta(self, thetas: dict[str, float]) -> None:
        """Change the RoPE base of attention kinds by name, e.g. ``{"global": 640000.0}`` at a stage boundary."""
        rotary = self.model.rotary
        unknown = set(thetas) - set(rotary.keys())
        if unknown:
            raise ValueError(
                f"unknown attention kinds {sorted(unknown)}; expected some of {sorted(rotary.keys())}"
            )
        for kind, theta in thetas.items():
            rotary[kind].set_theta(theta)

    def rope_thetas(self) -> dict[str, float]:
        return {kind: r.theta for kind, r in self.model.rotary.items()}

    # --- structure -----------------------------------------------------------------------------

    def moe_layers(self) -> list[nn.Module]:
        """The MoE FFN modules of the decoder layers (not MTP), in layer order."""
        return [layer.mlp for layer in self.model.layers if hasattr(layer.mlp, "gate")]

    def mtp_forward(
        self,
        k: int,
        hidden: Tensor,
        next_ids: Tensor,
        position_ids: Tensor | None,
        cache: KVCache | None = None,
    ) -> tuple[Tensor, Tensor]:
        raise ValueError("this model has no MTP blocks (the spec sets no model.mtp)")

    @property
    def num_mtp_blocks(self) -> int:
        mtp = getattr(self.model, "mtp", None)
        return 0 if mtp is None else len(mtp.layers)

    def set_trained_mtp_blocks(self, blocks: int | None) -> None:
        """Compute the MTP losses of the first ``blocks`` blocks only (None: all of them).

        A training stage that trains fewer blocks than the model has (``overrides.mtp_num_blocks``) sets
        this: the later blocks are not run, so they get no gradient and the optimizer leaves them as they are.
        """
        if blocks is not None and not 0 <= blocks <= self.num_mtp_blocks:
            raise ValueError(f"trained MTP blocks must be in 0..{self.num_mtp_blocks}, got {blocks}")
        self._trained_mtp_blocks = blocks

    def trained_mtp_blocks(self) -> int:
        """How many MTP blocks a forward with labels computes losses for (see ``set_trained_mtp_blocks``)."""
        blocks = getattr(self, "_trained_mtp_blocks", None)
        return self.num_mtp_blocks if blocks is None else blocks

    @torch.no_grad()
    def replicate_mtp_block(self, source: int, targets: range) -> None:
        """Copy MTP block ``source``'s weights into each block of ``targets`` (the report's replication)."""
        layers = self.model.mtp.layers
        for k in targets:
            for (name, dst), (_, src) in zip(
                layers[k].named_parameters(), layers[source].named_parameters(), strict=True
            ):
                if dst.shape != src.shape:
                    raise ValueError(
                        f"MTP block {k}.{name} has shape {tuple(dst.shape)}, block {source} {tuple(src.shape)}"
                    )
                dst.copy_(src)

    # --- init ----------------------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self) -> None:
        """normal(0, init_std) for every matrix and sink, ones for norms, zeros for correction biases.

        Parameters are visited in registration order, so the result depends only on the torch seed.
        """
        norms = {id(m.weight) for m in self.modules() if isinstance(m, RMSNorm)}
        for name, p in self.named_parameters():
            if id(p) in norms:
                p.fill_(1.0)
            elif name.endswith("_proj.bias"):
                p.zero_()
            else:
                p.normal_(0.0, self.INIT_STD)
        for name, b in self.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.zero_()

    def _apply(self, fn: Any, recurse: bool = True) -> CausalLMBase:
        """Dtype casts (``.to(torch.bfloat16)``, ``.half()``) leave the balancing bias in float32.

        The bias is restored from its float32 value (moved to the new device), never from the rounded cast,
        like transformers' ``_keep_in_fp32_modules_strict``.
        """
        saved = [
            (m, m.e_score_correction_bias)
            for m in self.modules()
            if isinstance(getattr(m, "e_score_correction_bias", None), Tensor)
        ]
        out = super()._apply(fn, recurse)
        for module, old in saved:
            new = module.e_score_correction_bias
            if old.dtype == torch.float32 and new.dtype != torch.float32:
                module.e_score_correction_bias = old.to(device=new.device)
        return out

    def keep_fp32_buffers(self) -> None:
        """The balancing bias stays float32 whatever the model dtype (its updates are ~1e-5)."""
        for module in self.modules():
            bias = getattr(module, "e_score_correction_bias", None)
            if isinstance(bias, Tensor) and bias.dtype != torch.float32:
                module.e_score_correction_bias = bias.float()

    # --- weights in the transformers layout ----------------------------------------------------

    def hf_state_dict(self) -> dict[str, Tensor]:
        """State dict under transformers' names; the tied head is stored once (as the embedding)."""
        sd = self.state_dict()
        if self.TIE_WORD_EMBEDDINGS:
            sd.pop("lm_head.weight", None)
        return sd

    def save_pretrained(self, directory: str | Path, *, layout: Literal["native", "hub"] = "native") -> Path:
        """Write ``spec.yaml``, ``config.json`` and ``model.safetensors`` (each atomically) into ``directory``;
        ``layout="hub"`` names the weights as the released checkpoint does (``lmspec.runtime.modeling``)."""
        from lmspec.runtime.modeling import save_pretrained

        return save_pretrained(self, directory, layout=layout)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
