"""The LMDB disk store: growth, clean failure when full, one process at a time, owner-only files."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
import time

import lmdb
import pytest

from kvtier.errors import StoreFullError, StoreLockedError
from kvtier.store.disk import DiskStore, _ReadAhead


def test_put_get_remove(tmp_path):
    store = DiskStore(tmp_path / "s")
    store.put_many([(b"a", b"1"), (b"b", b"22")], meta={"info": {"x": 1}})
    assert store.get(b"a") == b"1" and store.contains(b"b") and store.get(b"zz") is None
    assert store.get_meta("info") == {"x": 1}
    store.remove(b"a")
    assert list(store.keys()) == [b"b"]
    store.close()


def test_map_grows_when_full(tmp_path):
    store = DiskStore(tmp_path / "s", initial_map_bytes=1 << 16)
    blob = os.urandom(40_000)
    for i in range(20):
        store.put(b"k%d" % i, blob)
    assert store.map_bytes > 1 << 16
    assert all(store.get(b"k%d" % i) == blob for i in range(20))
    store.close()


def test_full_store_fails_cleanly_and_stays_readable(tmp_path):
    store = DiskStore(tmp_path / "s", initial_map_bytes=1 << 16, max_bytes=1 << 18)
    blob = os.urandom(30_000)
    written = 0
    with pytest.raises(StoreFullError, match="size limit"):
        for i in range(100):
            store.put(b"k%d" % i, blob)
            written += 1
    assert 0 < written < 100
    # Everything committed before the failure is intact; the failed write left nothing behind.
    assert all(store.get(b"k%d" % i) == blob for i in range(written))
    assert store.get(b"k%d" % written) is None
    store.close()
    reopened = DiskStore(tmp_path / "s", create=False)
    assert len(list(reopened.keys())) == written
    reopened.close()


def test_owner_only_permissions(tmp_path):
    store = DiskStore(tmp_path / "s")
    store.put(b"a", b"1")
    assert stat.S_IMODE((tmp_path / "s").stat().st_mode) == 0o700
    for f in (tmp_path / "s").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) & 0o077 == 0, f
    store.close()


def test_second_process_cannot_open_the_store(tmp_path):
    store = DiskStore(tmp_path / "s")
    code = textwrap.dedent(f"""
        from kvtier.store.disk import DiskStore, _ReadAhead
        from kvtier.errors import StoreLockedError
        try:
            DiskStore({str(tmp_path / 's')!r})
        except StoreLockedError as e:
            print("LOCKED", e)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "LOCKED" in out.stdout and str(os.getpid()) in out.stdout, out.stderr
    store.close()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "LOCKED" not in out.stdout, out.stdout + out.stderr


def test_same_process_cannot_open_twice(tmp_path):
    store = DiskStore(tmp_path / "s")
    with pytest.raises(StoreLockedError):
        DiskStore(tmp_path / "s")
    store.close()


def test_open_missing_store_without_create(tmp_path):
    with pytest.raises(FileNotFoundError):
        DiskStore(tmp_path / "nope", create=False)


def test_missing_names_the_absent_keys_in_the_order_asked(tmp_path):
    store = DiskStore(tmp_path / "s")
    store.put_many([(b"a", os.urandom(50_000)), (b"c", b"3")])
    assert store.missing([b"d", b"a", b"b", b"c", b"d"]) == [b"d", b"b", b"d"]
    assert store.missing([]) == []
    store.close()


