"""Sparse decoding: selection under budgets, skew profiling, chunk planning, and exactness at full budget."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model, twin
from helpers import cache_kw, padded_batch, reference_run, step_logits
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

from kvtier import KVTierCache
from kvtier.layers import TieredLayer
from kvtier.sparse import QuestBound, Recency, decode_granularity, plan_chunks, skew_stats, token_importance
from kvtier.sparse import profile as profile_mod

SPARSE = dict(mode="sparse", chunk_size=16, sink_tokens=4, recent_window=16, min_chunk_size=8, max_chunk_size=48,
              observation_window=16)


# ------------------------------------------------------------------------------------ selection
@settings(max_examples=80, deadline=None)
@given(
    c=st.integers(1, 12),
    budget=st.integers(0, 80),
    seed=st.integers(0, 10_000),
)
def test_selection_takes_the_best_chunks_that_fit(c, budget, seed):
    g = torch.Generator().manual_seed(seed)
    b, h = 2, 3
    lengths = torch.randint(1, 20, (c,), generator=g)
    starts = torch.cumsum(lengths, 0) - lengths
    forced = torch.zeros(c, dtype=torch.bool)
    forced[0] = seed % 2 == 0
    scores = torch.randn(b, h, c, generator=g)

    class Fixed(QuestBound):
        def score(self, q, kmin, kmax, starts):
            return scores

    kmin = torch.zeros(b, h, c, 4)
    sel = Fixed().select(torch.zeros(b, 2 * h, 4), kmin, kmin, lengths, starts, budget, forced)
    for bi in range(b):
        for hi in range(h):
            chosen = sel[bi, hi]
            assert bool(chosen[forced].all())
            free = chosen & ~forced
            assert int(lengths[free].sum()) <= budget
            # the best chunks in score order while they fit ...
            order = [i for i in scores[bi, hi].argsort(descending=True).tolist() if not forced[i]]
            prefix = 0
            while prefix < len(order) and int(lengths[order[: prefix + 1]].sum()) <= budget:
                prefix += 1
            assert all(free[i] for i in order[:prefix])
            # ... then, past the first that did not fit, the best of the rest that fits what is left is taken too
            # (one large chunk does not shut out every smaller one)
            left = budget - int(lengths[order[:prefix]].sum())
            rest = [i for i in order[prefix:] if int(lengths[i]) <= left]
            if rest:
                assert free[rest[0]]


def test_padding_only_chunks_are_never_selected():
    lengths = torch.tensor([4, 4, 4])
    starts = torch.tensor([0, 4, 8])
    has = torch.tensor([[False, True, True], [True, True, True]])
    sel = Recency().select(torch.zeros(2, 2, 4), torch.zeros(2, 2, 3, 4), torch.zeros(2, 2, 3, 4), lengths, starts,
                           100, None, has)
    assert not sel[0, :, 0].any() and sel[1, :, 0].all()


def test_recency_keeps_the_newest_chunks():
    lengths = torch.tensor([4, 8, 8, 8])
    starts = torch.tensor([0, 4, 12, 20])
    forced = torch.tensor([True, False, False, False])
    sel = Recency().select(torch.zeros(1, 2, 4), torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 4), lengths, starts,
                           16, forced)
    assert sel[0, 0].tolist() == [True, False, True, True]


# ------------------------------------------------------------------------------------ profiling
def test_blockwise_importance_equals_dense_softmax(monkeypatch):
    monkeypatch.setattr(profile_mod, "_BLOCK_K", 7)  # force several key blocks
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 8, generator=g)
    k = torch.randn(2, 2, 30, 8, generator=g)
    valid = torch.ones(2, 30, dtype=torch.bool)
    valid[1, :6] = False
    got = token_importance(q, k, q_pos0=25, k_pos0=0, scale=0.35, softcap=4.0, key_valid=valid)
    s = torch.einsum("bhgwd,bhnd->bhgwn", q.view(2, 2, 2, 5, 8), k) * 0.35
    s = torch.tanh(s / 4.0) * 4.0
    causal = torch.arange(30)[None, :] <= torch.arange(25, 30)[:, None]
    s = s.masked_fill(~(causal[None, None, None] & valid[:, None, None, None, :]), float("-inf"))
    want = torch.softmax(s, -1).mean(dim=(2, 3))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_skew_stats_tell_flat_from_peaked():
    flat = skew_stats(torch.ones(1, 2, 1000))
    assert abs(flat.top5 - 0.05) < 1e-3 and flat.desert == 0.0
    peaked = torch.full((1, 2, 1000), 1e-6)
    peaked[..., 10] = 1.0
    s = skew_stats(peaked)
    assert s.top1 > 0.99 and s.desert > 0.99


# ------------------------------------------------------------------------------------- planning
@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 400), seed=st.integers(0, 1000), lo=st.integers(1, 16), spread=st.integers(0, 64))
def test_plans_stay_within_bounds(n, seed, lo, spread):
    hi = lo + spread
    base = (lo + hi) // 2
    imp = torch.rand(n, generator=torch.Generator().manual_seed(seed)) ** 4
    sizes = plan_chunks(imp, n, base, lo, hi)
    assert sum(sizes) == n
    assert all(lo <= s <= hi for s in sizes[:-1]) and all(1 <= s <= hi for s in sizes[-1:])


def test_flat_attention_gives_base_chunks_and_peaks_get_small_ones():
    assert plan_chunks(torch.ones(640), 640, 64, 16, 256) == [64] * 10
    assert plan_chunks(None, 650, 64, 16, 256) == [64] * 10 + [10]
    imp = torch.full((1024,), 0.01)
    imp[500:520] = 10.0  # an important region in a desert
    sizes = plan_chunks(imp, 1024, 64, 16, 256)
    bounds = torch.tensor(sizes).cumsum(0).tolist()
    around = [s for s, end in zip(sizes, bounds) if end > 500 and end - s < 520]  # chunks overlapping the peak
    assert around and max(around) == 16  # the peak is cut finely
    assert max(sizes) == 256  # the desert is merged coarsely
    assert decode_granularity(sizes, 16, 64) >= 16


# ------------------------------------------------------------------------------ end-to-end exactness
@pytest.mark.parametrize("budget", [dict(), dict(device_budget=40, host_budget=32)], ids=["all-device", "tiered"])
def test_full_budget_equals_exact(family, budget):
    ref = build_model(family)
    model = twin(ref)
    ids, mask = padded_batch([150, 117])
    ref_logits, toks = reference_run(ref, ids, mask, n_decode=6)
    cache = KVTierCache.for_model(model, sparse_budget=1.0, **SPARSE, **budget)
    logits = step_logits(model, cache, ids, mask, [100, 50], toks)
    real = torch.cat([mask, torch.ones(2, 6, dtype=mask.dtype)], 1).bool()
    assert (logits - ref_logits).abs().amax(-1)[real].max().item() < 1e-5
    cache.close()


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_full_budget_generates_the_same_tokens(name):
    ref = build_model(name)
    model = twin(ref)
    ids, mask = padded_batch([120, 90], seed=4)
    want = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, num_beams=2, do_sample=False)
    cache = KVTierCache.for_model(model, sparse_budget=1.0, device_budget=48, host_budget=16, **SPARSE)
    got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, num_beams=2, do_sample=False,
                         **{cache_kw(model): cache})
    assert torch.equal(got, want)
    cache.close()


def _sparse_reference(layer: TieredLayer, q, sel, scale):
    """Dense attention over exactly what the selection keeps (window, sinks, selected chunks)."""
    k_all, v_all = layer.tiers.layer_kv(layer)
    b, hkv, n, d = k_all.shape
    keep = torch.zeros(b, hkv, n, dtype=torch.bool)
    keep[..., layer.win_start:] = True
    for c in layer.chunks:
        keep[..., c.start:c.end] |= sel[..., c.row, None]
    g = q.shape[1] // hkv
    s = torch.einsum("bhgd,bhnd->bhgn", q.view(b, hkv, g, d).float(), k_all.float()) * scale
    s = s.masked_fill(~keep[:, :, None, :], float("-inf"))
    return torch.einsum("bhgn,bhnd->bhgd", torch.softmax(s, -1), v_all.float()).reshape(b, hkv * g, d)


@pytest.mark.parametrize("tiered", [False, True])
def test_sparse_step_attends_exactly_to_the_selection(tiered, monkeypatch):
    """Intercept one layer's sparse step and compare it with dense attention over the same selection."""
    import kvtier.read as read

    model = build_model("llama")
    extra = dict(device_budget=60, host_budget=16) if tiered else {}
    cache = KVTierCache.for_model(model, sparse_budget=40, **SPARSE, **extra)
    seen = []
    select = cache.tiers.selector.select

    def spy_select(q, *args, **kwargs):
        sel = select(q, *args, **kwargs)
        seen.append((q.clone(), sel.clone()))
        return sel

    monkeypatch.setattr(cache.tiers.selector, "select", spy_select)
    real_sparse = read.sparse_attention
    results = []

    def spy(layer, q, handle, pad, scale, softcap, need_lse=False):
        out, lse = real_sparse(layer, q, handle, pad, scale, softcap, need_lse)
        if layer.index == 1:
            results.append((layer, seen[-1][0], seen[-1][1], out[:, :, 0], scale))
        return out, lse

    monkeypatch.setattr("kvtier.layers.sparse_attention", spy)
    ids = torch.randint(3, 128, (1, 200))
    model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, **{cache_kw(model): cache})
    assert results
    layer, q, sel, out, scale = results[-1]
    assert not bool(sel.all()), "the budget should leave some chunks out"
    want = _sparse_reference(layer, q, sel, scale)
    torch.testing.assert_close(out.float(), want, rtol=1e-5, atol=1e-5)
    cache.close()


