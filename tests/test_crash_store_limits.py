"""A store's size limit and its place on disk hold for a reopened session as for a new one: a continuation
that would pass `max_store_bytes` is a StoreFullError that leaves the saved session as it was, and a store moved
or removed while open is a StoreError naming it, never a bare OSError or a save into a deleted file."""

from __future__ import annotations

import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_model
from helpers import cache_kw

from kvtier import KVTierCache, StoreError, StoreFullError
from kvtier.segmented import prefill

CHUNKING = dict(chunk_size=16, sink_tokens=4, recent_window=16, device_budget=40, host_budget=32)
LIMIT = 1 << 20


def _doc(n: int) -> torch.Tensor:
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(3))


def _last_logits(model, cache, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=True, **{cache_kw(model): cache}).logits[0, -1]


def test_a_reopened_session_keeps_to_max_store_bytes(tmp_path):
    model = build_model("llama")
    doc, probe = _doc(1200), torch.tensor([[5, 6, 7]])
    cache = KVTierCache.for_model(model, store_path=tmp_path / "s", max_store_bytes=LIMIT, **CHUNKING)
    prefill(model, cache, doc[:, :150], progress=False)
    cache.save()
    cache.close()

    cache = KVTierCache.open(tmp_path / "s", model, max_store_bytes="1MiB")  # a size, as for_model takes it
    assert cache.tiers.disk.map_bytes <= LIMIT
    try:
        try:  # a continuation past the limit: refused by the same limit the store was made with
            prefill(model, cache, doc[:, 150:], progress=False)
            cache.save()
        except StoreFullError as exc:
            assert "max_store_bytes" in str(exc)
        else:
            raise AssertionError(f"the store grew to {cache.tiers.disk.used_bytes()} bytes past max_store_bytes")
    finally:
        cache.close()
    assert (tmp_path / "s" / "data.mdb").stat().st_size <= LIMIT

    cache = KVTierCache.open(tmp_path / "s", model)  # the saved session, as it was
    try:
        assert cache.get_seq_length() == 150
        again = KVTierCache.for_model(model, **CHUNKING)
        prefill(model, again, doc[:, :150], progress=False)
        torch.testing.assert_close(_last_logits(model, cache, probe), _last_logits(model, again, probe))
        again.close()
    finally:
        cache.close()


def test_a_store_moved_while_open_keeps_working_until_a_save_names_the_move(tmp_path):
    """Its map still grows (free space and file size are read from the open file, not the old path), and a save
    refuses to write a session the returned path would not hold; the last saved session moves with the store."""
    model = build_model("llama")
    doc = _doc(300)
    cache = KVTierCache.for_model(model, store_path=tmp_path / "s", initial_map_bytes=1 << 16, **CHUNKING)
    try:
        prefill(model, cache, doc[:, :100], progress=False)
        cache.save()
        (tmp_path / "s").rename(tmp_path / "moved")
        prefill(model, cache, doc[:, 100:], progress=False)  # spills grow the map past 64 KiB
        assert cache.tiers.disk.map_bytes > 1 << 16 and cache.tiers.disk.data_bytes() > 1 << 16
        with pytest.raises(StoreError, match=r"was moved or replaced while this process had it open.*not saved"):
            cache.save()
    finally:
        cache.close()
    cache = KVTierCache.open(tmp_path / "moved", model)
    assert cache.get_seq_length() == 100
    cache.close()


def test_a_store_removed_while_open_is_not_saved_into_a_deleted_file(tmp_path):
    model = build_model("llama")
    cache = KVTierCache.for_model(model, store_path=tmp_path / "s", **CHUNKING)
    try:
        prefill(model, cache, _doc(100), progress=False)
        shutil.rmtree(tmp_path / "s")
        with pytest.raises(StoreError, match=r"store .*/s was removed while this process had it open"):
            cache.save()
    finally:
        cache.close()
    assert not (tmp_path / "s").exists()


