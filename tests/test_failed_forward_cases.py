"""Failed forward passes in more situations: a reopened session, right after `remove_span` (and a `remove_span`
that fails itself), left-padded batches, the qwen2 / mistral / gpt_oss families, and a failure while disk reads
started ahead are in flight. After each failure the cache is either whole (the next pass computes what a cache
that never saw the failed pass computes, and a save reopens to it) or `interrupted` (save refused) - never
silently different."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import build_model, twin
from helpers import cache_kw, padded_batch

from kvtier import KVTierCache, StoreFullError
from kvtier.errors import IncompleteSessionError, StoreCorruptError
from kvtier.store.chunk import Tier
from kvtier.store.disk import DiskStore
from kvtier.store.tiers import TierManager

CHUNKING = dict(chunk_size=16, sink_tokens=4, recent_window=16)
TIERED = dict(CHUNKING, device_budget=40, host_budget=32)  # most chunks on disk


def _doc(n: int, seed: int = 3, rows: int = 1) -> torch.Tensor:
    return torch.randint(3, 128, (rows, n), generator=torch.Generator().manual_seed(seed))


def _step(model, cache, ids: torch.Tensor, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=True, **{cache_kw(model): cache}, **kw).logits[:, -1]


def _feed(model, cache, doc: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Prefill in 64-token passes up to 128, then one token per pass."""
    out = None
    at = start
    while at < end:
        n = min(64, end - at) if at < 128 else 1
        out = _step(model, cache, doc[:, at:at + n])
        at += n
    return out


def _state(cache: KVTierCache) -> tuple:
    return ([layer.logical_length for layer in cache.layers], [layer.batch for layer in cache.layers],
            cache.interrupted, None if cache.token_ids is None else cache.token_ids.tolist())


def _raising(model, index: int, exc: type[BaseException] = RuntimeError, when=lambda: True):
    """A pre-hook on decoder layer `index` that raises while `when()`: an error in the model's own code."""
    def hook(*_):
        if when():
            raise exc("the model failed")
    return model.model.layers[index].register_forward_pre_hook(hook)


def _fail_once(model, cache, ids, index: int = 2, exc: type[BaseException] = RuntimeError, **kw) -> None:
    """One pass that the model fails in decoder layer `index` (after kvtier wrote the layers before it)."""
    hook = _raising(model, index, exc)
    try:
        with pytest.raises(exc, match="the model failed"):
            _step(model, cache, ids, **kw)
    finally:
        hook.remove()


# ----------------------------------------------------------------------------------------- (1) reopened
@pytest.mark.parametrize("options", [CHUNKING, dict(TIERED, mode="sparse")], ids=["exact", "sparse-tiered"])
@pytest.mark.parametrize("failing", ["prefill", "decode"])
def test_a_failed_pass_on_a_reopened_session_is_undone_and_saves_again(tmp_path, options, failing):
    model = build_model("llama")
    doc = _doc(200)
    built = KVTierCache.for_model(model, store_path=tmp_path / "s", **options)
    _feed(model, built, doc, 0, 140)
    built.save()
    built.close()

    cache = KVTierCache.open(tmp_path / "s", model, **{k: v for k, v in options.items() if k not in CHUNKING})
    before = _state(cache)
    ids = doc[:, 140:170] if failing == "prefill" else doc[:, 140:141]
    _fail_once(model, cache, ids)
    assert _state(cache) == before

    plain = twin(model)
    reference = KVTierCache.for_model(plain, **options)
    _feed(plain, reference, doc, 0, 140)
    torch.testing.assert_close(_step(model, cache, ids), _step(plain, reference, ids))
    cache.save()
    cache.close()
    again = KVTierCache.open(tmp_path / "s", model, **{k: v for k, v in options.items() if k not in CHUNKING})
    assert torch.equal(again.token_ids, doc[:, :140 + ids.shape[1]])
    probe = doc[:, 170:172]
    torch.testing.assert_close(_step(model, again, probe), _step(plain, reference, probe))
    again.close()
    reference.close()