@pytest.mark.parametrize("shared", [False, True])
def test_the_step_in_one_call_equals_the_step_in_parts(shared, monkeypatch):
    """Where every chunk is in the arena, a CPU float32 step selects, lists runs and attends in one C call; it
    gives the logits, the selected tokens and the chunks marked used that the step in parts gives."""
    import kvtier.read as read
    from kvtier.kernels import native

    if native.library() is None:
        pytest.skip("the C library cannot be built here")
    ref = build_model("llama")
    ids = torch.randint(3, 128, (2, 300), generator=torch.Generator().manual_seed(5))
    options = dict(**SPARSE, sparse_budget=48, page_size=8, shared_selection=shared)
    in_place = read._step_in_place
    ran = []

    def counted(*args):
        got = in_place(*args)
        ran.append(got is not None)
        return got

    runs = []
    for one_call in (True, False):
        model = twin(ref)
        monkeypatch.setattr(read, "_step_in_place", counted if one_call else lambda *args: None)
        cache = KVTierCache.for_model(model, **options)
        out = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, **{cache_kw(model): cache})
        layer = cache.tiers.layers[1]
        runs.append((out, cache.stats(), [(c.row, c.last_used, c.selected) for c in layer.chunks]))
        cache.close()
    assert ran and all(ran)
    (a, stats_a, chunks_a), (b, stats_b, chunks_b) = runs
    assert torch.equal(a.sequences, b.sequences)
    assert max((x - y).abs().max().item() for x, y in zip(a.scores, b.scores)) < 1e-5
    assert stats_a.mean_attended_tokens == stats_b.mean_attended_tokens
    assert chunks_a == chunks_b


