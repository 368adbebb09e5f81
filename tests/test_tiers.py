"""Pools and the tier manager: budgets hold after every operation, and no chunk is ever lost or altered."""

from __future__ import annotations

import tempfile

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.config import KVTierConfig
from kvtier.store.chunk import Chunk, Tier
from kvtier.store.disk import DiskStore
from kvtier.store.eviction import LRUEviction
from kvtier.store.pools import DevicePool, HostPool
from kvtier.store.tiers import TierManager

B, H, D = 2, 2, 4


def test_device_pool_reuses_lowest_slots_and_keeps_budget():
    pool = DevicePool(10, torch.device("cpu"), torch.float32)
    pool.init_shape(B, H, D)
    a = pool.allocate(4)
    b = pool.allocate(4)
    assert pool.allocate(3) is None  # 8 + 3 > 10
    pool.release(a)
    assert pool.high_water == 8 and not pool.dense
    c = pool.allocate(2)
    assert sorted(c.tolist()) == [0, 1]
    pool.release(b)
    assert pool.high_water == 2  # trailing holes pulled the mark down
    assert pool.used == 2 and pool.peak == 8


def test_host_pool_budget():
    pool = HostPool(5, pin=False)
    k = torch.zeros(B, H, 3, D)
    assert pool.put(1, k, k)
    assert not pool.put(2, k, k)
    pool.pop(1)
    assert pool.put(2, k, k) and pool.used == 3


def _manager(device_budget, host_budget, tmp):
    cfg = KVTierConfig(device_budget=device_budget, host_budget=host_budget, chunk_size=4, sink_tokens=0,
                       recent_window=0)
    return TierManager(cfg, [0], torch.device("cpu"), torch.float32, b"s" * 16,
                       lambda: DiskStore(tempfile.mkdtemp(dir=tmp), remove_on_close=True), (H, D))


