"""Mistaken and hostile arguments to the public API: each is refused with a kvtier error, ValueError or
TypeError that names the argument, before anything changes (the cache, its store, the model's attention);
never a deep torch or LMDB traceback, a silently wrong result or a half-changed cache."""

from __future__ import annotations

import gc
import math
import threading

import pytest
import torch
import transformers as tf
from helpers import cache_kw
from tiny import build_tokenizer

import kvtier
from kvtier import (
    CacheInputError,
    CacheThreadError,
    KVTierCache,
    KVTierConfig,
    ModelSpec,
    PromptMismatchError,
    StoreError,
    prefill,
)
from kvtier.hogwild import CollaborationTemplate, HogwildCache
from kvtier.hogwild import generate as hogwild_generate
from kvtier.tim import (
    PruneBuffer,
    RemovedSpans,
    TaskTracker,
    TokenSpan,
    Tool,
    ToolRegistry,
)
from kvtier.tim import generate as tim_generate
from kvtier.tim.tools import ToolSpecError

IDS = torch.arange(3, 43).unsqueeze(0)  # 40 tokens of the 128-token test vocabulary
BAD_INTS = [1.5, float("nan"), True, "3", None, torch.tensor(3)]


def _filled(model, **options) -> KVTierCache:
    cache = KVTierCache.for_model(model, chunk_size=16, recent_window=16, **options)
    with torch.no_grad():
        model(input_ids=IDS, **{cache_kw(model): cache})
    return cache


def _state(cache: KVTierCache) -> tuple:
    return ([cache.get_seq_length(i) for i in range(len(cache.layers))], cache.batch_size, cache.interrupted,
            None if cache.token_ids is None else cache.token_ids.tolist())


def _switched(model) -> bool:
    return model.config._attn_implementation == kvtier.ATTENTION_NAME