# -------------------------------------------------------------------------------- pipeline & tiers
def _long_sparse_run(tmp_path=None, **options):
    model = build_model("llama")
    cache = KVTierCache.for_model(model, **{**SPARSE, "sparse_budget": 48, "device_budget": 80, "host_budget": 16,
                                            **options})
    ids = torch.randint(3, 128, (2, 400), generator=torch.Generator().manual_seed(3))
    out = model.generate(input_ids=ids, max_new_tokens=12, do_sample=False, **{cache_kw(model): cache})
    return model, cache, out


def test_prefetch_changes_nothing_but_the_timing():
    _, with_pf, out_a = _long_sparse_run(prefetch=True)
    _, without, out_b = _long_sparse_run(prefetch=False)
    assert torch.equal(out_a, out_b)
    s, t = with_pf.stats(), without.stats()
    assert s.prefetch_issued > 0 and s.prefetch_hits > 0 and 0 < s.prefetch_hit_rate <= 1
    assert t.prefetch_issued == 0 and t.prefetch_hit_rate == 0.0 and t.disk_loads_sync > 0
    assert s.stall_s >= 0 and s.per_step()["disk"]["bytes_read"] > 0
    with_pf.close()
    without.close()


def test_budgets_and_staging_hold_in_sparse_mode():
    model = build_model("llama")
    cache = KVTierCache.for_model(model, **SPARSE, sparse_budget=40, device_budget=64, host_budget=24,
                                  prefetch_tokens=64)
    checks = []

    def check(*_):
        assert max(p.used for p in cache.tiers.device_pools.values()) <= 64
        assert max(p.used for p in cache.tiers.host_pools.values()) <= 24
        assert cache.tiers.prefetcher.staged_tokens <= 64
        checks.append(1)

    for layer in model.model.layers:
        layer.register_forward_hook(check)
    model.generate(input_ids=torch.randint(3, 128, (1, 500)), max_new_tokens=15, do_sample=False,
                   **{cache_kw(model): cache})
    s = cache.stats()
    assert len(checks) == 4 * 15 and s.mean_attended_tokens <= 40
    cache.close()


