"""The disk tier: an LMDB environment holding chunk records and a little sealed JSON metadata.

One process at a time: an exclusive `flock` on `kvtier.lock` guards the directory, so a second opener gets
a clear error instead of two writers interleaving. Each write is one LMDB transaction: a crash or a full map
leaves the store exactly as the last committed transaction left it.

A store is untrusted data. Before LMDB maps `data.mdb`, its structure is checked page by page
(`lmdb_check`), so a truncated or damaged file raises `StoreCorruptError` instead of killing the process.
Nothing inside a store is ever followed if it is a symbolic link or written to if it is a hard link (the same
file under a name outside the store), a directory that is not a store is never written to, and every LMDB or
filesystem failure surfaces as a `StoreError` naming the store. Metadata entries are JSON sealed with a SHA-256
digest: a flipped bit or an edited digit is detected.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import resource
import shutil
import stat
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import lmdb

from ..errors import (
    IncompleteSessionError,
    StoreCorruptError,
    StoreError,
    StoreFullError,
    StoreLockedError,
    StoreMismatchError,
    StoreNotFoundError,
    brief_path,
)
from .backend import RecordStore
from .lmdb_check import check_lmdb_file
from .pools import host_available_bytes

LOCK_FILE = "kvtier.lock"
DATA_FILE = "data.mdb"
LMDB_LOCK_FILE = "lock.mdb"
STORE_FILES = (LOCK_FILE, DATA_FILE, LMDB_LOCK_FILE)
_RECORDS_DB = b"chunks"  # the named databases of the records and of the metadata
_META_DB = b"meta"
_DIR_MODE = 0o700
_FILE_MODE = 0o600
_META_MAGIC = b"KVTM"
_DIGEST_BYTES = 32
# A metadata entry's size and what parsing it may cost. A session's manifest is about 50 bytes per chunk (a
# million tokens over 80 layers in 64-token chunks: ~70 MB). JSON can cost ~24x its bytes once parsed
# (`[[],[],...]`), so the values it holds are counted before it is parsed: at most 72 bytes each (an empty
# dict and its reference; a string or number costs less beyond its own bytes).
META_MAX_BYTES = 256 << 20
META_MAX_PARSED_BYTES = 2 << 30
# What a write that finds no room fails with: LMDB says EIO for a short write (a full file system, or the process's
# file size limit reached part-way), ENOSPC/EDQUOT/EFBIG when the first byte finds no room.
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_NO_ROOM_SLACK = 1 << 20  # an EIO with less room than the write plus this left is put down to the full disk
# LMDB failures that mean the file is damaged (anything else is an I/O or usage problem).
_CORRUPT = (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.InvalidError, lmdb.VersionMismatchError,
            lmdb.IncompatibleError, lmdb.BadValsizeError, lmdb.PanicError)


def is_store(path: str | os.PathLike) -> bool:
    """Whether `path` is a kvtier store directory (or one whose creation was interrupted)."""
    path = Path(path)
    return path.is_dir() and os.path.lexists(path / LOCK_FILE)


def seal(obj: Any) -> bytes:
    """JSON with a SHA-256 digest in front, so any change to the bytes is detected."""
    body = json.dumps(obj, separators=(",", ":")).encode()
    return _META_MAGIC + hashlib.sha256(body).digest() + body


def unseal(raw: bytes, what: str) -> Any:
    """The JSON value of a sealed entry; StoreCorruptError if it was changed or damaged."""
    if raw[:4] != _META_MAGIC:
        legacy = _legacy_version(raw)
        if legacy is not None:
            raise StoreMismatchError(f"{what} was written by an older kvtier (layout version {legacy}); "
                                     "prefill the document again with this version")
        raise StoreCorruptError(f"{what} is damaged (not a sealed kvtier entry)")
    digest, body = raw[4:4 + _DIGEST_BYTES], raw[4 + _DIGEST_BYTES:]
    if hashlib.sha256(body).digest() != digest:
        raise StoreCorruptError(f"{what} is damaged (checksum mismatch)")
    _check_parse_cost(body, what)
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:  # the digest matched: written so on purpose, still refused
        raise StoreCorruptError(f"{what} is not valid JSON ({type(exc).__name__})") from None


def _check_parse_cost(body: bytes | memoryview, what: str) -> None:
    """Refuse JSON whose parsed form could exceed META_MAX_PARSED_BYTES, before parsing it: every value after
    the first follows a ',' a ':' or an opening bracket, so those bytes bound how many values there are."""
    if len(body) > META_MAX_BYTES:
        raise StoreCorruptError(f"{what} is {len(body)} bytes, more than the {META_MAX_BYTES} a kvtier entry may be")
    body = bytes(body)
    values = 1 + sum(body.count(c) for c in (b",", b":", b"[", b"{"))
    if 72 * values + len(body) > META_MAX_PARSED_BYTES:
        raise StoreCorruptError(f"{what} holds about {values} JSON values, more than a kvtier entry parses "
                                f"(at most {META_MAX_PARSED_BYTES >> 30} GiB once read): refused before parsing")


def _legacy_version(raw: bytes) -> int | None:
    """Layout version of plain-JSON metadata written before entries were sealed, if that is what it is."""
    if not raw.startswith(b"{"):
        return None
    try:
        _check_parse_cost(raw, "legacy metadata")
        version = json.loads(raw).get("layout_version")
    except (ValueError, RecursionError, AttributeError, StoreCorruptError):
        return None
    return version if isinstance(version, int) else None


def _errno_of(exc: lmdb.Error) -> int | None:
    """The system error an LMDB error reports, among a write's room errors and EIO (py-lmdb gives only the
    message, "mdb_txn_commit: Input/output error", for errors outside LMDB's own table)."""
    if isinstance(exc, lmdb.DiskError):
        return errno.ENOSPC
    if len(exc.args) > 1 and isinstance(exc.args[1], int):
        return exc.args[1]
    text = str(exc)
    return next((code for code in (*_NO_ROOM, errno.EIO) if text.endswith(os.strerror(code))), None)


