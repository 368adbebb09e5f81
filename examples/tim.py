"""Reasoning as a task tree, with a calculator inside the generation and finished sub-tasks pruned from the cache.

    python examples/tim.py --model path/to/model

Two runs on the same model:
1. Scripted: the model's choices are replaced by a fixed thread (what a TIM-trained model would write), so you
   can see the tool run at every depth and the finished sub-task lists leave the cache, on any model.
2. Schema-constrained: the model writes its own thread; xgrammar keeps it valid JSON of the TIM format, so even
   a model never trained for TIM produces a tree the runtime can prune (with random weights, a nonsense one).
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kvtier.tim import Pruned, TimResult, ToolCall, calculator, generate
from kvtier.tim.schema import JSON_SEPARATORS


RESULT = ", \"tool_result\": null"  # where the runtime writes each tool's result


def thread() -> dict:
    """What a TIM model might write for "How many legs do 3 spiders and 4 ants have?"."""
    def counted(animal: str, n: int, legs: int) -> dict:
        return {"thought": f"{n} {animal}s with {legs} legs each",
                "tooluse": {"tool_name": "calculator", "parameters": {"expression": f"{n} * {legs}"},
                            "tool_result": None},
                "conclusion": f"the {animal}s have {n * legs} legs"}

    return {"reasoning": {"thought": "count the legs of each kind of animal, then add",
                          "subtasks": [counted("spider", 3, 8), counted("ant", 4, 6)],
                          "conclusion": "24 + 24 legs"}, "answer": "48"}


def scripted_ids(tokenizer, doc: dict) -> list[int]:
    """The thread's tokens without the tool results, cut where each tool's parameters close: the model stops
    there, the runtime writes the result, the model goes on."""
    pieces = json.dumps(doc, separators=JSON_SEPARATORS).split(RESULT)
    return [i for piece in pieces for i in tokenizer.encode(piece, add_special_tokens=False)]


class Script:
    """choose(logits) -> the next scripted token (EOS at the end)."""

    def __init__(self, ids: list[int], eos: int):
        self.ids, self.eos = iter(ids), eos

    def __call__(self, logits: torch.Tensor) -> int:
        return next(self.ids, self.eos)


def show(event) -> None:
    if isinstance(event, ToolCall):
        print(f"  tool {event.name}({json.dumps(event.parameters)}) -> {event.result_json}")
    elif isinstance(event, Pruned):
        print(f"  pruned the sub-tasks of task {event.path or 'root'}: cache positions {event.positions[0]}-"
              f"{event.positions[1]} are free again")


def summary(result: TimResult) -> None:
    s = result.stats
    print(f"  answer: {result.answer!r} (stopped: {result.stopped})")
    print(f"  {s.generated_tokens} tokens generated, {s.injected_tokens} injected, peak KV {s.peak_kv_tokens} "
          f"tokens, {s.pruned_tokens} pruned ({s.share_pruned:.0%}), {s.positions_reused} positions reused, "
          f"{s.tool_calls} tool calls")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="local directory or hub id of a causal LM with its tokenizer")
    p.add_argument("--max-new-tokens", type=int, default=60, help="budget of the constrained run")
    args = p.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    problem = "How many legs do 3 spiders and 4 ants have?"

    print("1. scripted thread, prune_buffer=0 (each sub-task list leaves as it closes)")
    ids = scripted_ids(tokenizer, thread())
    result = generate(model, tokenizer, problem, tools=[calculator], prune_buffer=0, constrain=False,
                      choose=Script(ids, tokenizer.eos_token_id), on_event=show)
    summary(result)
    print("  tree:", [(child.thought, child.tool_result, child.conclusion) for child in result.tree.children])

    print("2. schema-constrained, the model's own choices")
    result = generate(model, tokenizer, problem, tools=[calculator], max_string_length=40,
                      max_new_tokens=args.max_new_tokens, on_event=show)
    summary(result)


if __name__ == "__main__":
    main()
