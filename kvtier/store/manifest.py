"""The saved-session manifest: what a store's session holds, as typed rows, checked field by field.

The manifest is JSON sealed with a digest (`disk.seal`), so an accidental change is caught before it is
parsed. A store may also come from someone else, digest and all, so parsing checks every field as well:
types and ranges, chunks that tile each layer's positions `[0, length)` with no gap or overlap, row maps
inside their record's batch, declared sizes a record of that shape can have, no more rows than the store
has records, options kvtier can run. Any mismatch raises `StoreCorruptError` naming the field, e.g.
`layers[3].chunks[17].start`. Nothing is allocated for a row before all of them are checked.

Each chunk row names the session (the cache) that wrote its record: records carry that id in their
header, so a record copied in from another session, even under the same key, is detected when read.

Chunk row (one JSON list per chunk, in position order)::

    [chunk_id, start, length, pinned, writer, record_batch, rows, lossy, stored_bytes, importance]

writer indexes `sessions`; rows maps logical batch rows onto the record's rows (null: identity).
"""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..config import MAX_RECORD_TOKENS
from ..errors import StoreCorruptError
from .chunk import ABSTRACT_ID, MAX_CHUNK_ID, PAGES_ID, chunk_key, chunk_name
from .codec import (
    CODE_DTYPES,
    HEADER_BYTES,
    LAYOUT_VERSION,
    RecordHeader,
    dtype_name,
    max_raw_bytes,
)

# Names of a saved session's two metadata entries in any store: the store header and the session manifest.
STORE_META = "store"
SESSION_META = "session"

FULL, SLIDING = "full", "sliding"
_HEX16 = re.compile(r"^[0-9a-f]{32}$")
TOKEN_BYTES = 4
_DTYPES = {dtype_name(d): d for d in CODE_DTYPES.values()}
_SKEW_FIELDS = ("tokens", "top1", "top5", "top10", "desert", "top5_per_head", "desert_per_head")


@dataclass(frozen=True, slots=True)
class ChunkRow:
    chunk_id: int
    start: int
    length: int
    pinned: bool
    session: bytes  # id of the cache that wrote the record
    record_batch: int  # batch rows in the record
    rows: tuple[int, ...] | None  # logical row -> record row; None: identity
    lossy: bool
    stored_bytes: int
    importance: float | None
    record_start: int  # position the record's keys are rotated at (start, unless a removed span moved the chunk)

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass(frozen=True, slots=True)
class Run:
    """An unchunked run of tokens (a recent window, a sliding buffer), written by the saving session."""

    chunk_id: int
    start: int
    length: int


@dataclass(slots=True)
class LayerEntry:
    kind: str
    chunks: list[ChunkRow] = field(default_factory=list)
    tail: Run | None = None  # full layers: the recent window
    buffer: Run | None = None  # sliding layers: the kept tokens
    decode_chunk: int = 0
    skew: dict[str, Any] | None = None  # kvtier.sparse.profile.LayerSkew fields


@dataclass(slots=True)
class Shape:
    """The model facts a manifest is checked against (from the model, or from the store header)."""

    kinds: list[str]  # FULL / SLIDING per layer
    windows: list[int | None]
    kv_heads: int
    head_dim: int
    dtype: torch.dtype


    def kv_bytes(self, batch: int, tokens: int) -> int:
        """Bytes of K and V for `tokens` positions of `batch` rows in one layer, uncompressed."""
        return 2 * batch * tokens * self.kv_heads * self.head_dim * self.dtype.itemsize


