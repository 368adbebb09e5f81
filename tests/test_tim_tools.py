"""TIM threads: tools (schema derivation, a registry whose call never raises, the calculator), the thread schema,
and schema-constrained decoding with xgrammar on real tokenizers (random logits always give a valid thread)."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path
from typing import Literal, Optional

import pytest
import torch
import transformers as tf
from tiny import build_tokenizer

from kvtier.errors import KVTierError
from kvtier.tim.constrain import ConstraintError, SchemaConstraint, _vocab
from kvtier.tim.schema import JSON_SEPARATORS, dump_json, thread_schema
from kvtier.tim.tools import (
    MAX_ABANDONED_CALLS,
    MAX_EXPRESSION_LENGTH,
    Tool,
    ToolRegistry,
    ToolSpecError,
    calculate,
    calculator,
    parameters_schema,
    schema_errors,
    tool,
)

CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "retrieval-llama"


# ---- tools ----

def lookup(city: str, days: int, scale: float = 1.0, metric: bool = True, tags: list[str] | None = None,
           weights: dict[str, float] | None = None, note: Optional[str] = None,
           unit: Literal["c", "f"] = "c") -> dict:
    """Weather for a city.

    More text that is not part of the description."""
    return {"city": city, "days": days, "scale": scale, "unit": unit}


def test_schema_from_type_hints():
    t = tool(lookup)
    assert (t.name, t.description) == ("lookup", "Weather for a city.")
    s = t.parameters
    assert s["type"] == "object" and s["additionalProperties"] is False
    assert s["required"] == ["city", "days"]  # parameters with defaults are not required
    p = s["properties"]
    assert list(p) == ["city", "days", "scale", "metric", "tags", "weights", "note", "unit"]
    assert p["city"] == {"type": "string"} and p["days"] == {"type": "integer"}
    assert p["scale"] == {"type": "number"} and p["metric"] == {"type": "boolean"}
    assert p["tags"] == {"anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "null"}]}
    assert p["weights"]["anyOf"][0] == {"type": "object", "additionalProperties": {"type": "number"}}
    assert p["note"] == {"anyOf": [{"type": "string"}, {"type": "null"}]}
    assert p["unit"] == {"enum": ["c", "f"]}


def test_tool_decorator_forms_and_overrides():
    @tool
    def plain(x: int) -> int:
        return x

    @tool(name="renamed", description="d", timeout=0.5)
    def other(x: int) -> int:
        return x

    assert isinstance(plain, Tool) and plain.name == "plain" and plain.timeout == 10.0
    assert (other.name, other.description, other.timeout) == ("renamed", "d", 0.5)
    given = {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}
    assert tool(lambda q: q, name="echo", parameters=given).parameters is given


@pytest.mark.parametrize("make, match", [
    (lambda: tool(lambda *xs: 0, name="star"), "variadic positional"),
    (lambda: tool(lambda x, /: 0, name="pos"), "positional-only"),
    (lambda: tool(lambda x: 0, name="bad name"), "tool name"),
    (lambda: tool(lambda x: 0, name=""), "tool name"),
    (lambda: tool(lambda x: 0, name='a"b'), "tool name"),
    (lambda: tool(lambda x: 0, name="t", parameters={"type": "array"}), "type 'object'"),
    (lambda: tool(lambda x: 0, name="t", parameters={"type": "object", "required": ["y"]}), "required"),
    (lambda: tool(lambda x: 0, name="t", timeout=0), "timeout"),
])
def test_bad_tool_definitions_raise(make, match):
    with pytest.raises(ToolSpecError, match=match):
        make()


def test_parameter_without_hint_takes_any_json():
    assert parameters_schema(lambda x: 0) == {"type": "object", "properties": {"x": {}}, "required": ["x"],
                                              "additionalProperties": False}


def test_unsupported_hint_names_the_parameter():
    def f(xs: set[int]) -> int:
        return 0

    with pytest.raises(ToolSpecError, match=r"f\(xs\)"):
        tool(f)
    assert issubclass(ToolSpecError, KVTierError)


def test_registry_validates_names():
    def add(a: int, b: int) -> int:
        return a + b

    reg = ToolRegistry([calculator, add])  # a plain function is wrapped with tool()
    assert reg.names == ("calculator", "add") and "add" in reg and len(reg) == 2
    with pytest.raises(ToolSpecError, match="unique"):
        ToolRegistry([add, tool(add)])
    assert len(ToolRegistry()) == 0


def test_call_returns_json_in_the_thread_form():
    reg = ToolRegistry([lookup])
    out = reg.call("lookup", {"city": "Oslo", "days": 2, "tags": ["a", "b"]})
    assert out.ok and out.name == "lookup" and out.seconds >= 0
    assert out.result_json == '{"city": "Oslo", "days": 2, "scale": 1.0, "unit": "c"}'
    assert out.result_json == json.dumps(json.loads(out.result_json), separators=JSON_SEPARATORS)


def _error(out) -> str:
    assert not out.ok
    body = json.loads(out.result_json)
    assert list(body) == ["error"]
    return body["error"]


def test_unknown_tool_names_the_known_ones():
    msg = _error(ToolRegistry([calculator, lookup]).call("weather", {}))
    assert "weather" in msg and "calculator, lookup" in msg


@pytest.mark.parametrize("params, fragment", [
    ({"days": 2}, "missing required key 'city'"),
    ({"city": "x", "days": "2"}, "parameters.days: expected integer, got string"),
    ({"city": "x", "days": True}, "expected integer, got boolean"),
    ({"city": "x", "days": 2, "color": "red"}, "unexpected key 'color'"),
    ({"city": "x", "days": 2, "unit": "k"}, "parameters.unit"),
    ({"city": "x", "days": 2, "tags": ["a", 3]}, "parameters.tags"),
    (["x", 2], "expected object, got array"),
    (None, "expected object, got null"),
])
def test_bad_parameters_are_an_error_result(params, fragment):
    msg = _error(ToolRegistry([lookup]).call("lookup", params))
    assert "bad parameters for 'lookup'" in msg and fragment in msg


def test_a_schema_with_odd_keywords_is_an_error_result():
    odd = tool(lambda q: q, name="odd", parameters={"type": "object", "properties": {"q": {"maxLength": "ten"}}})
    assert "cannot check the parameters" in _error(ToolRegistry([odd]).call("odd", {"q": "x"}))


def test_schema_errors_accepts_valid_values():
    s = parameters_schema(lookup)
    assert schema_errors({"city": "x", "days": 1, "scale": 2, "note": None, "weights": {"a": 0.5}}, s) is None


def test_exception_is_reported_without_traceback():
    def broken(x: int) -> int:
        raise ValueError("boom\nsecond line")

    msg = _error(ToolRegistry([broken]).call("broken", {"x": 1}))
    assert msg.startswith("tool 'broken' failed: ValueError: boom") and "Traceback" not in msg and "File " not in msg


def test_timeout_abandons_the_call_and_the_registry_goes_on():
    release = threading.Event()

    @tool(timeout=0.2)
    def hang() -> str:
        release.wait(5)
        return "late"

    reg = ToolRegistry([hang, calculator])
    start = time.perf_counter()
    out = reg.call("hang", {})
    assert time.perf_counter() - start < 2
    assert "timed out after 0.2 s" in _error(out) and 0.2 <= out.seconds < 2
    assert reg.call("calculator", {"expression": "6*7"}).result_json == "42"  # the run continues
    release.set()  # let the abandoned thread finish


def test_a_tool_whose_calls_keep_hanging_is_no_longer_called_until_one_returns():
    """One abandoned thread per timed-out call, at most MAX_ABANDONED_CALLS of them per tool."""
    release = threading.Event()
    started = []

    @tool(timeout=0.05)
    def hang() -> str:
        started.append(1)
        release.wait(10)
        return "late"

    reg = ToolRegistry([hang, calculator])
    for _ in range(MAX_ABANDONED_CALLS):
        assert "timed out" in _error(reg.call("hang", {}))
    refused = reg.call("hang", {})
    assert _error(refused) == (f"tool 'hang' was not called: {MAX_ABANDONED_CALLS} of its earlier calls are still "
                               "running past their timeout") and refused.seconds < 0.05
    assert len(started) == MAX_ABANDONED_CALLS  # the refused call started no thread
    assert reg.call("calculator", {"expression": "6*7"}).result_json == "42"  # other tools go on
    release.set()
    deadline = time.perf_counter() + 5
    while reg.call("hang", {}).ok is False and time.perf_counter() < deadline:  # the hung calls return
        time.sleep(0.01)
    assert reg.call("hang", {}).result_json == '"late"'


@pytest.mark.parametrize("value, fragment", [({1, 2}, "TypeError"), (float("nan"), "ValueError"),
                                             (object(), "TypeError")])
def test_result_json_cannot_hold_is_an_error(value, fragment):
    msg = _error(ToolRegistry([tool(lambda: value, name="odd")]).call("odd", {}))
    assert "returned a value JSON cannot hold" in msg and fragment in msg


def test_an_error_whose_message_itself_fails_is_still_an_error_result():
    """str() of the tool's exception raised (or gave no str): call() raised, and the run died of a tool."""
    class Unprintable(Exception):
        def __str__(self):
            raise RuntimeError("no message")

    class NotText(Exception):
        def __str__(self):
            return 5

    for error in (Unprintable, NotText):
        def broken():
            raise error()

        msg = _error(ToolRegistry([tool(broken, name="broken")]).call("broken", {}))
        assert msg == f"tool 'broken' failed: {error.__name__}"


