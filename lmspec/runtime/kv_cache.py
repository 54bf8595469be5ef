"""The hybrid KV cache: ring buffers for sliding-window layers, position-indexed buffers for global ones.

Contract with the generated attention (one call per attention module and forward step)::

    k_all, v_all, k_pos = cache.update(layer_key, k, v, position_ids)

k (B, Hkv, T, Dqk) after RoPE, v (B, Hkv, T, Dv) raw, position_ids (B, T) int64 where a negative
position marks padding (never written, never visible). It returns every key the step may attend to,
with k_pos (B, Tk) int64 and -1 for empty slots; the attention op applies causality and the window
from positions alone, so the cache never needs to know the mask.

Layout, per layer key (``model.layers.{i}``, ``model.mtp.layers.{k}``):

- global layers: ``max_len`` slots, slot = position. ``update`` writes the chunk, then returns the
  prefix of the buffer up to the highest position written (a view, no copy).
- sliding layers: a ring of ``window_keys + speculative_depth`` slots, slot = position % slots.
  ``update`` returns the ring's entries older than the chunk concatenated with the chunk itself,
  then writes the chunk's last ``slots`` entries into the ring. The chunk may be longer than the ring
  (chunked prefill). A query at position p needs the ``window_keys - 1`` previous
  positions besides itself; after a speculative step wrote up to D = ``speculative_depth`` positions
  that are then rolled back, those positions' slots hold the rejected keys, so the ring keeps D extra
  slots and no key still needed is ever overwritten.

Rollback (speculative decoding) marks positions >= the new length as empty (k_pos = -1); the K/V
data stays, and the next write over those slots replaces it.

``StaticKVCache`` keeps the same layout in fixed buffers for a compiled decode step: a decode or
verify chunk is written first, then the whole buffer is returned (one fixed shape per step, no host
read); see its docstring.

Memory: ``nbytes()`` sums the K and V tensors actually allocated; ``kv_cache_bytes(spec, ...)``
predicts the same number from the spec alone. Positions (int64 per slot) are bookkeeping, reported
apart by ``index_nbytes()``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lmspec.spec import Spec
from lmspec.spec.schema import AttentionBase

__all__ = ["HybridKVCache", "LayerLayout", "StaticKVCache", "cache_layout", "kv_cache_bytes"]

_NEVER = torch.iinfo(torch.int64).max  # the chunk start of a row with nothing to write


@dataclass(frozen=True)
class LayerLayout:
    """Where one attention layer's keys live: its key, kind, head shape and slot count."""

    key: str
    window_keys: int | None  # None for global layers
    num_kv_heads: int
    qk_head_dim: int
    v_head_dim: int
    slots: int

    @property
    def is_ring(self) -> bool:
        return self.window_keys is not None

    def bytes_per_slot(self, dtype_bytes: int) -> int:
        return self.num_kv_heads * (self.qk_head_dim + self.v_head_dim) * dtype_bytes


def _spec_of(spec_or_model: Spec | nn.Module) -> Spec:
    if isinstance(spec_or_model, Spec):
        return spec_or_model
    spec = getattr(spec_or_model, "spec", None)
    if not isinstance(spec, Spec):
        raise TypeError(f"expected a Spec or a model with a .spec, got {type(spec_or_model).__name__}")
    return spec


def _slots(attn: AttentionBase, max_len: int, speculative_depth: int) -> int:
    window = getattr(attn, "window_keys", None)
    if window is None:
        return max_len
    # A ring never needs more slots than the context holds.
    return min(window + speculative_depth, max_len)


