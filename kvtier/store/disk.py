"""The disk tier: an LMDB environment holding chunk records and a little JSON metadata.

One process at a time: an exclusive `flock` guards the directory, so a second opener gets a clear
error instead of two writers interleaving. Each write is one LMDB transaction: a crash or a full map
leaves the store exactly as the last committed transaction left it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import lmdb

from ..errors import StoreFullError, StoreLockedError

LOCK_FILE = "kvtier.lock"
_DIR_MODE = 0o700
_FILE_MODE = 0o600


class _ResizeLock:
    """Many readers and writers at once, except while the map is resized (LMDB needs no open transaction
    in the process then). Readers never wait behind ordinary writes: LMDB readers see a snapshot."""

    def __init__(self):
        self._cond = threading.Condition()
        self._active = 0
        self._resizing = False

    @contextlib.contextmanager
    def shared(self):
        with self._cond:
            self._cond.wait_for(lambda: not self._resizing)
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self):
        with self._cond:
            self._cond.wait_for(lambda: not self._resizing)
            self._resizing = True
            self._cond.wait_for(lambda: self._active == 0)
        try:
            yield
        finally:
            with self._cond:
                self._resizing = False
                self._cond.notify_all()


class DiskStore:
    """Minimal storage interface: contains / put / get / remove / close, plus JSON metadata.

    Records are opaque bytes here; `RecordCodec` gives them meaning. Writes are batched into one
    transaction per call. When the LMDB map fills up it doubles (up to `max_bytes`); when it cannot
    grow the write is rolled back and `StoreFullError` is raised, leaving the store readable.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        create: bool = True,
        initial_map_bytes: int = 1 << 28,
        max_bytes: int | None = None,
        remove_on_close: bool = False,
    ):
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.remove_on_close = remove_on_close
        self._resize_lock = _ResizeLock()
        if not self.path.exists():
            if not create:
                raise FileNotFoundError(f"no kvtier store at {self.path}")
            self.path.mkdir(parents=True, mode=_DIR_MODE)
        elif not self.path.is_dir():
            raise NotADirectoryError(f"kvtier store path {self.path} exists and is not a directory")
        os.chmod(self.path, _DIR_MODE)
        self._lock_fd = self._acquire_lock()
        try:
            map_size = max(initial_map_bytes, self._existing_data_bytes())
            self.env = lmdb.open(
                str(self.path),
                map_size=map_size,
                max_dbs=4,
                mode=_FILE_MODE,
                subdir=True,
                # Durability comes from explicit sync() at save and close; a killed process still leaves a
                # consistent store (the OS keeps the pages), only an OS crash could lose unsynced commits.
                sync=False,
                metasync=False,
                readahead=False,
            )
            self._chunks = self.env.open_db(b"chunks")
            self._meta = self.env.open_db(b"meta")
        except BaseException:
            self._release_lock()
            raise
        self.closed = False

    # ----------------------------------------------------------------------------------------- locking
    def _acquire_lock(self) -> int:
        lock_path = self.path / LOCK_FILE
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, _FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StoreLockedError(
                    f"kvtier store {self.path} is already open (holder pid {holder}); close the other cache "
                    "or process first, or use another store_path"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        return fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def _existing_data_bytes(self) -> int:
        data = self.path / "data.mdb"
        return data.stat().st_size if data.exists() else 0

    # ------------------------------------------------------------------------------------- records
    def contains(self, key: bytes) -> bool:
        return self.get(key) is not None

    def get(self, key: bytes) -> bytes | None:
        """Thread-safe: reader threads call it concurrently."""
        with self._resize_lock.shared(), self.env.begin(db=self._chunks) as txn:
            return txn.get(key)

    def get_many(self, keys: Iterable[bytes]) -> list[bytes | None]:
        with self._resize_lock.shared(), self.env.begin(db=self._chunks) as txn:
            return [txn.get(k) for k in keys]

    def put(self, key: bytes, value: bytes) -> None:
        self.put_many([(key, value)])

    def put_many(self, items: list[tuple[bytes, bytes]], meta: dict[str, Any] | None = None) -> None:
        """Write records (and optionally metadata entries) in one transaction."""

        def write(txn: lmdb.Transaction) -> None:
            for key, value in items:
                txn.put(key, value, db=self._chunks)
            for name, obj in (meta or {}).items():
                txn.put(name.encode(), json.dumps(obj).encode(), db=self._meta)

        self._write(write)

    def remove(self, key: bytes) -> None:
        self.remove_many([key])

    def remove_many(self, keys: Iterable[bytes]) -> None:
        keys = list(keys)
        if keys:
            self._write(lambda txn: [txn.delete(k, db=self._chunks) for k in keys])

    def keys(self) -> Iterator[bytes]:
        with self._resize_lock.shared(), self.env.begin(db=self._chunks) as txn:
            keys = list(txn.cursor().iternext(keys=True, values=False))
        yield from keys

    # ---------------------------------------------------------------------------------------- meta
    def get_meta(self, name: str) -> Any | None:
        with self._resize_lock.shared(), self.env.begin(db=self._meta) as txn:
            raw = txn.get(name.encode())
        return None if raw is None else json.loads(raw)

    def put_meta(self, name: str, obj: Any) -> None:
        self.put_many([], meta={name: obj})

    def delete_meta(self, name: str) -> None:
        self._write(lambda txn: txn.delete(name.encode(), db=self._meta))

    # --------------------------------------------------------------------------------------- sizes
    @property
    def map_bytes(self) -> int:
        return self.env.info()["map_size"]

    def used_bytes(self) -> int:
        info, stat = self.env.info(), self.env.stat()
        return (info["last_pgno"] + 1) * stat["psize"]

    def _write(self, fn) -> None:
        while True:
            try:
                with self._resize_lock.shared(), self.env.begin(write=True) as txn:
                    fn(txn)
                return
            except lmdb.MapFullError:
                with self._resize_lock.exclusive():
                    self._grow()

    def _grow(self) -> None:
        current = self.map_bytes
        target = current * 2
        if self.max_bytes is not None:
            target = min(target, self.max_bytes)
        if target <= current:
            raise StoreFullError(
                f"kvtier store {self.path} reached its size limit of {current} bytes (max_store_bytes); "
                "the failed write was rolled back. Raise max_store_bytes or free disk space."
            )
        free = shutil.disk_usage(self.path).free
        if target - current > free + self._existing_data_bytes():
            raise StoreFullError(
                f"kvtier store {self.path} is full and the disk has only {free} bytes free; "
                "the failed write was rolled back"
            )
        self.env.set_mapsize(target)

    # --------------------------------------------------------------------------------------- close
    def sync(self) -> None:
        self.env.sync(True)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            if not self.remove_on_close:
                self.env.sync(True)
            self.env.close()
        finally:
            self._release_lock()
            if self.remove_on_close:
                shutil.rmtree(self.path, ignore_errors=True)
