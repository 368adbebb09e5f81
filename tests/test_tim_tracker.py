"""kvtier.tim: the streaming TIM parser, the pruning rule and the stream -> cache position map.

Every tree and span the tracker builds is checked against a brute-force reference: the whole text parsed
at once (json.JSONDecoder.raw_decode for each value, so the reference shares no scanning code with the
tracker) and a char -> token map of the tokenization at hand.
"""

from __future__ import annotations

import itertools
import json
import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.errors import CacheInputError, KVTierError
from kvtier.tim import (
    FieldDone,
    ListClosed,
    PruneBuffer,
    PrunedList,
    RemovedSpans,
    TaskClosed,
    TaskTracker,
    ThreadDone,
    TimFormatError,
    TokenSpan,
    ToolCallReady,
    tool_result_text,
)

WS = " \t\n\r"
_DEC = json.JSONDecoder()

# ---------------------------------------------------------------------------------------------------------
# Writing threads: JSON with whitespace chosen by a seeded generator.


def dumps(value, rng: random.Random, ascii_only: bool) -> str:
    """JSON for `value` with random whitespace wherever JSON allows it (never inside a number or string)."""

    def ws() -> str:
        return "".join(rng.choice(WS) for _ in range(rng.choice((0, 0, 0, 1, 1, 2))))

    if isinstance(value, dict):
        items = [f"{ws()}{json.dumps(k, ensure_ascii=ascii_only)}{ws()}:{ws()}{dumps(v, rng, ascii_only)}{ws()}"
                 for k, v in value.items()]
        return "{" + (",".join(items) if items else ws()) + "}"
    if isinstance(value, list):
        items = [f"{ws()}{dumps(v, rng, ascii_only)}{ws()}" for v in value]
        return "[" + (",".join(items) if items else ws()) + "]"
    return json.dumps(value, ensure_ascii=ascii_only)


# A thread three deep with a tool call at every depth, and parameters/results that are hard to scan:
# quotes, brackets and braces inside strings, escapes, non-ASCII, every kind of number and literal.
TRICKY = {"q": 'a "quoted" [bracket] {brace} }]} \\ back \u00e9 \U0001f600 \t tab', "n": -1.5e10, "z": 0,
          "f": 0.25, "big": 12345678901234567890, "flags": [True, False, None],
          "nested": {"x": [[], {}, [0, {"k": "]}\","}]], "": ""}}
SCRIPT = {
    "reasoning": {
        "thought": "Plan: look two facts up, then combine them.",
        "tooluse": {"tool_name": "search", "parameters": TRICKY, "tool_result": {"hits": ["x", "}"], "score": 0.5}},
        "subtasks": [
            {"thought": "first fact",
             "tooluse": {"tool_name": "lookup", "parameters": {"id": 7}, "tool_result": "[not a list]"},
             "subtasks": [
                 {"thought": "leaf a", "tooluse": {"tool_name": "calc", "parameters": {"expr": "1+1"}, "tool_result": 2},
                  "conclusion": "2"},
                 {"thought": "leaf b", "conclusion": "done b"}],
             "conclusion": "fact one"},
            {"thought": "second", "subtasks": [
                {"thought": "leaf c", "tooluse": {"tool_name": "none", "parameters": {}, "tool_result": None},
                 "conclusion": "c"}],
             "conclusion": "fact two"},
            {"thought": "third, no subtasks", "conclusion": "fact three"}],
        "conclusion": "combined",
    },
    "answer": "42",
}
SCRIPT_TEXT = json.dumps(SCRIPT)

# The same kind of thread written by hand, with escapes json.dumps never writes.
RAW_TEXT = ('\n {"reasoning":{"thought":"a\\/b \\u005d\\u007D \\ud83d\\ude00","tooluse":{"tool_name":"t\\"x",'
            '"parameters":{"a":[1E-2,-0,0.5e+3,-12.0E-0],"b":"\\\\\\"","c":{"d":[true,null,false]}},'
            '\t"tool_result"\r:\n[ ]},"subtasks":[ ],"conclusion":""},"answer":{"k":[{},[]]}}\n\n')


# ---------------------------------------------------------------------------------------------------------
# The brute-force reference: char positions of everything, from the whole text.


