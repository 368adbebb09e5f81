"""CUDA-only paths: the device pool on the GPU, pinned host memory, exact parity there. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model, twin
from helpers import cache_kw, padded_batch, reference_run, step_logits

from kvtier import KVTierCache

pytestmark = pytest.mark.gpu
CHUNKING = dict(chunk_size=16, sink_tokens=4, recent_window=16, device_budget=40, host_budget=32)


@pytest.mark.parametrize("name", ["llama", "gemma2", "qwen2"])
def test_exact_parity_on_cuda(name):
    ref = build_model(name).cuda()
    model = twin(ref)
    ids, mask = padded_batch([150, 117])
    ids, mask = ids.cuda(), mask.cuda()
    ref_logits, toks = reference_run(ref, ids, mask, n_decode=6)
    cache = KVTierCache.for_model(model, **CHUNKING)
    logits = step_logits(model, cache, ids, mask, [100, 50], toks)
    real = torch.cat([mask, torch.ones(2, 6, dtype=mask.dtype, device=mask.device)], 1).bool()
    assert (logits - ref_logits).abs().amax(-1)[real].max().item() < 1e-4
    s = cache.stats()
    assert s.device.peak_tokens <= 40 and s.host.peak_tokens <= 32 and s.disk.hits > 0
    cache.close()


def test_pools_live_where_they_should():
    model = build_model("llama").cuda()
    cache = KVTierCache.for_model(model, **CHUNKING)
    model(input_ids=torch.randint(3, 128, (1, 200), device="cuda"), **{cache_kw(model): cache})
    pool = cache.tiers.device_pools[0]
    assert pool.k.is_cuda
    host = cache.tiers.host_pools[0]
    assert host.data and all(k.is_pinned() and v.is_pinned() for k, v in host.data.values())
    cache.close()


def test_greedy_generate_identical_on_cuda():
    ref = build_model("llama").cuda()
    model = twin(ref)
    ids, mask = padded_batch([90, 64], seed=1)
    ids, mask = ids.cuda(), mask.cuda()
    want = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    cache = KVTierCache.for_model(model, **CHUNKING)
    got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                         **{cache_kw(model): cache})
    assert torch.equal(got, want)
    cache.close()


def test_sparse_with_side_stream_uploads_matches_exact():
    """Sparse decoding at full budget on CUDA, with tight budgets so the next layer's chunks are uploaded
    from pinned host memory on the side stream: still equal to the reference."""
    ref = build_model("llama").cuda()
    model = twin(ref)
    ids, mask = padded_batch([300, 260])
    ids, mask = ids.cuda(), mask.cuda()
    ref_logits, toks = reference_run(ref, ids, mask, n_decode=8)
    cache = KVTierCache.for_model(model, mode="sparse", sparse_budget=1.0, chunk_size=16, sink_tokens=4,
                                  recent_window=16, min_chunk_size=8, max_chunk_size=48, device_budget=120,
                                  host_budget=200)
    logits = step_logits(model, cache, ids, mask, [ids.shape[1]], toks)
    real = torch.cat([mask, torch.ones(2, 8, dtype=mask.dtype, device=mask.device)], 1).bool()
    assert (logits - ref_logits).abs().amax(-1)[real].max().item() < 1e-4
    assert cache.tiers._side_stream is not None
    cache.close()


def test_speed_benchmark_measures_offloaded_dynamic_cache_on_cuda():
    from kvtier.bench.speed import run

    shape = dict(layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=64, vocab=1024)
    result = run([900], 2, 2, 0.05, 0.1, 0.5, shape, device="cuda", configs=["exact", "shared-tiered"])
    row = result["results"][0]
    assert row["offloaded"]["max_abs_logit_diff_vs_static"] < 1e-3  # the same KV, moved through CPU memory
    assert row["exact"]["max_abs_logit_diff_vs_static"] < 1e-3
    assert row["shared-tiered"]["speedup_vs_offloaded"] > 0 and row["shared-tiered"]["peak_device_bytes"] > 0


def test_remove_span_on_cuda_matches_the_moved_reference():
    """TIM's span removal with chunks on the GPU, in pinned host memory (turned in place) and on disk (turned
    when read): the next token's logits equal a DynamicCache holding the kept KV moved by hand."""
    import transformers as tf

    from kvtier.rope import Rope

    ref = build_model("llama").cuda()
    model = twin(ref)
    ids = torch.randint(3, 128, (1, 200), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    cache = KVTierCache.for_model(model, **CHUNKING)
    with torch.no_grad():
        model(input_ids=ids, **{cache_kw(model): cache})
        full = tf.DynamicCache()
        ref(input_ids=ids, use_cache=True, **{cache_kw(ref): full})
    cache.remove_span(30, 90)
    moved = tf.DynamicCache()
    for i, (layer, rope) in enumerate(zip(full.layers, Rope.for_layers(ref))):
        k, v = layer.keys, layer.values
        moved.update(torch.cat([k[:, :, :30], rope.shift(k[:, :, 90:], -60)], 2),
                     torch.cat([v[:, :, :30], v[:, :, 90:]], 2), i)
    token, pos = torch.tensor([[7]], device="cuda"), torch.tensor([[140]], device="cuda")
    with torch.no_grad():
        got = model(input_ids=token, position_ids=pos, **{cache_kw(model): cache}).logits
        want = ref(input_ids=token, position_ids=pos, **{cache_kw(ref): moved}).logits
    assert (got - want).abs().max().item() < 1e-4
    cache.close()


def test_schema_constraint_masks_cuda_logits():
    pytest.importorskip("xgrammar")
    from tiny import build_tokenizer

    from kvtier.tim import SchemaConstraint, thread_schema

    tok = build_tokenizer()
    constraint = SchemaConstraint(tok, thread_schema(None, 2, 8))
    logits = torch.zeros(len(tok) + 7, device="cuda")
    constraint.mask_logits(logits)
    allowed = torch.isfinite(logits).nonzero().flatten().tolist()
    assert allowed and all(tok.decode([i]).startswith("{") for i in allowed)  # a thread opens with "{"
