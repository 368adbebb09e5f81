"""Page-level selection: page key bounds inside chunks, and selection cut down to the pages that matter."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model, twin
from helpers import cache_kw, cpu_path
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from kvtier import KVTierCache
from kvtier.sparse import AbstractTable, QuestBound, Recency, SharedAcrossHeads
from kvtier.sparse.abstracts import float16_bounds
from kvtier.sparse.select import CANDIDATES, _rank_chunks, take_in_order

SPARSE = dict(mode="sparse", chunk_size=16, sink_tokens=4, recent_window=16, min_chunk_size=8, max_chunk_size=48,
              observation_window=16)


def _table(lengths: list[int], page_size: int, seed: int, b: int = 2, h: int = 2, d: int = 8):
    g = torch.Generator().manual_seed(seed)
    table = AbstractTable(torch.device("cpu"), page_size)
    keys, start = [], 0
    for n in lengths:
        k = torch.randn(b, h, n, d, generator=g)
        table.add(k, start)
        keys.append(k)
        start += n
    return table, keys


# --------------------------------------------------------------------------------------- the table
@settings(max_examples=40, deadline=None)
@given(before=st.lists(st.integers(1, 70), max_size=5), lengths=st.lists(st.integers(1, 70), min_size=1, max_size=90),
       page_size=st.integers(1, 20), seed=st.integers(0, 1000))
def test_extend_equals_appending_row_by_row(before, lengths, page_size, seed):
    """A reopened session's rows in one call: the same table as one `append` per chunk, growth included."""
    one_by_one, keys = _table(before + lengths, page_size, seed)
    at_once, _ = _table(before, page_size, seed)
    rows = [one_by_one.row(i) for i in range(len(before), len(before) + len(lengths))]
    starts = [r[2] for r in rows]
    at_once.extend(torch.stack([r[0] for r in rows], dim=2), torch.stack([r[1] for r in rows], dim=2), starts, lengths,
                   torch.cat([r[4] for r in rows], dim=2), torch.cat([r[5] for r in rows], dim=2))
    assert (at_once.count, at_once.page_count, at_once.max_pages) == \
        (one_by_one.count, one_by_one.page_count, one_by_one.max_pages)
    for a, b in zip(at_once.view(), one_by_one.view()):
        assert torch.equal(a, b)
    pa, pb = at_once.pages(), one_by_one.pages()
    for name in ("pmin", "pmax", "starts", "lengths", "offsets", "chunk", "first", "count"):
        assert torch.equal(getattr(pa, name), getattr(pb, name)), name


def test_extend_refuses_abstracts_that_do_not_match_the_chunks():
    table = AbstractTable(torch.device("cpu"), 4)
    k = torch.zeros(1, 2, 3, 8)
    with pytest.raises(ValueError, match="3 chunks of 3 pages"):
        table.extend(k, k, [0, 4, 8], [4, 4, 4], torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8))
    assert table.count == 0


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(1, 70), min_size=1, max_size=8), page_size=st.integers(1, 20),
       seed=st.integers(0, 1000))