def test_ctrl_c_on_a_reopened_session_leaves_the_saved_session_as_it_was(tmp_path):
    """Interrupted: the cache refuses to save; the store still holds the session saved before."""
    model = build_model("llama")
    doc = _doc(200)
    built = KVTierCache.for_model(model, store_path=tmp_path / "s", **TIERED)
    _feed(model, built, doc, 0, 130)
    built.save()
    built.close()
    cache = KVTierCache.open(tmp_path / "s", model)
    _fail_once(model, cache, doc[:, 130:160], exc=KeyboardInterrupt)
    assert cache.interrupted
    with pytest.raises(IncompleteSessionError, match="did not finish"):
        cache.save()
    cache.reset()
    cache.close()

    plain = twin(model)
    reference = KVTierCache.for_model(plain, **TIERED)
    _feed(plain, reference, doc, 0, 130)
    again = KVTierCache.open(tmp_path / "s", model)
    assert torch.equal(again.token_ids, doc[:, :130])
    probe = doc[:, 130:133]
    torch.testing.assert_close(_step(model, again, probe), _step(plain, reference, probe))
    again.close()
    reference.close()


# -------------------------------------------------------------------------------------- (2) remove_span
SPAN = dict(TIERED, adaptive_chunks=False)


@pytest.mark.parametrize("failing", ["prefill", "decode"])
def test_a_failed_pass_right_after_remove_span_is_undone(failing):
    """The span moved the later chunks (disk records turned when read, device keys in place): a failed pass
    after it goes back to the moved state, and the next pass computes what the same removal without it does."""
    model = build_model("llama")
    doc = _doc(220)
    cache = KVTierCache.for_model(model, **SPAN)
    _feed(model, cache, doc, 0, 150)
    cache.remove_span(20, 45)
    assert any(c.record_shift for layer in cache.tiers.layers for c in layer.chunks)
    before = _state(cache)
    ids = doc[:, 150:180] if failing == "prefill" else doc[:, 150:151]
    _fail_once(model, cache, ids)
    assert _state(cache) == before

    plain = twin(model)
    reference = KVTierCache.for_model(plain, **SPAN)
    _feed(plain, reference, doc, 0, 150)
    reference.remove_span(20, 45)
    for part in (ids, doc[:, 190:191], doc[:, 191:192]):
        torch.testing.assert_close(_step(model, cache, part), _step(plain, reference, part))
    cache.close()
    reference.close()


def _failing_in_layer(monkeypatch, name: str, exc: Exception, layer: int = 2):
    """TierManager.`name` raises `exc` for chunks of `layer` while `armed["on"]`."""
    armed = {"on": False, "fired": 0}
    original = getattr(TierManager, name)

    def patched(self, chunk, *args, **kwargs):
        if armed["on"] and chunk.layer == layer:
            armed["fired"] += 1
            raise exc
        return original(self, chunk, *args, **kwargs)

    monkeypatch.setattr(TierManager, name, patched)
    return armed


