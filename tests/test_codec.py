"""Disk records: lossless round trips, and every kind of damage raises an error that names the chunk."""

from __future__ import annotations

import struct
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.errors import StoreCorruptError, StoreMismatchError
from kvtier.store.codec import _HEADER, HEADER_BYTES, RecordCodec, RecordHeader

SIG = bytes(range(16))


def _kv(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype), torch.randn(*shape, generator=g).to(dtype)


def _encode(codec, k, v, layer=3, chunk_id=17, start=64):
    b, h, n, d = k.shape
    return codec.encode(RecordHeader(layer, chunk_id, start, n, b, h, d, k.dtype, SIG), k, v)


@settings(max_examples=40, deadline=None)
@given(
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    shape=st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 40), st.integers(1, 24)),
    planes=st.booleans(),
    level=st.integers(1, 6),
)
def test_round_trip_is_lossless(dtype, shape, planes, level):
    codec = RecordCodec(zstd_level=level, byte_planes=planes)
    k, v = _kv(shape, dtype)
    blob = _encode(codec, k, v)
    header, k2, v2 = codec.decode(blob, 3, 17, SIG, dtype)
    assert header.start == 64 and header.length == shape[2]
    assert torch.equal(k2, k) and torch.equal(v2, v)


def test_byte_planes_compress_16_bit_kv_better():
    k, v = _kv((1, 4, 256, 64), torch.bfloat16)
    plain = len(_encode(RecordCodec(3, byte_planes=False), k, v))
    planes = len(_encode(RecordCodec(3, byte_planes=True), k, v))
    assert planes < plain


@pytest.mark.parametrize("where", ["payload", "header"])
def test_flipped_byte_is_detected_and_names_the_chunk(where):
    codec = RecordCodec()
    blob = bytearray(_encode(codec, *_kv((1, 2, 8, 8), torch.float16)))
    blob[HEADER_BYTES + 5 if where == "payload" else 20] ^= 0xFF
    with pytest.raises(StoreCorruptError, match="layer 3 chunk 17"):
        codec.decode(bytes(blob), 3, 17, SIG, torch.float16)


@pytest.mark.parametrize("keep", [10, HEADER_BYTES + 3])
def test_truncated_record_is_detected(keep):
    codec = RecordCodec()
    blob = _encode(codec, *_kv((1, 2, 8, 8), torch.float16))
    with pytest.raises(StoreCorruptError, match="truncated"):
        codec.decode(blob[:keep], 3, 17, SIG, torch.float16)


def test_other_model_dtype_or_slot_is_a_mismatch():
    codec = RecordCodec()
    blob = _encode(codec, *_kv((1, 2, 8, 8), torch.float16))
    with pytest.raises(StoreMismatchError, match="another model"):
        codec.decode(blob, 3, 17, b"x" * 16, torch.float16)
    with pytest.raises(StoreMismatchError, match="dtype is float16"):
        codec.decode(blob, 3, 17, SIG, torch.bfloat16)
    with pytest.raises(StoreCorruptError, match="holds layer 3 chunk 17"):
        codec.decode(blob, 3, 18, SIG, torch.float16)


def test_other_layout_version_is_a_mismatch():
    codec = RecordCodec()
    blob = bytearray(_encode(codec, *_kv((1, 2, 8, 8), torch.float16)))
    struct.pack_into("<H", blob, 4, 99)  # layout version field
    struct.pack_into("<I", blob, _HEADER.size, zlib.crc32(bytes(blob[: _HEADER.size])))
    with pytest.raises(StoreMismatchError, match="layout version 99"):
        codec.decode(bytes(blob), 3, 17, SIG, torch.float16)


def test_records_hold_no_pickle():
    blob = _encode(RecordCodec(), *_kv((1, 2, 4, 4), torch.float32))
    assert blob[:4] == b"KVT1"
    assert b"\x80\x04" not in blob[:HEADER_BYTES]  # no pickle protocol marker in the header


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_any_single_flipped_byte_is_detected(data):
    codec = RecordCodec()
    k, v = _kv((1, 2, 16, 8), torch.bfloat16, seed=1)
    blob = bytearray(_encode(codec, k, v))
    i = data.draw(st.integers(0, len(blob) - 1))
    blob[i] ^= data.draw(st.integers(1, 255))
    with pytest.raises((StoreCorruptError, StoreMismatchError), match="layer 3 chunk 17"):
        codec.decode(bytes(blob), 3, 17, SIG, torch.bfloat16)


def test_lossy_records_are_int8_with_per_channel_scales():
    codec = RecordCodec()
    k, v = _kv((2, 3, 40, 16), torch.bfloat16, seed=4)
    k[:, :, :, 3] *= 50  # an outlier channel must not ruin the others
    blob = codec.encode(RecordHeader(3, 17, 64, 40, 2, 3, 16, k.dtype, SIG), k, v, lossy=True)
    _, k2, v2 = codec.decode(blob, 3, 17, SIG, torch.bfloat16)
    assert k2.dtype == torch.bfloat16 and k2.shape == k.shape
    for orig, back in ((k, k2), (v, v2)):
        scale = orig.float().abs().amax(dim=2, keepdim=True) / 127
        err = (orig.float() - back.float()).abs()
        assert bool((err <= scale * 0.5 + orig.float().abs() * 2 ** -7 + 1e-6).all())  # rounding + bf16 cast
    assert len(blob) < len(_encode(codec, k, v))
