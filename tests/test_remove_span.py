"""`KVTierCache.remove_span`: a span of positions leaves every tier and the tokens after it move left.

The reference for every check is a plain transformers forward over the kept tokens, whose KV is the KV the model
wrote for the whole sequence, with the kept keys after the span turned to their new positions (`Rope.shift`):
exactly what kvtier must hold, whichever tier each chunk was in.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import transformers as tf
from conftest import build_model
from helpers import cache_kw

import kvtier
from kvtier import KVTierCache
from kvtier.errors import CacheInputError, UnsupportedModelError
from kvtier.rope import Rope
from kvtier.store.chunk import Tier

TIERED = dict(chunk_size=16, sink_tokens=4, recent_window=8, adaptive_chunks=False, device_budget=96,
              host_budget=96, page_size=8)


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _full_kv(model, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    cache = tf.DynamicCache()
    model(input_ids=ids, use_cache=True, **{cache_kw(model): cache})
    return [(layer.keys, layer.values) for layer in cache.layers]


def _removed(kv, ropes, spans):
    """The reference KV after removing `spans` one after another (positions as held at each removal)."""
    out = []
    for (k, v), rope in zip(kv, ropes):
        for start, end in spans:
            k = torch.cat([k[:, :, :start], rope.shift(k[:, :, end:], start - end)], dim=2)
            v = torch.cat([v[:, :, :start], v[:, :, end:]], dim=2)
        out.append((k, v))
    return out


@torch.no_grad()
def _next_logits(model, cache, token: torch.Tensor) -> torch.Tensor:
    pos = torch.tensor([[cache.get_seq_length()]])
    return model(input_ids=token, position_ids=pos, use_cache=True, **{cache_kw(model): cache}).logits[0, -1]


def _reference_logits(model, kv, token):
    ref = tf.DynamicCache()
    for i, (k, v) in enumerate(kv):
        ref.update(k, v, i)
    return _next_logits(model, ref, token)


@torch.no_grad()
def _prefilled(model, ids, **options) -> KVTierCache:
    cache = KVTierCache.for_model(model, **options)
    for at in range(0, ids.shape[1], 64):  # segments: chunks spread over the device, host and disk
        model(input_ids=ids[:, at:at + 64], use_cache=True, **{cache_kw(model): cache})
    return cache


SPANS = {
    "inside a chunk": [(40, 45)],
    "whole chunks on disk": [(20, 52)],
    "across chunk edges": [(30, 70)],
    "inside the window": [(252, 255)],
    "chunks into the window": [(200, 254)],
    "the sink": [(1, 3)],
    "one token": [(100, 101)],
    "to the end": [(180, 256)],
    "nested removals": [(150, 180), (100, 160), (10, 20)],
}


@pytest.mark.parametrize("spans", SPANS.values(), ids=SPANS.keys())
def test_logits_equal_a_forward_over_the_kept_tokens_moved(spans):
    model, ref_model = build_model("llama"), build_model("llama")
    ids = _ids(256)
    cache = _prefilled(model, ids, **TIERED)
    tiers = {c.tier for layer in cache.tiers.layers for c in layer.chunks}
    assert tiers == {Tier.DEVICE, Tier.HOST, Tier.DISK}
    for start, end in spans:
        cache.remove_span(start, end)
    kept = 256 - sum(e - s for s, e in spans)
    assert cache.get_seq_length() == kept
    assert cache.token_ids.shape[1] == kept
    ropes = Rope.for_layers(ref_model)
    kv = _removed(_full_kv(ref_model, ids), ropes, spans)
    for layer, (k, v) in zip(cache.tiers.layers, kv):
        hk, hv = cache.tiers.layer_kv(layer)
        torch.testing.assert_close(hk, k, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(hv, v)
    token = torch.tensor([[7]])
    torch.testing.assert_close(_next_logits(model, cache, token), _reference_logits(ref_model, kv, token),
                               atol=1e-4, rtol=1e-4)
    cache.close()


def test_a_removal_under_inference_mode_leaves_tables_that_later_steps_can_update():
    model = build_model("llama")
    cache = _prefilled(model, _ids(256), **TIERED, mode="sparse")
    with torch.inference_mode():
        cache.remove_span(100, 200)
        for t in range(20):  # decoding on: chunks sealed, abstracts and pools updated in place
            _next_logits(model, cache, torch.tensor([[t + 3]]))
        cache.remove_span(30, 60)
    with torch.no_grad():
        _next_logits(model, cache, torch.tensor([[5]]))
    assert cache.get_seq_length() == 256 - 100 + 20 - 30 + 1
    cache.close()


@pytest.mark.parametrize("inside", [False, True], ids=["removed-outside", "removed-inside-inference-mode"])
def test_host_copies_made_under_inference_mode_move_with_a_span(inside):
    """Chunks spilled to the host by a pass under torch.inference_mode (kvtier.prefill runs so, as the custom
    loop does) were kept as inference tensors, which the span's in-place turn could not write: remove_span
    raised half-way and the next pass read the half-moved layers (logits off by 0.06)."""
    model, ref_model = build_model("llama"), build_model("llama")
    ids = _ids(256)
    cache = KVTierCache.for_model(model, **TIERED)
    kvtier.prefill(model, cache, ids, segment_tokens=64, progress=False)
    assert any(c.tier == Tier.HOST for layer in cache.tiers.layers for c in layer.chunks)
    with torch.inference_mode() if inside else contextlib.nullcontext():
        cache.remove_span(40, 45)
    assert not cache.interrupted
    kv = _removed(_full_kv(ref_model, ids), Rope.for_layers(ref_model), [(40, 45)])
    token = torch.tensor([[7]])
    torch.testing.assert_close(_next_logits(model, cache, token), _reference_logits(ref_model, kv, token),
                               atol=1e-4, rtol=1e-4)
    cache.close()


def test_a_move_reads_no_disk_record_and_abstracts_still_bound_the_keys():
    model = build_model("llama")
    cache = _prefilled(model, _ids(256), **TIERED, mode="sparse")
    read = cache.stats().disk.bytes_read
    on_disk = next(c for c in cache.tiers.layers[0].chunks if c.tier == Tier.DISK and c.start >= 40)
    start = on_disk.start  # a span that ends on a chunk edge: no chunk is cut on the disk side
    cache.remove_span(start - 16, start)
    assert cache.stats().disk.bytes_read == read
    assert any(c.record_shift for layer in cache.tiers.layers for c in layer.chunks)
    assert any(c.tier == Tier.DEVICE and c.start > start for c in cache.tiers.layers[0].chunks)
    for layer in cache.tiers.layers:
        kmin, kmax, lengths, starts = layer.abstracts.view()
        pages = layer.abstracts.pages()
        for c in layer.chunks:
            k = cache.tiers.fetch(c)[0].float()
            assert int(starts[c.row]) == c.start and int(lengths[c.row]) == c.length
            assert (kmin[:, :, c.row] <= k.amin(dim=2) + 1e-5).all() and (k.amax(dim=2) <= kmax[:, :, c.row] + 1e-5).all()
            first, count = int(pages.first[c.row]), int(pages.count[c.row])
            if c.tier == Tier.DEVICE:  # exact again: computed from the turned keys
                want = layer.abstracts.summarize(k, c.start)
                torch.testing.assert_close(kmin[:, :, c.row], want[0], rtol=0, atol=0)
                torch.testing.assert_close(kmax[:, :, c.row], want[1], rtol=0, atol=0)
                torch.testing.assert_close(pages.pmin[:, :, first:first + count].float(), want[4], rtol=0, atol=0)
                torch.testing.assert_close(pages.pmax[:, :, first:first + count].float(), want[5], rtol=0, atol=0)
            for p in range(count):
                part = k[:, :, p * 8:(p + 1) * 8]
                assert (pages.pmin[:, :, first + p].float() <= part.amin(dim=2) + 1e-5).all()
                assert (part.amax(dim=2) <= pages.pmax[:, :, first + p].float() + 1e-5).all()
    with torch.no_grad():  # and sparse decoding goes on over the moved chunks
        _next_logits(model, cache, torch.tensor([[5]]))
    cache.close()


def test_device_memory_stays_flat_when_every_sub_task_is_removed():
    model = build_model("llama")
    cache = _prefilled(model, _ids(64), chunk_size=16, sink_tokens=4, recent_window=8, adaptive_chunks=False)
    peaks = []
    for round_ in range(6):
        with torch.no_grad():
            for t in _ids(40, seed=round_)[0]:
                _next_logits(model, cache, t.view(1, 1))
        cache.remove_span(64, cache.get_seq_length())  # the round's tokens leave; positions are reused
        assert cache.get_seq_length() == 64
        pools = cache.tiers.device_pools.values()
        assert all(p.dense and p.high_water == p.used for p in pools)  # no holes left: attention needs no mask
        peaks.append(sum(p.used for p in pools))
    assert len(set(peaks)) == 1


def test_a_saved_session_with_moved_chunks_reopens_with_the_same_logits(tmp_path):
    model = build_model("llama")
    ids = _ids(256)
    cache = _prefilled(model, ids, **TIERED, store_path=tmp_path / "s")
    cache.remove_span(30, 70)
    token = torch.tensor([[9]])
    cache.save()
    cache.close()
    reopened = KVTierCache.open(tmp_path / "s", build_model("llama"), device_budget=96, host_budget=96)
    assert any(c.record_shift for layer in reopened.tiers.layers for c in layer.chunks)  # read back turned
    fresh = _prefilled(model, ids, **TIERED)
    fresh.remove_span(30, 70)
    torch.testing.assert_close(_next_logits(model, reopened, token), _next_logits(model, fresh, token),
                               atol=1e-4, rtol=1e-4)
    reopened.close()
    fresh.close()


@pytest.mark.parametrize("span", [(1, 3), (1, 2)])
def test_a_span_inside_the_sink_saves_and_reopens(tmp_path, span):
    """A span inside the sink leaves its two ends as two pinned chunks: the save wrote them and the reopen
    refused them as damage ("pinned ... does not start at 0"), so the saved session was lost."""
    model = build_model("llama")
    ids = _ids(256)
    cache = _prefilled(model, ids, **TIERED, store_path=tmp_path / "s")
    cache.remove_span(*span)
    assert [c.pinned for c in cache.tiers.layers[0].chunks[:3]] == [True, True, False]
    cache.save()
    cache.close()
    token = torch.tensor([[9]])
    reopened = KVTierCache.open(tmp_path / "s", build_model("llama"), device_budget=96, host_budget=96)
    fresh = _prefilled(model, ids, **TIERED)
    fresh.remove_span(*span)
    torch.testing.assert_close(_next_logits(model, reopened, token), _next_logits(model, fresh, token),
                               atol=1e-4, rtol=1e-4)
    reopened.close()
    fresh.close()


def test_sliding_layers_move_when_they_hold_enough_and_refuse_otherwise():
    model, ref_model = build_model("gemma3"), build_model("gemma3")
    ids = _ids(120)
    cache = _prefilled(model, ids, chunk_size=16, sink_tokens=4, recent_window=8, adaptive_chunks=False)
    with pytest.raises(CacheInputError, match="sliding-window layer"):
        cache.remove_span(100, 116)  # the window (24) would reach back past the 23 + 8 tokens kept
    assert cache.get_seq_length() == 120  # refused before anything changed
    cache.remove_span(113, 117)
    ropes = Rope.for_layers(ref_model)
    kv = _removed(_full_kv(ref_model, ids), ropes, [(113, 117)])
    token = torch.tensor([[3]])
    torch.testing.assert_close(_next_logits(model, cache, token), _reference_logits(ref_model, kv, token),
                               atol=1e-4, rtol=1e-4)
    cache.close()


@pytest.mark.parametrize("start,end", [(-1, 3), (5, 4), (0, 500), (1.5, 3), (True, 2)])
def test_bad_spans_are_refused_with_one_line(start, end):
    model = build_model("llama")
    cache = _prefilled(model, _ids(64))
    with pytest.raises(CacheInputError) as err:
        cache.remove_span(start, end)
    assert "\n" not in str(err.value)
    cache.close()


def test_layers_of_different_lengths_are_refused():
    """update() on layer 0 alone (the per-layer contract) left it 2 tokens longer: a removal checked against
    layer 0 drove the others to negative lengths and the next pass failed inside attention."""
    model = build_model("llama")
    cache = _prefilled(model, _ids(64))
    kv = torch.zeros(1, model.config.num_key_value_heads, 2, model.config.head_dim)
    cache.update(kv, kv, 0)
    with pytest.raises(CacheInputError, match="different numbers of tokens .64 to 66"):
        cache.remove_span(0, 66)
    assert [cache.get_seq_length(i) for i in range(len(cache.layers))] == [66] + [64] * (len(cache.layers) - 1)
    cache.crop(64)
    cache.remove_span(0, 10)
    assert {cache.get_seq_length(i) for i in range(len(cache.layers))} == {54}
    cache.close()


def test_rope_that_changes_with_length_and_models_without_rope_are_refused():
    tf_config = build_model("llama").config
    tf_config.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    torch.manual_seed(0)
    dynamic = tf.AutoModelForCausalLM.from_config(tf_config).eval()
    cache = _prefilled(dynamic, _ids(32))
    with pytest.raises(UnsupportedModelError, match="dynamic"):
        cache.remove_span(4, 8)
    cache.close()
    gpt2 = build_model("gpt2")
    cache = _prefilled(gpt2, _ids(32))
    with pytest.raises(UnsupportedModelError):
        cache.remove_span(4, 8)
    cache.close()


def test_the_arena_stays_dense_after_a_span_in_the_middle_leaves():
    """The moved tokens are written into the lowest free slots, the removed span's among them: when they held the
    top of the arena (the usual case: the newest tokens follow the span) no hole is left, so attention over the
    arena needs no mask and spans no more slots than tokens."""
    model, ref_model = build_model("llama"), build_model("llama")
    ids = _ids(200)
    cache = _prefilled(model, ids, chunk_size=16, sink_tokens=4, recent_window=8, adaptive_chunks=False)
    cache.remove_span(50, 90)
    for pool in cache.tiers.device_pools.values():
        assert pool.dense and pool.high_water == pool.used == 160
    cache.remove_span(150, 155)  # cuts the last chunk and the recent window
    kv = _removed(_full_kv(ref_model, ids), Rope.for_layers(ref_model), [(50, 90), (150, 155)])
    token = torch.tensor([[11]])
    torch.testing.assert_close(_next_logits(model, cache, token), _reference_logits(ref_model, kv, token),
                               atol=1e-4, rtol=1e-4)
    cache.close()
