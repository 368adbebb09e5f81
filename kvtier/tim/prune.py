"""Which finished subtask lists leave the KV cache, and where the remaining tokens then sit.

TIMRUN (arXiv 2507.16784) keeps a task's working memory small by dropping the tokens of subtask lists
that are done: the parent's thought and each later conclusion carry what mattered. It does not drop a list
the moment it closes, but keeps the most recent few in a FIFO "pruning buffer", so the text written right
after a list (the parent's conclusion, the next sibling's thought) can still read it.

`PruneBuffer` is that rule over the tracker's `ListClosed` events; `RemovedSpans` is the bookkeeping the
runtime needs to cut the same tokens out of a cache whose positions close up after every removal.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import deque
from dataclasses import dataclass

from kvtier.errors import CacheInputError, brief

from .tracker import TokenSpan

__all__ = ["PruneBuffer", "PrunedList", "RemovedSpans"]


@dataclass(frozen=True, slots=True)
class PrunedList:
    """The subtask list of task `path` (its body: see tracker.py) was pruned when token `at_token` closed
    a list."""

    path: tuple[int, ...]
    body: TokenSpan
    at_token: int


class PruneBuffer:
    """The FIFO rule: closed lists enter the buffer; while it holds more than `size`, the oldest leaves and
    its body is removed.

    `size` is how many finished lists stay readable. With 0 the buffer can hold nothing, so a list leaves
    in the same call that brought it in: it is pruned as soon as its "]" is seen, and the parent's
    conclusion is written from its own thought alone (the smallest cache, the least context). Lists arrive
    in the order they close, and a nested list closes before the list holding it, so the oldest list never
    has a buffered list inside it; if the caller reports them out of that order, lists inside a pruned one
    are dropped from the buffer, since their tokens went with it.
    """

    def __init__(self, size: int = 2):
        if type(size) is not int or size < 0:
            raise CacheInputError(f"`size` must be an int >= 0 (0: prune each list when it closes), got {brief(size)}")
        self.size = size
        self.pruned: list[PrunedList] = []
        self._buffer: deque[tuple[tuple[int, ...], TokenSpan]] = deque()

    @property
    def buffered(self) -> tuple[tuple[tuple[int, ...], TokenSpan], ...]:
        """The lists kept for now, oldest first, as (path, body)."""
        return tuple(self._buffer)

    def on_list_closed(self, path: tuple[int, ...], body: TokenSpan, at_token: int | None = None) -> list[TokenSpan]:
        """A list closed (`ListClosed.node_path`, `.body`); returns the bodies to remove now, oldest first.

        A body is returned whole even when lists inside it were removed before: `RemovedSpans.remove`
        takes away only what is left. `at_token` (default `body.end`, the token holding "]") is logged.
        """
        if not isinstance(body, TokenSpan):
            raise CacheInputError(f"on_list_closed() takes the list's body as a TokenSpan, got {brief(body)}")
        at = body.end if at_token is None else at_token
        self._buffer.append((tuple(path), body))
        out = []
        while len(self._buffer) > self.size:
            gone, gone_body = self._buffer.popleft()
            self._buffer = deque(e for e in self._buffer if e[0][:len(gone)] != gone or len(e[0]) == len(gone))
            self.pruned.append(PrunedList(gone, gone_body, at))
            out.append(gone_body)
        return out


class RemovedSpans:
    """Stream token indices -> current cache positions (relative to stream index 0) as spans are removed.

    The removed tokens are kept as sorted, disjoint, merged intervals with a running count before each, so
    a position is one bisect. Removing a span whose tokens are partly gone already (a list holding a list
    pruned earlier) removes the rest, which always sits at contiguous positions: every token between two kept
    tokens of the span is inside the span, hence removed now or before.
    """

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._before: list[int] = []  # removed tokens before interval k
        self.removed = 0

    def _removed_before(self, index: int) -> int:
        """How many removed stream indices are < index."""
        k = bisect_right(self._starts, index) - 1
        if k < 0:
            return 0
        return self._before[k] + min(index, self._ends[k]) - self._starts[k]

    def __contains__(self, index: object) -> bool:
        if not isinstance(index, int):
            return False
        k = bisect_right(self._starts, index) - 1
        return k >= 0 and index < self._ends[k]

    def position(self, index: int) -> int:
        """The current position of kept stream token `index` (its rank among kept tokens)."""
        if type(index) is not int:
            raise CacheInputError(f"position() takes a stream token index (an int), got {brief(index)}")
        if index < 0 or index in self:
            raise CacheInputError(f"stream token {index} has no position: "
                                  f"{'it was removed' if index >= 0 else 'indices start at 0'}")
        return index - self._removed_before(index)

    def remove(self, span: TokenSpan) -> TokenSpan | None:
        """Record `span` as removed; returns the positions its not-yet-removed tokens held just before (a
        contiguous range, to cut from the cache now), or None when nothing of it was left."""
        if not isinstance(span, TokenSpan):
            raise CacheInputError(f"remove() takes a TokenSpan, got {brief(span)}")
        first = span.start - self._removed_before(span.start)
        kept = span.length - (self._removed_before(span.end) - self._removed_before(span.start))
        if kept == 0:
            return None
        # merge [start, end) with every interval it touches
        lo = bisect_right(self._ends, span.start - 1)  # first interval ending at or after span.start
        hi = bisect_right(self._starts, span.end)  # intervals starting at or before span.end touch it
        start, end = span.start, span.end
        if lo < hi:
            start, end = min(start, self._starts[lo]), max(end, self._ends[hi - 1])
        before = self._removed_before(start)
        self._starts[lo:hi] = [start]
        self._ends[lo:hi] = [end]
        self._before[lo:hi] = [before]
        self.removed += kept
        for k in range(lo + 1, len(self._starts)):
            self._before[k] = self._before[k - 1] + self._ends[k - 1] - self._starts[k - 1]
        return TokenSpan(first, first + kept)
