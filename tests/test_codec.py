"""Disk records: lossless round trips; every kind of damage, and a record read anywhere but its own slot,
raises an error that names the chunk, before anything is decompressed."""

from __future__ import annotations

import dataclasses
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.errors import StoreCorruptError, StoreMismatchError
from kvtier.kernels import native
from kvtier.store import codec as codec_module
from kvtier.config import KVTierConfig
from kvtier.store.codec import (
    _HEADER,
    FLAG_BYTE_PLANES,
    FLAG_INT8,
    FLAG_RAW,
    FLAG_ZSTD,
    HEADER_BYTES,
    MIN_ZSTD_LEVEL,
    RecordCodec,
    RecordHeader,
    _from_planes,
    _to_planes,
    byte_view,
)

SIG = bytes(range(16))
SESSION = bytes(range(100, 116))


def _kv(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype), torch.randn(*shape, generator=g).to(dtype)


def _header(k, layer=3, chunk_id=17, start=64, lossy=False, **changes) -> RecordHeader:
    b, h, n, d = k.shape
    header = RecordHeader(layer, chunk_id, start, n, b, h, d, k.dtype, SIG, SESSION, flags=FLAG_INT8 if lossy else 0)
    return dataclasses.replace(header, **changes)


def _encode(codec, k, v, lossy=False):
    return codec.encode(_header(k), k, v, lossy=lossy)


def _reseal(blob: bytearray) -> bytes:
    """Recompute the header crc after an edit: a deliberate change, not damage."""
    struct.pack_into("<I", blob, _HEADER.size, zlib.crc32(bytes(blob[: _HEADER.size])))
    return bytes(blob)


LEVELS = [-5, -3, -1, 1, 3]  # what `kvtier bench codec` compares


@settings(max_examples=40, deadline=None)
@given(
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
    shape=st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 40), st.integers(1, 24)),
    planes=st.booleans(),
    level=st.sampled_from([*LEVELS, 6, -50]),
)
def test_round_trip_is_lossless(dtype, shape, planes, level):
    codec = RecordCodec(zstd_level=level, byte_planes=planes)
    k, v = _kv(shape, dtype)
    blob = _encode(codec, k, v)
    header = codec.read_header(blob, "r")
    assert header.start == 64 and header.length == shape[2] and header.session == SESSION
    k2, v2 = codec.decode(blob, _header(k))
    assert torch.equal(k2, k) and torch.equal(v2, v)


@pytest.mark.parametrize("itemsize", [2, 4, 8])
@pytest.mark.parametrize("values", [1, 2, 3, 70_001])
def test_byte_planes_keep_the_record_layout(itemsize, values):
    """Plane i holds byte i of every value, K's values then V's: the layout records have always had, so
    records written before and after the vectorised planes read the same."""
    rng = np.random.default_rng(values)
    k, v = (rng.integers(0, 256, values * itemsize, dtype=np.uint8) for _ in range(2))
    raw = np.concatenate([k, v])
    reference = np.concatenate([raw[i::itemsize] for i in range(itemsize)])
    planes = _to_planes([k, v], itemsize)
    assert np.array_equal(planes, reference)
    back = _from_planes(planes, itemsize)
    assert np.array_equal(back, raw) and back.flags.writeable


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("planes", [False, True])
@pytest.mark.parametrize("level", LEVELS)
def test_every_setting_round_trips_and_any_codec_reads_it(level, planes, dtype):
    """The level and the plane split are the writer's choice: a reader with other settings decodes the record
    (the planes flag travels in the header), and the result owns writable memory of its own."""
    k, v = _kv((2, 3, 64, 16), dtype, seed=level + 10)
    k[..., :4] = 0.5  # some redundancy, so the compressing levels really compress
    blob = _encode(RecordCodec(level, planes), k, v)
    assert bool(RecordCodec.read_header(blob, "r").flags & FLAG_BYTE_PLANES) == planes
    for reader in (RecordCodec(level, planes), RecordCodec(3, not planes), RecordCodec()):
        k2, v2 = reader.decode(blob, _header(k))
        assert torch.equal(k2, k) and torch.equal(v2, v)
        k2.add_(1)  # writable, and not the blob's memory
        assert torch.equal(reader.decode(blob, _header(k))[0], k)


@pytest.mark.parametrize("level", [-1, -5, MIN_ZSTD_LEVEL, 1, 22])
def test_fast_negative_levels_are_accepted_by_config_and_codec(level):
    assert KVTierConfig(zstd_level=level).zstd_level == level
    assert RecordCodec(level).zstd_level == level


