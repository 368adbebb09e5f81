"""The device arena holds what it is asked to, plus a little: no doubling, one growth for a whole prompt,
and room for the first decode tokens without copying the arena."""

from __future__ import annotations

import pytest
import torch

import kvtier
from kvtier import KVTierCache
from kvtier.cache import cache_argument
from kvtier.errors import CacheInputError, CacheMemoryError
from kvtier.store.pools import DevicePool

from conftest import VOCAB, build_model


def test_growth_adds_a_thirty_second_not_a_doubling():
    pool = DevicePool(None, torch.device("cpu"), torch.float32)
    pool.init_shape(1, 2, 4)
    pool.allocate(4096)
    assert pool.capacity == 4096 + 128  # need plus 1/32
    pool.allocate(128)
    assert pool.capacity == 4096 + 128  # the headroom took it without growing
    pool.allocate(1)
    assert 4225 <= pool.capacity <= 4225 * 1.04


def test_reserve_grows_once_and_respects_the_budget():
    pool = DevicePool(1000, torch.device("cpu"), torch.float32)
    pool.reserve(5000)  # before the shape is known: applied at init_shape
    pool.init_shape(1, 2, 4)
    assert pool.capacity == 1000  # capped by the budget
    pool = DevicePool(None, torch.device("cpu"), torch.float32)
    pool.init_shape(1, 2, 4)
    pool.reserve(3000)
    cap = pool.capacity
    for _ in range(30):
        pool.allocate(100)
    assert pool.capacity == cap  # 3000 slots came without a resize


@torch.inference_mode()
def test_segmented_prefill_allocates_about_the_prompt_and_first_step_does_not_grow():
    model = build_model("llama")
    ids = torch.randint(3, VOCAB, (1, 1024), generator=torch.Generator().manual_seed(0))
    with KVTierCache.for_model(model, chunk_size=32) as cache:
        kvtier.prefill(model, cache, ids, segment_tokens=256, progress=False)
        pools = list(cache.tiers.device_pools.values())
        caps = [p.capacity for p in pools]
        assert all(1024 <= c <= 1.05 * 1024 for c in caps)
        model(input_ids=ids[:, :1], use_cache=True, **{cache_argument(model): cache})  # the first decode step
        assert [p.capacity for p in pools] == caps


def test_decode_tokens_join_the_recent_window_in_order():
    """A decode token's slot is kept as an int until someone reads the window: the window read after any number
    of steps (across seals and growths) is its tokens' slots, oldest first, each holding its position."""
    model = build_model("llama")
    ids = torch.randint(3, VOCAB, (1, 40), generator=torch.Generator().manual_seed(0))
    with KVTierCache.for_model(model, chunk_size=16, recent_window=8) as cache:
        kvtier.prefill(model, cache, ids, segment_tokens=64, progress=False)
        tok = ids[:, -1:]
        for step in range(60):
            model(input_ids=tok, use_cache=True, **{cache_argument(model): cache})
            if step % 7 == 3:
                for layer in cache.layers:
                    n = layer.win_len
                    slots = layer.win_slots
                    assert slots.numel() == n == layer.length - layer.win_start
                    assert layer.pool.slot_pos[slots].tolist() == list(range(layer.win_start, layer.length))
                    assert (layer.pool.slot_owner[slots] == -1).all()


def test_reserve_refuses_what_is_not_a_token_count():
    with KVTierCache.for_model(build_model("llama")) as cache:
        for bad in (-1, 1.5, "8GiB", True):
            with pytest.raises(CacheInputError, match="token count"):
                cache.reserve(bad)


