"""The Hogwild history in kvtier's tiers: spilled to host and disk, and read sparsely."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model, twin

from kvtier import HogwildCache

CHUNKING = dict(chunk_size=16, sink_tokens=4, recent_window=16)


def _session(model, workers: int = 3, **history_options) -> tuple[torch.Tensor, HogwildCache]:
    """A scripted collaboration: a 240-token prompt, headers, 12 steps, two finished steps; every step's logits."""
    g = torch.Generator().manual_seed(0)
    cache = HogwildCache.for_model(model, workers=workers, **CHUNKING, **history_options)
    cache.prefill_history(torch.randint(3, 128, (240,), generator=g))
    cache.set_headers([5, 6, 7], [8, 9])
    logits = []
    for t in range(12):
        logits.append(cache.step(torch.randint(3, 128, (workers,), generator=g)))
        if t in (4, 8):
            cache.finish_step(t % workers)
    return torch.stack(logits), cache


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_history_on_disk_gives_the_logits_of_history_on_the_device(family):
    ref = build_model(family)
    want, c0 = _session(twin(ref))
    got, c1 = _session(twin(ref), device_budget=48, host_budget=16)
    stats = c1.history_cache.stats()
    assert stats.disk.tokens > 0 and stats.device.tokens <= 48 * len(c1.history_cache.tiers.layers)
    assert c0.history_cache.stats().disk.tokens == 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    c0.close()
    c1.close()


def test_sparse_history_at_full_budget_is_exact_and_below_it_reads_less():
    ref = build_model("llama")
    want, c0 = _session(twin(ref))
    full, c1 = _session(twin(ref), mode="sparse", sparse_budget=1.0)
    torch.testing.assert_close(full, want, rtol=1e-5, atol=1e-5)
    sparse, c2 = _session(twin(ref), mode="sparse", sparse_budget=0.2, device_budget=96, host_budget=0)
    attended = c2.history_cache.stats().mean_attended_tokens
    assert attended is not None and attended < 0.5 * c2.history_cache.get_seq_length()
    assert not torch.allclose(sparse, want, atol=1e-4)  # it really read a subset
    assert torch.isfinite(sparse).all()
    for c in (c0, c1, c2):
        c.close()


def test_a_finished_step_is_stored_in_the_history_layer():
    model = build_model("llama")
    cache = HogwildCache.for_model(model, workers=2, **CHUNKING, device_budget=48, host_budget=0)
    cache.prefill_history(list(range(3, 103)))
    cache.step([[10, 11, 12], [20, 21, 22]])
    before = cache.history_cache.get_seq_length()
    assert cache.finish_step(1) == 3
    assert cache.history_cache.get_seq_length() == before + 3 == 103
    k, _ = cache.layers[0].history.kv()
    assert k.shape[1] == 103
    cache.close()