def cache_layout(
    spec: Spec, max_len: int, *, speculative_depth: int = 0, mtp_blocks: int | None = None
) -> list[LayerLayout]:
    """The cache's layers for a context of ``max_len`` tokens: every decoder layer, then MTP blocks.

    Each sliding layer's ring keeps ``speculative_depth`` (D) slots beyond its window: a verify step
    writes D+1 tokens, of which up to D are rolled back. ``mtp_blocks`` MTP layers get a cache of their
    own (default: ``speculative_depth``, the blocks used as drafters).
    """
    if max_len <= 0:
        raise ValueError(f"max_len must be positive, got {max_len}")
    if speculative_depth < 0:
        raise ValueError(f"speculative_depth must be >= 0, got {speculative_depth}")
    m = spec.model
    available = m.mtp.num_blocks if m.mtp else 0
    n_mtp = speculative_depth if mtp_blocks is None else mtp_blocks
    n_mtp = min(n_mtp, available) if mtp_blocks is None else n_mtp
    if n_mtp > available:
        raise ValueError(f"mtp_blocks must be at most mtp.num_blocks ({available}), got {n_mtp}")

    def layout(key: str, attn: AttentionBase) -> LayerLayout:
        return LayerLayout(
            key=key,
            window_keys=getattr(attn, "window_keys", None),
            num_kv_heads=attn.num_kv_heads,
            qk_head_dim=attn.qk_head_dim,
            v_head_dim=attn.v_head_dim,
            slots=_slots(attn, max_len, speculative_depth),
        )

    out = [layout(f"model.layers.{i}", m.layer_attention(i)) for i in range(m.num_layers)]
    if n_mtp:
        assert m.mtp is not None
        attn = m.attention[m.blocks[m.mtp.block].attention]
        out += [layout(f"model.mtp.layers.{k}", attn) for k in range(n_mtp)]
    return out


def kv_cache_bytes(
    spec: Spec,
    context: int,
    batch: int = 1,
    *,
    dtype_bytes: int = 2,
    speculative_depth: int = 0,
    mtp_blocks: int | None = None,
) -> int:
    """K+V bytes of a ``HybridKVCache`` for ``batch`` sequences of up to ``context`` tokens, from the spec.

    Per sequence: each global layer holds ``context`` tokens of ``Hkv * (Dqk + Dv)`` elements; each
    sliding layer a ring of ``min(window_keys + speculative_depth, context)`` tokens. With
    ``speculative_depth=0`` and ``mtp_blocks=0`` this is the textbook hybrid cost (window_keys slots per
    SWA layer + a per-token cost for global layers); speculation adds ``speculative_depth`` slots per
    sliding layer, and each drafting MTP block adds its own layer (default
    ``mtp_blocks = speculative_depth``).
    """
    return batch * sum(
        layer.slots * layer.bytes_per_slot(dtype_bytes)
        for layer in cache_layout(spec, context, speculative_depth=speculative_depth, mtp_blocks=mtp_blocks)
    )