def reference(text: str) -> dict:
    """Char positions in a valid thread: per task path its fields (key's first char, value's last char),
    its braces and its list's brackets; the thread's fields; the events with the char that triggers them."""
    out = {"fields": {}, "braces": {}, "brackets": {}, "thread": {}, "events": [], "params_end": {}, "result": {}}

    def skip(i):
        while text[i] in WS:
            i += 1
        return i

    def expect(i, ch):
        i = skip(i)
        assert text[i] == ch, (i, text[i], ch)
        return i + 1

    def members(i):
        """Yield (key, key_char, value_char) for each member; the caller parses the value and sends its end."""
        i = expect(i, "{")
        if text[skip(i)] == "}":
            return skip(i) + 1
        while True:
            i = skip(i)
            key, j = _DEC.raw_decode(text, i)
            j = expect(j, ":")
            i = yield key, i, skip(j)
            i = skip(i)
            if text[i] == "}":
                return i + 1
            i = expect(i, ",")

    def drive(gen, handle):
        try:
            got = next(gen)
            while True:
                got = gen.send(handle(*got))
        except StopIteration as stop:
            return stop.value

    def task(i, path):
        start = skip(i)
        fields = out["fields"][path] = {}

        def member(key, kc, vc):
            if key == "tooluse":
                def tool_member(k, kc2, vc2):
                    _, end = _DEC.raw_decode(text, vc2)
                    fields[k] = (kc2, end - 1)
                    if k == "parameters":
                        out["events"].append((end - 1, "tool", path))
                        out["params_end"][path] = end - 1
                    if k == "tool_result":
                        out["result"][path] = (vc2, end)
                    return end
                end = drive(members(vc), tool_member)
            elif key == "subtasks":
                j = expect(vc, "[")
                n = 0
                if text[skip(j)] != "]":
                    while True:
                        j = task(j, path + (n,))
                        n += 1
                        j = skip(j)
                        if text[j] == "]":
                            break
                        j = expect(j, ",")
                j = skip(j)
                assert text[j] == "]"
                out["brackets"][path] = (vc, j)
                out["events"].append((j, "list", path))
                end = j + 1
            else:
                _, end = _DEC.raw_decode(text, vc)
                if key in ("thought", "conclusion"):
                    out["events"].append((end - 1, "field", (path, key)))
            fields[key] = (kc, end - 1)
            return end

        end = drive(members(start), member)
        out["braces"][path] = (start, end - 1)
        out["events"].append((end - 1, "task", path))
        return end

    def thread_member(key, kc, vc):
        end = task(vc, ()) if key == "reasoning" else _DEC.raw_decode(text, vc)[1]
        out["thread"][key] = (kc, end - 1)
        return end

    start = skip(0)
    end = drive(members(start), thread_member)
    out["thread"]["thread"] = (start, end - 1)
    out["events"].append((end - 1, "done", None))
    assert text[end:].strip(WS) == ""
    return out


def token_of_chars(tokens: list[str]) -> list[int]:
    return [t for t, tok in enumerate(tokens) for _ in tok]


def expected_spans(text: str, tokens: list[str]):
    """What the tracker must report, from the reference and the char -> token map."""
    ref, tok = reference(text), token_of_chars(tokens)

    def span(c0, c1):
        return TokenSpan(tok[c0], tok[c1] + 1)

    nodes = {}
    for path, fields in ref["fields"].items():
        spans = {key: span(*chars) for key, chars in fields.items()}
        if path in ref["brackets"]:
            t_open, t_close = (tok[c] for c in ref["brackets"][path])
            spans["subtasks_body"] = TokenSpan(min(t_open + 1, t_close), t_close)
        nodes[path] = (spans, span(*ref["braces"][path]))
    thread = {key: span(*chars) for key, chars in ref["thread"].items()}
    events = [(tok[c], kind, path) for c, kind, path in sorted(ref["events"])]
    return nodes, thread, events


def feed_all(tracker: TaskTracker, tokens: list[str]) -> list[tuple[int, object]]:
    got = []
    for t, text in enumerate(tokens):
        got += [(t, e) for e in tracker.feed(text)]
    return got


