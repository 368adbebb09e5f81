"""Model attention features are implemented or refused, never dropped.

Attention sinks (gpt-oss `s_aux`) join every softmax denominator through the log-sum-exp merge; every other
keyword transformers' attention modules pass is either harmless here or refused with UnsupportedModelError,
at `KVTierCache.for_model` where the config shows it, else at the first attention call.
"""

from __future__ import annotations

import types

import pytest
import torch
import transformers as tf
from conftest import _COMMON, build_model, twin
from helpers import cache_kw, padded_batch, reference_run, step_logits
from kvtier.kernels import merge_partials, merge_sink, partial_attention

import kvtier
import kvtier.attention as attention_mod
from kvtier import KVTierCache, UnsupportedModelError
from kvtier.attention import kvtier_attention

TINY = dict(chunk_size=16, sink_tokens=4, recent_window=16, device_budget=40, host_budget=32)
ATOL = 1e-4


# ------------------------------------------------------------------------------------------- sinks
def test_sink_merge_equals_softmax_with_a_sink_column():
    """gpt-oss's eager formula: concatenate the sink logit to each row's scores, softmax, drop its column."""
    g = torch.Generator().manual_seed(0)
    b, hq, hkv, nq, nk, d = 2, 4, 2, 3, 11, 8
    q, sink = torch.randn(b, hq, nq, d, generator=g), torch.randn(hq, generator=g) * 2
    k, v = torch.randn(b, hkv, nk, d, generator=g), torch.randn(b, hkv, nk, d, generator=g)
    valid = torch.ones(b, nk, dtype=torch.bool)
    valid[1] = False  # row 1 sees no key at all: its output must stay 0, not NaN
    mask = valid[:, None, None, :]
    # two parts merged by LSE, then the sink
    o1, l1 = partial_attention(q, k[:, :, :5], v[:, :, :5], 0.3, mask[..., :5])
    o2, l2 = partial_attention(q, k[:, :, 5:], v[:, :, 5:], 0.3, mask[..., 5:])
    out, lse = merge_partials(o1, l1, o2, l2)
    got = merge_sink(out, lse, sink)
    # reference: explicit softmax over [scores | sink]
    kr, vr = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
    s = (q @ kr.transpose(-1, -2) * 0.3).masked_fill(~mask, float("-inf"))
    s = torch.cat([s, sink.view(1, hq, 1, 1).expand(b, hq, nq, 1)], dim=-1)
    want = torch.softmax(s, dim=-1)[..., :-1] @ vr
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert bool((got[1] == 0).all())


@pytest.mark.parametrize(
    "options", [dict(mode="exact", **TINY), dict(mode="sparse", sparse_budget=1.0, **TINY)], ids=["exact", "sparse"]
)
def test_gpt_oss_logits_match_its_own_attention(options, monkeypatch):
    """Tiered budgets push chunks to host and disk; sliding and full layers both carry sinks. Without the sink
    merge the same run is off by far more than round-off, so the sinks are really being exercised."""
    ref = build_model("gpt_oss")
    assert ref.config._attn_implementation == "eager"  # gpt-oss's own attention, with the sink column
    ids, mask = padded_batch([150, 117])
    ref_logits, toks = reference_run(ref, ids, mask, n_decode=6)
    real = torch.cat([mask, torch.ones(2, len(toks), dtype=mask.dtype)], 1).bool()

    def error(model) -> float:
        cache = KVTierCache.for_model(model, **options)
        logits = step_logits(model, cache, ids, mask, [100, 50], toks)
        stats = cache.stats()
        assert stats.disk.tokens > 0 and stats.disk.hits > 0
        cache.close()
        return (logits - ref_logits).abs().amax(-1)[real].max().item()

    assert error(twin(ref)) < ATOL
    monkeypatch.setattr(attention_mod, "merge_sink", lambda out, lse, sink: out)  # sinks dropped
    assert error(twin(ref)) > 1e-2


def test_gpt_oss_without_a_kvtier_cache_is_plain_attention():
    ref = build_model("gpt_oss")
    model = kvtier.enable(twin(ref))
    ids, mask = padded_batch([40, 29], seed=5)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, use_cache=False).logits
        got = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert (want - got)[mask.bool()].abs().max() < ATOL


def test_gpt_oss_greedy_generate_identical_with_tiers():
    ref = build_model("gpt_oss")
    model = twin(ref)
    ids, mask = padded_batch([90, 64], seed=1)
    want = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    cache = KVTierCache.for_model(model, mode="sparse", sparse_budget=1.0, **TINY)
    got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                         **{cache_kw(model): cache})
    assert torch.equal(got, want)
    cache.close()


