"""kvtier.hogwild: N workers in one batched forward pass over one shared cache (Hogwild! Inference).

What is checked: each worker's logits are those of a plain model reading that worker's view as one ordinary
sequence (exactly, for a one-layer model, whose keys do not depend on what a token's writer saw; with every
layer, against a DynamicCache holding the same stored keys moved to their view positions); one worker is
ordinary greedy generation; a worker sees the token another writes in the same step; a finished step joins
the history as if it had been prefilled there; models whose positions cannot be moved are refused.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import transformers as tf
from conftest import VOCAB, WINDOW, family_config
from transformers import DynamicCache

from kvtier import cache_argument
from kvtier.errors import CacheInputError, CacheMemoryError, StoreError, UnsupportedModelError
from kvtier.hogwild import History, HogwildCache, Layout, Target
from kvtier.hogwild.layout import OTHERS, OWN, STEP0
from kvtier.rope import Rope

FAMILIES = ["llama", "qwen2", "qwen3", "phi3", "gemma3", "llama-yarn"]
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256, "rope_theta": 10000.0}
TOL = {"atol": 2e-5, "rtol": 1e-4}


def _config(name: str, layers: int | None = None):
    cfg = family_config("llama" if name.startswith("llama") else name)
    if name == "llama-yarn":
        cfg.rope_parameters = dict(YARN)
    if name == "llama-dynamic":
        cfg.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    if layers is not None:  # one layer: the sliding kind where the family has one, so the window is exercised
        cfg.num_hidden_layers = layers
        if getattr(cfg, "layer_types", None) is not None:
            sliding = "sliding_attention" in cfg.layer_types
            cfg.layer_types = ["sliding_attention" if sliding else "full_attention"] * layers
    return cfg


def _model(name: str, layers: int | None = None, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(_config(name, layers)).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


def _ids(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n,), generator=g)


def _run(cache: HogwildCache, steps: int, seed: int = 1, finish: dict[int, int] | None = None, check=None) -> None:
    """History 10, headers 3 + 2, then `steps` steps of random tokens; finish[t] = worker whose step joins the
    history after step t; check(t, logits) after every step."""
    g = torch.Generator().manual_seed(seed)
    cache.prefill_history(_ids(10, g))
    cache.set_headers(_ids(3, g), _ids(2, g))
    for t in range(steps):
        logits = cache.step(_ids(cache.workers, g))
        if check is not None:
            check(t, logits)
        if finish and t in finish:
            cache.finish_step(finish[t])


@torch.no_grad()
def _dynamic_cache_logits(ref: torch.nn.Module, cache: HogwildCache, worker: int) -> torch.Tensor:
    """The reference for worker's last logits: a DynamicCache holding the worker's view (every stored key moved
    to its view position) but its last token, which the plain model then reads at its view position."""
    ids = cache.view_ids(worker)
    dyn = DynamicCache()
    for i in range(len(cache.layers)):
        k, v = cache.view_kv(worker, i)
        dyn.update(k[None, :, :-1], v[None, :, :-1], i)
    pos = torch.tensor([[ids.numel() - 1]])
    out = ref(input_ids=ids[None, -1:], position_ids=pos, use_cache=True, **{cache_argument(ref): dyn})
    return out.logits[0, -1]


# ------------------------------------------------------------------------------------------ pieces
def test_layout_orders_each_view_and_turns_queries_per_block():
    layout = Layout(3, step_capacity=2)
    layout.history = 5
    layout.set_headers(3, 2)
    layout.write(Target.OTHERS_HEADER, 1, 3)
    own = layout.write(Target.OWN_HEADER, 1, 2)
    assert own.q_pos == [0, 1] and own.view_pos == [8, 9] and own.qrel[1][OTHERS] == 4 and own.qrel[1][OWN] == 1
    rows = layout.write(Target.STEPS, 3, 1)  # every worker's first token
    assert layout.view_order(1) == [OTHERS, STEP0 + 0, STEP0 + 2, OWN, STEP0 + 1]
    assert rows.q_pos == [0, 0, 0] and rows.view_pos == [12, 12, 12]  # 5 + 3 + two others' tokens + 2
    assert rows.qrel[1] == [12 - 5, 2, 12 - 8, 0, 12 - 9]  # worker 1 sees worker 0 and 2's token of this step
    layout.write(Target.STEPS, 3, 2)  # outgrows the capacity of 2: doubles to 4
    assert layout.caps == [3, 2, 4, 4, 4] and layout.starts == [0, 3, 5, 9, 13]
    assert layout.total == 5 + 3 + 2 + 9 and layout.clear_step(2) == 3 and layout.history == 8
    with pytest.raises(ValueError, match="every worker's current step is empty"):
        layout.set_headers(1, 1)


@pytest.mark.parametrize("name", ["llama", "llama-yarn", "phi3"])
def test_history_append_block_rotates_once(name):
    """A block stored at local positions 0..L-1 lands at H..H+L-1, yarn's attention scaling not applied twice."""
    rope = Rope.from_model(_model(name, layers=1))
    hist = History(rope, kv_heads=2, head_dim=16, dtype=torch.float32, device=torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 12, 16, generator=g)  # unrotated keys: 7 of the prompt, then a step of 5
    v = torch.randn(2, 12, 16, generator=g)
    hist.extend(rope.rotate(x[:, :, :7], torch.arange(7))[0], v[:, :7])
    hist.append_block(rope.rotate(x[:, :, 7:], torch.arange(5))[0], v[:, 7:])
    k, vv = hist.kv()
    torch.testing.assert_close(k, rope.rotate(x, torch.arange(12))[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(vv, v)


# ------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("name", [*FAMILIES, "gemma2", "gpt_oss"])  # and soft-capping, attention sinks
def test_views_equal_a_plain_forward(name):
    """One layer: a key depends on its token and position only, so every worker's logits at every step equal a
    plain forward (no cache) over its view's token ids; across a promotion, a capacity growth, and (Gemma3,
    Qwen2) a sliding window over view positions shorter than the views."""
    model = _model(name, layers=1)
    ref = copy.deepcopy(model)
    cache = HogwildCache.for_model(model, workers=3, step_capacity=4)

    def check(t, logits):
        for w in range(3):
            with torch.no_grad():
                plain = ref(cache.view_ids(w)[None]).logits[0, -1]
            torch.testing.assert_close(logits[w], plain, **TOL, msg=f"step {t} worker {w}")

    _run(cache, steps=8, finish={3: 1}, check=check)
    assert cache.get_seq_length() == 10 + 5 + 24 > 24  # longer than the sliding window


@pytest.mark.parametrize("name", FAMILIES)
def test_views_equal_a_dynamic_cache(name):
    """Every layer: each worker's logits equal a plain model reading that worker's view as one ordinary
    sequence, with the view's keys (what the workers wrote) in a DynamicCache."""
    model = _model(name)
    ref = copy.deepcopy(model)
    cache = HogwildCache.for_model(model, workers=2, step_capacity=4)

    def check(t, logits):
        if t % 3 == 2:
            for w in range(2):
                torch.testing.assert_close(logits[w], _dynamic_cache_logits(ref, cache, w), **TOL,
                                           msg=f"step {t} worker {w}")

    _run(cache, steps=9, finish={4: 0}, check=check)


@pytest.mark.parametrize("headers", [True, False])
def test_one_worker_is_greedy_generate(headers):
    """N = 1 reads [history, headers, its own step]: greedy stepping equals `generate` over that prompt. Without
    headers a step can join the history mid-way (its keys were computed in the same context), with them not."""
    model = _model("llama")
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(3)
    prompt, others, own = _ids(9, g), _ids(3 if headers else 0, g), _ids(2 if headers else 0, g)
    cache = HogwildCache.for_model(model, workers=1)
    logits = cache.prefill_history(prompt)
    logits = cache.set_headers(others, own) if headers else logits
    tokens, seen = [], [logits]
    for t in range(8):
        tokens.append(int(logits.argmax()))
        logits = cache.step([tokens[-1]])[0]
        seen.append(logits)
        if not headers and t == 3:
            assert cache.finish_step(0) == 4
    full = torch.cat([prompt, others, own])
    out = ref.generate(full[None], max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    expected = out.sequences[0, full.numel():]
    assert tokens == expected.tolist()
    for t, plain in enumerate(out.logits):
        torch.testing.assert_close(seen[t], plain[0], **TOL, msg=f"token {t}")
    assert torch.equal(cache.view_ids(0), torch.cat([full, expected]))


def test_a_worker_sees_the_token_another_writes_in_the_same_step():
    """Worker B's logits at step t change with the token worker A writes at step t (and back)."""
    model = _model("llama")
    g = torch.Generator().manual_seed(4)
    prompt, others, own = _ids(8, g), _ids(3, g), _ids(2, g)
    earlier = [_ids(2, g) for _ in range(3)]
    runs = {}
    for a in (5, 6):
        cache = HogwildCache.for_model(model, workers=2)
        cache.prefill_history(prompt)
        cache.set_headers(others, own)
        for tokens in earlier:
            cache.step(tokens)
        runs[a] = cache.step([a, 7])
    assert not torch.allclose(runs[5][1], runs[6][1], atol=1e-4)  # B saw A's token of this very step
    assert not torch.allclose(runs[5][0], runs[6][0], atol=1e-4)
    again = HogwildCache.for_model(model, workers=2)
    again.prefill_history(prompt)
    again.set_headers(others, own)
    for tokens in earlier:
        again.step(tokens)
    torch.testing.assert_close(again.step([5, 7]), runs[5], atol=0, rtol=0)  # and nothing else differs


def test_a_promoted_step_equals_the_same_tokens_prefilled():
    """finish_step re-rotates the step's keys once into the history: the history then holds what prefilling the
    same tokens there gives, and the next step's logits agree."""
    model = _model("qwen3")
    g = torch.Generator().manual_seed(5)
    prompt, step = _ids(7, g), _ids(5, g)
    promoted = HogwildCache.for_model(model, workers=1)
    promoted.prefill_history(prompt)
    for tok in step:
        promoted.step([int(tok)])
    promoted.finish_step(0)
    prefilled = HogwildCache.for_model(model, workers=1)
    prefilled.prefill_history(prompt)
    prefilled.prefill_history(step)  # extending the history: positions continue
    assert promoted.layout.history == prefilled.layout.history == 12
    for a, b in zip(promoted.layers, prefilled.layers):
        for x, y in zip(a.history.kv(), b.history.kv()):
            torch.testing.assert_close(x, y, **TOL)
    torch.testing.assert_close(promoted.step([9]), prefilled.step([9]), **TOL)
    assert torch.equal(promoted.view_ids(0), prefilled.view_ids(0))


# ------------------------------------------------------------------------------- sliding windows
def test_a_windowed_history_keeps_what_the_window_reaches():
    """With a window W the history holds only a tail of at least W - 1 keys, at most 2 (W - 1) in a buffer of
    as many rows, yet reads, prefills over it and its keys equal those of a history kept whole; trims happen
    both on prefills (keys dropped after their queries attended) and on appended blocks, short and long."""
    window = 8
    rope = Rope.from_model(_model("gemma2", layers=1))
    cpu = torch.device("cpu")
    whole = History(rope, kv_heads=2, head_dim=16, dtype=torch.float32, device=cpu)
    bounded = History(rope, kv_heads=2, head_dim=16, dtype=torch.float32, device=cpu, window=window)
    assert bounded.bound == 14 and whole.bound is None
    g = torch.Generator().manual_seed(0)
    tol = {"atol": 1e-4, "rtol": 1e-4}  # positions in the hundreds: float32 rotation round-off
    firsts = set()
    for op, n in enumerate([30, 3, 5, 2, 9, 1, 20, 4, 7, 6, 12, 3, 2, 40, 5, 1, 1, 8, 25, 3] * 3):
        x, v = torch.randn(1, 2, n, 16, generator=g), torch.randn(2, n, 16, generator=g)
        if op % 3 == 0:  # a prefill: keys at their absolute positions, then its queries attend causally
            k = rope.rotate(x, torch.arange(whole.length, whole.length + n))[0]
            q = rope.rotate(torch.randn(1, 4, n, 16, generator=g), torch.arange(whole.length, whole.length + n))
            for h in (whole, bounded):
                h.extend(k, v)
            want, got = (h.attend_newest(q, 0.25, 20.0, window, need_lse=True) for h in (whole, bounded))
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, **tol)
        else:  # a finished step: keys at block-local positions
            for h in (whole, bounded):
                h.append_block(rope.rotate(x, torch.arange(n))[0], v)
        firsts.add(bounded.first)
        assert bounded.length == whole.length and window - 1 <= bounded.held <= bounded.bound
        assert bounded._k.shape[1] <= bounded.bound and bounded._v.shape == bounded._k.shape
        (kw, vw), (kb, vb) = whole.kv(), bounded.kv()
        assert kb.shape[1] == bounded.held == whole.length - bounded.first
        torch.testing.assert_close(kb, kw[:, bounded.first:], **tol)
        assert torch.equal(vb, vw[:, bounded.first:])
        q_pos = torch.tensor([0, 2, 4])  # three rows of a step, at view positions from length on
        q = rope.rotate(torch.randn(1, 4, 3, 16, generator=g), q_pos)[0].transpose(0, 1)
        view_pos = whole.length + torch.tensor([0, 3, 9])
        rows = SimpleNamespace(q_pos=q_pos, view_pos=view_pos)  # what attend reads of a forward pass's Plan
        want, got = (h.attend(q, rows, 0.25, 20.0, window) for h in (whole, bounded))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, **tol)
    assert len(firsts) > 10 and whole.length > 20 * window  # it trimmed often, over a long history


def _long_collaboration(cache: HogwildCache, check, prefill) -> None:
    """A prompt longer than the window (30 tokens; WINDOW = 24), headers 3 + 2, then 60 steps of 3 workers, one
    step joining the history every other step; after step 35 every step joins and 40 more tokens are prefilled
    into the trimmed history. check(t, logits) after each step; prefill(ids) prefills (and checks)."""
    g = torch.Generator().manual_seed(7)
    prefill(_ids(30, g))
    cache.set_headers(_ids(3, g), _ids(2, g))
    for t in range(60):
        check(t, cache.step(_ids(3, g)))
        if t % 2:
            cache.finish_step(t // 2 % 3)
        if t == 35:
            assert all(layer.history.first > 0 for layer in cache.layers if layer.is_sliding)
            for w in range(3):
                cache.finish_step(w)
            prefill(_ids(40, g))
    assert cache.layout.history > 8 * WINDOW


def _check_bounded(cache: HogwildCache) -> None:
    """Every sliding layer's history holds the window's reach, within its bound (keys and their buffer)."""
    sliding = [layer.history for layer in cache.layers if layer.is_sliding]
    assert sliding
    for h in sliding:
        assert min(h.length, WINDOW - 1) <= h.held <= h.bound == 2 * (WINDOW - 1)
        assert h._k.shape[1] <= h.bound and h._v.shape[1] <= h.bound


@pytest.mark.parametrize("name", ["gemma2", "gpt_oss"])  # soft-capping; attention sinks
def test_a_long_collaboration_over_a_sliding_window_equals_a_plain_forward(name):
    """One sliding layer, a history ten windows long: every worker's logits at every step, and a prefill's over
    the trimmed history, equal a plain forward over the token ids, while the layer holds at most 2 (W - 1) keys
    of history."""
    model = _model(name, layers=1)
    ref = copy.deepcopy(model)
    cache = HogwildCache.for_model(model, workers=3, step_capacity=4)

    def plain(ids):
        with torch.no_grad():
            return ref(ids[None]).logits[0, -1]

    def check(t, logits):
        for w in range(3):
            torch.testing.assert_close(logits[w], plain(cache.view_ids(w)), **TOL, msg=f"step {t} worker {w}")
        _check_bounded(cache)

    def prefill(ids):
        logits = cache.prefill_history(ids)
        torch.testing.assert_close(logits, plain(cache.view_ids(0)[: cache.layout.history]), **TOL)
        _check_bounded(cache)

    _long_collaboration(cache, check, prefill)


@pytest.mark.parametrize("name", ["gemma2", "mistral"])  # alternating sliding and full; every layer sliding
def test_a_long_collaboration_over_a_sliding_window_equals_a_dynamic_cache(name):
    """Every layer, a history ten windows long: each worker's logits equal a plain model reading its view from
    a DynamicCache (the positions the window dropped are zeros there, and masked), and a prefill into the
    trimmed history gives the logits of the plain model continuing the stored history; the sliding layers hold
    at most 2 (W - 1) keys of history, and `held` counts them so."""
    model = _model(name)
    ref = copy.deepcopy(model)
    cache = HogwildCache.for_model(model, workers=3, step_capacity=4)

    def check(t, logits):
        _check_bounded(cache)
        if t % 4 == 3:
            for w in range(3):
                torch.testing.assert_close(logits[w], _dynamic_cache_logits(ref, cache, w), **TOL,
                                           msg=f"step {t} worker {w}")

    def prefill(ids):
        h = cache.layout.history
        dyn = DynamicCache()
        for i in range(len(cache.layers) if h else 0):
            k, v = cache.view_kv(0, i)  # the view opens with the history
            dyn.update(k[None, :, :h], v[None, :, :h], i)
        with torch.no_grad():
            want = ref(input_ids=ids[None], position_ids=torch.arange(h, h + len(ids))[None], use_cache=True,
                       **{cache_argument(ref): dyn}).logits[0, -1]
        torch.testing.assert_close(cache.prefill_history(ids), want, **TOL)
        _check_bounded(cache)

    _long_collaboration(cache, check, prefill)
    held = cache.held
    full = [layer for layer in cache.layers if not layer.is_sliding]
    arena = (held["headers"] + sum(held["steps"])) * len(cache.layers)
    assert held["tiers"]["device"] == arena + held["history"] * len(full) + sum(
        layer.history.held for layer in cache.layers if layer.is_sliding)
    assert held["tiers"]["device"] <= arena + held["history"] * len(full) + 2 * (WINDOW - 1) * (4 - len(full))


# --------------------------------------------------------------------------------------- misuse
@pytest.mark.parametrize("name, why", [("llama-dynamic", "dynamic-NTK"), ("gpt2", "no rotary position embedding")])
def test_refuses_models_whose_positions_cannot_move(name, why):
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(family_config(name) if name == "gpt2" else _config(name)).eval()
    with pytest.raises(UnsupportedModelError, match=f"Hogwild.*{why}") as err:
        HogwildCache.for_model(model, workers=2)
    assert "\n" not in str(err.value)


def test_misuse_fails_with_a_message():
    model = _model("llama")
    cache = HogwildCache.for_model(model, workers=2)
    cache.prefill_history([5, 6, 7])
    with pytest.raises(CacheInputError, match="one token per worker"):
        cache.step([5, 6, 7])
    logits = cache.step([8, 9])
    with pytest.raises(CacheInputError, match="finish_step"):
        cache.set_headers([3], [4])
    with pytest.raises(CacheInputError, match="position_ids"):  # a plain call with view positions
        model(input_ids=torch.tensor([[3], [4]]), position_ids=torch.tensor([[5], [5]]),
              **{cache_argument(model): cache})
    out = model(input_ids=torch.tensor([[3], [4]]), position_ids=torch.tensor([[1], [1]]),
                **{cache_argument(model): cache})  # the positions step() would feed
    assert out.logits.shape == (2, 1, VOCAB) and logits.shape == (2, VOCAB)
    assert cache.view_ids(0).tolist() == [5, 6, 7, 9, 4, 8, 3]
    with pytest.raises(ValueError, match="workers"):
        HogwildCache.for_model(model, workers=0)


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_a_history_cache_changed_behind_the_cache_is_refused(name):
    """history_cache is reachable (its stats, budgets): cropped or closed on its own, the workers' views still
    counted the old history and step() attended over what was left, with other logits and no error."""
    cache = HogwildCache.for_model(_model(name), workers=2)
    cache.prefill_history([3, 4, 5, 6, 7, 8])
    cache.history_cache.crop(-2)
    with pytest.raises(CacheInputError, match=r"history_cache holds \d+ tokens where the workers' views hold 6"):
        cache.step([9, 10])
    cache.reset()
    cache.prefill_history([3, 4, 5, 6])
    assert cache.step([9, 10]).shape == (2, VOCAB)
    cache.history_cache.close()
    with pytest.raises(StoreError, match="history_cache was closed"):
        cache.step([9, 10])
    cache.close()


@pytest.mark.parametrize("options, says", [
    (dict(workers=10**7), r"workers must be an int in \[1, 1024\]"),
    (dict(workers=2, step_capacity=10**12), r"step_capacity must be an int in \[1, 4294967295\]"),
])
def test_absurd_worker_counts_and_step_sizes_are_refused_before_anything_is_built(options, says):
    with pytest.raises(ValueError, match=says):
        HogwildCache.for_model(_model("llama"), **options)


def test_steps_the_device_cannot_hold_are_a_memory_error_not_an_oom(monkeypatch):
    model = _model("llama")
    with pytest.raises(CacheMemoryError, match="2 workers' steps of 4294967295 tokens needs .* available"):
        HogwildCache.for_model(model, workers=2, step_capacity=2**32 - 1)
    with HogwildCache.for_model(model, workers=2, step_capacity=4) as cache:
        cache.prefill_history([5, 6, 7])
        monkeypatch.setattr("kvtier.store.pools.available_bytes", lambda device: 0)
        with pytest.raises(CacheMemoryError, match="arena of current steps and headers needs"):
            cache.set_headers([3], [4])  # the arena grows for the headers: no memory left
