"""Structured reasoning with a pruned KV cache (TIM / TIMRUN, arXiv 2507.16784).

A TIM model writes its reasoning as a JSON tree of tasks (thought, optional tool use, optional subtasks,
conclusion). `TaskTracker` follows that tree token by token, so the runtime learns the moment a tool call
is complete (inject its result) or a subtask list closes; `PruneBuffer` decides which closed lists leave
the KV cache and when, and `RemovedSpans` turns the stream's token indices into cache positions once some
tokens are gone. `generate` runs the whole loop on a KVTierCache: tools inside the generation, pruning by
`KVTierCache.remove_span`, schema-constrained decoding (`SchemaConstraint`, xgrammar) for models not trained
for TIM.
"""

from .constrain import ConstraintError, SchemaConstraint
from .prune import PruneBuffer, PrunedList, RemovedSpans
from .runtime import Pruned, TimResult, TimStats, ToolCall, generate
from .schema import thread_schema
from .tools import Tool, ToolOutcome, ToolRegistry, calculator, tool
from .tracker import (
    Event,
    FieldDone,
    ListClosed,
    TaskClosed,
    TaskNode,
    TaskTracker,
    ThreadDone,
    TimFormatError,
    TokenSpan,
    ToolCallReady,
    tool_result_text,
)

__all__ = ["ConstraintError", "Event", "FieldDone", "ListClosed", "PruneBuffer", "Pruned", "PrunedList",
           "RemovedSpans", "SchemaConstraint", "TaskClosed", "TaskNode", "TaskTracker", "ThreadDone", "TimFormatError",
           "TimResult", "TimStats", "TokenSpan", "Tool", "ToolCall", "ToolCallReady", "ToolOutcome", "ToolRegistry",
           "calculator", "generate", "thread_schema", "tool", "tool_result_text"]
