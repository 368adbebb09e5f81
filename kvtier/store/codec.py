"""Disk record format: a fixed binary header plus a zstd payload. Never pickle: a store is data, never code.

Record layout (little-endian)::

    +--------+--------+-------+-------+-------+----------+-------+--------+-------+-------+----------+
    | magic  | layout | flags | dtype | layer | chunk id | start | length | batch | heads | head_dim |
    +--------+--------+-------+-------+-------+----------+-------+--------+-------+-------+----------+
    | raw bytes | payload bytes | model signature (16 B) | header crc32 | zstd frame (content xxhash) |
    +-----------+---------------+------------------------+--------------+-----------------------------+

The payload is K then V, both `[batch, heads, length, head_dim]`, optionally split into byte planes
(all first bytes, then all second bytes, ...) before zstd: the exponent bytes of 16-bit floats repeat
a lot and compress far better apart from the noisy mantissa bytes (docs/benchmarks/codec.json).
The header carries its own crc32; the payload is checked by the zstd frame's content checksum, which
costs less than a crc32 over the compressed bytes.

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
import zstandard

from ..errors import StoreCorruptError, StoreMismatchError
from .chunk import chunk_name

LAYOUT_VERSION = 1
MAGIC = b"KVT1"
FLAG_BYTE_PLANES = 1
FLAG_ZSTD = 2
FLAG_INT8 = 4  # lossy: int8 values with a float32 scale per (row, head, channel), for K and V

_HEADER = struct.Struct("<4sHHBxxxIQQIIIIQQ16s")
_HEADER_CRC = struct.Struct("<I")
HEADER_BYTES = _HEADER.size + _HEADER_CRC.size

DTYPE_CODES: dict[torch.dtype, int] = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3, torch.float64: 4}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(slots=True, frozen=True)
class RecordHeader:
    layer: int
    chunk_id: int
    start: int
    length: int
    batch: int
    heads: int
    head_dim: int
    dtype: torch.dtype
    signature: bytes  # first 16 bytes of the model signature
    layout_version: int = LAYOUT_VERSION
    flags: int = 0
    raw_nbytes: int = 0
    payload_nbytes: int = 0


def _to_planes(raw: np.ndarray, itemsize: int) -> np.ndarray:
    """[v0b0 v0b1 v1b0 v1b1 ...] -> [v0b0 v1b0 ... | v0b1 v1b1 ...] (strided copies: fast)."""
    n = raw.size // itemsize
    planes = np.empty_like(raw)
    for i in range(itemsize):
        planes[i * n:(i + 1) * n] = raw[i::itemsize]
    return planes


def _from_planes(planes: np.ndarray, itemsize: int) -> np.ndarray:
    n = planes.size // itemsize
    raw = np.empty_like(planes)
    for i in range(itemsize):
        raw[i::itemsize] = planes[i * n:(i + 1) * n]
    return raw


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

    def __init__(self, zstd_level: int = 1, byte_planes: bool = True):
        self.zstd_level = zstd_level
        self.byte_planes = byte_planes
        self._local = threading.local()

    @property
    def _compressor(self) -> zstandard.ZstdCompressor:
        if not hasattr(self._local, "c"):
            self._local.c = zstandard.ZstdCompressor(level=self.zstd_level, write_checksum=True)
        return self._local.c

    @property
    def _decompressor(self) -> zstandard.ZstdDecompressor:
        if not hasattr(self._local, "d"):
            self._local.d = zstandard.ZstdDecompressor()
        return self._local.d

    def encode(self, header: RecordHeader, k: torch.Tensor, v: torch.Tensor, lossy: bool = False) -> bytes:
        """k, v: [batch, heads, length, head_dim]. lossy: store int8 values with per-channel scales."""
        if k.dtype not in DTYPE_CODES:
            raise StoreMismatchError(f"cannot store dtype {k.dtype}; supported: {list(map(dtype_name, DTYPE_CODES))}")
        flags = FLAG_ZSTD
        if lossy:
            (sk, qk), (sv, qv) = _quantize(k), _quantize(v)
            raw = np.concatenate([sk.view(np.uint8), sv.view(np.uint8), qk.view(np.uint8), qv.view(np.uint8)])
            flags |= FLAG_INT8
        else:
            raw = np.concatenate([_as_bytes(k), _as_bytes(v)])
            itemsize = k.element_size()
            if self.byte_planes and itemsize > 1:
                raw = _to_planes(raw, itemsize)
                flags |= FLAG_BYTE_PLANES
        payload = self._compressor.compress(raw.tobytes())
        head = _HEADER.pack(
            MAGIC,
            LAYOUT_VERSION,
            flags,
            DTYPE_CODES[k.dtype],
            header.layer,
            header.chunk_id,
            header.start,
            header.length,
            header.batch,
            header.heads,
            header.head_dim,
            raw.nbytes,
            len(payload),
            header.signature[:16].ljust(16, b"\0"),
        )
        return head + _HEADER_CRC.pack(zlib.crc32(head)) + payload

    @staticmethod
    def read_header(blob: bytes, name: str) -> RecordHeader:
        if len(blob) < HEADER_BYTES:
            raise StoreCorruptError(f"{name}: record truncated to {len(blob)} bytes (header needs {HEADER_BYTES})")
        head = blob[: _HEADER.size]
        (crc,) = _HEADER_CRC.unpack_from(blob, _HEADER.size)
        fields = _HEADER.unpack(head)
        if fields[0] != MAGIC:
            raise StoreCorruptError(f"{name}: not a kvtier record (bad magic {fields[0]!r})")
        if zlib.crc32(head) != crc:
            raise StoreCorruptError(f"{name}: header checksum mismatch (record corrupted)")
        (_, layout, flags, dtype_code, layer, chunk_id, start, length, batch, heads, head_dim, raw_nbytes,
         payload_nbytes, signature) = fields
        if dtype_code not in CODE_DTYPES:
            raise StoreCorruptError(f"{name}: unknown dtype code {dtype_code}")
        return RecordHeader(layer, chunk_id, start, length, batch, heads, head_dim, CODE_DTYPES[dtype_code],
                            signature, layout, flags, raw_nbytes, payload_nbytes)

    def decode(
        self, blob: bytes, layer: int, chunk_id: int, signature: bytes, dtype: torch.dtype
    ) -> tuple[RecordHeader, torch.Tensor, torch.Tensor]:
        """Check and decode a record that must hold `layer`/`chunk_id` of the given model and dtype."""
        name = chunk_name(layer, chunk_id)
        h = self.read_header(blob, name)
        if h.layout_version != LAYOUT_VERSION:
            raise StoreMismatchError(
                f"{name}: record layout version {h.layout_version}, this kvtier reads version {LAYOUT_VERSION}"
            )
        if (h.layer, h.chunk_id) != (layer, chunk_id):
            raise StoreCorruptError(f"{name}: record holds layer {h.layer} chunk {h.chunk_id} instead")
        if h.signature != signature[:16].ljust(16, b"\0"):
            raise StoreMismatchError(f"{name}: record was written by another model (signature mismatch)")
        if h.dtype != dtype:
            raise StoreMismatchError(f"{name}: record dtype is {dtype_name(h.dtype)}, the cache uses {dtype_name(dtype)}")
        payload = blob[HEADER_BYTES:]
        if len(payload) != h.payload_nbytes:
            raise StoreCorruptError(f"{name}: payload truncated ({len(payload)} of {h.payload_nbytes} bytes)")
        try:
            # A damaged frame header could claim any size: check it before zstd allocates for it.
            if zstandard.frame_content_size(payload) != h.raw_nbytes:
                raise StoreCorruptError(f"{name}: payload corrupted (frame size does not match the header)")
            raw = self._decompressor.decompress(payload, max_output_size=h.raw_nbytes)
        except zstandard.ZstdError as exc:  # includes the frame's content checksum failing
            raise StoreCorruptError(f"{name}: payload corrupted ({exc})") from exc
        b, heads, n, d = h.batch, h.heads, h.length, h.head_dim
        shape = (b, heads, n, d)
        arr = np.frombuffer(raw, dtype=np.uint8)
        if h.flags & FLAG_INT8:
            n_scale = b * heads * d * 4
            expected = 2 * n_scale + 2 * b * heads * n * d
            if len(raw) != h.raw_nbytes or len(raw) != expected:
                raise StoreCorruptError(f"{name}: decoded {len(raw)} bytes, expected {expected}")
            scales = torch.from_numpy(arr[: 2 * n_scale].copy().view(np.float32)).view(2, b, heads, 1, d)
            values = torch.from_numpy(arr[2 * n_scale:].copy().view(np.int8)).view(2, *shape)
            kv = (values.float() * scales).to(h.dtype)
            return h, kv[0], kv[1]
        itemsize = torch.empty((), dtype=h.dtype).element_size()
        expected = 2 * itemsize * b * heads * n * d
        if len(raw) != h.raw_nbytes or len(raw) != expected:
            raise StoreCorruptError(f"{name}: decoded {len(raw)} bytes, expected {expected}")
        if h.flags & FLAG_BYTE_PLANES:
            arr = _from_planes(arr, itemsize)
        else:
            arr = arr.copy()  # frombuffer is read-only; torch wants a writable buffer
        kv = torch.from_numpy(arr).view(h.dtype).view(2, *shape)
        return h, kv[0], kv[1]