class _LayerCache:
    """One layer's K/V storage and the position held by each slot (-1 = empty)."""

    def __init__(self, layout: LayerLayout, batch: int, device: torch.device, dtype: torch.dtype) -> None:
        self.layout = layout
        S = layout.slots
        self.k = torch.zeros(batch, layout.num_kv_heads, S, layout.qk_head_dim, device=device, dtype=dtype)
        self.v = torch.zeros(batch, layout.num_kv_heads, S, layout.v_head_dim, device=device, dtype=dtype)
        self.pos = torch.full((batch, S), -1, dtype=torch.int64, device=device)
        self.high = 0  # global layers: 1 + highest slot that may be valid (bounds what update returns)

    def _check(self, k: Tensor, v: Tensor, position_ids: Tensor) -> None:
        B, H, T, D = k.shape
        lay = self.layout
        if B != self.pos.shape[0] or H != lay.num_kv_heads or D != lay.qk_head_dim:
            raise ValueError(
                f"{lay.key}: expected k of shape (batch {self.pos.shape[0]}, {lay.num_kv_heads}, T, "
                f"{lay.qk_head_dim}), got {tuple(k.shape)}"
            )
        if v.shape[:3] != k.shape[:3] or v.shape[3] != lay.v_head_dim:
            raise ValueError(
                f"{lay.key}: expected v of shape {(B, H, T, lay.v_head_dim)}, got {tuple(v.shape)}"
            )
        if position_ids.shape != (B, T):
            raise ValueError(
                f"{lay.key}: expected position_ids of shape {(B, T)}, got {tuple(position_ids.shape)}"
            )

    def update(self, k: Tensor, v: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        self._check(k, v, position_ids)
        pos = position_ids.to(device=self.pos.device, dtype=torch.int64)
        k, v = k.to(self.k.dtype), v.to(self.v.dtype)
        T = pos.shape[1]
        # Decode and verify steps (every token real, chunk no longer than the ring) take a scatter;
        # padded or over-long chunks take the general masked path.
        dense = bool((pos >= 0).all()) and T <= self.layout.slots
        if self.layout.is_ring:
            return self._update_ring(k, v, pos, dense)
        return self._update_global(k, v, pos, dense)

    def _scatter(self, k: Tensor, v: Tensor, pos: Tensor, slot: Tensor) -> None:
        B, H, T, _ = k.shape
        idx = slot[:, None, :, None]  # (B, 1, T, 1)
        self.k.scatter_(2, idx.expand(B, H, T, k.shape[3]), k)
        self.v.scatter_(2, idx.expand(B, H, T, v.shape[3]), v)
        self.pos.scatter_(1, slot, pos)

    def _put(self, k: Tensor, v: Tensor, pos: Tensor, keep: Tensor, slot_of) -> None:
        b_idx, t_idx = keep.nonzero(as_tuple=True)
        p = pos[b_idx, t_idx]
        slot = slot_of(p)
        self.k[b_idx, :, slot] = k[b_idx, :, t_idx]  # (N, Hkv, D) scattered to their slots
        self.v[b_idx, :, slot] = v[b_idx, :, t_idx]
        self.pos[b_idx, slot] = p

    def _update_global(self, k: Tensor, v: Tensor, pos: Tensor, dense: bool) -> tuple[Tensor, Tensor, Tensor]:
        S = self.layout.slots
        top = int(pos.max()) if pos.numel() else -1
        if top >= S:
            raise ValueError(f"{self.layout.key}: position {top} is past the cache's max_len {S}")
        if dense:
            self._scatter(k, v, pos, pos)
        else:
            self._put(k, v, pos, pos >= 0, lambda p: p)
        self.high = max(self.high, top + 1)
        n = max(self.high, 1)  # never an empty key axis: one slot, empty (-1), if nothing was written
        return self.k[:, :, :n], self.v[:, :, :n], self.pos[:, :n]

    def _update_ring(self, k: Tensor, v: Tensor, pos: Tensor, dense: bool) -> tuple[Tensor, Tensor, Tensor]:
        S = self.layout.slots
        valid = pos >= 0
        pos = pos.clamp_min(-1)  # padding is exactly -1
        start = torch.where(valid, pos, torch.full_like(pos, _NEVER)).amin(dim=1, keepdim=True)  # (B, 1)
        # Ring entries at or past the chunk's first position are stale (a rewrite of those positions).
        self.pos.masked_fill_(self.pos >= start, -1)
        k_all = torch.cat([self.k, k], dim=2)  # (B, Hkv, S + T, Dqk)
        v_all = torch.cat([self.v, v], dim=2)  # (B, Hkv, S + T, Dv)
        k_pos = torch.cat([self.pos, pos], dim=1)  # (B, S + T)
        if dense:
            self._scatter(k, v, pos, pos % S)
        else:
            # Only the chunk's last S positions of each sequence fit; earlier ones would collide.
            last = pos.amax(dim=1, keepdim=True)  # (B, 1)
            self._put(k, v, pos, valid & (pos > last - S), lambda p: p % S)
        return k_all, v_all, k_pos

    def rollback(self, lengths: Tensor) -> None:
        self.pos.masked_fill_(self.pos >= lengths[:, None], -1)
        if not self.layout.is_ring:
            self.high = min(self.high, int(lengths.max()) if lengths.numel() else 0)


class HybridKVCache:
    """KV cache for a spec's decoder layers (and drafting MTP blocks), batched, with rollback.

    Every ring keeps ``speculative_depth`` slots beyond ``window_keys`` (default: the spec's
    ``serving.speculative_depth``). ``mtp_blocks`` MTP layers get their own cache (default:
    ``speculative_depth``). Sequences in a batch have independent lengths: positions are given per
    token, padding is any negative position.
    """

    def __init__(
        self,
        spec_or_model: Spec | nn.Module,
        batch_size: int,
        max_len: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        speculative_depth: int | None = None,
        mtp_blocks: int | None = None,
    ) -> None:
        self.spec = _spec_of(spec_or_model)
        if device is None or dtype is None:
            param = next(spec_or_model.parameters(), None) if isinstance(spec_or_model, nn.Module) else None
            device = device if device is not None else (param.device if param is not None else "cpu")
            dtype = dtype if dtype is not None else (param.dtype if param is not None else torch.float32)
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.batch_size = batch_size
        self.max_len = max_len
        self.speculative_depth = (
            self.spec.serving.speculative_depth if speculative_depth is None else speculative_depth
        )
        self.device = torch.device(device)
        self.dtype = dtype
        self.layouts = cache_layout(
            self.spec, max_len, speculative_depth=self.speculative_depth, mtp_blocks=mtp_blocks
        )
        self._layers = {lay.key: _LayerCache(lay, batch_size, self.device, dtype) for lay in self.layouts}

    # -- the contract -------------------------------------------------------------------------
    def update(
        self, layer_key: str, k: Tensor, v: Tensor, position_ids: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Store this step's keys/values; return (k_all, v_all, k_pos) covering all the step may see."""
        try:
            layer = self._layers[layer_key]
        except KeyError:
            raise KeyError(
                f"no cache for layer {layer_key!r}; this cache holds {sorted(self._layers)}"
            ) from None
        return layer.update(k, v, position_ids)

    # -- bookkeeping ---------------------------------------------------------------------------
    @property
    def keys(self) -> list[str]:
        return list(self._layers)

    def _lengths(self, new_lengths: Tensor | Sequence[int] | int) -> Tensor:
        t = torch.as_tensor(new_lengths, dtype=torch.int64, device=self.device)
        if t.dim() == 0:
            t = t.expand(self.batch_size)
        if t.shape != (self.batch_size,):
            raise ValueError(f"expected {self.batch_size} lengths, got shape {tuple(t.shape)}")
        return t

    def rollback(
        self, new_lengths: Tensor | Sequence[int] | int, *, keys: Iterable[str] | None = None
    ) -> None:
        """Forget every position >= ``new_lengths[b]`` of sequence b (in ``keys``, default all layers)."""
        lengths = self._lengths(new_lengths)
        for key in self._layers if keys is None else keys:
            self._layers[key].rollback(lengths)

    def reset(self, rows: Iterable[int] | None = None) -> None:
        """Empty the given batch rows (default: all), e.g. when a slot gets a new request."""
        lengths = torch.full((self.batch_size,), self.max_len + 1, dtype=torch.int64)
        lengths[list(range(self.batch_size)) if rows is None else list(rows)] = 0
        self.rollback(lengths)

    def nbytes(self) -> int:
        """Bytes of K and V actually allocated (what ``kv_cache_bytes`` predicts)."""
        return sum(layer.k.nbytes + layer.v.nbytes for layer in self._layers.values())

    def index_nbytes(self) -> int:
        """Bytes of the per-slot position bookkeeping (not part of the KV accounting)."""
        return sum(layer.pos.nbytes for layer in self._layers.values())

    def positions(self, layer_key: str) -> Tensor:
        """The positions each slot of ``layer_key`` holds, (B, slots), -1 = empty (a copy)."""
        return self._layers[layer_key].pos.clone()

    def __repr__(self) -> str:
        rings = sum(lay.is_ring for lay in self.layouts)
        return (
            f"HybridKVCache(batch={self.batch_size}, max_len={self.max_len}, layers={len(self.layouts)} "
            f"({rings} rings, speculative_depth {self.speculative_depth}), {self.nbytes() / 2**20:.2f} MiB)"
        )


class _StaticLayer:
    """One layer of a ``StaticKVCache``: fixed buffers of ``slots + 1`` entries, the last one a trash slot.

    Padding tokens (position -1) are written to the trash slot, tagged -1, so a write never depends on
    the data: no host read, one scatter of a fixed shape, which torch.compile traces as one graph and
    CUDA graphs can replay.
    """

    def __init__(
        self, layout: LayerLayout, batch: int, max_len: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.layout = layout
        # A ring as long as the context never evicts: its slots are positions, as a global layer's.
        self.evicts = layout.is_ring and layout.slots < max_len
        n = layout.slots + 1
        self.k = torch.zeros(batch, layout.num_kv_heads, n, layout.qk_head_dim, device=device, dtype=dtype)
        self.v = torch.zeros(batch, layout.num_kv_heads, n, layout.v_head_dim, device=device, dtype=dtype)
        self.pos = torch.full((batch, n), -1, dtype=torch.int64, device=device)
        for t in (self.k, self.v, self.pos):
            # In place across calls at fixed addresses: what lets CUDA graphs replay the decode step.
            torch._dynamo.mark_static_address(t)

    def writes_in_place(self, T: int) -> bool:
        """Whether a chunk of T tokens can be written before it is read (``update``'s fixed-shape path).

        Global slots are positions, so writing never evicts a key. A ring of S slots evicts the keys
        ``S`` positions back; the chunk's first query needs ``window_keys - 1`` of them, so the ring
        must hold ``window_keys + T - 1``: every decode and verify step (T <= speculative_depth + 1).
        """
        lay = self.layout
        return not self.evicts or T + (lay.window_keys or 0) - 1 <= lay.slots

    def _write(self, k: Tensor, v: Tensor, pos: Tensor) -> None:
        S = self.layout.slots
        valid = pos >= 0
        if k.shape[2] > S:
            # Only each row's last S positions fit; earlier ones would collide with them.
            valid = valid & (pos > pos.amax(dim=1, keepdim=True) - S)
        slot = torch.where(valid, pos % S, torch.full_like(pos, S))  # (B, T)
        B, H, T, _ = k.shape
        idx = slot[:, None, :, None]  # (B, 1, T, 1)
        self.k.scatter_(2, idx.expand(B, H, T, k.shape[3]), k)
        self.v.scatter_(2, idx.expand(B, H, T, v.shape[3]), v)
        self.pos.scatter_(1, slot, torch.where(valid, pos, torch.full_like(pos, -1)))

    def update(self, k: Tensor, v: Tensor, pos: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        k, v, pos = k.to(self.k.dtype), v.to(self.v.dtype), pos.to(torch.int64).clamp_min(-1)
        if self.writes_in_place(k.shape[2]):
            # Stale slots (rolled-back or older-than-window positions) are hidden by the attention's
            # causality and window tests on k_pos: nothing needs clearing.
            self._write(k, v, pos)
            return self.k, self.v, self.pos
        # A chunk longer than the ring's spare slots (a prefill): its queries see the ring as it was
        # (less what the chunk rewrites) followed by the whole chunk, as HybridKVCache does.
        valid = pos >= 0
        start = torch.where(valid, pos, torch.full_like(pos, _NEVER)).amin(dim=1, keepdim=True)  # (B, 1)
        old_pos = self.pos.masked_fill(self.pos >= start, -1)
        k_all = torch.cat([self.k, k], dim=2)  # (B, Hkv, S + 1 + T, Dqk)
        v_all = torch.cat([self.v, v], dim=2)
        k_pos = torch.cat([old_pos, pos], dim=1)  # (B, S + 1 + T)
        self._write(k, v, pos)
        return k_all, v_all, k_pos

    def rollback(self, lengths: Tensor) -> None:
        self.pos.masked_fill_(self.pos >= lengths[:, None], -1)


class StaticKVCache(HybridKVCache):
    """``HybridKVCache``'s layout in preallocated, fixed-shape buffers: the cache of a compiled decode step.

    Same contract, rollback and accounting. Every ``update`` of a decode or verify step (a chunk of at
    most ``speculative_depth + 1`` tokens per row) writes in place and returns the whole buffer of the
    layer, ``slots + 1`` keys whatever the sequence lengths (global layers: ``max_len + 1``), so the
    step's shapes never change from one token to the next and nothing is read on the host. The attention
    op hides the slots a query may not see by their positions (-1 for empty, later positions by
    causality, older ones by the window). Longer chunks (prefill) take the concatenating path of
    ``HybridKVCache``, in eager mode.
    """

    def __init__(
        self,
        spec_or_model: Spec | nn.Module,
        batch_size: int,
        max_len: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        speculative_depth: int | None = None,
        mtp_blocks: int | None = None,
    ) -> None:
        super().__init__(
            spec_or_model,
            batch_size,
            max_len,
            device=device,
            dtype=dtype,
            speculative_depth=speculative_depth,
            mtp_blocks=mtp_blocks,
        )
        self._layers = {  # type: ignore[assignment]
            lay.key: _StaticLayer(lay, batch_size, max_len, self.device, self.dtype) for lay in self.layouts
        }

    def update(
        self, layer_key: str, k: Tensor, v: Tensor, position_ids: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Store this step's keys/values; return the layer's buffers (k, v, k_pos), or old + chunk (prefill)."""
        return self._layers[layer_key].update(k, v, position_ids)

    def nbytes(self) -> int:
        """Bytes of K and V allocated, the trash slot of each layer included."""
        return super().nbytes()