def _lock_holder(fd: int) -> int | None:
    """The process holding the flock on `fd`'s file: the kernel's word (/proc/locks) where there is one, else the
    pid the last writer left in the file if that process still runs. A read-only opener (kvtier inspect) writes
    no pid, so the file alone may name a writer long gone."""
    st = os.fstat(fd)
    ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as locks:
            for line in locks:
                fields = line.split()  # "1: FLOCK ADVISORY WRITE 1234 fe:00:5678 0 EOF" ("1: -> FLOCK ..." waits)
                if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == ident and fields[4].isdigit():
                    return int(fields[4]) or None
    except OSError:
        pass
    written = os.pread(fd, 32, 0).decode(errors="replace").strip()
    if not written.isdigit() or not 0 < int(written) < 1 << 22:
        return None
    try:
        os.kill(int(written), 0)
    except ProcessLookupError:
        return None
    except OSError:
        pass  # runs as another user: alive
    return int(written)


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


def _in_page_cache(fd: int, offset: int) -> bool:
    """Whether the byte at `offset` can be read without waiting for the disk (a one-byte RWF_NOWAIT read; False
    where the kernel or file system cannot say)."""
    try:
        return os.preadv(fd, [bytearray(1)], offset, os.RWF_NOWAIT) == 1
    except (AttributeError, OSError):
        return False


class _ReadAhead:
    """Asks the kernel for a file's pages (POSIX_FADV_WILLNEED), one piece after another, on its own thread: a
    hint for more than a few MiB is cut short by the kernel, and one per piece blocks while the disk's queue is
    full (on the benchmark VM, hinting a cold 1.1 GB store in 8 MiB pieces took as long as reading it), so the
    hints run beside the caller, not in its way. A piece whose first and last bytes are in the page cache already
    (a warm store) is skipped. Where every piece was (the whole file in memory), `then(stopped)` runs next on the
    same thread, if given. `stop` ends the hints between two pieces (and asks `then` to end)."""

    PIECE = 8 << 20

    def __init__(self, fd: int, nbytes: int, then: Callable[[threading.Event], None] | None = None):
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(fd, nbytes, then), name="kvtier-read-ahead",
                                        daemon=True)
        self._thread.start()

    def _run(self, fd: int, nbytes: int, then: Callable[[threading.Event], None] | None) -> None:
        hinted = False
        for offset in range(0, nbytes, self.PIECE):
            if self._stopped.is_set():
                return
            size = min(self.PIECE, nbytes - offset)
            if _in_page_cache(fd, offset) and _in_page_cache(fd, offset + size - 1):
                continue  # a warm store: hinting pages already in memory only costs the CPU that decodes them
            hinted = True
            try:
                os.posix_fadvise(fd, offset, size, os.POSIX_FADV_WILLNEED)
            except OSError:
                return  # a hint: a file system that refuses it reads on demand as before
        if then is not None and not hinted and not self._stopped.is_set():
            then(self._stopped)

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()