@pytest.mark.parametrize("expr, expected", [
    ("1 + 2 * 3", 7), ("(1 + 2) * 3", 9), ("7 / 2", 3.5), ("7 // 2", 3), ("-7 % 3", 2), ("2 ** 10", 1024),
    ("-2 ** 2", -4), ("+-+3", -3), ("sqrt(16)", 4.0), ("abs(-2.5)", 2.5), ("round(2.567, 2)", 2.57),
    ("max(1, 5, 3) + min(4, 2)", 7), ("floor(2.7) + ceil(2.1)", 5), ("log(8, 2)", 3.0), ("2 ** -1", 0.5),
    ("1_000 * 3", 3000), ("2 ** 4000 // 2 ** 3999", 2),
])
def test_calculator_evaluates(expr, expected):
    assert calculate(expr) == pytest.approx(expected)
    out = ToolRegistry([calculator]).call("calculator", {"expression": expr})
    assert out.ok and json.loads(out.result_json) == pytest.approx(expected)


@pytest.mark.parametrize("expr, fragment", [
    ("9**9**9**9", "too large"), ("2**2**2**2**2", "too large"), ("(10**1000)**10", "too large"),
    ("99999**99999", "too large"), ("2.0**5000", "out of range"), ("exp(1000)", "out of range"),
    ("1e308 * 10", "not a finite number"), ("(-8) ** 0.5", "not a real number"),
    ("__import__('os').system('true')", "not allowed"), ("open('/etc/passwd')", "function 'open'"),
    ("(1).__class__", "Attribute"), ("x + 1", "name 'x'"), ("[1, 2]", "List"), ("lambda: 1", "Lambda"),
    ("'a' * 3", "Constant"), ("True + 1", "Constant"), ("1j", "Constant"), ("sqrt(x=4)", "positional"),
    ("1 if 1 else 2", "IfExp"), ("1 << 100000", "BinOp"), ("(" * 100, "not an arithmetic expression"),
    ("1 +", "not an arithmetic expression"), ("9" * (MAX_EXPRESSION_LENGTH + 1), "201 characters"),
    ("round(1.5, 10**6)", "digits"),
])
def test_calculator_refuses_hostile_expressions_quickly(expr, fragment):
    start = time.perf_counter()
    with pytest.raises(ValueError, match=None) as info:
        calculate(expr)
    assert fragment in str(info.value) and time.perf_counter() - start < 0.5
    msg = _error(ToolRegistry([calculator]).call("calculator", {"expression": expr}))
    assert fragment in msg