def kind_of(event) -> tuple[str, object]:
    if isinstance(event, ToolCallReady):
        return "tool", event.node_path
    if isinstance(event, ListClosed):
        return "list", event.node_path
    if isinstance(event, TaskClosed):
        return "task", event.node_path
    if isinstance(event, FieldDone):
        return "field", (event.node_path, event.field)
    assert isinstance(event, ThreadDone)
    return "done", None


def check_thread(text: str, tokens: list[str], max_depth: int = 3) -> TaskTracker:
    """Feed `tokens` (which spell `text`) and check the tree, every span and every event against the reference."""
    assert "".join(tokens) == text
    tracker = TaskTracker(max_depth)
    got = feed_all(tracker, tokens)
    nodes, thread, events = expected_spans(text, tokens)
    value = json.loads(text)

    assert tracker.done and tracker.tokens == len(tokens)
    assert tracker.answer == value["answer"]
    assert tracker.spans == thread
    assert set(tracker.nodes) == set(nodes)
    for path, (spans, whole) in nodes.items():
        node = tracker.nodes[path]
        assert node.spans == spans, path
        assert node.span == whole and node.closed
        assert node.depth == len(path) + 1
        task = value["reasoning"]
        for k in path:
            task = task["subtasks"][k]
        assert (node.thought, node.conclusion) == (task["thought"], task["conclusion"])
        tool = task.get("tooluse", {})
        assert (node.tool_name, node.parameters) == (tool.get("tool_name"), tool.get("parameters"))
        assert node.tool_result == tool.get("tool_result")
        assert len(node.children) == len(task.get("subtasks", []))
        assert [c.path for c in node.children] == [path + (k,) for k in range(len(node.children))]
    assert tracker.root is tracker.nodes[()]

    assert [(t, *kind_of(e)) for t, e in got] == events
    tok = token_of_chars(tokens)
    starts = [sum(map(len, tokens[:t])) for t in range(len(tokens) + 1)]
    ref = reference(text)
    for t, e in got:
        if isinstance(e, ToolCallReady):
            c = ref["params_end"][e.node_path]
            assert tok[c] == t and e.after == text[c + 1:starts[t + 1]]
            assert e.tool_name == tracker.nodes[e.node_path].tool_name
            assert e.parameters == tracker.nodes[e.node_path].parameters
        elif isinstance(e, ListClosed):
            assert e.body == tracker.nodes[e.node_path].spans["subtasks_body"] and e.body.end == t
        elif isinstance(e, ThreadDone):
            assert e.answer == value["answer"]
        elif isinstance(e, FieldDone):
            assert e.value == getattr(tracker.nodes[e.node_path], e.field)
    return tracker


# ---------------------------------------------------------------------------------------------------------
# Tokenizations.


def one_char(text: str) -> list[str]:
    return list(text)


def structural(text: str) -> list[str]:
    """Runs of structural characters as one token ('"},', '}]}', '": "'), everything else in words."""
    return re.findall(r'[\s{}\[\]:,"]+|[^\s{}\[\]:,"]+', text)


def chunks(text: str, size: int) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


