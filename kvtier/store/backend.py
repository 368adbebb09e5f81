"""The storage interface the tier manager and saved sessions talk to, whatever holds the records.

A record store maps opaque byte keys to opaque byte records (`RecordCodec` gives them meaning) and keeps a
few sealed JSON metadata entries (the store header, the session manifest). Two implement it: `DiskStore`
(LMDB, the embedded default) and `RemoteSessionStore` (a session published on a Redis/Valkey server, read
through a local `DiskStore` that caches its records). Each implements the batched verbs; the single-key ones
and the rest are defined here once.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from typing import Any


class RecordStore(ABC):
    """contains / get / put / remove / close over byte records, their batched forms, and sealed metadata."""

    readonly: bool = False

    @property
    @abstractmethod
    def where(self) -> str:
        """How messages name this store: a path or a server URL without credentials."""

    # ------------------------------------------------------------------------- what each store implements
    @abstractmethod
    def get_many(self, keys: Iterable[bytes]) -> list[bytes | None]:
        """The records (None where absent), in the order asked. Thread-safe: reader threads call it."""

    @abstractmethod
    def put_many(self, items: list[tuple[bytes, bytes]], meta: dict[str, Any] | None = None) -> None:
        """Write records and metadata entries at once: all of them or, on an error, none."""

    @abstractmethod
    def remove_many(self, keys: Iterable[bytes]) -> None:
        """Forget records (absent keys are ignored)."""

    @abstractmethod
    def keys(self) -> Iterator[bytes]:
        """Every record key the store holds."""

    @abstractmethod
    def get_meta(self, name: str) -> Any | None:
        """A metadata entry, checked against its seal, or None if there is none."""

    @abstractmethod
    def data_bytes(self) -> int:
        """An upper bound on the bytes the store holds: no record or manifest may declare more."""

    @abstractmethod
    def close(self) -> None:
        """Release the store (idempotent)."""

    # ------------------------------------------------------------------------------------- defined once
    def get(self, key: bytes) -> bytes | None:
        return self.get_many([key])[0]

    def contains(self, key: bytes) -> bool:
        return self.get(key) is not None

    def put(self, key: bytes, value: bytes) -> None:
        self.put_many([(key, value)])

    def remove(self, key: bytes) -> None:
        self.remove_many([key])

    def put_meta(self, name: str, obj: Any) -> None:
        self.put_many([], meta={name: obj})

    def read_ahead(self, first: Iterable[bytes] = ()) -> None:
        """A hint that every record is about to be read (an exact-mode reopen), those of `first` before the rest:
        a store may start fetching them in the background. Nothing by default."""

    def record_count(self) -> int:
        return sum(1 for _ in self.keys())

    def record_sizes(self, keys: Iterable[bytes]) -> list[int | None]:
        """Each record's size in bytes (None where absent), in the order asked, without reading the records: a
        reopen checks every record's size against the manifest before anything is sized from the manifest."""
        with self.viewing() as get:
            return [None if (value := get(key)) is None else len(value) for key in keys]

    def missing(self, keys: Iterable[bytes]) -> list[bytes]:
        """The keys among `keys` that the store does not hold, in order: from the keys alone, since a reopen
        asks about every record and reading them (as the lmdb binding's `get` does, touching every page of a
        value it returns) would read a whole cold store before anything needs it."""
        present = set(self.keys())
        return [k for k in keys if k not in present]

    def warm(self, keys: Iterable[bytes]) -> None:
        """A hint that these records are read next (a store with a slow source fetches them in one batch)."""

    @contextlib.contextmanager
    def viewing(self) -> Iterator[Callable[[bytes], bytes | memoryview | None]]:
        """One batch of reads: inside the block, `get(key)` returns a record, valid until the block ends."""
        yield self.get

    def sync(self) -> None:
        """Make what was written durable (a no-op where every write already is)."""

    def __enter__(self) -> "RecordStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
