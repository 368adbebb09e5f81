"""The rest of the transformers Cache contract: crop, batch selection and repetition, reset, sizes."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model, twin
from helpers import cache_kw, padded_batch, step_logits

from kvtier import CacheInputError, KVTierCache, KVTierConfig, ModelSpec, parse_budget

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


def test_budgets_as_sizes_are_read_as_on_the_command_line(tmp_path):
    """device_budget/host_budget as strings: tokens ("64") or a size of KV for all full-attention layers, the
    same tokens per layer `kvtier.parse_budget` (the command line's reading) gives; byte options take sizes."""
    model = build_model("llama")  # 4 full layers, 2 KV heads of 16, fp32: 256 bytes per token and layer
    spec = ModelSpec.from_model(model)
    cache = KVTierCache.for_model(model, device_budget="96KiB", host_budget="64", max_store_bytes="1GiB",
                                  store_path=tmp_path / "s", chunk_size=16, sink_tokens=4, recent_window=16)
    assert cache.config.device_budget == parse_budget("96KiB", spec) == 96 * 1024 // (256 * 4)
    assert cache.config.host_budget == 64 and cache.config.max_store_bytes == 2**30
    model(input_ids=torch.randint(3, 128, (1, 100)), **{cache_kw(model): cache})
    assert cache.stats().device.peak_tokens <= 96
    cache.save()
    cache.close()
    again = KVTierCache.open(tmp_path / "s", model, device_budget="0.046875MiB", host_budget="0")
    assert (again.config.device_budget, again.config.host_budget) == (48, 0)
    again.close()
    assert KVTierConfig(initial_map_bytes="64MiB").initial_map_bytes == 64 * 2**20


@pytest.mark.parametrize(("options", "message", "unread"), [
    ({"device_budget": "lots"}, "`device_budget`: budget 'lots': write a number of tokens (8192) or a size", True),
    ({"host_budget": "8 parsecs"}, "`host_budget`: budget '8 parsecs'", True),
    ({"device_budget": "100B"}, "`device_budget`: budget 100B is less than one token per layer", True),
    ({"max_store_bytes": "big"}, "`max_store_bytes`: size 'big': write a number of bytes", False),
    ({"device_budget": "1KiB"}, "`device_budget`=1 tokens per layer cannot hold the sinks", False),
])
def test_bad_size_strings_are_one_line_errors(tmp_path, options, message, unread):
    """unread: `open` refuses the budget string before it looks for the store (the rest needs its header)."""
    model = build_model("llama")
    with pytest.raises(ValueError) as err:
        KVTierCache.for_model(model, **options)
    assert message in str(err.value) and "\n" not in str(err.value)
    if unread:
        with pytest.raises(ValueError, match="^`"):
            KVTierCache.open(tmp_path / "nothing", model, **options)


def test_a_config_alone_takes_tokens_and_says_where_sizes_go():
    with pytest.raises(ValueError, match=r"`device_budget`='8GiB': a KVTierConfig built alone takes tokens per "
                                         r"layer; pass the string to KVTierCache.for_model or KVTierCache.open"):
        KVTierConfig(device_budget="8GiB")


def test_set_mode_switches_attention_and_keeps_the_chunks():
    model = twin(build_model("llama"))
    cache = KVTierCache.for_model(model, mode="sparse", sparse_budget=24, **CHUNKING)
    ids = torch.randint(3, 128, (1, 200))
    with torch.no_grad():
        model(input_ids=ids, **{cache_kw(model): cache})
    layout = [(c.start, c.length) for c in cache.layers[0].chunks]
    cache.set_mode("exact")
    assert cache.config.mode == "exact" and [(c.start, c.length) for c in cache.layers[0].chunks] == layout
    step = torch.tensor([[7]])
    with torch.no_grad():
        got = model(input_ids=step, **{cache_kw(model): cache}).logits[:, -1]
        want = build_model("llama")(input_ids=torch.cat([ids, step], 1)).logits[:, -1]
    assert torch.allclose(got, want, atol=1e-5)  # exact again: every chunk attended
    with pytest.raises(ValueError, match="`mode` must be one of"):
        cache.set_mode("fast")
    cache.close()


@pytest.mark.parametrize("other", ["mistral", "gemma3"])
def test_a_cache_made_for_another_model_is_refused(other):
    """The same KV shape, other windows and weights: a llama fed a mistral or gemma3 cache attended with that
    model's sliding windows, with no error. The same weights in another object are the same model."""
    import kvtier

    llama = build_model("llama")
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(1))
    cache = KVTierCache.for_model(build_model(other), **CHUNKING)
    kvtier.enable(llama)
    with pytest.raises(CacheInputError, match="made for another model"), torch.no_grad():
        llama(input_ids=ids, **{cache_kw(llama): cache})
    assert cache.get_seq_length() == 0
    cache.close()
    cache = KVTierCache.for_model(llama, **CHUNKING)
    same = twin(llama)
    kvtier.enable(same)
    with torch.no_grad():
        got = same(input_ids=ids, **{cache_kw(same): cache}).logits
    torch.testing.assert_close(got, llama(input_ids=ids).logits, rtol=0, atol=1e-5)
    cache.close()


