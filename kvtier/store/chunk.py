"""Chunk metadata: plain Python, kept apart from the tensors that hold the KV.

A chunk is a run of consecutive logical positions of one layer, for every batch row and KV head.
Its tensors live in exactly one of the device pool or the host pool, or only on disk; a disk copy,
once written, stays valid (sealed KV never changes), so evicting a chunk that already has one costs
no write.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch


class Tier(enum.IntEnum):
    DEVICE = 0
    HOST = 1
    DISK = 2


@dataclass(slots=True, eq=False)
class Chunk:
    layer: int
    chunk_id: int
    start: int  # first logical position
    length: int  # tokens
    tier: Tier
    stored_batch: int  # batch rows of the disk record (set when it is written)
    rows: torch.Tensor | None = None  # logical batch row -> row of the host copy; None: identity
    disk_rows: torch.Tensor | None = None  # logical batch row -> row of the disk record; None: identity
    slots: torch.Tensor | None = None  # device-pool slot of each token, while tier == DEVICE
    on_disk: bool = False  # a valid disk record exists
    pinned: bool = False  # attention sinks: never evicted from the device
    persisted: bool = False  # referenced by a saved session: its record outlives this cache
    last_used: int = 0  # step counter of the last read, for eviction
    row: int = -1  # index in the layer's chunk table (and its abstract table)
    importance: float | None = None  # attention mass relative to a uniform share (1.0), from profiling
    selected: int = 0  # decode steps that selected it since the last refinement
    writer: bytes = b""  # session id of the cache that wrote the disk record (records are bound to it)
    lossy: bool = False  # the disk record holds int8 values
    record_start: int | None = None  # position the disk record's keys are rotated at (None: `start`)
    key: bytes = field(init=False, repr=False)  # the record's key (read on every access: packed once)

    def __post_init__(self) -> None:
        self.key = chunk_key(self.layer, self.chunk_id)

    @property
    def record_shift(self) -> int:
        """Positions the chunk moved since its disk record was written (a span removed before it): its keys
        read from disk are turned by this much before use. Records never change, so nothing is rewritten."""
        return 0 if self.record_start is None else self.start - self.record_start

    @property
    def end(self) -> int:
        return self.start + self.length

    def name(self) -> str:
        return chunk_name(self.layer, self.chunk_id)

    def remap_rows(self, index: torch.Tensor) -> None:
        """Compose a batch reorder/select/repeat (`new_row[i] = old_row[index[i]]`) without moving data."""
        index = index.to("cpu", torch.long)
        self.rows = index.clone() if self.rows is None else self.rows[index]


ABSTRACT_ID = 2**64 - 1  # chunk id under which a layer's chunk abstracts are stored
PAGES_ID = 2**64 - 2  # chunk id under which a layer's page abstracts are stored
MAX_CHUNK_ID = PAGES_ID - 1  # the last id a chunk can have: the ids above name a layer's abstract tables
TABLE_NAMES = {ABSTRACT_ID: "chunk abstracts", PAGES_ID: "page abstracts"}


def chunk_key(layer: int, chunk_id: int) -> bytes:
    # Big-endian so records sort by layer, then chunk id.
    return b"c" + struct.pack(">IQ", layer, chunk_id)


def chunk_name(layer: int, chunk_id: int) -> str:
    """How messages name a record: a chunk, or one of a layer's abstract tables."""
    if chunk_id in TABLE_NAMES:
        return f"layer {layer} {TABLE_NAMES[chunk_id]}"
    return f"layer {layer} chunk {chunk_id}"


def key_name(key: bytes) -> str:
    """`chunk_name` of a record key (`chunk_key`'s inverse); an unknown key by its first bytes."""
    if len(key) == 13 and key[:1] == b"c":
        return chunk_name(*struct.unpack(">IQ", key[1:]))
    return f"record {key.hex()[:40]}"


def token_groups(chunks: list[Chunk], limit: int) -> Iterator[list[Chunk]]:
    """Consecutive runs of chunks holding at most `limit` tokens each (a single larger chunk: a run of its own)."""
    group, size = [], 0
    for chunk in chunks:
        if group and size + chunk.length > limit:
            yield group
            group, size = [], 0
        group.append(chunk)
        size += chunk.length
    if group:
        yield group


def group_positions(chunks: list[Chunk], device: torch.device | str = "cpu") -> torch.Tensor:
    """The logical positions of the chunks' tokens, one after another ([n]): a few numpy operations whatever
    the number of chunks (one `arange` per chunk costs more than the attention over small ones; the same in torch
    ops took 74 us for 128 chunks, 22 us in numpy)."""
    if len(chunks) == 1:
        return torch.arange(chunks[0].start, chunks[0].end, device=device)
    lengths = np.fromiter((c.length for c in chunks), np.int64, len(chunks))
    first = np.fromiter((c.start for c in chunks), np.int64, len(chunks)) - (lengths.cumsum() - lengths)
    return torch.from_numpy(np.repeat(first, lengths) + np.arange(lengths.sum(), dtype=np.int64)).to(device)