# ------------------------------------------------------------------------------------------------ options
@pytest.mark.parametrize("options, field", [
    (dict(store_path=5), "store_path"),
    (dict(store_path=""), "store_path"),
    (dict(initial_map_bytes=2**70), "initial_map_bytes"),
    (dict(max_store_bytes=2**70), "max_store_bytes"),
])
def test_bad_options_name_the_field(options, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        KVTierConfig(**options)


def test_the_constructor_checks_its_arguments(llama):
    spec = ModelSpec.from_model(llama)
    with pytest.raises(TypeError, match="ModelSpec"):
        KVTierCache(llama)
    with pytest.raises(TypeError, match="KVTierConfig"):
        KVTierCache(spec, {"chunk_size": 16})
    with pytest.raises(CacheInputError, match="device='nowhere' is not a torch device"):
        KVTierCache(spec, device="nowhere")
    with pytest.raises(TypeError, match="overwrite must be True or False"):
        KVTierCache.for_model(llama, overwrite="yes")
    assert not _switched(llama)  # refused before the model's attention was switched
    with pytest.raises(TypeError, match="cache_argument"):
        kvtier.cache_argument(None)


# ------------------------------------------------------------------------------------------- cache calls
@pytest.mark.parametrize("bad", BAD_INTS)
def test_crop_takes_an_int_and_changes_nothing_otherwise(llama, bad):
    cache = _filled(llama)
    before = _state(cache)
    with pytest.raises(CacheInputError, match="crop\\(\\) takes an int"):
        cache.crop(bad)
    assert _state(cache) == before
    cache.close()


@pytest.mark.parametrize("call, bad, message", [
    ("reorder_cache", torch.tensor([1]), r"row indices must lie in \[0, 1\)"),
    ("reorder_cache", torch.tensor([-1]), r"row indices must lie in \[0, 1\)"),
    ("reorder_cache", torch.tensor([0.5]), "integer row indices"),
    ("reorder_cache", torch.tensor([True]), "integer row indices"),
    ("reorder_cache", torch.tensor([[0]]), "1-D tensor"),
    ("reorder_cache", torch.tensor([], dtype=torch.long), "at least one row"),
    ("reorder_cache", None, "1-D tensor of row indices"),
    ("batch_select_indices", torch.tensor([3]), r"row indices must lie in \[0, 1\)"),
    ("batch_select_indices", torch.tensor([True, False]), "one entry per row"),
    ("batch_select_indices", torch.tensor([False]), "at least one row"),
    ("batch_select_indices", "0", "1-D tensor of row indices"),
    ("batch_repeat_interleave", 0, "int >= 1"),
    ("batch_repeat_interleave", -1, "int >= 1"),
    ("batch_repeat_interleave", True, "int >= 1"),
    ("batch_repeat_interleave", 1.5, "int >= 1"),
])
def test_batch_operations_check_their_rows_before_any_layer_changes(llama, call, bad, message):
    cache = _filled(llama)
    before = _state(cache)
    with pytest.raises(CacheInputError, match=message):
        getattr(cache, call)(bad)
    assert _state(cache) == before
    cache.reorder_cache(torch.tensor([0, 0]))  # and the cache still works
    assert cache.batch_size == 2
    cache.close()


@pytest.mark.parametrize("layer", [True, 1.0, "0", -1, 4])
def test_update_names_a_bad_layer_index(llama, layer):
    cache = _filled(llama)
    kv = torch.zeros(1, 2, 1, 16)
    with pytest.raises(CacheInputError, match=r"layer_idx must be an int in \[0, 4\)"):
        cache.update(kv, kv, layer)
    assert _state(cache)[0] == [40] * 4
    cache.close()


def test_a_closed_cache_refuses_mode_changes(llama):
    cache = _filled(llama)
    cache.close()
    with pytest.raises(StoreError, match="closed"):
        cache.set_mode("sparse")
    with pytest.raises(StoreError, match="closed"):
        cache.set_sparse(budget=8)


@pytest.mark.parametrize("ids, message", [
    (torch.tensor([[3, 128]]), r"token id 128, outside the model's vocabulary \[0, 128\)"),
    (torch.tensor([[-1, 3]]), "token id -1"),
    (torch.zeros(1, 0, dtype=torch.long), "no tokens"),
])
def test_a_forward_with_ids_the_model_cannot_embed_leaves_the_cache_as_it_was(llama, ids, message):
    cache = _filled(llama)
    before = _state(cache)
    with pytest.raises(CacheInputError, match=message):
        llama(input_ids=ids, **{cache_kw(llama): cache})
    assert _state(cache) == before  # not interrupted, token ids still known
    with torch.no_grad():
        llama(input_ids=torch.tensor([[5]]), **{cache_kw(llama): cache})
    assert cache.get_seq_length() == 41
    cache.close()


@pytest.mark.parametrize("prompt", [None, "abc", torch.ones(1, 40, dtype=torch.bool)])
def test_check_prompt_refuses_what_is_not_token_ids(llama, prompt):
    cache = _filled(llama)
    with pytest.raises(PromptMismatchError, match="prompt ids must be an integer tensor"):
        cache.check_prompt(prompt)
    cache.close()


# ------------------------------------------------------------------------------------------ saved sessions
@pytest.fixture
def saved(tmp_path, llama):
    path = tmp_path / "s"
    cache = _filled(llama, store_path=path)
    cache.save(info={"doc": "a"})
    cache.close()
    return path


@pytest.mark.parametrize("mode, hinted", [("exact", 1), ("sparse", 0)])
def test_open_reads_ahead_only_where_every_record_is_read(saved, llama, monkeypatch, mode, hinted):
    """Exact mode reads every record at the first step, so open starts the disk at once; sparse mode reads
    its selection only, and a hint for the whole file would read (and keep in memory) what it never needs."""
    from kvtier.store.disk import DiskStore

    calls = []
    monkeypatch.setattr(DiskStore, "read_ahead", lambda self, first=(): calls.append(self.path))
    KVTierCache.open(saved, llama, mode=mode).close()
    assert calls == [saved] * hinted


def test_exact_open_reads_first_the_records_it_reads_before_the_chunks(saved, llama, monkeypatch):
    """The abstract tables and windows are written last, at the end of the file: the open reads them before
    the disk streams the rest, in the order it then reads them, and reads no other record itself."""
    from kvtier.store.disk import DiskStore

    first, read = [], []
    real_ahead, real_get = DiskStore.read_ahead, DiskStore.get

    def read_ahead(self, keys=()):
        first.extend(keys)
        real_ahead(self, first)

    def get(self, key):
        read.append(key)
        return real_get(self, key)

    monkeypatch.setattr(DiskStore, "read_ahead", read_ahead)
    monkeypatch.setattr(DiskStore, "get", get)
    KVTierCache.open(saved, llama, mode="exact").close()
    assert read and read == first


@pytest.mark.parametrize("path", [None, 5, ""])
def test_open_names_a_bad_path(llama, path):
    with pytest.raises(TypeError, match="takes a store directory or a redis:// URL"):
        KVTierCache.open(path, llama)


def test_open_refuses_a_store_path_it_would_ignore_and_paths_with_a_nul(saved, llama, tmp_path):
    """store_path= beside a local session's path was taken and ignored (it only places a server session's local
    copy); a NUL in a path failed inside pathlib."""
    with pytest.raises(CacheInputError, match="a local session is reopened from its own store"):
        KVTierCache.open(saved, llama, store_path=tmp_path / "elsewhere")
    assert not (tmp_path / "elsewhere").exists()
    with pytest.raises(ValueError, match="`store_path` must be a directory path"):
        KVTierCache.for_model(llama, store_path=str(tmp_path / "a\0b"))


@pytest.mark.parametrize("option, value", [("chunk_size", 32), ("page_size", 8), ("recent_window", 8),
                                           ("sink_tokens", 0)])
def test_open_refuses_chunking_other_than_the_stores(saved, llama, option, value):
    """A page size other than the store's was read as a damaged store; other chunking options were taken
    silently although the saved chunk table was cut by the store's."""
    with pytest.raises(ValueError, match=f"`{option}`={value}: this session was saved with {option}="):
        KVTierCache.open(saved, llama, **{option: value})
    same = {"chunk_size": 16, "page_size": 16, "recent_window": 16, "sink_tokens": 4}[option]
    with KVTierCache.open(saved, llama, **{option: same}) as cache:  # the store's own value is fine
        assert cache.get_seq_length() == 40


def _nested(depth: int) -> dict:
    out = inner = {}
    for _ in range(depth):
        inner["a"] = {}
        inner = inner["a"]
    return out


@pytest.mark.parametrize("info, message", [
    ([1, 2], "info must be a dict"),
    ({"x": object()}, r"info\['x'\] is a object"),
    ({1: 2}, "has the key 1; keys must be str"),
    ({"x": [float("nan")]}, r"info\['x'\]\[0\] is nan"),
    ({"t": torch.tensor(1)}, r"info\['t'\] is a Tensor"),
    ({"x": 10**5000}, r"info\['x'\] is an integer of 16610 bits"),  # json's own error did not name info
    (_nested(5000), "info nests deeper than 100 levels"),  # a RecursionError before
])
def test_save_refuses_info_that_is_not_json_before_writing(saved, llama, info, message):
    with KVTierCache.open(saved, llama) as cache:
        with pytest.raises(ValueError, match=message):
            cache.save(info=info)
    with KVTierCache.open(saved, llama) as cache:
        assert cache.info == {"doc": "a"}


def test_a_second_save_keeps_the_info_of_the_first(tmp_path, llama):
    cache = _filled(llama, store_path=tmp_path / "s")
    cache.save(info={"doc": "a"})
    with torch.no_grad():
        llama(input_ids=torch.tensor([[5]]), **{cache_kw(llama): cache})
    cache.save()
    cache.close()
    with KVTierCache.open(tmp_path / "s", llama) as cache:
        assert cache.info == {"doc": "a"} and cache.get_seq_length() == 41


def test_a_cache_dropped_without_close_releases_its_store(saved, llama):
    cache = KVTierCache.open(saved, llama)
    del cache
    gc.collect()
    with KVTierCache.open(saved, llama) as cache:  # was StoreLockedError for the life of the process
        assert cache.get_seq_length() == 40


# --------------------------------------------------------------------------------------------- prefill
@pytest.mark.parametrize("kwargs, error, message", [
    (dict(input_ids=IDS.float()), ValueError, "int64 .or int32. tensor"),
    (dict(input_ids=IDS[0]), ValueError, r"int32\) tensor \[batch, tokens\]"),
    (dict(input_ids=IDS.tolist()), ValueError, "got list"),
    (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), ValueError, "no tokens"),
    (dict(input_ids=torch.zeros(0, 5, dtype=torch.long)), ValueError, "no tokens"),
    (dict(input_ids=torch.tensor([[3, 500]])), CacheInputError, "token id 500"),
    (dict(attention_mask=torch.ones(2, 40)), ValueError, r"\[batch, cached \+ new\] = \[1, 40\]"),
    (dict(attention_mask=torch.ones(40)), ValueError, "padding mask"),
    (dict(attention_mask="x"), ValueError, "padding mask"),
    (dict(segment_tokens=1.5), ValueError, "`segment_tokens` must be an int >= 1"),
    (dict(segment_tokens=True), ValueError, "`segment_tokens` must be an int >= 1"),
    (dict(segment_tokens=None), ValueError, "`segment_tokens` must be an int >= 1"),
    (dict(cache=None), TypeError, "fills a KVTierCache"),
    (dict(cache=tf.DynamicCache()), TypeError, "fills a KVTierCache"),
    (dict(model=None), TypeError, "takes a transformers model"),
])
def test_prefill_checks_its_arguments_before_any_forward(llama, kwargs, error, message):
    cache = KVTierCache.for_model(llama)
    args = dict(model=llama, cache=cache, input_ids=IDS, progress=False) | kwargs
    with pytest.raises(error, match=message):
        prefill(**args)
    assert cache.get_seq_length() == 0 and not cache.interrupted
    cache.close()


