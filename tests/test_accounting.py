"""Invariant 2: budgets are hard, checked at every step; stats() accounts for every token and byte."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model
from helpers import cache_kw, padded_batch

from kvtier import KVTierCache
from kvtier.layers import TieredLayer
from kvtier.store.chunk import Tier

CHUNKING = dict(chunk_size=16, sink_tokens=4, recent_window=16)


@pytest.mark.parametrize("device_budget, host_budget", [(36, 0), (40, 32), (100, None), (None, None)])
def test_budgets_hold_at_every_step(device_budget, host_budget):
    model = build_model("gemma3")  # sliding and full layers mixed
    cache = KVTierCache.for_model(model, device_budget=device_budget, host_budget=host_budget, staging_tokens=40,
                                  **CHUNKING)
    seen = []

    def check(*_):
        s = cache.stats()
        per_layer = [cache.tiers.device_pools[i].used for i in cache.tiers.device_pools]
        host_layer = [cache.tiers.host_pools[i].used for i in cache.tiers.host_pools]
        if device_budget is not None:
            assert max(per_layer) <= device_budget
        if host_budget is not None:
            assert max(host_layer) <= host_budget
        assert s.staging_peak_tokens <= 40
        seen.append(s.device.tokens)

    for layer in model.model.layers:
        layer.register_forward_hook(check)
    ids, mask = padded_batch([180, 133])
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False, **{cache_kw(model): cache})
    s = cache.stats()
    assert len(seen) == 4 * 20  # prefill + 19 decode forwards, 4 layers each
    if device_budget is not None:
        assert s.device.peak_tokens <= device_budget
    if host_budget is not None:
        assert s.host.peak_tokens <= host_budget
    cache.close()


def test_every_token_is_somewhere_and_counts_add_up():
    model = build_model("llama")
    cache = KVTierCache.for_model(model, device_budget=40, host_budget=32, **CHUNKING)
    ids = torch.randint(3, 128, (1, 200))
    model.generate(input_ids=ids, max_new_tokens=15, do_sample=False, **{cache_kw(model): cache})
    total = cache.get_seq_length()
    assert total == 214  # the last generated token is never fed back
    on = {Tier.DEVICE: 0, Tier.HOST: 0, Tier.DISK: 0}
    for layer in cache.layers:
        assert isinstance(layer, TieredLayer)
        covered = sorted((c.start, c.end) for c in layer.chunks) + [(layer.win_start, layer.length)]
        assert covered[0][0] == 0 and all(a[1] == b[0] for a, b in zip(covered, covered[1:]))
        for c in layer.chunks:
            on[c.tier] += c.length
        on[Tier.DEVICE] += layer.length - layer.win_start
    s = cache.stats()
    assert s.device.tokens == on[Tier.DEVICE] and s.host.tokens == on[Tier.HOST]
    assert on[Tier.DISK] > on[Tier.DEVICE] + on[Tier.HOST]  # most of it lives on disk
    assert s.disk.tokens >= on[Tier.DISK]  # records exist for every disk-only chunk (and some promoted ones)
    # Every fetch that missed the device was served by the host or the disk.
    assert s.device.misses == s.host.hits + s.disk.hits and s.host.misses == s.disk.hits
    assert s.disk.bytes_read > 0 and s.disk.bytes_written > 0 and s.host.bytes_moved > 0
    assert s.disk.compression_ratio is not None and s.disk.compression_ratio > 0.9
    assert s.steps == 15
    d = s.as_dict()
    assert set(d["disk"]) >= {"tokens", "bytes", "hits", "misses", "bytes_moved", "compression_ratio"}
    cache.close()


def test_temporary_store_is_removed_on_close():
    model = build_model("llama")
    cache = KVTierCache.for_model(model, device_budget=40, host_budget=0, **CHUNKING)
    model(input_ids=torch.randint(3, 128, (1, 120)), **{cache_kw(model): cache})
    path = cache.store_path
    assert path is not None and path.exists()
    cache.close()
    assert not path.exists()


def test_no_spill_means_no_store():
    model = build_model("llama")
    cache = KVTierCache.for_model(model, **CHUNKING)
    model(input_ids=torch.randint(3, 128, (1, 120)), **{cache_kw(model): cache})
    assert cache.store_path is None and cache.stats().disk.tokens == 0
    cache.close()


def test_sliding_layers_stay_on_device_and_bounded():
    from conftest import WINDOW

    from kvtier.layers import SlidingLayer

    model = build_model("gemma2")
    cache = KVTierCache.for_model(model, device_budget=40, host_budget=0, **CHUNKING)
    model.generate(input_ids=torch.randint(3, 128, (1, 300)), max_new_tokens=5, **{cache_kw(model): cache})
    sliding = [layer for layer in cache.layers if isinstance(layer, SlidingLayer)]
    assert sliding and all(layer.k.shape[2] == WINDOW - 1 + CHUNKING["recent_window"] for layer in sliding)
    assert all(layer.k.device == torch.device("cpu") for layer in sliding)  # the device tier here
    assert set(cache.tiers.device_pools) == {i for i, layer in enumerate(cache.layers) if layer not in sliding}
    cache.close()


def test_store_size_limit_fails_cleanly_through_the_cache(tmp_path):
    from kvtier import StoreFullError
    from kvtier.store.disk import DiskStore

    model = build_model("llama")
    cache = KVTierCache.for_model(model, device_budget=40, host_budget=0, store_path=tmp_path / "s",
                                  initial_map_bytes=1 << 16, max_store_bytes=1 << 17, **CHUNKING)
    with pytest.raises(StoreFullError, match="size limit"):
        model(input_ids=torch.randint(3, 128, (1, 1000)), **{cache_kw(model): cache})
    cache.tiers.close()  # release the lock without cleanup, as a crashed process would
    store = DiskStore(tmp_path / "s", create=False)
    assert store.get_meta("session")["state"] == "incomplete"
    assert all(store.get(k) is not None for k in store.keys())
    store.close()


def test_store_grows_during_a_prefill(tmp_path):
    model = build_model("llama")
    cache = KVTierCache.for_model(model, device_budget=40, host_budget=0, store_path=tmp_path / "s",
                                  initial_map_bytes=1 << 16, **CHUNKING)
    model(input_ids=torch.randint(3, 128, (1, 1000)), **{cache_kw(model): cache})
    assert cache.tiers.disk.map_bytes > 1 << 16 and cache.stats().disk.tokens > 3000
    cache.close()
