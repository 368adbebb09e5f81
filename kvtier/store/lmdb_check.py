"""Check an LMDB data file's structure before LMDB maps it.

LMDB trusts its file: a truncated `data.mdb` makes it touch pages past the end of the file (SIGBUS), and
a damaged page header or node size makes it read or copy past a page, or trip an `abort()` assertion.
None of that can be caught in Python. So before LMDB opens a store, kvtier walks the file itself, with
bounds checks on every read: both meta pages (the newer one in the slot LMDB reads it from, its
transaction id far from wrapping), every B-tree page of the free-page database, the main
database and the named databases in it, and the header of every overflow page. It checks that every
page LMDB could reach lies inside the file, that no page is reachable twice, that no reachable page is
listed as free (a write would reuse it), that each free list descends and no page is free twice (LMDB
would hand it out twice and abort), that keys ascend in every page and lie in the range the parent page
gives them (LMDB's binary search would miss a key that is there), and that the counts in each database
record match the tree.

The layout follows LMDB 0.9 (`mdb.c`; data format version 1) on a 64-bit little-endian machine::

    page:  pgno u64 | pad u16 | flags u16 | lower u16 | upper u16 | node offsets u16[] ... nodes
           (overflow pages: pgno u64 | pad u16 | flags u16 | page count u32 | data)
    meta:  page header | magic u32 | version u32 | address u64 | mapsize u64 | free db | main db |
           last page u64 | txnid u64
    db:    pad u32 (page size, in the free db) | flags u16 | depth u16 | branch, leaf, overflow pages,
           entries, root: u64 each
    node:  lo u16 | hi u16 | flags u16 | key size u16 | key | data (or the overflow page number)

The walk reads each tree page once and one 16-byte header per overflow value: it costs a small fraction
of reading the values themselves.
"""

from __future__ import annotations

import bisect
import mmap
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import StoreCorruptError

_PAGE = struct.Struct("<QHHHH")  # pgno, pad, flags, lower, upper (overflow pages: lower|upper = page count)
_META = struct.Struct("<IIQQ")  # magic, version, address, mapsize
_DB = struct.Struct("<IHHQQQQQ")  # pad, flags, depth, branch pages, leaf pages, overflow pages, entries, root
_NODE = struct.Struct("<HHHH")  # lo, hi, flags, key size
_U64 = struct.Struct("<Q")
PAGE_HEADER = _PAGE.size  # 16
NODE_HEADER = _NODE.size  # 8
_META_AT = PAGE_HEADER
_DBS_AT = _META_AT + _META.size
_LAST_PAGE_AT = _DBS_AT + 2 * _DB.size
META_BYTES = _LAST_PAGE_AT + 16  # what LMDB reads of each meta page

MAGIC = 0xBEEFC0DE
DATA_VERSION = 1
NUM_METAS = 2
EMPTY_ROOT = 2**64 - 1
MAX_DEPTH = 31  # LMDB's cursor stack holds 32 pages
MAX_PAGE_SIZE = 32768
MAX_TXNID = 2**63  # transaction ids stay far below 2**64, where LMDB's "no reader" marker (-1) lies

P_BRANCH, P_LEAF, P_OVERFLOW, P_META = 0x01, 0x02, 0x04, 0x08
F_BIGDATA, F_SUBDATA, F_DUPDATA = 0x01, 0x02, 0x04
FREE_DB_FLAGS = 0x08  # MDB_INTEGERKEY: what LMDB stores in the free db record


_Key = bytes | int


@dataclass(frozen=True, slots=True)
class _Db:
    pad: int
    flags: int
    depth: int
    branch_pages: int
    leaf_pages: int
    overflow_pages: int
    entries: int
    root: int


@dataclass(slots=True)
class LmdbSummary:
    """What the walk learned: page size, the file's pages, and the entries of each named database."""

    page_size: int = 0
    file_pages: int = 0
    used_bytes: int = 0  # bytes LMDB can reach: up to its last page (a longer file holds nothing more)
    named: dict[bytes, int] = field(default_factory=dict)  # database name -> entries
    # database name -> {key: value size}, read from the leaves without touching a value's pages
    value_sizes: dict[bytes, dict[bytes, int]] = field(default_factory=dict)
    txnid: int = 0  # the last commit's transaction id: `value_sizes` holds until the next commit


