"""`kvtier.tim.generate` on scripted token streams (no trained model needed): tools run inside the generation,
finished sub-task lists leave the cache, and at every forward pass kvtier's logits equal a plain transformers
forward over the kept tokens, whose KV is the KV written earlier moved to the compacted positions.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
import transformers as tf
from helpers import cache_kw
from tiny import build_tokenizer

from kvtier.rope import Rope
from kvtier.tim import TimFormatError, TokenSpan
from kvtier.tim.runtime import generate
from kvtier.tim.schema import JSON_SEPARATORS
from kvtier.tim.tools import Tool, calculate, calculator

TOK = build_tokenizer()


def _model(seed: int = 0) -> torch.nn.Module:
    config = tf.LlamaConfig(vocab_size=len(TOK), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                            bos_token_id=TOK.bos_token_id, eos_token_id=TOK.eos_token_id,
                            pad_token_id=TOK.pad_token_id)
    torch.manual_seed(seed)
    return tf.AutoModelForCausalLM.from_config(config).eval()


def _task(name: str, depth: int, tool: str | None = None, children: list | None = None) -> dict:
    task: dict = {"thought": f"work on {name}"}
    if tool is not None:
        task["tooluse"] = {"tool_name": "calculator", "parameters": {"expression": tool}, "tool_result": None}
    if children:
        task["subtasks"] = children
    task["conclusion"] = f"{name} done"
    return task


def thread(depth: int = 3, width: int = 2) -> dict:
    """A thread nested `depth` deep, a tool call at every depth, `width` subtasks per list."""
    def build(name: str, d: int) -> dict:
        kids = [build(f"{name}.{i}", d + 1) for i in range(width)] if d < depth else None
        return _task(name, d, tool=f"{d} * {len(name)} + 1", children=kids)
    return {"reasoning": build("t", 1), "answer": "done"}


def script(doc: dict) -> list[int]:
    """The tokens the model writes for `doc`: its JSON text without the tool results (the runtime writes them),
    tokenized piece by piece so that a piece ends where a tool's parameters close."""
    text = json.dumps(doc, separators=JSON_SEPARATORS)
    pieces = text.split(', "tool_result": null')
    ids: list[int] = []
    for piece in pieces:
        ids += TOK.encode(piece, add_special_tokens=False)
    return ids


class Scripted:
    """choose(): the next scripted token, whatever the logits; keeps the logits it was shown."""

    def __init__(self, ids: list[int]):
        self.ids, self.at, self.seen = ids, 0, []

    def __call__(self, logits: torch.Tensor) -> int:
        self.seen.append(logits.clone())
        if self.at == len(self.ids):
            return TOK.eos_token_id
        self.at += 1
        return self.ids[self.at - 1]


class Recorder:
    """Every forward pass (ids, positions, last logits) and every span removal, in order."""

    def __init__(self, model, cache_class):
        self.log: list[tuple] = []
        model.register_forward_hook(self.forward, with_kwargs=True)
        original = cache_class.remove_span

        def remove_span(cache, start, end, **kw):
            self.log.append(("remove", start, end))
            return original(cache, start, end, **kw)

        self.patch = (cache_class, original, remove_span)

    def forward(self, module, args, kwargs, out):
        self.log.append(("forward", kwargs["input_ids"].clone(), kwargs["position_ids"].clone(), out.logits[0].clone()))

    def __enter__(self):
        cls, _, patched = self.patch
        cls.remove_span = patched
        return self

    def __exit__(self, *exc):
        cls, original, _ = self.patch
        cls.remove_span = original


@torch.no_grad()
def replay(model, log) -> None:
    """The reference: the same forward passes through a DynamicCache, whose tensors are cut and moved by hand
    (Rope.shift) where kvtier removed a span. Logits must match at every pass."""
    ropes = Rope.for_layers(model)
    cache = tf.DynamicCache()
    kw = cache_kw(model)
    for entry in log:
        if entry[0] == "remove":
            _, start, end = entry
            for layer, rope in zip(cache.layers, ropes):
                k, v = layer.keys, layer.values
                layer.keys = torch.cat([k[:, :, :start], rope.shift(k[:, :, end:], start - end)], dim=2)
                layer.values = torch.cat([v[:, :, :start], v[:, :, end:]], dim=2)
            continue
        _, ids, pos, logits = entry
        assert int(pos[0, 0]) == cache.get_seq_length()  # the next position is the kept length
        out = model(input_ids=ids, position_ids=pos, use_cache=True, **{kw: cache})
        torch.testing.assert_close(logits, out.logits[0], atol=2e-4, rtol=1e-4)