@dataclass(slots=True)
class Manifest:
    store_id: str
    session: bytes  # the saving cache's id: it wrote the tails, buffers and abstracts
    sessions: list[bytes]
    signature: str
    dtype: str
    length: int
    batch: int
    next_chunk_id: int
    saved: float
    options: dict[str, Any]
    info: dict[str, Any]
    tokens: bytes | None  # int32 little-endian [batch, length], or None when unknown
    layers: list[LayerEntry]

    # ---------------------------------------------------------------------------------- writing
    def to_json(self) -> dict[str, Any]:
        index = {s: i for i, s in enumerate(self.sessions)}
        layers = []
        for entry in self.layers:
            if entry.kind == SLIDING:
                layers.append({"kind": SLIDING, "buffer": _run_json(entry.buffer)})
                continue
            layers.append({
                "kind": FULL,
                "chunks": [[c.chunk_id, c.start, c.length, c.pinned, index[c.session], c.record_batch,
                            None if c.rows is None else list(c.rows), c.lossy, c.stored_bytes, c.importance,
                            c.record_start]
                           for c in entry.chunks],
                "tail": _run_json(entry.tail),
                "decode_chunk": entry.decode_chunk,
                "skew": entry.skew,
            })
        return {
            "state": "complete", "layout_version": LAYOUT_VERSION, "store_id": self.store_id,
            "session": self.session.hex(), "sessions": [s.hex() for s in self.sessions],
            "signature": self.signature, "dtype": self.dtype, "length": self.length, "batch": self.batch,
            "next_chunk_id": self.next_chunk_id, "saved": self.saved, "options": self.options, "info": self.info,
            "tokens": None if self.tokens is None else base64.b64encode(self.tokens).decode(),
            "layers": layers,
        }

    # ------------------------------------------------------------------------------------ reading
    def abstracts_header(self, layer: int, shape: Shape) -> RecordHeader:
        """The record of a layer's chunk abstracts: one float32 row per chunk."""
        n = len(self.layers[layer].chunks)
        return RecordHeader(layer, ABSTRACT_ID, 0, n, self.batch, shape.kv_heads, shape.head_dim, torch.float32,
                            bytes.fromhex(self.signature), self.session)

    def pages_header(self, layer: int, shape: Shape, page_size: int) -> RecordHeader:
        """The record of a layer's page abstracts: one row per `page_size`-token page of each chunk, in the
        model's dtype."""
        n = sum(-(-c.length // page_size) for c in self.layers[layer].chunks)
        return RecordHeader(layer, PAGES_ID, 0, n, self.batch, shape.kv_heads, shape.head_dim, shape.dtype,
                            bytes.fromhex(self.signature), self.session)

    def record_keys(self) -> list[tuple[bytes, str]]:
        """(key, name) of every record the session refers to: chunks, windows, buffers, abstract tables."""
        out = []
        for i, e in enumerate(self.layers):
            ids = [c.chunk_id for c in e.chunks] + [r.chunk_id for r in (e.tail, e.buffer) if r is not None]
            ids += [ABSTRACT_ID, PAGES_ID] if e.chunks else []
            out += [(chunk_key(i, c), chunk_name(i, c)) for c in ids]
        return out

    def load_keys(self) -> list[bytes]:
        """The records a reopen reads before any chunk, in the order it reads them: each layer's abstract tables,
        recent window and sliding buffer."""
        out = []
        for i, e in enumerate(self.layers):
            ids = [ABSTRACT_ID, PAGES_ID] if e.chunks else []
            ids += [r.chunk_id for r in (e.tail, e.buffer) if r is not None]
            out += [chunk_key(i, c) for c in ids]
        return out

    def check_record_sizes(self, sizes: dict[bytes, int], shape: Shape, where: str) -> None:
        """Every record is as large as the manifest says, measured in the store: a chunk's size is the one it
        was saved with, and a window or buffer holds its tokens within the compression bound. The manifest is
        sealed, not authenticated, so a forged one may claim anything; this bounds what is allocated from its
        lengths (staging buffers, the arena) by bytes the store really holds, before any record is read."""
        for i, entry in enumerate(self.layers):
            for j, c in enumerate(entry.chunks):
                held = sizes[chunk_key(i, c.chunk_id)]
                if held != c.stored_bytes:
                    raise StoreCorruptError(f"{where}: {chunk_name(i, c.chunk_id)}: record holds {held} bytes, "
                                            f"layers[{i}].chunks[{j}] says {c.stored_bytes} (truncated, extended "
                                            "or replaced)")
            for kind, run in (("tail", entry.tail), ("buffer", entry.buffer)):
                if run is None:
                    continue
                held = sizes[chunk_key(i, run.chunk_id)]
                if shape.kv_bytes(self.batch, run.length) > max_raw_bytes(held - HEADER_BYTES):
                    raise StoreCorruptError(f"{where}: layers[{i}].{kind} declares {run.length} tokens, its "
                                            f"{held}-byte record cannot hold them (truncated or replaced)")

    def token_ids(self) -> torch.Tensor | None:
        if self.tokens is None:
            return None
        return torch.frombuffer(bytearray(self.tokens), dtype=torch.int32).view(self.batch, self.length).long()


def _run_json(run: Run | None) -> list[int] | None:
    return None if run is None else [run.chunk_id, run.start, run.length]


# ------------------------------------------------------------------------------------------- parsing
class _Fields:
    """Typed access to untrusted JSON; every failure names the field's path."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, path: str, problem: str) -> StoreCorruptError:
        return StoreCorruptError(f"{self.where}: {path} {problem}")

    def int(self, value: Any, path: str, lo: int = 0, hi: int = 2**63 - 1) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(path, f"is {_show(value)}, expected an integer")
        if not lo <= value <= hi:
            raise self.fail(path, f"is {value}, outside [{lo}, {hi}]")
        return value

    def bool(self, value: Any, path: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(path, f"is {_show(value)}, expected true or false")
        return value

    def number(self, value: Any, path: str, allow_none: bool = True) -> float | None:
        if value is None and allow_none:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise self.fail(path, f"is {_show(value)}, expected a finite number >= 0")
        return float(value)

    def list(self, value: Any, path: str, n: int | None = None, max_len: int | None = None) -> list:
        if not isinstance(value, list):
            raise self.fail(path, f"is {_show(value)}, expected a list")
        if n is not None and len(value) != n:
            raise self.fail(path, f"has {len(value)} entries, expected {n}")
        if max_len is not None and len(value) > max_len:
            raise self.fail(path, f"has {len(value)} entries, more than the store's {max_len} records")
        return value

    def dict(self, value: Any, path: str) -> dict:
        if not isinstance(value, dict):
            raise self.fail(path, f"is {_show(value)}, expected an object")
        return value

    def hex16(self, value: Any, path: str) -> bytes:
        if not isinstance(value, str) or not _HEX16.match(value):
            raise self.fail(path, f"is {_show(value)}, expected a 32-digit hex id")
        return bytes.fromhex(value)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def parse(obj: Any, *, where: str, header: dict[str, Any], shape: Shape, records: int, data_bytes: int,
          check_options: Callable[[dict[str, Any]], None]) -> Manifest:
    """Check an untrusted manifest completely, then build it.

    header: the store's (checked) header; records: how many records the store holds; data_bytes: size of
    its data file; check_options(options) raises ValueError for options kvtier cannot run."""
    f = _Fields(where)
    m = f.dict(obj, "the manifest")
    if m.get("state") != "complete":
        raise f.fail("state", f"is {_show(m.get('state'))}, expected 'complete'")
    if m.get("layout_version") != LAYOUT_VERSION:
        raise f.fail("layout_version", f"is {_show(m.get('layout_version'))}, expected {LAYOUT_VERSION}")
    for name in ("store_id", "signature", "dtype"):
        if m.get(name) != header.get(name):
            raise f.fail(name, f"is {_show(m.get(name))}, the store header says {_show(header.get(name))}")
    session = f.hex16(m.get("session"), "session")
    sessions = [f.hex16(s, f"sessions[{i}]") for i, s in
                enumerate(f.list(m.get("sessions"), "sessions", max_len=records + 1))]
    if session not in sessions:
        raise f.fail("session", "is not listed in sessions")
    length = f.int(m.get("length"), "length")
    batch = f.int(m.get("batch"), "batch", 1, 2**31)
    next_id = f.int(m.get("next_chunk_id"), "next_chunk_id", 0, MAX_CHUNK_ID + 1)
    saved = f.number(m.get("saved"), "saved", allow_none=False)
    options = f.dict(m.get("options"), "options")
    try:
        check_options(options)
    except (ValueError, TypeError) as exc:
        raise f.fail("options", f"cannot be run: {exc}") from None
    info = f.dict(m.get("info", {}), "info")
    structure = header.get("structure")
    vocab = structure.get("vocab_size") if isinstance(structure, dict) else None
    tokens = _tokens(f, m.get("tokens"), batch, length, vocab if isinstance(vocab, int) and vocab > 0 else None)
    layouts = header["layout"]
    layers_json = f.list(m.get("layers"), "layers", n=len(shape.kinds))
    layers: list[LayerEntry] = []
    rows_seen = 0
    for i, raw in enumerate(layers_json):
        entry = f.dict(raw, f"layers[{i}]")
        want = FULL if shape.kinds[i] == FULL else SLIDING
        if entry.get("kind") != want:
            raise f.fail(f"layers[{i}].kind", f"is {_show(entry.get('kind'))}, the model's layer is {want}")
        if want == SLIDING:
            buf = _run(f, entry.get("buffer"), f"layers[{i}].buffer", next_id)
            window = shape.windows[i] or 1
            most, least = window - 1 + layouts["recent_window"], min(length, window - 1)
            held = 0 if buf is None else buf.length
            if (buf is not None and buf.start + buf.length != length) or not least <= held <= most:
                raise f.fail(f"layers[{i}].buffer", f"holds {held} tokens ending at "
                             f"{length if buf is None else buf.start + buf.length}; this sliding layer needs the last "
                             f"{least} to {most} of the session's {length} positions")
            layers.append(LayerEntry(SLIDING, buffer=buf))
            continue
        rows = f.list(entry.get("chunks"), f"layers[{i}].chunks", max_len=records)
        rows_seen += len(rows)
        if rows_seen > records:
            raise f.fail(f"layers[{i}].chunks", f"brings the chunk count to {rows_seen}, more than the store's "
                         f"{records} records")
        chunks = [_chunk(f, r, f"layers[{i}].chunks[{j}]", sessions, batch, next_id, shape, data_bytes)
                  for j, r in enumerate(rows)]
        tail = _run(f, entry.get("tail"), f"layers[{i}].tail", next_id)
        _check_tiling(f, i, chunks, tail, length, layouts)
        pages = sum(-(-c.length // layouts["page_size"]) for c in chunks)
        if pages > MAX_RECORD_TOKENS:  # one row per page in the layer's page-abstract record
            raise f.fail(f"layers[{i}].chunks", f"hold {pages} pages, more than a record holds ({MAX_RECORD_TOKENS})")
        # decoding seals the window at this granularity, which never exceeds chunk_size (sparse.plan)
        decode_chunk = f.int(entry.get("decode_chunk"), f"layers[{i}].decode_chunk", 1, layouts["chunk_size"])
        layers.append(LayerEntry(FULL, chunks, tail, decode_chunk=decode_chunk,
                                 skew=_skew(f, entry.get("skew"), f"layers[{i}].skew", shape.kv_heads)))
    manifest = Manifest(m["store_id"], session, sessions, m["signature"], m["dtype"], length, batch, next_id,
                        saved, options, info, tokens, layers)
    stored = sum(c.stored_bytes for e in layers for c in e.chunks)
    if stored > data_bytes:
        raise f.fail("layers", f"declare {stored} stored bytes, the data file holds {data_bytes}")
    return manifest


def _tokens(f: _Fields, value: Any, batch: int, length: int, vocab: int | None) -> bytes | None:
    """The token ids, int32 [batch, length], each an id of the model's vocabulary (when the header names its size)."""
    if value is None:
        return None
    if not isinstance(value, str) or len(value) != 4 * math.ceil(TOKEN_BYTES * batch * length / 3):
        raise f.fail("tokens", f"do not hold {batch} x {length} token ids")
    try:
        raw = base64.b64decode(value, validate=True)
    except ValueError:
        raise f.fail("tokens", "are not valid base64") from None
    if len(raw) != TOKEN_BYTES * batch * length:
        raise f.fail("tokens", f"hold {len(raw)} bytes, expected {TOKEN_BYTES * batch * length}")
    ids = np.frombuffer(raw, dtype="<i4")
    bad = np.flatnonzero((ids < 0) | (ids >= (vocab or 2**31)))
    if bad.size:
        row, pos = divmod(int(bad[0]), length)
        allowed = f"[0, {vocab})" if vocab else "ids >= 0"
        raise f.fail(f"tokens[{row}][{pos}]", f"is {int(ids[bad[0]])}, outside the model's vocabulary {allowed}")
    return raw


def _run(f: _Fields, value: Any, path: str, next_id: int) -> Run | None:
    if value is None:
        return None
    chunk_id, start, length = f.list(value, path, n=3)
    return Run(f.int(chunk_id, f"{path}[0] (chunk id)", 0, next_id - 1), f.int(start, f"{path}[1] (start)"),
               f.int(length, f"{path}[2] (length)", 1, MAX_RECORD_TOKENS))


def _chunk(f: _Fields, value: Any, path: str, sessions: list[bytes], batch: int, next_id: int, shape: Shape,
           data_bytes: int) -> ChunkRow:
    fields = f.list(value, path)
    if len(fields) not in (10, 11):  # sessions saved before spans could be removed have no record_start
        raise f.fail(path, f"has {len(fields)} fields, expected 11")
    (chunk_id, start, length, pinned, writer, record_batch, rows, lossy, stored, importance) = fields[:10]
    record_start = fields[10] if len(fields) == 11 else start
    record_batch = f.int(record_batch, f"{path}.record_batch", 1, 2**31)
    if rows is None:
        if record_batch != batch:
            raise f.fail(f"{path}.record_batch", f"is {record_batch} with no row map, the session's batch is {batch}")
    else:
        rows = tuple(f.int(r, f"{path}.rows[{k}]", 0, record_batch - 1)
                     for k, r in enumerate(f.list(rows, f"{path}.rows", n=batch)))
    row = ChunkRow(f.int(chunk_id, f"{path}.chunk_id", 0, next_id - 1), f.int(start, f"{path}.start"),
                   f.int(length, f"{path}.length", 1, MAX_RECORD_TOKENS), f.bool(pinned, f"{path}.pinned"),
                   sessions[f.int(writer, f"{path}.writer", 0, len(sessions) - 1)], record_batch, rows,
                   f.bool(lossy, f"{path}.lossy"), f.int(stored, f"{path}.stored_bytes", HEADER_BYTES + 1, data_bytes),
                   f.number(importance, f"{path}.importance"), f.int(record_start, f"{path}.record_start"))
    raw = RecordHeader(0, 0, 0, row.length, record_batch, shape.kv_heads, shape.head_dim, shape.dtype, b"",
                       flags=4 if row.lossy else 0).raw_size()
    if raw > max_raw_bytes(row.stored_bytes - HEADER_BYTES):
        raise f.fail(path, f"declares {row.length} tokens ({raw} bytes) in a {row.stored_bytes}-byte record")
    return row


def _check_tiling(f: _Fields, i: int, chunks: list[ChunkRow], tail: Run | None, length: int,
                  layout: dict[str, int]) -> None:
    """Chunks, then the window, cover [0, length) exactly once, in order."""
    pos = 0
    for j, c in enumerate(chunks):
        if c.start != pos:
            raise f.fail(f"layers[{i}].chunks[{j}].start", f"is {c.start}, expected {pos} (chunks must tile "
                         f"[0, {length}) in order)")
        # the sink's chunks open a layer: one, or its pieces where a removed span cut it
        if c.pinned and j > 0 and not chunks[j - 1].pinned:
            raise f.fail(f"layers[{i}].chunks[{j}].pinned", "is true for a chunk after an unpinned one (only the "
                         "sink's chunks, which open a layer, are pinned)")
        pos = c.end
    if tail is not None:
        if tail.start != pos:
            raise f.fail(f"layers[{i}].tail", f"starts at {tail.start}, expected {pos}")
        pos = tail.start + tail.length
    if pos != length:
        raise f.fail(f"layers[{i}]", f"covers positions [0, {pos}), the session holds {length}")
    if len({c.chunk_id for c in chunks} | ({tail.chunk_id} if tail else set())) != len(chunks) + (tail is not None):
        raise f.fail(f"layers[{i}].chunks", "repeat a chunk id")


def _skew(f: _Fields, value: Any, path: str, kv_heads: int) -> dict[str, Any] | None:
    """The attention skew measured at prefill (`kvtier.sparse.profile.LayerSkew` as a dict)."""
    if value is None:
        return None
    d = f.dict(value, path)
    if set(d) != set(_SKEW_FIELDS):
        raise f.fail(path, f"has fields {sorted(d)}, expected {sorted(_SKEW_FIELDS)}")
    out: dict[str, Any] = {"tokens": f.int(d["tokens"], f"{path}.tokens")}
    for name in ("top1", "top5", "top10", "desert"):
        out[name] = f.number(d[name], f"{path}.{name}", allow_none=False)
    for name in ("top5_per_head", "desert_per_head"):
        out[name] = [f.number(x, f"{path}.{name}[{k}]", allow_none=False)
                     for k, x in enumerate(f.list(d[name], f"{path}.{name}", n=kv_heads))]
    return out


def parse_shape(header: dict[str, Any], where: str) -> Shape:
    """Model facts from a store header (for reading a store without its model), checked like a manifest."""
    f = _Fields(where)
    s = f.dict(header.get("structure"), "structure")
    layers = f.list(s.get("layers"), "structure.layers", max_len=4096)
    kinds, windows = [], []
    for i, layer in enumerate(layers):
        kind, window = f.list(layer, f"structure.layers[{i}]", n=2)
        if kind not in ("full_attention", "sliding_attention"):
            raise f.fail(f"structure.layers[{i}]", f"has kind {_show(kind)}")
        kinds.append(FULL if kind == "full_attention" else SLIDING)
        windows.append(None if window is None else f.int(window, f"structure.layers[{i}] window", 1))
    if not isinstance(header.get("dtype"), str) or header["dtype"] not in _DTYPES:
        raise f.fail("dtype", f"is {_show(header.get('dtype'))}")
    layout = f.dict(header.get("layout"), "layout")
    for name in ("chunk_size", "sink_tokens", "recent_window", "page_size"):  # each a record's length, or a part
        f.int(layout.get(name), f"layout.{name}", 0, MAX_RECORD_TOKENS)
    return Shape(kinds, windows, f.int(s.get("kv_heads"), "structure.kv_heads", 1, 2**16),
                 f.int(s.get("head_dim"), "structure.head_dim", 1, 2**16), _DTYPES[header["dtype"]])
