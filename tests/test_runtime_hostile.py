"""Hostile and odd inputs to kvtier's two runtimes (`kvtier.hogwild.generate`, `kvtier.tim.generate`) and what they
give: one clear error naming the bad value, or a run that goes on (a tool's failure is the tool's result), never a
raw KeyError / RecursionError from deep inside, a run that dies of a tool, or text from outside the model turned
into control tokens. Models are tiny and random; streams are scripted where the content matters.
"""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
import transformers as tf
from tiny import build_tokenizer

from kvtier.hogwild import CollaborationTemplate
from kvtier.hogwild import generate as hogwild_generate
from kvtier.tim import TimFormatError, TaskTracker
from kvtier.tim.runtime import generate as tim_generate
from kvtier.tim.tools import MAX_RESULT_CHARS, Tool, ToolRegistry, tool
from kvtier.tim.tracker import MAX_NESTING, tool_result_text

try:
    import xgrammar
except ImportError:  # pragma: no cover - the constrained tests skip
    xgrammar = None

needs_xgrammar = pytest.mark.skipif(xgrammar is None, reason="xgrammar is not installed (pip install xgrammar==0.2.9)")
TOK = build_tokenizer()
SHORT = dict(rules="Workers {names} ({n}) share the work; {example} opens a step.", history_intro="\n")


@pytest.fixture(scope="module")
def model():
    cfg = tf.LlamaConfig(vocab_size=len(TOK), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         bos_token_id=TOK.bos_token_id, eos_token_id=TOK.eos_token_id, pad_token_id=TOK.pad_token_id)
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(cfg).eval()


# ------------------------------------------------------------------------------------------- hogwild
@pytest.mark.parametrize("field, text, named", [
    ("rules", "{problem} is solved by {names}", "{problem}"),  # a field of another format string
    ("step_prefix", "**{names} [{step}]:**", "{names}"),
    ("problem_format", "{name}: {problem}", "{name}"),
    ("step_prefix", "{name.__class__}", "{name.__class__}"),  # attribute lookups reach past the value
    ("step_prefix", "{name[0]}", "{name[0]}"),
    ("step_prefix", "{0} [{step}]", "{0}"),
    ("step_prefix", "{} [{step}]", "{}"),
    ("step_prefix", "{name:{step}}", "{name:{step}}"),  # a field nested in a format spec
    ("rules", "{n.real}", "{n.real}"),
])
def test_template_format_fields_are_checked_against_their_own_names(field, text, named):
    """Each format string may use only the fields it is formatted with: a field of another one passed the check
    (every field was offered to every string) and was a KeyError in the middle of generate."""
    with pytest.raises(ValueError, match=f"{field} has the field {re.escape(named)}; it may use only"):
        CollaborationTemplate(**{field: text})


@pytest.mark.parametrize("field, text", [("step_prefix", "{"), ("step_prefix", "a}b"), ("rules", "{n:q}")])
def test_template_format_strings_that_do_not_parse_are_one_line(field, text):
    with pytest.raises(ValueError, match=f"{field} is not a valid format string"):
        CollaborationTemplate(**{field: text})


def test_template_format_fields_with_conversions_and_specs_are_taken(model):
    template = CollaborationTemplate(**{**SHORT, "rules": "{n:02d} workers: {names!s}; {example}"},
                                     step_prefix="[{step:d}] {name!s}:", problem_format="{problem:>3}")
    result = hogwild_generate(model, TOK, "2+3", workers=2, max_new_tokens=4, template=template, eos_token_id=[],
                              check_in_every=None, finisher_tokens=0)
    assert result.stopped == "budget" and result.texts[1].startswith("[1] Bob:")


def test_a_budget_smaller_than_the_workers_is_refused_as_the_cli_does(model):
    """3 workers and max_new_tokens=2: the first round would pass the budget, so no worker wrote a token and the
    finisher answered alone; `kvtier hogwild` refuses it, generate let it run."""
    with pytest.raises(ValueError, match="max_new_tokens 2 is fewer than the 3 workers"):
        hogwild_generate(model, TOK, "2+3", workers=3, max_new_tokens=2, template=CollaborationTemplate(**SHORT))
    result = hogwild_generate(model, TOK, "2+3", workers=3, max_new_tokens=3, eos_token_id=[], finisher_tokens=0,
                              template=CollaborationTemplate(**SHORT), check_in_every=None)
    assert result.stopped == "budget" and 1 <= sum(result.stats.tokens_per_worker) <= 3


