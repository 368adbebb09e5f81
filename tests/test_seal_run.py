"""Sealing a forward's new chunks as one run (one device write, one abstract update) leaves the layer exactly
as sealing them one by one does; slot lists stay on the CPU whatever the arena's device."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model

from kvtier import KVTierCache
from kvtier.layers import TieredLayer
from kvtier.segmented import prefill
from kvtier.sparse.abstracts import AbstractTable
from kvtier.store.pools import DevicePool


def _layer_state(cache: KVTierCache) -> list[dict]:
    out = []
    for layer in cache.tiers.layers:
        pool, ab = layer.pool, layer.abstracts
        n, p = ab.count, ab.page_count
        out.append({
            "chunks": [(c.start, c.length, c.tier, c.row, c.pinned, c.slots.tolist() if c.slots is not None else None,
                        c.importance) for c in layer.chunks],
            "window": layer.win_slots.tolist(),
            "slot_pos": pool.slot_pos[: pool.high_water].tolist(),
            "slot_owner": pool.slot_owner[: pool.high_water].tolist(),
            "k": pool.k[:, :, : pool.high_water].clone(),
            "abstracts": (ab.kmin[:, :, :n].clone(), ab.kmax[:, :, :n].clone(), ab.pmin[:, :, :p].clone(),
                          ab.pmax[:, :, :p].clone(), ab._chunk_cols[:, :n].tolist(), ab._page_cols[:, :p].tolist(),
                          ab.max_pages),
        })
    return out


def _same(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["chunks"] == y["chunks"] and x["window"] == y["window"]
        assert x["slot_pos"] == y["slot_pos"] and x["slot_owner"] == y["slot_owner"]
        assert torch.equal(x["k"], y["k"])
        for u, v in zip(x["abstracts"], y["abstracts"]):
            assert torch.equal(u, v) if isinstance(u, torch.Tensor) else u == v


@pytest.mark.parametrize("mode", ["exact", "sparse"])
def test_prefill_seals_runs_as_one_by_one(monkeypatch, mode):
    """Segments (the window's first chunk is sealed alone, the rest as a run), then decode steps: the chunk
    table, the arena's slots, positions and owners, the abstracts and the logits are those of one-by-one
    sealing. Sparse mode plans chunk sizes from measured importance, so runs mix sizes."""
    model = build_model("llama")
    ids = torch.randint(0, model.config.vocab_size, (1, 700), generator=torch.Generator().manual_seed(3))
    states, logits, runs = [], [], []
    real = TieredLayer._seal_new_run

    def spy(self, *args):
        runs.append(real(self, *args))
        return runs[-1]

    for one_by_one in (False, True):
        monkeypatch.setattr(TieredLayer, "_seal_new_run", (lambda self, *a: False) if one_by_one else spy)
        cache = KVTierCache.for_model(model, mode=mode, chunk_size=32, recent_window=40)
        out = [prefill(model, cache, ids[:, :600], segment_tokens=256, progress=False)]
        with torch.no_grad():
            for t in range(600, 606):
                out.append(model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits[:, -1])
        states.append(_layer_state(cache))
        logits.append(torch.stack(out))
        cache.close()
    assert runs and all(runs)  # the first pass sealed every segment's new chunks as runs
    _same(*states)
    assert torch.equal(*logits)


def test_a_run_that_does_not_fit_the_device_is_sealed_chunk_by_chunk():
    """With room for fewer tokens than a segment seals, the run is refused untouched and the chunks are placed
    one by one, evicting to the host: every token is still stored once, and decode equals a roomy cache."""
    model = build_model("llama")
    ids = torch.randint(0, model.config.vocab_size, (1, 520), generator=torch.Generator().manual_seed(4))
    got = []
    for budget in (None, 200):
        cache = KVTierCache.for_model(model, mode="exact", chunk_size=32, recent_window=40, device_budget=budget)
        got.append(prefill(model, cache, ids[:, :512], segment_tokens=256, progress=False))
        with torch.no_grad():
            got.append(model(input_ids=ids[:, 512:513], past_key_values=cache, use_cache=True).logits[:, -1])
        for layer in cache.tiers.layers:
            assert sum(c.length for c in layer.chunks) + layer.win_slots.numel() == 513
            if budget is not None:
                assert layer.pool.used <= budget and any(c.slots is None for c in layer.chunks)
        cache.close()
    torch.testing.assert_close(got[0], got[2], rtol=0, atol=1e-5)
    torch.testing.assert_close(got[1], got[3], rtol=0, atol=1e-5)


@pytest.mark.parametrize("sizes", [[16, 16, 16], [32, 32, 48, 48, 16], [16, 7, 7, 40, 33], [5]])
def test_add_run_equals_adding_chunk_by_chunk(sizes):
    k = torch.randn(2, 3, sum(sizes), 8)
    one, run = AbstractTable(torch.device("cpu"), 16), AbstractTable(torch.device("cpu"), 16)
    at = 0
    for size in sizes:
        one.add(k[:, :, at:at + size], 100 + at)
        at += size
    run.add_run(k, 100, sizes)
    assert one.count == run.count == len(sizes) and one.page_count == run.page_count
    assert one.max_pages == run.max_pages
    n, p = one.count, one.page_count
    for name in ("kmin", "kmax"):
        assert torch.equal(getattr(one, name)[:, :, :n], getattr(run, name)[:, :, :n])
    for name in ("pmin", "pmax"):
        assert torch.equal(getattr(one, name)[:, :, :p], getattr(run, name)[:, :, :p])
    assert torch.equal(one._chunk_cols[:, :n], run._chunk_cols[:, :n])
    assert torch.equal(one._page_cols[:, :p], run._page_cols[:, :p])


def test_slot_lists_are_on_the_cpu_whatever_the_arena_device():
    """A pool on another device (here `meta`, standing in for a GPU) hands out slot lists on the CPU: reading
    them, or copying through a slice of them, never waits for the device."""
    pool = DevicePool(None, torch.device("meta"), torch.float32)
    pool.init_shape(1, 2, 4)
    a = pool.allocate(5)
    b = pool.allocate(3)
    assert a.device.type == b.device.type == "cpu" and a.tolist() == [0, 1, 2, 3, 4]
    pool.release(a[1:3])
    c = pool.allocate(4)  # the lowest holes first, then fresh slots
    assert c.device.type == "cpu" and c.tolist() == [1, 2, 8, 9]


@pytest.mark.parametrize("where", ["chunk-write", "run-write", "abstracts"])
@pytest.mark.parametrize("error", ["clean", "unexpected"])
def test_a_run_that_fails_while_sealing_is_undone(monkeypatch, where, error):
    """Layer 1's write of the chunk the window joins, the run's device write or the run's abstract update fails,
    after layer 0 sealed its chunks. A clean
    failure (memory kvtier could not get) is rolled back: the slots are given back and the next pass computes
    what a cache that never saw the failed pass computes. Any other error leaves the cache `interrupted`."""
    from kvtier.errors import CacheMemoryError
    from kvtier.sparse.abstracts import AbstractTable
    from kvtier.store.pools import DevicePool

    model = build_model("llama")
    ids = torch.randint(0, model.config.vocab_size, (1, 400), generator=torch.Generator().manual_seed(5))
    options = dict(mode="exact", chunk_size=32, recent_window=40)
    cache, reference = KVTierCache.for_model(model, **options), KVTierCache.for_model(model, **options)
    prefill(model, cache, ids[:, :200], segment_tokens=200, progress=False)
    prefill(model, reference, ids[:, :200], segment_tokens=200, progress=False)
    used = [layer.pool.used for layer in cache.tiers.layers]
    armed = {"on": True}
    target = (AbstractTable, "add_run") if where == "abstracts" else (DevicePool, "write")
    run_write = where == "run-write"
    original = getattr(*target)
    exc = CacheMemoryError("no memory for the run") if error == "clean" else RuntimeError("the run failed")

    def failing(self, *args, **kwargs):
        mine = self is cache.tiers.layers[1].pool or self is cache.tiers.layers[1].abstracts
        if where != "abstracts" and mine and (args[1].shape[2] > 32) != run_write:
            mine = False  # a run writes more than one chunk's 32 tokens at once
        if armed["on"] and mine:
            armed["on"] = False
            raise exc
        return original(self, *args, **kwargs)

    monkeypatch.setattr(*target, failing)
    with pytest.raises(type(exc)):
        prefill(model, cache, ids[:, 200:328], segment_tokens=128, progress=False)
    assert not armed["on"]  # the run of layer 1 failed, not something else
    if error == "unexpected":
        assert cache.interrupted
        cache.close()
        reference.close()
        return
    assert not cache.interrupted
    assert [layer.pool.used for layer in cache.tiers.layers] == used
    got = prefill(model, cache, ids[:, 200:328], segment_tokens=128, progress=False)
    want = prefill(model, reference, ids[:, 200:328], segment_tokens=128, progress=False)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    with torch.no_grad():
        a = model(input_ids=ids[:, 328:329], past_key_values=cache, use_cache=True).logits
        b = model(input_ids=ids[:, 328:329], past_key_values=reference, use_cache=True).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    cache.close()
    reference.close()