def test_calculator_division_by_zero_is_an_error_result():
    out = ToolRegistry([calculator]).call("calculator", {"expression": "1/0"})
    assert "ZeroDivisionError: division by zero" in _error(out)


# ---- the thread schema ----

def _walk_tasks(task_schema: dict, depth: int = 1):
    yield depth, task_schema
    sub = task_schema["properties"].get("subtasks")
    if sub is not None:
        yield from _walk_tasks(sub["items"], depth + 1)


@pytest.mark.parametrize("max_depth", [1, 2, 3, 5])
@pytest.mark.parametrize("with_tools", [False, True])
def test_thread_schema_structure(max_depth, with_tools):
    reg = ToolRegistry([calculator, lookup]) if with_tools else None
    s = thread_schema(reg, max_depth=max_depth)
    assert list(s["properties"]) == ["reasoning", "answer"] and s["properties"]["answer"] == {}
    assert s["required"] == ["reasoning", "answer"] and s["additionalProperties"] is False
    tasks = list(_walk_tasks(s["properties"]["reasoning"]))
    assert [d for d, _ in tasks] == list(range(1, max_depth + 1))
    for depth, t in tasks:
        keys = ["thought", "tooluse", "subtasks", "conclusion"]
        keys = [k for k in keys if (k != "tooluse" or with_tools) and (k != "subtasks" or depth < max_depth)]
        assert list(t["properties"]) == keys
        assert t["required"] == ["thought", "conclusion"] and t["additionalProperties"] is False
        assert "maxLength" not in t["properties"]["thought"]
        if with_tools:
            forms = t["properties"]["tooluse"]["anyOf"]
            assert [f["properties"]["tool_name"]["const"] for f in forms] == ["calculator", "lookup"]
            for f, tl in zip(forms, reg):
                assert list(f["properties"]) == ["tool_name", "parameters", "tool_result"]
                assert f["properties"]["parameters"] == tl.parameters and f["additionalProperties"] is False
    json.dumps(s)  # plain JSON


