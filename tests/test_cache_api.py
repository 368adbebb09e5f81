"""The rest of the transformers Cache contract: crop, batch selection and repetition, reset, sizes."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model, twin
from helpers import cache_kw, padded_batch, step_logits

from kvtier import CacheInputError, KVTierCache

CHUNKING = dict(chunk_size=16, sink_tokens=4, recent_window=16, device_budget=40, host_budget=32)


def _logits(model, cache, ids, mask=None):
    mask = torch.ones_like(ids) if mask is None else mask
    return step_logits(model, cache, ids, mask, [ids.shape[1]], [])


@pytest.mark.parametrize("name", ["llama", "qwen2"])
@pytest.mark.parametrize("drop", [3, 40, 130])  # inside the window, across chunks, back into the sink
def test_crop_then_continue_matches_a_fresh_run(name, drop):
    ref = build_model(name)
    model = twin(ref)
    ids = torch.randint(3, 128, (1, 150), generator=torch.Generator().manual_seed(4))
    cache = KVTierCache.for_model(model, **CHUNKING)
    kw = {cache_kw(model): cache}
    model(input_ids=ids, **kw)
    if name == "qwen2" and drop > 16:  # sliding layers keep W-1 + recent_window tokens: further is refused
        with pytest.raises(CacheInputError, match="sliding-window layer"):
            cache.crop(-drop)
        return
    cache.crop(-drop)
    assert cache.get_seq_length() == 150 - drop
    more = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(9))
    got = model(input_ids=more, position_ids=torch.arange(150 - drop, 162 - drop)[None], **kw).logits
    want = ref(input_ids=torch.cat([ids[:, : 150 - drop], more], 1)).logits[:, -12:]
    assert (got - want).abs().max() < 1e-5
    cache.close()


def test_positive_crop_keeps_that_many_tokens():
    model = build_model("llama")
    cache = KVTierCache.for_model(model, **CHUNKING)
    model(input_ids=torch.randint(3, 128, (1, 90)), **{cache_kw(model): cache})
    cache.crop(70)
    assert cache.get_seq_length() == 70
    cache.crop(0)
    assert cache.get_seq_length() == 70


def test_batch_select_and_repeat():
    ref = build_model("llama")
    model = twin(ref)
    ids, mask = padded_batch([100, 80])
    cache = KVTierCache.for_model(model, **CHUNKING)
    _logits(model, cache, ids, mask)
    cache.batch_select_indices(torch.tensor([1]))
    assert cache.batch_size == 1
    row = ids[1:, 20:]  # drop row 1's padding
    nxt = torch.tensor([[7]])
    got = model(input_ids=nxt, attention_mask=torch.ones(1, 101, dtype=torch.long)
                .index_fill_(1, torch.arange(20), 0), position_ids=torch.tensor([[80]]),
                **{cache_kw(model): cache}).logits
    want = ref(input_ids=torch.cat([row, nxt], 1)).logits[:, -1:]
    assert (got - want).abs().max() < 1e-5
    cache.batch_repeat_interleave(3)
    assert cache.batch_size == 3
    cache.close()


def test_prefix_of_one_row_serves_a_batch():
    ref = build_model("llama")
    model = twin(ref)
    doc = torch.randint(3, 128, (1, 120))
    cache = KVTierCache.for_model(model, **CHUNKING)
    model(input_ids=doc, **{cache_kw(model): cache})
    ids = torch.cat([doc, torch.tensor([[5, 6]])], 1)
    out = model.generate(input_ids=ids, max_new_tokens=6, num_beams=2, do_sample=False, **{cache_kw(model): cache})
    want = ref.generate(input_ids=ids, max_new_tokens=6, num_beams=2, do_sample=False)
    assert torch.equal(out, want)
    cache.close()


def test_reset_and_sizes():
    model = build_model("llama")
    cache = KVTierCache.for_model(model, **CHUNKING)
    kw = {cache_kw(model): cache}
    model(input_ids=torch.randint(3, 128, (1, 100)), **kw)
    assert cache.get_seq_length() == 100 and cache.get_mask_sizes(1, 0) == (101, 0)
    assert cache.get_max_length() == -1 and cache.get_query_offset() == 100
    assert cache.is_compileable is False and len(cache) == 4
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.stats().device.tokens == 0
    model(input_ids=torch.randint(3, 128, (1, 10)), **kw)
    assert cache.get_seq_length() == 10
    cache.close()
    cache.close()  # idempotent


def test_context_manager_closes():
    model = build_model("llama")
    with KVTierCache.for_model(model, **CHUNKING) as cache:
        model(input_ids=torch.randint(3, 128, (1, 10)), **{cache_kw(model): cache})
    with pytest.raises(Exception, match="closed"):
        model(input_ids=torch.tensor([[3]]), **{cache_kw(model): cache})


def test_grad_modes_mix_freely():
    """Prefill under inference_mode, decode under no_grad, then with grad enabled: the cache's storage
    never becomes an inference tensor nor joins an autograd graph."""
    ref = build_model("llama")
    model = twin(ref)
    ids = torch.randint(3, 128, (1, 140))
    cache = KVTierCache.for_model(model, **CHUNKING)
    kw = {cache_kw(model): cache}
    with torch.inference_mode():
        model(input_ids=ids[:, :100], **kw)
    with torch.no_grad():
        model(input_ids=ids[:, 100:120], **kw)
    got = model(input_ids=ids[:, 120:], **kw).logits
    assert got.requires_grad  # the model's own graph is untouched
    assert not cache.tiers.device_pools[0].k.requires_grad
    want = ref(input_ids=ids).logits[:, 120:]
    assert (got.detach() - want.detach()).abs().max() < 1e-5
    cache.crop(-10)
    cache.close()