@pytest.mark.parametrize("level", [0, 23, MIN_ZSTD_LEVEL - 1, 1.0, True, "1"])
def test_levels_zstd_cannot_write_are_refused_by_config_and_codec_alike(level):
    with pytest.raises(ValueError, match="zstd_level") as from_config:
        KVTierConfig(zstd_level=level)
    with pytest.raises(ValueError, match="zstd_level") as from_codec:
        RecordCodec(level)
    assert str(from_config.value) == str(from_codec.value)


def test_raw_records_are_the_default_and_take_no_byte_planes():
    """No level: the values as they are and their XXH3-64, a few bytes more than the values; byte planes, which
    only help zstd, are refused without a level, by the config and the codec alike."""
    codec = RecordCodec()
    assert codec.zstd_level is None and KVTierConfig().zstd_level is None
    k, v = _kv((1, 2, 8, 8), torch.float32)
    blob = _encode(codec, k, v)
    assert len(blob) == HEADER_BYTES + k.nbytes + v.nbytes + 8
    assert bytes(blob[HEADER_BYTES:HEADER_BYTES + k.nbytes]) == k.numpy().tobytes()
    for reader in (codec, RecordCodec(-1), RecordCodec(3, True)):  # any reader reads any encoding
        k2, v2 = reader.decode(blob, _header(k))
        assert torch.equal(k2, k) and torch.equal(v2, v)
    with pytest.raises(ValueError, match="byte_planes") as from_config:
        KVTierConfig(byte_planes=True)
    with pytest.raises(ValueError, match="byte_planes") as from_codec:
        RecordCodec(None, True)
    assert str(from_config.value) == str(from_codec.value)


def test_a_raw_record_of_the_wrong_size_or_with_other_flags_is_refused():
    codec = RecordCodec()
    k, v = _kv((1, 2, 8, 8), torch.float16)
    blob = _encode(codec, k, v)
    for cut in (1, 8, 9):  # a shorter payload, its header saying so (sealed with a fresh crc)
        short = bytearray(blob[:-cut])
        struct.pack_into("<Q", short, _HEADER.size - 40, len(short) - HEADER_BYTES)  # payload bytes
        with pytest.raises(StoreCorruptError, match="raw payload of"):
            codec.decode(_reseal(short), _header(k))
    for flags in (FLAG_RAW | FLAG_ZSTD, FLAG_RAW | FLAG_INT8, FLAG_RAW | FLAG_BYTE_PLANES):
        other = bytearray(blob)
        struct.pack_into("<H", other, 6, flags)
        with pytest.raises(StoreCorruptError, match="unknown record flags"):
            codec.decode(_reseal(other), _header(k))


def test_defaults_are_the_configs():
    codec, config = RecordCodec(), KVTierConfig()
    assert (codec.zstd_level, codec.byte_planes) == (config.zstd_level, config.byte_planes)


def test_byte_planes_compress_16_bit_kv_better():
    k, v = _kv((1, 4, 256, 64), torch.bfloat16)
    plain = len(_encode(RecordCodec(3, byte_planes=False), k, v))
    planes = len(_encode(RecordCodec(3, byte_planes=True), k, v))
    assert planes < plain


@pytest.mark.parametrize("where", ["payload", "header"])
def test_flipped_byte_is_detected_and_names_the_chunk(where):
    codec = RecordCodec()
    k, v = _kv((1, 2, 8, 8), torch.float16)
    blob = bytearray(_encode(codec, k, v))
    blob[HEADER_BYTES + 5 if where == "payload" else 20] ^= 0xFF
    with pytest.raises(StoreCorruptError, match="layer 3 chunk 17"):
        codec.decode(bytes(blob), _header(k))


@pytest.mark.parametrize("keep", [10, HEADER_BYTES + 3])
def test_truncated_record_is_detected(keep):
    codec = RecordCodec()
    k, v = _kv((1, 2, 8, 8), torch.float16)
    blob = _encode(codec, k, v)
    with pytest.raises(StoreCorruptError, match="truncated"):
        codec.decode(blob[:keep], _header(k))