@pytest.mark.parametrize("pattern", ["", "x*", "(?:)", "$", r"\d*"])
def test_an_answer_pattern_matching_empty_text_is_refused(model, pattern):
    """A pattern that matches "" stopped every run at its first token with the answer ""."""
    with pytest.raises(ValueError, match="answer_pattern .* matches empty text"):
        hogwild_generate(model, TOK, "2+3", max_new_tokens=4, answer_pattern=pattern,
                         template=CollaborationTemplate(**SHORT))


# ---------------------------------------------------------------------------------------------- tools
def _nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("value, fragment", [
    (_nested(100_000), "RecursionError"),  # json.dumps recursed out: call() raised, the run died of a tool
    (_nested(MAX_NESTING + 1), f"at most {MAX_NESTING} arrays and objects nested"),  # the tracker could not read it
    ("x" * (MAX_RESULT_CHARS + 1), f"at most {MAX_RESULT_CHARS} are written"),  # one forward pass of 16k+ tokens
])
def test_results_the_thread_cannot_take_are_an_error_result(value, fragment):
    outcome = ToolRegistry([tool(lambda: value, name="odd")]).call("odd", {})
    assert not outcome.ok and fragment in json.loads(outcome.result_json)["error"]
    assert len(outcome.result_json) < 1000


def test_results_up_to_the_bounds_are_written_as_they_are():
    registry = ToolRegistry([tool(lambda: _nested(MAX_NESTING - 1), name="deep"),
                             tool(lambda: "x" * (MAX_RESULT_CHARS - 2), name="long")])
    for name in registry.names:
        outcome = registry.call(name, {})
        assert outcome.ok, outcome.result_json
        assert tool_result_text("", outcome.result_json).endswith(outcome.result_json)


@pytest.mark.parametrize("constrain", [False, pytest.param(True, marks=needs_xgrammar)])
def test_special_token_text_in_a_tool_result_is_written_as_text(model, constrain):
    """A result holding "</s>" was encoded as the EOS token itself: under the schema the run died (the constraint
    refuses a special token inside a string); without it the model read a real end-of-text in its context."""
    def page() -> str:
        """A page that spells special tokens."""
        return "a </s> b <s> c"

    doc = '{"reasoning": {"thought": "t", "tooluse": {"tool_name": "page", "parameters": {}'
    rest = '}, "conclusion": "c"}, "answer": 1}'
    ids = TOK.encode(doc, add_special_tokens=False) + TOK.encode(rest, add_special_tokens=False)
    feed = iter(ids)
    result = tim_generate(model, TOK, "", prompt_ids=[TOK.bos_token_id], tools=[page], constrain=constrain,
                          max_new_tokens=len(ids) + 1,
                          choose=lambda logits: next(feed, TOK.eos_token_id))
    assert result.stopped == "answer" and result.answer == 1
    assert result.tree.tool_result == "a </s> b <s> c"
    specials = set(TOK.all_special_ids)
    assert not specials & set(result.kept_ids[result.stats.prompt_tokens:])


def test_an_xgrammar_refusal_of_a_tool_schema_is_one_line(model):
    pytest.importorskip("xgrammar")
    from kvtier.tim.constrain import ConstraintError

    for props, why in (({"x": {"type": "string", "pattern": "("}}, "Regex parsing error"),
                       ({"x": {"type": "integer", "minimum": 5, "maximum": 1}}, "Invalid range: minimum greater than maximum")):
        odd = Tool("odd", "an odd schema", {"type": "object", "properties": props, "required": ["x"]},
                   lambda **kw: 1)
        with pytest.raises(ConstraintError, match=f"^xgrammar cannot compile the schema: {why}") as info:
            tim_generate(model, TOK, "p", tools=[odd], constrain=True, max_new_tokens=2)
        assert "\n" not in str(info.value) and ".cc:" not in str(info.value)


# -------------------------------------------------------------------------------------------- tracker
def _thread_with_answer(answer: str) -> str:
    return '{"reasoning": {"thought": "a", "conclusion": "b"}, "answer": ' + answer + "}"


@pytest.mark.parametrize("answer, expected", [
    ("[" * 5000 + "]" * 5000, f"at most {MAX_NESTING} arrays and objects nested in the answer"),  # RecursionError
    ("1" * 5000, "a value Python can decode in the answer"),  # ValueError past Python's int digit limit
    ("[1, -2.5e999]", "the number -2.5e999 is past the range of a float"),  # -inf: JSON cannot write it back
])
def test_json_values_python_cannot_hold_are_a_format_error(answer, expected):
    tracker = TaskTracker()
    text = _thread_with_answer(answer)
    with pytest.raises(TimFormatError, match=expected):
        for at in range(0, len(text), 64):
            tracker.feed(text[at:at + 64])
    with pytest.raises(TimFormatError):  # the tracker stays dead
        tracker.feed(" ")