def test_thread_schema_options():
    s = thread_schema(ToolRegistry([calculator]), max_string_length=16, answer={"type": "string"})
    for _, t in _walk_tasks(s["properties"]["reasoning"]):
        assert t["properties"]["thought"] == {"type": "string", "maxLength": 16} == t["properties"]["conclusion"]
        assert t["properties"]["tooluse"]["properties"]["tool_name"]["const"] == "calculator"  # one tool: no anyOf
    assert s["properties"]["answer"] == {"type": "string"}
    assert "tooluse" not in thread_schema(ToolRegistry([]))["properties"]["reasoning"]["properties"]
    for bad in ({"max_depth": 0}, {"max_depth": 1.5}, {"max_string_length": 0}, {"answer": "string"}):
        with pytest.raises(ValueError):
            thread_schema(None, **bad)


def test_dump_json_form():
    assert dump_json({"a": [1, 2.5, None], "b": "é"}) == '{"a": [1, 2.5, null], "b": "\\u00e9"}'
    with pytest.raises(ValueError):
        dump_json(float("inf"))


# ---- constrained decoding ----

try:
    import xgrammar  # noqa: F401
except ImportError:
    xgrammar = None
needs_xgrammar = pytest.mark.skipif(xgrammar is None, reason="xgrammar is not installed (pip install xgrammar==0.2.9);"
                                                             " the constrained-decoding tests need it")

PAD = 10  # the model's vocabulary is wider than the tokenizer's, as lm_heads padded to a multiple often are


@pytest.fixture(scope="module", params=["tiny-bpe", "retrieval-llama"])
def tok(request):
    return build_tokenizer() if request.param == "tiny-bpe" else tf.AutoTokenizer.from_pretrained(CHECKPOINT)


def _run_random(c: SchemaConstraint, tok, reg: ToolRegistry | None, seed: int, max_steps: int = 4000):
    """Sample from random logits under the mask, as a runtime would: when the schema forces `"tool_result": `, run
    the tool on what the model wrote and inject the forced text and the result as forced tokens."""
    g = torch.Generator().manual_seed(seed)
    ids: list[int] = []
    outcomes = []
    for _ in range(max_steps):
        if c.is_done():
            break
        forced = c.forced_text()
        if reg is not None and forced.endswith('"tool_result": '):
            head = tok.decode(ids) + forced
            call = json.loads(head[head.rindex('{"tool_name": '):-len(', "tool_result": ')] + "}")
            out = reg.call(call["tool_name"], call["parameters"])
            outcomes.append(out)
            for t in tok(forced + out.result_json, add_special_tokens=False).input_ids:
                c.accept(t)
                ids.append(t)
            continue
        logits = torch.randn(c.vocab_size + PAD, generator=g) * 3
        c.mask_logits(logits)
        assert torch.isfinite(logits[c.vocab_size:]).sum() == 0
        t = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=g))
        c.accept(t)
        ids.append(t)
    assert c.is_done(), f"no complete thread within {max_steps} tokens"
    logits = c.mask_logits(torch.randn(1, c.vocab_size + PAD, generator=g))
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == list(c.stop_token_ids)
    return tok.decode(ids), outcomes


