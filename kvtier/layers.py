"""Per-layer cache state: one small object per model layer, as in transformers' cache_utils.

`TieredLayer` (full attention) keeps a chunk table over the three tiers, the chunks' key abstracts, and
an unsealed recent window on the device. `SlidingLayer` keeps only the last W-1 tokens (plus a little
slack) on the device: a sliding-window layer never looks further back, so it is never tiered.

Logical positions of a tiered layer::

    0      sink        c1          c2               win_start           length
    |------|-----------|-----------|-- ... ---------|--- recent window ---|
     pinned  sealed chunks (device / host / disk)      device slots, unsealed

A decode token goes straight into the window. The tokens of a longer forward (a prefill) stay with the
handle until attention has run: only then, knowing how attention spread over them, does the layer cut
them into chunks (`commit`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from .attend import attend
from .config import KVTierConfig
from .errors import CacheInputError
from .guard import CLEAN_FAILURES
from .handle import KVHandle
from .kernels.ragged import ragged_layout, ragged_layout_np
from .model_spec import LayerSpec
from .read import exact_attention, pad_slice, sparse_attention
from .sparse.abstracts import AbstractTable, Row
from .sparse.plan import decode_granularity, plan_chunks
from .sparse.profile import LayerSkew, skew_stats, token_importance
from .store.chunk import Chunk, Tier

if TYPE_CHECKING:
    from .store.tiers import TierManager


@dataclass(frozen=True)
class SlotRuns:
    """The device chunks' slots as pieces, each a run of consecutive arena slots: chunk row c's pieces are rows
    first[c] .. first[c] + count[c] - 1 (count 0 off the device), in chunk order; each piece has its offset in
    the chunk, its first slot and its length. A chunk placed whole is one piece; one placed in the holes
    evictions left, a few."""

    first: torch.Tensor
    count: torch.Tensor
    offset: torch.Tensor
    slot: torch.Tensor
    length: torch.Tensor
    most: int  # most pieces of one chunk

    @staticmethod
    def of(flat: torch.Tensor, offsets: torch.Tensor, lengths: torch.Tensor) -> "SlotRuns":
        """From `TieredLayer.slot_table`'s flat slots and offsets and the chunk rows' lengths."""
        if flat.device.type == "cpu":
            return SlotRuns._of_np(flat.numpy(), offsets.numpy(), lengths.numpy())
        return SlotRuns._of_torch(flat, offsets, lengths)

    @staticmethod
    def _of_torch(flat: torch.Tensor, offsets: torch.Tensor, lengths: torch.Tensor) -> "SlotRuns":
        """`of` in torch operations on the tables' device (a GPU's: nothing is read back but the widest count)."""
        device = flat.device
        on = (offsets >= 0).nonzero().flatten()  # the device chunks, in the order `flat` lists them
        unit, within, _, _, _ = ragged_layout(lengths.take(on), 1)
        chunk = on.take(unit)  # chunk row of every entry of `flat`; `within`: its offset in the chunk
        total = flat.numel()
        starts = torch.ones(total, dtype=torch.bool, device=device)
        if total > 1:
            starts[1:] = (flat.diff() != 1) | (chunk.diff() != 0)
        at = starts.nonzero().flatten()
        length = torch.diff(at, append=torch.tensor([total], device=device))
        piece_chunk = chunk.take(at)
        count = torch.bincount(piece_chunk, minlength=offsets.numel())
        most = int(count.max()) if count.numel() else 0
        return SlotRuns(count.cumsum(0) - count, count, within.take(at), flat.take(at), length, max(1, most))

    @staticmethod
    def _of_np(flat: np.ndarray, offsets: np.ndarray, lengths: np.ndarray) -> "SlotRuns":
        """`of` in numpy, for CPU tables: the same dozen operations on a few thousand entries cost a tenth of
        torch's (rebuilt at every tiered step that moves chunks)."""
        on = np.flatnonzero(offsets >= 0)
        unit, within, _, _, _ = ragged_layout_np(lengths[on], 1)
        chunk = on[unit]
        total = flat.size
        starts = np.ones(total, dtype=bool)
        if total > 1:
            starts[1:] = (np.diff(flat) != 1) | (np.diff(chunk) != 0)
        at = np.flatnonzero(starts)
        length = np.diff(at, append=total)
        count = np.bincount(chunk[at], minlength=offsets.size)
        most = int(count.max()) if count.size else 0
        return SlotRuns(*(torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))
                          for a in (np.cumsum(count) - count, count, within[at], flat[at], length)), max(1, most))


@dataclass
class SpanCut:
    """A planned span removal of one tiered layer (`TieredLayer.plan_span`): chunks [a, b) of the layer meet the span, and `pieces`
    (stored already, with their abstract `rows`) are the kept parts of the ones an edge of it cuts."""

    start: int
    end: int
    a: int
    b: int
    pieces: list[Chunk]
    rows: list[Row]