ops = st.lists(
    st.one_of(
        st.tuples(st.just("place"), st.integers(1, 7)),
        st.tuples(st.just("fetch"), st.integers(0, 50)),
        st.tuples(st.just("free"), st.integers(0, 50)),
        st.tuples(st.just("reorder"), st.lists(st.integers(0, B - 1), min_size=B, max_size=B)),  # beams repeat rows
        st.tuples(st.just("evict"), st.integers(0, 50)),  # free device room, holes in the arena
        st.tuples(st.just("promote_group"), st.lists(st.integers(0, 50), max_size=6)),
        st.tuples(st.just("read_group"), st.lists(st.integers(0, 50), min_size=1, max_size=6)),
    ),
    min_size=8,  # long enough for placements, evictions and promotions to meet
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(ops=ops, device_budget=st.integers(4, 16), host_budget=st.one_of(st.none(), st.integers(0, 12)))
def test_tier_manager_invariants(ops, device_budget, host_budget, tmp_path_factory):
    tm = _manager(device_budget, host_budget, tmp_path_factory.mktemp("tiers"))
    tm.device_pools[0].init_shape(B, H, D)
    live: dict[int, tuple[Chunk, torch.Tensor, torch.Tensor]] = {}
    pos = 0
    try:
        for op, arg in ops:
            if op == "place":
                k, v = torch.randn(B, H, arg, D), torch.randn(B, H, arg, D)
                chunk = Chunk(0, tm.new_chunk_id(), pos, arg, Tier.DEVICE, B)
                chunk.row = chunk.chunk_id  # any distinct row: the pool's owner marks must name it
                pos += arg
                tm.place(chunk, k, v)
                live[chunk.chunk_id] = (chunk, k, v)
            elif op == "fetch" and live:
                chunk, k, v = list(live.values())[arg % len(live)]
                fk, fv = tm.fetch(chunk)
                assert torch.equal(fk, k) and torch.equal(fv, v), f"{chunk.name()} changed in {chunk.tier.name}"
                tm.promote(chunk, fk, fv)
            elif op == "free" and live:
                cid = list(live)[arg % len(live)]
                tm.free([live.pop(cid)[0]])
            elif op == "evict" and live:
                chunk = list(live.values())[arg % len(live)][0]
                if chunk.tier == Tier.DEVICE:
                    tm.evict_from_device(chunk)
            elif op == "promote_group" and live:
                # Any chunks, resident or not, in any order (duplicates dropped): those that fit go up as groups.
                picked = list({id(c): c for c in (list(live.values())[i % len(live)][0] for i in arg)}.values())
                free = tm.device_pools[0].free
                below = [c for c in picked if c.tier != Tier.DEVICE]
                rest = tm.promote_into_free_room(0, picked)
                assert all(c.tier != Tier.DEVICE for c in rest) and all(c in below for c in rest)
                assert sum(c.length for c in below if c not in rest) <= free  # free room only, nothing evicted
                assert all(c.tier == Tier.DEVICE for c in below if c not in rest)
            elif op == "read_group" and live:
                picked = [list(live.values())[i % len(live)] for i in arg]
                n = sum(c.length for c, _, _ in picked)
                k_out, v_out = torch.full((B, H, n, D), float("nan")), torch.full((B, H, n, D), float("nan"))
                tm.read_into([c for c, _, _ in picked], k_out, v_out)
                assert torch.equal(k_out, torch.cat([k for _, k, _ in picked], 2))
                assert torch.equal(v_out, torch.cat([v for _, _, v in picked], 2))
            elif op == "reorder":
                index = torch.tensor(arg)
                tm.select_rows(0, [c for c, _, _ in live.values()], index)
                live = {cid: (c, k[index], v[index]) for cid, (c, k, v) in live.items()}
            _check(tm, live, device_budget, host_budget)
        for chunk, k, v in live.values():  # nothing lost, wherever it ended up
            fk, fv = tm.fetch(chunk)
            assert torch.equal(fk, k) and torch.equal(fv, v)
    finally:
        tm.close()


def _check(tm, live, device_budget, host_budget):
    dev, host = tm.device_pools[0], tm.host_pools[0]
    assert dev.used <= device_budget
    assert host_budget is None or host.used <= host_budget
    chunks = [c for c, _, _ in live.values()]
    assert dev.used == sum(c.length for c in chunks if c.tier == Tier.DEVICE)
    assert host.used == sum(c.length for c in chunks if c.tier == Tier.HOST)
    for c in chunks:
        if c.tier == Tier.DISK:
            assert c.on_disk and tm.disk.contains(c.key)
        if c.tier == Tier.DEVICE:  # the pool knows which position of which chunk each of its slots holds
            assert torch.equal(dev.slot_pos[c.slots], torch.arange(c.start, c.end))
            assert bool((dev.slot_owner[c.slots] == c.row).all())
    owned = sorted(s for c in chunks if c.tier == Tier.DEVICE for s in c.slots.tolist())
    assert owned == sorted(set(owned)) and len(owned) == dev.used  # no slot shared, none leaked
    live_keys = {c.key for c in chunks if c.on_disk}
    if tm.has_disk:
        assert set(tm.disk.keys()) == live_keys  # freed chunks leave no records behind


def test_device_pool_hands_out_one_run_where_holes_allow_and_keeps_track_of_every_hole():
    """Against a plain set of used slots, over random allocate/release traces (releases in any order): an
    allocation takes the lowest run of holes that fits it whole, else the lowest holes and then fresh slots;
    no slot is handed out twice; high water is one past the highest used slot; the pool's runs of holes are
    exactly the free slots below high water, merged."""
    import random

    for seed in range(60):
        rnd = random.Random(seed)
        pool = DevicePool(rnd.choice([None, 64, 200]), torch.device("cpu"), torch.float32)
        pool.init_shape(1, 1, 2)
        live, used = [], set()
        for _ in range(150):
            if live and rnd.random() < 0.45:
                slots = live.pop(rnd.randrange(len(live)))
                if slots.numel() > 1 and rnd.random() < 0.3:
                    slots = slots[torch.randperm(slots.numel())]
                pool.release(slots)
                used -= set(slots.tolist())
            else:
                n = rnd.randint(1, 24)
                holes = sorted(set(range(pool.high_water)) - used)
                runs = []
                for h in holes:
                    if runs and runs[-1][1] == h:
                        runs[-1][1] = h + 1
                    else:
                        runs.append([h, h + 1])
                got = pool.allocate(n)
                if got is None:
                    assert pool.budget is not None and len(used) + n > pool.budget
                    continue
                g = got.tolist()
                fit = [r for r in runs if r[1] - r[0] >= n]
                assert g == (list(range(fit[0][0], fit[0][0] + n)) if fit else
                             holes[:n] + list(range(pool.high_water - (n - len(holes[:n])), pool.high_water)))
                assert not set(g) & used
                used |= set(g)
                live.append(got)
            assert pool.used == len(used) and pool.high_water == (max(used) + 1 if used else 0)
            starts = pool._hole_starts
            assert all(a + pool._hole_len[a] < b for a, b in zip(starts, starts[1:]))  # sorted, merged
            assert {s for a in starts for s in range(a, a + pool._hole_len[a])} == set(range(pool.high_water)) - used


def test_victims_come_in_the_order_victim_picks_them_one_by_one():
    g = torch.Generator().manual_seed(0)
    chunks = [Chunk(0, i, start=int(s), length=8, tier=Tier.DEVICE, stored_batch=1, last_used=int(u),
                    pinned=i == 0) for i, (s, u) in enumerate(zip(torch.randperm(40, generator=g) * 8,
                                                                  torch.randint(0, 5, (40,), generator=g)))]
    policy, protect = LRUEviction(), {3, 7}
    left, picked = list(chunks), []
    while (c := policy.victim(left, protect)) is not None:
        picked.append(c)
        left.remove(c)
    assert list(policy.victims(chunks, protect)) == picked and len(picked) == 37  # not the sink, not protected


def test_allocate_each_gives_each_chunk_a_whole_hole_where_one_fits():
    """A group promoted into the holes evictions left: each chunk takes the lowest hole that holds it whole (one
    run), where one allocation for the group would split its chunks across the holes; over the budget, nothing
    is taken."""
    pool = DevicePool(100, torch.device("cpu"), torch.float32)
    pool.init_shape(1, 1, 2)
    first = pool.allocate(90)
    pool.release(first[10:18])  # holes: [10, 18) and [40, 52)
    pool.release(first[40:52])
    used = pool.used
    assert pool.allocate_each([12, 20]) is None and pool.used == used  # 70 + 32: more than the budget of 100
    a, b = pool.allocate_each([12, 8])
    assert a.tolist() == list(range(40, 52)) and b.tolist() == list(range(10, 18))
    assert pool.used == 90 and pool.dense
    pool.release(torch.cat([a, b]))
    whole = pool.allocate(20)  # for comparison: one allocation for both takes the lowest holes, split
    assert whole.tolist() == list(range(10, 18)) + list(range(40, 52))


def test_allocate_run_takes_one_run_or_nothing():
    """A group comes up in one run where a hole holds it all or no hole is left (fresh slots), else nothing is
    taken (then its chunks are placed one by one)."""
    pool = DevicePool(100, torch.device("cpu"), torch.float32)
    pool.init_shape(1, 1, 2)
    assert pool.allocate_run(30).tolist() == list(range(30))  # no holes: fresh slots
    pool.release(torch.arange(5, 15))  # a hole of 10
    used = pool.used
    assert pool.allocate_run(12) is None and pool.used == used  # would land in pieces
    assert pool.allocate_run(8).tolist() == list(range(5, 13))
    assert pool.allocate_run(80) is None and pool.used == used + 8  # over the budget
