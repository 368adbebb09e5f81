"""The C kernels: decode attention over runs of arena rows and Quest-bound page selection (their results
against torch's, their guards), and how the library is built and loaded (only from a cache this user owns
and nobody else can write)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from kvtier.kernels import native, sparse_decode_attention_ref
from kvtier.sparse import AbstractTable, QuestBound, Recency, SharedAcrossHeads


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A library() that has not been tried yet, building into its own cache directory."""
    monkeypatch.setattr(native, "_loaded", [])
    monkeypatch.setenv("KVTIER_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def lib():
    if native.library() is None:
        pytest.skip("the C kernel cannot be built here (no C compiler?)")
    return native.library()


def _problem(pairs, g, d, plane, runs, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(pairs, g, d, generator=gen)
    k = torch.randn(pairs * plane, d, generator=gen)
    v = torch.randn(pairs * plane, d, generator=gen)
    start = np.array([[s for s, _ in runs]] * pairs, dtype=np.int64)
    count = np.array([[n for _, n in runs]] * pairs, dtype=np.int64)
    first = np.arange(pairs, dtype=np.int64)[:, None] * plane + start
    return q, k, v, first, count


def _reference(q, k, v, first, count, scale):
    pairs, g, d = q.shape
    idx = [sum((list(range(f, f + n)) for f, n in zip(fr, cr)), []) for fr, cr in zip(first.tolist(), count.tolist())]
    width = max(1, max(len(i) for i in idx))
    idx_t = torch.tensor([i + [0] * (width - len(i)) for i in idx]).view(1, pairs, width)
    counts = torch.tensor([len(i) for i in idx]).view(1, pairs)
    rows = k.shape[0]
    out, lse = sparse_decode_attention_ref(q.reshape(1, pairs * g, d), k.view(1, 1, rows, d).expand(1, pairs, rows, d),
                                           v.view(1, 1, rows, d).expand(1, pairs, rows, d), idx_t, counts, scale)
    return out.view(pairs, g, d), lse.view(pairs, g)


@pytest.mark.parametrize("g, d", [(1, 64), (1, 40), (2, 8), (3, 24), (4, 128), (4, 64), (7, 80), (8, 40), (16, 96),
                                  (5, 3)])
@pytest.mark.parametrize("scale", [0.2, 2.0])
def test_runs_longer_than_a_block_and_empty_runs(lib, g, d, scale):
    """Runs of 1, 63, 64, 65 and 150 rows (the kernel scores 64 rows at a time) and runs of none; at a large
    scale most weights underflow (the kernel's own exp flushes below e^-87). The kernel scores eight rows at a
    time where d is a multiple of 8 (row by row below 4 query rows a KV head, side by side from there; a
    block's last rows and other d one at a time) and sums values 64 columns at a time (the rest of d after)."""
    runs = [(0, 1), (3, 63), (70, 0), (80, 64), (150, 65), (220, 150), (400, 0)]
    q, k, v, first, count = _problem(3, g, d, 420, runs, seed=g)
    out, lse = native.run_attention(q, k, v, first, count, scale)
    want, want_lse = _reference(q, k, v, first, count, scale)
    loose = {} if scale < 1 else {"atol": 1e-4, "rtol": 1e-5}  # scores of +-100: round-off grows with them
    torch.testing.assert_close(out, want, **loose)
    torch.testing.assert_close(lse, want_lse, **loose)


def test_a_pair_with_no_rows_attends_to_nothing(lib):
    q, k, v, first, count = _problem(2, 2, 16, 40, [(0, 5), (10, 3)])
    count[1] = 0
    out, lse = native.run_attention(q, k, v, first, count, 0.5)
    assert torch.equal(out[1], torch.zeros(2, 16)) and torch.isneginf(lse[1]).all()
    assert torch.isfinite(lse[0]).all()


def test_threads_split_pairs_and_give_the_same_bits(lib):
    q, k, v, first, count = _problem(5, 2, 32, 100, [(0, 40), (50, 30)])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.run_attention(q, k, v, first, count, 0.3)
        torch.set_num_threads(3)
        three = native.run_attention(q, k, v, first, count, 0.3)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], three[0]) and torch.equal(one[1], three[1])