def split_at(text: str, cuts: list[int]) -> list[str]:
    """Cut at each index (repeats give empty tokens)."""
    bounds = [0, *sorted(cuts), len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


@pytest.mark.parametrize("tokenize", [one_char, structural, lambda s: chunks(s, 7), lambda s: [s]],
                         ids=["one-char", "structural", "chunks-7", "whole"])
@pytest.mark.parametrize("text", [SCRIPT_TEXT, dumps(SCRIPT, random.Random(1), True),
                                  dumps(SCRIPT, random.Random(2), False), RAW_TEXT],
                         ids=["compact", "spaced-ascii", "spaced-utf8", "raw"])
def test_scripted_threads_every_tokenization(text, tokenize):
    check_thread(text, tokenize(text))


def test_tokenizations_give_the_same_tree():
    def tree(tracker):
        return {p: (n.thought, n.tool_name, n.parameters, n.tool_result, n.conclusion, len(n.children))
                for p, n in tracker.nodes.items()}

    trees = [tree(check_thread(SCRIPT_TEXT, tok(SCRIPT_TEXT))) for tok in (one_char, structural, lambda s: [s])]
    assert trees[0] == trees[1] == trees[2]
    assert tree(check_thread(SCRIPT_TEXT, split_at(SCRIPT_TEXT, [5, 5, 5, 90]))) == trees[0]  # empty tokens too


def test_list_and_task_close_order():
    got = feed_all(TaskTracker(), structural(SCRIPT_TEXT))
    lists = [e.node_path for _, e in got if isinstance(e, ListClosed)]
    assert lists == [(0,), (1,), ()]  # a nested list closes before the list holding it
    tasks = [e.node_path for _, e in got if isinstance(e, TaskClosed)]
    assert tasks == [(0, 0), (0, 1), (0,), (1, 0), (1,), (2,), ()]
    tools = [e.node_path for _, e in got if isinstance(e, ToolCallReady)]
    assert tools == [(), (0,), (0, 0), (1, 0)]
    assert isinstance(got[-1][1], ThreadDone) and got[-1][1].answer == "42"


def test_events_share_a_token_in_character_order():
    tracker = TaskTracker()
    tracker.feed('{"reasoning": {"thought": "t", "subtasks": [{"thought": "a", "conclusion": "b')
    assert tracker.feed('"}]') == [FieldDone((0,), "conclusion", "b"), TaskClosed((0,)),
                                   ListClosed((), TokenSpan(1, 1))]
    assert tracker.feed(', "conclusion": "c"}, "answer": 1}') == [FieldDone((), "conclusion", "c"), TaskClosed(()),
                                                                   ThreadDone(1)]
    assert tracker.nodes[()].spans["subtasks_body"] == TokenSpan(1, 1)  # "[" and "]" in tokens 0, 1: empty


def test_empty_list_body_and_empty_tokens():
    tracker = TaskTracker()
    tokens = ['{"reasoning": {"thought": "t", "subtasks": [', "", " ", "]", "", ', "conclusion": "c"}, "answer": 0}']
    events = feed_all(tracker, tokens)
    assert (3, ListClosed((), TokenSpan(1, 3))) in events  # tokens 1 and 2 lie wholly inside the brackets
    tracker = TaskTracker()
    assert ListClosed((), TokenSpan(0, 0)) in tracker.feed('{"reasoning": {"thought": "t", "subtasks": []')


@st.composite
def threads(draw):
    """A random valid thread (depth <= 3, tool calls anywhere) written with random whitespace."""
    text = st.text(max_size=8)
    leaf = st.none() | st.booleans() | st.integers(-10**20, 10**20) | \
        st.floats(allow_nan=False, allow_infinity=False) | text
    values = st.recursive(leaf, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
                          max_leaves=6)

    def task(depth):
        out = {"thought": draw(text)}
        if draw(st.booleans()):
            out["tooluse"] = {"tool_name": draw(text), "parameters": draw(st.dictionaries(text, values, max_size=3)),
                              "tool_result": draw(values)}
        if depth < 3 and draw(st.integers(0, 2)) == 0:
            out["subtasks"] = [task(depth + 1) for _ in range(draw(st.integers(0, 3)))]
        out["conclusion"] = draw(text)
        return out

    thread = {"reasoning": task(1), "answer": draw(values)}
    return thread, dumps(thread, random.Random(draw(st.integers(0, 2**32))), draw(st.booleans()))


@settings(max_examples=60, deadline=None)
@given(threads(), st.data())
def test_random_threads_random_splits(thread, data):
    _, text = thread
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=len(text) // 2 + 1))
    check_thread(text, split_at(text, cuts))


# ---------------------------------------------------------------------------------------------------------
# The runtime loop: tool results injected, lists pruned, the cache kept in step.


def run_like_the_runtime(script: str, result_text, rng: random.Random, size: int):
    """Generate `script` in random tokens, but inject each tool result through tool_result_text (the model's
    token holding the parameters' "}" ends somewhere inside `, "tool_result": <value>`), prune with a
    PruneBuffer of `size` and keep a cache (a list of token texts) in step through RemovedSpans."""
    ref = reference(script)
    calls = sorted((c, path) for path, c in ref["params_end"].items())
    tracker, buffer, removed = TaskTracker(), PruneBuffer(size), RemovedSpans()
    stream, cache = [], []
    pos = 0
    while not tracker.done:
        end = min(len(script), pos + rng.randint(0, 6))
        for c, path in calls:
            if pos <= c < end:  # the model's token stops at most at the end of the result's value
                end = rng.randint(c + 1, ref["result"][path][1])
        token, pos = script[pos:end], end
        events = tracker.feed(token)
        stream.append(token)
        cache.append(token)
        for event in events:
            if isinstance(event, ToolCallReady):
                value_start, value_end = ref["result"][event.node_path]
                result = result_text(json.loads(script[value_start:value_end]))
                text = tool_result_text(event.after, result)
                assert json.loads("{" + (event.after + text).lstrip(WS)[1:] + "}") == \
                    {"tool_result": json.loads(result)}
                for piece in split_at(text, [rng.randint(0, len(text)) for _ in range(rng.randint(0, 4))]):
                    assert tracker.feed(piece) == []
                    stream.append(piece)
                    cache.append(piece)
                pos = value_end  # the model goes on after the result
            elif isinstance(event, ListClosed):
                for body in buffer.on_list_closed(event.node_path, event.body):
                    cut = removed.remove(body)
                    if cut is not None:
                        del cache[cut.start:cut.end]
    kept = [t for t in range(len(stream)) if t not in removed]
    assert cache == [stream[t] for t in kept]
    assert [removed.position(t) for t in kept] == list(range(len(kept)))
    return tracker, stream, buffer


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32), st.sampled_from([0, 1, 2]), st.booleans())
def test_runtime_loop_with_injected_results(seed, size, spaced):
    rng = random.Random(seed)
    script = dumps(SCRIPT, rng, False) if spaced else SCRIPT_TEXT
    # the result handed to tool_result_text is written with other whitespace than the script's
    tracker, stream, buffer = run_like_the_runtime(script, lambda v: dumps(v, rng, False), rng, size)
    check_thread("".join(stream), stream)
    assert {p: n.tool_result for p, n in tracker.nodes.items()} == \
        {p: n.tool_result for p, n in check_thread(SCRIPT_TEXT, [SCRIPT_TEXT]).nodes.items()}
    assert [p.path for p in buffer.pruned] == [(0,), (1,), ()][:3 - size]


