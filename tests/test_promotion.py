"""Batched promotion: chunks brought up from host and disk a group at a time (one read transaction, one slot
allocation, one write of slot positions and owners) hold exactly what they held, keep the budgets and the
accounting, and a damaged record anywhere in a group fails the group with the error that names it."""

from __future__ import annotations

import dataclasses
import shutil
import tempfile

import lmdb
import numpy as np
import pytest
import torch
from conftest import build_model, twin
from helpers import cache_kw

from kvtier import KVTierCache, StoreCorruptError, StoreMismatchError, StoreMissingRecordError, prefill
from kvtier.config import KVTierConfig
from kvtier.store.chunk import Chunk, Tier
from kvtier.store.disk import DiskStore
from kvtier.store.pools import _as_run, _runs_of
from kvtier.store.tiers import TierManager

B, H, D = 2, 2, 4
LENGTHS = [3, 5, 4, 6, 2, 5, 4, 3, 6, 5]


def _manager(tmp, device_budget=64, host_budget=8, staging_tokens=12):
    cfg = KVTierConfig(device_budget=device_budget, host_budget=host_budget, chunk_size=4, sink_tokens=0,
                       recent_window=0, staging_tokens=staging_tokens)
    tm = TierManager(cfg, [0], torch.device("cpu"), torch.float32, b"s" * 16,
                     lambda: DiskStore(tempfile.mkdtemp(dir=tmp), remove_on_close=True), (H, D))
    tm.device_pools[0].init_shape(B, H, D)
    return tm


def _fill(tm, reorder: bool = True) -> dict[int, tuple[Chunk, torch.Tensor, torch.Tensor]]:
    """Chunks of uneven lengths placed through the tiers, then all sent below the device: some on the host,
    the rest only on disk, with row maps (a beam reorder) on both if `reorder` (else the disk records are
    decoded straight into place)."""
    live, pos = {}, 0
    for i, n in enumerate(LENGTHS):
        k, v = torch.randn(B, H, n, D), torch.randn(B, H, n, D)
        chunk = Chunk(0, tm.new_chunk_id(), pos, n, Tier.DEVICE, B, row=i)
        tm.place(chunk, k, v)
        live[chunk.chunk_id] = (chunk, k, v)
        pos += n
    if reorder:
        index = torch.tensor([1, 0])
        tm.select_rows(0, [c for c, _, _ in live.values()], index)
        live = {cid: (c, k[index], v[index]) for cid, (c, k, v) in live.items()}
    for chunk, _, _ in live.values():
        if chunk.tier == Tier.DEVICE:
            tm.evict_from_device(chunk)
    return live


def _check_resident(tm, live):
    pool = tm.device_pools[0]
    owned = []
    for chunk, k, v in live.values():
        fk, fv = tm.fetch(chunk)
        assert torch.equal(fk, k) and torch.equal(fv, v), f"{chunk.name()} changed in {chunk.tier.name}"
        if chunk.tier == Tier.DEVICE:
            assert torch.equal(pool.slot_pos[chunk.slots], torch.arange(chunk.start, chunk.end))
            assert bool((pool.slot_owner[chunk.slots] == chunk.row).all())
            owned += chunk.slots.tolist()
    assert len(owned) == len(set(owned)) == pool.used <= pool.budget
    assert tm.host_pools[0].used == sum(c.length for c, _, _ in live.values() if c.tier == Tier.HOST)


@pytest.mark.parametrize("reorder", [True, False], ids=["row-maps", "direct"])
@pytest.mark.parametrize("holes", [False, True], ids=["fresh-run", "into-holes"])
def test_group_promotion_brings_exactly_the_chunks_that_fit(tmp_path, holes, reorder):
    tm = _manager(tmp_path, device_budget=30)
    try:
        live = _fill(tm, reorder)
        chunks = [c for c, _, _ in live.values()]
        assert {c.tier for c in chunks} == {Tier.HOST, Tier.DISK} and tm.device_pools[0].used == 0
        pool = tm.device_pools[0]
        if holes:  # slots freed in the middle of the arena: a group lands in holes and fresh slots alike
            keep = pool.allocate(20)
            pool.release(keep[2:9])
            pool.release(keep[12:15])
        before = tm.stats()
        free = pool.free
        rest = tm.promote_into_free_room(0, chunks)
        moved = [c for c in chunks if c not in rest]
        assert sum(c.length for c in moved) <= free < sum(c.length for c in moved) + min(c.length for c in rest)
        assert all(c.tier == Tier.DEVICE for c in moved) and all(c.tier != Tier.DEVICE for c in rest)
        # each chunk in the lowest hole that holds it whole; a chunk no hole holds is read into its pieces
        runs = [_as_run(c.slots) is not None for c in moved]
        assert all(runs) if not holes else (any(runs) and not all(runs))
        after = tm.stats()
        assert after.device.misses - before.device.misses == len(moved)
        assert (after.host.hits - before.host.hits) + (after.disk.hits - before.disk.hits) == len(moved)
        assert after.disk.bytes_read > before.disk.bytes_read
        if holes:
            pool.release(keep[:2])
            pool.release(keep[9:12])
            pool.release(keep[15:])
        _check_resident(tm, live)
    finally:
        tm.close()