@pytest.mark.parametrize("first_row, rows", [(-1, 3), (38, 3), (0, -2)])
def test_a_run_outside_the_arena_is_refused_before_the_kernel_reads(lib, first_row, rows):
    q, k, v, first, count = _problem(1, 1, 8, 40, [(0, 2)])
    first[0, 0], count[0, 0] = first_row, rows
    with pytest.raises(ValueError, match="outside the arena|runs"):
        native.run_attention(q, k, v, first, count, 1.0)


def test_other_dtypes_are_left_to_torch(lib):
    q, k, v, first, count = _problem(1, 1, 8, 40, [(0, 2)])
    assert native.run_attention(q.half(), k.half(), v.half(), first, count, 1.0) is None


def test_kvtier_native_0_turns_it_off(fresh, monkeypatch):
    monkeypatch.setenv("KVTIER_NATIVE", "0")
    assert native.library() is None
    assert not fresh.exists()


def test_no_compiler_falls_back_with_one_warning(fresh, monkeypatch):
    monkeypatch.setenv("CC", str(fresh / "no-such-cc"))
    with pytest.warns(RuntimeWarning, match="falls back to torch's kernels"):
        assert native.library() is None
    assert native.library() is None  # tried once


def test_a_cache_others_can_write_is_not_used(fresh):
    (fresh / "native").mkdir(parents=True)
    os.chmod(fresh / "native", 0o777)
    with pytest.warns(RuntimeWarning, match="closed to others"):
        assert native.library() is None


def test_a_library_others_can_write_is_not_loaded(fresh, lib):
    native._loaded.clear()
    path = native._build()
    assert native._load(path) is not None
    os.chmod(path, 0o766)
    with pytest.raises(RuntimeError, match="closed to others"):
        native._load(path)


# ------------------------------------------------------------------------------------------------ selection
def _selection_problem(lengths, page_size, b, h, g, d, seed, levels):
    """Chunk tables with keys and queries of small integers: every score is exact in any summation order, so
    the C and torch selections must agree exactly, ties included (few levels: many ties)."""
    gen = torch.Generator().manual_seed(seed)
    table = AbstractTable(torch.device("cpu"), page_size)
    start = 0
    for n in lengths:
        table.add(torch.randint(-levels, levels + 1, (b, h, n, d), generator=gen).float(), start)
        start += n
    q = torch.randint(-levels, levels + 1, (b, h * g, d), generator=gen).float()
    return table, q


def _lists(sel):
    """Each pair's entries read whole and in pages, in order, and the chunk mask."""
    whole = [r[ok].tolist() for r, ok in zip(sel.whole.flatten(0, 1), sel.whole_ok.flatten(0, 1))]
    parts = [r[ok].tolist() for r, ok in zip(sel.parts.flatten(0, 1), sel.parts_ok.flatten(0, 1))]
    return whole, parts, sel.chunks.tolist()


@settings(max_examples=80, deadline=None)
@given(lengths=st.lists(st.integers(1, 70), min_size=1, max_size=120), page_size=st.integers(2, 16),
       budget=st.integers(0, 3000), seed=st.integers(0, 10_000), levels=st.integers(1, 3), g=st.integers(1, 3),
       sinks=st.integers(0, 2), padding=st.booleans(), shared=st.booleans(), d=st.sampled_from([4, 12, 16]))
