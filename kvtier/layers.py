"""Per-layer cache state: one small object per model layer, as in transformers' cache_utils.

`TieredLayer` (full attention) keeps a chunk table over the three tiers plus an unsealed recent window on
the device. `SlidingLayer` keeps only the last W-1 tokens on the device: a sliding-window layer never
looks further back, so it is never tiered.

Logical positions of a tiered layer::

    0      sink        c1          c2               win_start           length
    |------|-----------|-----------|-- ... ---------|--- recent window ---|
     pinned  sealed chunks (device / host / disk)      device slots, unsealed
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .attend import attend
from .config import KVTierConfig
from .errors import AttentionNotEnabledError, CacheInputError
from .kernels import merge_partials
from .model_spec import LayerSpec
from .store.chunk import Chunk, Tier

if TYPE_CHECKING:
    from .store.tiers import TierManager

_NOT_ENABLED = (
    "a KVTierCache was used by an attention implementation that is not kvtier's. Switch the model with "
    "`kvtier.enable(model)`, or build the cache with `KVTierCache.for_model(model)`, which does it for you."
)


@dataclass(slots=True, eq=False)
class KVHandle:
    """What `KVTierCache.update` returns in place of key/value tensors; only kvtier's attention reads it.

    Anything else touching it (sdpa, eager, flash) fails at once with a message that says how to fix it.
    k_new, v_new: [B, Hkv, Q, D], the tokens of this forward; past_len: tokens cached before them.
    """

    layer: "TieredLayer | SlidingLayer"
    past_len: int
    k_new: torch.Tensor
    v_new: torch.Tensor
    context: tuple[torch.Tensor, torch.Tensor, int] | None = None  # sliding layers: k, v, first position
    new_in_window: bool = False

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        raise AttentionNotEnabledError(_NOT_ENABLED)

    def __getattr__(self, name: str):
        raise AttentionNotEnabledError(f"{_NOT_ENABLED} (attribute {name!r} was requested)")


def _pad_slice(pad: torch.Tensor | None, start: int, end: int) -> torch.Tensor | None:
    if pad is None:
        return None
    part = pad[:, start:end]
    return None if bool(part.all()) else part


class TieredLayer:
    """A full-attention layer whose sealed chunks live in the device pool, the host pool or on disk."""

    is_sliding = False

    def __init__(self, index: int, spec: LayerSpec, config: KVTierConfig, tiers: "TierManager"):
        self.index = index
        self.spec = spec
        self.config = config
        self.tiers = tiers
        self.pool = tiers.device_pools[index]
        self.chunks: list[Chunk] = []
        self.length = 0
        self.win_slots = torch.empty(0, dtype=torch.long)
        self.batch: int | None = None

    @property
    def win_start(self) -> int:
        return self.length - self.win_slots.numel()

    # ------------------------------------------------------------------------------------ writes
    def _plan_seals(self, total: int) -> list[tuple[int, int]]:
        """Chunks (start, length) to seal from the window + new tokens, leaving at least recent_window."""
        seals, start, left = [], self.win_start, total
        need_sink = not self.chunks and self.config.sink_tokens > 0 and start == 0
        while True:
            size = self.config.sink_tokens if (need_sink and not seals) else self.config.chunk_size
            if left < size + self.config.recent_window:
                return seals
            seals.append((start, size))
            start += size
            left -= size

    def update(self, k: torch.Tensor, v: torch.Tensor) -> KVHandle:
        """Store the new tokens (k, v: [B, Hkv, Q, D]) and return the handle attention will read."""
        b, h, q, d = k.shape
        self.pool.init_shape(b, h, d)
        self.batch = b
        past = self.length
        win_len = self.win_slots.numel()
        seals = self._plan_seals(win_len + q)
        win_cut = 0  # window tokens consumed by seals
        for start, size in seals:
            in_window = max(0, min(size, past - start))
            chunk = Chunk(self.index, self.tiers.new_chunk_id(), start, size, Tier.DEVICE, b,
                          pinned=not self.chunks and start == 0 and self.config.sink_tokens > 0,
                          last_used=self.tiers.clock)
            if in_window == size:
                slots = self.win_slots[win_cut:win_cut + size]
                self.tiers.adopt_device(chunk, slots)
            else:
                parts_k, parts_v = [], []
                if in_window:
                    slots = self.win_slots[win_cut:win_cut + in_window]
                    wk, wv = self.pool.read(slots)
                    self.pool.release(slots)
                    parts_k.append(wk)
                    parts_v.append(wv)
                lo = start + in_window - past
                parts_k.append(k[:, :, lo:start + size - past])
                parts_v.append(v[:, :, lo:start + size - past])
                ck = parts_k[0] if len(parts_k) == 1 else torch.cat(parts_k, dim=2)
                cv = parts_v[0] if len(parts_v) == 1 else torch.cat(parts_v, dim=2)
                self.tiers.place(chunk, ck, cv)
            win_cut += in_window
            self.chunks.append(chunk)
        sealed_new = sum(size for _, size in seals) - win_cut
        tail_k, tail_v = k[:, :, sealed_new:], v[:, :, sealed_new:]
        kept = self.win_slots[win_cut:]
        n_tail = tail_k.shape[2]
        if n_tail:
            slots = self.tiers.allocate_device(self.index, n_tail)
            if slots is None:  # the config check makes this unreachable; keep the invariant loud
                raise RuntimeError(f"layer {self.index}: no device room for the recent window")
            self.pool.write(slots, tail_k, tail_v, torch.arange(past + sealed_new, past + q, device=self.pool.device))
            kept = torch.cat([kept.to(slots.device), slots])
        self.win_slots = kept
        self.length = past + q
        return KVHandle(self, past, k, v, new_in_window=sealed_new == 0)

    # ------------------------------------------------------------------------------------- reads
    def attend(
        self,
        q: torch.Tensor,
        handle: KVHandle,
        pad: torch.Tensor | None,
        scale: float,
        softcap: float | None,
    ) -> torch.Tensor:
        """Exact attention of q [B, Hq, Q, D] over every cached token; returns [B, Hq, Q, D] in q.dtype."""
        past, nq = handle.past_len, q.shape[2]
        # Decode: the new token already sits in the window, so the arena covers it and no causal cut is needed.
        arena_has_new = nq == 1 and handle.new_in_window
        limit = past + 1 if arena_has_new else past
        remote = [c for c in self.chunks if c.tier != Tier.DEVICE and c.start < past]
        self.tiers.counters.device.hits += sum(1 for c in self.chunks if c.start < past) - len(remote)
        remote = self._promote(remote)
        parts = []
        if limit > 0 and self.pool.high_water:
            k, v, pos = self.pool.view()
            valid = None
            if not self.pool.dense or self.length > limit:
                valid = ((pos >= 0) & (pos < limit))[None, :].expand(k.shape[0], -1)
            pad_part = _pad_slice(pad, 0, limit)
            if pad_part is not None:
                row_ok = pad_part[:, pos.clamp(0, limit - 1)]
                valid = row_ok if valid is None else valid & row_ok
            alone = arena_has_new and not remote
            out, lse = attend(q, k, v, q_pos0=past, key_pos=pos, scale=scale, key_valid=valid, causal=False,
                              softcap=softcap, need_lse=not alone)
            if alone:
                return out
            parts.append((out, lse))
        for group in self._groups(remote):
            parts.append(self._attend_remote(q, group, past, pad, scale, softcap))
        if not arena_has_new:
            need_lse = bool(parts)
            out, lse = attend(q, handle.k_new, handle.v_new, q_pos0=past, key_pos=past, scale=scale,
                              key_valid=_pad_slice(pad, past, past + nq), softcap=softcap, need_lse=need_lse)
            if not need_lse:
                return out
            parts.append((out, lse))
        out, lse = parts[0]
        for o, l in parts[1:]:
            out, lse = merge_partials(out, lse, o, l)
        return out.to(q.dtype)

    def _promote(self, remote: list[Chunk]) -> list[Chunk]:
        """Pull non-resident chunks into free device room (none is evicted for it); return the rest."""
        rest = []
        for chunk in remote:
            if self.tiers.device_has_room(self.index, chunk.length):
                k, v = self.tiers.fetch(chunk)
                self.tiers.promote(chunk, k, v)
            else:
                rest.append(chunk)
        return rest

    def _groups(self, chunks: list[Chunk]):
        group, size = [], 0
        for chunk in chunks:
            if group and size + chunk.length > self.config.staging_tokens:
                yield group
                group, size = [], 0
            group.append(chunk)
            size += chunk.length
        if group:
            yield group

    def _attend_remote(self, q, group: list[Chunk], past: int, pad, scale, softcap):
        ks, vs, poss = [], [], []
        for chunk in group:
            k, v = self.tiers.fetch(chunk)
            self.tiers.promote(chunk, k, v)
            ks.append(k)
            vs.append(v)
            poss.append(torch.arange(chunk.start, chunk.end, device=q.device))
        k = ks[0] if len(ks) == 1 else torch.cat(ks, dim=2)
        v = vs[0] if len(vs) == 1 else torch.cat(vs, dim=2)
        pos = poss[0] if len(poss) == 1 else torch.cat(poss)
        self.tiers.counters.staging_peak_tokens = max(self.tiers.counters.staging_peak_tokens, k.shape[2])
        valid = None
        if any(c.end > past for c in group):
            valid = (pos < past)[None, :].expand(k.shape[0], -1)
        if pad is not None:
            row_ok = pad[:, pos.clamp(max=pad.shape[1] - 1)]
            valid = row_ok if valid is None else valid & row_ok
        return attend(q, k, v, q_pos0=past, key_pos=pos, scale=scale, key_valid=valid, causal=False,
                      softcap=softcap, need_lse=True)

    # ------------------------------------------------------------------------------- maintenance
    def select_rows(self, index: torch.Tensor) -> None:
        self.tiers.select_rows(self.index, self.chunks, index)
        self.batch = index.numel()

    def truncate(self, length: int) -> None:
        """Forget every token at position >= length."""
        if length >= self.length:
            return
        if length >= self.win_start:
            keep = length - self.win_start
            self.pool.release(self.win_slots[keep:])
            self.win_slots = self.win_slots[:keep]
            self.length = length
            return
        self.pool.release(self.win_slots)
        self.win_slots = self.win_slots[:0]
        doomed = [c for c in self.chunks if c.end > length]
        self.chunks = [c for c in self.chunks if c.end <= length]
        straddle = next((c for c in doomed if c.start < length), None)
        kept_k = kept_v = None
        if straddle is not None:
            k, v = self.tiers.fetch(straddle)
            kept_k, kept_v = k[:, :, : length - straddle.start].clone(), v[:, :, : length - straddle.start].clone()
        self.tiers.free(doomed)
        self.length = self.chunks[-1].end if self.chunks else 0
        if kept_k is not None:
            slots = self.tiers.allocate_device(self.index, kept_k.shape[2])
            self.pool.write(slots, kept_k, kept_v, torch.arange(self.length, length, device=self.pool.device))
            self.win_slots = slots
        self.length = length

    def reset(self) -> None:
        self.tiers.free(self.chunks)
        if self.win_slots.numel():
            self.pool.release(self.win_slots)
        self.chunks = []
        self.win_slots = torch.empty(0, dtype=torch.long)
        self.length = 0
        self.batch = None


class SlidingLayer:
    """A sliding-window layer: the last W-1 tokens on the device, nothing older is ever needed.

    It keeps `slack` tokens more than that so `crop` can take back up to `slack` tokens (speculative
    decoding does)."""

    is_sliding = True

    def __init__(self, index: int, spec: LayerSpec, slack: int = 0):
        self.index = index
        self.spec = spec
        self.window = spec.window
        self.slack = slack
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.length = 0
        self.batch: int | None = None

    def update(self, k: torch.Tensor, v: torch.Tensor) -> KVHandle:
        past = self.length
        if self.k is None or self.k.shape[2] == 0:
            ctx_k, ctx_v = k, v
        else:
            ctx_k, ctx_v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        first = past + k.shape[2] - ctx_k.shape[2]
        keep = min(max(0, self.window - 1) + self.slack, ctx_k.shape[2])
        self.k = ctx_k[:, :, ctx_k.shape[2] - keep:].detach()
        self.v = ctx_v[:, :, ctx_v.shape[2] - keep:].detach()
        self.length = past + k.shape[2]
        self.batch = k.shape[0]
        return KVHandle(self, past, k, v, context=(ctx_k, ctx_v, first))

    def attend(self, q, handle: KVHandle, pad, scale: float, softcap: float | None) -> torch.Tensor:
        ck, cv, first = handle.context
        valid = _pad_slice(pad, first, first + ck.shape[2])
        out, _ = attend(q, ck, cv, q_pos0=handle.past_len, key_pos=first, scale=scale, key_valid=valid,
                        causal=True, window=self.window, softcap=softcap, need_lse=False)
        return out

    def select_rows(self, index: torch.Tensor) -> None:
        if self.k is not None:
            index = index.to(self.k.device)
            self.k, self.v = self.k.index_select(0, index), self.v.index_select(0, index)
        self.batch = index.numel()

    def truncate(self, length: int) -> None:
        drop = self.length - length
        if drop <= 0:
            return
        held = 0 if self.k is None else self.k.shape[2]
        if held - drop < min(length, self.window - 1):
            raise CacheInputError(
                f"cannot crop sliding-window layer {self.index} back by {drop} tokens: it keeps only the last "
                f"{self.window - 1 + self.slack} tokens (window - 1 + recent_window); raise recent_window to crop "
                "further back"
            )
        self.k, self.v = self.k[:, :, : held - drop], self.v[:, :, : held - drop]
        self.length = length

    def reset(self) -> None:
        self.k = self.v = None
        self.length = 0
        self.batch = None