# ---------------------------------------------------------------------------------------------- Hogwild
TOK = build_tokenizer()


@pytest.fixture(scope="module")
def chat_model():
    config = tf.LlamaConfig(vocab_size=len(TOK), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                            bos_token_id=TOK.bos_token_id, eos_token_id=TOK.eos_token_id,
                            pad_token_id=TOK.pad_token_id)
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("kwargs, message", [
    (dict(seed="abc", do_sample=True), "seed must be None or an int"),
    (dict(seed=1.5, do_sample=True), "seed must be None or an int"),
    (dict(seed=True, do_sample=True), "seed must be None or an int"),
    (dict(do_sample="yes"), "do_sample must be True or False"),
    (dict(do_sample=True, temperature=math.inf), "temperature must be a finite number > 0"),
    (dict(top_p=True), r"top_p must be in \(0, 1\]"),
    (dict(eos_token_id="abc"), "eos_token_id must be a token id"),
    (dict(eos_token_id=-1), r"eos_token_id must be a token id \(an int in \[0, "),
    (dict(eos_token_id=10**9), "eos_token_id must be a token id"),
    (dict(eos_token_id=[1.7]), "each eos_token_id must be a token id"),
    (dict(eos_token_id=True), "eos_token_id must be a token id"),
    (dict(template="x"), "template must be a CollaborationTemplate"),
    (dict(on_token=5), "on_token must be a function"),
    (dict(on_step="x"), "on_step must be a function"),
    (dict(answer_pattern=5), "answer_pattern must be a regular expression"),
    (dict(history_options=5), "history_options must be a dict"),
    (dict(step_capacity=1.5), "step_capacity must be an int in"),
    (dict(step_capacity=True), "step_capacity must be an int in"),
    (dict(temperature=-1.0), "temperature must be a finite number >= 0"),  # greedy ignored it; the CLI refuses it
])
def test_hogwild_generate_names_a_bad_argument_before_it_runs(chat_model, kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        hogwild_generate(chat_model, TOK, "What is 2 + 2?", max_new_tokens=4, **kwargs)
    assert not _switched(chat_model)
    with pytest.raises(TypeError, match="takes a transformers model"):
        hogwild_generate(None, TOK, "What is 2 + 2?")


@pytest.mark.parametrize("call, bad, message", [
    ("prefill_history", [1.5], "integer token ids"),
    ("prefill_history", [True], "integer token ids"),
    ("prefill_history", [len(TOK)], "outside the model's vocabulary"),
    ("prefill_history", [-1], "outside the model's vocabulary"),
    ("prefill_history", "abc", "takes token ids"),
    ("step", [1.5, 2.5], "integer token ids"),
    ("step", [True, False], "integer token ids"),
    ("step", [len(TOK) + 1, 3], "outside the model's vocabulary"),
    ("finish_step", True, r"worker must be an int in \[0, 2\)"),
    ("finish_step", 1.5, r"worker must be an int in \[0, 2\)"),
    ("view_ids", True, r"worker must be an int in \[0, 2\)"),
    ("view_kv", (2, 0), r"worker must be an int in \[0, 2\)"),
    ("view_kv", (0, 5), r"layer_idx must be an int in \[0, 2\)"),
    ("view_kv", (0, -1), r"layer_idx must be an int in \[0, 2\)"),
])
def test_hogwild_cache_refuses_bad_ids_and_indices(chat_model, call, bad, message):
    with HogwildCache.for_model(chat_model, workers=2) as cache:
        cache.prefill_history([3, 4, 5])
        before = repr(cache)
        with pytest.raises(CacheInputError, match=message):
            getattr(cache, call)(*(bad if isinstance(bad, tuple) else (bad,)))
        assert repr(cache) == before


def test_a_closed_or_foreign_hogwild_cache_refuses_to_step(chat_model):
    cache = HogwildCache.for_model(chat_model, workers=2)
    cache.prefill_history([3, 4, 5])
    errors = []

    def other_thread():
        for call in (lambda: cache.step([3, 4]), lambda: cache.finish_step(0), cache.close):
            try:
                call()
            except CacheThreadError as err:
                errors.append(str(err))

    worker = threading.Thread(target=other_thread)
    worker.start()
    worker.join()
    assert len(errors) == 3 and all("this HogwildCache belongs to thread" in e for e in errors)
    assert repr(cache) == "HogwildCache(workers=2, history=3, headers=0+0, steps=[0, 0])"
    cache.close()
    for call in (lambda: cache.step([3, 4]), lambda: cache.prefill_history([3]), lambda: cache.finish_step(0),
                 lambda: cache.set_headers([3], [4]), cache.reset):
        with pytest.raises(StoreError, match="this HogwildCache is closed"):
            call()


@pytest.mark.parametrize("kwargs, message", [
    (dict(names="AB"), "names must be a list of names"),
    (dict(rules=5), "rules must be a str"),
    (dict(step_prefix=5), "step_prefix must be a str"),
    (dict(yes=5), "yes must be a str"),
    (dict(check_in=None), "check_in must be a str"),
    (dict(use_chat_template="no"), "use_chat_template must be True or False"),
    (dict(problem_format="{x}"), r"problem_format has the field \{x\}; it may use only \{problem\}"),
    (dict(problem_format="{problem"), "problem_format is not a valid format string"),
])
def test_collaboration_template_names_a_bad_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CollaborationTemplate(**kwargs)


@pytest.mark.parametrize("workers", [0, -1, True, 1.5])
def test_template_worker_counts_are_checked(workers):
    with pytest.raises(ValueError, match="workers must be an int >= 1"):
        CollaborationTemplate().encode(TOK, "What is 2 + 2?", workers)


# -------------------------------------------------------------------------------------------------- TIM
@pytest.mark.parametrize("kwargs, error, message", [
    (dict(prompt_ids=[len(TOK), 3]), ValueError, "each of prompt_ids must be a token id"),
    (dict(prompt_ids=[-1]), ValueError, "each of prompt_ids must be a token id"),
    (dict(prompt_ids=[1.5, 2.5]), ValueError, "each of prompt_ids must be a token id"),
    (dict(prompt_ids=[True]), ValueError, "each of prompt_ids must be a token id"),
    (dict(prompt_ids=torch.ones(2, 3, dtype=torch.long)), ValueError, "one sequence of token ids"),
    (dict(choose=lambda logits: len(TOK) + 3), ValueError, "what choose\\(\\) returned must be a token id"),
    (dict(choose=lambda logits: -1), ValueError, "what choose\\(\\) returned must be a token id"),
    (dict(choose=lambda logits: 1.7), ValueError, "what choose\\(\\) returned must be a token id"),
    (dict(choose=5), TypeError, "choose must be a function"),
    (dict(on_event=5), TypeError, "on_event must be a function"),
    (dict(constrain="yes"), ValueError, "constrain must be True, False or None"),
    (dict(max_string_length=0), ValueError, r"max_string_length must be None or an int in \[1, 2147483647\]"),
    (dict(max_string_length=2**64), ValueError, "max_string_length must be None or an int in"),
    (dict(max_depth=400), ValueError, r"max_depth must be an int in \[1, 64\], got 400"),
    (dict(seed="x", do_sample=True, choose=None), ValueError, "seed must be None or an int"),
    (dict(eos_token_id=[1.5]), ValueError, "each eos_token_id must be a token id"),
    (dict(cache="x"), TypeError, "cache must be a KVTierCache"),
])
def test_tim_generate_names_a_bad_argument(chat_model, kwargs, error, message):
    kwargs = dict(max_new_tokens=2, constrain=False, eos_token_id=[], choose=lambda logits: 5) | kwargs
    with pytest.raises(error, match=message):
        tim_generate(chat_model, TOK, "What is 2 + 2?", **kwargs)


@pytest.mark.parametrize("tokenizer, text, message", [
    (None, "2 + 2?", "tokenizer must be the model's tokenizer"),  # failed inside with an AttributeError
    (TOK, b"2 + 2?", "must be text .a str., got bytes"),  # was called empty
    (TOK, "\udce9t\udce9", "is not UTF-8 text"),  # a Latin-1 byte kept as a lone surrogate
])
def test_the_runtimes_refuse_a_missing_tokenizer_and_text_that_is_not_text(chat_model, tokenizer, text, message):
    with pytest.raises((ValueError, TypeError), match=message):
        hogwild_generate(chat_model, tokenizer, text, max_new_tokens=4)
    with pytest.raises((ValueError, TypeError), match=message):
        tim_generate(chat_model, tokenizer, text, max_new_tokens=2, constrain=False)


def test_tim_generate_refuses_options_it_would_ignore(chat_model):
    """Options for the cache generate would make were dropped silently when a cache was given."""
    with pytest.raises(ValueError, match="max_string_length applies to constrained decoding"):
        tim_generate(chat_model, TOK, "2 + 2?", constrain=False, max_string_length=5)
    with KVTierCache.for_model(chat_model) as cache:
        with pytest.raises(TypeError, match=r"options \['device_budget'\] build the cache generate makes"):
            tim_generate(chat_model, TOK, "2 + 2?", cache=cache, device_budget=5, constrain=False)
        assert cache.get_seq_length() == 0


def test_tim_building_blocks_check_their_arguments():
    with pytest.raises(TypeError, match="feed\\(\\) takes the decoded text of one token"):
        TaskTracker().feed(None)
    with pytest.raises(CacheInputError, match="TokenSpan"):
        PruneBuffer(0).on_list_closed((0,), (1, 3))
    spans = RemovedSpans()
    spans.remove(TokenSpan(0, 3))
    with pytest.raises(CacheInputError, match="position\\(\\) takes a stream token index"):
        spans.position(4.5)
    with pytest.raises(CacheInputError, match="remove\\(\\) takes a TokenSpan"):
        spans.remove((4, 6))
    assert spans.position(4) == 1
    with pytest.raises(ToolSpecError, match="timeout must be None or seconds in"):
        Tool("x", "d", {"type": "object", "properties": {}}, lambda: 1, timeout=1e30)
    with pytest.raises(ToolSpecError, match="tools must be a list of Tools or functions"):
        ToolRegistry(5)


@pytest.mark.parametrize("given, want", [
    (torch.tensor(2), {2}), (torch.tensor([2, 3]), {2, 3}), ([torch.tensor(4)], {4}), ((5, 6), {5, 6}),
])
def test_eos_ids_take_numpy_and_torch_ids_as_ints(given, want):
    """generation_config holds numpy and torch values often; a scalar one was refused while a list of them passed."""
    import numpy as np

    from kvtier.sampling import eos_ids

    model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=1))
    assert eos_ids(model, None, given) == want
    assert eos_ids(model, None, np.int64(7)) == {7} and eos_ids(model, None, np.array([8, 9])) == {8, 9}
    for bad in (torch.tensor(2.0), torch.tensor(True), np.array([[1]]), torch.tensor(64)):
        with pytest.raises(ValueError, match="token id"):
            eos_ids(model, None, bad)