def test_page_bounds_are_each_pages_min_and_max(lengths, page_size, seed):
    table, keys = _table(lengths, page_size, seed)
    pages = table.pages()
    kmin, kmax, lens, starts = table.view()
    assert lens.tolist() == lengths and pages.count.tolist() == [-(-n // page_size) for n in lengths]
    for c, k in enumerate(keys):
        assert torch.equal(kmin[:, :, c], k.amin(2)) and torch.equal(kmax[:, :, c], k.amax(2))
        for j in range(int(pages.count[c])):
            p = int(pages.first[c]) + j
            lo, hi = j * page_size, min(len(k[0, 0]), (j + 1) * page_size)
            assert int(pages.chunk[p]) == c and int(pages.offsets[p]) == lo and int(pages.lengths[p]) == hi - lo
            assert int(pages.starts[p]) == int(starts[c]) + lo
            assert torch.equal(pages.pmin[:, :, p], k[:, :, lo:hi].amin(2))
            assert torch.equal(pages.pmax[:, :, p], k[:, :, lo:hi].amax(2))


def test_truncate_rebuild_and_row_reorder_keep_pages_with_their_chunks():
    table, keys = _table([20, 7, 33, 16], 8, seed=1)
    table.truncate(2)
    assert len(table) == 2 and table.page_count == 3 + 1
    table.add(keys[3], 27)
    pages = table.pages()
    assert pages.chunk.tolist() == [0, 0, 0, 1, 2, 2] and pages.starts.tolist()[-2:] == [27, 35]
    rows = [table.row(2), table.row(0)]
    table.rebuild(rows)
    assert table.pages().chunk.tolist() == [0, 0, 1, 1, 1]
    assert torch.equal(table.pages().pmin[:, :, 0], keys[3][:, :, :8].amin(2))
    table.select_rows(torch.tensor([1, 1]))
    assert torch.equal(table.pages().pmax[0], table.pages().pmax[1])


# ------------------------------------------------------------------------------------- selection
def _greedy_pages(scores: torch.Tensor, sizes: torch.Tensor, budget: int) -> set[int]:
    """First pass of a selector that scores every page: the best pages while they fit."""
    order = scores.argsort(descending=True).tolist()
    out, used = set(), 0
    for p in order:
        if scores[p] == float("-inf") or used + int(sizes[p]) > budget:
            break
        out.add(p)
        used += int(sizes[p])
    return out


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 64), min_size=2, max_size=14), page_size=st.integers(2, 16),
       budget=st.integers(0, 120), seed=st.integers(0, 10_000), shared=st.booleans())
def test_whole_chunks_while_they_fit_then_the_best_pages_of_the_next(lengths, page_size, budget, seed, shared):
    _check_page_selection(lengths, page_size, budget, seed, shared)


@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), min_size=60, max_size=300), page_size=st.integers(2, 16),
       budget=st.integers(0, 4000), seed=st.integers(0, 10_000), shared=st.booleans())
def test_page_selection_over_more_chunks_than_the_first_ranking_sorts(lengths, page_size, budget, seed, shared):
    """Past 64 chunks only the top ranks are sorted, more as the budget reaches further down."""
    _check_page_selection(lengths, page_size, budget, seed, shared)