def test_tool_result_text():
    assert tool_result_text("", "42") == ', "tool_result": 42'
    assert tool_result_text(",", ' {"a": 1} ') == ' "tool_result": {"a": 1}'
    assert tool_result_text(' ,\n"tool_', "null") == 'result": null'
    assert tool_result_text(', "tool_result" :', '"x"') == ' "x"'
    assert tool_result_text(', "tool_result": 1', "12") == "2"
    assert tool_result_text(', "tool_result": "a b', '"a b c"') == ' c"'
    assert tool_result_text(', "tool_result": [1 ,', "[1, 2]") == " 2]"
    for after, result in [("}", "1"), (', "tool_result": 4', "5"), (', "tool_result": 1 ', "12"),
                          (', "tool_result": "a  b', '"a b"'), (', "tool_result": 2}', "2"), (', "tool_name"', "1")]:
        with pytest.raises(TimFormatError, match="after the parameters"):
            tool_result_text(after, result)
    for result in ["", "nope", "[1,]", "NaN", "1 2", '"unterminated', "{'a': 1}"]:
        with pytest.raises(TimFormatError, match="result"):
            tool_result_text("", result)


def test_tool_call_ready_after_holds_the_rest_of_the_token():
    tracker = TaskTracker()
    tracker.feed('{"reasoning": {"thought": "t", "tooluse": {"tool_name": "calc", "parameters": {"x": "}"')
    events = tracker.feed('}, "')
    assert events == [ToolCallReady((), "calc", {"x": "}"}, ', "')]
    for piece in chunks(tool_result_text(', "', '{"ok": [true]}'), 3):
        assert tracker.feed(piece) == []
    tracker.feed('}, "conclusion": "c"}, "answer": null}')
    assert tracker.done and tracker.nodes[()].tool_result == {"ok": [True]} and tracker.answer is None


# ---------------------------------------------------------------------------------------------------------
# Malformed output: a TimFormatError naming the token (and the char in it) that broke the thread.