def test_a_full_disk_is_a_store_full_error_that_leaves_the_session_as_it_was(tmp_path):
    """The disk fills up part-way through a save (here: the process's file size limit, `ulimit -f`, which fails a
    write as a full file system does, with a short write LMDB reports as EIO): StoreFullError saying so, not an
    'Input/output error'; the last saved session stays whole, and the save succeeds once there is room."""
    model = build_model("llama")
    doc = _doc(400)
    data = tmp_path / "s" / "data.mdb"
    cache = KVTierCache.for_model(model, store_path=tmp_path / "s", **CHUNKING)
    try:
        prefill(model, cache, doc[:, :100], progress=False)
        cache.save()
        prefill(model, cache, doc[:, 100:], progress=False)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (data.stat().st_size + (32 << 10), hard))
        try:
            with pytest.raises(StoreFullError, match=r"no room on the disk .*rolled back and the store is as it was"):
                cache.save()
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        shutil.copytree(tmp_path / "s", tmp_path / "copy")  # the store as the failed save left it
        cache.save()  # room again: the same cache saves
    finally:
        cache.close()
    for store, n in (("copy", 100), ("s", 400)):
        cache = KVTierCache.open(tmp_path / store, model)
        try:
            assert cache.get_seq_length() == n
            _same_as_one_shot(model, cache, doc[:, :n])
        finally:
            cache.close()


def _same_as_one_shot(model, cache, doc: torch.Tensor) -> None:
    probe = torch.tensor([[5, 6, 7]])
    again = KVTierCache.for_model(model, **CHUNKING)
    try:
        prefill(model, again, doc, progress=False)
        torch.testing.assert_close(_last_logits(model, cache, probe), _last_logits(model, again, probe))
    finally:
        again.close()


KILLED_CONTINUATION = """
import os, signal, sys
sys.path.insert(0, sys.argv[2])
import torch
from conftest import build_model
from kvtier import KVTierCache
from kvtier.segmented import prefill
model = build_model("llama")
doc = torch.randint(3, 128, (1, 600), generator=torch.Generator().manual_seed(3))
cache = KVTierCache.for_model(model, store_path=sys.argv[1], chunk_size=16, sink_tokens=4, recent_window=16,
                              device_budget=40, host_budget=32)
prefill(model, cache, doc[:, :100], progress=False)
cache.save()
prefill(model, cache, doc[:, 100:], progress=False)  # spilled to disk, never saved
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_store_left_with_unsaved_records_opens_on_a_full_disk(tmp_path):
    """A continuation killed after spilling records (by a full disk, say) leaves them in the store; reopening
    drops them, and when the disk has no room even for that deletion the saved session still opens."""
    store, data = tmp_path / "s", tmp_path / "s" / "data.mdb"
    out = subprocess.run([sys.executable, "-c", KILLED_CONTINUATION, str(store), str(Path(__file__).parent)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == -signal.SIGKILL, out.stderr
    model = build_model("llama")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (data.stat().st_size, hard))  # not one byte more
    try:
        cache = KVTierCache.open(store, model)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    try:
        assert cache.get_seq_length() == 100
        left = cache.tiers.disk.record_count()
        _same_as_one_shot(model, cache, _doc(100))
    finally:
        cache.close()
    cache = KVTierCache.open(store, model)  # room now: the leftovers go
    try:
        assert cache.tiers.disk.record_count() < left and cache.get_seq_length() == 100
    finally:
        cache.close()


def test_a_store_opened_by_a_relative_path_saves_after_a_change_of_directory(tmp_path, monkeypatch):
    model = build_model("llama")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    doc = _doc(300)
    cache = KVTierCache.for_model(model, store_path="s", initial_map_bytes=1 << 16, **CHUNKING)
    try:
        prefill(model, cache, doc[:, :100], progress=False)
        monkeypatch.chdir(tmp_path / "elsewhere")  # "s" names nothing here: the store is still where it was
        prefill(model, cache, doc[:, 100:], progress=False)  # the map grows past 64 KiB
        cache.save()
    finally:
        cache.close()
    monkeypatch.chdir(tmp_path)
    cache = KVTierCache.open("s", model)
    try:
        assert cache.get_seq_length() == 300
        _same_as_one_shot(model, cache, doc)
    finally:
        cache.close()