def test_values_nested_up_to_the_bound_are_read():
    tracker = TaskTracker()
    tracker.feed(_thread_with_answer("[" * MAX_NESTING + "]" * MAX_NESTING))
    assert tracker.done and tracker.answer == _nested(MAX_NESTING - 1)


class _Dropping:
    """A tokenizer that writes no tokens for some texts (as some do for text outside their vocabulary)."""

    chat_template = None
    eos_token_id = None

    def __init__(self, drops: str):
        self.drops = drops

    def __call__(self, text: str, add_special_tokens: bool = True):
        return TOK("" if text == self.drops else text, add_special_tokens=add_special_tokens)

    def decode(self, ids, **kw) -> str:
        return TOK.decode(ids, **kw)


@pytest.mark.parametrize("answer", [" yes", " no"])
def test_a_check_in_answer_without_tokens_is_named(model, answer):
    with pytest.raises(ValueError, match=f"the check-in answer '{answer}' tokenizes to no tokens"):
        hogwild_generate(model, _Dropping(answer), "2+3", max_new_tokens=4, template=CollaborationTemplate(**SHORT))


@needs_xgrammar
@pytest.mark.parametrize("sample", [False, True])
def test_a_schema_no_token_of_the_model_can_follow_is_one_line(sample):
    """A model whose vocabulary lacks every token the schema allows: sampling failed in torch on NaN probabilities,
    greedy picked token 0 and the constraint called it a token the schema refuses."""
    from kvtier.tim.constrain import ConstraintError

    cfg = tf.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    small = tf.AutoModelForCausalLM.from_config(cfg).eval()
    with pytest.raises(ConstraintError, match="allows none of the model's 50 tokens next"):
        tim_generate(small, TOK, "", prompt_ids=[1, 2, 3], constrain=True, max_new_tokens=4, do_sample=sample, seed=0)


def test_a_tool_that_changes_its_arguments_leaves_the_recorded_call_as_written():
    def grab(items: list[int], opts: dict) -> int:
        items.append(99)
        opts["seen"] = True
        return len(items)

    parameters = {"items": [1, 2], "opts": {"a": 1}}
    outcome = ToolRegistry([tool(grab)]).call("grab", parameters)
    assert outcome.ok and outcome.result_json == "3"
    assert parameters == {"items": [1, 2], "opts": {"a": 1}}  # what the model wrote, as the tree records it


@pytest.mark.parametrize("chat_template, why", [
    ("{{ raise_exception('System role required') }}", "TemplateError: System role required"),
    ("{% for m in messages %}{{ m.nope.deeper }}{% endfor %}", "UndefinedError"),
    ("{% if %}", "TemplateSyntaxError"),
    ("{{ 1 / 0 }}", "ZeroDivisionError"),
])
def test_a_chat_template_that_fails_is_one_value_error(model, chat_template, why):
    """The model's own Jinja template raised through both runtimes as jinja2 (or any) exceptions: a traceback."""
    tok = copy.deepcopy(TOK)
    tok.chat_template = chat_template
    with pytest.raises(ValueError, match=f"chat template cannot write the prompt \\({why}.*use_chat_template=False"):
        hogwild_generate(model, tok, "2+3", max_new_tokens=2)
    with pytest.raises(ValueError, match=f"chat template cannot write the prompt \\({why}.*pass prompt_ids"):
        tim_generate(model, tok, "2+3", max_new_tokens=2)
    result = hogwild_generate(model, tok, "2+3", max_new_tokens=2, eos_token_id=[], finisher_tokens=0,
                              template=CollaborationTemplate(**SHORT, use_chat_template=False))
    assert result.stats.prompt_tokens > 0


def test_a_parameters_schema_nested_past_what_json_writes_is_a_tool_spec_error():
    from kvtier.tim.tools import ToolSpecError

    deep: dict = {}
    for _ in range(100_000):
        deep = {"type": "array", "items": deep}
    with pytest.raises(ToolSpecError, match="tool 'deep': parameters schema is not JSON \\(RecursionError"):
        Tool("deep", "nested", {"type": "object", "properties": {"x": deep}}, lambda **kw: 1)


@pytest.mark.parametrize("temperature", [1e-39, 1e-45])
def test_a_temperature_near_zero_samples_the_most_likely_token(temperature):
    """A temperature that float32 barely holds made logits / temperature overflow (softmax NaN, and
    torch.multinomial raised deep in a run); near zero, sampling is greedy."""
    from kvtier.sampling import Sampling

    logits = torch.tensor([[1.0, 3.0, -2.0, 2.5], [0.5, -1.0, 4.0, float("-inf")]])
    sample = Sampling(do_sample=True, temperature=temperature, generator=torch.Generator().manual_seed(0))
    assert sample(logits) == [1, 2]