@pytest.mark.parametrize("change, error, text", [
    (dict(signature=b"x" * 16), StoreMismatchError, "another model"),
    (dict(dtype=torch.bfloat16), StoreMismatchError, "dtype is float16"),
    (dict(session=b"s" * 16), StoreMismatchError, "another session"),
    (dict(chunk_id=18), StoreCorruptError, "holds layer 3 chunk 17"),
    (dict(start=80), StoreCorruptError, "covers positions 64..72, expected 80..88"),
    (dict(length=9), StoreCorruptError, "covers positions"),
    (dict(batch=2), StoreCorruptError, r"holds \[1, 2, 8, 8\]"),
    (dict(head_dim=4), StoreCorruptError, "expected"),
    (dict(flags=FLAG_INT8), StoreCorruptError, "lossless, the manifest says int8"),
])
def test_a_record_read_anywhere_but_its_own_slot_is_refused(change, error, text):
    codec = RecordCodec()
    k, v = _kv((1, 2, 8, 8), torch.float16)
    with pytest.raises(error, match=text):
        codec.decode(_encode(codec, k, v), _header(k, **change))


def test_other_layout_version_is_a_mismatch():
    codec = RecordCodec()
    k, v = _kv((1, 2, 8, 8), torch.float16)
    blob = bytearray(_encode(codec, k, v))
    struct.pack_into("<H", blob, 4, 99)  # layout version field
    with pytest.raises(StoreMismatchError, match="layout version 99"):
        codec.decode(_reseal(blob), _header(k))
    old = bytearray(_encode(codec, k, v))
    old[:4] = b"KVT1"
    with pytest.raises(StoreMismatchError, match="older kvtier"):
        codec.decode(bytes(old), _header(k))


def test_declared_sizes_are_checked_before_decompressing():
    """A record whose header (crc and all) claims more bytes than its shape holds, or a zip bomb's ratio, is
    refused before zstd allocates anything."""
    codec = RecordCodec()
    k, v = _kv((1, 2, 8, 8), torch.float16)
    blob = bytearray(_encode(codec, k, v))
    struct.pack_into("<Q", blob, _HEADER.size - 48, 10 << 30)  # raw bytes: 10 GiB
    with pytest.raises(StoreCorruptError, match="its shape needs 512"):
        codec.decode(_reseal(blob), _header(k))
    big = torch.zeros(1, 2, 4096, 64, dtype=torch.float16)  # compresses > 64x
    blob = _encode(RecordCodec(-1), big, big)
    with pytest.raises(StoreCorruptError, match="more than 64x"):
        codec.decode(blob, _header(big))


def test_records_hold_no_pickle():
    blob = _encode(RecordCodec(), *_kv((1, 2, 4, 4), torch.float32))
    assert blob[:4] == b"KVT2"
    assert b"\x80\x04" not in blob[:HEADER_BYTES]  # no pickle protocol marker in the header


@pytest.mark.parametrize("level, planes", [(None, False), (-1, False), (-5, True), (1, True)])
@settings(max_examples=120, deadline=None)
@given(data=st.data())
def test_any_single_flipped_byte_is_detected(level, planes, data):
    """Raw records are covered by their XXH3-64, and raw blocks (what zstd's fast levels write for noise) by
    the frame's checksum."""
    codec = RecordCodec(level, planes)
    k, v = _kv((1, 2, 16, 8), torch.bfloat16, seed=1)
    blob = bytearray(_encode(codec, k, v))
    i = data.draw(st.integers(0, len(blob) - 1))
    blob[i] ^= data.draw(st.integers(1, 255))
    with pytest.raises((StoreCorruptError, StoreMismatchError), match="layer 3 chunk 17"):
        codec.decode(bytes(blob), _header(k))


def test_lossy_records_are_int8_with_per_channel_scales():
    codec = RecordCodec()
    k, v = _kv((2, 3, 40, 16), torch.bfloat16, seed=4)
    k[:, :, :, 3] *= 50  # an outlier channel must not ruin the others
    blob = _encode(codec, k, v, lossy=True)
    k2, v2 = codec.decode(blob, _header(k, lossy=True))
    assert k2.dtype == torch.bfloat16 and k2.shape == k.shape
    for orig, back in ((k, k2), (v, v2)):
        scale = orig.float().abs().amax(dim=2, keepdim=True) / 127
        err = (orig.float() - back.float()).abs()
        assert bool((err <= scale * 0.5 + orig.float().abs() * 2 ** -7 + 1e-6).all())  # rounding + bf16 cast
    assert len(blob) < len(_encode(codec, k, v))


# ------------------------------------------------------------------------------------- decode_into
def _arena_views(shape, dtype, at=5):
    """k, v destinations as a device arena's run of slots: [B, H, n, D] views of [B, H, capacity, D]."""
    b, h, n, d = shape
    arena = torch.full((2, b, h, n + 2 * at, d), 7.0).to(dtype)
    return arena, arena[0][:, :, at:at + n], arena[1][:, :, at:at + n]


