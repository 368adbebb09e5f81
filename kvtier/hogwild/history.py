"""The shared history: the prompt and every finished step, in the order they finished.

Its positions are absolute, 0..length-1 (the history opens every worker's view, so these are view positions
too). A finished step joins it by one re-rotation of its keys, done once (`append_block`), instead of a
re-rotation per view per step. The cache only ever calls `length`, `first`, `held`, `extend`, `append_block`,
`attend`, `attend_newest`, `kv` and `reset`, which two classes implement:

- `TieredHistory` (full-attention layers): a `TieredLayer` of a batch-1 `KVTierCache`, so the history spills
  to host and disk under that cache's budgets and is read exactly or sparsely like any kvtier layer.
- `History` (sliding-window layers, never tiered in kvtier): one block on the device, bounded by the window.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..attend import attend
from ..handle import KVHandle
from ..kernels import block_decode_attention
from ..layers import TieredLayer
from ..read import exact_attention, sparse_attention
from ..rope import Rope

if TYPE_CHECKING:
    from .layer import Plan


class History:
    """One layer's history block on the device: k, v [Hkv, capacity, D], the first `held` rows in use.

    Without a window it holds every position. With a sliding window W, a query at view position p sees keys
    in (p - W, p], and every query still to come sits at p >= length (the history opens every view), so only
    the last W - 1 positions can be attended again; the block keeps a tail of them and drops the rest::

        position   0 ....... first-1 | first ............. length-1 | length ...  (headers, steps: every
                   dropped           | held: rows 0 .. held-1,      |              query still to come)
                                     | keys rotated at 0 .. held-1  |

    Held keys are rotated block-local (row j at position j, as `block_decode_attention` wants): queries are
    turned to view_pos - first. Trimming re-rotates the kept keys once (by -drop, `Rope.shift`) and runs only
    when a write would take the block past 2 * (W - 1) keys; a trim leaves at most W - 1, so more than W - 1
    tokens join between two trims and pay for its at most W - 1 re-rotations (amortized O(1) per token).
    Between forward passes the block holds W - 1 to 2 * (W - 1) keys (fewer only while the history is
    shorter) in a buffer of at most 2 * (W - 1) rows; a prefill that does not fit holds itself plus W - 1
    keys until its queries have attended."""

    def __init__(self, rope: Rope, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                 window: int | None = None):
        if window is not None and window < 1:
            raise ValueError(f"window must be None or at least 1, got {window}")
        self.rope = rope
        self.window = window
        self.keep = None if window is None else window - 1  # positions before the next query it can still see
        self._k = torch.empty(kv_heads, 0, head_dim, dtype=dtype, device=device)
        self._v = torch.empty_like(self._k)
        self.length = 0  # history positions, absolute: views and positions are computed from it
        self.first = 0  # absolute position of the first held key (row 0); those before it were dropped

    @property
    def held(self) -> int:
        """Keys held on the device (the positions first .. length-1)."""
        return self.length - self.first

    @property
    def bound(self) -> int | None:
        """Most keys held between forward passes: 2 * (W - 1) with a window W, None without."""
        return None if self.keep is None else 2 * self.keep

    def kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Held keys, rotated at their absolute positions first..length-1, and values: [Hkv, held, D] (views of
        the block while nothing was dropped, else the keys are a turned copy). Checks and baselines only."""
        k, v = self._k[:, : self.held], self._v[:, : self.held]
        if self.first:
            k = self.rope.shift(k[None], self.first)[0]
        return k, v

    # ------------------------------------------------------------------------------------ writes
    def extend(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append k, v [Hkv, T, D] whose keys are rotated at absolute positions length .. length+T-1 (a prefill,
        whose queries attend next through `attend_newest`; they see back to length - (W - 1))."""
        if self._over(k.shape[1]):
            self._drop_before(self.length - self.keep)
        self._put(self.rope.shift(k[None], -self.first)[0] if self.first else k, v)

    def append_block(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append a block whose keys [Hkv, T, D] are rotated at block-local positions 0..T-1: one rotation by
        the block's offset in the history's held rows moves them to their place, without recomputing anything.
        No query attends, so what the next queries cannot see is dropped at once."""
        n = k.shape[1]
        if self._over(n):
            self._drop_before(min(self.length, self.length + n - self.keep))
        self._put(self.rope.shift(k[None], self.held)[0], v)
        if self._over(0):  # a block longer than the window
            self._drop_before(self.length - self.keep)

    def _over(self, n: int) -> bool:
        """Would n more keys take a windowed block past its bound?"""
        return self.keep is not None and self.held + n > 2 * self.keep

    def _put(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k, v [Hkv, T, D], keys already at block-local rows held .. held+T-1, after the held rows."""
        n, h = k.shape[1], self.held
        if h + n > self._k.shape[1]:
            self._grow(h + n)
        self._k[:, h : h + n] = k
        self._v[:, h : h + n] = v
        self.length += n

    def _grow(self, need: int) -> None:
        cap = max(2 * self._k.shape[1], 16)  # doubling: appending a step copies the history rarely
        if self.keep is not None:
            cap = min(cap, 2 * self.keep)  # a windowed block stays within its bound but for long writes
        h, _, d = self._k.shape
        k = self._k.new_empty(h, max(need, cap), d)
        v = torch.empty_like(k)
        k[:, : self.held] = self._k[:, : self.held]
        v[:, : self.held] = self._v[:, : self.held]
        self._k, self._v = k, v

    def _drop_before(self, pos: int) -> None:
        """Forget the keys before absolute position pos (no query to come sees them): the rest are re-rotated
        once, by -(pos - first), to their new block-local rows and moved to the front; a buffer that a long
        write grew past the bound shrinks back to it."""
        drop, h = pos - self.first, self.held
        if drop <= 0:
            return
        rest = h - drop
        k = self.rope.shift(self._k[None, :, drop:h], -drop)[0]  # [Hkv, rest, D], a new tensor
        v = self._v[:, drop:h].clone()  # the rows it moves to may overlap these
        cap = max(2 * self.keep, rest)
        if self._k.shape[1] > cap:
            self._k = self._k.new_empty(self._k.shape[0], cap, self._k.shape[2])
            self._v = torch.empty_like(self._k)
        self._k[:, :rest] = k
        self._v[:, :rest] = v
        self.first = pos

    def reset(self) -> None:
        self.length = self.first = 0

    # ------------------------------------------------------------------------------------- reads
    def attend(self, q: torch.Tensor, plan: Plan, scale: float, softcap: float | None = None,
               window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of query rows over the whole history (it precedes every query of a view).

        q: [R, Hq, D] rotated at plan.q_pos [R]; plan.view_pos [R]: each row's position in its view. The block
        kernel turns each row's query to view_pos - first, its position relative to the first held key, so q.k
        sees the true distances; a sliding window counts view positions. Returns out [R, Hq, D] and lse
        [R, Hq], float32."""
        h = self.held
        start = torch.zeros(1, dtype=torch.long, device=q.device)
        length = torch.full((1,), h, dtype=torch.long, device=q.device)
        return block_decode_attention(q, plan.q_pos, self._k[:, :h], self._v[:, :h], start, length,
                                      (plan.view_pos - self.first)[:, None], self.rope.inv_freq,
                                      self.rope.interleaved, scale, softcap, window)

    def attend_newest(self, q: torch.Tensor, scale: float, softcap: float | None, window: int | None,
                      need_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Causal attention of the newest Q tokens' queries q [1, Hq, Q, D] (rotated at their absolute positions)
        over the history, as `kvtier.attend.attend` returns it. The held keys sit at block-local rows, so the
        queries are turned by -first (q.k sees true distances) while the masks read absolute positions; then
        what no later query sees is dropped."""
        n, h = q.shape[2], self.held
        turned = self.rope.shift(q, -self.first) if self.first else q
        out = attend(turned, self._k[None, :, :h], self._v[None, :, :h], q_pos0=self.length - n, key_pos=self.first,
                     scale=scale, causal=True, window=window, softcap=softcap, need_lse=need_lse)
        if self._over(0):
            self._drop_before(self.length - self.keep)
        return out


class TieredHistory:
    """One full-attention layer's history as a kvtier `TieredLayer` (batch 1): its chunks live on the device,
    the host or disk under the owning `KVTierCache`'s budgets, and `mode="sparse"` reads only the selected
    pages of it at each step."""

    def __init__(self, rope: Rope, layer: TieredLayer, kv_heads: int, head_dim: int):
        self.rope = rope
        self.layer = layer
        self._empty = (kv_heads, head_dim)
        self._pending: KVHandle | None = None

    first = 0  # a full-attention history drops nothing

    @property
    def length(self) -> int:
        return self.layer.length

    @property
    def held(self) -> int:
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
    def attend(self, q: torch.Tensor, plan: Plan, scale: float, softcap: float | None = None,
               window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """As `History.attend`: rows q [R, Hq, D] rotated at plan.q_pos [R], turned to plan.view_pos [R] (their
        distance from the history's first key; the turn's factors made once per forward pass), over every
        history token (exact mode) or each row's selected pages (sparse mode, one selection per row). Returns
        out [R, Hq, D] and lse [R, Hq], float32."""
        if window is not None:
            raise ValueError("a tiered history serves full-attention layers only")
        turned = self.rope.shift_by(q.transpose(0, 1)[None], plan.view_turn(self.rope, q.shape[-1]))  # [1, Hq, R, D]
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
