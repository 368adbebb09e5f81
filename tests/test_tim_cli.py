"""`kvtier tim` through kvtier's entry point, in this process, on a tiny saved model (random weights, a real
tokenizer); and its tree printer on a scripted thread, line by line."""

from __future__ import annotations

import io
import json
import re

import pytest
import torch
import transformers as tf
from tiny import build_tokenizer, save_tiny_model

from kvtier.cli import main
from kvtier.errors import printable
from kvtier.tim import ToolCall, calculator, generate
from kvtier.tim.cli import TreePrinter, build_parser, label
from kvtier.tim.schema import JSON_SEPARATORS

PROMPT = "How many legs do 3 spiders and 4 ants have?"
TREE_LINE = re.compile(r"^(\u2502 )*(\u251c |\u2514 )?(1(\.\d+)* thought: |tool |conclusion: |\[pruned: subtasks of "
                       r"task 1(\.\d+)*, \d+ tokens\]$)")
STATS = re.compile(r"^(\d+) tokens generated, (\d+) injected \| peak KV (\d+) tokens \(prompt (\d+)\) \| (\d+) pruned "
                   r"\((\d+)%\) \| (\d+) positions reused \| (\d+) tool calls \| [\d.]+ s$")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine torch's thread pool makes each of the
    hundreds of small forwards here wait for its turn (several times slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tim") / "model")


def _one_error(capsys, argv: list[str], text: str) -> None:
    assert main(argv) == 2, argv
    out = capsys.readouterr()
    lines = [line for line in out.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("kvtier tim: error: ") and text in lines[0], (argv, out.err)
    assert "Traceback" not in out.err and out.out == "", argv


def test_constrained_run_prints_the_tree_the_answer_and_the_counts(model_dir, tmp_path, capsys):
    pytest.importorskip("xgrammar", reason="the default run samples under the schema: pip install kvtier[tim]")
    record_path = tmp_path / "run.json"
    # sampled, short strings, shallow tree: this random model closes a sub-task list within the budget, and
    # with --prune-buffer 0 the list leaves the cache as it closes
    argv = ["tim", "--model", str(model_dir), "--prompt", PROMPT, "--max-new-tokens", "160", "--max-string-length",
            "4", "--max-depth", "2", "--prune-buffer", "0", "--temperature", "1", "--seed", "0", "--device-budget",
            "1500", "--host-budget", "2GiB", "--device", "cpu", "--json", str(record_path)]
    assert main(argv) == 0
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    lines = out.out.splitlines()
    assert all(line.isprintable() for line in lines), lines
    *tree, answer, stopped, stats = lines
    assert tree and tree[0].startswith("1 thought: ")
    assert all(TREE_LINE.match(line) for line in tree), tree
    record = json.loads(record_path.read_text())
    assert record["model"] == str(model_dir) and record["prompt"] == PROMPT
    assert stopped.startswith(f"stopped: {record['stopped']} (")
    s = record["stats"]
    m = STATS.match(stats)
    assert m, stats
    assert [int(g) for g in m.groups()[:5]] == [s["generated_tokens"], s["injected_tokens"], s["peak_kv_tokens"],
                                               s["prompt_tokens"], s["pruned_tokens"]]
    assert int(m.group(8)) == s["tool_calls"] == len(record["tool_calls"])
    assert 0 < s["generated_tokens"] <= 160
    # what was printed is the tree in the record
    root = record["tree"]
    assert tree[0] == "1 thought: " + printable(root["thought"])
    assert sum(line.endswith("thought: " + printable(c["thought"])) for c in root["children"] for line in tree) >= \
        len(root["children"])
    pruned = [line for line in tree if "[pruned:" in line]
    assert len(pruned) == len(record["pruned"])
    for line, p in zip(pruned, record["pruned"]):
        assert line.endswith(f"subtasks of task {label(tuple(p['path']))}, {p['positions'][1] - p['positions'][0]} "
                             "tokens]")
    if record["stopped"] == "answer":
        assert answer == "answer: " + printable(json.dumps(record["answer"], ensure_ascii=False))
        assert tree[-1] == "\u2514 conclusion: " + printable(root["conclusion"])
        assert json.loads(record["text"])["reasoning"]["thought"] == root["thought"]
    else:
        assert answer == "answer: none (the thread did not close)"


def test_unconstrained_random_model_breaks_the_format_cleanly(model_dir, capsys):
    _one_error(capsys, ["tim", "--model", str(model_dir), "--prompt", PROMPT, "--no-constrain", "--max-new-tokens",
                        "40", "--device", "cpu"],
               "the model's output stopped being a TIM thread at token ")


def test_help_and_argument_errors(model_dir, tmp_path, capsys):
    """One line each, exit code 2, and no model loads: each case points at a model that does not exist, so a
    check that let one through would fail with "model not found" instead."""
    with pytest.raises(SystemExit) as exit_:
        main(["tim", "--help"])
    assert exit_.value.code == 0 and "--prune-buffer" in capsys.readouterr().out
    base = ["tim", "--model", str(tmp_path / "nope"), "--prompt", PROMPT]
    cases = [
        (["--prune-buffer", "-1"], "--prune-buffer -1"),
        (["--max-depth", "0"], "--max-depth 0: must lie in [1, 64]"),
        (["--max-depth", "999999999"], "--max-depth 999999999: must lie in [1, 64]"),
        (["--max-string-length", "99999999999999999999"], "--max-string-length 99999999999999999999: must lie in"),
        (["--max-new-tokens", "0"], "--max-new-tokens 0"),
        (["--max-string-length", "0"], "--max-string-length 0"),
        (["--max-string-length", "8", "--no-constrain"], "does nothing with --no-constrain"),
        (["--tools", "search"], "unknown tool 'search'; the built-in tools are calculator"),
        (["--tools", "calculator,none"], "or none alone"),
        (["--tools", "calculator,"], "name built-in tools separated by commas"),
        (["--tools", "calculator,calculator"], "calculator is named twice"),
        (["--temperature", "-1"], "--temperature -1"),
        (["--top-p", "0"], "--top-p 0"),
        (["--top-k", "-2"], "--top-k -2"),
        (["--device-budget", "lots"], "--device-budget: budget 'lots'"),
        (["--host-budget", "1.5"], "--host-budget: budget '1.5'"),
        (["--json", str(tmp_path)], "is a directory"),
        (["--json", str(tmp_path / "no" / "run.json")], "cannot write in"),
        (["--device", "nonsense"], "--device nonsense"),
    ]
    for extra, text in cases:
        _one_error(capsys, [*base, *extra], text)
    _one_error(capsys, ["tim", "--model", str(model_dir), "--prompt", "  "], "--prompt is empty")
    _one_error(capsys, [*base, "--tools", "none", "--device", "cpu"], "model not found")
    assert not (tmp_path / "nope").exists() and not (tmp_path / "no").exists()


def test_interrupt_is_one_line_and_exit_code_130(model_dir, capsys, monkeypatch):
    import kvtier.tim.cli as tim_cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tim_cli, "generate", interrupted)
    assert main(["tim", "--model", str(model_dir), "--prompt", PROMPT, "--device", "cpu"]) == 130
    assert capsys.readouterr().err.strip() == "kvtier tim: interrupted"


def test_flags_and_defaults():
    defaults = {a.dest: a.default for a in build_parser()._actions}
    assert (defaults["tools"], defaults["prune_buffer"], defaults["max_depth"], defaults["max_new_tokens"]) == \
        ("calculator", 2, 3, 2048)
    assert defaults["max_string_length"] is None and defaults["no_constrain"] is False


# ---------------------------------------------------------------------------------------------------------
# The printer on a scripted thread: the model's choices replaced by a fixed thread, so the tree is known.

TOK = build_tokenizer()


def _task(thought: str, expression: str | None, children: list | None, conclusion: str) -> dict:
    task: dict = {"thought": thought}
    if expression is not None:
        task["tooluse"] = {"tool_name": "calculator", "parameters": {"expression": expression}, "tool_result": None}
    if children:
        task["subtasks"] = children
    task["conclusion"] = conclusion
    return task


THREAD = {"reasoning": _task("count the legs of 3 spiders and 4 ants", None, [
    _task("spiders", "3 * 8", [_task("a spider has 8 legs", None, None, "8")], "24 legs"),
    _task("ants\n\x1b[2J", "4 * 6", [_task("an ant has 6 legs", None, None, "6")], "24 legs"),
], "48 legs, " + "and a conclusion long enough to be cut at the width " * 2), "answer": 48}


class Scripted:
    """choose(): the next scripted token, whatever the logits (EOS at the end)."""

    def __init__(self, ids: list[int]):
        self.ids = iter(ids)

    def __call__(self, logits: torch.Tensor) -> int:
        return next(self.ids, TOK.eos_token_id)


def _scripted_ids(doc: dict) -> list[int]:
    """The thread's tokens without the tool results (the runtime writes them), cut where each tool's parameters
    close."""
    pieces = json.dumps(doc, separators=JSON_SEPARATORS).split(', "tool_result": null')
    return [i for piece in pieces for i in TOK.encode(piece, add_special_tokens=False)]


def _run_scripted(prune_buffer: int) -> tuple[list[str], object]:
    """The printed lines (60 columns) and the result of THREAD generated by a scripted choice of tokens."""
    config = tf.LlamaConfig(vocab_size=len(TOK), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                            bos_token_id=TOK.bos_token_id, eos_token_id=TOK.eos_token_id)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    out = io.StringIO()
    result = generate(model, TOK, "", tools=[calculator], prune_buffer=prune_buffer, constrain=False,
                      choose=Scripted(_scripted_ids(THREAD)), on_event=TreePrinter(out, width=60).event,
                      max_new_tokens=2000, prompt_ids=[TOK.bos_token_id])
    assert result.stopped == "answer" and result.answer == 48
    return out.getvalue().splitlines(), result


def _expected(pruned_11: str, pruned_12: str, pruned_1: str) -> list[str]:
    """The tree of THREAD with a pruning mark (or nothing) in each of the three places one can stand."""
    return [line for line in [
        "1 thought: count the legs of 3 spiders and 4 ants",
        "\u251c 1.1 thought: spiders",
        '\u2502 \u251c tool calculator({"expression": "3 * 8"}) -> 24',
        "\u2502 \u251c 1.1.1 thought: a spider has 8 legs",
        "\u2502 \u2502 \u2514 conclusion: 8",
        pruned_11 and f"\u2502 \u251c {pruned_11}",  # where the list of 1.1 closed
        "\u2502 \u2514 conclusion: 24 legs",
        "\u251c 1.2 thought: ants\\n\\x1b[2J",  # the model's control characters are shown, never sent
        '\u2502 \u251c tool calculator({"expression": "4 * 6"}) -> 24',
        "\u2502 \u251c 1.2.1 thought: an ant has 6 legs",
        "\u2502 \u2502 \u2514 conclusion: 6",
        pruned_12 and f"\u2502 \u251c {pruned_12}",  # where the list of 1.2 closed
        "\u2502 \u2514 conclusion: 24 legs",
        pruned_1 and f"\u251c {pruned_1}",  # where the reasoning task's list closed
        "\u2514 conclusion: 48 legs, and a conclusion long enough to be c\u2026",  # cut at 60 columns
    ] if line]


def _mark(task: str, pruned) -> str:
    return f"[pruned: subtasks of task {task}, {pruned.positions[1] - pruned.positions[0]} tokens]"


def test_tree_printer_on_a_scripted_thread():
    lines, result = _run_scripted(prune_buffer=0)  # each list leaves the cache as it closes
    assert [p.path for p in result.pruned] == [(0,), (1,), ()]
    assert lines == _expected(*(_mark(task, p) for task, p in zip(("1.1", "1.2", "1"), result.pruned)))
    assert sum(p.positions[1] - p.positions[0] for p in result.pruned) == result.stats.pruned_tokens


def test_tree_printer_marks_a_list_pruned_later_where_it_leaves():
    lines, result = _run_scripted(prune_buffer=1)
    # the list of 1.1 leaves when the list of 1.2 closes, that one when the reasoning task's list closes
    assert [p.path for p in result.pruned] == [(0,), (1,)]
    assert lines == _expected("", _mark("1.1", result.pruned[0]), _mark("1.2", result.pruned[1]))


def test_tree_printer_keeps_a_long_tool_result_in_view():
    out = io.StringIO()
    TreePrinter(out, width=70).event(ToolCall((0, 1), "calculator", {"expression": "1 + " * 40 + "1"}, True, "41",
                                              0.0, 5))
    (line,) = out.getvalue().splitlines()
    assert line.startswith('\u2502 \u2502 \u251c tool calculator({"expression": "1 + 1 + ')
    assert line.endswith("\u2026) -> 41") and len(line) == 70
