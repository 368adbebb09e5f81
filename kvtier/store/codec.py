"""Disk record format: a fixed binary header plus a checked payload. Never pickle: a store is data, never code.

Record layout, version 3 (little-endian)::

    +--------+--------+-------+-------+-------+----------+-------+--------+-------+-------+----------+
    | magic  | layout | flags | dtype | layer | chunk id | start | length | batch | heads | head_dim |
    +--------+--------+-------+-------+-------+----------+-------+--------+-------+-------+----------+
    | raw bytes | payload bytes | model signature (16 B) | session id (16 B) | header crc32 | payload    |
    +-----------+---------------+------------------------+-------------------+--------------+------------+

A record is bound to its place: the reader says which record it expects (session, layer, chunk, start,
length, shape, dtype, lossless or int8) and every field must match before anything is decompressed, so a
record read from anywhere but its own slot (another chunk, another session of the same model, another
store) is detected, and a damaged size can never make zstd allocate more than the chunk's shape needs.
The session id is the id of the cache that wrote the record (a fresh one each time a cache is created or
a session reopened), so records of two continuations of one saved session never pass for each other.

The values are K then V, both `[batch, heads, length, head_dim]`. By default (FLAG_RAW) the payload is those
bytes as they are followed by their XXH3-64: KV barely compresses (1.1-1.2x at zstd's fast levels), and a
raw record is checked where it lies (XXH3 runs at tens of GB/s) and copied into place once, where a zstd
frame's XXH64 content checksum and its copy out of the frame cost a few times more
(docs/benchmarks.md). With a `zstd_level` (FLAG_ZSTD) the payload is one zstd frame with its content
checksum, optionally of the values split into byte planes (all first bytes, then all second bytes, ...):
the exponent bytes repeat a lot and compress better apart from the noisy mantissa bytes. Either encoding
reads back whatever the reader's own setting. The header carries its own crc32.

Opt-in lossy records (FLAG_INT8, for chunks that get little attention) store K and V as int8 with a
float32 absmax scale per batch row, head and channel (keys have outlier channels, so per-channel scales
keep their error small); the payload is the scales followed by the int8 values.
"""

from __future__ import annotations

import struct
import threading
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import xxhash
import zstandard

from ..errors import StoreCorruptError, StoreMismatchError, brief
from ..kernels import native
from .chunk import chunk_name

LAYOUT_VERSION = 3
MAGIC = b"KVT2"
OLD_MAGICS = {b"KVT1": 1}
FLAG_BYTE_PLANES = 1
FLAG_ZSTD = 2
FLAG_INT8 = 4  # lossy: int8 values with a float32 scale per (row, head, channel), for K and V
FLAG_RAW = 8  # lossless values as they are, followed by their XXH3-64 (little-endian): no zstd frame
_KNOWN_FLAGS = FLAG_BYTE_PLANES | FLAG_ZSTD | FLAG_INT8 | FLAG_RAW
RAW_CHECK_BYTES = 8
# KV compresses 1.1-1.3x lossless and 2-4x as int8 (docs/benchmarks/codec.json): a record claiming far more
# is damaged or hostile, and is refused before zstd allocates for it.
MAX_COMPRESSION_RATIO = 64


def max_raw_bytes(payload_bytes: int) -> int:
    """The most decoded bytes a payload of this size may claim (MAX_COMPRESSION_RATIO, and a page of slack
    for records too small to compress)."""
    return MAX_COMPRESSION_RATIO * payload_bytes + 4096

# zstd levels a store may use: 1-22, and the fast negative levels (zstd's --fast=N is level -N), which search
# less and store incompressible blocks raw, so they decode close to memcpy speed. 0 (zstd's "default") is
# refused: say 3 instead. The level only matters when writing: every level writes the same frame format.
MIN_ZSTD_LEVEL = -(1 << 17)  # ZSTD_minCLevel()
MAX_ZSTD_LEVEL = 22


def check_zstd_level(level: object, name: str = "zstd_level") -> None:
    """Raise ValueError unless `level` is a zstd level kvtier writes with, or None (raw records)."""
    if level is None:
        return
    if isinstance(level, bool) or not isinstance(level, int) or not MIN_ZSTD_LEVEL <= level <= MAX_ZSTD_LEVEL \
            or level == 0:
        raise ValueError(f"`{name}` must be an integer in [1, {MAX_ZSTD_LEVEL}] or a fast level in "
                         f"[{MIN_ZSTD_LEVEL}, -1], or None for raw records, got {brief(level)}")