def test_sinks_of_another_shape_are_refused():
    q = torch.randn(1, 4, 3, 8)
    k = v = torch.randn(1, 2, 3, 8)
    with pytest.raises(UnsupportedModelError, match=r"s_aux.*\(1, 4, 3, 1\).*one sink logit per query head \(\[4\]\)"):
        kvtier_attention(_module(), q, k, v, None, s_aux=torch.zeros(1, 4, 3, 1))


# -------------------------------------------------------------------- attention-interface keywords
def _module(**attrs) -> torch.nn.Module:
    module = torch.nn.Module().eval()
    module.config = types.SimpleNamespace(model_type="tiny")
    for name, value in attrs.items():
        setattr(module, name, value)
    return module


def _qkv():
    """q [1, 4, 5, 8], k and v [1, 2, 5, 8]."""
    g = torch.Generator().manual_seed(1)
    return tuple(torch.randn(1, h, 5, 8, generator=g) for h in (4, 2, 2))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(position_ids=torch.arange(5)[None]), dict(use_cache=True), dict(output_hidden_states=True),
        dict(output_router_logits=True), dict(num_items_in_batch=torch.tensor(7)), dict(output_attentions=False),
        dict(is_causal=True), dict(is_causal=None), dict(cu_seq_lens_q=None, max_length_q=None),
        dict(position_bias=None, indices=None, sinks=None, s_aux=None),
    ],
    ids=lambda kw: ",".join(kw),
)
def test_harmless_keywords_leave_attention_unchanged(kwargs):
    q, k, v = _qkv()
    want, _ = kvtier_attention(_module(), q, k, v, None, scaling=0.3)
    got, _ = kvtier_attention(_module(), q, k, v, None, scaling=0.3, **kwargs)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    "name, value",
    [
        ("output_attentions", True),  # kvtier never forms the attention weights
        ("position_bias", torch.zeros(1, 4, 5, 5)),  # additive relative-position bias (T5-style)
        ("sinks", torch.zeros(1, 4, 5, 1)),  # per-token sink logits
        ("indices", torch.zeros(1, 5, 2, dtype=torch.long)),  # DeepSeek sparse-attention top-k
        ("block_indices", torch.zeros(1, 2, dtype=torch.long)),
        ("cu_seq_lens_q", torch.tensor([0, 2, 5])),  # packed sequences (varlen)
        ("max_length_k", 3),
        ("seq_idx", torch.zeros(1, 5, dtype=torch.int32)),
        ("head_mask", torch.ones(4)),
        ("a_keyword_from_the_future", 1.5),
    ],
)
def test_unknown_keywords_are_refused(name, value):
    q, k, v = _qkv()
    with pytest.raises(UnsupportedModelError, match=rf"tiny \(Module\) passes `{name}` .*refuses rather than ignore"):
        kvtier_attention(_module(), q, k, v, None, **{name: value})


def test_an_unknown_keyword_of_many_lines_is_named_in_one():
    class Verbose:
        def __repr__(self):
            return "Verbose(\n  a=1,\n  b=2\n)"

    q, k, v = _qkv()
    with pytest.raises(UnsupportedModelError) as err:
        kvtier_attention(_module(), q, k, v, None, a_keyword_from_the_future=Verbose())
    assert "\n" not in str(err.value)


def test_generate_with_stop_strings_runs_as_with_dynamic_cache():
    """generate(stop_strings=..., tokenizer=tok) hands the tokenizer on to every attention call; it was refused
    as an unknown option (which the stop strings need), in a message as long as the tokenizer's repr."""
    from tiny import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**{**_COMMON, "vocab_size": len(tok)})).eval()
    ids = tok("The quick brown fox", return_tensors="pt").input_ids
    free = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    texts = [tok.decode(t) for t in free[0, ids.shape[1] + 1:]]
    stop = next(t for t in texts if t.strip().isascii() and t.strip().isalnum())  # a new token's plain text
    want = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, stop_strings=[stop], tokenizer=tok)
    mine = twin(model)
    cache = KVTierCache.for_model(mine)
    got = mine.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, stop_strings=[stop], tokenizer=tok,
                        **{cache_kw(mine): cache})
    assert torch.equal(got, want) and want.shape[1] < free.shape[1]


@pytest.mark.parametrize("module_causal, kwarg", [(False, None), (True, False), (False, False)])
def test_bidirectional_attention_is_refused_at_the_call(module_causal, kwarg):
    q, k, v = _qkv()
    with pytest.raises(UnsupportedModelError, match=r"tiny.*bidirectionally \(is_causal=False\)"):
        kvtier_attention(_module(is_causal=module_causal), q, k, v, None, is_causal=kwarg)


def test_training_with_dropout_is_refused():
    q, k, v = _qkv()
    module = _module().train()
    with pytest.raises(UnsupportedModelError, match=r"model.eval\(\).*dropout"):
        kvtier_attention(module, q, k, v, None, dropout=0.1)
    kvtier_attention(module, q, k, v, None, dropout=0.0)  # training without dropout computes plain attention


