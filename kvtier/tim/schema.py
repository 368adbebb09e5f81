"""The JSON Schema of a TIM thread: the reasoning tree a model writes, tool calls included, as one JSON object.

TIM (Luo et al. 2025, "Beyond Context Limits: Subconscious Threads for Long-Horizon Reasoning",
arXiv 2507.16784) writes its reasoning as a tree of tasks:

    thread = {"reasoning": Task, "answer": <JSON>}
    Task   = {"thought": str,
              "tooluse": {"tool_name": str, "parameters": {...}, "tool_result": <JSON>},   (optional)
              "subtasks": [Task, ...],                                                    (optional)
              "conclusion": str}

Keys come in exactly that order. The reasoning task is depth 1; a task at `max_depth` has no "subtasks".
The model writes "tool_name" and "parameters"; the runtime runs the tool and writes `, "tool_result": <JSON>`
into the same generation.

The text of a thread uses one whitespace form, `JSON_SEPARATORS` (the form `json.dumps` writes by default):
no newlines or indentation, `", "` between items and `": "` after keys. The constrained decoder
(`kvtier.tim.constrain`) accepts that form only, so every JSON text the runtime injects (a tool result) must be
written with `dump_json`.
"""

from __future__ import annotations

import copy
import json
from typing import TYPE_CHECKING, Any

from ..errors import brief

if TYPE_CHECKING:
    from kvtier.tim.tools import ToolRegistry

JSON_SEPARATORS = (", ", ": ")  # (item separator, key separator): what the grammar accepts and dump_json writes
TASK_KEYS = ("thought", "tooluse", "subtasks", "conclusion")


def dump_json(value: Any) -> str:
    """`value` as one line of JSON in the thread's whitespace form (`JSON_SEPARATORS`). Raises TypeError for a value
    JSON cannot hold and ValueError for NaN or infinities (JSON has no spelling for them)."""
    return json.dumps(value, separators=JSON_SEPARATORS, allow_nan=False)


# The schema nests one copy of a task per level (Python's recursion limit ends it near 300 levels; reasoning trees
# are a few levels deep); a string bound is a JSON Schema integer, which the grammar compiler reads as 64-bit.
MAX_DEPTH = 64
MAX_STRING_LENGTH = 2**31 - 1


def check_limits(max_depth: object, max_string_length: object) -> None:
    """ValueError naming max_depth or max_string_length unless each is an int in its range (None: no string bound)."""
    if isinstance(max_depth, bool) or not isinstance(max_depth, int) or not 1 <= max_depth <= MAX_DEPTH:
        raise ValueError(f"max_depth must be an int in [1, {MAX_DEPTH}], got {brief(max_depth)}")
    if max_string_length is not None and (isinstance(max_string_length, bool) or not isinstance(max_string_length, int)
                                          or not 1 <= max_string_length <= MAX_STRING_LENGTH):
        raise ValueError(f"max_string_length must be None or an int in [1, {MAX_STRING_LENGTH}], got "
                         f"{brief(max_string_length)}")


def thread_schema(tools: ToolRegistry | None = None, max_depth: int = 3, max_string_length: int | None = None,
                  answer: dict | None = None) -> dict:
    """The JSON Schema of a thread.

    tools: the tools a task may call; with none (None or an empty registry) tasks have no "tooluse".
    max_depth: depth of the deepest task (the reasoning task is depth 1); tasks at this depth have no "subtasks".
    max_string_length: the most characters of a "thought" or "conclusion" (None: unbounded). A constrained model
        with random weights may otherwise write one string forever. Under xgrammar 0.2.9 a bounded string holds
        no escape sequences, so no `"`, `\\` or newline (see `kvtier.tim.constrain`).
    answer: the schema of the "answer" value (default: any JSON value).

    Every object lists its properties in the order they must be written and sets additionalProperties false.
    """
    check_limits(max_depth, max_string_length)
    if answer is not None and not isinstance(answer, dict):
        raise ValueError(f"answer must be None or a JSON Schema dict, got {type(answer).__name__}")
    tooluse = tools.schema_for_tooluse() if tools is not None and len(tools) > 0 else None
    text: dict[str, Any] = {"type": "string"}
    if max_string_length is not None:
        text["maxLength"] = max_string_length

    def task(depth: int) -> dict:
        props: dict[str, Any] = {"thought": dict(text)}
        if tooluse is not None:
            props["tooluse"] = copy.deepcopy(tooluse)
        if depth < max_depth:
            props["subtasks"] = {"type": "array", "items": task(depth + 1), "minItems": 1}
        props["conclusion"] = dict(text)
        return {"type": "object", "properties": props, "required": ["thought", "conclusion"],
                "additionalProperties": False}

    return {"type": "object",
            "properties": {"reasoning": task(1), "answer": copy.deepcopy(answer) if answer is not None else {}},
            "required": ["reasoning", "answer"], "additionalProperties": False}