TIERED = dict(chunk_size=16, sink_tokens=4, recent_window=8, adaptive_chunks=False, device_budget=160,
              host_budget=160)


@pytest.mark.parametrize("tiers, buffer", [("device", 0), ("device", 1), ("device", 2), ("tiered", 0),
                                           ("tiered", 2)])
def test_logits_match_a_forward_over_the_kept_tokens_moved(buffer, tiers):
    from kvtier import KVTierCache

    model, ref = _model(), _model()
    doc = thread(depth=3)
    chooser = Scripted(script(doc))
    options = TIERED if tiers == "tiered" else {}
    with Recorder(model, KVTierCache) as rec:
        result = generate(model, TOK, "add", tools=[calculator], prune_buffer=buffer, constrain=False,
                          choose=chooser, max_new_tokens=5000, **options)
    assert result.stopped == "answer" and result.answer == "done"
    removals = [e for e in rec.log if e[0] == "remove"]
    assert len(result.pruned) == len(removals) > 0
    if tiers == "tiered":
        assert result.stats.peak_kv_tokens > 320  # past the device and host budgets: chunks went to disk
    replay(ref, rec.log)
    # the tree and the tool results, all depths
    root = result.tree
    assert root.thought == "work on t" and root.conclusion == "t done" and len(root.children) == 2
    leaf = root.children[1].children[0]
    assert leaf.depth == 3 and leaf.tool_result == calculate(leaf.parameters["expression"])
    assert [c.ok for c in result.tool_calls] == [True] * 7
    assert json.loads(result.text.strip())["reasoning"]["tooluse"]["tool_result"] == 2  # 1 * 1 + 1


def test_the_buffer_size_decides_how_much_is_pruned_and_what_stays():
    doc = thread(depth=3)
    runs = {b: generate(_model(), TOK, "add", tools=[calculator], prune_buffer=b, constrain=False,
                        choose=Scripted(script(doc)), max_new_tokens=5000) for b in (0, 1, 2, 9)}
    pruned = {b: r.stats.pruned_tokens for b, r in runs.items()}
    assert pruned[0] > pruned[1] > pruned[2] > pruned[9] == 0
    # size 0: every list leaves as it closes, the three inner lists and then the outer (what is left of it)
    assert [p.path for p in runs[0].pruned] == [(0,), (1,), ()]
    assert [p.path for p in runs[1].pruned] == [(0,), (1,)]  # the oldest list leaves when the next one closes
    assert [p.path for p in runs[2].pruned] == [(0,)]
    for b, r in runs.items():
        s = r.stats
        assert s.final_kv_tokens == s.prompt_tokens + s.generated_tokens + s.injected_tokens - s.pruned_tokens
        assert r.kept_ids[:s.prompt_tokens] == r.kept_ids[:s.prompt_tokens]
    text = TOK.decode(runs[0].kept_ids[runs[0].stats.prompt_tokens:])
    assert '"subtasks": [' in text and "t done" in text and "t.0 done" not in text  # parents' conclusions stay


def test_reencode_gives_the_cache_a_plain_forward_over_the_kept_tokens_would():
    from kvtier import KVTierCache

    model, ref = _model(), _model()
    with Recorder(model, KVTierCache) as rec:
        result = generate(model, TOK, "add", tools=[calculator], prune_buffer=1, constrain=False, reencode=True,
                          choose=Scripted(script(thread(depth=3))), max_new_tokens=5000)
    assert result.stats.reencoded_tokens > 0 and not any(e[0] == "remove" for e in rec.log)
    with torch.no_grad():
        plain = ref(input_ids=torch.tensor([result.kept_ids])).logits[0, -1]
    torch.testing.assert_close(rec.log[-1][3][-1], plain, atol=2e-4, rtol=1e-4)


def long_trace(siblings: int = 10, leaves: int = 8) -> dict:
    """A thread whose work sits in finished lists: `siblings` tasks, each with `leaves` sub-tasks."""
    leaf = "check one more case of the problem carefully"
    return {"reasoning": _task("t", 1, children=[
        _task(f"s{i}", 2, children=[{"thought": leaf, "conclusion": f"case {i}.{j} holds"} for j in range(leaves)])
        for i in range(siblings)]), "answer": 1}