def test_c_selection_equals_the_torch_selection(lengths, page_size, budget, seed, levels, g, sinks, padding, shared,
                                                d):
    """Sinks, chunks holding only padding, GQA groups, shared choices and ties: the same entries in the same
    order as `select_pages_torch`, from float32 chunk bounds and from the float16 ones the table keeps for the
    C selection (small integers: float16 holds them exactly)."""
    if native.library() is None:
        pytest.skip("the C library cannot be built here")
    table, q = _selection_problem(lengths, page_size, 2, 3, g, d, seed, levels)
    assume(table.max_pages > 1)
    kmin, kmax, lens, starts = table.view()
    forced = torch.arange(len(lengths)) < sinks
    has_tokens = None
    if padding:
        has_tokens = torch.rand(2, len(lengths), generator=torch.Generator().manual_seed(seed)) < 0.8
    selector = SharedAcrossHeads(QuestBound()) if shared else QuestBound()
    args = (q, kmin, kmax, lens, starts, table.pages(), table.max_pages, budget, forced, has_tokens)
    fast = selector.select_pages(*args)
    slow = selector.select_pages_torch(*args)
    assert fast.whole.shape[-1] <= len(lengths)  # the C path's compact lists, not the torch path's
    assert _lists(fast) == _lists(slow)
    assert fast.own_units is not None
    pages = table.pages()
    assert _units(fast.units(lens, pages)) == _units(slow.units(lens, pages))
    # the lists' padding is valid rows too: the staged path reads them again with its own masks
    assert _units(fast.units(lens, pages, fast.whole_ok, fast.parts_ok)) == _units(slow.units(lens, pages))
    assert torch.equal(fast.pages, slow.pages)
    if native.reads_half():
        half = table.half_bounds()
        assert half is not None and half[0].dtype == torch.float16
        from_half = selector.select_pages(*args, half)
        assert _lists(from_half) == _lists(slow) and torch.equal(from_half.pages, slow.pages)
        assert _units(from_half.units(lens, pages)) == _units(slow.units(lens, pages))


def _units(units):
    """Each pair's units that hold tokens, in order."""
    chunk, off, size = (t.flatten(0, 1).tolist() for t in units)
    return [[u for u in zip(c, o, n) if u[2]] for c, o, n in zip(chunk, off, size)]


def test_selection_tables_pointing_outside_their_bounds_are_refused():
    if native.library() is None:
        pytest.skip("the C library cannot be built here")
    table, q = _selection_problem([40, 40, 40], 16, 1, 2, 1, 4, 0, 2)
    kmin, kmax, lens, _ = table.view()
    pages = table.pages()
    for column, value in [("first", 99), ("count", 9), ("lengths", -1), ("first", 0), ("count", 4)]:
        bad = dict(first=pages.first.clone(), count=pages.count.clone(), lengths=lens.clone())
        bad[column][1] = value  # first 0, count 4: pages of chunk 0 or 2 listed as chunk 1's too
        with pytest.raises(ValueError, match="points outside"):
            native.select_pages(q, kmin, kmax, bad["lengths"], pages.pmin, pages.pmax, pages.lengths, pages.chunk,
                                pages.offsets, bad["first"], bad["count"], 60, 4, None, None, False)