def test_a_cpu_device_drops_a_chunk_its_record_holds_when_the_host_has_no_room(tmp_path):
    """On a CPU device, evicting a chunk with a disk record copies it to the host only into free room; else it
    is left to its record (nothing read, nothing displaced). A chunk without a record still moves down with a
    copy. Every chunk reads back what it held."""
    tm = _manager(tmp_path, device_budget=64, host_budget=8)
    try:
        live = _fill(tm)
        chunks = [c for c, _, _ in live.values()]
        assert not tm.promote_into_free_room(0, chunks)  # 43 tokens: all fit
        host = tm.host_pools[0]
        outcomes = set()
        for chunk in [c for c in chunks if c.on_disk]:
            room = host.fits(chunk.length)
            used, read = host.used, tm.stats().device.bytes_read
            tm.evict_from_device(chunk)
            assert chunk.tier == (Tier.HOST if room else Tier.DISK) and chunk.slots is None
            if not room:
                assert host.used == used and tm.stats().device.bytes_read == read
            outcomes.add(room)
        assert outcomes == {True, False}
        dirty = [c for c in chunks if not c.on_disk and c.tier == Tier.DEVICE]
        assert dirty and not host.fits(dirty[0].length)
        read = tm.stats().device.bytes_read
        tm.evict_from_device(dirty[0])
        assert dirty[0].tier in (Tier.HOST, Tier.DISK) and tm.stats().device.bytes_read > read
        assert dirty[0].tier == Tier.HOST or dirty[0].on_disk
        _check_resident(tm, live)
    finally:
        tm.close()


def _damage(tm, chunks, chunk, how):
    key = chunk.key
    blob = bytearray(tm.disk.get(key))
    if how == "payload":
        blob[-3] ^= 0x5A  # inside the last raw block: only the frame's content checksum sees it
    elif how == "truncated":
        blob = blob[:-9]
    elif how == "missing":
        tm.disk.remove(key)
        return
    elif how == "swapped":  # another chunk's record, of the same size
        other = next(c for c in chunks if c is not chunk and c.length == chunk.length)
        blob = bytearray(tm.disk.get(other.key))
    elif how == "other-session":  # intact, but written by another session
        k, v = tm.codec.decode(bytes(blob), tm.expected_header(chunk))
        blob = bytearray(tm.codec.encode(dataclasses.replace(tm.expected_header(chunk), session=b"x" * 16), k, v))
    tm.disk.put(key, bytes(blob))