def test_sparse_session_keeps_its_abstracts_and_plan(tmp_path):
    ref = build_model("llama")
    a, b = twin(ref), twin(ref)
    doc = torch.randint(3, 128, (1, 300), generator=torch.Generator().manual_seed(8))
    ids = torch.cat([doc, torch.tensor([[7, 8, 9]])], 1)
    options = dict(**SPARSE, sparse_budget=60, device_budget=80, host_budget=16)
    one_shot = KVTierCache.for_model(a, **options)  # same prefix, never saved
    with torch.no_grad():
        a(input_ids=doc, **{cache_kw(a): one_shot})
    want = a.generate(input_ids=ids, max_new_tokens=8, do_sample=False, **{cache_kw(a): one_shot})
    plan = [[c.length for c in layer.chunks[:10]] for layer in one_shot.tiers.layers]
    cache = KVTierCache.for_model(b, store_path=tmp_path / "s", **options)
    with torch.no_grad():
        b(input_ids=doc, **{cache_kw(b): cache})
    cache.save()
    cache.close()
    plain = KVTierCache.open(tmp_path / "s", b)  # runtime options are the caller's, never the store's
    assert plain.config.mode == "exact" and plain.config.device_budget is None
    plain.close()
    reopened = KVTierCache.open(tmp_path / "s", b, **options)
    assert reopened.config.mode == "sparse" and reopened.config.sparse_budget == 60
    assert [[c.length for c in layer.chunks[:10]] for layer in reopened.tiers.layers] == plan
    assert all(len(layer.abstracts) == len(layer.chunks) for layer in reopened.tiers.layers)
    got = b.generate(input_ids=ids, max_new_tokens=8, do_sample=False, **{cache_kw(b): reopened})
    assert torch.equal(got, want)
    reopened.close()
    one_shot.close()


def test_refinement_splits_hot_chunks_merges_cold_ones_and_keeps_the_data():
    ref = build_model("llama")
    model = twin(ref)
    ids = torch.randint(3, 128, (1, 300), generator=torch.Generator().manual_seed(2))
    cache = KVTierCache.for_model(model, **{**SPARSE, "adaptive_chunks": False}, selector="recency",
                                  sparse_budget=64, refine=True, refine_every=4)
    before = [c.length for c in cache.tiers.layers[0].chunks]
    kw = {cache_kw(model): cache}
    generated = model.generate(input_ids=ids, max_new_tokens=9, do_sample=False, **kw)
    layer = cache.tiers.layers[0]
    lengths = [c.length for c in layer.chunks]
    assert lengths != before
    assert max(lengths) > 16 and min(c.length for c in layer.chunks if not c.pinned) < 16
    assert [c.row for c in layer.chunks] == list(range(len(layer.chunks))) == list(range(len(layer.abstracts)))
    assert all(a.end == b.start for a, b in zip(layer.chunks, layer.chunks[1:]))
    # Nothing was lost or moved: the refined chunks hold exactly the keys a DynamicCache computes.
    seq = cache.get_seq_length()
    dyn = DynamicCache()
    with torch.no_grad():
        ref(input_ids=generated[:, :seq], use_cache=True, **{cache_kw(ref): dyn})
    k_all, _ = cache.tiers.layer_kv(layer)
    torch.testing.assert_close(k_all, dyn.layers[0].keys, rtol=1e-5, atol=1e-5)
    cache.close()


def test_lossy_disk_only_touches_low_importance_chunks(monkeypatch):
    from kvtier.store.codec import FLAG_INT8, RecordCodec

    def peaked(q, k, *args, **kwargs):  # attention on tokens 100-160 only: the rest is a desert
        imp = torch.full((k.shape[0], k.shape[1], k.shape[2]), 1e-4)
        imp[..., 100:160] = 1.0
        return imp

    monkeypatch.setattr("kvtier.layers.token_importance", peaked)
    model = build_model("llama")
    cache = KVTierCache.for_model(model, **SPARSE, sparse_budget=64, device_budget=48, host_budget=0,
                                  lossy_disk=True, lossy_below=1.0)
    with torch.no_grad():
        model(input_ids=torch.randint(3, 128, (1, 400)), **{cache_kw(model): cache})
    layer = cache.tiers.layers[0]
    on_disk = [c for c in layer.chunks if c.on_disk]
    assert on_disk
    flags = {c.chunk_id: RecordCodec.read_header(cache.tiers.disk.get(c.key), "r").flags & FLAG_INT8 for c in on_disk}
    for c in on_disk:
        assert bool(flags[c.chunk_id]) == (c.importance is not None and c.importance < 1.0)
        assert bool(flags[c.chunk_id]) == (c.end <= 100 or c.start >= 160)
    assert any(flags.values()) and not all(flags.values())
    cache.close()