def test_reserve_beyond_memory_is_a_clear_error_and_changes_nothing():
    model = build_model("llama")
    ids = torch.randint(3, VOCAB, (1, 8), generator=torch.Generator().manual_seed(0))
    with KVTierCache.for_model(model) as cache:
        model(input_ids=ids, use_cache=True, **{cache_argument(model): cache})
        pools = list(cache.tiers.device_pools.values())
        before = [(p.capacity, p.expected) for p in pools]
        for tokens in (10**15, 2**62):  # petabytes; a size whose byte count overflows torch's
            with pytest.raises(CacheMemoryError, match="a layer's arena of [0-9]+ tokens"):
                cache.reserve(tokens)
        assert [(p.capacity, p.expected) for p in pools] == before
        out = model(input_ids=ids[:, :1], use_cache=True, **{cache_argument(model): cache})  # still serves
        assert torch.isfinite(out.logits).all() and cache.get_seq_length() == 9


def test_reserve_announced_before_the_first_pass_is_a_hint_when_memory_lacks():
    model = build_model("llama")
    ids = torch.randint(3, VOCAB, (1, 8), generator=torch.Generator().manual_seed(0))
    with KVTierCache.for_model(model) as cache:
        cache.reserve(10**15)  # the arena's shape is not known yet: nothing to size
        with pytest.warns(UserWarning, match="grows as tokens arrive"):
            model(input_ids=ids, use_cache=True, **{cache_argument(model): cache})
        assert all(p.capacity < 1000 for p in cache.tiers.device_pools.values())
        assert cache.get_seq_length() == 8


def test_a_growth_the_memory_cannot_hold_drops_the_headroom_then_fails_cleanly(monkeypatch):
    pool = DevicePool(None, torch.device("cpu"), torch.float32)
    pool.init_shape(1, 2, 4)
    per_token = 2 * 2 * 4 * 4 + 16
    monkeypatch.setattr("kvtier.store.pools.available_bytes", lambda device: 1000 * per_token)
    pool.reserve(900)  # fits
    cap = pool.capacity
    pool.expected = 5000  # announced more than fits: the growth takes what is needed, no more
    slots = pool.allocate(cap + 10)
    assert len(slots) == cap + 10 and cap + 10 <= pool.capacity <= 1000 and pool.expected <= cap + 10
    used, high, capacity = pool.used, pool.high_water, pool.capacity
    with pytest.raises(CacheMemoryError, match="available"):
        pool.allocate(2000)  # the need itself does not fit
    assert (pool.used, pool.high_water, pool.capacity) == (used, high, capacity)  # nothing taken


def test_a_slot_asked_for_after_another_follows_it_where_it_is_free():
    """The recent window grows one slot per decode step: placed right after its last slot where that is free,
    it stays one run (read as one), instead of landing in the lowest hole each time."""
    pool = DevicePool(budget=None, device=torch.device("cpu"), dtype=torch.float32)
    pool.init_shape(1, 1, 4)
    a, _, c = pool.allocate(8), pool.allocate(8), pool.allocate(8)  # slots 0-7, 8-15, 16-23
    pool.release(a)  # a hole at 0-7
    pool.release(c)  # trailing: high water back to 16
    assert pool.allocate(1).tolist() == [0]  # no hint: the lowest hole
    assert pool.allocate(1, after=15).tolist() == [16]  # after the last used slot: fresh, not the hole at 1
    assert pool.allocate(2, after=0).tolist() == [1, 2]  # the hole right after slot 0
    assert pool.allocate(6, after=2).tolist() == [3, 4, 5, 6, 7, 17]  # 5 free after slot 2: the usual policy