def test_record_sizes_at_open_come_from_the_check_and_match_lmdb(tmp_path, monkeypatch):
    """A reopen asks every record's size: the open's check read them in the leaves, so no value's page is read
    (the binding's `get` touches them all); after a commit LMDB answers again."""
    store = DiskStore(tmp_path / "s")
    store.put_many([(b"a", os.urandom(50_000)), (b"b", b"22"), (b"c", os.urandom(9_000))])
    store.close()
    store = DiskStore(tmp_path / "s")
    keys = [b"c", b"zz", b"a", b"b"]
    monkeypatch.setattr(store, "viewing", lambda: (_ for _ in ()).throw(AssertionError("read a value")))
    assert store.record_sizes(keys) == [9_000, None, 50_000, 2]
    monkeypatch.undo()
    with store.viewing() as get:
        assert [None if (v := get(k)) is None else len(v) for k in keys] == [9_000, None, 50_000, 2]
    store.put_many([(b"zz", b"123"), (b"a", b"4")])  # a commit: the check's sizes no longer hold
    store.remove(b"c")
    assert store.record_sizes(keys) == [None, 3, 1, 2]
    store.close()


def _fadvise_calls(monkeypatch, cached=lambda fd, offset: False) -> list[tuple]:
    """Record the hints instead of giving them; `cached` says which bytes count as already in memory (none)."""
    calls: list[tuple] = []
    monkeypatch.setattr(os, "posix_fadvise", lambda *args: calls.append(args))
    monkeypatch.setattr("kvtier.store.disk._in_page_cache", cached)
    return calls


def test_read_ahead_skips_pieces_already_in_memory(tmp_path, monkeypatch):
    """A warm store is not hinted again: that would only take CPU from the reads that decode it."""
    store = DiskStore(tmp_path / "s")
    store.put(b"a", os.urandom(100_000))
    monkeypatch.setattr(_ReadAhead, "PIECE", 4096 * 5)
    used = store.data_bytes()
    calls = _fadvise_calls(monkeypatch, cached=lambda fd, offset: offset < 4096 * 5 or offset >= 4096 * 10)
    store.read_ahead()
    store.close()
    assert used > 4096 * 10 and [c[1] for c in calls] == [4096 * 5]  # the one piece not in memory


@pytest.mark.parametrize("cached", [True, False])
def test_read_ahead_maps_the_records_only_of_a_store_wholly_in_memory(tmp_path, monkeypatch, cached):
    """With every piece in memory the read-ahead thread then reads every record through LMDB's mapping (the
    page faults that map the file, off the caller's thread); a cold store is only hinted: faulting its pages in
    there would compete with the hinted reads."""
    store = DiskStore(tmp_path / "s")
    store.put_many([(b"a", os.urandom(100_000)), (b"b", os.urandom(30_000)), (b"c", b"x")])
    calls = _fadvise_calls(monkeypatch, cached=lambda fd, offset: cached)
    mapped: list[int] = []
    real = DiskStore._map_records
    monkeypatch.setattr(DiskStore, "_map_records", lambda self, stopped: (mapped.append(1), real(self, stopped)))
    store.read_ahead()
    store._stop_read_ahead()  # waits for the thread
    assert mapped == ([1] if cached else []) and bool(calls) != cached
    assert store.get(b"b") is not None
    store.close()


def test_mapping_records_stops_when_asked_and_survives_a_failing_read(tmp_path, monkeypatch):
    import threading

    class CountingEnv:  # the store's LMDB environment, counting the read transactions that map records
        def __init__(self, env):
            self.env, self.mapping = env, 0

        def begin(self, **kw):
            self.mapping += bool(kw.get("buffers"))
            return self.env.begin(**kw)

        def __getattr__(self, name):
            return getattr(self.env, name)

    store = DiskStore(tmp_path / "s")
    store.put_many([(b"%04d" % i, b"v") for i in range(300)])
    real, store.env = store.env, CountingEnv(store.env)
    stopped = threading.Event()
    stopped.set()
    store._map_records(stopped)
    assert store.env.mapping == 0  # stopped: no record read
    store._map_records(threading.Event())
    assert store.env.mapping == 5  # 300 records in transactions of 64
    store.env = real
    monkeypatch.setattr(DiskStore, "keys", lambda self: (_ for _ in ()).throw(lmdb.Error("gone")))
    store._map_records(threading.Event())  # a hint: a failing read ends it quietly
    store.close()