@pytest.mark.parametrize("where", ["place", "fetch"])
def test_a_remove_span_that_fails_half_way_leaves_the_cache_as_it_was(tmp_path, monkeypatch, where):
    """Every layer reads and stores what the span cuts before any layer forgets it: a full store placing a cut
    chunk's kept part in layer 2, or a damaged record read for it, fails the removal with every layer (and the
    new chunks of layers 0 and 1 freed again) as before. The cache saves, decodes as a twin that never tried
    the removal, and the same removal done again gives what the twin's does."""
    model = build_model("llama")
    doc = _doc(200)
    cache = KVTierCache.for_model(model, store_path=tmp_path / "s", **SPAN)
    _feed(model, cache, doc, 0, 150)
    cache.save()
    before = _state(cache)
    held = {layer.index: [(c.start, c.length) for c in layer.chunks] for layer in cache.tiers.layers}
    exc = StoreFullError("the store is full") if where == "place" else StoreCorruptError("a damaged record")
    armed = _failing_in_layer(monkeypatch, where, exc)
    armed["on"] = True
    with pytest.raises(type(exc)):
        cache.remove_span(21, 45)  # cuts the chunks on both edges: they are read and their parts placed again
    monkeypatch.undo()
    assert armed["fired"]
    assert _state(cache) == before and not cache.interrupted
    assert {layer.index: [(c.start, c.length) for c in layer.chunks] for layer in cache.tiers.layers} == held
    for layer in cache.tiers.layers:  # no slot held by a freed new chunk
        on_device = sum(c.length for c in layer.chunks if c.tier == Tier.DEVICE)
        assert layer.pool.used == on_device + layer.win_slots.numel()
    cache.save()

    plain = twin(model)
    reference = KVTierCache.for_model(plain, **SPAN)
    _feed(plain, reference, doc, 0, 150)
    torch.testing.assert_close(_step(model, cache, doc[:, 150:151]), _step(plain, reference, doc[:, 150:151]))
    cache.remove_span(21, 45)
    reference.remove_span(21, 45)
    for part in (doc[:, 151:152], doc[:, 152:153]):
        torch.testing.assert_close(_step(model, cache, part), _step(plain, reference, part))
    cache.close()
    reference.close()


# --------------------------------------------------------------------------------- (3) left-padded batches
def _padded_pass(model, cache, ids, mask, start: int, end: int) -> torch.Tensor:
    """Tokens [start, end) of left-padded rows, with the mask so far and generate's positions."""
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return _step(model, cache, ids[:, start:end], attention_mask=mask[:, :end], position_ids=pos[:, start:end])


@pytest.mark.parametrize("options", [CHUNKING, dict(TIERED, mode="sparse")], ids=["exact", "sparse-tiered"])
@pytest.mark.parametrize("failing", ["prefill", "decode"])
def test_a_failed_pass_of_a_left_padded_batch_is_undone(options, failing):
    model = build_model("llama")
    prompt, prompt_mask = padded_batch([100, 61], seed=4)
    more = _doc(12, seed=9, rows=2)
    ids = torch.cat([prompt, more], dim=1)
    mask = torch.cat([prompt_mask, torch.ones_like(more)], dim=1)
    split = 64 if failing == "prefill" else prompt.shape[1] + 4  # the failing pass: a prefill segment, or a step

    def run(m, cache, fail_at: int | None):
        outs = []
        at = 0
        for end in [64, prompt.shape[1], *range(prompt.shape[1] + 1, ids.shape[1] + 1)]:
            if at == fail_at:
                before = _state(cache)
                hook = _raising(m, 2)
                with pytest.raises(RuntimeError, match="the model failed"):
                    _padded_pass(m, cache, ids, mask, at, end)
                hook.remove()
                assert _state(cache) == before
            outs.append(_padded_pass(m, cache, ids, mask, at, end))
            at = end
        return torch.stack(outs)

    cache = KVTierCache.for_model(model, **options)
    plain = twin(model)
    reference = KVTierCache.for_model(plain, **options)
    torch.testing.assert_close(run(model, cache, split), run(plain, reference, None))
    assert torch.equal(cache.token_ids, ids)
    cache.close()
    reference.close()


# ------------------------------------------------------------------------------------------- (4) families
def _store_full_on_first_write(monkeypatch):
    """The store refuses the first record written from now on (a full store met inside kvtier's own work)."""
    armed = {"fired": 0}
    put_many = DiskStore.put_many

    def full(self, *args, **kwargs):
        if not armed["fired"]:
            armed["fired"] += 1
            raise StoreFullError("the store is full")
        return put_many(self, *args, **kwargs)

    monkeypatch.setattr(DiskStore, "put_many", full)
    return armed