@settings(max_examples=80, deadline=None)
@given(n=st.integers(1, 400), levels=st.integers(1, 6), budget=st.integers(0, 5000), seed=st.integers(0, 10_000))
def test_partial_ranking_equals_a_stable_full_sort(n, levels, budget, seed):
    """Ties (few score levels) and -inf included: the ranks selection reads come out as a stable sort has them."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, levels, (2, 3, n), generator=g).float()
    scores[torch.rand(2, 3, n, generator=g) < 0.1] = float("-inf")
    lengths = torch.randint(1, 50, (n,), generator=g)
    order, sizes, whole, cand, left = _rank_chunks(scores, lengths, budget)
    for b in range(2):
        for h in range(3):
            ranking = scores[b, h].argsort(descending=True, stable=True).tolist()
            taken, used = [], 0
            while len(taken) < n and scores[b, h, ranking[len(taken)]] > float("-inf") \
                    and used + int(lengths[ranking[len(taken)]]) <= budget:
                used += int(lengths[ranking[len(taken)]])
                taken.append(ranking[len(taken)])
            nxt, ahead = [], 0
            for c in ranking[len(taken):]:
                if scores[b, h, c] == float("-inf") or ahead >= CANDIDATES * (budget - used):
                    break
                nxt.append(c)
                ahead += int(lengths[c])
            assert order[b, h][whole[b, h]].tolist() == taken
            assert order[b, h][cand[b, h]].tolist() == nxt
            assert int(left[b, h]) == budget - used


def _check_page_selection(lengths, page_size, budget, seed, shared):
    table, _ = _table(lengths, page_size, seed)
    assume(table.max_pages > 1)  # one page per chunk selects whole chunks (test_one_page_per_chunk_...)
    q = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(seed + 1))
    kmin, kmax, lens, starts = table.view()
    pages = table.pages()
    selector = SharedAcrossHeads(QuestBound()) if shared else QuestBound()
    sel = selector.select_pages(q, kmin, kmax, lens, starts, pages, table.max_pages, budget)
    chunk_scores = selector.score(q, kmin, kmax, starts)
    page_scores = selector.score(q, pages.pmin, pages.pmax, pages.starts)
    for b in range(2):
        for h in range(2):
            ranking = chunk_scores[b, h].argsort(descending=True, stable=True).tolist()
            whole, used = [], 0
            while len(whole) < len(ranking) and used + lengths[ranking[len(whole)]] <= budget:
                used += lengths[ranking[len(whole)]]
                whole.append(ranking[len(whole)])
            left = budget - used
            cand, ahead = [], 0
            for c in ranking[len(whole):]:
                if ahead >= CANDIDATES * left:
                    break
                cand.append(c)
                ahead += lengths[c]
            chosen = set(sel.pages[b, h].nonzero().flatten().tolist())
            of_whole = {p for p in range(len(pages.chunk)) if int(pages.chunk[p]) in whole}
            assert of_whole <= chosen  # the best chunks while they fit, every page of them
            extra = chosen - of_whole
            assert sum(int(pages.lengths[p]) for p in extra) <= left
            in_cand = torch.tensor([int(pages.chunk[p]) in cand for p in range(len(pages.chunk))])
            assert extra <= set(in_cand.nonzero().flatten().tolist())
            scores = page_scores[b, h].masked_fill(~in_cand, float("-inf"))
            assert _greedy_pages(scores, pages.lengths, left) <= extra  # then the best pages of the next chunks
            # the chunk mask names exactly the chunks holding a chosen page
            assert set(sel.chunks[b, h].nonzero().flatten().tolist()) == {int(pages.chunk[p]) for p in chosen}
    assert int(sel.units(lens, pages)[2].sum()) == int((sel.pages * pages.lengths).sum())  # the lists are the mask
    if shared:
        assert torch.equal(sel.pages[:, 0], sel.pages[:, 1])


def test_a_needle_in_a_large_chunk_costs_one_page_not_the_chunk():
    b, h, d = 1, 1, 8
    k = torch.zeros(b, h, 96, d)
    k[:, :, 70, 0] = 5.0  # the only key that matches the query: inside a 96-token chunk
    table = AbstractTable(torch.device("cpu"), 16)
    table.add(torch.zeros(b, h, 4, d), 0)  # sinks
    table.add(torch.randn(b, h, 24, d) * 0.1, 4)
    table.add(k, 28)
    q = torch.zeros(b, h, d)
    q[..., 0] = 1.0
    kmin, kmax, lens, starts = table.view()
    forced = torch.tensor([True, False, False])
    whole = QuestBound().select(q, kmin, kmax, lens, starts, 20, forced)
    assert not whole[0, 0, 2]  # the chunk does not fit a 20-token budget
    sel = QuestBound().select_pages(q, kmin, kmax, lens, starts, table.pages(), table.max_pages, 20, forced)
    pages = table.pages()
    chosen = sel.pages[0, 0].nonzero().flatten().tolist()
    needle_page = int(pages.first[2]) + 70 // 16
    assert needle_page in chosen and sel.chunks[0, 0].tolist() == [True, False, True]  # 4 tokens left fit no page
    assert sum(int(pages.lengths[p]) for p in chosen if int(pages.chunk[p]) != 0) <= 20


def test_one_page_per_chunk_selects_as_whole_chunks():
    table, _ = _table([16, 16, 16, 16, 16], 16, seed=3)
    q = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(4))
    kmin, kmax, lens, starts = table.view()
    for selector in (QuestBound(), Recency()):
        whole = selector.select(q, kmin, kmax, lens, starts, 40)
        sel = selector.select_pages(q, kmin, kmax, lens, starts, table.pages(), table.max_pages, 40)
        assert torch.equal(sel.chunks, whole) and torch.equal(sel.pages, whole)


def test_take_in_order_fills_what_a_large_unit_leaves():
    sizes = torch.tensor([10, 30, 5, 5, 20])
    usable = torch.tensor([True, True, True, False, True])
    assert take_in_order(sizes, usable, 22).tolist() == [True, False, True, False, False]


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), exponent=st.integers(-30, 12))
def test_half_bounds_round_outward_to_the_nearest_float16(seed, exponent):
    """Every float32 min rounds down and every max up, to the nearest float16 on that side (subnormals and
    signed zeros included): the float16 bounds still bound every key, and are as tight as float16 allows."""
    x = torch.randn(4096, generator=torch.Generator().manual_seed(seed)) * 2.0 ** exponent
    x = torch.cat([x, torch.tensor([0.0, -0.0, 65504.0, -65504.0, 6e-8, -6e-8, 1e-9, -1e-9])])
    lo, hi = float16_bounds(x, x)
    assert (lo.float() <= x).all() and (hi.float() >= x).all()
    up, down = torch.tensor(float("inf"), dtype=torch.float16), torch.tensor(float("-inf"), dtype=torch.float16)
    assert (torch.nextafter(lo, up).float() > x).all() and (torch.nextafter(hi, down).float() < x).all()


def test_half_bounds_beyond_the_float16_range_stay_float32():
    """A finite bound float16 cannot hold would become infinite (and 0 x inf scores nothing): the table then
    gives no float16 bounds, and the selection reads the float32 ones, until its rows are rebuilt."""
    from kvtier.kernels import native
    assert float16_bounds(torch.tensor([70000.0]), torch.tensor([70000.0])) is None
    assert float16_bounds(torch.tensor([-1.0]), torch.tensor([65519.0])) is None
    if not native.reads_half():
        pytest.skip("the C library here does not read float16 bounds")
    table, _ = _table([20, 20], 8, 0)
    assert table.half_bounds() is not None
    table.add(torch.full((2, 2, 5, 8), 1e5), 40)
    assert table.half_bounds() is None
    table.rebuild([table.row(0)])
    assert table.half_bounds() is not None


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), min_size=2, max_size=30), seed=st.integers(0, 1000),
       ops=st.lists(st.sampled_from(["add", "truncate", "splice", "move", "refresh", "rows", "rebuild", "clear"]),
                    min_size=1, max_size=8))
def test_half_bounds_follow_every_change_of_the_chunk_rows(lengths, seed, ops):
    """Whatever rewrites chunk rows (appends, truncation, a span spliced out, positions moved, bounds refreshed,
    batch rows reordered, a rebuild), the float16 bounds the table gives are those of its float32 rows now."""
    from kvtier.kernels import native
    from kvtier.rope import Rope
    if not native.reads_half():
        pytest.skip("the C library here does not read float16 bounds")
    gen = torch.Generator().manual_seed(seed)
    table, keys = _table(lengths, 8, seed)
    import transformers as tf
    rope = Rope.from_config(tf.LlamaConfig(hidden_size=16, num_attention_heads=2, num_key_value_heads=2, head_dim=8))
    end = sum(lengths)

    def agrees():
        kmin, kmax, _, _ = table.view()
        lo, hi = table.half_bounds()
        want = float16_bounds(kmin, kmax)
        return torch.equal(lo, want[0]) and torch.equal(hi, want[1])

    for op in ops:
        assert agrees()  # synced before each change, so a stale copy shows after it
        n = len(table)
        if op == "add" or n < 2:
            k = torch.randn(2, 2, 12, 8, generator=gen)
            table.add(k, end)
            end += 12
        elif op == "truncate":  # then a new chunk where the dropped rows were
            table.truncate(n // 2)
            table.add(torch.randn(2, 2, 12, 8, generator=gen), int(table.view()[3][-1] + table.view()[2][-1]))
        elif op == "splice":
            table.splice(n // 3, n // 3 + 1, [])
        elif op == "move":
            table.move(n // 2, 3, rope)
        elif op == "refresh":
            rows = torch.tensor([0, n - 1])
            lens = table.view()[2][rows].tolist()
            table.refresh(rows, torch.randn(2, 2, sum(lens), 8, generator=gen))
        elif op == "rows":
            table.select_rows(torch.tensor([1, 0]))
        elif op == "rebuild":
            table.rebuild([table.row(i) for i in range(n - 1, -1, -1)][:max(1, n // 2)])
        else:
            table.clear()
            table.add(torch.randn(2, 2, 30, 8, generator=gen), 0)
        assert agrees(), op


def test_a_cpu_sparse_step_selects_from_float16_chunk_bounds(monkeypatch):
    """The model's own decode steps hand the C selection the table's float16 chunk bounds, in the step in one
    call (every chunk on the device) and in the step in parts (chunks staged from the host)."""
    from kvtier.kernels import native
    if not native.reads_half():
        pytest.skip("the C library here does not read float16 bounds")
    seen = []
    for name in ("select_pages", "sparse_step"):
        real = getattr(native, name)
        monkeypatch.setattr(native, name, lambda q, lo, *a, real=real, name=name: seen.append((name, lo.dtype))
                            or real(q, lo, *a))
    model = build_model("llama")
    ids = torch.randint(3, 128, (1, 300), generator=torch.Generator().manual_seed(7))
    for placement in (dict(), dict(device_budget=90, host_budget=0, staging_tokens=64)):
        with KVTierCache.for_model(model, **SPARSE, page_size=8, sparse_budget=0.1, **placement) as cache:
            model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, **{cache_kw(model): cache})
    assert {name for name, _ in seen} == {"select_pages", "sparse_step"}
    assert {dtype for _, dtype in seen} == {torch.float16}


# ------------------------------------------------------------------------------------------ caches
def test_page_selection_reads_the_same_tokens_wherever_chunks_live(tmp_path):
    """Pages of chunks brought to the device and of chunks attended from staging give the same logits."""
    ref = build_model("llama")
    ids = torch.randint(3, 128, (1, 400), generator=torch.Generator().manual_seed(5))
    outs = []
    for placement in (dict(), dict(device_budget=90, host_budget=0, staging_tokens=64)):
        model = twin(ref)
        cache = KVTierCache.for_model(model, **SPARSE, page_size=8, sparse_budget=0.1, **placement)
        out = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, **{cache_kw(model): cache})
        outs.append(torch.stack(out.logits))
        layer = cache.tiers.layers[0]
        assert layer.abstracts.max_pages > 1  # chunks of 8 to 48 tokens hold up to six 8-token pages
        cache.close()
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_saved_page_bounds_come_back_with_the_session(tmp_path):
    model = build_model("llama")
    ids = torch.randint(3, 128, (1, 300), generator=torch.Generator().manual_seed(6))
    cache = KVTierCache.for_model(model, **SPARSE, page_size=8, store_path=tmp_path / "s")
    with torch.no_grad():
        model(input_ids=ids, **{cache_kw(model): cache})
    cache.save()
    before = [(layer.abstracts.pages(), layer.abstracts.view()) for layer in cache.tiers.layers]
    cache.close()
    reopened = KVTierCache.open(tmp_path / "s", model, mode="sparse")
    assert reopened.config.page_size == 8
    for layer, (pages, chunks) in zip(reopened.tiers.layers, before):
        again = layer.abstracts.pages()
        for name in ("pmin", "pmax", "starts", "lengths", "offsets", "chunk", "first", "count"):
            assert torch.equal(getattr(again, name), getattr(pages, name)), name
        assert all(torch.equal(x, y) for x, y in zip(layer.abstracts.view(), chunks))
    reopened.close()


def _pieces_run(batch, step_check, list_check=None, patch=None):
    """Decode 12 steps with a small device budget, so evictions leave holes and promoted chunks and the window
    land in pieces; step_check(layer) after every sparse step's attention, list_check as `_arena_lists`."""
    import kvtier.read as read

    model = build_model("llama")
    ids = torch.randint(3, 128, (batch, 600), generator=torch.Generator().manual_seed(9))
    cache = KVTierCache.for_model(model, **SPARSE, page_size=8, sparse_budget=0.15, device_budget=160,
                                  host_budget=0)
    lists, runs_of = read._arena_lists, read._arena_runs
    if list_check is not None:
        read._arena_lists = lambda *a: list_check(lists, runs_of, *a)
    try:
        with torch.no_grad():
            out = model(input_ids=ids, **{cache_kw(model): cache})
            tok = out.logits[:, -1:].argmax(-1)
            if patch is not None:
                patch(read)
            for _ in range(12):
                out = model(input_ids=tok, **{cache_kw(model): cache})
                tok = out.logits[:, -1:].argmax(-1)
                for layer in cache.tiers.layers:
                    step_check(layer)
    finally:
        read._arena_lists, read._arena_runs = lists, runs_of
        cache.close()


