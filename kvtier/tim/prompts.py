"""What a model is told before it writes a TIM thread: the format, the pruning it should expect, the tools.

The text was written for kvtier. A model trained for TIM needs little of it; a model that was not relies on
the schema constraint (`kvtier.tim.constrain`) for the structure and on this text for what goes where.
"""

from __future__ import annotations

from typing import Any

from ..chat import apply_chat_template, has_chat_template
from .schema import dump_json
from .tools import ToolRegistry

INSTRUCTIONS = """\
Solve the problem below by writing one JSON object and nothing else:
{{"reasoning": <task>, "answer": <the final answer>}}
A task is {{"thought": "...", "tooluse": {{...}}, "subtasks": [<task>, ...], "conclusion": "..."}}, keys in that \
order; "tooluse" and "subtasks" may be left out. Tasks nest at most {max_depth} deep (the reasoning task is depth 1).
- "thought": what this task is about and how you will do it.
- "subtasks": smaller tasks that together do this one, in order.
- "conclusion": what this task found. Once a list of subtasks is finished, its text may be removed from your \
memory: write everything later steps need into the conclusion of the task that holds the list.
- "answer": the final answer, after the reasoning.{tools}"""

TOOLS = """
- "tooluse": calls a tool: {{"tool_name": "<name>", "parameters": {{...}}}}. Stop after the parameters: the tool \
runs and its result is written for you as "tool_result"; then close the tooluse and go on.
Tools:
{listing}"""


def instructions(tools: ToolRegistry | None, max_depth: int) -> str:
    listing = ""
    if tools is not None and len(tools):
        lines = [f"  {t.name}: {t.description or 'no description'} Parameters: {dump_json(t.parameters)}"
                 for t in tools]
        listing = TOOLS.format(listing="\n".join(lines))
    return INSTRUCTIONS.format(max_depth=max_depth, tools=listing)


def encode_prompt(tokenizer: Any, problem: str, tools: ToolRegistry | None, max_depth: int) -> list[int]:
    """The prompt's token ids: the instructions and the problem, in the chat template when the tokenizer has one."""
    text = f"{instructions(tools, max_depth)}\n\nProblem: {problem}"
    if has_chat_template(tokenizer):
        ids = apply_chat_template(tokenizer, text, tokenize=True,
                                  way_around="pass prompt_ids to give the prompt's tokens yourself")
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return list(tokenizer.encode(text + "\n\n", add_special_tokens=True))
