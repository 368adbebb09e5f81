"""Reading a tiered layer for attention: exact (every chunk) or sparse (the chunks that matter).

Both assemble partial attentions (device arena, chunks fetched from host or disk, this forward's own
tokens) and merge them by log-sum-exp, so where a token lives never changes the result.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from .attend import attend
from .handle import KVHandle
from .kernels import merge_partials, native, partial_attention, run_decode_attention, sparse_decode_attention
from .kernels._triton import use_triton
from .kernels.ragged import ragged_layout
from .sparse.select import CANDIDATES, Selection
from .store.chunk import Chunk, Tier, group_positions, token_groups

if TYPE_CHECKING:
    from .layers import TieredLayer


def pad_slice(pad: torch.Tensor | None, start: int, end: int) -> torch.Tensor | None:
    """The padding mask of positions [start, end), or None when none of them is padding."""
    if pad is None:
        return None
    part = pad[:, start:end]
    return None if bool(part.all()) else part


def _merge(parts: list[tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype,
           need_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Merge partial attentions; (out float32, lse) if need_lse, else (out in `dtype`, None)."""
    out, lse = parts[0]
    for o, l in parts[1:]:
        out, lse = merge_partials(out, lse, o, l)
    return (out, lse) if need_lse else (out.to(dtype), None)


def _stage(layer: "TieredLayer", group: list[Chunk], batch: int, device: torch.device):
    """Read a group of chunks into the staging buffers: k, v [B, H, n, D] and their positions [n]. The group's
    records are read in one transaction and decoded straight into their place (no per-chunk tensors, no
    concatenation, no new allocation); copies are then kept in whatever free room the tiers have."""
    n = sum(c.length for c in group)
    tiers = layer.tiers
    sk, sv = tiers.staging(batch, n, device)
    tiers.read_into(group, sk, sv)
    tiers.keep_staged(group, sk, sv)
    pos = group_positions(group, device)
    tiers.counters.staging_peak_tokens = max(tiers.counters.staging_peak_tokens, n)
    return sk, sv, pos


