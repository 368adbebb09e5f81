"""`kvtier tim`: a model reasons as a TIM task tree, runs tools inside its generation and prunes finished sub-task
lists from its KV cache (TIM / TIMRUN, arXiv 2507.16784); the tree is printed as it grows.

Each task's thought, tool call and conclusion is printed as it completes, indented under its task, and each
sub-task list that leaves the cache is marked where it leaves. Then the answer, why the run stopped and its
counts. The thread is sampled under its JSON schema when xgrammar is installed (any model then writes a valid
tree), greedily unless --temperature is above 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
from typing import Any, TextIO

import torch

from ..cli_args import (UsageError, budget_tokens, check_outputs_and_memory, check_sampling, check_utf8,
                        run_command, write_file)
from ..errors import printable
from .runtime import Pruned, TimResult, ToolCall, generate
from .schema import MAX_DEPTH, MAX_STRING_LENGTH
from .tools import Tool, calculator
from .tracker import FieldDone, ListClosed, TaskNode, TimFormatError

DEFAULTS = {"tools": "calculator", "prune_buffer": 2, "max_depth": 3, "max_new_tokens": 2048}
TOOLS: dict[str, Tool] = {"calculator": calculator}  # the built-in tools --tools may name
STOPPED = {"answer": "the thread closed", "eos": "the model ended its text before the thread closed",
           "budget": "--max-new-tokens reached"}


class TimCLIError(UsageError):
    """A problem worth one line to the user, not a traceback."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvtier tim", description=__doc__)
    p.add_argument("--model", required=True, help="local directory or hub id of a causal LM, with its tokenizer")
    p.add_argument("--prompt", required=True, help="the problem to reason about (text)")
    p.add_argument("--tools", default=DEFAULTS["tools"],
                   help="comma-separated built-in tools the model may call: " + ", ".join(TOOLS)
                        + " (default calculator; none: no tools)")
    p.add_argument("--prune-buffer", type=int, default=DEFAULTS["prune_buffer"],
                   help="finished sub-task lists kept in the cache (default 2; 0: each leaves as it closes)")
    p.add_argument("--max-depth", type=int, default=DEFAULTS["max_depth"],
                   help="deepest task; the reasoning task is depth 1 (default 3)")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULTS["max_new_tokens"],
                   help="most tokens the model may generate; tool results are not counted (default 2048)")
    p.add_argument("--max-string-length", type=int,
                   help="most characters of a thought or conclusion under the schema constraint (default: unbounded)")
    p.add_argument("--no-constrain", action="store_true",
                   help="sample without the thread's JSON schema (a model not trained for TIM soon breaks the format)")
    p.add_argument("--reencode", action="store_true",
                   help="after pruning, encode the kept suffix again instead of moving its keys (slower; TIM's way)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling share, in (0, 1] (with --temperature)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k best tokens (0: all; with --temperature)")
    p.add_argument("--seed", type=int, help="seed for sampling (reproducible runs)")
    p.add_argument("--device-budget", help="KV kept on the device: tokens per layer (8192) or a size (8GiB); beyond "
                                          "it the cache spills to CPU memory and disk")
    p.add_argument("--host-budget", help="KV kept in CPU memory: tokens per layer or a size")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="model dtype (auto: the checkpoint's, float32 on a CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the model runs (default: cuda when available)")
    p.add_argument("--json", metavar="PATH", help="also write the result (tree, text, tool calls, pruned lists, "
                                                  "stats) as JSON")
    return p


def parse_tools(text: str) -> list[Tool]:
    """The built-in tools a --tools value names, in its order ("none": no tools)."""
    names = [name.strip() for name in text.split(",")]
    if names == ["none"]:
        return []
    if not all(names) or "none" in names:
        raise TimCLIError(f"--tools {text!r}: name built-in tools separated by commas ({', '.join(TOOLS)}), "
                          "or none alone")
    for name in names:
        if name not in TOOLS:
            raise TimCLIError(f"--tools: unknown tool {name!r}; the built-in tools are {', '.join(TOOLS)} (or none)")
        if names.count(name) > 1:
            raise TimCLIError(f"--tools: {name} is named twice")
    return [TOOLS[name] for name in names]


def check_arguments(args: argparse.Namespace) -> list[Tool]:
    """Everything that can be checked before a model is loaded; returns the tools the flags name."""
    if not args.prompt.strip():
        raise TimCLIError("--prompt is empty: pass the text of the problem")
    check_utf8("--prompt", args.prompt)
    tools = parse_tools(args.tools)
    if args.prune_buffer < 0:
        raise TimCLIError(f"--prune-buffer {args.prune_buffer}: must be 0 (prune each list as it closes) or above")
    if not 1 <= args.max_depth <= MAX_DEPTH:
        raise TimCLIError(f"--max-depth {args.max_depth}: must lie in [1, {MAX_DEPTH}] (the reasoning task is depth 1)")
    if args.max_new_tokens < 1:
        raise TimCLIError(f"--max-new-tokens {args.max_new_tokens}: the model needs at least 1 token")
    if args.max_string_length is not None:
        if not 1 <= args.max_string_length <= MAX_STRING_LENGTH:
            raise TimCLIError(f"--max-string-length {args.max_string_length}: must lie in [1, {MAX_STRING_LENGTH}]")
        if args.no_constrain:
            raise TimCLIError("--max-string-length bounds strings under the schema constraint; it does nothing "
                              "with --no-constrain")
    check_sampling(args)
    check_outputs_and_memory(args)
    return tools