class _Walker:
    def __init__(self, buf: mmap.mmap | bytes, size: int, name: str):
        self.buf, self.size, self.name = buf, size, name
        self.psize = 0
        self.limit = 0  # pages below this exist in the file and in LMDB's view
        self.next_pgno = 0
        self.ranges: list[tuple[int, int]] = []  # reachable [first, end) page runs
        self.free: list[int] = []  # pages the free-page database lists
        self.overflows: list[tuple[int, int, int, int]] = []  # (first page, pages needed, leaf page, node): unread
        self.txnid = 0  # the newer meta page's transaction id

    def fail(self, what: str) -> StoreCorruptError:
        return StoreCorruptError(f"{self.name} is damaged: {what}")

    def read(self, offset: int, st: struct.Struct) -> tuple:
        if offset < 0 or offset + st.size > self.size:
            raise self.fail(f"a read at byte {offset} runs past the end of the file ({self.size} bytes)")
        return st.unpack_from(self.buf, offset)

    # ------------------------------------------------------------------------------------- meta
    def meta(self, offset: int, which: int) -> tuple[_Db, _Db, int, int, int]:
        if offset + META_BYTES > self.size:
            raise self.fail(f"meta page {which} is missing (the file is {self.size} bytes)")
        _, _, flags, _, _ = self.read(offset, _PAGE)
        if flags != P_META:
            raise self.fail(f"page {which} is not a meta page")
        magic, version, _, _ = self.read(offset + _META_AT, _META)
        if magic != MAGIC:
            raise self.fail(f"meta page {which} has a bad magic number")
        if version != DATA_VERSION:
            raise self.fail(f"meta page {which} has data format version {version}, expected {DATA_VERSION}")
        free = _Db(*self.read(offset + _DBS_AT, _DB))
        main = _Db(*self.read(offset + _DBS_AT + _DB.size, _DB))
        last_pg, txnid = self.read(offset + _LAST_PAGE_AT, struct.Struct("<QQ"))
        return free, main, last_pg, txnid, free.pad

    def metas(self) -> tuple[_Db, _Db]:
        """Both meta pages must be valid (LMDB refuses the file otherwise); LMDB uses the newer one.

        LMDB opens the newer meta page, but once its lock file holds that transaction id every transaction
        reads the meta page in slot `txnid & 1`: commit n writes meta page n % 2. So the newer page must sit in
        that slot (else LMDB would read the other page, which this walk did not check), and the ids must
        differ unless the file is new. An id near 2**64 would wrap (LMDB takes -1 for "no reader")."""
        free0, main0, last0, txn0, psize = self.meta(0, 0)
        if psize < 512 or psize > MAX_PAGE_SIZE or psize & (psize - 1):
            raise self.fail(f"meta page 0 declares a page size of {psize} bytes")
        free1, main1, last1, txn1, psize1 = self.meta(psize, 1)
        if psize1 != psize:
            raise self.fail(f"the meta pages disagree on the page size ({psize} and {psize1})")
        self.psize = psize
        newer = 1 if txn0 < txn1 else 0
        free, main, last = (free1, main1, last1) if newer else (free0, main0, last0)
        self.txnid = max(txn0, txn1)
        if self.txnid >= MAX_TXNID:
            raise self.fail(f"meta page {newer} has transaction id {self.txnid}, past {MAX_TXNID - 1}")
        if self.txnid & 1 != newer or (txn0 == txn1 and txn0 != 0):
            raise self.fail(f"the meta pages' transaction ids ({txn0} and {txn1}) are not those of commits that "
                            "write them in turn")
        if free.flags != FREE_DB_FLAGS:
            raise self.fail(f"the free-page database has flags {free.flags:#x}")
        if main.flags != 0:  # kvtier's main database; other flags change how LMDB orders or finds its keys
            raise self.fail(f"the main database has flags {main.flags:#x}")
        self.next_pgno = last + 1
        self.limit = min(self.next_pgno, self.size // psize)
        return free, main

    # ------------------------------------------------------------------------------------- trees
    def page(self, pgno: int, what: str) -> tuple[int, int, int, int]:
        """Header of a page LMDB can reach: (flags, lower, upper, offset)."""
        if pgno < NUM_METAS or pgno >= self.limit:
            if NUM_METAS <= pgno < self.next_pgno:
                raise self.fail(f"{what} page {pgno} lies past the end of the file: the file is truncated to "
                                f"{self.size} bytes, its pages need {self.next_pgno * self.psize}")
            raise self.fail(f"{what} refers to page {pgno}, outside pages 2..{self.next_pgno - 1}")
        offset = pgno * self.psize
        stored, _, flags, lower, upper = self.read(offset, _PAGE)
        if stored != pgno:
            raise self.fail(f"page {pgno} says it is page {stored}")
        return flags, lower, upper, offset

    def tree(self, db: _Db, what: str, free_db: bool = False,
             sizes: dict[bytes, int] | None = None) -> list[tuple[bytes, _Db]]:
        """Walk one B-tree; returns the named databases found in its leaves ([(name, record)] in the main db).
        sizes: filled with each leaf key's value size."""
        if db.root == EMPTY_ROOT:
            if db.entries or db.depth or db.branch_pages or db.leaf_pages or db.overflow_pages:
                raise self.fail(f"the empty {what} database declares entries or pages")
            return []
        counts = {"branch": 0, "leaf": 0, "overflow": 0, "entries": 0}
        named: list[tuple[bytes, _Db]] = []
        leaf_depths: set[int] = set()
        stack: list[tuple[int, int, _Key | None, _Key | None]] = [(db.root, 1, None, None)]
        while stack:
            pgno, depth, low, high = stack.pop()  # the keys below this page lie in [low, high)
            if depth > MAX_DEPTH:
                raise self.fail(f"the {what} database is deeper than {MAX_DEPTH} pages (a page loop?)")
            kind, lower, upper, offset = self.page(pgno, f"the {what} database")
            self.ranges.append((pgno, pgno + 1))
            if kind not in (P_BRANCH, P_LEAF):  # what LMDB writes; dirty, dupsort or other bits are damage
                raise self.fail(f"page {pgno} of the {what} database has flags {kind:#x}")
            if lower < PAGE_HEADER or lower % 2 or upper > self.psize or lower > upper:
                raise self.fail(f"page {pgno} has free-space bounds {lower}..{upper}")
            n = (lower - PAGE_HEADER) // 2
            if n < (2 if kind == P_BRANCH and not free_db else 1):
                raise self.fail(f"page {pgno} of the {what} database holds {n} keys")
            keys: list[_Key | None] = []
            children: list[int] = []
            extents: list[tuple[int, int]] = []  # [start, end) of each node in the page
            buf, psize = self.buf, self.psize  # the page lies in the file (`page`): reads inside it need no check
            if kind == P_LEAF:
                leaf_depths.add(depth)
            for i, ptr in enumerate(struct.unpack_from(f"<{n}H", buf, offset + PAGE_HEADER)):
                if ptr < upper or ptr % 2 or ptr + NODE_HEADER > psize:
                    raise self.fail(f"page {pgno} node {i} starts at byte {ptr}")
                lo, hi, nflags, ksize = _NODE.unpack_from(buf, offset + ptr)
                key_at = offset + ptr + NODE_HEADER
                if ptr + NODE_HEADER + ksize > psize:
                    raise self.fail(f"page {pgno} node {i} has a {ksize}-byte key past the page end")
                # a branch page's first key is never compared: its child holds everything below the second
                raw = buf[key_at:key_at + ksize]
                keys.append(None if kind == P_BRANCH and i == 0 else self.key(raw, pgno, i) if free_db else raw)
                if kind == P_BRANCH:
                    children.append(lo | hi << 16 | nflags << 32)
                    extents.append((ptr, ptr + NODE_HEADER + ksize))
                    continue
                counts["entries"] += 1
                size = lo | hi << 16
                extents.append((ptr, ptr + NODE_HEADER + ksize + (8 if nflags & F_BIGDATA else size)))
                value = self.leaf_value(pgno, i, nflags, size, key_at + ksize, ptr + NODE_HEADER + ksize)
                if sizes is not None:
                    sizes[raw] = size
                if free_db:
                    self.free_list(value, size, pgno, i)
                elif nflags & F_SUBDATA:
                    sub = _Db(*self.read(value, _DB))
                    if sub.flags:
                        raise self.fail(f"named database {raw!r} has flags {sub.flags:#x}")
                    named.append((raw, sub))
            self.check_order(keys, low, high, pgno, what)
            self.check_packed(extents, upper, pgno, what)
            if kind == P_BRANCH:
                bounds = [low, *keys[1:], high]
                stack += [(child, depth + 1, bounds[j], bounds[j + 1]) for j, child in enumerate(children)]
            counts["branch" if kind == P_BRANCH else "leaf"] += 1
        counts["overflow"] = self.overflow_headers()
        if len(leaf_depths) != 1 or leaf_depths.pop() != db.depth:
            raise self.fail(f"the {what} database's leaves are not all at its recorded depth {db.depth}")
        recorded = {"branch": db.branch_pages, "leaf": db.leaf_pages, "overflow": db.overflow_pages,
                    "entries": db.entries}
        for name, value in counts.items():
            if recorded[name] != value:
                raise self.fail(f"the {what} database records {recorded[name]} {name} "
                                f"{'' if name == 'entries' else 'pages '}but holds {value}")
        return named

    def key(self, raw: bytes, pgno: int, i: int) -> int:
        """A free-page database key as LMDB orders it: an integer (a transaction id). Other databases' keys are
        compared as bytes (memcmp, a shorter key before a longer one it begins), as Python compares them."""
        if len(raw) != 8:
            raise self.fail(f"page {pgno} node {i} of the free-page database has a {len(raw)}-byte key")
        txnid = int.from_bytes(raw, "little")
        if txnid > self.txnid:  # pages are freed by a commit no newer than the last one
            raise self.fail(f"page {pgno} node {i} of the free-page database lists pages freed by transaction "
                            f"{txnid}, after the last ({self.txnid})")
        return txnid

    def check_order(self, keys: list[_Key | None], low: _Key | None, high: _Key | None, pgno: int,
                    what: str) -> None:
        """A page's keys ascend strictly and lie inside the range its parent gives it: LMDB finds keys by binary
        search, so a key out of order is one that reads say is absent, or a write puts in a wrong place."""
        known = [k for k in keys if k is not None]
        for a, b in zip(known, known[1:]):
            if not a < b:
                raise self.fail(f"page {pgno} of the {what} database holds its keys out of order")
        if known and ((low is not None and known[0] < low) or (high is not None and not known[-1] < high)):
            raise self.fail(f"page {pgno} of the {what} database holds keys outside its parent's range")

    def check_packed(self, extents: list[tuple[int, int]], upper: int, pgno: int, what: str) -> None:
        """A page's nodes fill [upper, page end) exactly, each at an even offset (LMDB adds a node just below
        `upper` and, deleting one, moves the nodes below it up by its size): nodes that overlap or leave gaps
        would make a deletion's arithmetic move bytes outside the page."""
        at = upper
        for start, end in sorted(extents):
            if start != at:
                raise self.fail(f"page {pgno} of the {what} database has overlapping or scattered nodes")
            at = end + (end & 1)
        if at != self.psize:
            raise self.fail(f"page {pgno} of the {what} database has overlapping or scattered nodes")

    def leaf_value(self, pgno: int, i: int, nflags: int, size: int, value_at: int, end_in_page: int) -> int:
        """Check where a leaf node's value lies; returns its offset in the file."""
        if nflags & ~(F_BIGDATA | F_SUBDATA) or nflags == F_BIGDATA | F_SUBDATA:
            raise self.fail(f"page {pgno} node {i} has flags {nflags:#x}")
        if nflags & F_SUBDATA and size != _DB.size:
            raise self.fail(f"page {pgno} node {i} is a database record of {size} bytes")
        if not nflags & F_BIGDATA:
            if end_in_page + size > self.psize:
                raise self.fail(f"page {pgno} node {i} declares {size} bytes past the page end")
            return value_at
        if end_in_page + 8 > self.psize:
            raise self.fail(f"page {pgno} node {i} has no room for its overflow page number")
        (first,) = self.read(value_at, _U64)
        needed = (PAGE_HEADER - 1 + size) // self.psize + 1
        if first < NUM_METAS or first + needed > self.limit:
            raise self.fail(f"page {pgno} node {i}: a {size}-byte value on pages {first}..{first + needed - 1} "
                            f"does not fit the file ({self.limit} pages hold data)")
        self.overflows.append((first, needed, pgno, i))  # its header is read with the tree's others
        return first * self.psize + PAGE_HEADER

    def overflow_headers(self) -> int:
        """Check the headers of the overflow runs the tree just walked named; returns the pages they hold.

        Read together, in file order, after asking the kernel for all their pages at once: one synchronous 4 KiB
        read after another (the mapping reads no pages around a fault: `_only_pages_touched`) took 118 ms for the
        2048 records of a cold 153 MB store, hinted first 31 ms: the disk serves queued reads side by side."""
        runs, self.overflows = sorted(self.overflows), []
        self.will_need(first * self.psize for first, _, _, _ in runs)
        total = 0
        for first, needed, pgno, i in runs:
            stored, _, flags, lower, upper = self.read(first * self.psize, _PAGE)
            # A value overwritten by a smaller one in the transaction that wrote it keeps its pages (LMDB
            # rewrites it in place), so a run may hold more pages than its value needs, never fewer.
            pages = lower | upper << 16
            if stored != first or flags != P_OVERFLOW or pages < needed or first + pages > self.limit:
                raise self.fail(f"overflow page {first} (page {pgno} node {i}) has a damaged header")
            self.ranges.append((first, first + pages))
            total += pages
        return total

    def will_need(self, offsets: Iterable[int]) -> None:
        """Ask the kernel to read the pages holding these offsets of the mapping, without waiting for them."""
        if not isinstance(self.buf, mmap.mmap):
            return
        for offset in offsets:
            start = offset - offset % mmap.PAGESIZE
            try:
                self.buf.madvise(mmap.MADV_WILLNEED, start, min(mmap.PAGESIZE, self.size - start))
            except (AttributeError, OSError, ValueError):
                return

    def free_list(self, at: int, size: int, pgno: int, i: int) -> None:
        if size < 8 or size % 8:
            raise self.fail(f"free list at page {pgno} node {i} has {size} bytes")
        (count,) = self.read(at, _U64)
        if count != size // 8 - 1:
            raise self.fail(f"free list at page {pgno} node {i} counts {count} pages in {size} bytes")
        pages = struct.unpack_from(f"<{count}Q", self.buf, at + 8)
        if any(p < NUM_METAS or p >= self.next_pgno for p in pages):
            raise self.fail(f"free list at page {pgno} node {i} names a page outside the file")
        # LMDB keeps each list in descending order and merges lists assuming it; a page listed twice is handed
        # out twice, which trips its assertions (abort) or gives two values one page
        if any(a <= b for a, b in zip(pages, pages[1:])):
            raise self.fail(f"free list at page {pgno} node {i} is not in descending order")
        self.free.extend(pages)

    # ----------------------------------------------------------------------------------- overlaps
    def check_overlaps(self) -> None:
        free = sorted(self.free)
        for a, b in zip(free, free[1:]):
            if a == b:
                raise self.fail(f"page {a} is listed as free twice")
        ranges = sorted(self.ranges)
        for (a0, a1), (b0, _) in zip(ranges, ranges[1:]):
            if b0 < a1:
                raise self.fail(f"page {b0} is reachable twice")
        starts = [r[0] for r in ranges]
        for p in self.free:
            j = bisect.bisect_right(starts, p) - 1
            if j >= 0 and p < ranges[j][1]:
                raise self.fail(f"page {p} is in use and also listed as free")
        missing = self.next_pgno - self.size // self.psize
        if missing > 0 and sum(1 for p in self.free if p * self.psize >= self.size) < missing:
            raise self.fail(f"the file is truncated to {self.size} bytes; its pages need "
                            f"{self.next_pgno * self.psize}")


def check_lmdb_file(path: str | os.PathLike, name: str | None = None) -> LmdbSummary:
    """Walk an LMDB data file; raise StoreCorruptError naming the damage, else return a summary.

    An empty file is what LMDB creates before its first write; it passes (LMDB initialises it). Only the part of
    the file up to the last page the meta pages name is mapped and walked: bytes past it (a file extended, or a
    sparse file of any apparent size) are never read, by this check or by LMDB."""
    path = Path(path)
    label = name or str(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return LmdbSummary()
        head = os.pread(f.fileno(), min(size, NUM_METAS * MAX_PAGE_SIZE), 0)
        first = _Walker(head, len(head), label)
        first.metas()
        reach = min(size, max(first.next_pgno, NUM_METAS) * first.psize)
        with mmap.mmap(f.fileno(), reach, access=mmap.ACCESS_READ) as buf:
            _only_pages_touched(buf)
            walker = _Walker(buf, reach, label)
            free, main = walker.metas()
            walker.tree(free, "free-page", free_db=True)
            summary = LmdbSummary(walker.psize, walker.limit, walker.next_pgno * walker.psize, txnid=walker.txnid)
            for db_name, db in walker.tree(main, "main"):
                summary.value_sizes[db_name] = {}
                walker.tree(db, f"{db_name.decode(errors='replace')!r}", sizes=summary.value_sizes[db_name])
                summary.named[db_name] = db.entries
            walker.check_overlaps()
            return summary


def _only_pages_touched(buf: mmap.mmap) -> None:
    """Fault in only the pages the walk reads. By default each fault on a file mapping reads the pages around
    it too (the readahead window, 8 MiB on the benchmark VM), one synchronous read after another, so the walk
    read a whole cold store at ~0.8 GB/s to look at one header per record; with MADV_RANDOM it reads those
    headers' pages only (a cold 268 MB store: 250-275 -> 20 ms)."""
    try:
        buf.madvise(mmap.MADV_RANDOM)
    except (AttributeError, OSError):
        pass
