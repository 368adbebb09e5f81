"""The LMDB structure check (`kvtier.store.lmdb_check`) accepts every file LMDB writes and refuses the damage
that would make LMDB abort, crash, misplace a write, or miss a key: free pages listed twice or out of order, keys
out of order in a page or outside their parent's range, meta pages LMDB would read otherwise than the walk did, a
main database with flags."""

from __future__ import annotations

import os
import random
import struct
from pathlib import Path

import lmdb
import pytest

from kvtier import StoreCorruptError
from kvtier.store import lmdb_check as lc


def _write_history(path: Path, seed: int, txns: int = 40) -> Path:
    """A store LMDB itself wrote through a random history: puts of small values and of values on overflow
    pages, deletes, values overwritten by smaller ones in the transaction that wrote them (LMDB keeps their
    pages), several named databases, enough keys for branch pages, pages freed and reused."""
    rng = random.Random(seed)
    env = lmdb.open(str(path), map_size=1 << 28, max_dbs=4)
    dbs = [env.open_db(name) for name in (b"chunks", b"meta", b"z")]
    for _ in range(txns):
        with env.begin(write=True) as txn:
            for _ in range(rng.randrange(5, 40)):
                db, key = rng.choice(dbs), b"key-%04d" % rng.randrange(600)
                if rng.random() < 0.3:
                    txn.delete(key, db=db)
                    continue
                txn.put(key, os.urandom(rng.choice([8, 200, 3000, 9000, 40000])), db=db)
                if rng.random() < 0.2:  # overwritten in the same transaction by a smaller value
                    txn.put(key, os.urandom(rng.choice([8, 100, 2000])), db=db)
    env.close()
    return path / "data.mdb"


@pytest.mark.parametrize("seed", range(6))
def test_every_file_lmdb_writes_passes(tmp_path, seed):
    data = _write_history(tmp_path, seed)
    summary = lc.check_lmdb_file(data)
    env = lmdb.open(str(tmp_path), max_dbs=4, readonly=True, lock=False)
    assert summary.txnid == env.info()["last_txnid"]
    with env.begin() as txn:
        for name, entries in summary.named.items():
            db = env.open_db(name, txn=txn)
            assert txn.stat(db)["entries"] == entries
            assert summary.value_sizes[name] == {bytes(k): len(v) for k, v in txn.cursor(db=db)}
    env.close()