def _check_thread(thread: dict, schema: dict, max_depth: int):
    assert schema_errors(thread, schema, "thread") is None

    def depth(task: dict, d: int = 1) -> int:
        assert list(task)[0] == "thought" and list(task)[-1] == "conclusion"
        return max([d] + [depth(s, d + 1) for s in task.get("subtasks", [])])

    assert depth(thread["reasoning"]) <= max_depth


@needs_xgrammar
@pytest.mark.parametrize("seed", range(4))
def test_random_logits_under_the_mask_give_a_valid_thread(tok, seed):
    reg = ToolRegistry([calculator, tool(lambda city, days: {"city": city, "t": days * 1.5}, name="weather",
                                         parameters={"type": "object",
                                                     "properties": {"city": {"enum": ["Oslo", "Lima"]},
                                                                    "days": {"type": "integer"}},
                                                     "required": ["city", "days"],
                                                     "additionalProperties": False})])
    schema = thread_schema(reg, max_depth=3, max_string_length=6, answer={"type": "string", "maxLength": 6})
    c = SchemaConstraint(tok, schema, vocab_size=len(tok) + PAD)
    text, outcomes = _run_random(c, tok, reg, seed)
    thread = json.loads(text)
    _check_thread(thread, schema, 3)
    assert _skeleton(text) == _skeleton(json.dumps(thread, separators=JSON_SEPARATORS))  # the grammar's whitespace is json.dumps' form
    used = [task["tooluse"] for task in _tasks(thread["reasoning"]) if "tooluse" in task]
    assert [u["tool_result"] for u in used] == [json.loads(o.result_json) for o in outcomes]


