"""One owner thread: a cache driven from another thread raises CacheThreadError before anything changes;
stats() is a snapshot from any thread; claim() hands a cache over, never in the middle of a forward pass."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import build_model, twin
from helpers import cache_kw

from kvtier import CacheThreadError, KVTierCache, prefill

CHUNKING = dict(chunk_size=16, sink_tokens=4, recent_window=16, device_budget=40, host_budget=32)


def _in_thread(fn):
    """Run fn in a new thread; return what it returned or raised."""
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            box["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    t.join(120)
    return box


def test_two_threads_decoding_one_cache(tmp_path):
    """The second thread's generate fails at once; the owner's generation is untouched and exact."""
    ref = build_model("llama")
    model = twin(ref)
    ids = torch.randint(3, 128, (1, 150), generator=torch.Generator().manual_seed(0))
    cache = KVTierCache.for_model(model, **CHUNKING)
    kw = {cache_kw(model): cache}
    started = threading.Event()
    second = {}

    def intruder():
        started.wait(60)
        try:
            model.generate(input_ids=ids, max_new_tokens=20, do_sample=False, **kw)
        except CacheThreadError as exc:
            second["error"] = exc

    t = threading.Thread(target=intruder)
    t.start()
    hook = model.model.layers[1].register_forward_pre_hook(lambda *_: started.set())
    out = model.generate(input_ids=ids, max_new_tokens=20, do_sample=False, **kw)
    hook.remove()
    t.join(60)
    assert "belongs to thread 'MainThread'" in str(second["error"])
    assert {layer.logical_length for layer in cache.layers} == {169}
    assert torch.equal(out, ref.generate(input_ids=ids, max_new_tokens=20, do_sample=False))
    cache.close()


def test_save_from_another_thread_during_decoding_is_refused_and_the_store_stays_valid(tmp_path):
    model = build_model("llama")
    cache = KVTierCache.for_model(model, store_path=tmp_path / "s", **CHUNKING)
    ids = torch.randint(3, 128, (1, 120))
    prefill(model, cache, ids, progress=False)
    cache.save()
    results = []

    def save_midway(module, args, kwargs):
        results.append(_in_thread(cache.save))

    hook = model.model.layers[2].register_forward_pre_hook(save_midway, with_kwargs=True)
    asked = torch.cat([ids, torch.tensor([[5]])], 1)  # the cached prompt and a new token
    model.generate(input_ids=asked, max_new_tokens=3, do_sample=False, **{cache_kw(model): cache})
    hook.remove()
    assert results and all(isinstance(r.get("error"), CacheThreadError) for r in results)
    cache.close()
    again = KVTierCache.open(tmp_path / "s", twin(model), prompt_ids=ids)
    assert again.get_seq_length() == 120
    again.close()


@pytest.mark.parametrize("call", ["close", "crop", "reset", "reorder_cache", "warm", "update"])
def test_changing_calls_from_another_thread_raise(call):
    model = build_model("llama")
    cache = KVTierCache.for_model(model, **CHUNKING)
    model(input_ids=torch.randint(3, 128, (1, 80)), **{cache_kw(model): cache})
    k = torch.zeros(1, 2, 1, 16)
    calls = {"close": cache.close, "crop": lambda: cache.crop(-5), "reset": cache.reset,
             "reorder_cache": lambda: cache.reorder_cache(torch.tensor([0])), "warm": cache.warm,
             "update": lambda: cache.update(k, k, 0)}
    box = _in_thread(calls[call])
    assert isinstance(box.get("error"), CacheThreadError)
    assert cache.get_seq_length() == 80 and {layer.logical_length for layer in cache.layers} == {80}
    cache.close()


def test_stats_from_another_thread_is_a_snapshot_while_decoding():
    model = build_model("llama")
    cache = KVTierCache.for_model(model, **CHUNKING)
    stop = threading.Event()
    seen, errors = [], []

    def watch():
        while not stop.wait(0.002):  # a monitoring thread polls; it must not starve the decoding one
            try:
                seen.append(cache.stats().disk.tokens)
                repr(cache)
            except Exception as exc:  # noqa: BLE001 - the test fails on any
                errors.append(exc)

    t = threading.Thread(target=watch)
    t.start()
    model.generate(input_ids=torch.randint(3, 128, (1, 300)), max_new_tokens=30, do_sample=False,
                   **{cache_kw(model): cache})
    stop.set()
    t.join(60)
    assert not errors and seen
    cache.close()


def test_claim_hands_a_cache_to_a_worker_thread(tmp_path):
    ref = build_model("llama")
    model = twin(ref)
    ids = torch.randint(3, 128, (1, 100))
    cache = KVTierCache.for_model(model, store_path=tmp_path / "s", **CHUNKING)

    def work():
        cache.claim()
        out = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, **{cache_kw(model): cache})
        cache.save()
        return out

    box = _in_thread(work)
    assert torch.equal(box["value"], ref.generate(input_ids=ids, max_new_tokens=5, do_sample=False))
    with pytest.raises(CacheThreadError, match="call cache.claim"):
        cache.close()
    cache.claim()
    cache.close()


def test_claim_is_refused_during_a_forward_pass():
    model = build_model("llama")
    cache = KVTierCache.for_model(model, **CHUNKING)
    boxes = []
    hook = model.model.layers[1].register_forward_pre_hook(lambda *_: boxes.append(_in_thread(cache.claim)))
    model(input_ids=torch.randint(3, 128, (1, 20)), **{cache_kw(model): cache})
    hook.remove()
    assert "inside a forward pass" in str(boxes[0]["error"])
    cache.close()


def test_an_interrupted_forward_cannot_be_saved_until_reset(tmp_path):
    model = build_model("llama")
    cache = KVTierCache.for_model(model, store_path=tmp_path / "s", **CHUNKING)

    def stop(*_):
        raise KeyboardInterrupt

    hook = model.model.layers[3].register_forward_pre_hook(stop)
    with pytest.raises(KeyboardInterrupt), torch.no_grad():
        model(input_ids=torch.randint(3, 128, (1, 60)), **{cache_kw(model): cache})
    hook.remove()
    assert cache.interrupted
    from kvtier import IncompleteSessionError
    with pytest.raises(IncompleteSessionError, match="did not finish"):
        cache.save()
    cache.reset()
    model(input_ids=torch.randint(3, 128, (1, 60)), **{cache_kw(model): cache})
    assert not cache.interrupted
    cache.save()
    cache.close()
