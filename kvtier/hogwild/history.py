"""The shared history: the prompt and every finished step, in the order they finished.

Its keys are rotated at their absolute positions 0..length-1 (the history opens every worker's view, so
these are view positions too). A finished step joins it by one re-rotation of its keys, done once
(`append_block`), instead of a re-rotation per view per step. The cache only ever calls `length`, `extend`,
`append_block`, `attend`, `attend_newest`, `kv` and `reset`, which two classes implement:

- `TieredHistory` (full-attention layers): a `TieredLayer` of a batch-1 `KVTierCache`, so the history spills
  to host and disk under that cache's budgets and is read exactly or sparsely like any kvtier layer.
- `History` (sliding-window layers, never tiered in kvtier): one block on the device.
"""

from __future__ import annotations

import torch

from ..attend import attend
from ..handle import KVHandle
from ..kernels import block_decode_attention
from ..layers import TieredLayer
from ..read import exact_attention, sparse_attention
from ..rope import Rope


class History:
    """One layer's history block on the device: k, v [Hkv, capacity, D], the first `length` rows in use."""

    def __init__(self, rope: Rope, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.rope = rope
        self._k = torch.empty(kv_heads, 0, head_dim, dtype=dtype, device=device)
        self._v = torch.empty_like(self._k)
        self.length = 0

    def kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (rotated at 0..length-1) and values: [Hkv, length, D] views."""
        return self._k[:, : self.length], self._v[:, : self.length]

    # ------------------------------------------------------------------------------------ writes
    def extend(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append k, v [Hkv, T, D] whose keys are already rotated at length .. length+T-1 (a prefill)."""
        n = k.shape[1]
        if self.length + n > self._k.shape[1]:
            self._grow(self.length + n)
        self._k[:, self.length : self.length + n] = k
        self._v[:, self.length : self.length + n] = v
        self.length += n

    def append_block(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append a block whose keys [Hkv, T, D] are rotated at block-local positions 0..T-1: one rotation by
        the history's length moves them to their place, without recomputing anything."""
        self.extend(self.rope.shift(k[None], self.length)[0], v)

    def _grow(self, need: int) -> None:
        cap = max(need, 2 * self._k.shape[1], 16)  # doubling: appending a step copies the history rarely
        h, _, d = self._k.shape
        k = self._k.new_empty(h, cap, d)
        v = self._v.new_empty(h, cap, d)
        k[:, : self.length] = self._k[:, : self.length]
        v[:, : self.length] = self._v[:, : self.length]
        self._k, self._v = k, v

    def reset(self) -> None:
        self.length = 0

    # ------------------------------------------------------------------------------------- reads
    def attend(self, q: torch.Tensor, q_pos: torch.Tensor, view_pos: torch.Tensor, scale: float,
               softcap: float | None = None, window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of query rows over the whole history (it precedes every query of a view).

        q: [R, Hq, D] rotated at q_pos [R]; view_pos [R]: each row's position in its view, i.e. relative to the
        history's first key (the block kernel turns each row's query there). A sliding window counts view
        positions. Returns out [R, Hq, D] and lse [R, Hq], float32."""
        k, v = self.kv()
        start = torch.zeros(1, dtype=torch.long, device=q.device)
        length = torch.full((1,), self.length, dtype=torch.long, device=q.device)
        return block_decode_attention(q, q_pos, k, v, start, length, view_pos[:, None], self.rope.inv_freq,
                                      self.rope.interleaved, scale, softcap, window)

    def attend_newest(self, q: torch.Tensor, scale: float, softcap: float | None, window: int | None,
                      need_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Causal attention of the newest Q tokens' queries q [1, Hq, Q, D] (rotated at their absolute positions)
        over the history, as `kvtier.attend.attend` returns it."""
        n = q.shape[2]
        k, v = self.kv()
        return attend(q, k[None], v[None], q_pos0=self.length - n, key_pos=0, scale=scale, causal=True,
                      window=window, softcap=softcap, need_lse=need_lse)


class TieredHistory:
    """One full-attention layer's history as a kvtier `TieredLayer` (batch 1): its chunks live on the device,
    the host or disk under the owning `KVTierCache`'s budgets, and `mode="sparse"` reads only the selected
    pages of it at each step."""

    def __init__(self, rope: Rope, layer: TieredLayer, kv_heads: int, head_dim: int):
        self.rope = rope
        self.layer = layer
        self._empty = (kv_heads, head_dim)
        self._pending: KVHandle | None = None

    @property
    def length(self) -> int:
        return self.layer.length

    def kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of every history token's keys and values [Hkv, length, D] (checks and baselines only)."""
        if not self.layer.length:
            h, d = self._empty
            empty = torch.empty(h, 0, d, dtype=self.layer.tiers.dtype, device=self.layer.tiers.device)
            return empty, empty
        k, v = self.layer.tiers.layer_kv(self.layer)
        return k[0], v[0]

    # ------------------------------------------------------------------------------------ writes
    def extend(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append k, v [Hkv, T, D] rotated at length .. length+T-1, whose queries attend next (a prefill):
        the layer cuts them into chunks once `attend_newest` ran, as after any kvtier prefill."""
        self._pending = self.layer.update(k[None], v[None])

    def append_block(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append a block whose keys [Hkv, T, D] are rotated at block-local positions 0..T-1: one rotation by
        the history's length moves them to their place; no query attends, so they are sealed at once."""
        self.layer.update(self.rope.shift(k[None], self.layer.length), v[None])
        self.layer.commit_pending()

    def reset(self) -> None:
        self.layer.reset()
        self._pending = None

    # ------------------------------------------------------------------------------------- reads
    def attend(self, q: torch.Tensor, q_pos: torch.Tensor, view_pos: torch.Tensor, scale: float,
               softcap: float | None = None, window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """As `History.attend`: rows q [R, Hq, D] rotated at q_pos [R], turned to view_pos [R] (their distance
        from the history's first key), over every history token (exact mode) or each row's selected pages
        (sparse mode, one selection per row). Returns out [R, Hq, D] and lse [R, Hq], float32."""
        if window is not None:
            raise ValueError("a tiered history serves full-attention layers only")
        turned = self.rope.shift(q.transpose(0, 1)[None], view_pos - q_pos)  # [1, Hq, R, D]: rows at view_pos
        layer = self.layer
        if layer.config.mode == "sparse" and layer.chunks:
            parts = [sparse_attention(layer, turned[:, :, r:r + 1], None, None, scale, softcap, need_lse=True)
                     for r in range(turned.shape[2])]
            out = torch.cat([o for o, _ in parts], dim=2)
            lse = torch.cat([s for _, s in parts], dim=2)
        else:  # every stored token precedes every row: no new tokens, no causal cut
            empty = turned.new_empty(1, self._empty[0], 0, self._empty[1])
            out, lse = exact_attention(layer, turned, KVHandle(layer, layer.length, empty, empty), None, scale,
                                       softcap, need_lse=True)
        return out[0].transpose(0, 1), lse[0].transpose(0, 1)

    def attend_newest(self, q: torch.Tensor, scale: float, softcap: float | None, window: int | None,
                      need_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Causal attention of the newest tokens' queries q [1, Hq, Q, D] (the `extend` just made) over the
        history, through the layer's own attention (which then seals those tokens into chunks)."""
        handle, self._pending = self._pending, None
        return self.layer.attend(q, handle, None, scale, softcap, need_lse)
