"""One model layer of a Hogwild cache: the history, the arena of headers and current steps, and the
attention of every worker over its own view of them.

`update` writes a forward pass's new keys where `Rows` says (before attention runs, so worker B's query
already sees the token worker A wrote in the same pass); `attend` is what kvtier's registered attention
function calls with the handle `update` returned. Per query row: one block-kernel call over the arena (the
query turned once per block to its view distance) and one over the history, merged by log-sum-exp.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import CacheInputError
from ..handle import KVHandle
from ..kernels import HeldKeys, block_decode_attention, merge_partials
from ..model_spec import SLIDING, LayerSpec
from ..rope import Rope
from ..store.pools import allocation_errors, check_fits
from .history import History, TieredHistory
from .layout import Layout, Rows, Target


@dataclass(frozen=True, eq=False)
class Plan:
    """A forward pass's rows as device tensors, built once and read by every layer."""

    rows: Rows
    arena_starts: tuple[int, ...]  # the arena layout the keys go to
    arena_caps: tuple[int, ...]
    q_pos: torch.Tensor  # [R] int32
    view_pos: torch.Tensor  # [R] int32
    qrel: torch.Tensor  # [R, NB] int32
    slots: torch.Tensor  # [R] long (an index_copy_ index)
    block_start: torch.Tensor  # [NB] int32
    block_len: torch.Tensor  # [NB] int32, after this pass's writes
    arena_used: bool  # some arena block is non-empty
    _derived: dict = field(default_factory=dict, compare=False, repr=False)  # made once, read by every layer

    @classmethod
    def build(cls, rows: Rows, layout: Layout, device: torch.device) -> Plan:
        # Positions as the block kernel reads them (int32), so no layer converts them again; a view position
        # near 2**31 is far beyond any cache a device holds.
        def t(x, dtype=torch.int32):
            return torch.tensor(x, dtype=dtype, device=device)

        starts = layout.starts
        return cls(rows, tuple(starts), tuple(layout.caps), t(rows.q_pos), t(rows.view_pos),
                   t(rows.qrel).view(len(rows.q_pos), layout.blocks), t(rows.slots, torch.long), t(starts),
                   t(layout.lengths), any(layout.lengths))

    def held_keys(self, window: int | None) -> HeldKeys:
        """The arena's block bookkeeping for layers of this window (one per window, shared by those layers)."""
        key = ("held", window)
        if key not in self._derived:
            self._derived[key] = HeldKeys(self.q_pos, self.block_start, self.block_len, self.qrel, window)
        return self._derived[key]

    def view_turn(self, rope: Rope, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Factors turning each row's query from q_pos to its view position (`Rope.shift_by`), per RoPE."""
        key = ("turn", id(rope), width)
        hit = self._derived.get(key)
        if hit is None or hit[0] is not rope:
            hit = self._derived[key] = (rope, rope.shift_factors(self.view_pos - self.q_pos, width, self.q_pos.device))
        return hit[1]


class HogwildLayer:
    """Storage and attention of one decoder layer, for `HogwildCache`."""

    is_sliding = False

    def __init__(self, index: int, spec: LayerSpec, rope: Rope, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, history: TieredHistory | None = None):
        self.index = index
        self.window = spec.window if spec.kind == SLIDING else None
        self.rope = rope
        self.history = history if history is not None else History(rope, kv_heads, head_dim, dtype, device,
                                                                   self.window)
        self.k = torch.empty(kv_heads, 0, head_dim, dtype=dtype, device=device)  # arena: [Hkv, size, D]
        self.v = torch.empty_like(self.k)
        self._regions: tuple[tuple[int, ...], tuple[int, ...]] = ((), ())
        self._plan: Plan | None = None
        self._handle: KVHandle | None = None

    # ------------------------------------------------------------------------------------ writes
    def update(self, k: torch.Tensor, v: torch.Tensor, plan: Plan, past_len: int) -> KVHandle:
        """Store this pass's new k, v [B, Hkv, Q, D] (rotated at plan.q_pos) and return the handle attention reads."""
        self._plan = plan
        b, h, q, d = k.shape
        if plan.rows.target is Target.HISTORY:
            self.history.extend(k[0], v[0])
        else:
            self._fit_arena(plan)
            rows_k = k.permute(1, 0, 2, 3).reshape(h, b * q, d)  # row r = (b, i), as Rows orders them
            rows_v = v.permute(1, 0, 2, 3).reshape(h, b * q, d)
            self.k.index_copy_(1, plan.slots, rows_k)
            self.v.index_copy_(1, plan.slots, rows_v)
        self._handle = KVHandle(self, past_len, k, v)
        return self._handle

    def _fit_arena(self, plan: Plan) -> None:
        """Move the blocks into the arena layout of `plan` when it changed (a step outgrew its capacity, or
        new headers were set): each block's rows are copied to its new region."""
        regions = (plan.arena_starts, plan.arena_caps)
        if regions == self._regions:
            return
        h, _, d = self.k.shape
        size, what = sum(plan.arena_caps), f"layer {self.index}'s arena of current steps and headers"
        check_fits(self.k.device, 2 * h * d * self.k.element_size() * size, what, "lower step_capacity or workers")
        with allocation_errors(self.k.device, what):
            k = self.k.new_zeros(h, size, d)
            v = self.v.new_zeros(h, size, d)
        for (old, old_cap), (new, new_cap) in zip(zip(*self._regions), zip(*regions)):
            n = min(old_cap, new_cap)
            k[:, new : new + n] = self.k[:, old : old + n]
            v[:, new : new + n] = self.v[:, old : old + n]
        self.k, self.v, self._regions = k, v, regions

    def promote(self, block: int, length: int) -> None:
        """The first `length` tokens of arena block `block` (a finished step) join the history; the caller then
        counts the block as empty."""
        if length:
            start = self._regions[0][block]
            self.history.append_block(self.k[:, start : start + length], self.v[:, start : start + length])

    def reset(self) -> None:
        self.history.reset()
        self._plan = self._handle = None

    # ------------------------------------------------------------------------------------- reads
    def attend(self, q: torch.Tensor, handle: KVHandle, pad: torch.Tensor | None, scale: float,
               softcap: float | None, need_lse: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention of q [B, Hq, Q, D] (rotated at the plan's q_pos) over each row's view: out [B, Hq, Q, D] and
        lse [B, Hq, Q] float32 if need_lse, else out in q.dtype and None. Called by kvtier's attention function."""
        plan = self._plan
        if handle is not self._handle or plan is None:
            raise CacheInputError(f"layer {self.index}: attention got a handle from another forward pass")
        if pad is not None and not bool(pad.all()):
            raise CacheInputError("a HogwildCache takes no padding mask: every worker feeds one token per step")
        if plan.rows.target is Target.HISTORY:
            return self.history.attend_newest(q, scale, softcap, self.window, need_lse)
        b, hq, nq, d = q.shape
        rows = q.permute(0, 2, 1, 3).reshape(b * nq, hq, d)  # [R, Hq, D], row r = (b, i)
        out = lse = None
        if plan.arena_used:
            out, lse = block_decode_attention(rows, plan.q_pos, self.k, self.v, plan.block_start, plan.block_len,
                                              plan.qrel, self.rope.inv_freq, self.rope.interleaved, scale, softcap,
                                              self.window, held=plan.held_keys(self.window))
        if self.history.held:
            ho, hl = self.history.attend(rows, plan, scale, softcap, self.window)
            out, lse = (ho, hl) if out is None else merge_partials(out, lse, ho, hl)
        out = out.reshape(b, nq, hq, d).permute(0, 2, 1, 3)
        if not need_lse:
            return out.to(q.dtype), None
        return out, lse.reshape(b, nq, hq).permute(0, 2, 1)

    def view_kv(self, layout: Layout, worker: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The worker's view as one ordinary sequence: k, v [Hkv, total, D], every block's keys moved to their
        view positions (one rotation each). For checking and for baselines; attention never needs it.

        A sliding layer's history no longer holds the positions before `history.first` (no query to come can
        see them): their rows are zeros, so row i is still view position i."""
        hk, hv = self.history.kv()
        ks, vs = [hk], [hv]
        if self.history.first:
            gap = hk.new_zeros(hk.shape[0], self.history.first, hk.shape[2])
            ks, vs = [gap, hk], [gap, hv]
        vstart, starts = layout.view_starts(worker), self._regions[0]
        for b in layout.view_order(worker):
            n = layout.lengths[b]
            if not n:
                continue
            k = self.k[:, starts[b] : starts[b] + n]
            ks.append(self.rope.shift(k[None], vstart[b])[0])
            vs.append(self.v[:, starts[b] : starts[b] + n])
        return torch.cat(ks, dim=1), torch.cat(vs, dim=1)


class SlidingHogwildLayer(HogwildLayer):
    """A sliding-window layer: its window counts view positions."""

    is_sliding = True
