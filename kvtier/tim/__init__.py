"""Structured reasoning with a pruned KV cache (TIM / TIMRUN, arXiv 2507.16784).

A TIM model writes its reasoning as a JSON tree of tasks (thought, optional tool use, optional subtasks,
conclusion). `TaskTracker` follows that tree token by token, so the runtime learns the moment a tool call
is complete (inject its result) or a subtask list closes; `PruneBuffer` decides which closed lists leave
the KV cache and when, and `RemovedSpans` turns the stream's token indices into cache positions once some
tokens are gone.
"""

from .prune import PruneBuffer, PrunedList, RemovedSpans
from .tracker import (
    Event,
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

__all__ = ["Event", "ListClosed", "PruneBuffer", "PrunedList", "RemovedSpans", "TaskClosed", "TaskNode",
           "TaskTracker", "ThreadDone", "TimFormatError", "TokenSpan", "ToolCallReady", "tool_result_text"]
