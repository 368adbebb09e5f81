"""The prefetcher under attack: parts of several records read by real reader threads from a real store, with a
damaged or missing record in the middle of a part, chunks discarded before, while and after their part runs,
`close()` with parts in flight, stale drops, repeated requests; the staging room always returns to zero and a
taken (or dropped) chunk's tensors are not kept by its part. Real tiered caches with prefetch on decode exactly
as with prefetch off."""

from __future__ import annotations

import gc
import threading
import weakref

import pytest
import torch
from conftest import build_model, twin
from helpers import padded_batch, reference_run, step_logits

from kvtier import KVTierCache, StoreCorruptError, StoreMissingRecordError
from kvtier.config import KVTierConfig
from kvtier.store.chunk import Chunk, Tier
from kvtier.store.disk import DiskStore
from kvtier.store.tiers import TierManager

H, D, N = 2, 4, 4  # kv heads, head dim, tokens per chunk


def _tiers(tmp_path, n=6, threads=2, part_tokens=3 * N, batch=1, kv_heads=H, **cfg):
    """A tier manager whose n chunks are on disk only (records written to a real LMDB store), and their k, v."""
    config = KVTierConfig(chunk_size=N, sink_tokens=0, recent_window=0, reader_threads=threads, **cfg)
    tm = TierManager(config, [0], torch.device("cpu"), torch.float32, b"s" * 16,
                     lambda: DiskStore(tmp_path / "store", remove_on_close=True), (kv_heads, D))
    tm.prefetcher.part_tokens = part_tokens
    g = torch.Generator().manual_seed(0)
    chunks = [Chunk(0, tm.new_chunk_id(), i * N, N, Tier.DISK, batch) for i in range(n)]
    data = [(torch.randn(batch, kv_heads, N, D, generator=g), torch.randn(batch, kv_heads, N, D, generator=g))
            for _ in chunks]
    tm.write_records([(c, k, v) for c, (k, v) in zip(chunks, data)])
    return tm, chunks, data