class DiskStore(RecordStore):
    """The embedded record store (`RecordStore`): records and sealed JSON metadata in one LMDB environment.

    Records are opaque bytes here; `RecordCodec` gives them meaning. Writes are batched into one
    transaction per call. When the LMDB map fills up it doubles (up to `max_bytes`); when it cannot
    grow the write is rolled back and `StoreFullError` is raised, leaving the store readable.

    create: make the directory (or use an empty one) if there is no store yet; never a non-empty directory
        that is not a store. wipe: start from an empty store (the files of an existing one are removed, even
        damaged ones). readonly: read without writing anything, not even LMDB's lock file.
        readahead: let the kernel read ahead of the pages a read touches (see `_open_env`; on by default).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        create: bool = True,
        readonly: bool = False,
        wipe: bool = False,
        initial_map_bytes: int = 1 << 28,
        max_bytes: int | None = None,
        remove_on_close: bool = False,
        readahead: bool = True,
    ):
        self.path = Path(path)
        self._place = Path(os.path.abspath(path))  # where the store was opened, whatever the working directory becomes
        self.readahead = readahead
        self.max_bytes = max_bytes
        self.readonly = readonly
        self.remove_on_close = remove_on_close
        self.closed = True
        self._pid = os.getpid()  # `close` in a forked child leaves the parent's store alone
        self._resize_lock = _ResizeLock()
        self._lock_fd: int | None = None
        self._data_fd: int | None = None
        self._reading_ahead: _ReadAhead | None = None
        # (commit, {key: value size}) of the records as the open's check found them in LMDB's leaves
        self._walked: tuple[int, dict[bytes, int]] | None = None
        with self._os_errors("create" if create and not readonly else "open"):
            self._prepare_directory(create and not readonly)
            self._lock_fd = self._acquire_lock()
        try:
            with self._os_errors("open"):
                used = self._check_files(wipe)
            if max_bytes is not None:
                initial_map_bytes = min(initial_map_bytes, max_bytes)
            with self._lmdb_errors("open"):
                self._open_env(max(initial_map_bytes, used))
            try:
                with self._os_errors("open"):
                    self._data_fd = os.open(self.path / DATA_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except BaseException:
                self.env.close()
                raise
        except BaseException:
            self._release_lock()
            raise
        self.closed = False

    # ------------------------------------------------------------------------------------ opening
    def _prepare_directory(self, create: bool) -> None:
        if create:
            try:
                self.path.mkdir(parents=True, mode=_DIR_MODE)
            except FileExistsError:
                pass  # made by someone else meanwhile, or there already: checked below
        if not self.path.is_dir():
            if not create and not self.path.exists():
                broken = " (a symbolic link to nothing)" if self.path.is_symlink() else ""
                raise StoreNotFoundError(f"no kvtier store at {self.where}{broken}")
            raise StoreError(f"kvtier store path {self.where} exists and is not a directory")
        if os.path.lexists(self.path / LOCK_FILE):
            return
        if not create:
            raise StoreNotFoundError(f"no kvtier store at {self.where} (the directory holds no {LOCK_FILE})")
        if any(self.path.iterdir()):
            raise StoreError(f"{self.where} is not empty and is not a kvtier store; choose a new or empty directory")
        os.chmod(self.path, _DIR_MODE)  # an empty directory becomes a store: owner-only, like a new one

    def _acquire_lock(self) -> int:
        """Open `kvtier.lock` without following links and take the store's exclusive lock."""
        flags = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        flags |= os.O_RDONLY if self.readonly else os.O_RDWR | os.O_CREAT
        try:
            fd = os.open(self.path / LOCK_FILE, flags, _FILE_MODE)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise self._link_error(LOCK_FILE) from None
            if exc.errno == errno.EISDIR:
                raise self._odd_file_error(LOCK_FILE) from None
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise self._odd_file_error(LOCK_FILE)
            if not self.readonly and st.st_nlink != 1:  # the pid written below would land in the other name too
                raise self._hard_link_error(LOCK_FILE, st.st_nlink)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                holder = _lock_holder(fd)
                if holder == os.getpid():
                    raise StoreLockedError(
                        f"kvtier store {self.where} is already open in this process (another KVTierCache or store "
                        "holds it); close that one first, or use another store_path"
                    ) from None
                raise StoreLockedError(
                    f"kvtier store {self.where} is already open (holder pid {holder or 'unknown'}); close the other "
                    "cache or process first, or use another store_path"
                ) from None
            if not self.readonly:
                os.ftruncate(fd, 0)
                os.pwrite(fd, str(os.getpid()).encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _link_error(self, name: str) -> StoreCorruptError:
        return StoreCorruptError(f"kvtier store {self.where}: {name} is a symbolic link; kvtier never follows "
                                 "links inside a store (replace the store)")

    def _hard_link_error(self, name: str, links: int) -> StoreCorruptError:
        return StoreCorruptError(f"kvtier store {self.where}: {name} is a hard link ({links} names for one file); "
                                 "kvtier never writes to a file that also lives outside the store (copy the store "
                                 "without hard links, or open it read-only)")

    def _odd_file_error(self, name: str) -> StoreCorruptError:
        return StoreCorruptError(f"kvtier store {self.where}: {name} is not a regular file")

    def _check_files(self, wipe: bool) -> int:
        """Refuse links and odd files; with `wipe`, remove LMDB's files; else check data.mdb's structure.
        Returns the bytes of data.mdb that LMDB can reach (0 for a new store)."""
        for name in (DATA_FILE, LMDB_LOCK_FILE):
            try:
                st = os.lstat(self.path / name)
            except FileNotFoundError:
                continue
            if stat.S_ISLNK(st.st_mode):
                raise self._link_error(name)
            if not stat.S_ISREG(st.st_mode):
                raise self._odd_file_error(name)
            if wipe:
                os.unlink(self.path / name)  # removes this name only: another name of the file keeps its data
            elif not self.readonly and st.st_nlink != 1:  # LMDB would write through it
                raise self._hard_link_error(name, st.st_nlink)
        data = self.path / DATA_FILE
        if self.readonly and (not data.exists() or data.stat().st_size == 0):  # LMDB has not written it yet
            raise IncompleteSessionError(
                f"kvtier store {self.where} was interrupted before its first commit (its {DATA_FILE} is "
                f"{'empty' if data.exists() else 'missing'}); prefill again with overwrite=True"
            )
        if not data.exists():
            return 0
        summary = check_lmdb_file(data, f"kvtier store {self.where} ({DATA_FILE})")
        self._walked = (summary.txnid, summary.value_sizes.get(_RECORDS_DB, {}))
        return summary.used_bytes

    def _open_env(self, map_bytes: int) -> None:
        """map_bytes: at least what the data file's pages need (not its apparent size: a sparse file may claim
        any size; the map only needs the pages LMDB reaches)."""
        self.env = lmdb.open(
            str(self.path),
            map_size=map_bytes,
            max_dbs=4,
            mode=_FILE_MODE,
            subdir=True,
            readonly=self.readonly,
            lock=not self.readonly,  # read-only: our flock keeps writers out, and LMDB writes no lock file
            # Durability comes from explicit sync() at save and close; a killed process still leaves a
            # consistent store (the OS keeps the pages), only an OS crash could lose unsynced commits.
            sync=False,
            metasync=False,
            # Readahead on: a record is one run of pages and reading it faults them in one by one, so without
            # readahead every 4 KiB page is a separate synchronous disk read. Measured cold (page cache
            # dropped, `kvtier bench codec`, docs/benchmarks.md): every record in order, as an exact reopen
            # reads them, 42 -> 1868 MB/s (0.97x a plain sequential read); a random 5% of the records, as
            # sparse steps read them, 41 -> 108 MB/s although the kernel read 15x the bytes asked for (an
            # 8 MiB readahead window on that machine). readahead=False
            # remains for a store far larger than memory read at random, where those extra pages would
            # push out pages worth keeping.
            readahead=self.readahead,
        )
        try:
            self._chunks = self._open_db(_RECORDS_DB)
            self._meta = self._open_db(_META_DB)
        except BaseException:
            self.env.close()
            raise

    def _open_db(self, name: bytes):
        if not self.readonly:
            return self.env.open_db(name)
        try:
            return self.env.open_db(name, create=False)
        except lmdb.NotFoundError:
            raise IncompleteSessionError(
                f"kvtier store {self.where} was interrupted before its first commit; prefill again with "
                "overwrite=True"
            ) from None

    # ------------------------------------------------------------------------------------ errors
    @contextlib.contextmanager
    def _os_errors(self, doing: str):
        try:
            yield
        except (StoreError, lmdb.MapFullError):
            raise
        except OSError as exc:
            what = exc.strerror or type(exc).__name__
            raise StoreError(f"kvtier store {self.where}: cannot {doing} ({what}"
                             f"{': ' + brief_path(exc.filename) if exc.filename else ''})") from None

    @contextlib.contextmanager
    def _lmdb_errors(self, doing: str):
        try:
            with self._os_errors(doing):
                yield
        except lmdb.MapFullError:
            raise
        except _CORRUPT as exc:
            raise StoreCorruptError(f"kvtier store {self.where} is damaged: {doing} failed ({exc})") from None
        except lmdb.Error as exc:
            raise StoreError(f"kvtier store {self.where}: {doing} failed ({exc})") from None

    # ------------------------------------------------------------------------------------- records
    @property
    def where(self) -> str:
        return brief_path(self.path)

    def get(self, key: bytes) -> bytes | None:
        """Thread-safe: reader threads call it concurrently."""
        with self._lmdb_errors("read"), self._resize_lock.shared(), self.env.begin(db=self._chunks) as txn:
            return txn.get(key)

    def get_many(self, keys: Iterable[bytes]) -> list[bytes | None]:
        with self._lmdb_errors("read"), self._resize_lock.shared(), self.env.begin(db=self._chunks) as txn:
            return [txn.get(k) for k in keys]

    @contextlib.contextmanager
    def viewing(self) -> Iterator[Callable[[bytes], memoryview | None]]:
        """One read transaction for a batch of reads: inside the block, `get(key)` returns the record as a
        read-only view of the mapped file (None if absent), with no copy into a bytes object. A view is valid
        only until the block ends: decode it there, never keep it. Thread-safe, as `get` is."""
        with (self._lmdb_errors("read"), self._resize_lock.shared(),
              self.env.begin(db=self._chunks, buffers=True) as txn):
            yield txn.get

    def put_many(self, items: list[tuple[bytes, bytes]], meta: dict[str, Any] | None = None) -> None:
        """Write records (and optionally metadata entries) in one transaction."""
        sealed = [(name.encode(), seal(obj)) for name, obj in (meta or {}).items()]

        def write(txn: lmdb.Transaction) -> None:
            for key, value in items:
                txn.put(key, value, db=self._chunks)
            for name, value in sealed:
                txn.put(name, value, db=self._meta)

        self._write(write, sum(len(k) + len(v) for k, v in items) + sum(len(k) + len(v) for k, v in sealed))

    def remove_many(self, keys: Iterable[bytes]) -> None:
        keys = list(keys)
        if keys:
            self._write(lambda txn: [txn.delete(k, db=self._chunks) for k in keys])

    def keys(self) -> Iterator[bytes]:
        with self._lmdb_errors("list records"), self._resize_lock.shared(), self.env.begin(db=self._chunks) as txn:
            keys = list(txn.cursor().iternext(keys=True, values=False))
        yield from keys

    def record_sizes(self, keys: Iterable[bytes]) -> list[int | None]:
        """As `RecordStore.record_sizes`. Until the first commit after opening, from the sizes the open's check
        read in the tree's leaves: the binding's `get` touches every page of a value it returns, so asking it
        read the whole of a cold store at a reopen (95 ms of a 153 MB store's 190 ms open), one synchronous
        readahead window after another, before anything needed the values."""
        walked = self._walked
        if walked is not None:
            with self._lmdb_errors("read the store's state"), self._resize_lock.shared():
                current = self.env.info()["last_txnid"]
            if current == walked[0]:
                return [walked[1].get(key) for key in keys]
            self._walked = None  # a commit since: ask LMDB
        return super().record_sizes(keys)

    def record_count(self) -> int:
        with self._lmdb_errors("count records"), self._resize_lock.shared(), self.env.begin() as txn:
            return txn.stat(self._chunks)["entries"]

    # ---------------------------------------------------------------------------------------- meta
    def get_meta(self, name: str) -> Any | None:
        """A metadata entry (checked against its seal), or None if there is none."""
        what = f"kvtier store {self.where}: metadata {name!r}"
        with (self._lmdb_errors("read metadata"), self._resize_lock.shared(),
              self.env.begin(db=self._meta, buffers=True) as txn):
            view = txn.get(name.encode())
            if view is not None and len(view) > META_MAX_BYTES:  # refused before it is copied out of the map
                raise StoreCorruptError(f"{what} is {len(view)} bytes, more than the {META_MAX_BYTES} a kvtier "
                                        "entry may be")
            raw = None if view is None else bytes(view)
        return None if raw is None else unseal(raw, what)

    def delete_meta(self, name: str) -> None:
        self._write(lambda txn: txn.delete(name.encode(), db=self._meta))

    # --------------------------------------------------------------------------------------- sizes
    @property
    def map_bytes(self) -> int:
        return self.env.info()["map_size"]

    def data_bytes(self) -> int:
        """Bytes the data file holds up to LMDB's last page: no record or manifest can declare more. Not the
        file's apparent size, which a sparse or extended file makes as large as anyone likes."""
        with self._resize_lock.shared():
            return self._data_bytes()

    def _data_bytes(self) -> int:
        with self._os_errors("read the data file's size"):
            size = os.fstat(self._data_fd).st_size  # the open file's, wherever its directory is now
        with self._lmdb_errors("read the store's size"):
            return min(size, self.used_bytes())

    def read_ahead(self, first: Iterable[bytes] = ()) -> None:
        """Read the records of `first` now, then have the kernel read the data file into the page cache from a
        helper thread (`_ReadAhead`) and return: the disk works while the session is loaded and its memory
        committed, and the record reads that follow find their pages in memory instead of faulting them in one
        readahead window after another. `first`: the few records read before any other (a reopen's abstract
        tables, written last, at the end of the file: streamed, they waited for the whole file and held the open
        back with them; 333 -> 257 ms to a cold 153 MB session's first token). Skipped with readahead=False and
        for a file larger than half the memory available, whose pages would push out others (and each other)
        before they are read."""
        if self.closed or not self.readahead or not hasattr(os, "posix_fadvise"):
            return
        used = self.data_bytes()
        available = host_available_bytes()
        if used == 0 or available is None or used > available // 2:
            return
        self._stop_read_ahead()
        with self.viewing() as get:
            for key in first:
                get(key)  # the binding's get reads every page of the value
        self._reading_ahead = _ReadAhead(self._data_fd, used, self._map_records)

    def _map_records(self, stopped: threading.Event) -> None:
        """Touch every record's pages through LMDB's mapping, on the read-ahead thread, where the whole file is in
        memory: the binding's `get` does, with Python's lock released, so the page faults that map the file run
        beside the caller's work instead of in the first reads (a warm 8k store: `warm()` 35 -> 51 ms without
        this, 268 MB of pages mapped there). Not for a cold file, where it was not shown to help (cold opens on
        the benchmark VM varied 0.25-1.9 s from run to run, with and without it). In short read transactions, so
        that a growth of the map never waits long; ends when `stopped` is set."""
        try:
            keys = list(self.keys())
            for at in range(0, len(keys), 64):
                if stopped.is_set():
                    return
                with self._resize_lock.shared(), self.env.begin(db=self._chunks, buffers=True) as txn:
                    for key in keys[at:at + 64]:
                        txn.get(key)
        except (lmdb.Error, StoreError):
            return  # a hint: the reads that need the records report what is wrong

    def _stop_read_ahead(self) -> None:
        if self._reading_ahead is not None:
            self._reading_ahead.stop()
            self._reading_ahead = None

    def used_bytes(self) -> int:
        info, stat_ = self.env.info(), self.env.stat()
        return (info["last_pgno"] + 1) * stat_["psize"]

    def _room(self) -> int:
        """Bytes the data file can still grow by: its file system's free space, within this process's file size
        limit (RLIMIT_FSIZE, `ulimit -f`)."""
        fs = os.fstatvfs(self._data_fd)
        room = fs.f_bavail * fs.f_frsize
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY:
            room = min(room, max(0, limit - os.fstat(self._data_fd).st_size))
        return room

    @contextlib.contextmanager
    def _room_errors(self, size: int):
        """A write that failed for want of room on the disk is a StoreFullError (LMDB rolled it back), not an
        'Input/output error' that reads like a failing disk."""
        try:
            yield
        except lmdb.MapFullError:
            raise
        except lmdb.Error as exc:
            code = _errno_of(exc)
            if code not in (*_NO_ROOM, errno.EIO):
                raise
            try:
                room = self._room()
            except OSError:
                raise exc from None
            if code == errno.EIO and room >= size + _NO_ROOM_SLACK:
                raise
            raise StoreFullError(
                f"kvtier store {self.where}: no room on the disk for a write{f' of {size} bytes' if size else ''} "
                f"({room} bytes left to the "
                "store: its file system is full, or this process's file size limit reached); the failed write was "
                "rolled back and the store is as it was. Free disk space, or move the store to a larger disk"
            ) from None

    def _write(self, fn, size: int = 0) -> None:
        """Run `fn(txn)` in one write transaction. size: about how many bytes it writes (for a full disk's error)."""
        if self.readonly:
            raise StoreError(f"kvtier store {self.where} is open read-only")
        while True:
            try:
                with (self._lmdb_errors("write"), self._room_errors(size), self._resize_lock.shared(),
                      self.env.begin(write=True) as txn):
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
                f"kvtier store {self.where} reached its size limit of {current} bytes (max_store_bytes); "
                "the failed write was rolled back. Raise max_store_bytes or free disk space."
            )
        with self._os_errors("read the free disk space"):
            fs = os.fstatvfs(self._data_fd)  # the store's file system, even if its directory was moved
        free = fs.f_bavail * fs.f_frsize
        if target - current > free + self._data_bytes():  # under the exclusive lock already
            raise StoreFullError(
                f"kvtier store {self.where} is full and the disk has only {free} bytes free; "
                "the failed write was rolled back"
            )
        with self._lmdb_errors("grow the map"):
            self.env.set_mapsize(target)

    def check_in_place(self) -> None:
        """StoreError unless this store's data file is still the one at its path: a store directory removed or
        moved while open would take everything written from here on with it (a removed one, at close)."""
        with self._os_errors("check its data file"):
            held = os.fstat(self._data_fd)
            try:
                there = os.lstat(self._place / DATA_FILE)
            except FileNotFoundError:
                there = None
        if held.st_nlink == 0 or there is None or (there.st_dev, there.st_ino) != (held.st_dev, held.st_ino):
            gone = "removed" if held.st_nlink == 0 else "moved or replaced"
            raise StoreError(f"kvtier store {self.where} was {gone} while this process had it open ({DATA_FILE} there "
                             "is no longer its data file); the session is not saved: close the cache, and reopen or "
                             "prefill the store where it is now")

    # --------------------------------------------------------------------------------------- close
    def sync(self) -> None:
        if not self.readonly:
            with self._lmdb_errors("sync"):
                self.env.sync(True)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if os.getpid() != self._pid:
            # A forked child (its finalizers run at exit) shares the parent's store: unlocking would release the
            # parent's flock (one open file description), closing the env would clear the parent's LMDB reader
            # slots, and a temporary store would be deleted under it. The child leaves all of it alone.
            return
        try:
            if not self.remove_on_close and not self.readonly:
                with self._lmdb_errors("sync"):
                    self.env.sync(True)
        finally:
            self._stop_read_ahead()  # before its file descriptor closes (and its number is reused)
            self.env.close()
            if self._data_fd is not None:
                os.close(self._data_fd)
                self._data_fd = None
            self._release_lock()
            if self.remove_on_close:
                shutil.rmtree(self.path, ignore_errors=True)

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None
