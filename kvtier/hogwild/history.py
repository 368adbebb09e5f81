"""The shared history: the prompt and every finished step, in the order they finished.

Its keys are rotated at their absolute positions 0..length-1 (the history opens every worker's view, so
these are view positions too). A finished step joins it by one re-rotation of its keys, done once
(`append_block`), instead of a re-rotation per view per step. Kept behind this small class so that a tiered
layer (host and disk spill, sparse selection) can take its place: the cache only ever calls `length`,
`extend`, `append_block`, `attend`, `attend_newest`, `kv` and `reset`.
"""

from __future__ import annotations

import torch

from ..attend import attend
from ..kernels import block_decode_attention
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