@pytest.mark.parametrize("batch", [1, 2])
def test_runs_of_slots_name_the_slots_the_lists_name_with_chunks_in_pieces(batch):
    """Where the C library does not read the arena, every step's runs (read as windows) cover exactly the slots
    the slot lists name, for every row of the batch, with chunks and the window in pieces."""
    checked, in_pieces = [], []

    def compare(lists, runs_of, layer, sel, whole_ok, parts_ok):
        idx, counts = lists(layer, sel, whole_ok, parts_ok)
        runs = runs_of(layer, sel.units(layer.abstracts.view()[2], layer.abstracts.pages(), whole_ok, parts_ok))
        window = layer.win_slots
        if int((window.diff() != 1).sum()) + 1 <= 4:  # a window in a few pieces is read as runs
            checked.append(runs is not None)
        if runs is not None:
            start, size = runs
            for b in range(idx.shape[0]):
                for h in range(idx.shape[1]):
                    want = sorted(idx[b, h, :counts[b, h]].tolist())
                    got = sorted(s for a, n in zip(start[b, h].tolist(), size[b, h].tolist()) for s in range(a, a + n))
                    assert got == want
            in_pieces.append(layer.slot_runs().most > 1)
        return idx, counts

    def lists_only(read):
        read._arena_runs = lambda *a: None  # take the list path, where `compare` checks the runs

    with cpu_path("torch"):
        _pieces_run(batch, lambda layer: None, compare, lists_only)
    assert checked and all(checked) and any(in_pieces)