def test_policies_other_than_the_quest_bound_select_in_torch(monkeypatch):
    class Doubled(QuestBound):
        def score(self, q, kmin, kmax, starts):
            return 2 * super().score(q, kmin, kmax, starts)

    class Fewer(QuestBound):  # scores as QuestBound, chooses otherwise: the one-call step must not bypass it
        def select_pages(self, *args, **kwargs):
            return super().select_pages(*args[:7], args[7] // 2, *args[8:], **kwargs)

    assert QuestBound().quest_bound() and SharedAcrossHeads(QuestBound()).quest_bound()
    assert not Doubled().quest_bound() and not SharedAcrossHeads(Doubled()).quest_bound()
    assert not Fewer().quest_bound()
    assert not Recency().quest_bound()
    table, q = _selection_problem([40, 40, 40], 16, 1, 2, 1, 4, 0, 2)
    kmin, kmax, lens, starts = table.view()
    monkeypatch.setattr(native, "select_pages", lambda *a: pytest.fail("the C selection ran for another policy"))
    Doubled().select_pages(q, kmin, kmax, lens, starts, table.pages(), table.max_pages, 60)


def test_unit_attention_reads_units_as_runs_of_slots_and_refuses_bad_tables(lib):
    """Chunk 0 lies in slots 10-13 then 30-33, chunk 1 in 50-57; the window is slots 60, 61, 70. Units (chunk 0,
    tokens 2-6) and (chunk 1, tokens 1-3) read runs 12-13, 30-32, 51-53, then the window's 60-61 and 70: the
    attention over exactly those runs. A unit of a chunk off the arena gives None; a unit past its chunk's end,
    a chunk row outside the table or a slot outside the arena is refused."""
    t = lambda *x: torch.tensor(x, dtype=torch.int64).view(1, 1, -1)  # noqa: E731
    flat = torch.tensor([10, 11, 12, 13, 30, 31, 32, 33, 50, 51, 52, 53, 54, 55, 56, 57])
    table, lengths = (flat, torch.tensor([0, 8, -1]), torch.tensor([-1, 50, -1])), torch.tensor([8, 8, 5])
    window = torch.tensor([60, 61, 70])
    gen = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 3, 8, generator=gen), torch.randn(1, 1, 80, 8, generator=gen), torch.randn(1, 1, 80, 8,
                                                                                                     generator=gen)
    out, lse = native.unit_attention(q, (t(0, 1), t(2, 1), t(5, 3)), lengths, table, window, k, v, 0.4)
    runs = [(12, 2), (30, 3), (51, 3), (60, 2), (70, 1)]
    want = native.run_attention(q.view(1, 3, 8), k.view(80, 8), v.view(80, 8),
                                torch.tensor([[s for s, _ in runs]]), torch.tensor([[n for _, n in runs]]), 0.4)
    assert torch.equal(out.view(1, 3, 8), want[0]) and torch.equal(lse.view(1, 3), want[1])
    assert native.unit_attention(q, (t(2), t(0), t(2)), lengths, table, window, k, v, 0.4) is None  # off the arena
    for units, win in (((t(1), t(6), t(4)), window),  # tokens 6-9 of an 8-token chunk
                       ((t(3), t(0), t(1)), window),  # chunk row 3 of 3
                       ((t(0), t(0), t(1)), window + 10)):  # slot 80 of 80
        with pytest.raises(ValueError, match="points outside"):
            native.unit_attention(q, units, lengths, table, win, k, v, 0.4)


# ------------------------------------------------------------------------------------ the step in one call
def _arena_for(table, b, h, d, seed, off_device=()):
    """An arena [B, H, S, D] holding the table's chunks in scattered blocks of 1-8 slots, a recent window of
    three slots after them, and the slot table (`TieredLayer.slot_table`: the device chunks' slots end to end,
    each chunk row's offset in them, -1 for the chunks in off_device; `run_first`: a chunk's first slot where
    they are one run, else -1)."""
    gen = np.random.default_rng(seed)
    lengths = table.view()[2].numpy()
    on = [c for c in range(len(lengths)) if c not in off_device]
    total = int(lengths[on].sum())
    cuts = np.cumsum(gen.integers(1, 9, size=total + 1))
    blocks = np.split(np.arange(total), cuts[cuts < total])
    flat = np.concatenate([blocks[i] for i in gen.permutation(len(blocks))]) if total else np.zeros(0, np.int64)
    offsets = np.full(len(lengths), -1, dtype=np.int64)
    offsets[on] = np.concatenate(([0], np.cumsum(lengths[on])[:-1])) if on else []
    slots = total + 3 + 5  # the window, then unused slots
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(b, h, slots, d, generator=g), torch.randn(b, h, slots, d, generator=g)
    window = torch.tensor([total, total + 1, total + 3])
    flat = flat.astype(np.int64)
    run_first = [int(flat[o]) if o >= 0 and n and all(flat[o + i] == flat[o] + i for i in range(n)) else -1
                 for o, n in zip(offsets.tolist(), lengths.tolist())]
    return k, v, (torch.from_numpy(flat), torch.from_numpy(offsets), torch.tensor(run_first)), window