OPEN = '{"reasoning": {"thought": "t", '
TOOL = OPEN + '"tooluse": {"tool_name": "s", '
DONE = OPEN + '"conclusion": "c"}, "answer": "x"}'
MALFORMED = [
    # (case, text before the bad char, the rest starting at it, words the message must hold)
    ("unknown key", OPEN + '"', 'x": 1', 'expected "tooluse", "subtasks" or "conclusion" after the thought, got "x..."'),
    ("prefix of a key", OPEN + '"tool', '": 1', '"tool" (no key of the format)'),
    ("key of another object", OPEN + '"answer', '": 1', '"answer" (it belongs in the thread object)'),
    ("unknown thread key", '{"', 'foo": 1', '"reasoning" at the start of the thread'),
    ("keys out of order", OPEN + '"subtasks": [], "tooluse', '": {}', "keys come in the order"),
    ("key twice", OPEN + '"thought', '": "u"', '"tooluse", "subtasks" or "conclusion" after the thought, got "thought"'),
    ("missing thought", '{"reasoning": {"conclusion', '": "c"}', '"thought" must come before it'),
    ("missing conclusion", '{"reasoning": {"thought": "t"', '}', '"," after the thought ("conclusion" is missing)'),
    ("missing conclusion after subtasks", OPEN + '"subtasks": []', '}', '("conclusion" is missing)'),
    ("missing answer", OPEN + '"conclusion": "c"}', '}', '"," after the reasoning ("answer" is missing)'),
    ("subtasks at max depth", OPEN + '"subtasks": [{"thought": "a", "subtasks": [{"thought": "b", "subtasks',
     '": []', "a task at depth 3, the max depth, has no subtasks"),
    ("non-string thought", '{"reasoning": {"thought": ', '5, ', 'expected a string (the thought), got "5"'),
    ("non-string conclusion", OPEN + '"conclusion": ', 'null}', "a string (the conclusion)"),
    ("text after the thread", DONE + " \n\t", "x", "only whitespace after the thread closed"),
    ("second thread", DONE + "\n", "{", "only whitespace after the thread closed"),
    ("tool_result before parameters", TOOL + '"tool_result', '": 1', '"parameters" must come before it'),
    ("missing tool_result", TOOL + '"parameters": {}', '}', '("tool_result" is missing)'),
    ("parameters not an object", TOOL + '"parameters": ', '[1]', '"{" to open the parameters'),
    ("bad value in parameters", TOOL + '"parameters": {"q": ', "'x'}", "a JSON value in the parameters"),
    ("missing colon in parameters", TOOL + '"parameters": {"q" ', "1}", '":" after a key in the parameters'),
    ("trailing comma in parameters", TOOL + '"parameters": {"q": 1,', "}", "a key (a string) in the parameters"),
    ("leading zero", TOOL + '"parameters": {"q": 0', "1}", "no digit after a leading 0"),
    ("bare minus", TOOL + '"parameters": {"q": -', "x}", 'a digit after "-"'),
    ("fraction without digits", TOOL + '"parameters": {"q": 1.', "}", "a digit of a number"),
    ("exponent without digits", TOOL + '"parameters": {"q": 1e+', "}", "a digit of a number"),
    ("bad literal", TOOL + '"parameters": {"q": tr', "ie}", '"u" (of true, false or null)'),
    ("bad escape", TOOL + '"parameters": {"q": "a\\', 'x"}', "an escape"),
    ("bad unicode escape", TOOL + '"parameters": {"q": "\\u12', 'g4"}', "a hex digit"),
    ("raw newline in a string", TOOL + '"parameters": {"q": "a', '\n"}', "control characters are escaped"),
    ("unclosed array", TOOL + '"parameters": {"q": [1 ', "}", '"," or "]" in the parameters'),
    ("bad tool result", TOOL + '"parameters": {}, "tool_result": ', "]", "a JSON value in the tool result"),
    ("NaN tool result", TOOL + '"parameters": {}, "tool_result": ', "NaN}", "a JSON value in the tool result"),
    ("bad answer", OPEN + '"conclusion": "c"}, "answer": [1 ', "2]}", '"," or "]" in the answer'),
    ("number then garbage", OPEN + '"conclusion": "c"}, "answer": 12', "x}", '"}" after the answer'),
    ("escaped key", '{"reasoning": {"th', '\\u006fught": "t"', "written without escapes"),
    ("not a list", OPEN + '"subtasks": ', "{}", '"[" to open the subtasks'),
    ("not a task in a list", OPEN + '"subtasks": [', '"a"]', '"{" (a subtask) or "]"'),
    ("no thread", "  ", "[", '"{" to open the thread'),
    ("reasoning not an object", '{"reasoning": ', '"t"', '"{" to open the reasoning task'),
]