def test_a_damaged_overflow_header_is_refused(tmp_path):
    """Overflow headers are read after the walk (all hinted to the kernel first): each is still checked."""
    data_path = _write_history(tmp_path, 3)
    clean = bytearray(data_path.read_bytes())
    psize = _psize(clean)
    overflow = [p for p in range(2, len(clean) // psize) if struct.unpack_from("<H", clean, p * psize + 10)[0] == 4]
    lc.check_lmdb_file(data_path)
    reachable = []
    for p in overflow:  # pages of values freed later keep their header: only a reachable run's counts
        data = bytearray(clean)
        struct.pack_into("<Q", data, p * psize, p + 1)  # says it is another page
        data_path.write_bytes(data)
        try:
            lc.check_lmdb_file(data_path)
        except StoreCorruptError as exc:
            assert f"overflow page {p} " in str(exc) and "damaged header" in str(exc)
            reachable.append(p)
    assert reachable
    p = reachable[0]
    for edit in (lambda d: struct.pack_into("<H", d, p * psize + 10, 1),  # flags: a branch page
                 lambda d: struct.pack_into("<HH", d, p * psize + 12, 0, 0)):  # holds no pages
        data = bytearray(clean)
        edit(data)
        _refused(data_path, data, f"overflow page {p} ")


def _tree_pages(data: bytes, db_name: bytes | None) -> tuple[int, list[tuple[int, int, int]]]:
    """(page size, [(page number, flags, node count)]) of one tree: the free-page db (None) or a named db."""
    w = lc._Walker(data, len(data), "x")
    free, main = w.metas()
    db = free if db_name is None else dict(w.tree(main, "main"))[db_name]
    pages, stack = [], [db.root]
    while stack:
        pgno = stack.pop()
        _, _, flags, lower, _ = struct.unpack_from("<QHHHH", data, pgno * w.psize)
        n = (lower - lc.PAGE_HEADER) // 2
        pages.append((pgno, flags, n))
        if flags & lc.P_BRANCH:
            for i in range(n):
                ptr = struct.unpack_from("<H", data, pgno * w.psize + lc.PAGE_HEADER + 2 * i)[0]
                lo, hi, nflags, _ = struct.unpack_from("<HHHH", data, pgno * w.psize + ptr)
                stack.append(lo | hi << 16 | nflags << 32)
    return w.psize, pages


def _free_lists(data: bytes) -> list[tuple[int, list[int]]]:
    """(byte offset of the page numbers, the page numbers) of every free list LMDB keeps inline in a leaf."""
    psize, pages = _tree_pages(data, None)
    out = []
    for pgno, flags, n in pages:
        if not flags & lc.P_LEAF:
            continue
        for i in range(n):
            ptr = struct.unpack_from("<H", data, pgno * psize + lc.PAGE_HEADER + 2 * i)[0]
            lo, hi, nflags, ksize = struct.unpack_from("<HHHH", data, pgno * psize + ptr)
            at = pgno * psize + ptr + lc.NODE_HEADER + ksize
            if nflags & lc.F_BIGDATA:
                at = struct.unpack_from("<Q", data, at)[0] * psize + lc.PAGE_HEADER
            count = struct.unpack_from("<Q", data, at)[0]
            out.append((at + 8, list(struct.unpack_from(f"<{count}Q", data, at + 8))))
    return out


def _with_free_lists(tmp_path: Path, seed: int) -> tuple[Path, bytearray, list[tuple[int, list[int]]]]:
    for s in range(seed, seed + 50):  # histories whose free pages sit in lists long enough to edit
        path = tmp_path / f"s{s}"
        path.mkdir()
        data_path = _write_history(path, s)
        data = bytearray(data_path.read_bytes())
        lists = _free_lists(bytes(data))
        if sum(len(pages) >= 3 for _, pages in lists) and len(lists) >= 2:
            return data_path, data, lists
    pytest.skip("no history left free lists to edit")


def _refused(data_path: Path, data: bytearray, message: str) -> None:
    data_path.write_bytes(bytes(data))
    with pytest.raises(StoreCorruptError, match=message):
        lc.check_lmdb_file(data_path)


def test_a_page_listed_free_twice_in_one_list_is_refused(tmp_path):
    # LMDB hands such a page out twice: its assertions abort the process on the next write
    data_path, data, lists = _with_free_lists(tmp_path, 0)
    at, pages = next((at, pages) for at, pages in lists if len(pages) >= 3)
    pages[1] = pages[2]
    struct.pack_into(f"<{len(pages)}Q", data, at, *pages)
    _refused(data_path, data, "descending order|listed as free twice")


def test_a_page_listed_free_in_two_lists_is_refused(tmp_path):
    data_path, data, lists = _with_free_lists(tmp_path, 0)
    at, a = next((at, pages) for at, pages in lists if len(pages) >= 3)
    # a page of another list, put in place of this list's last page where the list stays descending
    shared = [p for at_b, b in lists if at_b != at for p in b if p < a[-2] and p not in a]
    if not shared:
        pytest.skip("no page of another list fits")
    a[-1] = shared[0]
    struct.pack_into(f"<{len(a)}Q", data, at, *a)
    _refused(data_path, data, "listed as free twice")


def test_a_free_list_out_of_order_is_refused(tmp_path):
    data_path, data, lists = _with_free_lists(tmp_path, 0)
    at, pages = next((at, pages) for at, pages in lists if len(pages) >= 3)
    pages[0], pages[1] = pages[1], pages[0]
    struct.pack_into(f"<{len(pages)}Q", data, at, *pages)
    _refused(data_path, data, "descending order")


def _swap_nodes(data: bytearray, psize: int, pgno: int, i: int, j: int) -> None:
    at = pgno * psize + lc.PAGE_HEADER
    a, b = struct.unpack_from("<H", data, at + 2 * i)[0], struct.unpack_from("<H", data, at + 2 * j)[0]
    struct.pack_into("<H", data, at + 2 * i, b)
    struct.pack_into("<H", data, at + 2 * j, a)


def test_keys_out_of_order_in_a_leaf_are_refused(tmp_path):
    # LMDB's binary search would then miss a key that is there (an open once called such a session unsaved)
    data_path = _write_history(tmp_path, 1)
    data = bytearray(data_path.read_bytes())
    psize, pages = _tree_pages(bytes(data), b"chunks")
    pgno, _, n = next(p for p in pages if p[1] & lc.P_LEAF and p[2] >= 2)
    _swap_nodes(data, psize, pgno, 0, n - 1)
    _refused(data_path, data, "out of order")


def test_a_leaf_holding_keys_outside_its_parents_range_is_refused(tmp_path):
    # each leaf's keys in order, but two leaves swapped under their parent: every page looks fine alone
    data_path = _write_history(tmp_path, 2, txns=80)
    data = bytearray(data_path.read_bytes())
    psize, pages = _tree_pages(bytes(data), b"chunks")
    branch = next((p for p in pages if p[1] & lc.P_BRANCH and p[2] >= 2), None)
    if branch is None:
        pytest.skip("the history left no branch page")
    _swap_nodes(data, psize, branch[0], 0, 1)
    # swapping node pointers moves keys too: put the separator keys back where they were
    _refused(data_path, data, "out of order|outside its parent's range")


def test_the_free_page_database_orders_its_keys_as_integers(tmp_path):
    # transaction ids 255 and 256 are in order as integers, not as little-endian bytes
    walker = lc._Walker(b"", 0, "x")
    walker.txnid = 1000
    keys = [walker.key((255).to_bytes(8, "little"), 0, 0), walker.key((256).to_bytes(8, "little"), 0, 1)]
    walker.check_order(keys, None, None, 0, "free-page")
    with pytest.raises(StoreCorruptError, match="8-byte key|-byte key"):
        walker.key(b"\x01\x02", 0, 0)
    with pytest.raises(StoreCorruptError, match="freed by transaction 1001, after the last .1000."):
        walker.key((1001).to_bytes(8, "little"), 0, 0)


def _meta_txnids(data: bytes, psize: int) -> list[int]:
    return [struct.unpack_from("<Q", data, i * psize + lc._LAST_PAGE_AT + 8)[0] for i in range(2)]


def _psize(data: bytes) -> int:
    walker = lc._Walker(data, len(data), "x")
    walker.metas()
    return walker.psize


@pytest.mark.parametrize("edit, message", [
    # the newer meta page moved to the other slot: once its lock file holds the id, LMDB reads meta page
    # txnid & 1, the page this walk did not check (a tree past the file's end: SIGBUS)
    ("older page made one newer", "not those of commits that write them in turn"),
    ("both ids equal", "not those of commits that write them in turn"),
    ("id near 2**64", "past 9223372036854775807"),  # LMDB's -1 means "no reader": the next commit wraps to 0
])
def test_meta_pages_lmdb_would_read_otherwise_than_the_walk_are_refused(tmp_path, edit, message):
    data_path = _write_history(tmp_path, 3)
    data = bytearray(data_path.read_bytes())
    psize = _psize(bytes(data))
    ids = _meta_txnids(bytes(data), psize)
    newer = ids.index(max(ids))
    older = 1 - newer
    value = {"older page made one newer": ids[newer] + 2, "both ids equal": ids[newer],
             "id near 2**64": 2**64 - 2 + newer}[edit]
    struct.pack_into("<Q", data, (older if edit != "id near 2**64" else newer) * psize + lc._LAST_PAGE_AT + 8, value)
    _refused(data_path, data, message)


def test_a_main_database_with_flags_is_refused(tmp_path):
    # MDB_REVERSEKEY: LMDB compared keys backwards, missed kvtier's databases and created new empty ones
    data_path = _write_history(tmp_path, 4)
    data = bytearray(data_path.read_bytes())
    psize = _psize(bytes(data))
    ids = _meta_txnids(bytes(data), psize)
    newer = ids.index(max(ids))
    struct.pack_into("<H", data, newer * psize + lc._DBS_AT + lc._DB.size + 4, 0x02)
    _refused(data_path, data, "the main database has flags 0x2")


def test_nodes_must_fill_their_page_exactly():
    # LMDB deletes a node by moving the nodes below it up by its size: overlapping or scattered nodes would make
    # that move bytes outside the page
    walker = lc._Walker(b"", 0, "x")
    walker.psize = 4096
    walker.check_packed([(4000, 4047), (4048, 4096)], 4000, 7, "main")  # odd ends are padded to even
    for extents in ([(4000, 4050), (4040, 4096)], [(4000, 4030), (4048, 4096)], [(4000, 4090)]):
        with pytest.raises(StoreCorruptError, match="page 7 of the main database has overlapping or scattered"):
            walker.check_packed(extents, 4000, 7, "main")