def test_in_page_cache_sees_a_page_just_written(tmp_path):
    from kvtier.store.disk import _in_page_cache

    path = tmp_path / "f"
    path.write_bytes(os.urandom(8192))
    fd = os.open(path, os.O_RDONLY)
    try:
        assert _in_page_cache(fd, 0) and _in_page_cache(fd, 8191)
    finally:
        os.close(fd)


def test_read_ahead_asks_the_kernel_for_the_whole_used_file_piece_by_piece(tmp_path, monkeypatch):
    store = DiskStore(tmp_path / "s")
    store.put(b"a", os.urandom(100_000))
    monkeypatch.setattr(_ReadAhead, "PIECE", 4096 * 5)
    calls = _fadvise_calls(monkeypatch)
    fd, used = store._data_fd, store.data_bytes()
    store.read_ahead()
    store.close()  # waits for the hints
    assert {c[0] for c in calls} == {fd} and {c[3] for c in calls} == {os.POSIX_FADV_WILLNEED}
    assert [c[1] for c in calls] == list(range(0, used, 4096 * 5))  # in order, end to end, nothing past `used`
    assert sum(c[2] for c in calls) == used
    store.read_ahead()  # closed: nothing to hint, no error
    assert sum(c[2] for c in calls) == used


def test_close_stops_read_ahead_between_pieces(tmp_path, monkeypatch):
    """The hints run on a thread; close must not leave it hinting on a file descriptor number that the
    process may hand to another file next."""
    store = DiskStore(tmp_path / "s")
    store.put(b"a", os.urandom(200_000))
    monkeypatch.setattr(_ReadAhead, "PIECE", 4096)
    calls: list[tuple] = []
    monkeypatch.setattr(os, "posix_fadvise", lambda *args: (calls.append(args), time.sleep(0.05)))
    monkeypatch.setattr("kvtier.store.disk._in_page_cache", lambda fd, offset: False)
    store.read_ahead()
    store.close()
    hinted = len(calls)
    assert 1 <= hinted < store_pages(tmp_path / "s")
    time.sleep(0.2)
    assert len(calls) == hinted


def store_pages(path) -> int:
    return (path / "data.mdb").stat().st_size // 4096


@pytest.mark.parametrize("why", ["readahead off", "larger than half the memory available", "memory unknown"])
def test_read_ahead_holds_back(tmp_path, monkeypatch, why):
    """A store that would not fit beside what else is in memory is read on demand, as with readahead off."""
    store = DiskStore(tmp_path / "s")
    store.put(b"a", os.urandom(100_000))
    store.close()
    store = DiskStore(tmp_path / "s", create=False, readahead=why != "readahead off")
    available = {"larger than half the memory available": 2 * store.data_bytes() - 1, "memory unknown": None}
    if why in available:
        monkeypatch.setattr("kvtier.store.disk.host_available_bytes", lambda: available[why])
    calls = _fadvise_calls(monkeypatch)
    store.read_ahead()
    store.close()
    assert calls == []


def test_read_ahead_survives_a_file_system_that_refuses_it(tmp_path, monkeypatch):
    store = DiskStore(tmp_path / "s")
    store.put(b"a", b"1")

    def refuse(*args):
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(os, "posix_fadvise", refuse)
    store.read_ahead()
    assert store.get(b"a") == b"1"
    store.close()


def test_readahead_is_on_by_default_and_can_be_turned_off(tmp_path):
    """Readahead makes cold reads of whole records 10-30x faster (docs/benchmarks.md); it stays an option."""
    store = DiskStore(tmp_path / "s")
    store.put(b"a", os.urandom(100_000))
    assert store.env.flags()["readahead"] is True
    store.close()
    for readonly in (False, True):
        store = DiskStore(tmp_path / "s", create=False, readonly=readonly, readahead=False)
        assert store.env.flags()["readahead"] is False and store.readahead is False
        assert len(store.get(b"a")) == 100_000
        store.close()