def test_device_memory_stays_flat_over_a_long_trace_with_pruning():
    from kvtier import KVTierCache

    used = {}
    for buffer in (0, None):
        model = _model()
        cache = KVTierCache.for_model(model, chunk_size=16, sink_tokens=4, recent_window=8)
        trace: list[int] = []

        def watch(event):
            trace.append(max(p.used for p in cache.tiers.device_pools.values()))

        result = generate(model, TOK, "", prune_buffer=buffer if buffer is not None else 10**6, constrain=False,
                          choose=Scripted(script(long_trace())), max_new_tokens=20000, cache=cache, on_event=watch,
                          prompt_ids=[TOK.bos_token_id])
        cache.close()
        assert result.stopped == "answer"
        used[buffer] = (trace, result.stats)
    trace, s = used[0]
    assert s.share_pruned > 0.7 and s.positions_reused > 0
    assert s.peak_kv_tokens < 0.3 * used[None][1].peak_kv_tokens
    assert max(trace) < 0.3 * max(used[None][0])  # device slots: what is held, never what was written
    # flat: between the first and the last tenth of the run, the device slots in use grow only by the
    # top-level tasks' kept thoughts and conclusions, not by the pruned work
    tenth = len(trace) // 10
    assert max(trace[-tenth:]) - max(trace[:tenth]) < 0.1 * max(used[None][0])


def _run_script(text_pieces: list[str], tools) -> object:
    ids = []
    for piece in text_pieces:
        ids += TOK.encode(piece, add_special_tokens=False)
    return generate(_model(), TOK, "x", tools=tools, constrain=False, choose=Scripted(ids), max_new_tokens=400)


def _tool_doc(name: str, params: str) -> list[str]:
    return ['{"reasoning": {"thought": "t", "tooluse": {"tool_name": "' + name + '", "parameters": ' + params,
            '}, "conclusion": "c"}, "answer": 1}']


def test_failing_unknown_and_slow_tools_give_the_model_an_error_result_and_the_run_goes_on():
    def boom(x: int) -> int:
        raise RuntimeError("no")

    def slow(x: int) -> int:
        time.sleep(2)
        return x

    tools = [Tool("boom", "fails", {"type": "object", "properties": {"x": {"type": "integer"}}}, boom),
             Tool("slow", "sleeps", {"type": "object", "properties": {"x": {"type": "integer"}}}, slow, timeout=0.2)]
    for name, params, message in (("boom", '{"x": 1}', "RuntimeError: no"), ("nope", '{}', "unknown tool"),
                                  ("slow", '{"x": 1}', "timed out"), ("boom", '{"x": "a"}', "bad parameters")):
        result = _run_script(_tool_doc(name, params), tools)
        assert result.stopped == "answer", name
        (call,) = result.tool_calls
        assert not call.ok and message in json.loads(call.result_json)["error"]
        assert message in result.tree.tool_result["error"]


def test_malformed_structure_stops_the_run_with_the_token_and_what_was_expected():
    with pytest.raises(TimFormatError, match=r"token \d+.*expected"):
        _run_script(['{"reasoning": {"thought": "t", "conclusion": "c", "thought": "again"}}'], None)


def test_bad_arguments_are_refused_before_anything_runs():
    for kwargs, message in ((dict(prune_buffer=-1), "prune_buffer"), (dict(max_depth=0), "max_depth"),
                            (dict(max_new_tokens=0), "max_new_tokens"), (dict(reencode="yes"), "reencode"),
                            (dict(top_p=2.0), "top_p")):
        with pytest.raises(ValueError, match=message):
            generate(_model(), TOK, "x", constrain=False, **kwargs)


def test_a_model_whose_keys_cannot_move_is_refused_before_anything_runs():
    from conftest import build_model

    from kvtier.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError):
        generate(build_model("gpt2"), TOK, "x", constrain=False, prompt_ids=[1, 2, 3])
    with pytest.raises(ValueError, match="prompt must be text"):
        generate(_model(), TOK, None, constrain=False)


def test_schema_constrained_random_model_writes_a_valid_thread_prefix():
    pytest.importorskip("xgrammar", reason="schema-constrained decoding needs xgrammar (pip install kvtier[tim])")
    result = generate(_model(), TOK, "what is 2+3?", tools=[calculator], max_string_length=12, max_new_tokens=300,
                      do_sample=True, seed=0)
    assert result.stats.generated_tokens > 0
    if result.stopped == "answer":
        assert json.loads(result.text)["reasoning"]["thought"] == result.tree.thought
    assert all(isinstance(p.tokens, tuple) and TokenSpan(*p.tokens).length >= 0 for p in result.pruned)