def test_generate_given_only_the_cached_prompt_is_refused():
    """transformers feeds a prompt the cache holds whole again from position 0: the cache would hold it twice.
    Refused before anything is written; the prompt and a new token generate as a fresh run does."""
    from kvtier import prefill

    ref = build_model("llama")
    model = twin(ref)
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(2))
    cache = KVTierCache.for_model(model, **CHUNKING)
    prefill(model, cache, ids, progress=False)
    with pytest.raises(CacheInputError, match="feeds tokens the cache already holds"):
        model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, **{cache_kw(model): cache})
    assert cache.get_seq_length() == 40
    asked = torch.cat([ids, torch.tensor([[7]])], 1)
    out = model.generate(input_ids=asked, max_new_tokens=5, do_sample=False, **{cache_kw(model): cache})
    assert torch.equal(out, ref.generate(input_ids=asked, max_new_tokens=5, do_sample=False))
    cache.close()


def test_a_batch_the_device_cannot_hold_is_a_memory_error_and_changes_nothing():
    """reorder_cache / batch_repeat_interleave to more rows than memory holds: torch's allocator error before,
    a one-line CacheMemoryError now, before any layer changes."""
    from kvtier import CacheMemoryError

    model = build_model("llama")
    cache = KVTierCache.for_model(model, **CHUNKING)
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model(input_ids=ids, **{cache_kw(model): cache})
    with pytest.raises(CacheMemoryError, match="a batch of 1000000000000 rows needs"):
        cache.batch_repeat_interleave(10**12)
    with pytest.raises(CacheMemoryError, match="a batch of 10000000 rows needs"):
        cache.reorder_cache(torch.zeros(10**7, dtype=torch.long))
    assert cache.batch_size == 1 and cache.get_seq_length() == 40
    cache.batch_repeat_interleave(2)
    assert cache.batch_size == 2
    cache.close()


def test_a_refused_crop_changes_nothing():
    """A sliding-window layer cannot go back past what it keeps: the crop raised when it reached that layer, after
    the full-attention layers before it were already cut (layers of different lengths, the token ids lost)."""
    model = build_model("qwen2")  # full-attention layers first, then sliding ones
    ids = torch.randint(3, 128, (1, 200), generator=torch.Generator().manual_seed(4))
    cache = KVTierCache.for_model(model, **{**CHUNKING, "recent_window": 4})
    with torch.no_grad():
        model(input_ids=ids, **{cache_kw(model): cache})
    lengths = [cache.get_seq_length(i) for i in range(len(cache.layers))]
    with pytest.raises(CacheInputError, match="cannot crop sliding-window layer"):
        cache.crop(-150)
    assert [cache.get_seq_length(i) for i in range(len(cache.layers))] == lengths == [200] * len(lengths)
    assert torch.equal(cache.token_ids, ids)
    cache.close()
