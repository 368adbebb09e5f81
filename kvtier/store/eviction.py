"""Eviction strategies: which chunk leaves a full tier. Kept apart from the pools that hold the data."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from .chunk import Chunk


class LRUEviction:
    """Least recently read first; among equals the oldest position (exact mode reads everything every step,
    so there the oldest text leaves the device first and the newest stays)."""

    def victim(self, chunks: Iterable[Chunk], protect: set[int] | frozenset[int] = frozenset()) -> Chunk | None:
        """The chunk to evict, never a pinned one nor one whose id is in `protect`; None if none qualifies."""
        return min(_evictable(chunks, protect), key=_lru_key, default=None)

    def victims(self, chunks: Iterable[Chunk], protect: set[int] | frozenset[int] = frozenset()) -> Iterator[Chunk]:
        """The chunks `victim` would pick one after another, if nothing else changes between picks: one sort
        where making room for a step's chunks took one scan of the tier per chunk evicted. Lazy: `chunks` is
        read at the first pick."""
        yield from sorted(_evictable(chunks, protect), key=_lru_key)


def _evictable(chunks: Iterable[Chunk], protect: set[int] | frozenset[int]) -> Iterator[Chunk]:
    return (c for c in chunks if not c.pinned and c.chunk_id not in protect)


def _lru_key(c: Chunk) -> tuple[int, int]:
    return c.last_used, c.start
