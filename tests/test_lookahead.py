"""Next-layer query guess (InfiniGen): the guess is the model's own query math, and it only moves timing."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model
from helpers import cache_kw
from transformers import AttentionInterface

from kvtier import KVTierCache
from kvtier.attention import disable
from kvtier.sparse.lookahead import QueryGuesser, decoder_layers

SPARSE = dict(mode="sparse", chunk_size=16, min_chunk_size=8, max_chunk_size=32, sink_tokens=4, recent_window=16,
              observation_window=8)


def _queries_and_inputs(model, ids):
    """Each layer's real rotated query and the (hidden, position_embeddings) entering its decoder layer."""
    queries, inputs = {}, {}

    def capture(module, query, key, value, attention_mask, **kw):
        queries[module.layer_idx] = query.detach().clone()
        return torch.zeros_like(query).transpose(1, 2), None

    def pre(module, args, kwargs):
        inputs[module.self_attn.layer_idx] = (args[0] if args else kwargs["hidden_states"],
                                              kwargs.get("position_embeddings"))

    AttentionInterface.register("capture_query", capture)
    model.set_attn_implementation("capture_query")
    hooks = [layer.register_forward_pre_hook(pre, with_kwargs=True) for layer in decoder_layers(model).values()]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    return queries, inputs


@pytest.mark.parametrize("name", ["llama", "qwen3", "phi3", "gemma3"])
def test_guess_from_a_layers_own_input_is_its_query(name):
    """Given the hidden state that really enters layer j, the guess equals layer j's rotated query."""
    model = build_model(name)
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    queries, inputs = _queries_and_inputs(model, ids)
    layers = sorted(queries)
    guesser = QueryGuesser.from_model(model, layers)
    assert guesser is not None
    for j in layers:
        hidden, pos = inputs[j]
        torch.testing.assert_close(guesser.guess(j, hidden, pos), queries[j], rtol=1e-5, atol=1e-5)


def test_models_without_known_layers_get_no_guesser():
    assert QueryGuesser.from_model(build_model("gpt2"), [0, 1, 2, 3]) is None


def _decode(model, lookahead: bool):
    cache = KVTierCache.for_model(model, **SPARSE, sparse_budget=48, device_budget=80, host_budget=0,
                                  lookahead=lookahead)
    ids = torch.randint(3, 128, (2, 400), generator=torch.Generator().manual_seed(3))
    out = model.generate(input_ids=ids, max_new_tokens=10, do_sample=False, **{cache_kw(model): cache})
    stats = cache.stats()
    cache.close()
    return out, stats


def test_lookahead_changes_nothing_but_the_timing_and_names_chunks_ahead():
    model = build_model("llama")
    out_a, with_guess = _decode(model, lookahead=True)
    out_b, without = _decode(model, lookahead=False)
    assert torch.equal(out_a, out_b)
    # one guess per decode step for every tiered layer but the last
    assert with_guess.lookahead_guesses > 0 and without.lookahead_guesses == 0
    assert with_guess.lookahead_selected > 0 and 0 < with_guess.lookahead_recall <= 1
    assert without.lookahead_recall is None
    # the guessed reads were issued ahead of need
    assert with_guess.prefetch_issued > without.prefetch_issued


def test_disable_removes_the_layer_hooks():
    model = build_model("llama")
    KVTierCache.for_model(model, **SPARSE).close()
    layer = next(iter(decoder_layers(model).values()))
    assert layer._forward_pre_hooks
    disable(model)
    assert not layer._forward_pre_hooks


def test_enable_hooks_each_layer_once_even_for_a_copy_or_a_second_call():
    import copy

    from kvtier.attention import enable

    model = build_model("llama")
    enable(model)
    enable(model)
    twin = copy.deepcopy(model)
    enable(twin)
    for m in (model, twin):
        for layer in decoder_layers(m).values():
            assert len(layer._forward_pre_hooks) == 1
    disable(twin)
    assert not any(layer._forward_pre_hooks for layer in decoder_layers(twin).values())