def _paged_problem(lengths, page_size, b, h, g, d, seed):
    """`_selection_problem` where chunks hold several pages (the C step's case): the table, q, its chunk bounds
    and lengths, and its pages. Skips without the C library."""
    if native.library() is None:
        pytest.skip("the C library cannot be built here")
    table, q = _selection_problem(lengths, page_size, b, h, g, d, seed, 3)
    assume(table.max_pages > 1)
    kmin, kmax, lens, _ = table.view()
    return table, q, kmin, kmax, lens, table.pages()


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 70), min_size=1, max_size=60), page_size=st.integers(2, 16),
       budget=st.integers(0, 1500), seed=st.integers(0, 10_000), g=st.integers(1, 3), sinks=st.integers(0, 2),
       shared=st.booleans(), d=st.sampled_from([4, 12, 16]), threads=st.sampled_from([1, 2, 3]))
def test_the_step_in_one_call_equals_its_three_parts(lengths, page_size, budget, seed, g, sinks, shared, d, threads):
    """`sparse_step` gives the bits of `select_pages` and `unit_attention` called in turn, the chunks they
    select from and the tokens they select, whatever the threads (pairs split between them; with `shared`, a
    thread starting past a sequence's first head selects for it again)."""
    b, h = 2, 3
    table, q, kmin, kmax, lens, pages = _paged_problem(lengths, page_size, b, h, g, d, seed)
    forced = torch.arange(len(lengths)) < sinks
    k, v, slot_table, window = _arena_for(table, b, h, d, seed)
    args = (q, kmin, kmax, lens, pages.pmin, pages.pmax, pages.lengths, pages.chunk, pages.offsets, pages.first,
            pages.count, budget, 4, forced, None, shared)
    sel = native.select_pages(*args)
    chunks, units = sel[0], sel[5:]
    out, lse = native.unit_attention(q, units, lens, slot_table, window, k, v, 0.3)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = native.sparse_step(*args, slot_table, window, k, v, 0.3)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got[0], out) and torch.equal(got[1], lse)
    assert got[2] == np.flatnonzero(chunks.any(1).any(0).numpy()).tolist()
    assert got[3] == int(units[2].sum())


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(1, 70), min_size=1, max_size=40), page_size=st.integers(2, 16),
       budget=st.integers(0, 800), seed=st.integers(0, 10_000), g=st.integers(1, 3), d=st.sampled_from([4, 16]),
       threads=st.sampled_from([1, 2]))
def test_unit_attention_equals_attention_over_the_units_slots(lengths, page_size, budget, seed, g, d, threads):
    """Over chunks scattered in blocks of 1-8 slots, `unit_attention` equals softmax attention over the slots of
    the selected units, listed one by one from the chunks' slot lists, then the window's."""
    b, h = 2, 3
    table, q, kmin, kmax, lens, pages = _paged_problem(lengths, page_size, b, h, g, d, seed)
    units = native.select_pages(q, kmin, kmax, lens, pages.pmin, pages.pmax, pages.lengths, pages.chunk,
                                pages.offsets, pages.first, pages.count, budget, 4, None, None, False)[5:]
    k, v, slot_table, window = _arena_for(table, b, h, d, seed)
    flat, offsets, _ = (x.tolist() for x in slot_table)
    chunk_slots = [flat[offsets[c]:offsets[c] + n] for c, n in enumerate(lengths)]  # slot i: token i
    idx = [[s for c, o, n in zip(*(u[i, j].tolist() for u in units)) for s in chunk_slots[c][o:o + n]]
           + window.tolist() for i in range(b) for j in range(h)]
    width = max(len(x) for x in idx)
    slots = torch.tensor([x + [0] * (width - len(x)) for x in idx]).view(b, h, width)
    counts = torch.tensor([len(x) for x in idx]).view(b, h)
    want = sparse_decode_attention_ref(q, k, v, slots, counts, 0.3)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = native.unit_attention(q, units, lens, slot_table, window, k, v, 0.3)
        scanned = native.unit_attention(q, units, lens, (*slot_table[:2], torch.full_like(slot_table[2], -1)),
                                        window, k, v, 0.3)  # every chunk's slot list read
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    assert torch.equal(got[0], scanned[0]) and torch.equal(got[1], scanned[1])