# ------------------------------------------------------------------------------------- what a message shows
HUGE = [-(10**5000), "x" * 1_000_000, torch.ones(64, 64), "line one\nline two"]


def test_a_refused_value_is_shown_on_one_short_line_whatever_it_is(llama, chat_model, tmp_path):
    """A model, a tensor, a megabyte of text or an int too long to print (negative: refused everywhere), passed
    where kvtier wants something
    else: the error still names the argument on one short line (a repr would print the model's modules, a
    tensor's rows, the whole text, or fail)."""
    calls = [
        lambda bad: KVTierCache.open(bad, llama),
        lambda bad: KVTierCache.for_model(llama, mode=bad),
        lambda bad: KVTierCache.for_model(llama, chunk_size=bad),
        lambda bad: KVTierCache.for_model(llama, device_budget=bad),
        lambda bad: KVTierCache.for_model(llama, device=bad),
        lambda bad: _filled(llama).reserve(bad),
        lambda bad: prefill(llama, KVTierCache.for_model(llama), IDS, segment_tokens=bad),
        lambda bad: hogwild_generate(chat_model, TOK, "p", workers=bad),
        lambda bad: hogwild_generate(chat_model, TOK, "p", answer_pattern="(" + bad if isinstance(bad, str) else bad),
        lambda bad: tim_generate(chat_model, TOK, "p", prune_buffer=bad),
        lambda bad: PruneBuffer(bad),
        lambda bad: _filled(llama).remove_span(bad, 3),
        lambda bad: _filled(llama).check_prompt(bad),
    ]
    for call in calls:
        for bad in [llama, *HUGE]:
            with pytest.raises((kvtier.KVTierError, ValueError, TypeError)) as info:
                call(bad)
            message = str(info.value)
            assert "\n" not in message and len(message) < 600, (call, type(bad), message[:800])