def test_lossy_needs_sparse_mode():
    with pytest.raises(ValueError, match="lossy_disk.*sparse"):
        KVTierCache.for_model(build_model("llama"), lossy_disk=True)


def test_crop_keeps_the_recent_window_full():
    model = build_model("llama")
    cache = KVTierCache.for_model(model, **SPARSE, sparse_budget=40)
    kw = {cache_kw(model): cache}
    with torch.no_grad():
        model(input_ids=torch.randint(3, 128, (1, 200)), **kw)
        for t in range(30):
            model(input_ids=torch.tensor([[5 + t]]), **kw)
    cache.crop(-30)
    for layer in cache.tiers.layers:
        assert layer.win_slots.numel() >= 16 and layer.length == 200
        assert len(layer.abstracts) == len(layer.chunks)
        assert (layer.chunks[-1].end if layer.chunks else 0) == layer.win_start
    cache.close()


def test_shared_selection_keeps_the_same_chunks_for_every_head():
    from kvtier.sparse import SharedAcrossHeads

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 8, generator=g)
    a, z = torch.randn(2, 2, 10, 8, generator=g), torch.randn(2, 2, 10, 8, generator=g)
    kmin, kmax = torch.minimum(a, z), torch.maximum(a, z)
    lengths, starts = torch.full((10,), 4), torch.arange(10) * 4
    per_head = QuestBound().select(q, kmin, kmax, lengths, starts, 12)
    shared = SharedAcrossHeads(QuestBound()).select(q, kmin, kmax, lengths, starts, 12)
    assert torch.equal(shared[:, 0], shared[:, 1]) and (shared.sum(-1) == 3).all()
    assert not torch.equal(per_head[:, 0], per_head[:, 1])


def test_shared_selection_bounds_the_tokens_loaded_per_step():
    model = build_model("llama")
    cache = KVTierCache.for_model(model, **SPARSE, sparse_budget=60, shared_selection=True, device_budget=100,
                                  host_budget=0)
    model.generate(input_ids=torch.randint(3, 128, (1, 500)), max_new_tokens=6, do_sample=False,
                   **{cache_kw(model): cache})
    layer = cache.tiers.layers[0]
    assert sum(c.length for c in layer.last_union) <= 60
    cache.close()


@pytest.mark.parametrize("refine", [False, True])
def test_a_crop_at_the_smallest_budget_leaves_room_for_the_next_token(refine):
    """Adaptive chunks longer than chunk_size, cut or unsealed by a crop, filled the window past what a decode
    step leaves: at the smallest device budget the crop was accepted and the next token found no device room
    (a RuntimeError, the cache left interrupted). Every crop now decodes on, equal to DynamicCache."""
    model, ref_model = build_model("llama"), build_model("llama")
    ids = torch.randint(3, 128, (1, 46), generator=torch.Generator().manual_seed(1))
    for keep in range(30, 44):
        cache = KVTierCache.for_model(model, mode="sparse", sparse_budget=1.0, chunk_size=2, recent_window=2,
                                      sink_tokens=0, min_chunk_size=1, max_chunk_size=4, device_budget=4,
                                      host_budget=0, refine=refine, refine_every=2)
        with torch.no_grad():
            model(input_ids=ids[:, :40], use_cache=True, **{cache_kw(model): cache})
            for i in range(40, 46):
                model(input_ids=ids[:, i:i + 1], use_cache=True, **{cache_kw(model): cache})
            cache.crop(keep)
            got = model(input_ids=torch.tensor([[9]]), position_ids=torch.tensor([[keep]]), use_cache=True,
                        **{cache_kw(model): cache}).logits[0, -1]
            want = ref_model(input_ids=torch.cat([ids[:, :keep], torch.tensor([[9]])], 1)).logits[0, -1]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        cache.close()
