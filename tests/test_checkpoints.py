"""A session saved again and again (a prefill checkpointed after each segment): a save interrupted at any point
leaves the previous one readable, and a prefill resumed from a checkpoint ends where an uninterrupted one does."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model, twin
from helpers import cache_kw

from kvtier import KVTierCache, prefill
from kvtier.store.disk import DiskStore

OPTIONS = {"chunk_size": 16, "sink_tokens": 4, "recent_window": 16, "device_budget": 40, "host_budget": 32,
           "mode": "sparse", "min_chunk_size": 8, "max_chunk_size": 64}
DOC = torch.randint(3, 128, (1, 400), generator=torch.Generator().manual_seed(7))
SEGMENT = 96


def _logits(model, cache, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **{cache_kw(model): cache}).logits[:, -1]


def _layout(cache: KVTierCache) -> list[list[tuple[int, int]]]:
    return [[(c.start, c.length) for c in getattr(layer, "chunks", [])] for layer in cache.layers]


@pytest.mark.parametrize("where", ["chunk records", "manifest commit"])
def test_an_interrupted_save_keeps_the_previous_session(tmp_path, monkeypatch, where):
    model = twin(build_model("llama"))
    cache = KVTierCache.for_model(model, store_path=tmp_path / "s", **OPTIONS)
    prefill(model, cache, DOC[:, :200], segment_tokens=SEGMENT, progress=False)
    cache.save(info={"saved": 200})
    prefill(model, cache, DOC[:, 200:], segment_tokens=SEGMENT, progress=False)
    real = DiskStore.put_many

    def interrupted(self, items, meta=None):
        if where == "manifest commit" and meta or where == "chunk records" and not meta and items:
            raise KeyboardInterrupt
        return real(self, items, meta)

    monkeypatch.setattr(DiskStore, "put_many", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cache.save(info={"saved": 400})
    monkeypatch.setattr(DiskStore, "put_many", real)
    cache.close()
    again = KVTierCache.open(tmp_path / "s", model, prompt_ids=DOC)
    assert again.get_seq_length() == 200 and again.info == {"saved": 200}
    reference = twin(build_model("llama"))
    with torch.no_grad():
        expected = reference(input_ids=DOC).logits[:, -1]
    assert torch.allclose(_logits(model, again, DOC[:, 200:]), expected, atol=1e-5)
    again.close()


def test_a_prefill_resumed_from_its_last_checkpoint_ends_as_an_uninterrupted_one(tmp_path):
    model = twin(build_model("llama"))
    whole = KVTierCache.for_model(model, store_path=tmp_path / "whole", **OPTIONS)
    prefill(model, whole, DOC, segment_tokens=SEGMENT, progress=False)

    cache = KVTierCache.for_model(model, store_path=tmp_path / "s", **OPTIONS)
    calls = 0

    def stop_in_the_third_segment(*_):
        nonlocal calls
        calls += 1
        if calls == 3:
            raise KeyboardInterrupt

    hook = model.model.layers[2].register_forward_pre_hook(stop_in_the_third_segment)
    with pytest.raises(KeyboardInterrupt):
        for start in range(0, DOC.shape[1], SEGMENT):
            prefill(model, cache, DOC[:, start:start + SEGMENT], segment_tokens=SEGMENT, progress=False)
            cache.save()  # a checkpoint after each completed segment
    hook.remove()
    cache.close()

    resumed = KVTierCache.open(tmp_path / "s", model, prompt_ids=DOC, **OPTIONS)  # the same (sparse) planning
    done = resumed.get_seq_length()
    assert done == 2 * SEGMENT
    for start in range(done, DOC.shape[1], SEGMENT):
        prefill(model, resumed, DOC[:, start:start + SEGMENT], segment_tokens=SEGMENT, progress=False)
    assert _layout(resumed) == _layout(whole)  # chunks planned from the same skew, cut at the same places
    assert torch.equal(resumed.token_ids, DOC)
    question = torch.tensor([[5, 6, 7, 8]])
    assert torch.allclose(_logits(model, resumed, question), _logits(model, whole, question), atol=1e-5)
    resumed.close()
    whole.close()