def test_the_step_in_one_call_leaves_chunks_off_the_arena_and_refuses_bad_tables(lib):
    """A selected chunk without slots gives None (the caller stages it); tables pointing outside what they
    index are refused before anything is read."""
    table, q = _selection_problem([40, 40, 40], 16, 1, 2, 1, 4, 0, 2)
    kmin, kmax, lens, _ = table.view()
    pages = table.pages()
    args = (q, kmin, kmax, lens, pages.pmin, pages.pmax, pages.lengths, pages.chunk, pages.offsets, pages.first,
            pages.count, 120, 4, None, None, False)
    k, v, slot_table, window = _arena_for(table, 1, 2, 4, 0, off_device=(1,))
    assert native.sparse_step(*args, slot_table, window, k, v, 0.5) is None
    k, v, slot_table, window = _arena_for(table, 1, 2, 4, 0, off_device=(0, 1, 2))  # no chunk in the arena
    assert native.sparse_step(*args, slot_table, window, k, v, 0.5) is None
    k, v, slot_table, window = _arena_for(table, 1, 2, 4, 0)
    assert native.sparse_step(*args, slot_table, window, k, v, 0.5) is not None
    flat, offsets, run_first = slot_table
    for bad in ((flat, offsets + 1, run_first),  # chunk 2's slots past the list's end
                (flat + k.shape[2], offsets, run_first * 0 - 1),  # slots past the arena's
                (flat, offsets, run_first + k.shape[2]),  # a run past the arena's slots
                (flat, offsets - 2, run_first)):  # offsets below -1
        with pytest.raises(ValueError, match="points outside"):
            native.sparse_step(*args, bad, window, k, v, 0.5)
    with pytest.raises(ValueError, match="points outside"):
        native.sparse_step(*args, slot_table, window + k.shape[2], k, v, 0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_copies_equal_index_copy_and_refuse_slots_outside(lib, dtype):
    g = torch.Generator().manual_seed(0)
    arena = torch.randn(2, 3, 50, 8, generator=g).to(dtype)
    slots = torch.tensor([7, 8, 9, 30, 2, 49])
    block = torch.randn(2, 3, 6, 8, generator=g).to(dtype)
    want = arena.clone().index_copy_(2, slots, block)
    assert native.scatter_rows(arena, slots, block) and torch.equal(arena, want)
    before = arena.clone()
    for bad in (torch.tensor([3, 50]), torch.tensor([-1, 4])):
        with pytest.raises(ValueError, match="outside the arena"):
            native.scatter_rows(arena, bad, block[:, :, :2])
    assert torch.equal(arena, before)  # nothing written
    strided = torch.randn(2, 3, 12, 16, generator=g).to(dtype)[:, :, ::2, :8]  # a view: rows 2 apart, D of 16
    assert native.scatter_rows(arena, slots, strided) and torch.equal(arena.index_select(2, slots), strided)
    assert not native.scatter_rows(arena, slots, strided.transpose(2, 3).contiguous().transpose(2, 3))  # D strided


def _sdpa_with_lse(q, k, v, scale):
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    return (scores.softmax(-1) @ v.double()).float(), scores.logsumexp(-1).float()


@pytest.mark.parametrize("b, hq, hkv, nq, d, nk, capacity", [
    (1, 4, 4, 1, 64, 300, 300),  # one row a head
    (2, 14, 2, 1, 64, 129, 200),  # a GQA group of 7, batch 2, keys a view of a wider arena
    (1, 8, 2, 4, 128, 1000, 1024),  # 16 rows a head (four workers of a group of 4)
    (1, 3, 1, 2, 40, 70, 70),  # d not a multiple of 8
])
def test_dense_attention_equals_softmax_attention(lib, b, hq, hkv, nq, d, nk, capacity):
    gen = torch.Generator().manual_seed(nk)
    q = torch.randn(b, hq, nq, d, generator=gen)
    k_arena = torch.randn(b, hkv, capacity, d, generator=gen)
    v_arena = torch.randn(b, hkv, capacity, d, generator=gen)
    k, v = k_arena[:, :, :nk], v_arena[:, :, :nk]
    out, lse = native.dense_attention(q, k, v, 0.125)
    want, want_lse = _sdpa_with_lse(q, k, v, 0.125)
    torch.testing.assert_close(out, want, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse, atol=2e-6, rtol=1e-5)


def test_dense_attention_leaves_what_it_cannot_take_to_torch(lib):
    q, k = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 50, 16)
    assert native.dense_attention(q.double(), k.double(), k.double(), 1.0) is None
    assert native.dense_attention(torch.randn(1, 2, native.DENSE_ROWS + 1, 16), k, k, 1.0) is None
    assert native.dense_attention(q, k.transpose(2, 3).contiguous().transpose(2, 3), k, 1.0) is None  # no rows
    assert native.dense_attention(q.requires_grad_(), k, k, 1.0) is None  # no backward in C
    with torch.no_grad():
        assert native.dense_attention(q, k, k, 1.0) is not None