@pytest.mark.parametrize("case, before, rest, words", MALFORMED, ids=[m[0] for m in MALFORMED])
@pytest.mark.parametrize("size", [1, 5])
def test_malformed_output_names_the_token(case, before, rest, words, size):
    text = before + rest
    tokens = chunks(text, size)
    tracker = TaskTracker()
    with pytest.raises(TimFormatError) as info:
        for token in tokens:
            tracker.feed(token)
    err = info.value
    assert (err.token, err.char) == divmod(len(before), size), str(err)
    assert words in str(err)
    assert str(err).startswith(f"token {err.token} (char {err.char} of it): expected ")
    assert "\n" not in str(err)
    assert isinstance(err, KVTierError) and isinstance(err, ValueError)
    with pytest.raises(TimFormatError) as again:  # a dead tracker stays dead
        tracker.feed(" ")
    assert again.value is err


def test_max_depth_is_checked():
    for bad in (0, -1, 2.0, True, "3"):
        with pytest.raises(CacheInputError, match="`max_depth` must be an int >= 1"):
            TaskTracker(bad)
    check_thread(DONE, one_char(DONE), max_depth=1)


def test_whitespace_after_the_thread_is_fine():
    tracker = TaskTracker()
    feed_all(tracker, [DONE, " \n", "", "\t\r"])
    assert tracker.done and tracker.answer == "x"


# ---------------------------------------------------------------------------------------------------------
# The pruning buffer and the position map.


def closed_lists(text: str) -> list[ListClosed]:
    return [e for _, e in feed_all(TaskTracker(), structural(text)) if isinstance(e, ListClosed)]


def test_prune_buffer_sizes_on_nested_lists():
    lists = closed_lists(SCRIPT_TEXT)  # (0,) and (1,) lie inside () ; they close first
    bodies = {e.node_path: e.body for e in lists}
    expected = {0: [[(0,)], [(1,)], [()]], 1: [[], [(0,)], [(1,)]], 2: [[], [], [(0,)]], 3: [[], [], []]}
    for size, removals in expected.items():
        buffer = PruneBuffer(size)
        got = [buffer.on_list_closed(e.node_path, e.body) for e in lists]
        assert got == [[bodies[p] for p in paths] for paths in removals], size
        assert [p.path for p in buffer.pruned] == [p for paths in removals for p in paths]
        assert len(buffer.buffered) == min(size, 3)
    buffer = PruneBuffer(0)
    for e in lists:
        buffer.on_list_closed(e.node_path, e.body)
    # the outer body is returned whole though its nested lists went before it; at_token is the "]" token
    assert buffer.pruned[-1] == PrunedList((), bodies[()], bodies[()].end)
    assert bodies[(0,)].start >= bodies[()].start and bodies[(0,)].end <= bodies[()].end


def test_pruning_a_list_drops_the_lists_inside_it():
    buffer = PruneBuffer(1)
    assert buffer.on_list_closed((1,), TokenSpan(50, 60), at_token=61) == []
    # reported out of close order: the outer list is older than a list inside it
    assert buffer.on_list_closed((), TokenSpan(10, 80), at_token=81) == [TokenSpan(50, 60)]
    assert buffer.on_list_closed((0, 2), TokenSpan(20, 30), at_token=90) == [TokenSpan(10, 80)]
    assert buffer.buffered == ()  # (0, 2) went with ()
    assert buffer.pruned == [PrunedList((1,), TokenSpan(50, 60), 81), PrunedList((), TokenSpan(10, 80), 90)]


def test_prune_buffer_size_is_checked():
    for bad in (-1, 1.5, True, "2", None):
        with pytest.raises(CacheInputError, match="`size` must be an int >= 0"):
            PruneBuffer(bad)
    assert PruneBuffer().size == 2