# ----------------------------------------------------------------------------------------- exact
def exact_attention(layer: "TieredLayer", q: torch.Tensor, handle: KVHandle, pad: torch.Tensor | None,
                    scale: float, softcap: float | None,
                    need_lse: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of q [B, Hq, Q, D] over every cached token plus this forward's.

    Returns out [B, Hq, Q, D] and lse [B, Hq, Q], both float32, if need_lse; else out in q.dtype and None
    (then a part that is the whole answer may take a fused kernel that computes no LSE)."""
    past, nq = handle.past_len, handle.q_len
    # Decode: the new token already sits in the window, so the arena covers it and no causal cut is needed.
    arena_has_new = nq == 1 and handle.new_in_window
    limit = past + 1 if arena_has_new else past
    if layer.wholly_on_device:
        remote = []
        layer.tiers.counters.device.hits += len(layer.chunks) - bool(layer.chunks and layer.chunks[-1].start >= past)
    else:
        remote = [c for c in layer.chunks if c.tier != Tier.DEVICE and c.start < past]
        layer.tiers.counters.device.hits += sum(1 for c in layer.chunks if c.start < past) - len(remote)
        remote = layer.tiers.promote_into_free_room(layer.index, remote)
    groups = list(token_groups(remote, layer.config.staging_tokens)) if remote else []
    # Streamed chunks: the reader threads work `prefetch_tokens` ahead of the group being attended, from the
    # second group on. The first is read when it is needed, in one transaction: handing it to a reader thread
    # only to wait for it at once measured slower (a thread's Python per record, and no compute to overlap).
    prefetcher = layer.tiers.prefetcher
    ahead = [c for group in groups[1:] for c in group if c.tier == Tier.DISK]
    prefetcher.request(ahead, layer.tiers.clock)
    parts = []
    if limit > 0 and layer.pool.high_water:
        k, v, pos = layer.pool.view()
        valid = None
        if not layer.pool.dense or layer.length > limit:
            valid = ((pos >= 0) & (pos < limit))[None, :].expand(k.shape[0], -1)
        pad_part = pad_slice(pad, 0, limit)
        if pad_part is not None:
            row_ok = pad_part[:, pos.clamp(0, limit - 1)]
            valid = row_ok if valid is None else valid & row_ok
        alone = arena_has_new and not remote
        out, lse = attend(q, k, v, q_pos0=past, key_pos=pos, scale=scale, key_valid=valid, causal=False,
                          softcap=softcap, need_lse=need_lse or not alone)
        if alone:
            return out, lse
        parts.append((out, lse))
    for group in groups:
        ahead = [c for c in ahead if c.start >= group[-1].end]
        k, v, pos = _stage(layer, group, q.shape[0], q.device)
        prefetcher.request(ahead, layer.tiers.clock)
        valid = None
        if any(c.end > past for c in group):
            valid = (pos < past)[None, :].expand(k.shape[0], -1)
        if pad is not None:
            row_ok = pad[:, pos.clamp(max=pad.shape[1] - 1)]
            valid = row_ok if valid is None else valid & row_ok
        parts.append(attend(q, k, v, q_pos0=past, key_pos=pos, scale=scale, key_valid=valid, causal=False,
                            softcap=softcap, need_lse=True))
    if not arena_has_new and (nq or not parts):  # no new tokens (a Hogwild history read): nothing to add
        alone = not parts
        out, lse = attend(q, handle.k_new, handle.v_new, q_pos0=past, key_pos=past, scale=scale,
                          key_valid=pad_slice(pad, past, past + nq), softcap=softcap, need_lse=need_lse or not alone)
        if alone:
            return out, lse
        parts.append((out, lse))
    return _merge(parts, q.dtype, need_lse)


# ---------------------------------------------------------------------------------------- sparse
def sparse_attention(layer: "TieredLayer", q: torch.Tensor, handle: KVHandle, pad: torch.Tensor | None,
                     scale: float, softcap: float | None,
                     need_lse: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One decode step attending to sinks, the recent window and the pages the selector keeps.

    q: [B, Hq, 1, D]; the new token is already in the window. Chunks holding selected pages and not on the
    device are brought there (evicting chunks this step does not need); any that cannot fit are staged and
    merged.
    Returns out [B, Hq, 1, D] and lse [B, Hq, 1] (float32) if need_lse, else out in q.dtype and None.
    """
    tiers = layer.tiers
    tiers.prefetch_next(layer)
    b, h = q.shape[0], layer.pool.k.shape[1]
    if layer.wholly_on_device:
        step = _step_in_place(layer, q[:, :, 0], pad, softcap, scale)
        if step is not None:
            out, lse, union, attended = step
            _note_selection(layer, union, attended, b * h)
            tiers.counters.device.hits += len(layer.last_union)
            return _merge([(out.unsqueeze(2), lse.unsqueeze(2))], q.dtype, need_lse)
    sel, always = select_chunks(layer, q[:, :, 0], pad)
    pages = layer.abstracts.pages()
    lengths = layer.abstracts.view()[2]
    units = sel.units(lengths, pages)
    held = sel.chunks.any(dim=1).any(dim=0)
    union = np.flatnonzero(held.numpy()).tolist() if held.device.type == "cpu" else held.nonzero().flatten().tolist()
    needed = _note_selection(layer, union, int(units[2].sum()) + always * b * h, b * h)
    if layer.wholly_on_device:  # nothing to bring up or stage
        tiers.counters.device.hits += len(needed)
        staged = []
    else:
        staged = tiers.make_resident(layer.index, needed)

    # The arena: selected pages' slots and the window; staged chunks are attended from their staging copy.
    whole_ok, parts_ok = sel.whole_ok, sel.parts_ok
    if staged:
        off = torch.zeros(len(layer.chunks), dtype=torch.bool)
        off[[chunk.row for chunk, _, _ in staged]] = True
        off = off.to(lengths.device)
        whole_ok = whole_ok & ~off.take(sel.whole)
        parts_ok = parts_ok & ~off.take(sel.page_chunk.take(sel.parts))
        units = sel.units(lengths, pages, whole_ok, parts_ok)
    res = None
    if pad is None and softcap is None and q.device.type == "cpu" and not use_triton(q):  # runs of slots
        res = native.unit_attention(q[:, :, 0], units, lengths, (*layer.slot_table(), layer.run_first()),
                                    layer.win_slots, layer.pool.k, layer.pool.v, scale)  # in place (C), else copied
        if res is None:
            runs = _arena_runs(layer, units)
            if runs is not None:
                res = run_decode_attention(q[:, :, 0], layer.pool.k, layer.pool.v, *runs, scale)
    if res is None:
        if pad is None:
            idx, counts = _arena_lists(layer, sel, whole_ok, parts_ok)
        else:  # padding hides single slots: mask the arena slot by slot (batched decode of left-padded rows)
            arena_pages = sel.pages
            for chunk, _, _ in staged:
                first = int(pages.first[chunk.row])
                arena_pages[..., first:first + int(pages.count[chunk.row])] = False
            idx, counts = _arena_lists_masked(layer, arena_pages, pad)
        # The whole (contiguous) arena: slot indices address it directly, nothing is copied.
        res = sparse_decode_attention(q[:, :, 0], layer.pool.k, layer.pool.v, idx, counts, scale, softcap)
    out, lse = res
    parts = [(out.unsqueeze(2), lse.unsqueeze(2))]
    page_size = layer.abstracts.page_size
    page_sel = sel.pages if staged else None
    for chunk, ck, cv in staged:
        token_page = pages.first[chunk.row] + torch.arange(chunk.length, device=page_sel.device) // page_size
        head_mask = page_sel[:, :, token_page][:, :, None, :]  # [B, Hkv, 1, n]
        if pad is not None:
            head_mask = head_mask & pad[:, None, None, chunk.start:chunk.end]
        parts.append(partial_attention(q, ck, cv, scale, head_mask, softcap))
    return _merge(parts, q.dtype, need_lse)


def _note_selection(layer: "TieredLayer", union: list[int], attended: int, pairs: int) -> list[Chunk]:
    """Book a step's selection: the rows of the chunks any of the `pairs` (sequence, KV head) pairs selected
    anything from, and `attended` tokens in all (sinks and the window included). Those chunks become the
    layer's `last_union` (the prefetch hint), marked used now; returns them."""
    tiers = layer.tiers
    all_chunks, clock = layer.chunks, tiers.clock
    needed = [all_chunks[i] for i in union]
    if tiers.lookahead is not None:
        tiers.lookahead.score(layer.index, needed)
    for chunk in needed:
        chunk.last_used = clock
        chunk.selected += 1
    layer.last_union = needed
    tiers.counters.selected_tokens += attended
    tiers.counters.selection_steps += pairs
    return needed


def _always_attended(layer: "TieredLayer") -> tuple[torch.Tensor | None, int, int]:
    """What every (sequence, KV head) attends to besides its selection: (the forced chunks [C] bool or None,
    tokens in sinks and the recent window, the budget left for the selection in tokens)."""
    forced, sink_tokens = layer.forced_chunks()
    always = sink_tokens + layer.win_len
    return forced, always, max(0, layer.config.budget_tokens(layer.length) - always)


def _step_in_place(layer: "TieredLayer", q: torch.Tensor, pad: torch.Tensor | None, softcap: float | None,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor, list[int], int] | None:
    """The sparse step as one C call (`native.sparse_step`: selection, runs of arena slots, attention read in
    place), where the C selection runs (QuestBound, float32 on a CPU, pages) and every chunk is in the arena,
    without padding or soft-capping: (out [B, Hq, D], lse [B, Hq], the rows of the chunks holding anything
    selected, tokens attended in all). None elsewhere (then the step's parts one by one)."""
    abstracts = layer.abstracts
    selector = layer.tiers.selector
    if (pad is not None or softcap is not None or abstracts.max_pages <= 1 or not selector.quest_bound()
            or q.device.type != "cpu" or q.dtype != torch.float32 or not native.takes(layer.pool.k, layer.pool.v)):
        return None
    kmin, kmax, lengths, _ = abstracts.view()
    forced, always, budget = _always_attended(layer)
    kmin, kmax = abstracts.half_bounds() or (kmin, kmax)
    pages = abstracts.pages()
    got = native.sparse_step(q, kmin, kmax, lengths, pages.pmin, pages.pmax, pages.lengths, pages.chunk,
                              pages.offsets, pages.first, pages.count, budget, CANDIDATES, forced, None,
                              selector.shared, (*layer.slot_table(), layer.run_first()), layer.win_slots, layer.pool.k,
                              layer.pool.v, scale)
    if got is None:
        return None
    out, lse, union, tokens = got
    return out, lse, union, tokens + always * q.shape[0] * layer.pool.k.shape[1]


def select_chunks(layer: "TieredLayer", q: torch.Tensor, pad: torch.Tensor | None) -> tuple[Selection, int]:
    """What query q [B, Hq, D] attends to under the layer's budget: (the selected pages and their chunks,
    tokens every (sequence, KV head) attends to besides them: sinks and the recent window)."""
    kmin, kmax, lengths, starts = layer.abstracts.view()
    forced, always, chunk_budget = _always_attended(layer)
    has_tokens = _chunks_with_tokens(pad, starts, lengths) if pad is not None else None
    selector = layer.tiers.selector
    on_c = selector.quest_bound() and q.device.type == "cpu" and q.dtype == torch.float32  # the C selection's case
    half = layer.abstracts.half_bounds() if on_c else None
    sel = selector.select_pages(q, kmin, kmax, lengths, starts, layer.abstracts.pages(), layer.abstracts.max_pages,
                                chunk_budget, forced, has_tokens, half)
    return sel, always


def _chunks_with_tokens(pad: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """[B, C]: whether chunk c holds at least one real (non-padding) token of row b."""
    cum = torch.nn.functional.pad(pad.long().cumsum(-1), (1, 0))  # [B, L+1]
    return (cum[:, starts + lengths] - cum[:, starts]) > 0


def _arena_runs(layer: "TieredLayer", units: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Each (sequence, KV head)'s arena slots as runs of consecutive slots, for the window copies where the C
    library does not read the arena (`native.unit_attention` lists and reads them in one call where it does):
    the pieces (`SlotRuns`) of each selected chunk or page (`units`: `Selection.units` of the entries read from
    the arena), then the recent window's. Returns start, length [B, Hkv, U] (length 0: no run), or None where
    the window lies in too many pieces to pay or a unit's tokens are not all in the arena (then `_arena_lists`,
    slot by slot)."""
    runs = layer.slot_runs()
    chunk, off, size = (t.numpy() for t in units)  # index arithmetic on a few thousand entries: numpy's is cheaper
    b, h, _ = chunk.shape
    window = layer.win_slots.numpy()
    win_start = win_size = None
    if window.size:  # the window's runs: its first tokens placed together, decoded ones one by one
        cuts = np.flatnonzero(np.diff(window) != 1) + 1
        if cuts.size + 1 > max(4, window.size // 8):
            return None  # scattered slots: one window copy per few slots would not pay
        bounds = np.concatenate(([0], cuts, [window.size]))
        win_start, win_size = window[bounds[:-1]], np.diff(bounds)
    # Each unit against each piece of its chunk: the part of the unit that piece holds.
    first, count, p_offset, p_slot, p_length = (t.numpy() for t in (runs.first, runs.count, runs.offset, runs.slot,
                                                                     runs.length))
    j = np.arange(runs.most)
    has = j < count[chunk][..., None]
    piece = np.where(has, first[chunk][..., None] + j, 0)
    p_off, p_len = p_offset[piece], p_length[piece]
    lo = np.maximum(off[..., None], p_off)
    hi = np.minimum((off + size)[..., None], p_off + p_len)
    run_size = np.where(has, np.maximum(hi - lo, 0), 0)
    if int(run_size.sum()) != int(size.sum()):  # a selected token off the device: never expected, never dropped
        return None
    start = (p_slot[piece] + lo - p_off).reshape(b, h, -1)
    run_size = run_size.reshape(b, h, -1)
    if win_start is not None:
        start = np.concatenate([start, np.broadcast_to(win_start, (b, h, win_start.size))], axis=-1)
        run_size = np.concatenate([run_size, np.broadcast_to(win_size, (b, h, win_size.size))], axis=-1)
    return torch.from_numpy(start), torch.from_numpy(run_size)


def _arena_lists(layer: "TieredLayer", sel: Selection, whole_ok: torch.Tensor,
                 parts_ok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each (sequence, KV head)'s arena slots: its selected chunks' and pages' slots, then the recent window.

    whole_ok, parts_ok: the selection's entries to read from the arena (those of chunks on the device).
    Returns idx [B, Hkv, width] (valid below counts) and counts [B, Hkv]. Built from the selection's lists
    alone, one run of slots per chunk or page: O(chunks + attended tokens), whatever the context."""
    b, h, _ = sel.chunks.shape
    flat, run_at = layer.slot_table()
    pages = layer.abstracts.pages()
    lengths = layer.abstracts.view()[2]
    window = layer.win_slots.to(flat.device)
    device = flat.device
    chunk, off, size = sel.units(lengths, pages, whole_ok, parts_ok)
    start = run_at.take(chunk) + off  # where each unit's slots start in `flat`
    unit, within, dest, per_bh, width = ragged_layout(size.flatten(), b * h, extra=window.numel())
    counts = per_bh + window.numel()
    idx = torch.zeros(b * h * width, dtype=torch.long, device=device)
    idx.scatter_(0, dest, flat.take(start.flatten().take(unit) + within))
    idx = idx.view(b * h, width)
    if window.numel():
        cols = per_bh[:, None] + torch.arange(window.numel(), device=device)[None, :]
        idx.scatter_(1, cols, window[None, :].expand(b * h, -1))
    return idx.view(b, h, width), counts.view(b, h)


def _arena_lists_masked(layer: "TieredLayer", sel: torch.Tensor, pad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """As `_arena_lists`, dropping padding slots: a mask over the whole arena, O(context)."""
    _, _, pos = layer.pool.view()
    owner = layer.pool.owners()
    pages = layer.abstracts.pages()
    starts = layer.abstracts.view()[3]
    chunk = owner.clamp(0, starts.numel() - 1)
    page = pages.first[chunk] + (pos - starts[chunk]).clamp(min=0) // layer.abstracts.page_size
    page = torch.where(owner >= 0, page.clamp(max=sel.shape[-1] - 1), -1)
    sel_ext = torch.cat([torch.ones_like(sel[..., :1]), sel], dim=-1)  # column 0: the window
    mask = sel_ext[:, :, page + 1] & (pos >= 0)[None, None, :]
    mask &= pad[:, pos.clamp(0, pad.shape[1] - 1)][:, None, :]
    counts = mask.sum(-1)  # [B, Hkv]
    return _compact(mask, int(counts.max())), counts


def _compact(mask: torch.Tensor, width: int) -> torch.Tensor:
    """[B, H, S] bool -> [B, H, width] indices of the True entries, left-aligned (rest: 0)."""
    b, h, s = mask.shape
    width = max(width, 1)
    slot = torch.where(mask, mask.long().cumsum(-1) - 1, width)  # destination column, `width` = discard
    out = torch.zeros(b, h, width + 1, dtype=torch.long, device=mask.device)
    out.scatter_(-1, slot, torch.arange(s, device=mask.device).expand(b, h, s))
    return out[..., :width]