@pytest.mark.parametrize("batch", [1, 2])
def test_the_c_library_reads_the_slots_the_slot_table_names_with_chunks_in_pieces(batch, monkeypatch):
    """Where it reads the arena in place, every step's attention (`native.unit_attention`, the step in parts
    here: chunks move between the arena and the store) equals attention over the slots the slot table names for
    the units, then the window's, for every row of the batch, with chunks in pieces."""
    from kvtier.kernels import native, sparse_decode_attention_ref

    checked, in_pieces = [], []
    real = native.unit_attention

    def spy(q, units, lengths, table, window, k, v, scale):
        got = real(q, units, lengths, table, window, k, v, scale)
        if got is not None:
            flat, offsets, _ = (t.tolist() for t in table)
            b, h = units[0].shape[:2]
            idx = [[flat[offsets[c] + o + i] for c, o, n in zip(*(u[r, j].tolist() for u in units)) for i in range(n)]
                   + window.tolist() for r in range(b) for j in range(h)]
            width = max(len(x) for x in idx)
            slots = torch.tensor([x + [0] * (width - len(x)) for x in idx]).view(b, h, width)
            want = sparse_decode_attention_ref(q, k, v, slots, torch.tensor([len(x) for x in idx]).view(b, h), scale)
            torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
            checked.append(True)
        return got

    def pieces(layer):
        if layer.pool.used:
            in_pieces.append(layer.slot_runs().most > 1)

    with cpu_path("native"):
        monkeypatch.setattr(native, "unit_attention", spy)
        _pieces_run(batch, pieces)
    assert checked and any(in_pieces)


@pytest.mark.parametrize("seed", range(20))
def test_slot_runs_from_numpy_equal_the_torch_build(seed):
    """A CPU table's runs are built in numpy: the same pieces, in the same order, as the torch build (which a
    GPU's tables take), for chunks in one run, in pieces, in any slot order and off the device."""
    from kvtier.layers import SlotRuns

    g = torch.Generator().manual_seed(seed)
    chunks = int(torch.randint(1, 40, (1,), generator=g))
    lengths = torch.randint(1, 12, (chunks,), generator=g)
    on = torch.rand(chunks, generator=g) < 0.7
    total = int(lengths[on].sum())
    layout = seed % 3  # 0: one run end to end; 1: ascending with gaps; 2: any order
    slots = torch.arange(total) if layout == 0 else torch.randperm(3 * total, generator=g)[:total]
    if layout == 1:
        slots = slots.sort().values
    offsets = torch.full((chunks,), -1, dtype=torch.long)
    offsets[on] = (lengths[on].cumsum(0) - lengths[on])
    got = SlotRuns._of_np(slots.numpy(), offsets.numpy(), lengths.numpy())
    want = SlotRuns._of_torch(slots, offsets, lengths)
    for name in ("first", "count", "offset", "slot", "length"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert got.most == want.most