@pytest.mark.parametrize("family", ["qwen2", "mistral", "gpt_oss"])
@pytest.mark.parametrize("failing", ["prefill", "decode", "store-full"])
def test_a_failed_pass_is_undone_in_more_families(family, failing, monkeypatch):
    """qwen2: full layers, then sliding ones (max_window_layers); mistral: every layer sliding (nothing tiered);
    gpt_oss: sinks and a mixture of experts, whose router the failure hits here."""
    model = build_model(family)
    doc = _doc(220)
    cache = KVTierCache.for_model(model, **TIERED)
    _feed(model, cache, doc, 0, 150)
    before = _state(cache)
    ids = doc[:, 150:151] if failing == "decode" else doc[:, 150:190]
    if failing == "store-full":
        if not cache.tiers.layers:
            pytest.skip("no tiered layer: nothing is written to the store")
        armed = _store_full_on_first_write(monkeypatch)
        with pytest.raises(StoreFullError):
            _step(model, cache, ids)
        monkeypatch.undo()
        assert armed["fired"]
    else:
        target = model.model.layers[1].mlp if family == "gpt_oss" else model.model.layers[2]
        hook = target.register_forward_pre_hook(lambda *_: (_ for _ in ()).throw(RuntimeError("the model failed")))
        with pytest.raises(RuntimeError, match="the model failed"):
            _step(model, cache, ids)
        hook.remove()
    assert _state(cache) == before

    plain = twin(model)
    reference = KVTierCache.for_model(plain, **TIERED)
    _feed(plain, reference, doc, 0, 150)
    for part in (ids, doc[:, 200:201], doc[:, 201:202]):
        torch.testing.assert_close(_step(model, cache, part), _step(plain, reference, part))
    cache.close()
    reference.close()


# ----------------------------------------------------------------------------- (5) reads in flight
@pytest.mark.parametrize("refine", [False, True])
def test_a_failure_while_reads_started_ahead_are_in_flight(refine):
    """Sparse decoding with most chunks on disk: layer 0 starts reading what layer 1 will likely need, and the
    model fails before layer 1 runs, with those reads still going. Undone, the next steps take the reads (or
    read again) and compute what a cache that never saw the failure computes; with refinement on, the failed
    step's selections do not count towards the next refinement either."""
    options = dict(TIERED, mode="sparse", sparse_budget=48, refine=refine, refine_every=3)
    model = build_model("llama")
    doc = _doc(200)
    cache = KVTierCache.for_model(model, **options)
    _feed(model, cache, doc, 0, 150)
    prefetcher = cache.tiers.prefetcher
    release = threading.Event()
    load = prefetcher._load

    def held(item, *args, **kwargs):  # reads for layers after the first wait until the failure has happened
        first = item[0] if isinstance(item, list) else item
        if first.layer > 0:
            release.wait(timeout=20)
        return load(item, *args, **kwargs)

    prefetcher._load = held
    seen = {}

    def fail_before_layer_1(*_):
        seen["staged"] = prefetcher.staged_tokens
        raise RuntimeError("the model failed")

    before = _state(cache)
    hook = model.model.layers[1].register_forward_pre_hook(fail_before_layer_1)
    with pytest.raises(RuntimeError, match="the model failed"):
        _step(model, cache, doc[:, 150:151])
    hook.remove()
    release.set()
    assert seen["staged"] > 0, "no read was in flight when the pass failed"
    assert _state(cache) == before

    plain = twin(model)
    reference = KVTierCache.for_model(plain, **options)
    _feed(plain, reference, doc, 0, 150)
    for i in range(150, 158):
        torch.testing.assert_close(_step(model, cache, doc[:, i:i + 1]), _step(plain, reference, doc[:, i:i + 1]))
    assert cache.stats().prefetch_hits > 0
    cache.close()
    reference.close()