@pytest.mark.parametrize("how, error, text", [
    ("payload", StoreCorruptError, "payload corrupted"),
    ("truncated", StoreCorruptError, "truncated"),
    ("missing", StoreMissingRecordError, "record missing"),
    ("swapped", StoreCorruptError, "record holds layer 0 chunk"),
    ("other-session", StoreMismatchError, "another session"),
])
def test_a_damaged_record_fails_its_group_and_changes_nothing(tmp_path, how, error, text):
    tm = _manager(tmp_path, device_budget=100, host_budget=0, staging_tokens=100)  # one group, all on disk
    try:
        live = _fill(tm)
        chunks = [c for c, _, _ in live.values()]
        assert all(c.tier == Tier.DISK for c in chunks)
        bad = chunks[len(chunks) // 2 + (how == "swapped")]
        _damage(tm, chunks, bad, how)
        pool = tm.device_pools[0]
        with pytest.raises(error, match=f"{bad.name()}.*{text}|{text}.*{bad.name()}"):
            tm.promote_into_free_room(0, chunks)
        assert all(c.tier == Tier.DISK and c.slots is None for c in chunks)
        assert pool.used == 0 and pool.high_water == 0  # the group's slots are free again
        with pytest.raises(error):  # and it fails again: nothing was skipped or half-done
            tm.promote_into_free_room(0, chunks)
        good = chunks[: chunks.index(bad)]
        assert tm.promote_into_free_room(0, good) == []  # the records before it are fine
        _check_resident(tm, {c.chunk_id: live[c.chunk_id] for c in good})
    finally:
        tm.close()


# ------------------------------------------------------------------------------------ whole sessions
CHUNKING = dict(chunk_size=16, sink_tokens=4, recent_window=16)


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """A llama session of 300 tokens saved once, and DynamicCache's logits for a question after it."""
    root = tmp_path_factory.mktemp("promotion")
    model = build_model("llama")
    doc = torch.randint(3, 128, (1, 300), generator=torch.Generator().manual_seed(3))
    m = twin(model)
    cache = KVTierCache.for_model(m, store_path=root / "store", **CHUNKING)
    prefill(m, cache, doc, segment_tokens=128, progress=False)
    cache.save()
    cache.close()
    question = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        ref = twin(model)(input_ids=torch.cat([doc, question], 1)).logits[:, -question.shape[1]:]
    return model, root / "store", doc, question, ref


def _ask(model, store, question, **options):
    m = twin(model)
    cache = KVTierCache.open(store, m, mode="exact", **options)
    with torch.no_grad():
        logits = m(input_ids=question, **{cache_kw(m): cache}).logits
    return cache, logits


@pytest.mark.parametrize("staging_tokens", [8192, 40], ids=["one-group", "many-groups"])
def test_reopened_session_promotes_every_chunk_and_answers_exactly(session, staging_tokens):
    model, store, doc, question, ref = session
    cache, logits = _ask(model, store, question, staging_tokens=staging_tokens)
    try:
        assert (logits - ref).abs().max().item() < 1e-5
        s = cache.stats()
        for layer in cache.tiers.layers:
            assert all(c.tier == Tier.DEVICE for c in layer.chunks)
            pool = layer.pool
            held = pool.slot_pos[: pool.high_water]
            assert sorted(held[held >= 0].tolist()) == list(range(layer.length))  # each position once
            for c in layer.chunks:
                assert bool((pool.slot_owner[c.slots] == c.row).all())
        stored = sum(c.on_disk for layer in cache.tiers.layers for c in layer.chunks)  # not the ones sealed since
        assert s.disk.hits == stored == s.disk_loads_sync and s.device.misses == stored
    finally:
        cache.close()


def test_a_device_budget_smaller_than_the_session_still_answers_exactly(session):
    """Part of each layer is promoted as a group into the free room; the rest streams through the staging
    buffers, leaving copies in the free host room; the budgets hold at every step."""
    model, store, doc, question, ref = session
    m = twin(model)
    cache = KVTierCache.open(store, m, mode="exact", device_budget=120, host_budget=64, staging_tokens=48)
    try:
        toks = question
        for step in range(3):
            with torch.no_grad():
                out = m(input_ids=toks, **{cache_kw(m): cache})
            if step == 0:
                assert (out.logits - ref).abs().max().item() < 1e-5
            s = cache.stats()
            assert s.device.peak_tokens <= 120 and s.host.peak_tokens <= 64 and s.staging_peak_tokens <= 48
            toks = out.logits[:, -1:].argmax(-1)
        assert s.host.tokens > 0 and s.disk.hits > 0
        assert s.device.misses == s.host.hits + s.disk.hits and s.host.misses == s.disk.hits
        ids = torch.cat([doc, question], 1)
        ref_out = twin(model).generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    finally:
        cache.close()
    cache = KVTierCache.open(store, m, mode="exact", device_budget=120, host_budget=64, staging_tokens=48)
    try:
        out = m.generate(input_ids=torch.cat([doc, question], 1), max_new_tokens=4, do_sample=False,
                         **{cache_kw(m): cache})
        assert torch.equal(out, ref_out)
    finally:
        cache.close()


def test_warm_brings_a_session_to_the_device_in_groups(session):
    model, store, _, question, ref = session
    m = twin(model)
    cache = KVTierCache.open(store, m, mode="exact")
    try:
        chunks = sum(len(layer.chunks) for layer in cache.tiers.layers)
        assert cache.warm() == chunks
        assert all(c.tier == Tier.DEVICE for layer in cache.tiers.layers for c in layer.chunks)
        with torch.no_grad():
            logits = m(input_ids=question, **{cache_kw(m): cache}).logits
        assert (logits - ref).abs().max().item() < 1e-5
        assert cache.stats().disk.hits == chunks  # the forward read nothing more
    finally:
        cache.close()


def test_a_damaged_record_in_a_reopened_session_is_named(session, tmp_path):
    model, store, _, question, _ = session
    shutil.copytree(store, tmp_path / "store")
    m = twin(model)
    cache = KVTierCache.open(tmp_path / "store", m, mode="exact")
    victim = cache.tiers.layers[1].chunks[5]
    cache.close()
    env = lmdb.open(str(tmp_path / "store"), max_dbs=4)
    with env.begin(write=True, db=env.open_db(b"chunks")) as txn:
        blob = bytearray(txn.get(victim.key))
        blob[len(blob) // 2] ^= 0x01
        txn.put(victim.key, bytes(blob))
    env.close()
    cache = KVTierCache.open(tmp_path / "store", m, mode="exact")
    try:
        with pytest.raises(StoreCorruptError, match=f"{victim.name()}: payload corrupted"), torch.no_grad():
            m(input_ids=question, **{cache_kw(m): cache})
    finally:
        cache.close()


@pytest.mark.parametrize("slots, runs", [
    ([], []),
    ([7], [(0, slice(7, 8))]),
    ([3, 4, 5, 6], [(0, slice(3, 7))]),
    ([3, 4, 9, 10, 11, 2], [(0, slice(3, 5)), (2, slice(9, 12)), (5, slice(2, 3))]),
    ([5, 4, 3], [(0, slice(5, 6)), (1, slice(4, 5)), (2, slice(3, 4))]),  # descending: no run of two
])
def test_a_slot_list_splits_into_its_runs_in_list_order(slots, runs):
    assert _runs_of(np.array(slots, dtype=np.int64)) == runs
    assert (_as_run(torch.tensor(slots, dtype=torch.long)) is not None) == (len(runs) == 1)