def label(path: tuple[int, ...]) -> str:
    """A task's name as printed: the reasoning task is 1, its second sub-task 1.2, that one's first 1.2.1."""
    return ".".join(["1", *(str(k + 1) for k in path)])


def _bars(depth: int) -> str:
    return "\u2502 " * depth


class TreePrinter:
    """The task tree as `generate` writes it, one line per event (pass `event` as its `on_event`)::

        1 thought: count the legs of each kind of animal, then add
        ├ 1.1 thought: 3 spiders with 8 legs each
        │ ├ tool calculator({"expression": "3 * 8"}) -> 24
        │ └ conclusion: the spiders have 24 legs
        ├ [pruned: subtasks of task 1.1, 12 tokens]
        └ conclusion: 24 + 24 legs

    A task's items (its tool call, its sub-tasks, pruning marks, its conclusion) hang below its thought; the
    conclusion, a task's last field, closes its branch. A pruning mark stands where the list that caused it
    closed. Text from the model is made printable and each line cut to `width` columns (default: the terminal's).
    """

    def __init__(self, out: TextIO, width: int | None = None):
        self.out = out
        self.width = width if width is not None else shutil.get_terminal_size((100, 20)).columns
        self.level = 0  # the depth whose items are being written: where a pruning mark goes

    def event(self, event: Any) -> None:
        if isinstance(event, FieldDone):
            path = event.node_path
            if event.field == "thought":
                self.line(_bars(len(path) - 1) + "\u251c " if path else "", f"{label(path)} thought: {event.value}")
            else:
                self.line(_bars(len(path)) + "\u2514 ", f"conclusion: {event.value}")
            self.level = len(path)
        elif isinstance(event, ToolCall):
            prefix = _bars(len(event.path)) + "\u251c "
            params = printable(json.dumps(event.parameters, ensure_ascii=False))
            rest = printable(f") -> {event.result_json}")
            # the parameters give way first, so that the result stays in view
            room = max(10, self.room(prefix) - len(printable(f"tool {event.name}(")) - min(len(rest), 40))
            self.line(prefix, f"tool {printable(event.name)}({_cut(params, room)}{rest}")
            self.level = len(event.path)
        elif isinstance(event, ListClosed):
            self.level = len(event.node_path)
        elif isinstance(event, Pruned):
            tokens = event.positions[1] - event.positions[0]
            self.line(_bars(self.level) + "\u251c ", f"[pruned: subtasks of task {label(event.path)}, {tokens} tokens]")

    def room(self, prefix: str) -> int:
        return max(20, self.width - len(prefix))

    def line(self, prefix: str, text: str) -> None:
        print(prefix + _cut(printable(text), self.room(prefix)), file=self.out, flush=True)


def _cut(text: str, room: int) -> str:
    return text if len(text) <= room else text[:room - 1] + "\u2026"


def _open_task(tree: TaskNode | None) -> TaskNode | None:
    """The deepest task still open when the run stopped (None: none was)."""
    node = tree
    if node is None or node.closed:
        return None
    while node.children and not node.children[-1].closed:
        node = node.children[-1]
    return node


def summary(result: TimResult) -> list[str]:
    """The answer, why the run stopped and its counts, as printed after the tree."""
    s = result.stats
    if result.stopped == "answer":
        answer = printable(json.dumps(result.answer, ensure_ascii=False))
    else:
        answer = "none (the thread did not close)"
    stopped = f"stopped: {result.stopped} ({STOPPED[result.stopped]})"
    open_task = _open_task(result.tree)
    if open_task is not None:
        stopped += f" inside task {label(open_task.path)}"
    elif result.tree is None and result.stopped != "answer":
        stopped += " before the reasoning task began"
    return [f"answer: {answer}", stopped,
            f"{s.generated_tokens} tokens generated, {s.injected_tokens} injected | peak KV {s.peak_kv_tokens} tokens "
            f"(prompt {s.prompt_tokens}) | {s.pruned_tokens} pruned ({s.share_pruned:.0%}) | {s.positions_reused} "
            f"positions reused | {s.tool_calls} tool calls | {s.seconds:.1f} s"]


def run(args: argparse.Namespace) -> int:
    from ..qa import QAError, load

    tools = check_arguments(args)
    constrained = not args.no_constrain and importlib.util.find_spec("xgrammar") is not None
    if not args.no_constrain and not constrained:
        print("kvtier tim: note: xgrammar is not installed, so the thread is sampled without its schema "
              "(pip install kvtier[tim])", file=sys.stderr)
    try:
        tokenizer, model = load(args.model, args.dtype, args.device)
    except QAError as err:
        raise TimCLIError(str(err)) from None
    printer = TreePrinter(sys.stdout)
    sample = args.temperature > 0
    options = budget_tokens(args, model)
    try:
        result = generate(model, tokenizer, args.prompt, tools=tools, prune_buffer=args.prune_buffer,
                          max_depth=args.max_depth, max_new_tokens=args.max_new_tokens, constrain=constrained,
                          max_string_length=args.max_string_length, reencode=args.reencode, do_sample=sample,
                          temperature=args.temperature if sample else 1.0, top_p=args.top_p, top_k=args.top_k,
                          seed=args.seed, on_event=printer.event, **options)
    except TimFormatError as err:
        why = " (sampled without the schema constraint)" if not constrained else ""
        raise TimCLIError(f"the model's output stopped being a TIM thread at {err}{why}") from None
    for line in summary(result):
        print(line)
    if args.json is not None:
        record = {"model": args.model, "prompt": args.prompt, **result.as_dict()}
        write_file(args.json, json.dumps(record, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command("kvtier tim", run, build_parser().parse_args(argv))
