"""Background reads of disk records, so decompression and checksums happen off the critical path.

Reader threads run the LMDB read, the zstd decompression and the record checks (zstd and LMDB release
the GIL for the heavy parts); finished chunks wait in a staging area bounded by `max_tokens`. A request
beyond the bound is not issued (back-pressure); a chunk whose read has not finished when attention needs
it is waited for, never skipped, and the wait is counted as stall time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import torch

from .chunk import Chunk, Tier


@dataclass
class PrefetchStats:
    issued: int = 0  # reads started ahead of need
    hits: int = 0  # needed chunks whose read had been started ahead
    wasted: int = 0  # prefetched chunks dropped unused
    stall_s: float = 0.0  # time the critical path waited for disk reads


class Prefetcher:
    """load: read, check and decode one chunk's record. warm: told, on a reader thread, every batch of chunks a
    request issues before their loads start (a store with a slow source fetches them in one round trip)."""

    def __init__(self, load: Callable[[Chunk], tuple[torch.Tensor, torch.Tensor]], threads: int, max_tokens: int,
                 warm: Callable[[list[Chunk]], None] | None = None):
        self._load = load
        self._warm = warm
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kvtier-read") if threads else None
        self._pending: dict[bytes, tuple[Chunk, Future, int]] = {}
        self._tokens = 0
        self.max_tokens = max_tokens
        self.stats = PrefetchStats()

    @property
    def staged_tokens(self) -> int:
        return self._tokens

    def request(self, chunks: Iterable[Chunk], clock: int) -> int:
        """Start reading disk-only chunks in the background; returns how many reads were issued."""
        if self._pool is None:
            return 0
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
        for chunk in batch:
            self._pending[chunk.key] = (chunk, self._pool.submit(self._load_after, ahead, chunk), clock)
        self._tokens = tokens
        self.stats.issued += len(batch)
        return len(batch)

    def _load_after(self, ahead: Future | None, chunk: Chunk) -> tuple[torch.Tensor, torch.Tensor]:
        """Load a chunk once its batch's warm-up ended (its failure is not this load's: the load reads again)."""
        if ahead is not None:
            wait([ahead])
        return self._load(chunk)

    def pending(self, chunk: Chunk) -> bool:
        """Whether a read of the chunk was started ahead."""
        return chunk.key in self._pending

    def take(self, chunk: Chunk) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The chunk's record (stored row order) if a read was started ahead, waiting for it if needed."""
        item = self._pending.pop(chunk.key, None)
        if item is None:
            return None
        self._tokens -= chunk.length
        t = time.perf_counter()
        kv = item[1].result()  # re-raises a read error (corrupt record, ...) here, on the caller's thread
        self.stats.stall_s += time.perf_counter() - t
        self.stats.hits += 1
        return kv

    def load_now(self, chunk: Chunk) -> tuple[torch.Tensor, torch.Tensor]:
        """A read nobody started ahead: done on the critical path, counted as stall."""
        t = time.perf_counter()
        kv = self._load(chunk)
        self.stats.stall_s += time.perf_counter() - t
        return kv

    def discard(self, chunk: Chunk) -> None:
        item = self._pending.pop(chunk.key, None)
        if item is not None:
            self._tokens -= chunk.length
            item[1].cancel()

    def _drop_stale(self, clock: int) -> None:
        """Reads requested two or more steps ago and never used: free their staging room."""
        for key, (chunk, fut, when) in list(self._pending.items()):
            if clock - when >= 2 and fut.done():
                del self._pending[key]
                self._tokens -= chunk.length
                self.stats.wasted += 1

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()
        self._tokens = 0