def test_a_cpu_arena_grows_into_its_reserved_planes_without_copying():
    """On a CPU the arena's planes are reserved wider than its capacity (address space, committed as written):
    a growth that fits widens the view (same memory, nothing copied, new slots zero); one past the reservation
    copies into new planes. What the arena reports holding is its capacity either way."""
    pool = DevicePool(None, torch.device("cpu"), torch.float32)
    pool.init_shape(1, 2, 4)
    slots = pool.allocate(100)
    x = torch.randn(1, 2, 100, 4)
    pool.write(slots, x, x + 1, torch.arange(100))
    ptr, cap, tables = pool.k.data_ptr(), pool.capacity, pool.slot_pos.data_ptr()
    pool.allocate(cap - 100 + 5)
    assert pool.capacity > cap and pool.k.data_ptr() == ptr  # grown in place
    assert pool.slot_pos.data_ptr() == tables  # the slot tables too: reserved as wide as the planes
    assert torch.equal(pool.k[:, :, :100], x) and torch.equal(pool.v[:, :, :100], x + 1)
    assert not pool.k[:, :, 100:].any() and not pool.v[:, :, 100:].any()
    assert pool.slot_pos[:100].tolist() == list(range(100)) and (pool.slot_pos[100:] == -1).all()
    assert pool.allocated_bytes == pool.capacity * pool.bytes_per_token()
    reserved = pool._planes[0].slots
    pool.allocate(reserved - pool.used + 1)  # past the reservation: new planes, the data carried over
    assert pool.k.data_ptr() != ptr and pool._planes[0].slots >= pool.capacity > reserved
    assert torch.equal(pool.k[:, :, :100], x) and torch.equal(pool.v[:, :, :100], x + 1)
    assert pool.slot_pos[:100].tolist() == list(range(100))


def test_a_growth_in_place_clears_slots_freed_below_the_old_capacity():
    """Slots between high water and the old capacity may hold a dropped token (written, then released):
    widening the arena hands them out again as zeros, free in the slot tables."""
    pool = DevicePool(None, torch.device("cpu"), torch.float32)
    pool.init_shape(1, 1, 4)
    slots = pool.allocate(40)
    pool.write(slots, torch.ones(1, 1, 40, 4), torch.ones(1, 1, 40, 4), torch.arange(40), owner=3)
    pool.release(slots[30:])  # high water back to 30, the dropped tokens' data still in slots 30-39
    pool.k[:, :, 30:40] = 7.0  # as if a dropped token had left data behind
    pool._tables[:, 30:40] = 9  # ... and stale table entries
    cap = pool.capacity
    pool.allocate(cap - 30 + 1)
    assert pool._planes is not None and pool.capacity > cap
    assert not pool.k[:, :, 30:].any() and (pool.slot_pos[30:] == -1).all() and (pool.slot_owner[30:] == -1).all()
    assert pool.slot_owner[:30].eq(3).all() and pool.k[:, :, :30].eq(1).all()


def test_a_reservation_stays_within_the_budget_and_a_row_reorder_drops_it():
    pool = DevicePool(300, torch.device("cpu"), torch.float32)
    pool.init_shape(1, 2, 4)
    pool.allocate(200)
    assert pool.capacity <= pool._planes[0].slots <= 300
    pool.select_rows(torch.tensor([0, 0]))  # a new, exact arena for two rows
    assert pool._planes is None and pool.k.shape[0] == 2 and pool.k.is_contiguous()
    pool.allocate(pool.capacity - 200 + 1)  # grows by a copy, keeping the rows
    assert pool.k.shape[0] == 2 and pool._planes is not None


def test_a_decode_token_after_the_window_takes_the_next_free_slot_or_none():
    pool = DevicePool(budget=20, device=torch.device("cpu"), dtype=torch.float32)
    pool.init_shape(1, 1, 4)
    a = pool.allocate(8)
    assert pool.allocate_after(7) == 8 and (pool.used, pool.high_water) == (9, 9)
    pool.release(a[2:4])  # a hole at 2-3
    assert pool.allocate_after(1) == 2 and pool.used == 8  # the hole right after
    assert pool.allocate_after(4) is None  # slot 5 is in use
    pool.write_token(2, torch.ones(1, 1, 1, 4), torch.ones(1, 1, 1, 4), 42)
    assert pool.slot_pos[2] == 42 and pool.slot_owner[2] == -1 and pool.k[0, 0, 2].tolist() == [1.0] * 4
    pool.allocate(pool.budget - pool.used)
    assert pool.allocate_after(pool.high_water - 1) is None  # the budget is spent: the caller evicts