def test_removed_spans_basics():
    removed = RemovedSpans()
    assert removed.remove(TokenSpan(4, 8)) == TokenSpan(4, 8)
    assert removed.position(9) == 5 and removed.removed == 4 and 5 in removed and 8 not in removed
    assert removed.remove(TokenSpan(2, 10)) == TokenSpan(2, 6)  # 2, 3, 8, 9 were left, at 2..5
    assert removed.remove(TokenSpan(5, 7)) is None and removed.remove(TokenSpan(3, 3)) is None
    assert removed.position(10) == 2
    with pytest.raises(CacheInputError, match="stream token 6 has no position: it was removed"):
        removed.position(6)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40)), max_size=12))
def test_removed_spans_map_to_contiguous_ranks(pairs):
    removed, gone = RemovedSpans(), set()
    for a, b in pairs:
        span = TokenSpan(min(a, b), max(a, b))
        kept_before = [t for t in range(45) if t not in gone]
        inside = [kept_before.index(t) for t in range(span.start, span.end) if t not in gone]
        got = removed.remove(span)
        if inside:
            assert got == TokenSpan(inside[0], inside[-1] + 1) and inside == list(range(got.start, got.end))
        else:
            assert got is None
        gone |= set(range(span.start, span.end))
        kept = [t for t in range(45) if t not in gone]
        assert [removed.position(t) for t in kept] == list(range(len(kept)))
        assert removed.removed == len(gone)
        assert all((t in removed) == (t in gone) for t in range(45))


def test_token_span_is_checked():
    assert TokenSpan(3, 5).length == 2 and 4 in TokenSpan(3, 5) and 5 not in TokenSpan(3, 5)
    for bad in ((5, 3), (-1, 2), (0.0, 1)):
        with pytest.raises(CacheInputError):
            TokenSpan(*bad)


# ---------------------------------------------------------------------------------------------------------
# FieldDone: a task's thought and conclusion, reported as each completes (what `kvtier tim` prints).


def test_field_done_reports_each_thought_and_conclusion_depth_first():
    got = [e for _, e in feed_all(TaskTracker(), structural(SCRIPT_TEXT))]
    expected = []

    def walk(task, path):
        expected.append(FieldDone(path, "thought", task["thought"]))
        for k, sub in enumerate(task.get("subtasks", [])):
            walk(sub, path + (k,))
        expected.append(FieldDone(path, "conclusion", task["conclusion"]))

    walk(SCRIPT["reasoning"], ())
    assert [e for e in got if isinstance(e, FieldDone)] == expected
    for i, e in enumerate(got):
        if isinstance(e, TaskClosed):  # the conclusion is a task's last field: its "}" comes next
            assert got[i - 1] == FieldDone(e.node_path, "conclusion", got[i - 1].value)
        elif isinstance(e, ToolCallReady):  # after its task's thought
            assert any(x == FieldDone(e.node_path, "thought", x.value) for x in got[:i] if isinstance(x, FieldDone))


def test_field_done_comes_with_the_token_holding_the_closing_quote_and_decodes_escapes():
    tracker = TaskTracker()
    assert tracker.feed('{"reasoning": {"thought": "a\\') == []
    assert tracker.feed('"b\\u00e9') == []
    assert tracker.feed('", "subtasks": [{"thought": ""') == [FieldDone((), "thought", 'a"b\u00e9'),
                                                              FieldDone((0,), "thought", "")]
    assert tracker.feed(', "conclusion": "\\n"}], "conclusion": "') == [FieldDone((0,), "conclusion", "\n"),
                                                                        TaskClosed((0,)),
                                                                        ListClosed((), TokenSpan(3, 3))]
    assert tracker.feed('done"}, "answer": "done"}') == [FieldDone((), "conclusion", "done"), TaskClosed(()),
                                                          ThreadDone("done")]
    events = [e for _, e in feed_all(TaskTracker(), one_char(RAW_TEXT)) if isinstance(e, FieldDone)]
    assert events == [FieldDone((), "thought", "a/b ]} \U0001f600"), FieldDone((), "conclusion", "")]


def test_tool_fields_and_results_report_no_field_done():
    tracker = TaskTracker()
    tracker.feed(TOOL + '"parameters": {"thought": "x"')
    events = tracker.feed('}')
    assert events == [ToolCallReady((), "s", {"thought": "x"}, "")]
    for piece in chunks(tool_result_text("", '{"conclusion": "no"}'), 4):
        assert tracker.feed(piece) == []