def _skeleton(text: str) -> str:
    """JSON text with every string and number replaced by a placeholder: what is left is structure and whitespace
    (the model may spell a string or a number differently from json.dumps)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)
    return re.sub(r"-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?|-?Infinity|NaN", "0", text)


def _tasks(task: dict):
    yield task
    for s in task.get("subtasks", []):
        yield from _tasks(s)


@needs_xgrammar
def test_random_logits_with_any_json_answer_and_no_tools(tok):
    schema = thread_schema(None, max_depth=2, max_string_length=4)
    c = SchemaConstraint(tok, schema)
    for seed in range(3):
        c.reset()
        text, _ = _run_random(c, tok, None, 100 + seed)
        _check_thread(json.loads(text), schema, 2)


THREAD = {"reasoning": {"thought": "add them", "tooluse": {"tool_name": "calculator",
                                                           "parameters": {"expression": "2+3"},
                                                           "tool_result": 5},
                        "subtasks": [{"thought": "check", "subtasks": [{"thought": "ok é \"q\"", "conclusion": "5"}],
                                      "conclusion": "fine"}],
                        "conclusion": "it is 5"},
          "answer": {"value": 5, "unit": None, "steps": [1.5, "x", True]}}


@needs_xgrammar
def test_forced_valid_tokens_are_accepted(tok):
    c = SchemaConstraint(tok, thread_schema(ToolRegistry([calculator]), max_depth=3))
    ids = tok(dump_json(THREAD), add_special_tokens=False).input_ids
    for i in ids:
        assert not c.is_done()
        c.accept(i)
    assert c.is_done() and c.num_accepted == len(ids)
    c.accept(c.stop_token_ids[0])
    assert c.is_done()
    with pytest.raises(ConstraintError, match="complete"):
        c.accept(ids[0])
    with pytest.raises(ConstraintError, match="complete"):
        c.mask_logits(torch.zeros(c.vocab_size))
    c.reset()
    c.accept(ids[0])  # a fresh document


@needs_xgrammar
def test_injected_tool_result_is_accepted_at_the_forced_point(tok):
    c = SchemaConstraint(tok, thread_schema(ToolRegistry([calculator]), max_depth=1))
    head = '{"reasoning": {"thought": "t", "tooluse": {"tool_name": "calculator", "parameters": {"expression": "1/0"'
    for i in tok(head, add_special_tokens=False).input_ids:
        c.accept(i)
    assert c.forced_text() == '}, "tool_result": '
    out = ToolRegistry([calculator]).call("calculator", {"expression": "1/0"})
    for i in tok(c.forced_text() + out.result_json + '}, "conclusion": "c"}, "answer": 1}',
                 add_special_tokens=False).input_ids:
        c.accept(i)
    assert c.is_done()


@needs_xgrammar
def test_forced_invalid_token_is_a_clear_error(tok):
    c = SchemaConstraint(tok, thread_schema(None, max_depth=1, max_string_length=3))
    bracket = tok("[", add_special_tokens=False).input_ids[0]
    with pytest.raises(ConstraintError, match=r"^token \d+ \('\['\) is not allowed by the schema after 0 tokens"):
        c.accept(bracket)
    head = tok('{"reasoning": {"thought": "', add_special_tokens=False).input_ids
    for i in head:
        c.accept(i)  # the rejected token left the state as it was
    special = next(i for i in tok.all_special_ids if i not in c.stop_token_ids)
    with pytest.raises(ConstraintError, match="not allowed") as info:
        c.accept(special)  # special tokens never stand for text inside a string
    assert "\n" not in str(info.value) and '"thought": ' in str(info.value)
    logits = c.mask_logits(torch.zeros(c.vocab_size))
    assert logits[special] == -torch.inf and logits[c.stop_token_ids[0]] == -torch.inf
    with pytest.raises(ConstraintError, match="outside the vocabulary"):
        c.accept(c.vocab_size)
    with pytest.raises(ConstraintError, match="too long|not allowed"):
        for i in tok("abcd", add_special_tokens=False).input_ids:  # max_string_length=3
            c.accept(i)
    assert issubclass(ConstraintError, KVTierError)


@needs_xgrammar
def test_surrogates_are_refused(tok):
    """xgrammar 0.2.9 lets ED A0..BF (a UTF-16 surrogate in UTF-8 clothing) into a string; SchemaConstraint does not."""
    c = SchemaConstraint(tok, thread_schema(None, max_depth=1))
    pieces = _vocab(tok, None, None).pieces
    lead, tail, fine = (pieces.index(bytes([b])) for b in (0xED, 0xA8, 0x9F))
    for i in tok('{"reasoning": {"thought": "', add_special_tokens=False).input_ids:
        c.accept(i)
    c.accept(lead)
    logits = c.mask_logits(torch.zeros(c.vocab_size))
    assert logits[tail] == -torch.inf and logits[fine] == 0  # ED 9F .. is U+D7C0..U+D7FF: text
    with pytest.raises(ConstraintError, match="surrogate"):
        c.accept(tail)
    c.accept(fine)


@needs_xgrammar
def test_grammar_expects_json_dumps_separators(tok):
    c = SchemaConstraint(tok, thread_schema(None, max_depth=1))
    with pytest.raises(ConstraintError):
        for i in tok('{"reasoning":{"thought":"a","conclusion":"b"},"answer":1}', add_special_tokens=False).input_ids:
            c.accept(i)
    c.reset()
    with pytest.raises(ConstraintError):
        for i in tok('{"reasoning": {"thought": "a", "conclusion": "b"}, "answer": [1,2]}',
                     add_special_tokens=False).input_ids:
            c.accept(i)


@needs_xgrammar
def test_mask_logits_shapes(tok):
    c = SchemaConstraint(tok, thread_schema(None, max_depth=1))
    ref = c.mask_logits(torch.zeros(c.vocab_size))
    allowed = torch.isfinite(ref)
    assert allowed.sum() >= 1
    two = c.mask_logits(torch.zeros(1, c.vocab_size + PAD))
    assert torch.equal(torch.isfinite(two[0, :c.vocab_size]), allowed) and not torch.isfinite(two[0, c.vocab_size:]).any()
    column = torch.zeros(c.vocab_size, 3)[:, 1]  # not contiguous
    assert c.mask_logits(column) is column and torch.equal(torch.isfinite(column), allowed)
    half = c.mask_logits(torch.zeros(c.vocab_size, dtype=torch.bfloat16))
    assert torch.equal(torch.isfinite(half), allowed)
    with pytest.raises(ConstraintError, match="one row"):
        c.mask_logits(torch.zeros(2, c.vocab_size))
    with pytest.raises(ConstraintError, match="vocab_size="):
        c.mask_logits(torch.zeros(c.vocab_size - 1))


@needs_xgrammar
def test_compiled_grammar_is_reused(tok):
    schema = thread_schema(ToolRegistry([calculator]), max_depth=3)
    SchemaConstraint(tok, schema), SchemaConstraint(tok, schema)
    assert _vocab(tok, None, None) is _vocab(tok, None, None)  # one compiler per tokenizer, which caches