def test_without_populate_the_committed_slots_are_touched_by_writing_zeros(monkeypatch):
    monkeypatch.setattr("kvtier.store.pools._MADV_POPULATE_WRITE", 12345)  # advice the kernel refuses
    pool = DevicePool(None, torch.device("cpu"), torch.float32)
    pool.init_shape(1, 2, 4)
    slots = pool.allocate(50)
    pool.write(slots, torch.ones(1, 2, 50, 4), torch.ones(1, 2, 50, 4), torch.arange(50))
    pool.allocate(pool.capacity - 50 + 1)  # grows in place through the fallback
    assert pool.k[:, :, :50].eq(1).all() and not pool.k[:, :, 50:].any()


def test_slots_released_in_pieces_and_out_of_order_become_merged_holes():
    pool = DevicePool(None, torch.device("cpu"), torch.float32)
    pool.init_shape(1, 1, 4)
    slots = pool.allocate(20)
    pool.write(slots, torch.ones(1, 1, 20, 4), torch.ones(1, 1, 20, 4), torch.arange(100, 120))
    pool.release(torch.tensor([9, 3, 4, 11, 2, 10]))  # two runs given out of order: 2-4 and 9-11
    assert pool._hole_starts == [2, 9] and pool._hole_len == {2: 3, 9: 3} and pool.used == 14
    freed = [2, 3, 4, 9, 10, 11]
    assert pool.slot_pos[freed].eq(-1).all()
    assert pool.slot_pos[[0, 1, 5, 8, 12, 19]].tolist() == [100, 101, 105, 108, 112, 119]
    pool.release(torch.tensor([8, 5, 7, 6]))  # fills 5-8: one hole 2-11
    assert pool._hole_starts == [2] and pool._hole_len == {2: 10}
    pool.release(torch.tensor([19, 17, 18]))  # trailing: the high water comes down to 17
    assert pool.high_water == 17 and pool._hole_starts == [2]
    assert pool.allocate(10).tolist() == list(range(2, 12))  # the merged hole, in one run


class _Advice:
    """An mmap stand-in that records madvise calls and passes everything on."""

    def __init__(self, mapping):
        self.mapping, self.calls = mapping, []

    def madvise(self, option, start=0, length=None):
        self.calls.append((option, start, length))
        return self.mapping.madvise(option, start, length) if length is not None else self.mapping.madvise(option)

    def __len__(self):
        return len(self.mapping)


def test_a_cpu_arena_asks_for_huge_pages_only_inside_committed_slots():
    """Planes of 2 MiB or more start on 2 MiB boundaries, and a commit asks for huge pages over the whole 2 MiB
    pages inside the slots it commits, never past them (a huge page there would hold memory not asked for).
    Smaller planes keep their width and get no huge pages."""
    import mmap

    from kvtier.store.pools import ReservedPlanes

    mib2 = 2 << 20
    planes = ReservedPlanes.create(1, 2, 20000, 64, torch.float32)  # 256-byte rows: 5.1 MB a plane asked
    assert planes.slots == 24576 and planes.tensor.data_ptr() % mib2 == 0  # widened to 6 MiB, aligned
    planes._mapping = rec = _Advice(planes._mapping)
    planes.commit(0, 10000)  # 2.56 MB a plane: one whole 2 MiB page each
    planes.commit(10000, 20000)  # 2.56-5.12 MB: no whole 2 MiB page inside
    start = planes._offset
    huge = [(s, n) for option, s, n in rec.calls if option == mmap.MADV_HUGEPAGE]
    assert huge == [(start, mib2), (start + 3 * mib2, mib2)]
    committed = [(s, s + n) for option, s, n in rec.calls if option != mmap.MADV_HUGEPAGE]
    assert all(any(a <= s and s + n <= b for a, b in committed) for s, n in huge)
    planes.tensor[:, :, :20000] = 1.0  # the committed slots are plain memory
    assert planes.tensor[:, :, :20000].eq(1).all() and not planes.tensor[:, :, 20000:].any()
    small = ReservedPlanes.create(1, 2, 100, 4, torch.float32)
    small._mapping = rec = _Advice(small._mapping)
    small.commit(0, 100)
    assert small.slots == 100 and not [c for c in rec.calls if c[0] == mmap.MADV_HUGEPAGE]