def _damage(tm, chunk) -> None:
    """Flip one byte in the middle of the chunk's record, in the store itself."""
    blob = bytearray(tm.disk.get(chunk.key))
    blob[len(blob) // 2] ^= 0x40
    tm.disk.put_many([(chunk.key, bytes(blob))])


class Gate:
    """Holds every part's load until opened, recording which parts were loaded."""

    def __init__(self, pf):
        self.open, self.started, self.loaded = threading.Event(), threading.Event(), []
        self._load = pf._load
        pf._load = self

    def __call__(self, part):
        self.started.set()
        assert self.open.wait(10)
        self.loaded.append([c.chunk_id for c in part])
        return self._load(part)


def _settled(pf) -> bool:
    return pf.staged_tokens == 0 and not pf._pending and not pf._users


def _same(kv, want) -> bool:
    return torch.equal(kv[0], want[0]) and torch.equal(kv[1], want[1])


# ------------------------------------------------------------------------------------------ damaged records
@pytest.mark.parametrize("threads", [1, 4])
def test_a_damaged_record_mid_part_fails_naming_its_chunk_and_the_rest_of_the_part_loads(tmp_path, threads):
    tm, cs, data = _tiers(tmp_path, threads=threads)
    _damage(tm, cs[1])
    pf = tm.prefetcher
    assert pf.request(cs, clock=0) == 6  # parts (0, 1, 2) and (3, 4, 5)
    assert len(pf._users) == 2
    for i, c in enumerate(cs):
        if i == 1:
            with pytest.raises(StoreCorruptError, match=f"layer 0 chunk {c.chunk_id}\\b"):
                pf.take(c)
        else:
            assert _same(pf.take(c), data[i])
    assert _settled(pf) and pf.stats.hits == 6  # a failed read was still started ahead
    tm.close()


def test_a_missing_record_mid_part_is_named_and_read_into_fails_on_it(tmp_path):
    tm, cs, data = _tiers(tmp_path)
    tm.disk.remove_many([cs[4].key])
    pf = tm.prefetcher
    pf.request(cs, clock=0)
    k, v = torch.empty(1, H, 3 * N, D), torch.empty(1, H, 3 * N, D)
    tm.read_into(cs[:3], k, v)
    assert torch.equal(k, torch.cat([d[0] for d in data[:3]], 2)) and torch.equal(v, torch.cat([d[1] for d in data[:3]], 2))
    with pytest.raises(StoreMissingRecordError, match=f"layer 0 chunk {cs[4].chunk_id}: record missing"):
        tm.read_into(cs[3:], k, v)
    assert pf.pending(cs[5]) and not pf.pending(cs[4])  # the group stopped at the missing record
    assert _same(pf.take(cs[5]), data[5])
    assert _settled(pf)
    tm.close()


def test_a_whole_part_failing_fails_each_of_its_chunks_once_and_lets_them_go(tmp_path):
    tm, cs, data = _tiers(tmp_path)
    pf = tm.prefetcher
    real = pf._load
    pf._load = lambda part: (_ for _ in ()).throw(OSError("the disk went away")) if part[0] is cs[0] else real(part)
    pf.request(cs, clock=0)
    for c in cs[:3]:
        with pytest.raises(OSError, match="the disk went away"):
            pf.take(c)
    assert [_same(pf.take(c), d) for c, d in zip(cs[3:], data[3:])] == [True] * 3
    assert _settled(pf)
    tm.close()


# ---------------------------------------------------------------------------------------------- discards
def test_discarding_every_chunk_of_a_queued_part_cancels_its_read(tmp_path):
    tm, cs, data = _tiers(tmp_path, threads=1)
    pf = tm.prefetcher
    gate = Gate(pf)
    pf.request(cs, clock=0)
    assert gate.started.wait(10)  # the one reader holds part (0, 1, 2); part (3, 4, 5) waits in the queue
    for c in cs[3:]:
        pf.discard(c)
    pf.discard(cs[1])  # part of the running part: the others still come
    gate.open.set()
    assert _same(pf.take(cs[0]), data[0]) and _same(pf.take(cs[2]), data[2])
    assert pf.take(cs[1]) is None and pf.take(cs[4]) is None
    pf.close()
    assert gate.loaded == [[c.chunk_id for c in cs[:3]]]  # the discarded part was never read
    assert _settled(pf)
    tm.close()


def test_discarding_after_the_part_ran_drops_the_chunk_from_the_part(tmp_path):
    tm, cs, data = _tiers(tmp_path)
    pf = tm.prefetcher
    pf.request(cs[:3], clock=0)
    part = pf._pending[cs[0].key][1]
    result = part.result()
    pf.discard(cs[1])
    assert cs[1].key not in result and _same(pf.take(cs[0]), data[0])
    assert cs[0].key not in result  # taken: the part keeps no reference to it
    pf.discard(cs[2])
    assert _settled(pf)
    tm.close()


def test_a_chunk_discarded_while_its_part_runs_is_not_kept_by_the_part(tmp_path):
    tm, cs, data = _tiers(tmp_path)
    pf = tm.prefetcher
    gate = Gate(pf)
    pf.request(cs[:3], clock=0)
    part = pf._pending[cs[0].key][1]
    assert gate.started.wait(10)
    pf.discard(cs[1])  # the part is running: its result does not exist yet
    gate.open.set()
    result = part.result()
    assert cs[1].key not in result
    assert _same(pf.take(cs[2]), data[2]) and _same(pf.take(cs[0]), data[0])
    assert _settled(pf)
    tm.close()


def test_a_taken_chunks_tensors_live_only_as_long_as_their_caller_keeps_them(tmp_path):
    tm, cs, data = _tiers(tmp_path, batch=2)
    pf = tm.prefetcher
    pf.request(cs[:3], clock=0)
    part = pf._pending[cs[0].key][1]
    k, v = pf.take(cs[0])
    refs = weakref.ref(k), weakref.ref(v)
    del k, v
    gc.collect()
    assert refs[0]() is None and refs[1]() is None
    assert set(part.result()) == {cs[1].key, cs[2].key}
    pf.close()
    tm.close()


# ---------------------------------------------------------------------------------- close, stale, repeats
def test_close_with_parts_in_flight_waits_for_the_running_one_and_cancels_the_rest(tmp_path):
    tm, cs, data = _tiers(tmp_path, threads=1)
    pf = tm.prefetcher
    gate = Gate(pf)
    pf.request(cs, clock=0)
    assert gate.started.wait(10)
    closing = threading.Thread(target=pf.close)
    closing.start()
    gate.open.set()
    closing.join(10)
    assert not closing.is_alive()
    assert gate.loaded == [[c.chunk_id for c in cs[:3]]]
    assert _settled(pf) and pf.take(cs[0]) is None
    assert pf.request(cs, clock=1) == 0  # a closed prefetcher issues nothing (reads happen when needed)
    assert _same(pf.load_now(cs[3]), data[3])
    pf.close()  # twice is fine
    tm.close()


def test_a_stale_part_is_dropped_and_its_room_and_records_freed(tmp_path):
    tm, cs, data = _tiers(tmp_path, prefetch_tokens=3 * N)
    pf = tm.prefetcher
    assert pf.request(cs, clock=0) == 3  # back-pressure: one part's worth, (0, 1, 2)
    part = pf._pending[cs[0].key][1]
    assert _same(pf.take(cs[0]), data[0])
    part.result()
    k1 = weakref.ref(part.result()[cs[1].key][0])
    assert pf.request(cs[3:], clock=1) == 1  # (1, 2) not stale yet: room for (3,) only
    assert pf.request(cs[4:], clock=2) == 2  # (1, 2) stale now: dropped, room for (4, 5)
    assert pf.stats.wasted == 2 and not pf.pending(cs[1]) and not pf.pending(cs[2])
    del part
    gc.collect()
    assert k1() is None  # the dropped chunks' records are gone with their part
    assert [_same(pf.take(c), d) for c, d in zip(cs[3:], data[3:])] == [True] * 3
    assert pf.take(cs[1]) is None
    assert _settled(pf)
    tm.close()


def test_a_chunk_requested_again_is_read_once(tmp_path):
    tm, cs, data = _tiers(tmp_path)
    pf = tm.prefetcher
    gate = Gate(pf)
    assert pf.request([cs[0], cs[1], cs[0], cs[1]], clock=0) == 2
    assert pf.request(cs[:3], clock=0) == 1
    gate.open.set()
    assert _same(pf.take(cs[0]), data[0]) and pf.take(cs[0]) is None
    assert _same(pf.take(cs[1]), data[1]) and _same(pf.take(cs[2]), data[2])
    pf.close()
    assert sorted(gate.loaded) == [[cs[0].chunk_id, cs[1].chunk_id], [cs[2].chunk_id]]
    assert _settled(pf) and pf.stats.issued == 3
    tm.close()


# -------------------------------------------------------------------------- other files: the host pool, accounting
def test_a_fetched_chunk_kept_on_the_host_does_not_pin_its_whole_part(tmp_path):
    tm, cs, data = _tiers(tmp_path, n=3, kv_heads=1, device_budget=N, host_budget=100)
    tm.device_pools[0].init_shape(1, 1, D)
    tm.device_pools[0].allocate(N)  # the device is full: a fetched chunk goes to the host
    pf = tm.prefetcher
    pf.request(cs, clock=0)
    k, v = tm.fetch(cs[0])
    assert not tm.promote(cs[0], k, v) and cs[0].tier == Tier.HOST
    hk, hv = tm.host_pools[0].get(cs[0].chunk_id)
    assert torch.equal(hk, data[0][0])
    assert hk.untyped_storage().nbytes() == hk.nbytes and hv.untyped_storage().nbytes() == hv.nbytes
    tm.close()


def test_a_record_freed_while_its_part_decodes_stays_out_of_the_accounting(tmp_path):
    tm, cs, data = _tiers(tmp_path, n=2)
    reached, go = threading.Event(), threading.Event()
    decode = tm.codec.decode_view

    def slow(blob, expect, *args):
        if expect.chunk_id == cs[1].chunk_id:
            reached.set()
            assert go.wait(10)
        return decode(blob, expect, *args)

    tm.codec.decode_view = slow
    tm.prefetcher.request(cs, clock=0)
    assert reached.wait(10)
    tm.free([cs[1]])
    go.set()
    tm.prefetcher.close()
    assert cs[1].key not in tm.record_sizes
    assert tm.stats().disk.tokens == N
    tm.close()


# ------------------------------------------------------------------------------------------- real caches
CHUNKING = dict(chunk_size=16, sink_tokens=4, recent_window=16, device_budget=40, host_budget=32)


@pytest.fixture(scope="module")
def llama():
    return build_model("llama")


@pytest.mark.parametrize("threads,prefetch_tokens,staging", [(1, 16, 16), (2, 48, 40), (4, 10_000, 32)])
def test_exact_decode_with_parts_equals_dynamic_cache(llama, tmp_path, threads, prefetch_tokens, staging):
    ids, mask = padded_batch([150, 117])
    ref, toks = reference_run(llama, ids, mask, n_decode=4)
    m = twin(llama)
    cache = KVTierCache.for_model(m, store_path=tmp_path / "s", reader_threads=threads, staging_tokens=staging,
                                  prefetch_tokens=prefetch_tokens, **CHUNKING)
    logits = step_logits(m, cache, ids, mask, [100, 50], toks)
    real = torch.cat([mask, torch.ones(2, len(toks), dtype=mask.dtype)], 1).bool()
    assert (logits - ref).abs().amax(-1)[real].max().item() < 1e-5
    s = cache.stats()
    assert s.prefetch_hits > 0 and s.prefetch_issued == s.prefetch_hits + s.prefetch_wasted + \
        len(cache.tiers.prefetcher._pending)
    assert cache.tiers.prefetcher.staged_tokens == 0
    cache.close()


@pytest.mark.parametrize("extra", [dict(shared_selection=True), dict(lookahead=True, reader_threads=3)])
def test_sparse_decode_with_parts_equals_prefetch_off(llama, tmp_path, extra):
    ids, mask = padded_batch([180, 151], seed=3)
    toks = [torch.randint(3, 128, (2, 1), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    out = []
    for prefetch in (False, True):
        m = twin(llama)
        cache = KVTierCache.for_model(m, store_path=tmp_path / f"s{prefetch}", mode="sparse", sparse_budget=64,
                                      prefetch=prefetch, prefetch_tokens=10_000, staging_tokens=32, **CHUNKING,
                                      **extra)
        out.append(step_logits(m, cache, ids, mask, [120, 60], toks))
        if prefetch:
            assert cache.stats().prefetch_hits > 0
        cache.close()
    assert torch.equal(out[0], out[1])


def test_a_damaged_record_in_a_streamed_group_is_named_by_the_decode(llama, tmp_path):
    ids, mask = padded_batch([150, 117])
    m = twin(llama)
    cache = KVTierCache.for_model(m, store_path=tmp_path / "s", staging_tokens=32, **CHUNKING)
    step_logits(m, cache, ids, mask, [150], [])
    layer = cache.tiers.layers[0]
    disk = [c for c in layer.chunks if c.tier == Tier.DISK]
    victim = disk[len(disk) // 2 + 1]  # past the first group: read by a reader thread, in a part
    _damage(cache.tiers, victim)
    with pytest.raises(StoreCorruptError, match=f"layer 0 chunk {victim.chunk_id}\\b"):
        step_logits(m, cache, ids, mask, [], [torch.tensor([[5], [6]])])
    assert cache.stats().prefetch_hits > 0
    cache.close()


def test_remote_session_decodes_with_parts_as_with_prefetch_off(llama, redis_url, tmp_path):
    from redis_server import with_name

    ids, mask = padded_batch([150, 117])
    m = twin(llama)
    cache = KVTierCache.for_model(m, store_path=tmp_path / "s", **CHUNKING)
    step_logits(m, cache, ids, mask, [150], [])
    url = with_name(redis_url, "doc")
    cache.save(remote=url)
    cache.close()
    toks = [torch.tensor([[5], [6]]), torch.tensor([[7], [8]])]
    out = []
    for prefetch in (False, True):
        with KVTierCache.open(url, m, staging_tokens=32, prefetch=prefetch, reader_threads=3, **CHUNKING) as far:
            out.append(step_logits(m, far, ids, mask, [], toks))
            if prefetch:
                assert far.stats().prefetch_hits > 0
    assert torch.equal(out[0], out[1])
