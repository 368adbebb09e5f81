"""Chunked prefill: the same result as a one-shot prefill, within the device budget plus one segment."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model, twin
from helpers import cache_kw, padded_batch

from kvtier import KVTierCache, prefill

TIGHT = dict(chunk_size=16, sink_tokens=4, recent_window=16, device_budget=48, host_budget=32, staging_tokens=64)


@pytest.mark.parametrize("name", ["llama", "gemma2", "qwen2", "gpt2"])
@pytest.mark.parametrize("mode", ["exact", "sparse"])
def test_chunked_prefill_equals_one_shot(name, mode):
    ref = build_model(name)
    model = twin(ref)
    ids, mask = padded_batch([300, 241])
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[:, -1]
    extra = dict(mode="sparse", sparse_budget=1.0, min_chunk_size=8, max_chunk_size=48, observation_window=16) \
        if mode == "sparse" else {}
    cache = KVTierCache.for_model(model, **TIGHT, **extra)
    got = prefill(model, cache, ids, attention_mask=mask, segment_tokens=70, progress=False)
    assert (got - want)[mask[:, -1].bool()].abs().max() < 1e-5
    assert cache.get_seq_length() == 300
    # ... and generation continues exactly as from a one-shot prefill
    full_mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
    next_ids = want.argmax(-1, keepdim=True)
    with torch.no_grad():
        a = ref(input_ids=torch.cat([ids, next_ids], 1), attention_mask=full_mask,
                position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0)).logits[:, -1]
        b = model(input_ids=next_ids, attention_mask=full_mask,
                  position_ids=(full_mask.cumsum(-1) - 1)[:, -1:], **{cache_kw(model): cache}).logits[:, -1]
    assert (a - b).abs().max() < 1e-5
    cache.close()


def test_device_memory_stays_within_budget_plus_one_segment():
    model = build_model("llama")
    cache = KVTierCache.for_model(model, **TIGHT)
    peaks = []

    def check(*_):
        s = cache.stats()
        peaks.append(s.device.tokens)
        assert max(p.used for p in cache.tiers.device_pools.values()) <= TIGHT["device_budget"]
        assert s.staging_peak_tokens <= TIGHT["staging_tokens"]
        assert cache.tiers.prefetcher.staged_tokens <= cache.config.prefetch_tokens

    for layer in model.model.layers:
        layer.register_forward_hook(check)
    prefill(model, cache, torch.randint(3, 128, (1, 1000)), segment_tokens=100, progress=False)
    s = cache.stats()
    assert len(peaks) == 4 * 10 and s.device.peak_tokens <= 48 and s.disk.tokens > 800
    cache.close()


def test_prefill_shows_progress(capsys):
    model = build_model("llama")
    cache = KVTierCache.for_model(model, **TIGHT)
    prefill(model, cache, torch.randint(3, 128, (1, 300)), segment_tokens=100, progress=True)
    err = capsys.readouterr().err
    assert "prefill" in err and "tok/s" in err and "disk" in err
    cache.close()


def test_prefill_checks_its_arguments():
    model = build_model("llama")
    cache = KVTierCache.for_model(model)
    with pytest.raises(ValueError, match="segment_tokens"):
        prefill(model, cache, torch.zeros(1, 5, dtype=torch.long), segment_tokens=0)
    with pytest.raises(ValueError, match="attention_mask covers 3 positions, expected 5"):
        prefill(model, cache, torch.zeros(1, 5, dtype=torch.long), attention_mask=torch.ones(1, 3))
    for dtype in (torch.uint8, torch.int16):  # passed an integer check, then failed inside the embedding
        with pytest.raises(ValueError, match="input_ids must be an int64 .or int32. tensor"):
            prefill(model, cache, torch.zeros(1, 5, dtype=dtype))
    # positions count the mask's ones: a 2 or a NaN gave positions no forward pass would use (other logits)
    for bad in (torch.full((1, 5), 2), torch.full((1, 5), 0.5), torch.full((1, 5), float("nan"))):
        with pytest.raises(ValueError, match="1 for tokens and 0 for padding only"):
            prefill(model, cache, torch.zeros(1, 5, dtype=torch.long), attention_mask=bad)
    assert cache.get_seq_length() == 0


def test_a_one_token_last_segment_is_still_exact_in_sparse_mode():
    """141 tokens in segments of 70 end with a one-token forward: it must not take the sparse decode path."""
    ref = build_model("llama")
    model = twin(ref)
    ids = torch.randint(3, 100, (1, 141), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = ref(input_ids=ids).logits[:, -1]
    with KVTierCache.for_model(model, mode="sparse", sparse_budget=0.1, chunk_size=16, sink_tokens=4,
                               recent_window=16) as cache:
        got = prefill(model, cache, ids, segment_tokens=70, progress=False)
        assert cache.config.mode == "sparse"  # restored after the one-token segment
    assert (got - want).abs().max() < 1e-5
