"""A forward pass that raises leaves the cache as it was before it: a full store or an error in the model's own
layers is undone (the tokens, token ids and every tier as before the pass), so the caller can free room, save
what was held, or go on. An error inside kvtier's own work, or Ctrl-C, marks the cache `interrupted` instead."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model, twin
from helpers import cache_kw

from kvtier import KVTierCache, StoreFullError
from kvtier.errors import IncompleteSessionError
from kvtier.layers import TieredLayer
from kvtier.segmented import prefill
from kvtier.store.disk import DiskStore

CHUNKING = dict(chunk_size=16, sink_tokens=4, recent_window=16)
SEGMENT = 64


def _doc(n: int, seed: int = 3) -> torch.Tensor:
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def _step(model, cache, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=True, **{cache_kw(model): cache}).logits[0, -1]


def _state(cache: KVTierCache) -> tuple:
    s = cache.stats()
    return ([layer.logical_length for layer in cache.layers], cache.interrupted,
            None if cache.token_ids is None else cache.token_ids.tolist(),
            (s.device.tokens, s.host.tokens, s.disk.tokens))


def _raising_layer(model, index: int, when=lambda: True):
    """A hook on decoder layer `index` that raises (outside kvtier: the model's own code) while `when()`."""
    def hook(*_):
        if when():
            raise RuntimeError("the model failed")
    return model.model.layers[index].register_forward_pre_hook(hook)


def test_a_full_store_mid_prefill_leaves_the_completed_segments(tmp_path):
    """The disk limit is hit inside a segment: the segments before it stay, whole, and can be saved."""
    model = build_model("llama")
    doc = _doc(1500)
    # zstd records: the sizes below leave the store room for the crop's deletes (LMDB needs free pages to delete;
    # a store too full for that keeps the records, and then the save below would find no room either)
    cache = KVTierCache.for_model(model, store_path=tmp_path / "s", max_store_bytes=1 << 20, device_budget=40,
                                  host_budget=32, zstd_level=-1, **CHUNKING)
    with pytest.raises(StoreFullError):
        prefill(model, cache, doc, segment_tokens=SEGMENT, progress=False)
    held = cache.get_seq_length()
    assert not cache.interrupted and held % SEGMENT == 0 and 0 < held < doc.shape[1]
    assert [layer.logical_length for layer in cache.layers] == [held] * len(cache.layers)
    assert torch.equal(cache.token_ids, doc[:, :held])

    reference = KVTierCache.for_model(twin(model), **CHUNKING)
    ref_model = twin(model)
    prefill(ref_model, reference, doc[:, :held], segment_tokens=SEGMENT, progress=False)
    probe = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(_step(model, cache, probe), _step(ref_model, reference, probe))

    cache.crop(held)  # the probe's tokens go again
    with pytest.raises(StoreFullError):  # the chunks still on the device and host need room on disk too
        cache.save()
    kept = held // 2
    cache.crop(kept)  # dropping the later half frees its records: the rest is saved
    cache.save()
    cache.close()
    reopened = KVTierCache.open(tmp_path / "s", twin(model))
    assert reopened.get_seq_length() == kept and torch.equal(reopened.token_ids, doc[:, :kept])
    reopened.close()
    reference.close()


def test_a_store_too_full_to_delete_still_crops_and_saves(tmp_path, monkeypatch):
    """LMDB writes the pages a deletion changes to free pages first, so a full store can refuse even a delete.
    The records a crop or a save drops are then left behind, unreferenced: the crop still cuts every layer, the
    save still commits and syncs, and the next open drops the leftovers."""
    model = build_model("llama")
    doc = _doc(528)
    cache = KVTierCache.for_model(model, store_path=tmp_path / "s", device_budget=40, host_budget=32, **CHUNKING)
    prefill(model, cache, doc[:, :400], segment_tokens=SEGMENT, progress=False)
    cache.save()  # records the next save, which names fewer, drops
    _step(model, cache, doc[:, 400:])  # records written since, which the crop frees
    refusals = []

    def full(self, keys):
        refusals.append(list(keys))
        raise StoreFullError("the store is full")

    monkeypatch.setattr(DiskStore, "remove_many", full)
    cache.crop(200)
    assert [layer.logical_length for layer in cache.layers] == [200] * len(cache.layers)
    assert torch.equal(cache.token_ids, doc[:, :200]) and not cache.interrupted
    cache.save()
    assert len(refusals) >= 2 and cache.stats().records_left == sum(map(len, refusals))  # crop's, then save's
    ref_model = twin(model)
    reference = KVTierCache.for_model(ref_model, **CHUNKING)
    prefill(ref_model, reference, doc[:, :200], segment_tokens=SEGMENT, progress=False)
    probe = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(_step(model, cache, probe), _step(ref_model, reference, probe))
    cache.close()

    monkeypatch.undo()
    again = twin(model)
    reopened = KVTierCache.open(tmp_path / "s", again)
    assert set(reopened.tiers.disk.keys()) == reopened._saved_keys  # the open dropped what the full store left
    assert reopened.get_seq_length() == 200 and torch.equal(reopened.token_ids, doc[:, :200])
    reference.crop(200)
    torch.testing.assert_close(_step(again, reopened, probe), _step(ref_model, reference, probe))
    reopened.close()
    reference.close()


@pytest.mark.parametrize("family", ["llama", "gemma3"])  # gemma3: sliding-window layers too
@pytest.mark.parametrize("failing", ["prefill", "decode"])
def test_an_error_in_the_model_undoes_the_pass(family, failing):
    model = build_model(family)
    doc = _doc(200)
    cache = KVTierCache.for_model(model, **CHUNKING)
    prefill(model, cache, doc[:, :150], segment_tokens=SEGMENT, progress=False)
    before = _state(cache)
    ids = doc[:, 150:] if failing == "prefill" else doc[:, 150:151]
    hook = _raising_layer(model, 1)
    with pytest.raises(RuntimeError, match="the model failed"):
        _step(model, cache, ids)
    hook.remove()
    assert _state(cache) == before

    plain = twin(model)
    reference = KVTierCache.for_model(plain, **CHUNKING)
    prefill(plain, reference, doc[:, :150], segment_tokens=SEGMENT, progress=False)
    torch.testing.assert_close(_step(model, cache, ids), _step(plain, reference, ids))  # as if it never failed
    assert cache.get_seq_length() == 150 + ids.shape[1]
    cache.close()
    reference.close()


def test_a_failed_pass_undoes_only_itself_and_the_next_pass_runs():
    """Fail on the third of several decode steps: the two before it stay."""
    model = build_model("llama")
    doc = _doc(100)
    cache = KVTierCache.for_model(model, **CHUNKING)
    prefill(model, cache, doc[:, :80], segment_tokens=SEGMENT, progress=False)
    calls = {"n": 0}

    def third():
        calls["n"] += 1
        return calls["n"] == 3

    hook = _raising_layer(model, 0, third)
    for i in range(80, 84):
        if i == 82:
            with pytest.raises(RuntimeError):
                _step(model, cache, doc[:, i:i + 1])
        _step(model, cache, doc[:, i:i + 1])
    hook.remove()
    assert cache.get_seq_length() == 84 and torch.equal(cache.token_ids, doc[:, :84])
    cache.close()


def test_an_error_inside_kvtier_marks_the_cache_interrupted(tmp_path, monkeypatch):
    """kvtier's own work failing half-way leaves nothing a rollback could trust: save refuses, reset() clears."""
    model = build_model("llama")
    doc = _doc(150)
    cache = KVTierCache.for_model(model, store_path=tmp_path / "s", **CHUNKING)
    prefill(model, cache, doc[:, :100], segment_tokens=SEGMENT, progress=False)

    def broken(self, *args, **kwargs):
        raise RuntimeError("a bug in kvtier")

    monkeypatch.setattr(TieredLayer, "attend", broken)
    with pytest.raises(RuntimeError, match="a bug in kvtier"):
        _step(model, cache, doc[:, 100:])
    monkeypatch.undo()
    assert cache.interrupted
    with pytest.raises(IncompleteSessionError, match="did not finish"):
        cache.save()
    cache.reset()
    assert not cache.interrupted and cache.get_seq_length() == 0
    cache.close()