@pytest.fixture(params=[False, True], ids=["copied", "streamed"])
def streamed(request, monkeypatch):
    """Records written into place by np.copyto, or (every piece, however small) by the C library's streaming
    stores, which large pieces take."""
    if request.param:
        if native.library() is None:
            pytest.skip("the C library cannot be built here")
        monkeypatch.setattr(codec_module, "STREAM_BYTES", 0)
        done = []
        real = native.stream_planes
        monkeypatch.setattr(native, "stream_planes", lambda out, values: done.append(real(out, values)) or done[-1])
        yield done
        assert done and all(done)  # every piece took the streaming path
    else:
        yield None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("level, planes, lossy", [(None, False, False), (-1, False, False), (-1, True, False),
                                                  (-1, False, True)])
def test_decode_into_a_strided_destination_equals_decode(dtype, level, planes, lossy, streamed):
    """Straight into a run of arena slots (bytes copied, bfloat16 too), the neighbouring slots untouched."""
    codec = RecordCodec(level, planes)
    k, v = _kv((2, 3, 8, 16), dtype, seed=9)
    blob = _encode(codec, k, v, lossy=lossy)
    arena, k_out, v_out = _arena_views(k.shape, dtype)
    before = arena.clone()
    codec.decode_into(memoryview(blob), _header(k, lossy=lossy), [(0, byte_view(k_out), byte_view(v_out))])
    k2, v2 = codec.decode(blob, _header(k, lossy=lossy))
    assert torch.equal(k_out, k2) and torch.equal(v_out, v2)
    if not lossy:
        assert torch.equal(k_out, k) and torch.equal(v_out, v)
    outside = torch.ones_like(arena, dtype=torch.bool)
    outside[:, :, :, 5:13] = False
    assert torch.equal(arena[outside], before[outside])


@pytest.mark.parametrize("level", [None, -1])
def test_decode_into_pieces_puts_each_part_of_the_record_in_its_own_place(level, streamed):
    """A record split across two runs of slots (holes a promotion lands in): each piece gets its tokens."""
    codec = RecordCodec(level)
    k, v = _kv((1, 2, 8, 4), torch.float32, seed=3)
    blob = _encode(codec, k, v)
    arena = torch.zeros(2, 1, 2, 20, 4)
    pieces = [(0, arena[0][:, :, 2:5], arena[1][:, :, 2:5]), (3, arena[0][:, :, 12:17], arena[1][:, :, 12:17])]
    codec.decode_into(blob, _header(k), [(a, byte_view(kp), byte_view(vp)) for a, kp, vp in pieces])
    assert torch.equal(arena[0][:, :, 2:5], k[:, :, :3]) and torch.equal(arena[0][:, :, 12:17], k[:, :, 3:])
    assert torch.equal(arena[1][:, :, 2:5], v[:, :, :3]) and torch.equal(arena[1][:, :, 12:17], v[:, :, 3:])
    assert not arena[:, :, :, 5:12].any() and not arena[:, :, :, :2].any() and not arena[:, :, :, 17:].any()


@pytest.mark.parametrize("damage, error, text", [
    ("payload", StoreCorruptError, "payload corrupted"),
    ("header", StoreCorruptError, "header checksum"),
    ("truncated", StoreCorruptError, "truncated"),
    ("session", StoreMismatchError, "another session"),
    ("place", StoreCorruptError, "holds layer 3 chunk 17"),
])
def test_decode_into_checks_everything_decode_checks_and_writes_nothing_on_failure(damage, error, text):
    codec = RecordCodec()
    k, v = _kv((1, 2, 8, 8), torch.float32, seed=2)
    blob, expect = bytearray(_encode(codec, k, v)), _header(k)
    if damage == "payload":
        blob[-3] ^= 0x5A  # in the payload's checksum: only the payload check sees it
    elif damage == "header":
        blob[30] ^= 0x01
    elif damage == "truncated":
        blob = blob[: len(blob) - 9]
    elif damage == "session":
        expect = dataclasses.replace(expect, session=b"s" * 16)
    else:
        expect = dataclasses.replace(expect, chunk_id=18)
    arena, k_out, v_out = _arena_views(k.shape, k.dtype)
    before = arena.clone()
    with pytest.raises(error, match=text):
        codec.decode_into(memoryview(bytes(blob)), expect, [(0, byte_view(k_out), byte_view(v_out))])
    with pytest.raises(error, match=text):
        codec.decode(bytes(blob), expect)
    assert torch.equal(arena, before)