def check_encoding(zstd_level: int | None, byte_planes: bool) -> None:
    """Raise ValueError for a level kvtier cannot write, or byte planes without zstd (planes only help zstd)."""
    check_zstd_level(zstd_level)
    if byte_planes and zstd_level is None:
        raise ValueError("`byte_planes` needs a `zstd_level`: the planes only help zstd compress, and raw records "
                         "store values as they are")


_HEADER = struct.Struct("<4sHHBxxxIQQIIIIQQ16s16s")
_HEADER_CRC = struct.Struct("<I")
HEADER_BYTES = _HEADER.size + _HEADER_CRC.size
SESSION_ID_BYTES = 16

DTYPE_CODES: dict[torch.dtype, int] = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3, torch.float64: 4}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


STREAM_BYTES = 1 << 17  # pieces from this size on are written past the CPU cache (below, the call costs more)


def place_bytes(out: np.ndarray, values: np.ndarray) -> None:
    """out[...] = values, a decoded record's bytes into their place (an arena's slots, a staging buffer): by
    streaming stores where the piece is large, since nothing reads it again before the next records have
    pushed it out of the CPU cache (an attention-heavy 8k session's `warm()`: 44.8 -> 37.8 ms), else np.copyto
    (records of a few heads: the call's cost outweighed the gain, 51.6 -> 63.6 ms at 32k on Qwen2.5-0.5B's
    shape)."""
    if values.nbytes < STREAM_BYTES or not native.stream_planes(out, values):
        np.copyto(out, values)


@dataclass(slots=True)
class RecordHeader:
    """What a record holds. Readers build the one they expect and `decode` compares every field.

    Not frozen: a read builds one per record, and a frozen dataclass's __init__ (a setattr call per field) took
    3.1 us against 0.6 us, a tenth of the Python a 65 KB record's read costs. Treat it as a value."""

    layer: int
    chunk_id: int
    start: int
    length: int
    batch: int
    heads: int
    head_dim: int
    dtype: torch.dtype
    signature: bytes  # first 16 bytes of the model signature
    session: bytes = bytes(SESSION_ID_BYTES)  # id of the cache that wrote the record
    layout_version: int = LAYOUT_VERSION
    flags: int = 0  # expected records: FLAG_INT8 when the record is lossy, else 0
    raw_nbytes: int = 0
    payload_nbytes: int = 0

    @property
    def lossy(self) -> bool:
        return bool(self.flags & FLAG_INT8)

    def raw_size(self) -> int:
        """Decompressed bytes of a record of this shape: K and V (or their int8 values and scales)."""
        b, h, n, d = self.batch, self.heads, self.length, self.head_dim
        if self.lossy:
            return 2 * (4 * b * h * d) + 2 * b * h * n * d
        return 2 * self.dtype.itemsize * b * h * n * d


# Byte planes with whole-array numpy operations. A plane is the truncation to uint8 of the little-endian words
# that start at its byte offset (numpy casts those contiguously, unaligned or not, at tens of GB/s), and
# interleaving widens the top plane to words and shifts the lower planes in. Both avoid per-byte strided
# copies, which numpy runs at about one byte per cycle (3.5 GB/s here, slower than zstd at its fast levels).
_WORDS = {2: np.dtype("<u2"), 4: np.dtype("<u4"), 8: np.dtype("<u8")}
_BLOCK = 1 << 16  # values per block when interleaving


def _to_planes(parts: list[np.ndarray], itemsize: int) -> np.ndarray:
    """Byte planes of the concatenated `parts` (uint8 arrays of whole values), without concatenating them:
    [v0b0 v0b1 v1b0 v1b1 ...] -> [v0b0 v1b0 ... | v0b1 v1b1 ...]."""
    word = _WORDS[itemsize]
    total = sum(part.size for part in parts) // itemsize
    planes = np.empty((itemsize, total), dtype=np.uint8)
    col = 0
    for part in parts:
        n = part.size // itemsize
        for i in range(itemsize):
            # words starting at byte i: the last value's would run past the end, so it is copied alone
            m = n if i == 0 else n - 1
            if m > 0:
                words = np.ndarray((m,), word, part, offset=i, strides=(itemsize,))
                np.copyto(planes[i, col:col + m], words, casting="unsafe")
            if n and i:
                planes[i, col + n - 1] = part[(n - 1) * itemsize + i]
        col += n
    return planes.reshape(-1)