def test_output_attentions_is_refused_end_to_end():
    model = build_model("llama")
    cache = KVTierCache.for_model(model)
    with pytest.raises(UnsupportedModelError, match="output_attentions"):
        model(input_ids=torch.tensor([[5, 6, 7]]), output_attentions=True, **{cache_kw(model): cache})


def test_is_causal_false_is_refused_end_to_end():
    model = kvtier.enable(build_model("llama"))
    with pytest.raises(UnsupportedModelError, match="bidirectionally"):
        model(input_ids=torch.tensor([[5, 6, 7]]), use_cache=False, is_causal=False)


def test_packed_sequences_are_refused_without_a_cache():
    """transformers masks between sequences packed in one row (position_ids restarting, no padding mask)."""
    model = kvtier.enable(build_model("llama"))
    ids = torch.randint(3, 100, (1, 6))
    with torch.no_grad():
        with pytest.raises(UnsupportedModelError, match="packed sequences"):
            model(input_ids=ids, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2]]), use_cache=False)
        model(input_ids=ids, position_ids=torch.arange(6)[None], use_cache=False)  # one sequence: fine


# ------------------------------------------------------------------------- refused at for_model
def _llama_config(**extra) -> tf.LlamaConfig:
    config = tf.LlamaConfig(**_COMMON)
    for name, value in extra.items():
        setattr(config, name, value)
    return config


@pytest.mark.parametrize(
    "config, message",
    [
        (_llama_config(is_causal=False), r"llama uses bidirectional attention \(config.is_causal=False\)"),
        (tf.Gemma3TextConfig(**_COMMON, head_dim=16, use_bidirectional_attention=True),
         r"gemma3_text uses bidirectional attention \(use_bidirectional_attention\)"),
        (_llama_config(attention_chunk_size=16), r"llama uses chunked attention"),
        (tf.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, add_cross_attention=True),
         r"gpt2 uses cross-attention"),
        (tf.DeepseekV3Config(vocab_size=128, hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
                             num_experts_per_tok=2, n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=16,
                             qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, first_k_dense_replace=1),
         r"deepseek_v3 uses multi-head latent attention"),
    ],
    ids=["is_causal", "use_bidirectional_attention", "chunked", "cross-attention", "mla"],
)
def test_model_features_kvtier_would_ignore_are_refused_at_for_model(config, message):
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(UnsupportedModelError, match=message):
        KVTierCache.for_model(model)
    assert model.config._attn_implementation != "kvtier"  # refused before anything was switched


def test_bidirectional_attention_module_is_refused_at_for_model():
    model = build_model("llama")
    model.model.layers[2].self_attn.is_causal = False
    with pytest.raises(UnsupportedModelError, match=r"llama layer 2 attends bidirectionally"):
        KVTierCache.for_model(model)


def test_alibi_families_are_refused():
    """No family passes ALiBi through the attention interface: Bloom, Falcon and MPT add it inside their own
    attention code, which kvtier cannot replace."""
    torch.manual_seed(0)
    bloom = tf.BloomForCausalLM(tf.BloomConfig(vocab_size=128, hidden_size=64, n_layer=2, n_head=4)).eval()
    with pytest.raises(UnsupportedModelError, match="does not use transformers' AttentionInterface"):
        KVTierCache.for_model(bloom)


def test_torch_compile_is_refused_in_its_own_words():
    """A compiled model with a kvtier cache failed with 'used by an attention implementation that is not
    kvtier's', pointing at the wrong fix. The pass the tracer started is not undone (reset() is)."""
    model = build_model("llama")
    cache = KVTierCache.for_model(model)
    ids = torch.randint(3, 100, (1, 8))
    with pytest.raises(Exception, match="does not run inside torch.compile"), torch.no_grad():
        torch.compile(model, backend="eager")(input_ids=ids, use_cache=True, **{cache_kw(model): cache})
    cache.reset()
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, **{cache_kw(model): cache})
    assert cache.get_seq_length() == 8


def test_use_cache_false_with_a_kvtier_cache_says_so():
    """generate(use_cache=False, cache=...) feeds the whole sequence again at each step over the cache that
    holds it: refused, naming use_cache (it was refused as 'feeds tokens the cache already holds'), before
    anything changes."""
    model = build_model("llama")
    cache = KVTierCache.for_model(model)
    ids = torch.randint(3, 100, (1, 8))
    with pytest.raises(kvtier.CacheInputError, match="use_cache=False with a kvtier cache"):
        model.generate(ids, max_new_tokens=3, do_sample=False, use_cache=False, **{cache_kw(model): cache})
    assert cache.get_seq_length() == 0 and not cache.interrupted
    out = model.generate(ids, max_new_tokens=3, do_sample=False, **{cache_kw(model): cache})
    assert out.shape[1] == 11
