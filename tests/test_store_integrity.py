"""A saved session gives exactly the KV it saved or fails with a KVTierError naming what is wrong: a sealed and
checked manifest, records bound to their session and slot, damaged LMDB files caught before LMDB maps them,
nothing followed through links, nothing written where no store is."""

from __future__ import annotations

import os
import shutil
import stat
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import lmdb
import pytest
import torch
from conftest import build_model, twin
from helpers import cache_kw

from kvtier import (
    IncompleteSessionError,
    KVTierCache,
    KVTierError,
    StoreCorruptError,
    StoreError,
    StoreMismatchError,
    StoreMissingRecordError,
    prefill,
)
from kvtier.store.chunk import ABSTRACT_ID, PAGES_ID, chunk_key
from kvtier.store.disk import DiskStore, seal, unseal

CHUNKING = dict(chunk_size=16, sink_tokens=4, recent_window=16, device_budget=40, host_budget=32)
DOC_LEN = 230


def _doc(seed: int) -> torch.Tensor:
    return torch.randint(3, 128, (1, DOC_LEN), generator=torch.Generator().manual_seed(seed))


def _save(model, path: Path, doc: torch.Tensor, overwrite: bool = False) -> None:
    m = twin(model)
    cache = KVTierCache.for_model(m, store_path=path, overwrite=overwrite, **CHUNKING)
    prefill(m, cache, doc, segment_tokens=100, progress=False)
    cache.save()
    cache.close()


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Two sessions of the same model (different documents of the same length), saved once."""
    root = tmp_path_factory.mktemp("integrity")
    model = build_model("llama")
    _save(model, root / "a", _doc(1))
    _save(model, root / "b", _doc(2))
    return model, root


@pytest.fixture
def store(stores, tmp_path):
    model, root = stores
    shutil.copytree(root / "a", tmp_path / "a")
    shutil.copytree(root / "b", tmp_path / "b")
    return model, tmp_path / "a", tmp_path / "b"


def _answer(model, path: Path, doc: torch.Tensor) -> torch.Tensor:
    """Reopen and decode: logits of a question after the stored document."""
    m = twin(model)
    cache = KVTierCache.open(path, m, prompt_ids=doc)
    try:
        with torch.no_grad():
            out = m(input_ids=torch.tensor([[5, 6, 7]]), **{cache_kw(m): cache})
        return out.logits
    finally:
        cache.close()


# ------------------------------------------------------------------------------------ raw LMDB edits
def _with_db(path: Path, name: bytes, fn):
    env = lmdb.open(str(path), max_dbs=4, map_size=1 << 30)
    try:
        db = env.open_db(name)
        with env.begin(write=True, db=db) as txn:
            return fn(txn)
    finally:
        env.close()


def _edit_manifest(path: Path, fn) -> None:
    def edit(txn):
        obj = unseal(txn.get(b"session"), "manifest")
        fn(obj)
        txn.put(b"session", seal(obj))  # a deliberate edit: the digest is recomputed

    _with_db(path, b"meta", edit)


TABLE_IDS = (struct.pack(">Q", ABSTRACT_ID), struct.pack(">Q", PAGES_ID))


def _chunk_keys(path: Path) -> list[bytes]:
    return _with_db(path, b"chunks", lambda txn: [k for k, _ in txn.cursor() if k[-8:] not in TABLE_IDS])


# ------------------------------------------------------------------------------------------ manifest
def test_a_flipped_bit_in_the_manifest_is_detected(store):
    model, a, _ = store

    def flip(txn):
        raw = bytearray(txn.get(b"session"))
        raw[len(raw) // 2] ^= 0x04
        txn.put(b"session", bytes(raw))

    _with_db(a, b"meta", flip)
    with pytest.raises(StoreCorruptError, match=r"'session' is damaged \(checksum mismatch\)"):
        KVTierCache.open(a, twin(model))


def _set(path_parts, value):
    def fn(obj):
        target = obj
        for part in path_parts[:-1]:
            target = target[part]
        target[path_parts[-1]] = value
    return fn


@pytest.mark.parametrize("edit, field", [
    (_set(["layers", 0, "chunks", 3, 1], 10**6), r"layers\[0\]\.chunks\[3\]\.start is 1000000, expected"),
    (lambda m: m.update(length=m["length"] + 1, tokens=None), r"layers\[0\] covers positions \[0, 230\), the session holds 231"),
    (lambda m: m["layers"][1]["chunks"].pop(2), r"layers\[1\]\.chunks\[2\]\.start"),
    (_set(["layers", 2, "tail"], None), r"layers\[2\] covers positions"),
    (_set(["options", "mode"], "fast"), r"options cannot be run: `mode`"),
    (_set(["options", "lossy_below"], float("nan")), r"options cannot be run: `lossy_below`"),
    (_set(["options", "surprise"], 1), r"options cannot be run: unknown options"),
    (lambda m: m["layers"][0].update(chunks=m["layers"][0]["chunks"] * 20000), r"more than the store's \d+ records"),
    (lambda m: m.update(batch=10**6, tokens=None), r"record_batch is 1 with no row map, the session's batch is 1000000"),
    (_set(["layers", 0, "chunks", 1, 6], [5]), r"layers\[0\]\.chunks\[1\]\.rows\[0\] is 5, outside \[0, 0\]"),
    (_set(["layers", 0, "chunks", 1, 2], 10**9), r"layers\[0\]\.chunks\[1\] declares 1000000000 tokens"),
    (_set(["layers", 0, "chunks", 1, 4], 7), r"writer is 7"),
    (_set(["layers", 0, "kind"], "sliding"), r"layers\[0\]\.kind is 'sliding', the model's layer is full"),
    (_set(["tokens"], "AAAA"), r"tokens do not hold 1 x 230 token ids"),
    (_set(["layers", 0, "skew"], {"top5": 1}), r"layers\[0\]\.skew has fields"),
    (_set(["store_id"], "0" * 32), r"store_id is '0000"),
    (_set(["layers", 0, "decode_chunk"], 0), r"decode_chunk is 0"),
    (_set(["next_chunk_id"], 3), r"chunk_id is \d+, outside \[0, 2\]"),
])
def test_edited_manifest_fields_are_refused_by_name(store, edit, field):
    model, a, _ = store
    _edit_manifest(a, edit)
    with pytest.raises(StoreCorruptError, match=field):
        KVTierCache.open(a, twin(model))


def test_a_missing_chunk_row_is_named_even_when_resealed(store):
    model, a, _ = store
    _edit_manifest(a, lambda m: m["layers"][3]["chunks"].pop())
    with pytest.raises(StoreCorruptError, match=r"layers\[3\]\.tail starts at"):
        KVTierCache.open(a, twin(model))


# ------------------------------------------------------------------------------------------- records
def test_a_record_copied_in_from_another_session_is_detected(store):
    """Same model, same chunking, same key: the record passes its checksum but names another session."""
    model, a, b = store
    key = _chunk_keys(a)[5]
    blob = _with_db(b, b"chunks", lambda txn: txn.get(key))
    _with_db(a, b"chunks", lambda txn: txn.put(key, blob))
    with pytest.raises(StoreMismatchError, match="another session"):
        _answer(model, a, _doc(1))


def test_a_record_of_an_unsaved_continuation_is_detected(store):
    """Two continuations of one saved session reuse chunk ids; each cache writes with its own session id."""
    model, a, _ = store
    doc = _doc(1)
    written = {}
    for seed in (11, 12):
        m = twin(model)
        cache = KVTierCache.open(a, m, prompt_ids=doc, **CHUNKING)
        more = torch.randint(3, 128, (1, 120), generator=torch.Generator().manual_seed(seed))
        prefill(m, cache, more, progress=False)
        fresh = {k for k in cache.tiers.disk.keys()} - cache._saved_keys
        written[seed] = {k: cache.tiers.disk.get(k) for k in fresh}
        if seed == 12:
            cache.save()
            doc = torch.cat([doc, more], 1)
        cache.close()
    key = next(k for k in written[12] if k in written[11] and k[-8:] != b"\xff" * 8)
    assert written[11][key] != written[12][key]
    _with_db(a, b"chunks", lambda txn: txn.put(key, written[11][key]))
    with pytest.raises(StoreMismatchError, match="another session"):
        _answer(model, a, doc)


def test_swapped_records_are_detected(store):
    model, a, _ = store
    k1, k2 = _chunk_keys(a)[4:6]

    def swap(txn):
        v1, v2 = txn.get(k1), txn.get(k2)
        txn.put(k1, v2)
        txn.put(k2, v1)

    _with_db(a, b"chunks", swap)
    with pytest.raises(StoreCorruptError, match="record holds layer"):
        _answer(model, a, _doc(1))


@pytest.mark.parametrize(("table", "name"), [(ABSTRACT_ID, "chunk abstracts"), (PAGES_ID, "page abstracts")])
def test_a_deleted_abstract_table_is_named_at_open(store, table, name):
    model, a, _ = store
    _with_db(a, b"chunks", lambda txn: txn.delete(chunk_key(0, table)))
    with pytest.raises(StoreMissingRecordError, match=f"layer 0 {name}: record missing"):
        KVTierCache.open(a, twin(model))


def test_a_deleted_record_is_named_at_open(store):
    model, a, _ = store
    key = _chunk_keys(a)[7]
    _with_db(a, b"chunks", lambda txn: txn.delete(key))
    with pytest.raises(StoreMissingRecordError, match=r"layer \d+ chunk \d+: record missing"):
        KVTierCache.open(a, twin(model))


# ------------------------------------------------------------------------------------------ LMDB files
@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9, 0.99])
def test_a_truncated_data_file_is_an_error_not_a_crash(store, keep):
    model, a, _ = store
    data = a / "data.mdb"
    with open(data, "r+b") as f:
        f.truncate(int(data.stat().st_size * keep) // 4096 * 4096 + 100)
    with pytest.raises(StoreCorruptError, match="data.mdb"):
        _answer(model, a, _doc(1))


def test_damaged_lmdb_pages_are_errors(store):
    """Damage where LMDB looks (meta pages, B-tree pages, overflow headers) is caught before LMDB maps it."""
    model, a, _ = store
    raw = (a / "data.mdb").read_bytes()
    pages = [p for p in range(len(raw) // 4096) if raw[p * 4096 + 10] in (1, 2, 4, 8)]
    for page in pages[:12]:
        for offset in (0, 10, 12, 14, 16, 24):
            damaged = bytearray(raw)
            damaged[page * 4096 + offset] ^= 0x41
            (a / "data.mdb").write_bytes(damaged)
            try:
                logits = _answer(model, a, _doc(1))
            except KVTierError:
                continue
            (a / "data.mdb").write_bytes(raw)
            assert torch.equal(logits, _answer(model, a, _doc(1))), (page, offset)
    (a / "data.mdb").write_bytes(raw)


def test_an_older_layout_version_says_so(tmp_path):
    store = tmp_path / "old"
    DiskStore(store).close()
    env = lmdb.open(str(store), max_dbs=4)
    with env.begin(write=True, db=env.open_db(b"meta")) as txn:  # what kvtier 0.1 wrote: plain JSON
        txn.put(b"store", b'{"format": "kvtier", "layout_version": 1}')
    env.close()
    with pytest.raises(StoreMismatchError, match="older kvtier \\(layout version 1\\)"):
        KVTierCache.open(store, build_model("llama"))


# ---------------------------------------------------------------------------------------- filesystem
@pytest.mark.parametrize("name", ["kvtier.lock", "lock.mdb", "data.mdb"])
@pytest.mark.parametrize("how", ["open", "inspect"])
def test_links_inside_a_store_are_never_followed(store, tmp_path, name, how):
    model, a, _ = store
    target = tmp_path / "victim.txt"
    target.write_text("precious")
    (a / name).unlink()
    (a / name).symlink_to(target)
    with pytest.raises(StoreCorruptError, match=f"{name} is a symbolic link"):
        if how == "open":
            KVTierCache.open(a, twin(model))
        else:
            from kvtier.report import describe
            describe(a)
    assert target.read_text() == "precious"


@pytest.mark.parametrize("how", ["open", "inspect"])
def test_a_directory_that_is_not_a_store_is_left_alone(tmp_path, how):
    plain = tmp_path / "photos"
    plain.mkdir(mode=0o755)
    (plain / "cat.jpg").write_bytes(b"\xff\xd8")
    before = (stat.S_IMODE(plain.stat().st_mode), sorted(os.listdir(plain)))
    with pytest.raises(StoreError, match="no kvtier store"):
        if how == "open":
            KVTierCache.open(plain, build_model("llama"))
        else:
            from kvtier.report import describe
            describe(plain)
    assert (stat.S_IMODE(plain.stat().st_mode), sorted(os.listdir(plain))) == before


def test_store_path_refuses_a_non_empty_directory_that_is_not_a_store(tmp_path):
    plain = tmp_path / "notes"
    plain.mkdir()
    (plain / "todo.txt").write_text("x")
    for overwrite in (False, True):
        with pytest.raises(StoreError, match="not empty and is not a kvtier store"):
            KVTierCache.for_model(build_model("llama"), store_path=plain, overwrite=overwrite)
    assert os.listdir(plain) == ["todo.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    KVTierCache.for_model(build_model("llama"), store_path=empty).close()  # an empty directory is fine


def test_overwrite_replaces_a_damaged_store(store):
    model, a, _ = store
    (a / "data.mdb").write_bytes(b"\0" * 8192)
    with pytest.raises(StoreCorruptError):
        KVTierCache.open(a, twin(model))
    _save(model, a, _doc(3), overwrite=True)
    assert _answer(model, a, _doc(3)).shape[1] == 3


@pytest.mark.parametrize("state", ["lock-only", "empty-data", "no-header"])
def test_a_store_killed_before_its_first_commit_is_an_incomplete_session(tmp_path, state):
    store = tmp_path / "s"
    store.mkdir(mode=0o700)
    (store / "kvtier.lock").write_text("12345")
    if state == "empty-data":
        (store / "data.mdb").write_bytes(b"")
    if state == "no-header":
        (store / "kvtier.lock").unlink()
        DiskStore(store).close()  # LMDB files exist, nothing committed
    from kvtier.report import describe
    with pytest.raises(IncompleteSessionError, match="interrupted"):  # read-only first: nothing written before it
        describe(store)
    with pytest.raises(IncompleteSessionError, match="interrupted"):
        KVTierCache.open(store, build_model("llama"))
    with pytest.raises(IncompleteSessionError, match="interrupted"):
        describe(store)


def test_processes_racing_to_create_one_store(tmp_path):
    """Each racer creates the store or gets a clear StoreError; none sees a raw FileExistsError."""
    code = textwrap.dedent(f"""
        import sys, time
        from kvtier.store.disk import DiskStore
        from kvtier.errors import StoreError
        time.sleep(max(0.0, float(sys.argv[1]) - time.time()))
        try:
            s = DiskStore({str(tmp_path / "deep" / "er" / "store")!r})
            time.sleep(0.3)
            s.close()
            print("CREATED")
        except StoreError as e:
            print("REFUSED", type(e).__name__)
    """)
    import time
    start = str(time.time() + 3.0)
    procs = [subprocess.Popen([sys.executable, "-c", code, start], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    results = [o[0].strip() for o in outs]
    assert "CREATED" in results and all(r in ("CREATED", "REFUSED StoreLockedError") for r in results), results


def test_read_only_inspect_writes_nothing(store):
    _, a, _ = store
    from kvtier.report import describe

    before = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in a.iterdir()}
    (a / "lock.mdb").unlink()
    d = describe(a)
    assert d["session"] == "complete" and d["token_ids"] == "kept"
    assert not (a / "lock.mdb").exists()
    after = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in a.iterdir()}
    assert after == {k: v for k, v in before.items() if k != "lock.mdb"}