def _from_planes(planes: np.ndarray, itemsize: int) -> np.ndarray:
    """Inverse of `_to_planes`: a new, writable uint8 array of the interleaved values."""
    rows = planes.reshape(itemsize, -1)
    if itemsize > 4:  # 8-byte words: widening and shifting cost more than one strided copy per plane
        out = np.empty_like(planes)
        for i in range(itemsize):
            out[i::itemsize] = rows[i]
        return out
    words = np.empty(rows.shape[1], dtype=_WORDS[itemsize])
    for a in range(0, rows.shape[1], _BLOCK):  # blocks that stay in cache across the passes
        block, cols = words[a:a + _BLOCK], slice(a, a + _BLOCK)
        np.copyto(block, rows[itemsize - 1, cols])
        for i in range(itemsize - 2, -1, -1):
            block <<= 8
            block |= rows[i, cols]
    return words.view(np.uint8)


def _as_bytes(t: torch.Tensor) -> np.ndarray:
    t = t.detach().to("cpu").contiguous()
    return t.view(torch.uint8).numpy().reshape(-1)


def _quantize(t: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """t: [B, H, n, D] -> (scales [B, H, 1, D] float32, values int8)."""
    tf = t.detach().float().cpu()
    scale = tf.abs().amax(dim=2, keepdim=True).clamp(min=1e-12) / 127.0
    q = torch.round(tf / scale).clamp(-127, 127).to(torch.int8)
    return scale.numpy().reshape(-1), q.numpy().reshape(-1)


class RecordCodec:
    """Encodes a chunk's K and V into one record and back, checking everything on the way in.

    Thread-safe: each thread gets its own zstd contexts (reader threads decode concurrently)."""

    def __init__(self, zstd_level: int | None = None, byte_planes: bool = False):  # KVTierConfig's defaults
        check_encoding(zstd_level, byte_planes)
        self.zstd_level = zstd_level
        self.byte_planes = byte_planes
        self._local = threading.local()

    @property
    def _compressor(self) -> zstandard.ZstdCompressor:
        if not hasattr(self._local, "c"):
            level = -1 if self.zstd_level is None else self.zstd_level  # raw codecs compress int8 records fast
            self._local.c = zstandard.ZstdCompressor(level=level, write_checksum=True)
        return self._local.c

    @property
    def _decompressor(self) -> zstandard.ZstdDecompressor:
        if not hasattr(self._local, "d"):
            self._local.d = zstandard.ZstdDecompressor()
        return self._local.d

    def _decompress_into(self, payload: memoryview, out: np.ndarray) -> int:
        """Decompress one frame straight into `out` (zstd cannot write past it); returns how many bytes the
        frame held (more than `out` holds counts as its size + 1)."""
        got, size = 0, out.size
        with self._decompressor.stream_reader(payload) as reader:
            while got < size and (n := reader.readinto(out[got:])):
                got += n
            # read to the frame's end: zstd checks the content checksum there, and a longer frame shows
            got += len(reader.read(1))
        return got

    def encode(self, header: RecordHeader, k: torch.Tensor, v: torch.Tensor, lossy: bool = False) -> bytes:
        """k, v: [batch, heads, length, head_dim]. lossy: store int8 values with per-channel scales."""
        if k.dtype not in DTYPE_CODES:
            raise StoreMismatchError(f"cannot store dtype {k.dtype}; supported: {list(map(dtype_name, DTYPE_CODES))}")
        flags = FLAG_ZSTD
        if lossy:
            (sk, qk), (sv, qv) = _quantize(k), _quantize(v)
            raw = np.concatenate([sk.view(np.uint8), sv.view(np.uint8), qk.view(np.uint8), qv.view(np.uint8)])
            flags |= FLAG_INT8
        elif self.zstd_level is None:
            raw = np.concatenate([_as_bytes(k), _as_bytes(v)])
            payload = raw.tobytes() + xxhash.xxh3_64_intdigest(raw).to_bytes(RAW_CHECK_BYTES, "little")
            return _pack_header(header, FLAG_RAW, DTYPE_CODES[k.dtype], raw.nbytes, len(payload)) + payload
        else:
            parts, itemsize = [_as_bytes(k), _as_bytes(v)], k.element_size()
            if self.byte_planes and itemsize > 1:
                raw = _to_planes(parts, itemsize)
                flags |= FLAG_BYTE_PLANES
            else:
                raw = np.concatenate(parts)
        payload = self._compressor.compress(raw)  # zstd reads the array's buffer: no copy to bytes
        return _pack_header(header, flags, DTYPE_CODES[k.dtype], raw.nbytes, len(payload)) + payload

    @staticmethod
    def read_header(blob: bytes | memoryview, name: str) -> RecordHeader:
        """The record's header, checked for damage (magic, layout version, crc, dtype, flags); not its place.
        `blob` may be a view of the mapped store: the header is copied out once and parsed from the copy."""
        magic = bytes(blob[:4])
        if magic in OLD_MAGICS:
            raise StoreMismatchError(
                f"{name}: record has layout version {OLD_MAGICS[magic]}, written by an older kvtier; this "
                f"kvtier reads version {LAYOUT_VERSION}. Prefill the document again."
            )
        if len(blob) < HEADER_BYTES:
            raise StoreCorruptError(f"{name}: record truncated to {len(blob)} bytes (header needs {HEADER_BYTES})")
        head = bytes(blob[: _HEADER.size])
        (crc,) = _HEADER_CRC.unpack_from(blob, _HEADER.size)
        fields = _HEADER.unpack(head)
        if fields[0] != MAGIC:
            raise StoreCorruptError(f"{name}: not a kvtier record (bad magic {fields[0]!r})")
        if zlib.crc32(head) != crc:
            raise StoreCorruptError(f"{name}: header checksum mismatch (record corrupted)")
        (_, layout, flags, dtype_code, layer, chunk_id, start, length, batch, heads, head_dim, raw_nbytes,
         payload_nbytes, signature, session) = fields
        if layout != LAYOUT_VERSION:
            raise StoreMismatchError(
                f"{name}: record layout version {layout}, this kvtier reads version {LAYOUT_VERSION}"
            )
        if dtype_code not in CODE_DTYPES:
            raise StoreCorruptError(f"{name}: unknown dtype code {dtype_code}")
        if flags & ~_KNOWN_FLAGS or not flags & (FLAG_ZSTD | FLAG_RAW) or (
                flags & FLAG_RAW and flags != FLAG_RAW):  # raw: lossless values as they are, nothing else
            raise StoreCorruptError(f"{name}: unknown record flags {flags:#x}")
        return RecordHeader(layer, chunk_id, start, length, batch, heads, head_dim, CODE_DTYPES[dtype_code],
                            signature, session, layout, flags, raw_nbytes, payload_nbytes)

    def decode(self, blob: bytes | memoryview, expect: RecordHeader,
               where: str = "") -> tuple[torch.Tensor, torch.Tensor]:
        """Check that `blob` is exactly the record `expect` describes, then decode it: k, v [B, H, n, D].
        where: prefixed to error messages (the store)."""
        flags, raw, payload = self._checked(blob, expect, where)
        return self._tensors(self._decode(payload, raw, flags, where, expect, np.empty(raw, dtype=np.uint8)), expect,
                             flags)

    def decode_into(self, blob: bytes | memoryview, expect: RecordHeader,
                    pieces: list[tuple[int, np.ndarray, np.ndarray]], where: str = "") -> None:
        """As `decode`, into destinations that together hold the record: pieces (first token in the record,
        k_bytes, v_bytes: the bytes of [B, H, n, D] destinations as uint8 arrays [B, H, n, D * itemsize] of any
        strides, such as `byte_view`s of runs of a device arena's slots or of a range of a staging buffer).
        Every check of `decode` runs before anything is written; each destination is written once."""
        k, v = self.decode_view(blob, expect, where)
        if len(pieces) == 1 and pieces[0][0] == 0 and pieces[0][1].shape == k.shape:  # the whole record, one place
            place_bytes(pieces[0][1], k)
            place_bytes(pieces[0][2], v)
            return
        for a, k_out, v_out in pieces:
            place_bytes(k_out, k[:, :, a:a + k_out.shape[2]])
            place_bytes(v_out, v[:, :, a:a + v_out.shape[2]])

    def decode_view(self, blob: bytes | memoryview, expect: RecordHeader,
                    where: str = "") -> tuple[np.ndarray, np.ndarray]:
        """After every check of `decode`, the record's k and v bytes as uint8 arrays [B, H, n, D * itemsize], to
        be copied where they belong: views of the payload for a raw record (checked where it lies; valid while
        the read transaction that gave `blob` is open), of this thread's decode buffer for a lossless zstd
        record without byte planes (it stays in the CPU cache until copied; valid until this thread's next
        decode), new arrays for other encodings. No tensor is made per record."""
        flags, raw, payload = self._checked(blob, expect, where)
        shape = (expect.batch, expect.heads, expect.length, expect.head_dim * expect.dtype.itemsize)
        if flags & FLAG_RAW:
            k, v = self._raw_values(payload, raw, where, expect).reshape(2, *shape)
        elif flags & (FLAG_INT8 | FLAG_BYTE_PLANES):
            out = np.empty(raw, dtype=np.uint8)
            k, v = self._tensors(self._decode(payload, raw, flags, where, expect, out), expect, flags)
            k, v = byte_view(k), byte_view(v)
        else:
            k, v = self._decompress(payload, raw, _name(where, expect), self._scratch(raw)).reshape(2, *shape)
        return k, v

    def _scratch(self, size: int) -> np.ndarray:
        """This thread's decode buffer, `size` bytes (grown when needed, never shrunk: a record's size)."""
        buf = getattr(self._local, "scratch", None)
        if buf is None or buf.size < size:
            buf = self._local.scratch = np.empty(size, dtype=np.uint8)
        return buf[:size]

    def _checked(self, blob: bytes | memoryview, expect: RecordHeader, where: str) -> tuple[int, int, memoryview]:
        """(flags, decoded size, payload) of a record whose header says it is the one `expect` describes.

        A record usually carries exactly the header its slot would get if written now, which one comparison
        checks (the header's crc32 included). Any other header is read field by field: a record in another
        allowed encoding (raw, zstd, byte planes) passes, anything else raises an error that says which field is
        wrong."""
        payload = memoryview(blob)[HEADER_BYTES:]
        flags = FLAG_ZSTD | FLAG_INT8 if expect.lossy else FLAG_RAW if self.zstd_level is None else FLAG_ZSTD
        raw = expect.raw_size()
        code = DTYPE_CODES.get(expect.dtype)
        if (code is None or len(expect.session) != SESSION_ID_BYTES
                or bytes(blob[:HEADER_BYTES]) != _pack_header(expect, flags, code, raw, len(payload))):
            name = _name(where, expect)
            h = self.read_header(blob, name)
            _check_place(h, expect, name)
            if len(payload) != h.payload_nbytes:
                raise StoreCorruptError(f"{name}: payload truncated ({len(payload)} of {h.payload_nbytes} bytes)")
            flags, raw = h.flags, h.raw_nbytes
        if raw > max_raw_bytes(len(payload)):
            raise StoreCorruptError(
                f"{_name(where, expect)}: record declares {raw} bytes from a {len(payload)}-byte payload, more than "
                f"{MAX_COMPRESSION_RATIO}x: refused before decompressing"
            )
        return flags, raw, payload

    def _decode(self, payload: memoryview, raw: int, flags: int, where: str, expect: RecordHeader,
                out: np.ndarray) -> np.ndarray:
        """The checked payload's `raw` decoded bytes, written into `out` (a copy even for a raw record: `out`
        outlives the read transaction whose mapped bytes the payload may be)."""
        if flags & FLAG_RAW:
            np.copyto(out, self._raw_values(payload, raw, where, expect))
            return out
        return self._decompress(payload, raw, _name(where, expect), out)

    @staticmethod
    def _raw_values(payload: memoryview, raw: int, where: str, expect: RecordHeader) -> np.ndarray:
        """A raw record's values (a view of the payload), once their XXH3-64 matches the one stored after them."""
        if len(payload) != raw + RAW_CHECK_BYTES:
            raise StoreCorruptError(f"{_name(where, expect)}: raw payload of {len(payload)} bytes, its shape needs "
                                    f"{raw + RAW_CHECK_BYTES}")
        values = payload[:raw]
        if xxhash.xxh3_64_intdigest(values) != int.from_bytes(payload[raw:], "little"):
            raise StoreCorruptError(f"{_name(where, expect)}: payload corrupted (checksum mismatch)")
        return np.frombuffer(values, dtype=np.uint8)

    def _decompress(self, payload: memoryview, raw: int, name: str, out: np.ndarray) -> np.ndarray:
        """Decompress the checked payload into `out` (`raw` bytes), the frame's content checksum verified."""
        try:
            # A damaged frame header could claim any size: check it before zstd allocates for it.
            if zstandard.frame_content_size(payload) != raw:
                raise StoreCorruptError(f"{name}: payload corrupted (frame size does not match the header)")
            got = self._decompress_into(payload, out)
        except zstandard.ZstdError as exc:  # includes the frame's content checksum failing
            raise StoreCorruptError(f"{name}: payload corrupted ({exc})") from exc
        if got != raw:
            raise StoreCorruptError(f"{name}: decoded {got} bytes, expected {raw}")
        return out

    @staticmethod
    def _tensors(arr: np.ndarray, h: RecordHeader, flags: int) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [B, H, n, D] over a decoded payload (int8 records dequantized, byte planes interleaved)."""
        b, heads, n, d = h.batch, h.heads, h.length, h.head_dim
        shape = (b, heads, n, d)
        if flags & FLAG_INT8:
            n_scale = b * heads * d * 4
            scales = torch.from_numpy(arr[: 2 * n_scale].view(np.float32)).view(2, b, heads, 1, d)
            values = torch.from_numpy(arr[2 * n_scale:].view(np.int8)).view(2, *shape)
            kv = (values.float() * scales).to(h.dtype)
            return kv[0], kv[1]
        if flags & FLAG_BYTE_PLANES:
            arr = _from_planes(arr, h.dtype.itemsize)
        kv = torch.from_numpy(arr).view(h.dtype).view(2, *shape)
        return kv[0], kv[1]


def byte_view(t: torch.Tensor) -> np.ndarray:
    """The bytes of a CPU tensor [..., D] whose last dimension is contiguous, as a uint8 array [..., D * itemsize]
    sharing its memory (any dtype, bfloat16 too, which numpy lacks)."""
    return t.view(torch.uint8).numpy()


def _pack_header(header: RecordHeader, flags: int, dtype_code: int, raw_nbytes: int, payload_nbytes: int) -> bytes:
    """A record's header bytes, its crc32 included."""
    head = _HEADER.pack(MAGIC, LAYOUT_VERSION, flags, dtype_code, header.layer, header.chunk_id, header.start,
                        header.length, header.batch, header.heads, header.head_dim, raw_nbytes, payload_nbytes,
                        header.signature[:16].ljust(16, b"\0"), header.session)
    return head + _HEADER_CRC.pack(zlib.crc32(head))


def _name(where: str, expect: RecordHeader) -> str:
    """How errors name the record `expect` describes (built only when one is raised: a read makes many)."""
    return where + chunk_name(expect.layer, expect.chunk_id)


def _check_place(h: RecordHeader, expect: RecordHeader, name: str) -> None:
    """Every field of the record's header against what its slot in the session says it must hold."""
    if (h.layer, h.chunk_id) != (expect.layer, expect.chunk_id):
        raise StoreCorruptError(f"{name}: record holds layer {h.layer} chunk {h.chunk_id} instead")
    if h.signature != expect.signature[:16].ljust(16, b"\0"):
        raise StoreMismatchError(f"{name}: record was written by another model (signature mismatch)")
    if h.session != expect.session:
        raise StoreMismatchError(
            f"{name}: record belongs to another session (session id {h.session.hex()[:12]}, the manifest names "
            f"{expect.session.hex()[:12]}); it was copied in from elsewhere"
        )
    if h.dtype != expect.dtype:
        raise StoreMismatchError(f"{name}: record dtype is {dtype_name(h.dtype)}, the cache uses "
                                 f"{dtype_name(expect.dtype)}")
    if (h.start, h.length) != (expect.start, expect.length):
        raise StoreCorruptError(f"{name}: record covers positions {h.start}..{h.start + h.length}, expected "
                                f"{expect.start}..{expect.start + expect.length}")
    if (h.batch, h.heads, h.head_dim) != (expect.batch, expect.heads, expect.head_dim):
        raise StoreCorruptError(f"{name}: record holds [{h.batch}, {h.heads}, {h.length}, {h.head_dim}], expected "
                                f"[{expect.batch}, {expect.heads}, {expect.length}, {expect.head_dim}]")
    if h.lossy != expect.lossy:
        raise StoreCorruptError(f"{name}: record is {'int8' if h.lossy else 'lossless'}, the manifest says "
                                f"{'int8' if expect.lossy else 'lossless'}")
    want = expect.raw_size()
    if h.raw_nbytes != want:
        raise StoreCorruptError(f"{name}: record declares {h.raw_nbytes} decoded bytes, its shape needs {want}")