@pytest.mark.parametrize("need_lse", [False, True])
def test_decode_attention_on_a_cpu_reads_keys_through_the_c_kernel(lib, monkeypatch, need_lse):
    """A decode step's attention (a few query rows over keys that all precede them) takes the C kernel, with or
    without the log-sum-exp; a causal prefill keeps torch's kernel."""
    from kvtier.attend import attend
    calls = []
    real = native.dense_attention
    monkeypatch.setattr(native, "dense_attention", lambda *a: calls.append(a[0].shape) or real(*a))
    q, k, v = torch.randn(1, 6, 1, 32), torch.randn(1, 2, 90, 32), torch.randn(1, 2, 90, 32)
    out, _ = attend(q, k, v, q_pos0=90, key_pos=0, scale=0.2, need_lse=need_lse)
    assert calls == [q.shape]
    torch.testing.assert_close(out, _sdpa_with_lse(q, k, v, 0.2)[0], atol=2e-6, rtol=1e-5)
    attend(torch.randn(1, 6, 90, 32), k, v, q_pos0=0, key_pos=0, scale=0.2, need_lse=need_lse)
    assert len(calls) == 1


# ------------------------------------------------------------------------------------------ streaming copies
@pytest.mark.parametrize("shape, at", [((1, 4, 33, 257), 3), ((2, 3, 8, 64), 0), ((1, 1, 5, 31), 1),
                                       ((2, 1, 7, 40), 64)])
def test_streamed_planes_equal_a_copy_and_touch_nothing_else(lib, shape, at):
    """Planes of any size and alignment (the head and tail around the streamed part copied plainly) into runs of
    a wider arena; the bytes between runs untouched."""
    b, h, n, w = shape
    rng = np.random.default_rng(at)
    src = rng.integers(0, 256, shape, dtype=np.uint8)
    arena = np.full((b, h, n + 2 * at + 9, w), 7, dtype=np.uint8)
    before = arena.copy()
    dst = arena[:, :, at:at + n]
    assert native.stream_planes(dst, src)
    assert np.array_equal(dst, src)
    outside = np.ones(arena.shape, dtype=bool)
    outside[:, :, at:at + n] = False
    assert np.array_equal(arena[outside], before[outside])


def test_streamed_planes_refuse_what_is_not_evenly_spaced_planes(lib):
    src = np.zeros((2, 3, 4, 8), dtype=np.uint8)
    assert not native.stream_planes(np.zeros((2, 3, 4, 9), dtype=np.uint8), src)  # shapes differ
    assert not native.stream_planes(np.zeros((2, 3, 4, 8), dtype=np.int8), src)
    assert not native.stream_planes(np.zeros((2, 3, 8, 8), dtype=np.uint8)[:, :, ::2], src)  # rows apart
    assert not native.stream_planes(np.zeros((2, 3, 4, 16), dtype=np.uint8)[..., ::2], src)  # bytes apart
    assert not native.stream_planes(np.zeros((2, 4, 4, 8), dtype=np.uint8)[:, :3], src)  # batch rows apart
    frozen = np.zeros((2, 3, 4, 8), dtype=np.uint8)
    frozen.flags.writeable = False
    assert not native.stream_planes(frozen, src)
    assert native.stream_planes(np.zeros((0, 3, 4, 8), dtype=np.uint8), src[:0])  # nothing to copy
