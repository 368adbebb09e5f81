"""Failed forward passes in the corners: a failed first pass, a pass that spread one row over a batch, a full
store while sparse decoding refines its chunks, a refused pass after Ctrl-C, a crop back into a chunk larger
than the device holds. Each leaves the cache as it was (or `interrupted`, as documented), and the next pass
computes what a cache that never saw the failure computes."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model, twin
from helpers import cache_kw

from kvtier import KVTierCache, StoreFullError
from kvtier.errors import CacheInputError, IncompleteSessionError
from kvtier.layers import TieredLayer
from kvtier.store.chunk import Tier
from kvtier.store.disk import DiskStore

CHUNKING = dict(chunk_size=16, sink_tokens=4, recent_window=16)


def _doc(n: int, seed: int = 3, rows: int = 1) -> torch.Tensor:
    return torch.randint(3, 128, (rows, n), generator=torch.Generator().manual_seed(seed))


def _step(model, cache, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=True, **{cache_kw(model): cache}).logits[:, -1]


def _state(cache: KVTierCache) -> tuple:
    return ([layer.logical_length for layer in cache.layers], [layer.batch for layer in cache.layers],
            cache.interrupted, None if cache.token_ids is None else cache.token_ids.tolist())


def _raising(model, index: int, exc: type[BaseException] = RuntimeError):
    def hook(*_):
        raise exc("the model failed")
    return model.model.layers[index].register_forward_pre_hook(hook)


def _whole(cache: KVTierCache) -> None:
    """Every tiered layer's chunks and window cover its tokens, each chunk where its tier says."""
    for layer in cache.tiers.layers:
        at = 0
        for chunk in layer.chunks:
            assert chunk.start == at
            at = chunk.end
            if chunk.tier == Tier.DEVICE:
                assert chunk.slots is not None and chunk.slots.numel() == chunk.length
            elif chunk.tier == Tier.HOST:
                assert chunk.chunk_id in cache.tiers.host_pools[layer.index].data
            else:
                assert chunk.key in cache.tiers.record_sizes
        assert at == layer.win_start
        device = sum(c.length for c in layer.chunks if c.tier == Tier.DEVICE)
        assert layer.pool.used == device + layer.win_slots.numel()


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_a_failed_first_pass_leaves_a_fresh_cache(family):
    """The first pass gave the arenas their batch (2 rows) before it failed: the next pass may bring 1 row."""
    model = build_model(family)
    cache = KVTierCache.for_model(model, **CHUNKING)
    fresh = _state(cache)
    hook = _raising(model, 2)  # layers 0 and 1 (a full-attention one in both families) were written
    with pytest.raises(RuntimeError, match="the model failed"):
        _step(model, cache, _doc(40, rows=2))
    hook.remove()
    assert _state(cache) == fresh

    plain = twin(model)
    reference = KVTierCache.for_model(plain, **CHUNKING)
    for ids in (_doc(40), _doc(1, seed=5)):
        torch.testing.assert_close(_step(model, cache, ids), _step(plain, reference, ids))
    cache.close()
    reference.close()


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_a_failed_pass_that_spread_one_row_over_a_batch_keeps_one_row(family):
    """One prefix, many continuations: the pass copied the one row to 3 before it failed; undone, the cache
    holds one row again and serves one row, or three."""
    model = build_model(family)
    doc = _doc(100)
    cache = KVTierCache.for_model(model, **CHUNKING)
    _step(model, cache, doc)
    before = _state(cache)
    hook = _raising(model, 3)
    with pytest.raises(RuntimeError, match="the model failed"):
        _step(model, cache, _doc(5, seed=7, rows=3))
    hook.remove()
    assert _state(cache) == before and cache.batch_size == 1

    plain = twin(model)
    reference = KVTierCache.for_model(plain, **CHUNKING)
    _step(plain, reference, doc)
    one = _doc(1, seed=5)
    torch.testing.assert_close(_step(model, cache, one), _step(plain, reference, one))
    three = _doc(1, seed=6, rows=3)
    torch.testing.assert_close(_step(model, cache, three), _step(plain, reference, three))
    cache.close()
    reference.close()


