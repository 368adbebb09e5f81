"""Background reads of disk records, so decompression and checksums happen off the critical path.

Reader threads run the LMDB read, the zstd decompression and the record checks (zstd and LMDB release
the GIL for the heavy parts); finished chunks wait in a staging area bounded by `max_tokens`. A request
beyond the bound is not issued (back-pressure); a chunk whose read has not finished when attention needs
it is waited for, never skipped, and the wait is counted as stall time.

A request's reads go to the threads in parts of up to `part_tokens` tokens, each part read in one task (one
store transaction): a task costs tens of microseconds of Python under the GIL, as much as decoding a small
record, so one task per small record made prefetching slower than reading on the critical path.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from functools import partial

import torch

from .chunk import Chunk, Tier, token_groups


@dataclass
class PrefetchStats:
    issued: int = 0  # reads started ahead of need
    hits: int = 0  # needed chunks whose read had been started ahead
    wasted: int = 0  # prefetched chunks dropped unused
    stall_s: float = 0.0  # time the critical path waited for disk reads


Loaded = tuple[torch.Tensor, torch.Tensor] | Exception  # a chunk's k, v, or the error reading its record


class Prefetcher:
    """load: read, check and decode some chunks' records, returning for each its k, v or the exception its read
    raised (one bad record fails only its own chunk). warm: told, on a reader thread, every batch of chunks a
    request issues before their loads start (a store with a slow source fetches them in one round trip).
    part_tokens: most tokens one reader task loads."""

    def __init__(self, load: Callable[[list[Chunk]], list[Loaded]], threads: int, max_tokens: int,
                 warm: Callable[[list[Chunk]], None] | None = None, part_tokens: int = 1):
        self._load = load
        self._warm = warm
        self.part_tokens = part_tokens
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kvtier-read") if threads else None
        self._pending: dict[bytes, tuple[Chunk, Future, int]] = {}  # chunk key -> (chunk, its part's read, clock)
        self._users: dict[Future, int] = {}  # a part's read -> how many of its chunks are still pending
        self._tokens = 0
        self.max_tokens = max_tokens
        self.stats = PrefetchStats()

    @property
    def staged_tokens(self) -> int:
        return self._tokens

    def request(self, chunks: Sequence[Chunk], clock: int) -> int:
        """Start reading disk-only chunks in the background; returns how many reads were issued."""
        if self._pool is None or not (chunks or self._pending):  # nothing to start or to drop: a decode step's
            return 0  # usual case, per layer
        self._drop_stale(clock)
        chosen: dict[bytes, Chunk] = {}
        tokens = self._tokens
        for chunk in chunks:
            if chunk.tier != Tier.DISK or chunk.key in self._pending or chunk.key in chosen:
                continue
            if tokens + chunk.length > self.max_tokens:
                break  # staging is full: back-pressure
            chosen[chunk.key] = chunk
            tokens += chunk.length
        batch = list(chosen.values())
        # Submitted before the loads, so a reader thread takes it first (the executor's queue is FIFO).
        ahead = self._pool.submit(self._warm, batch) if self._warm is not None and batch else None
        for part in token_groups(batch, self.part_tokens):
            future = self._pool.submit(self._load_after, ahead, part)
            self._users[future] = len(part)
            for chunk in part:
                self._pending[chunk.key] = (chunk, future, clock)
        self._tokens = tokens
        self.stats.issued += len(batch)
        return len(batch)

    def _load_after(self, ahead: Future | None, part: list[Chunk]) -> dict[bytes, Loaded]:
        """Load a part once its batch's warm-up ended (its failure is not this load's: the load reads again)."""
        if ahead is not None:
            wait([ahead])
        loaded = self._load(part)
        return {chunk.key: kv for chunk, kv in zip(part, loaded, strict=True)}

    def pending(self, chunk: Chunk) -> bool:
        """Whether a read of the chunk was started ahead."""
        return chunk.key in self._pending

    def take(self, chunk: Chunk) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The chunk's record (stored row order) if a read was started ahead, waiting for it if needed."""
        item = self._pending.pop(chunk.key, None)
        if item is None:
            return None
        self._tokens -= chunk.length
        part = item[1]
        t = time.perf_counter()
        try:
            kv = part.result().pop(chunk.key)  # the part keeps no reference to a taken chunk's tensors
        finally:
            self.stats.stall_s += time.perf_counter() - t
            self._release(part)
        self.stats.hits += 1
        return _unwrap(kv)  # re-raises a read error (corrupt record, ...) here, on the caller's thread

    def load_now(self, chunk: Chunk) -> tuple[torch.Tensor, torch.Tensor]:
        """A read nobody started ahead: done on the critical path, counted as stall."""
        t = time.perf_counter()
        try:
            (kv,) = self._load([chunk])
        finally:
            self.stats.stall_s += time.perf_counter() - t
        return _unwrap(kv)

    def discard(self, chunk: Chunk) -> None:
        item = self._pending.pop(chunk.key, None)
        if item is not None:
            self._tokens -= chunk.length
            self._let_go(chunk, item[1], cancel=True)

    def _drop_stale(self, clock: int) -> None:
        """Reads requested two or more steps ago and never used: free their staging room."""
        for key, (chunk, fut, when) in list(self._pending.items()):
            if clock - when >= 2 and fut.done():
                del self._pending[key]
                self._tokens -= chunk.length
                self._let_go(chunk, fut, cancel=False)
                self.stats.wasted += 1

    def _let_go(self, chunk: Chunk, part: Future, cancel: bool) -> None:
        """A chunk no longer waited for and not taken: drop its decoded record from its part, now or, while the
        part still runs, when it ends (the part lives on for its other chunks); or cancel the part if no other
        chunk of it is still pending and its read has not started."""
        if self._release(part):
            part.add_done_callback(partial(_forget, chunk.key))  # called at once if the part has ended
        elif cancel:
            part.cancel()

    def _release(self, part: Future) -> bool:
        """One chunk of the part is no longer pending; whether others still are."""
        left = self._users.pop(part) - 1
        if left:
            self._users[part] = left
        return bool(left)

    def close(self) -> None:
        """Wait for the reads running now, cancel the queued ones; later requests issue nothing (chunks are
        then read when needed, by `load_now` or the caller's own read)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._pending.clear()
        self._users.clear()
        self._tokens = 0


def _forget(key: bytes, part: Future) -> None:
    """Drop one chunk's decoded record from its ended part (a reader thread may call this)."""
    if not part.cancelled() and part.exception() is None:
        part.result().pop(key, None)


def _unwrap(kv: Loaded) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(kv, Exception):
        raise kv
    return kv