class TieredLayer:
    """A full-attention layer whose sealed chunks live in the device pool, the host pool or on disk."""

    is_sliding = False

    def __init__(self, index: int, spec: LayerSpec, config: KVTierConfig, tiers: "TierManager"):
        self.index = index
        self.spec = spec
        self.config = config
        self.tiers = tiers
        self.pool = tiers.device_pools[index]
        self.abstracts = AbstractTable(tiers.device, config.page_size)
        self.chunks: list[Chunk] = []
        self.length = 0  # tokens stored (sealed or in the window)
        self.win_slots = torch.empty(0, dtype=torch.long)
        self.batch: int | None = None
        self.pending: KVHandle | None = None  # a prefill's tokens, until attention has run
        self.decode_chunk = config.chunk_size  # granularity for tokens produced while decoding
        self.skew: LayerSkew | None = None
        self.last_union: list[Chunk] = []  # chunks the last sparse step attended to (prefetch hint)
        self.steps_since_refine = 0
        self.refines = 0  # refinements done (a failed pass's rollback checks whether one ran inside it)
        self._slot_table: tuple[int, torch.Tensor, torch.Tensor] | None = None
        self._slot_runs: SlotRuns | None = None
        self._run_first: torch.Tensor | None = None
        self._forced: tuple[tuple[int, int, int], torch.Tensor, int] | None = None

    @property
    def win_slots(self) -> torch.Tensor:
        """The recent window's device slots, oldest first ([W] long, CPU)."""
        if self._win_added:  # decode tokens' slots, joined to the tensor once someone reads it
            self._win_slots = torch.cat([self._win_slots, torch.tensor(self._win_added, dtype=torch.long)])
            self._win_added = []
        return self._win_slots

    @win_slots.setter
    def win_slots(self, slots: torch.Tensor) -> None:
        self._win_slots = slots
        self._win_added: list[int] = []  # slots of decode tokens appended since (plain ints: no tensor per token)
        self._win_tail = None  # read from the slots when next needed

    @property
    def win_len(self) -> int:
        """Tokens in the recent window (without joining the decode tokens' slots into a tensor)."""
        return self._win_slots.numel() + len(self._win_added)

    def _window_tail(self) -> int | None:
        """The window's newest slot (None: an empty window), kept as an int so a decode step reads no tensor."""
        if self._win_tail is None and self.win_len:
            self._win_tail = int(self.win_slots[-1])
        return self._win_tail

    @property
    def wholly_on_device(self) -> bool:
        """Every token the layer holds sits in its device arena: no chunk to look for on the host or disk."""
        return self.pool.used == self.length

    @property
    def win_start(self) -> int:
        return self.length - self.win_len

    @property
    def logical_length(self) -> int:
        return self.length + (self.pending.q_len if self.pending is not None else 0)

    # ------------------------------------------------------------------------------------ writes
    def update(self, k: torch.Tensor, v: torch.Tensor) -> KVHandle:
        """Take the new tokens (k, v: [B, Hkv, Q, D]); return the handle attention reads."""
        self.tiers.wait_uploads(self.index)  # side-stream copies into this pool must land before we touch it
        self.commit_pending()
        b, h, q, d = k.shape
        self.pool.init_shape(b, h, d)
        self.batch = b
        past = self.length
        if q > 1:
            self.pool.reserve(self.pool.used + q)  # grow once for the whole forward, not chunk by chunk
            self.pending = KVHandle(self, past, k, v)
            return self.pending
        tail = self._window_tail()  # the window, one run of slots where it can
        slot = None if tail is None else self.pool.allocate_after(tail)
        if slot is not None:  # the usual decode token: plain ints, no slot list to build and read back
            self.pool.write_token(slot, k, v, past)
            self._win_added.append(slot)
        else:
            slots = self.tiers.allocate_device(self.index, 1, after=tail)
            if slots is None:  # the config check makes this unreachable; keep the invariant loud
                raise RuntimeError(f"layer {self.index}: no device room for the recent window")
            self.pool.write(slots, k, v, torch.full((1,), past, dtype=torch.long, device=self.pool.device))
            self.win_slots = torch.cat([self.win_slots, slots])
            slot = int(slots[-1])
        self._win_tail = slot
        self.length = past + 1
        self._seal_window()
        return KVHandle(self, past, k, v, new_in_window=True)

    def commit_pending(self) -> None:
        """Store a prefill's tokens with fixed-size chunks if attention never ran for them."""
        if self.pending is not None:
            self.commit(self.pending)

    def commit(self, handle: KVHandle, importance: torch.Tensor | None = None) -> None:
        """Cut the window and this forward's tokens into chunks (sized by `importance` [Q] when given) and
        keep the newest `recent_window` tokens unsealed on the device."""
        if self.pending is not handle:
            return
        self.pending = None
        k, v, past, q = handle.k_new, handle.v_new, handle.past_len, handle.q_len
        win_len = self.win_slots.numel()
        start = self.win_start
        sizes = self._plan(win_len, q, importance)
        mean_imp, imps = None, None
        if importance is not None:
            region = torch.cat([importance.new_full((win_len,), float(importance.mean())), importance])
            mean_imp = float(region.mean())
            if mean_imp > 0 and sizes:  # every chunk's mean read back at once, not one wait per chunk
                bounds = [0, *itertools.accumulate(sizes)]
                imps = torch.stack([region[a:z].mean() for a, z in zip(bounds, bounds[1:])]).tolist()
        win_cut = 0  # window tokens consumed by seals
        pos = start
        window = self.win_slots
        try:
            for i, size in enumerate(sizes):
                in_window = max(0, min(size, past - pos))
                if in_window == 0 and i + 1 < len(sizes) and self._seal_new_run(
                        pos, sizes[i:], k, v, pos - past, None if imps is None else [x / mean_imp for x in imps[i:]]):
                    pos += sum(sizes[i:])
                    break
                chunk = self._new_chunk(pos, size, b=k.shape[0])
                if imps is not None:
                    chunk.importance = imps[i] / mean_imp
                if in_window == size:
                    slots = window[win_cut:win_cut + size]
                    self.tiers.adopt_device(chunk, slots)
                    self._add_abstract(chunk, self.pool.read(slots)[0])
                else:
                    slots = window[win_cut:win_cut + in_window]
                    lo, hi = pos + in_window - past, pos + size - past
                    if in_window:
                        wk, wv = self.pool.read(slots)
                        ck, cv = torch.cat([wk, k[:, :, lo:hi]], dim=2), torch.cat([wv, v[:, :, lo:hi]], dim=2)
                    else:
                        ck, cv = k[:, :, lo:hi], v[:, :, lo:hi]
                    self._place_new(chunk, ck, cv)
                    self.pool.release(slots)  # the window's copy, once the chunk holds its own
                win_cut += in_window
                pos += size
            sealed_new = pos - start - win_cut
            kept = window[win_cut:]
            n_tail = q - sealed_new
            if n_tail:
                slots = self.tiers.allocate_device(self.index, n_tail)
                if slots is None:
                    raise RuntimeError(f"layer {self.index}: no device room for the recent window")
                self.pool.write(slots, k[:, :, sealed_new:], v[:, :, sealed_new:],
                                torch.arange(past + sealed_new, past + q, device=self.pool.device))
                kept = torch.cat([kept.to(slots.device), slots])
        except CLEAN_FAILURES:
            # A full store or no memory for the chunk at `pos`: keep what is whole, the chunks before `pos` and the
            # window tokens not sealed yet; the tokens of this forward past them are not held (a rollback of the
            # failed pass, or `crop`, takes the layer back to where it was).
            self.win_slots = window[win_cut:]
            self.length = max(past, pos)
            raise
        self.win_slots = kept
        self.length = past + q

    def _seal_new_run(self, start: int, sizes: list[int], k: torch.Tensor, v: torch.Tensor, lo: int,
                      importances: list[float] | None) -> bool:
        """Seal consecutive chunks made only of this forward's tokens (k, v from index `lo`) on the device in
        one write and one abstract update, when the device holds them all without evicting. False, with
        nothing changed, otherwise: the caller seals them one by one (evicting, or to the host and disk)."""
        n = sum(sizes)
        if not self.tiers.device_has_room(self.index, n):
            return False
        rows, at, chunks = len(self.chunks), start, []
        for j, size in enumerate(sizes):
            chunk = Chunk(self.index, self.tiers.new_chunk_id(), at, size, Tier.DEVICE, k.shape[0],
                          pinned=self._needs_sink() and at == 0, last_used=self.tiers.clock, row=rows + j)
            if importances is not None:
                chunk.importance = importances[j]
            chunks.append(chunk)
            at += size
        ck, cv = k[:, :, lo:lo + n], v[:, :, lo:lo + n]
        if not self.tiers.place_on_device(chunks, ck, cv):
            return False
        try:
            self.abstracts.add_run(ck, start, sizes)
        except BaseException:
            self.tiers.free(chunks)
            raise
        self.chunks.extend(chunks)
        return True

    def _place_new(self, chunk: Chunk, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store a chunk `_new_chunk` just appended; if no tier takes it, the chunk is forgotten again."""
        try:
            self.tiers.place(chunk, k, v)
        except CLEAN_FAILURES:
            self.chunks.pop()
            raise
        self._add_abstract(chunk, k)

    def _plan(self, win_len: int, q: int, importance: torch.Tensor | None) -> list[int]:
        """Chunk sizes for the window + new tokens, leaving exactly `recent_window` unsealed."""
        total = win_len + q - self.config.recent_window
        sizes: list[int] = []
        if total <= 0:
            return sizes
        if self._needs_sink():
            if total < self.config.sink_tokens:
                return sizes
            sizes.append(self.config.sink_tokens)
            total -= self.config.sink_tokens
        if importance is None or not self.config.adaptive:
            return sizes + plan_chunks(None, total, self.config.chunk_size, 1, self.config.chunk_size)
        lead = sizes[0] if sizes else 0
        region = torch.cat([importance.new_full((win_len,), float(importance.mean())), importance])[lead:lead + total]
        planned = plan_chunks(region, total, self.config.chunk_size, self.config.min_chunk_size,
                              self.config.max_chunk_size)
        self.decode_chunk = decode_granularity(planned, self.config.min_chunk_size, self.config.chunk_size)
        return sizes + planned

    def _needs_sink(self) -> bool:
        return not self.chunks and self.config.sink_tokens > 0 and self.win_start == 0

    def _seal_window(self) -> None:
        """Decode: seal the oldest window tokens at this layer's granularity once the window is full."""
        while True:
            size = self.config.sink_tokens if self._needs_sink() else self.decode_chunk
            if self.win_len < size + self.config.recent_window:
                return
            chunk = self._new_chunk(self.win_start, size, b=self.batch)
            slots = self.win_slots[:size]
            self.tiers.adopt_device(chunk, slots)
            self._add_abstract(chunk, self.pool.read(slots)[0])
            self.win_slots = self.win_slots[size:]

    def _new_chunk(self, start: int, size: int, b: int) -> Chunk:
        chunk = Chunk(self.index, self.tiers.new_chunk_id(), start, size, Tier.DEVICE, b,
                      pinned=self._needs_sink() and start == 0, last_used=self.tiers.clock, row=len(self.chunks))
        self.chunks.append(chunk)
        return chunk

    def _add_abstract(self, chunk: Chunk, k: torch.Tensor) -> None:
        self.abstracts.add(k, chunk.start)

    # ------------------------------------------------------------------------------------- reads
    def slot_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The device chunks' slots end to end (flat [T]) and where each chunk row's run starts in it
        (offsets [C], -1 off the device). Rebuilt only after slots change hands, so a sparse step finds its
        chunks' slots without looking at the rest of the arena."""
        version = self.pool.version
        if self._slot_table is None or self._slot_table[0] != version:
            offsets = [-1] * len(self.chunks)
            runs, at = [], 0
            for chunk in sorted(self.tiers.device_chunks(self.index), key=lambda c: c.row):  # the device's, by row
                offsets[chunk.row] = at
                runs.append(chunk.slots)
                at += chunk.length
            device = self.pool.device
            flat = torch.cat(runs).to(device) if runs else torch.zeros(0, dtype=torch.long, device=device)
            self._slot_table = (version, flat, torch.tensor(offsets, dtype=torch.long, device=device))
            self._slot_runs = self._run_first = None
        return self._slot_table[1], self._slot_table[2]

    def run_first(self) -> torch.Tensor:
        """Each chunk row's first slot where its slots are one run of consecutive slots, else -1 ([C] int64):
        the C library reads such a chunk's units without looking at its slot list (at 32k tokens, reading the
        lists' scattered rows cost it 3% of a sparse step). Rebuilt with `slot_table`."""
        flat, offsets = self.slot_table()
        if self._run_first is None:
            if flat.device.type == "cpu" and flat.numel():
                f, o, n = flat.numpy(), offsets.numpy(), self.abstracts.view()[2].numpy()
                breaks = np.concatenate(([0], np.cumsum(f[1:] != f[:-1] + 1)))  # breaks before each entry
                on = (o >= 0) & (n > 0)
                first, last = np.where(on, o, 0), np.where(on, o + n - 1, 0)
                self._run_first = torch.from_numpy(np.where(on & (breaks[last] == breaks[first]), f[first], -1))
            else:  # no chunk in the arena, or an arena off the CPU (where the C library does not read it)
                self._run_first = torch.full_like(offsets, -1)
        return self._run_first

    def slot_runs(self) -> SlotRuns:
        """The device chunks' slots as runs of consecutive slots (`SlotRuns`), rebuilt with `slot_table`."""
        flat, offsets = self.slot_table()
        if self._slot_runs is None:
            self._slot_runs = SlotRuns.of(flat, offsets, self.abstracts.view()[2])
        return self._slot_runs

    def forced_chunks(self) -> tuple[torch.Tensor, int]:
        """Which chunk rows every sparse step attends to (the sinks), [C] bool on the abstracts' device, and
        their tokens. Rebuilt only after the chunk rows change, not at every step of every layer."""
        version = self.abstracts.version
        if self._forced is None or self._forced[0] != version:
            pinned = [c.pinned for c in self.chunks]
            tokens = sum(c.length for c in self.chunks if c.pinned)
            self._forced = (version, torch.tensor(pinned, dtype=torch.bool, device=self.abstracts.device), tokens)
        return self._forced[1], self._forced[2]

    def attend(self, q: torch.Tensor, handle: KVHandle, pad: torch.Tensor | None, scale: float,
               softcap: float | None, need_lse: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention of q [B, Hq, Q, D] for this forward: out [B, Hq, Q, D] and lse [B, Hq, Q], both float32,
        if need_lse; else out in q.dtype and None."""
        self.tiers.wait_uploads(self.index)
        if self.config.mode == "sparse" and handle.q_len == 1 and handle.new_in_window and self.chunks:
            out, lse = sparse_attention(self, q, handle, pad, scale, softcap, need_lse)
            self._maybe_refine()
        else:
            out, lse = exact_attention(self, q, handle, pad, scale, softcap, need_lse)
        if self.pending is handle:
            importance = None
            if self.config.adaptive and handle.q_len >= self.config.observation_window:
                importance = self._profile(q, handle, pad, scale, softcap)
            self.commit(handle, importance)
        return out, lse

    def _profile(self, q, handle: KVHandle, pad, scale, softcap) -> torch.Tensor:
        """Per-token importance of this forward's tokens, from its last `observation_window` queries."""
        w = self.config.observation_window
        past, n = handle.past_len, handle.q_len
        valid = pad_slice(pad, past, past + n)
        imp = token_importance(q[:, :, -w:], handle.k_new, past + n - w, past, scale, softcap, valid)
        skew = skew_stats(imp)
        if self.skew is None or skew.tokens >= self.skew.tokens:
            self.skew = skew
        return imp.mean(dim=(0, 1))  # chunks are shared by the batch rows and heads

    # ------------------------------------------------------------------------------ refinement
    def _maybe_refine(self) -> None:
        if not self.config.refine:
            return
        self.steps_since_refine += 1
        if self.steps_since_refine >= self.config.refine_every:
            self.refine()

    def refine(self) -> None:
        """Split device/host chunks selected at nearly every step, merge neighbours never selected.

        Only resident chunks are touched (no disk reads); sinks are never changed."""
        steps = max(1, self.steps_since_refine)
        lo_cap, hi_cap = self.config.min_chunk_size, self.config.max_chunk_size
        out: list[list[Chunk]] = []  # groups of old chunks that become one or two new chunks
        i = 0
        changed = False
        while i < len(self.chunks):
            c = self.chunks[i]
            resident = c.tier != Tier.DISK and not c.pinned
            if resident and c.selected >= 0.9 * steps and c.length >= 2 * lo_cap:
                out.append([c, None])  # split marker
                changed = True
                i += 1
                continue
            if resident and c.selected == 0 and i + 1 < len(self.chunks):
                n = self.chunks[i + 1]
                if n.tier != Tier.DISK and not n.pinned and n.selected == 0 and c.length + n.length <= hi_cap:
                    out.append([c, n])
                    changed = True
                    i += 2
                    continue
            out.append([c])
            i += 1
        if changed:
            self._rebuild(out)  # a full store here leaves the layer and its counts as they were
        for c in self.chunks:
            c.selected = 0
        self.steps_since_refine = 0
        self.refines += 1

    def _rebuild(self, groups: list[list[Chunk | None]]) -> None:
        new_chunks: list[Chunk] = []
        rows: list[Row] = []
        to_place: list[tuple[Chunk, torch.Tensor, torch.Tensor]] = []
        replaced: list[Chunk] = []
        for group in groups:
            if len(group) == 1:
                c = group[0]
                rows.append(self.abstracts.row(c.row))
                new_chunks.append(c)
                continue
            old = [c for c in group if c is not None]
            ks, vs = zip(*(self.tiers.fetch(c) for c in old))
            k, v = torch.cat(ks, dim=2), torch.cat(vs, dim=2)
            replaced += old
            cuts = [0, k.shape[2] // 2, k.shape[2]] if group[1] is None else [0, k.shape[2]]
            for lo, hi in zip(cuts, cuts[1:]):
                chunk = Chunk(self.index, self.tiers.new_chunk_id(), old[0].start + lo, hi - lo, Tier.DEVICE,
                              k.shape[0], last_used=self.tiers.clock, importance=old[0].importance)
                rows.append(self.abstracts.summarize(k[:, :, lo:hi], chunk.start))
                new_chunks.append(chunk)
                to_place.append((chunk, k[:, :, lo:hi], v[:, :, lo:hi]))
        # The new chunks are stored before the old ones are freed: a full store on the way (no tier for one of
        # them) leaves the layer as it was, the refinement undone, rather than holding chunks with no data.
        placed: list[Chunk] = []
        try:
            for chunk, k, v in to_place:
                self.tiers.place(chunk, k, v)
                placed.append(chunk)
        except CLEAN_FAILURES:
            self.tiers.free(placed)
            raise
        self.tiers.free(replaced)
        self.chunks = new_chunks
        for row, chunk in enumerate(self.chunks):
            chunk.row = row
            if chunk.tier == Tier.DEVICE and chunk.slots is not None:
                self.pool.set_owner(chunk.slots, row)
        self.abstracts.rebuild(rows)

    # ------------------------------------------------------------------------------- maintenance
    def select_rows(self, index: torch.Tensor) -> None:
        self.commit_pending()
        self.tiers.select_rows(self.index, self.chunks, index)
        self.abstracts.select_rows(index)
        self.batch = index.numel()

    def checkpoint(self) -> tuple:
        """What `rollback` takes this layer back to: the tokens it holds now, its batch (a pass may spread one
        row over many, or give a fresh layer its arena's shape), the chunking it learnt so far, and what the
        next refinement counts (steps, and the chunks a sparse step selected: `last_union` is replaced, never
        changed in place, by the step that counts them)."""
        return (self.logical_length, self.batch, self.decode_chunk, self.skew, self.steps_since_refine,
                self.refines, self.last_union)

    def rollback(self, mark: tuple) -> None:
        """Back to `checkpoint()`'s state after a forward pass that failed (see KVTierCache.forward_ends).

        A sparse step of the failed pass counted its chunks as selected: uncounted, so refinement comes when and
        as it would have without the pass. A refinement that completed inside the pass stays (its chunks hold
        the same tokens; it would have come at the end of the same step)."""
        length, batch, decode_chunk, skew, steps, refines, union = mark
        if self.refines == refines:
            if self.last_union is not union:
                for chunk in self.last_union:
                    chunk.selected -= 1
            self.steps_since_refine = steps
        self.last_union = union
        self.truncate(length)
        self._prune_hint()
        if batch is None:  # never written before the pass: the next one may bring another batch size
            expected = self.pool.expected  # a `reserve` made before the pass still holds
            self.reset()
            self.pool.expected = expected
        elif batch != self.batch:  # the pass spread the one row it found over its batch: keep one copy again
            if batch != 1:  # transformers only ever spreads one row; anything else is not ours to guess
                raise RuntimeError(f"layer {self.index}: a failed pass changed the batch from {batch} to {self.batch}")
            self.select_rows(torch.zeros(1, dtype=torch.long))
        self.decode_chunk, self.skew = decode_chunk, skew

    def truncate(self, length: int) -> None:
        """Forget every token at position >= length."""
        if self.pending is not None and length <= self.pending.past_len:
            self.pending = None  # a forward's tokens attention never ran for: nothing of them is stored yet
        self.commit_pending()
        if length >= self.length:
            return
        if length >= self.win_start:
            keep = length - self.win_start
            self.pool.release(self.win_slots[keep:])
            self.win_slots = self.win_slots[:keep]
            self.length = length
            self._refill_window()
            self._prune_hint()
            return
        self.pool.release(self.win_slots)
        self.win_slots = self.win_slots[:0]
        doomed = [c for c in self.chunks if c.end > length]
        self.chunks = [c for c in self.chunks if c.end <= length]
        self.abstracts.truncate(len(self.chunks))
        straddle = next((c for c in doomed if c.start < length), None)
        kept_k = kept_v = None
        if straddle is not None:
            k, v = self.tiers.fetch(straddle)
            kept_k, kept_v = k[:, :, : length - straddle.start].clone(), v[:, :, : length - straddle.start].clone()
        self.tiers.free(doomed)
        self.length = self.chunks[-1].end if self.chunks else 0
        if kept_k is not None:
            fits = kept_k.shape[2] <= self._longest_window
            slots = self.tiers.allocate_device(self.index, kept_k.shape[2]) if fits else None
            if slots is None:  # more than a window holds (an adaptive chunk) or the device has room for: sealed again
                self._place_new(self._new_chunk(self.length, kept_k.shape[2], b=kept_k.shape[0]), kept_k, kept_v)
            else:
                self.pool.write(slots, kept_k, kept_v, torch.arange(self.length, length, device=self.pool.device))
                self.win_slots = slots
        self.length = length
        self._refill_window()
        self._prune_hint()

    def _prune_hint(self) -> None:
        """Keep only chunks the layer still holds in the prefetch hint (a crop frees or unseals some of them:
        their records would be read ahead for nothing, or after they were removed)."""
        held = {id(c) for c in self.chunks}
        self.last_union = [c for c in self.last_union if id(c) in held]

    def plan_span(self, start: int, end: int) -> "SpanCut | None":
        """The first half of removing positions [start, end) from this layer (`KVTierCache.remove_span`: every
        later token moves left by `end - start`, so positions and device slots are reused; the layer's RoPE must
        be in `tiers.ropes`): what can fail (a damaged record, a full store), changing nothing the layer holds.
        The chunks an edge of the span cuts (at most two) are read, and their kept parts turned and stored as new
        chunks not in the layer yet. `apply_span` takes them in; `drop_span` frees them."""
        self.commit_pending()
        d = end - start
        if d <= 0:
            return None
        self.tiers.wait_uploads(self.index)
        rope = self.tiers.ropes[self.index]
        chunks = self.chunks
        a = next((i for i, c in enumerate(chunks) if c.end > start), len(chunks))
        b = next((i for i in range(a, len(chunks)) if chunks[i].start >= end), len(chunks))
        cut = SpanCut(start, end, a, b, [], [])
        try:
            for c in chunks[a:b]:
                if start <= c.start and c.end <= end:
                    continue
                k, v = self.tiers.fetch(c)
                for lo, hi, at, delta in ((0, start - c.start, c.start, 0), (end - c.start, c.length, start, -d)):
                    if hi <= lo:
                        continue
                    pk = rope.shift(k[:, :, lo:hi], delta) if delta else k[:, :, lo:hi].clone()
                    piece = Chunk(self.index, self.tiers.new_chunk_id(), at, hi - lo, Tier.DEVICE, k.shape[0],
                                  pinned=c.pinned, last_used=self.tiers.clock, importance=c.importance)
                    self.tiers.place(piece, pk, v[:, :, lo:hi].clone())
                    cut.pieces.append(piece)
                    cut.rows.append(self.abstracts.summarize(pk, at))
        except BaseException:
            self.drop_span(cut)
            raise
        return cut

    def drop_span(self, cut: "SpanCut | None") -> None:
        """Undo a `plan_span` that will not be applied: its new chunks are freed."""
        if cut is not None:
            self.tiers.free(cut.pieces)

    def apply_span(self, cut: "SpanCut") -> None:
        """The second half, once `plan_span` stored the cut chunks' kept parts. Chunks inside the span are freed
        wherever they live. The chunks after it move as one block, whatever their number: their device keys in
        one turn, disk records not at all (`TierManager.move`), their abstracts by one interval-bound turn
        (`AbstractTable.move`), made exact again for the ones on the device (`AbstractTable.refresh`). It reads
        the disk only to refill the recent window after a removal that reached it."""
        start, end, a, b = cut.start, cut.end, cut.a, cut.b
        d = end - start
        rope = self.tiers.ropes[self.index]
        chunks = self.chunks
        self.tiers.free(chunks[a:b])
        moved = chunks[b:]
        self.chunks = chunks[:a] + cut.pieces + moved
        for row in range(a, len(self.chunks)):
            self.chunks[row].row = row
        self.abstracts.splice(a, b, cut.rows)
        self.abstracts.move(a + len(cut.pieces), -d, rope)
        self._remove_from_window(start, end, rope)
        on_device, keys = self.tiers.move(moved, -d)
        if on_device:
            self.abstracts.refresh(torch.tensor([c.row for c in on_device]), keys)
        # The parts stored on the device while the cut chunks still held their slots sit above them: rewritten
        # into the lowest free slots (and named by their rows), so the arena stays dense.
        self.tiers.move([p for p in cut.pieces if p.tier == Tier.DEVICE], 0)
        self.pool.version += 1  # chunk rows changed: tables over the slots rebuild
        self.length -= d
        self.last_union = []
        self._refill_window()

    def _remove_from_window(self, start: int, end: int, rope) -> None:
        """The recent window's part of `remove_span`: slots in the span are freed, the later tokens turned and
        written into the lowest free slots (as `TierManager.move` does, to keep the arena dense)."""
        slots = self.win_slots
        if not slots.numel():
            return
        pos = torch.arange(self.win_start, self.length, device=slots.device)
        gone, moved = (pos >= start) & (pos < end), pos >= end
        if gone.any():
            self.pool.release(slots[gone])
        kept = slots[~gone & ~moved]
        if moved.any():
            k, v = self.pool.read(slots[moved])
            self.pool.release(slots[moved])
            new = self.pool.allocate(int(moved.sum()))
            self.pool.write(new, rope.shift(k, start - end), v, (pos[moved] - (end - start)).to(self.pool.device))
            kept = torch.cat([kept.to(new.device), new])
        self.win_slots = kept

    @property
    def _longest_window(self) -> int:
        """The most tokens a crop may leave in the window: what a decode step leaves at most (the device budget's
        minimum counts on it), so the next token still finds room. An adaptive chunk longer than chunk_size cut
        or unsealed by a crop would leave none at the smallest budgets."""
        return self.config.recent_window + self.config.chunk_size - 1

    def _refill_window(self) -> None:
        """After a crop, unseal trailing chunks until the window again holds `recent_window` tokens, so a
        cropped cache attends like a fresh one (the window is always attended in sparse mode)."""
        while self.win_slots.numel() < self.config.recent_window and self.chunks and not self.chunks[-1].pinned:
            chunk = self.chunks[-1]
            if self.win_slots.numel() + chunk.length > self._longest_window:  # an adaptive chunk: it stays sealed
                return
            k, v = self.tiers.fetch(chunk)
            k, v = k.clone(), v.clone()
            if chunk.tier == Tier.DEVICE:
                self.tiers.free([chunk])  # its slots are free for the window again: nothing is evicted
                slots = self.tiers.allocate_device(self.index, chunk.length)
            else:  # room first: evicting may meet a full store, which leaves the chunk where it is
                slots = self.tiers.allocate_device(self.index, chunk.length)
                if slots is None:  # more than the device holds beside the sinks and window: it stays sealed
                    return
                self.tiers.free([chunk])
            self.chunks.pop()
            self.abstracts.truncate(len(self.chunks))
            self.pool.write(slots, k, v, torch.arange(chunk.start, chunk.end, device=self.pool.device))
            self.win_slots = torch.cat([slots, self.win_slots.to(slots.device)])

    def reset(self) -> None:
        self.pending = None
        self.tiers.free(self.chunks)
        self.pool.clear()  # empty now; the next forward may bring another batch size
        self.chunks = []
        self.abstracts.clear()
        self.win_slots = torch.empty(0, dtype=torch.long)
        self.length = 0
        self.batch = None
        self.last_union = []
        self.decode_chunk = self.config.chunk_size
        self.skew = None


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

    @property
    def logical_length(self) -> int:
        return self.length

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

    def attend(self, q, handle: KVHandle, pad, scale: float, softcap: float | None,
               need_lse: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As `TieredLayer.attend`, over the window's keys (the ones kept plus this forward's)."""
        ck, cv, first = handle.context
        valid = pad_slice(pad, first, first + ck.shape[2])
        return attend(q, ck, cv, q_pos0=handle.past_len, key_pos=first, scale=scale, key_valid=valid,
                      causal=True, window=self.window, softcap=softcap, need_lse=need_lse)

    def select_rows(self, index: torch.Tensor) -> None:
        if self.k is not None:
            index = index.to(self.k.device)
            self.k, self.v = self.k.index_select(0, index), self.v.index_select(0, index)
        self.batch = index.numel()

    def span_problem(self, start: int, end: int) -> str | None:
        """Why `remove_span(start, end)` could not be exact here (None: it can): the tokens that the window
        would reach back to after the move must still be held."""
        held = 0 if self.k is None else self.k.shape[2]
        first = self.length - held
        lost = max(0, min(end, self.length) - max(start, first))
        after = self.length - (end - start)
        if held - lost < min(after, self.window - 1):
            return (f"sliding-window layer {self.index} keeps only its last {held} tokens; after removing positions "
                    f"{start}-{end} its window would reach tokens it no longer holds (raise recent_window to keep "
                    f"{self.window - 1 - (held - lost)} more)")
        return None

    def remove_span(self, start: int, end: int, rope) -> None:
        """Forget positions [start, end) and turn the later held keys left (`span_problem` must be None)."""
        d = end - start
        if d <= 0 or self.k is None:
            self.length -= max(0, d)
            return
        first = self.length - self.k.shape[2]
        pos = torch.arange(first, self.length, device=self.k.device)
        keep = (pos < start) | (pos >= end)
        moved = pos[keep] >= end
        k, v = self.k[:, :, keep], self.v[:, :, keep]
        if moved.any():
            k = torch.cat([k[:, :, ~moved], rope.shift(k[:, :, moved], -d)], dim=2)
        self.k, self.v = k, v
        self.length -= d

    def checkpoint(self) -> tuple:
        """What `rollback` takes this layer back to: its tensors are replaced, never written in place."""
        return self.k, self.v, self.length, self.batch

    def rollback(self, mark: tuple) -> None:
        self.k, self.v, self.length, self.batch = mark

    def crop_problem(self, length: int) -> str | None:
        """Why cropping to `length` tokens could not be exact here (None: it can): the window of the next token
        must reach only tokens still held."""
        drop = self.length - length
        held = 0 if self.k is None else self.k.shape[2]
        if drop > 0 and held - drop < min(length, self.window - 1):
            return (f"cannot crop sliding-window layer {self.index} back by {drop} tokens: it keeps only the last "
                    f"{self.window - 1 + self.slack} tokens (window - 1 + recent_window); raise recent_window to crop "
                    "further back")
        return None

    def truncate(self, length: int) -> None:
        drop = self.length - length
        if drop <= 0:
            return
        problem = self.crop_problem(length)
        if problem is not None:
            raise CacheInputError(problem)
        held = self.k.shape[2]
        self.k, self.v = self.k[:, :, : held - drop], self.v[:, :, : held - drop]
        self.length = length

    def reset(self) -> None:
        self.k = self.v = None
        self.length = 0
        self.batch = None