def test_a_refused_pass_after_ctrl_c_undoes_nothing():
    """A pass or crop refused as it starts is no change: it must not 'undo' the pass Ctrl-C stopped (its layers
    stand at different lengths) nor clear `interrupted`."""
    model = build_model("gemma3")
    cache = KVTierCache.for_model(model, **CHUNKING)
    _step(model, cache, _doc(100))
    hook = _raising(model, 2, KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        _step(model, cache, _doc(5, seed=7))
    hook.remove()
    stopped = _state(cache)
    assert stopped[2] and len(set(stopped[0])) == 2  # interrupted, layers uneven
    with pytest.raises(CacheInputError, match="crop\\(\\) on an interrupted cache"):
        cache.crop(-3)
    assert _state(cache) == stopped
    for ids in (torch.tensor([[500]]), torch.tensor([[5]])):  # outside the vocabulary, or a good id
        with pytest.raises(CacheInputError, match="this cache is interrupted"):
            _step(model, cache, ids)
        assert _state(cache) == stopped


def test_a_pass_on_an_interrupted_cache_is_refused(tmp_path):
    """Ctrl-C left the layers uneven; a pass over them would be silently wrong: refused, as save is, with the
    cache still interrupted, until reset() clears it."""
    model = build_model("llama")
    cache = KVTierCache.for_model(model, store_path=tmp_path / "s", **CHUNKING)
    _step(model, cache, _doc(100))
    hook = _raising(model, 2, KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        _step(model, cache, _doc(5, seed=7))
    hook.remove()
    with pytest.raises(CacheInputError, match=r"this cache is interrupted .* call cache.reset\(\)"):
        _step(model, cache, _doc(1, seed=8))
    assert cache.interrupted
    with pytest.raises(IncompleteSessionError):
        cache.save()
    cache.reset()
    _step(model, cache, _doc(20))
    assert not cache.interrupted
    cache.save()
    cache.close()


SPARSE = dict(CHUNKING, device_budget=40, host_budget=32, mode="sparse", adaptive_chunks=True, refine=True,
              refine_every=2)


def _feed(model, cache, doc: torch.Tensor, upto: int) -> None:
    _step(model, cache, doc[:, :64])
    _step(model, cache, doc[:, 64:128])
    for i in range(128, upto):
        _step(model, cache, doc[:, i:i + 1])


def test_a_full_store_while_refining_leaves_the_layer_whole(monkeypatch):
    """Sparse decoding refines chunks (split, merge) and stores the new ones; when the store is full on the way,
    the layer keeps its old chunks (before, the chunks after the failing one held no data at all)."""
    model = build_model("llama")
    doc = _doc(200)
    cache = KVTierCache.for_model(model, **SPARSE)
    _feed(model, cache, doc, 150)
    rebuilding = {"on": False, "fired": 0}
    rebuild, put_many = TieredLayer._rebuild, DiskStore.put_many

    def watched(self, groups):
        rebuilding["on"] = True
        try:
            rebuild(self, groups)
        finally:
            rebuilding["on"] = False

    def full(self, *args, **kwargs):
        if rebuilding["on"]:
            rebuilding["fired"] += 1
            raise StoreFullError("the store is full")
        return put_many(self, *args, **kwargs)

    monkeypatch.setattr(TieredLayer, "_rebuild", watched)
    monkeypatch.setattr(DiskStore, "put_many", full)
    fed = 150
    while not rebuilding["fired"]:
        assert fed < 200, "no refinement wrote to the store"
        before = _state(cache)
        try:
            _step(model, cache, doc[:, fed:fed + 1])
            fed += 1
        except StoreFullError:
            assert _state(cache) == before  # undone, not interrupted
    monkeypatch.undo()
    _whole(cache)

    plain = twin(model)
    reference = KVTierCache.for_model(plain, **SPARSE)
    _feed(plain, reference, doc, fed)
    cache.set_mode("exact")
    reference.set_mode("exact")
    probe = doc[:, fed:fed + 3]
    torch.testing.assert_close(_step(model, cache, probe), _step(plain, reference, probe))
    cache.close()
    reference.close()


def test_crop_back_into_a_chunk_larger_than_the_device_holds():
    """Refinement merges chunks beyond the device room beside the sinks and window: cropping into one, or right
    past it, keeps it sealed rather than failing to find device slots for it (a failed decode step's undo
    crops too)."""
    model = build_model("llama")
    doc = _doc(200)
    cache = KVTierCache.for_model(model, **SPARSE)
    room = SPARSE["device_budget"] - CHUNKING["sink_tokens"] - CHUNKING["recent_window"]
    _feed(model, cache, doc, 128)
    for i in range(128, 160):
        big = [c for c in cache.tiers.layers[0].chunks if c.length > room]
        if big:
            break
        _step(model, cache, doc[:, i:i + 1])
    assert big, "no refinement merged chunks beyond the device room"
    plain = twin(model)
    cache.set_mode("exact")
    # Just short of a full window after it (the window would take it back), then into it
    for keep in (big[-1].end + CHUNKING["recent_window"] - 1, big[-1].end - 1):
        assert keep < 128  # within the exact prefill: the reference holds the same keys
        cache.crop(keep)
        _whole(cache)
        reference = KVTierCache.for_model(plain, **dict(SPARSE, mode="exact"))
        _step(plain, reference, doc[:, :64])
        _step(plain, reference, doc[:, 64:keep])
        probe = doc[:, keep:keep + 2]
        torch.testing.assert_close(_step(model, cache, probe), _step(plain, reference, probe))
        cache.crop(keep)
        reference.close()
    cache.close()


def test_crop_leaves_no_freed_chunk_in_the_prefetch_hint():
    """The chunks the last sparse step attended to are read ahead for the next one; a crop (or a failed pass's
    undo) that frees some of them must not leave them there to be read from records already removed."""
    model = build_model("llama")
    doc = _doc(200)
    cache = KVTierCache.for_model(model, **dict(SPARSE, sparse_budget=64))
    _feed(model, cache, doc, 150)
    keep = 100
    assert any(c.end > keep for layer in cache.tiers.layers for c in layer.last_union)
    cache.crop(keep)
    for layer in cache.tiers.layers:
        held = {id(c) for c in layer.chunks}
        assert all(id(c) in held for c in layer.last_union)
    cache.close()
