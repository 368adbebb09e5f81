"""A session knows its tokens: a cache records the ids it holds, a saved session keeps them, and a prompt from
another document is refused with the position where the ids diverge. Plus the small edges of the cache API."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model, twin
from helpers import cache_kw, padded_batch

from kvtier import (
    CacheInputError,
    KVTierCache,
    KVTierConfig,
    PromptMismatchError,
    StoreFullError,
    prefill,
)

CHUNKING = dict(chunk_size=16, sink_tokens=4, recent_window=16, device_budget=40, host_budget=32)


@pytest.fixture
def saved(tmp_path):
    model = build_model("llama")
    doc = torch.randint(3, 128, (1, 200), generator=torch.Generator().manual_seed(4))
    m = twin(model)
    cache = KVTierCache.for_model(m, store_path=tmp_path / "s", **CHUNKING)
    prefill(m, cache, doc, segment_tokens=64, progress=False)
    cache.save()
    cache.close()
    return model, tmp_path / "s", doc


def test_a_reopened_session_refuses_another_document(saved):
    model, store, doc = saved
    other = doc.clone()
    other[0, 137] = 3 if doc[0, 137] != 3 else 4
    for prompt in (other, torch.cat([other, doc[:, :9]], 1)):  # equal length and longer
        with pytest.raises(PromptMismatchError, match=r"position 137 \(row 0\)"):
            KVTierCache.open(store, twin(model), prompt_ids=prompt)
    with pytest.raises(PromptMismatchError, match="fewer than the 200"):
        KVTierCache.open(store, twin(model), prompt_ids=doc[:, :150])
    cache = KVTierCache.open(store, twin(model), prompt_ids=doc[0])  # 1-D is fine
    assert torch.equal(cache.token_ids, doc)
    cache.close()


def test_token_ids_follow_generate_crop_and_beams():
    ref = build_model("llama")
    model = twin(ref)
    ids, mask = padded_batch([40, 31])
    cache = KVTierCache.for_model(model, **CHUNKING)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, num_beams=2,
                         **{cache_kw(model): cache})
    want = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, num_beams=2)
    assert torch.equal(out, want)
    # The cache holds every beam's ids but the last token (not fed yet); beams may have been reordered.
    held = cache.token_ids
    assert held.shape == (4, out.shape[1] - 1) and torch.equal(held[:, :40], ids.repeat_interleave(2, 0))
    cache.reset()
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, **{cache_kw(model): cache})
    cache.crop(-3)
    assert cache.token_ids.shape == (2, 41) and torch.equal(cache.token_ids[:, :40], ids)
    cache.close()


def test_embeddings_leave_the_ids_unknown_and_say_so(tmp_path):
    model = build_model("llama")
    cache = KVTierCache.for_model(model, store_path=tmp_path / "s", **CHUNKING)
    embeds = model.get_input_embeddings()(torch.randint(3, 128, (1, 50)))
    with torch.no_grad():
        model(inputs_embeds=embeds, **{cache_kw(model): cache})
    assert cache.token_ids is None
    with pytest.raises(PromptMismatchError, match="does not know which token ids it holds"):
        cache.check_prompt(torch.randint(3, 128, (1, 60)))
    cache.save()
    cache.close()
    again = KVTierCache.open(tmp_path / "s", model)
    assert again.token_ids is None and again.get_seq_length() == 50
    again.close()


def test_close_after_a_full_store_releases_everything(tmp_path):
    model = build_model("llama")
    cache = KVTierCache.for_model(model, store_path=tmp_path / "s", initial_map_bytes=1 << 16,
                                  max_store_bytes=1 << 17, **CHUNKING)
    with pytest.raises(StoreFullError):
        model(input_ids=torch.randint(3, 128, (1, 1000)), **{cache_kw(model): cache})
    cache.close()  # no KeyError: a failed eviction left every chunk where it was
    assert cache.stats().device.tokens == 0


def test_update_with_no_tokens_is_a_clear_error():
    model = build_model("llama")
    cache = KVTierCache.for_model(model)
    empty = torch.zeros(1, 2, 0, 16)
    with pytest.raises(CacheInputError, match="no tokens"):
        cache.update(empty, empty, 0)
    cache.close()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0, True, "0.5"])
def test_lossy_below_must_be_a_finite_number(value):
    with pytest.raises(ValueError, match="`lossy_below`"):
        KVTierConfig(mode="sparse", lossy_disk=True, lossy_below=value)
