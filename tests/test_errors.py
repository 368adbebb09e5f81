"""Invariant 3: nothing is silently wrong. Bad arguments fail at construction with a message that says
what to change; a cache reaching the wrong attention or tensors fails at once and says how to fix it."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from conftest import build_model, twin
from helpers import cache_kw

import kvtier
from kvtier import (
    AttentionNotEnabledError,
    CacheInputError,
    KVTierCache,
    KVTierConfig,
    ModelSpec,
    UnsupportedModelError,
)


def test_budget_too_small_for_sinks_and_window():
    with pytest.raises(ValueError, match=r"device_budget.*sink_tokens \(4\) \+ recent_window \(64\) \+ chunk_size "
                                         r"\(64\) = 132.*at least 132"):
        KVTierConfig(device_budget=100)
    with pytest.raises(ValueError, match="device_budget"):
        KVTierCache.for_model(build_model("llama"), device_budget=20, chunk_size=16, recent_window=16)


@pytest.mark.parametrize(
    "options, field",
    [
        (dict(mode="fast"), "mode"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(host_budget=-1), "host_budget"),
        (dict(zstd_level=40), "zstd_level"),
        (dict(staging_tokens=0), "staging_tokens"),
        (dict(device_budget=True), "device_budget"),
        # chunking sizes become record lengths, 32 bits in a record header
        (dict(page_size=2**63), "page_size"),
        (dict(chunk_size=2**32, adaptive_chunks=False), "chunk_size"),
        (dict(recent_window=2**32), "recent_window"),
        (dict(max_chunk_size=2**40), "max_chunk_size"),
    ],
)
def test_bad_options_name_the_field(options, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        KVTierConfig(**options)


def test_wrong_dtype_is_refused():
    model = build_model("llama")
    cache = KVTierCache.for_model(model)
    model.to(torch.bfloat16)
    with pytest.raises(CacheInputError, match="bfloat16.*float32"):
        model(input_ids=torch.tensor([[5, 6, 7]]), **{cache_kw(model): cache})


def test_wrong_device_is_refused():
    model = build_model("llama")
    kvtier.enable(model)
    cache = KVTierCache(ModelSpec.from_model(model), device="meta")
    with pytest.raises(CacheInputError, match="on cpu but this cache keeps its device tier on meta"):
        model(input_ids=torch.tensor([[5, 6, 7]]), **{cache_kw(model): cache})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised when CUDA is missing")
def test_cuda_device_without_cuda_is_refused():
    with pytest.raises(CacheInputError, match="CUDA is not available"):
        KVTierCache(ModelSpec.from_model(build_model("llama")), device="cuda")


def test_cache_without_kvtier_attention_says_how_to_fix_it():
    model = build_model("llama")  # still on sdpa
    cache = KVTierCache(ModelSpec.from_model(model))
    with pytest.raises(AttentionNotEnabledError, match=r"kvtier.enable\(model\).*KVTierCache.for_model"):
        model.generate(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=2, **{cache_kw(model): cache})
    eager = build_model("llama")
    eager.set_attn_implementation("eager")
    with pytest.raises(AttentionNotEnabledError):
        eager(input_ids=torch.tensor([[5, 6, 7]]), **{cache_kw(eager): KVTierCache(ModelSpec.from_model(eager))})


def test_disable_restores_the_previous_attention():
    model = build_model("llama")
    cache = KVTierCache.for_model(model)
    assert model.config._attn_implementation == "kvtier"
    kvtier.disable(model)
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(AttentionNotEnabledError):
        model(input_ids=torch.tensor([[5, 6]]), **{cache_kw(model): cache})


def test_encoder_decoder_is_refused():
    t5 = tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                                    num_heads=2))
    with pytest.raises(UnsupportedModelError, match="encoder-decoder"):
        KVTierCache.for_model(t5)


def test_chunked_attention_is_refused():
    model = build_model("llama")
    model.config.attention_chunk_size = 16
    with pytest.raises(UnsupportedModelError, match="chunked attention"):
        KVTierCache.for_model(model)


def test_four_d_mask_is_refused():
    model = build_model("llama")
    cache = KVTierCache.for_model(model)
    mask = torch.ones(1, 1, 3, 3, dtype=torch.bool).tril()
    with pytest.raises(CacheInputError, match="2-D padding mask"):
        model(input_ids=torch.tensor([[5, 6, 7]]), attention_mask=mask, **{cache_kw(model): cache})


def test_short_mask_is_refused():
    model = build_model("llama")
    cache = KVTierCache.for_model(model)
    kw = {cache_kw(model): cache}
    model(input_ids=torch.tensor([[5, 6, 7]]), **kw)
    with pytest.raises(CacheInputError, match="3 cached tokens plus the 1 new ones"):
        model(input_ids=torch.tensor([[8]]), attention_mask=torch.ones(1, 1, dtype=torch.long), **kw)


def test_batch_change_is_refused():
    model = build_model("llama")
    cache = KVTierCache.for_model(model)
    kw = {cache_kw(model): cache}
    model(input_ids=torch.randint(3, 100, (2, 5)), **kw)
    with pytest.raises(CacheInputError, match="batch of 2 rows, got 3"):
        model(input_ids=torch.randint(3, 100, (3, 1)), **kw)


@pytest.mark.parametrize("name", ["llama", "gemma2", "mistral"])
def test_kvtier_attention_without_a_kvtier_cache_is_plain_attention(name):
    ref = build_model(name)
    model = kvtier.enable(twin(ref))
    ids = torch.randint(3, 128, (2, 40))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    with torch.no_grad():
        a = ref(input_ids=ids, attention_mask=mask, use_cache=False).logits
        b = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert (a - b)[mask.bool()].abs().max() < 1e-5


@pytest.mark.parametrize("model", [None, "llama", 5])
def test_enable_and_disable_take_a_model(model):
    """kvtier.enable / kvtier.disable on something that is not a torch module: one clear error, not an
    AttributeError from deep inside."""
    for call in (kvtier.enable, kvtier.disable):
        with pytest.raises(UnsupportedModelError, match=r"serves a transformers model \(a torch.nn.Module\), got"):
            call(model)
