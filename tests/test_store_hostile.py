"""Stores made hostile on purpose, beyond random damage (tests/test_store_fuzz.py) and the edits of
tests/test_store_integrity.py: manifests re-sealed with values that pass every type check but no session can
hold, files that are hard links to files outside the store, a lock file that is a directory, a data file of any
apparent size. Each is refused with one line naming what is wrong before any KV is used, or read exactly, in
bounded memory; nothing outside the store is written."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from conftest import VOCAB, build_model, twin
from helpers import cache_kw

from kvtier import KVTierCache, StoreCorruptError, prefill
from kvtier.report import describe
from kvtier.store.chunk import PAGES_ID
from kvtier.store.disk import DiskStore, seal, unseal

CHUNKING = dict(chunk_size=16, sink_tokens=4, recent_window=16, device_budget=40, host_budget=32)
BUDGETS = dict(device_budget=40, host_budget=32)
DOC_LEN = 230


def _doc() -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, DOC_LEN), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = build_model("llama")
    root = tmp_path_factory.mktemp("hostile")
    m = twin(model)
    cache = KVTierCache.for_model(m, store_path=root / "a", **CHUNKING)
    prefill(m, cache, _doc(), segment_tokens=100, progress=False)
    cache.save()
    cache.close()
    return model, root / "a"


@pytest.fixture
def store(saved, tmp_path):
    model, a = saved
    shutil.copytree(a, tmp_path / "a")
    return model, tmp_path / "a"


def _answer(model, path: Path, steps: int = 0, **options) -> torch.Tensor:
    """Reopen, ask a question and decode `steps` greedy tokens: every logit."""
    m = twin(model)
    with KVTierCache.open(path, m, **{**BUDGETS, **options}) as cache, torch.no_grad():
        kw = {cache_kw(m): cache}
        logits = [m(input_ids=torch.tensor([[5, 6, 7]]), **kw).logits]
        for _ in range(steps):
            logits.append(m(input_ids=logits[-1][:, -1:].argmax(-1), **kw).logits)
        return torch.cat(logits, 1)


def _edit_manifest(path: Path, fn) -> None:
    env = lmdb.open(str(path), max_dbs=4, map_size=1 << 30)
    try:
        with env.begin(write=True, db=env.open_db(b"meta")) as txn:
            obj = unseal(txn.get(b"session"), "manifest")
            fn(obj)
            txn.put(b"session", seal(obj))  # re-sealed: only the checks of its values stand in the way
    finally:
        env.close()


def _refused(fn, says: str) -> StoreCorruptError:
    with pytest.raises(StoreCorruptError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message and says in message, message
    return info.value


# ---------------------------------------------------------------------------------------- manifest values
def _windows_of(length: int):
    def edit(m):
        for layer in m["layers"]:
            layer["tail"][2] = length - layer["tail"][1]
        m.update(length=length, tokens=None)
    return edit


def test_a_window_longer_than_a_record_can_hold_is_refused_by_name(store):
    """A record's header holds its length in 32 bits; a manifest naming a longer run named no record."""
    model, a = store
    _edit_manifest(a, _windows_of(2**40))
    _refused(lambda: _answer(model, a), "layers[0].tail[2] (length) is 1099511627562, outside [1, 4294967295]")


def test_a_chunk_claiming_a_record_larger_than_the_one_stored_is_refused_at_open(store):
    """stored_bytes bounds how many tokens a chunk may claim (64x its record): a manifest that raised both made the
    first read size its staging buffer from them (gigabytes) before the record showed otherwise."""
    model, a = store

    def edit(m):
        for layer in m["layers"]:
            last = layer["chunks"][-1]
            last[8] = 1 << 28  # stored_bytes: as much as the data file's size allows
            last[2] += 4_000_000  # length, within 64x of that
            layer["tail"][1] += 4_000_000  # the window after it moves right
        m.update(length=m["length"] + 4_000_000, tokens=None)

    _edit_manifest(a, edit)
    env = lmdb.open(str(a), max_dbs=4, map_size=1 << 31)  # the data file grows past 1 GiB: the size bound holds
    with env.begin(write=True, db=env.open_db(b"pad")) as txn:
        txn.put(b"pad", b"\0" * (1 << 30))
    env.close()
    _refused(lambda: _answer(model, a), "layers[0].chunks[")


def test_a_window_longer_than_its_record_holds_is_refused_at_open(store):
    """Within the 32-bit bound, a window of 50M tokens would have the arena reserved for it before its record was
    read: its record's size says first that it cannot hold them."""
    model, a = store
    _edit_manifest(a, _windows_of(50_000_000))
    _refused(lambda: _answer(model, a), "layers[0].tail declares 49999786 tokens, its ")


def test_a_chunk_whose_record_size_differs_from_its_manifest_is_refused(store):
    model, a = store
    _edit_manifest(a, lambda m: m["layers"][1]["chunks"][2].__setitem__(8, m["layers"][1]["chunks"][2][8] + 1))
    err = _refused(lambda: _answer(model, a), "layers[1].chunks[2] says ")
    assert ": record holds " in str(err)


def test_a_decode_granularity_above_chunk_size_is_refused(store):
    """Decoding seals the window every decode_chunk tokens, never more than chunk_size: a larger one would grow the
    window past the device budget and fail mid-decode."""
    model, a = store

    def edit(m):
        for layer in m["layers"]:
            layer["decode_chunk"] = 2**20

    _edit_manifest(a, edit)
    _refused(lambda: _answer(model, a, steps=30), "layers[0].decode_chunk is 1048576, outside [1, 16]")


@pytest.mark.parametrize("bad", [-5, VOCAB, 2**31 - 1])
def test_token_ids_outside_the_models_vocabulary_are_refused(store, bad):
    """The ids a session holds went through the model's embedding: an id outside it came from elsewhere, and would
    fail (or mean another token) wherever a caller uses cache.token_ids."""
    model, a = store

    def edit(m):
        ids = np.frombuffer(base64.b64decode(m["tokens"]), dtype="<i4").copy()
        ids[77] = bad
        m["tokens"] = base64.b64encode(ids.tobytes()).decode()

    _edit_manifest(a, edit)
    _refused(lambda: _answer(model, a), f"tokens[0][77] is {bad}, outside the model's vocabulary [0, {VOCAB})")


def test_a_layout_size_no_record_can_hold_is_refused_by_name(store):
    """The header's chunking options are lengths of records (or of parts of one): a page of 2**63 tokens made the
    page offsets overflow int64 at open."""
    model, a = store
    env = lmdb.open(str(a), max_dbs=4, map_size=1 << 30)
    try:
        with env.begin(write=True, db=env.open_db(b"meta")) as txn:
            header = unseal(txn.get(b"store"), "header")
            header["layout"]["page_size"] = 2**63
            txn.put(b"store", seal(header))
    finally:
        env.close()
    _refused(lambda: _answer(model, a), "header: layout `page_size` must be an integer in [1, 4294967295], got "
                                        "9223372036854775808")


def test_chunk_ids_that_run_out_are_an_error_not_a_key_collision(store):
    """next_chunk_id at the last id: the chunks decoding seals would take the abstract tables' ids, then ids no key
    holds. The first id past the last chunk id is refused instead."""
    model, a = store
    _edit_manifest(a, lambda m: m.update(next_chunk_id=PAGES_ID))
    _refused(lambda: _answer(model, a, steps=30), "chunk ids are used up")


def test_intact_store_decodes_past_the_checks_above(store):
    """The bounds above refuse nothing a real session holds: many decode steps seal new chunks, then it reopens."""
    model, a = store
    m = twin(model)
    with KVTierCache.open(a, m, **BUDGETS) as cache, torch.no_grad():
        out = m(input_ids=torch.tensor([[5, 6, 7]]), **{cache_kw(m): cache}).logits
        for _ in range(40):
            out = m(input_ids=out[:, -1:].argmax(-1), **{cache_kw(m): cache}).logits
        cache.save()
    assert _answer(model, a).shape == (1, 3, VOCAB)


# ------------------------------------------------------------------------------------------- the files
@pytest.mark.parametrize("name", ["kvtier.lock", "data.mdb", "lock.mdb"])
def test_hard_links_inside_a_store_are_never_written_through(store, tmp_path, name):
    """A store file that is a hard link shares its bytes with a file elsewhere: opening the store to write (a
    reopen drops leftover records, LMDB writes its lock file, kvtier its pid) would change that file. Refused; a
    read-only inspect, which writes nothing, still reads it."""
    model, a = store
    victim = tmp_path / "victim"
    shutil.copy(a / name, victim)
    (a / name).unlink()
    os.link(victim, a / name)
    before = (victim.read_bytes(), victim.stat().st_mtime_ns)
    _refused(lambda: KVTierCache.open(a, twin(model)), f"{name} is a hard link (2 names for one file)")
    assert describe(a)["session"] == "complete"
    assert (victim.read_bytes(), victim.stat().st_mtime_ns) == before


def test_overwrite_replaces_a_store_whose_data_file_is_a_hard_link(store, tmp_path):
    """overwrite=True removes the store's name of the file; the other name keeps its bytes."""
    model, a = store
    victim = tmp_path / "victim"
    shutil.copy(a / "data.mdb", victim)
    (a / "data.mdb").unlink()
    os.link(victim, a / "data.mdb")
    before = victim.read_bytes()
    KVTierCache.for_model(twin(model), store_path=a, overwrite=True, **CHUNKING).close()
    assert victim.read_bytes() == before and os.stat(a / "data.mdb").st_nlink == 1


def test_a_lock_file_that_is_a_directory_is_named(store):
    model, a = store
    (a / "kvtier.lock").unlink()
    (a / "kvtier.lock").mkdir()
    _refused(lambda: KVTierCache.open(a, twin(model)), "kvtier.lock is not a regular file")
    _refused(lambda: describe(a), "kvtier.lock is not a regular file")


def test_a_data_file_of_huge_apparent_size_reads_exactly_in_bounded_memory(store, tmp_path):
    """A sparse data.mdb claiming 1 TiB: kvtier maps and walks only the pages LMDB's meta pages reach, so the store
    opens under a 4 GiB address-space limit and decodes exactly; what the manifest may declare is bounded by those
    pages, not by the file's apparent size."""
    model, a = store
    want = _answer(model, a)
    os.truncate(a / "data.mdb", 1 << 40)
    assert torch.equal(_answer(model, a), want)
    code = textwrap.dedent(f"""
        import resource, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
        from kvtier.store.disk import DiskStore
        store = DiskStore({str(a)!r}, create=False)
        print(store.data_bytes(), store.map_bytes)
        store.close()
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    data_bytes, map_bytes = map(int, out.stdout.split())
    assert data_bytes < 4 << 20 and map_bytes <= 1 << 28
    _edit_manifest(a, lambda m: m["layers"][0]["chunks"][3].__setitem__(8, 10**11))  # stored_bytes
    os.truncate(a / "data.mdb", 1 << 40)
    _refused(lambda: _answer(model, a), "layers[0].chunks[3].stored_bytes is 100000000000, outside")


def test_a_data_file_extended_with_garbage_does_not_raise_the_bounds(store):
    model, a = store
    with DiskStore(a, create=False) as disk:
        before = disk.data_bytes()
    with open(a / "data.mdb", "ab") as f:
        f.write(os.urandom(1 << 20))
    with DiskStore(a, create=False) as disk:
        assert disk.data_bytes() == before


def _put_meta(path: Path, name: bytes, raw: bytes) -> None:
    env = lmdb.open(str(path), max_dbs=4, map_size=1 << 30)
    try:
        with env.begin(write=True, db=env.open_db(b"meta")) as txn:
            txn.put(name, raw)
    finally:
        env.close()


def test_a_manifest_that_would_parse_to_gigabytes_is_refused_before_parsing(store):
    """96 MB of `[],` re-sealed: valid JSON that json.loads would turn into 32 million lists (over 2 GiB)."""
    import hashlib

    model, a = store
    body = b"[" + b"[]," * 32_000_000 + b"[]]"
    _put_meta(a, b"session", b"KVTM" + hashlib.sha256(body).digest() + body)
    del body
    _refused(lambda: _answer(model, a), "JSON values, more than a kvtier entry parses")


def test_a_metadata_entry_past_the_size_cap_is_refused_before_it_is_copied(store, monkeypatch):
    model, a = store
    monkeypatch.setattr("kvtier.store.disk.META_MAX_BYTES", 4096)  # a small cap stands for the 256 MiB one
    _put_meta(a, b"session", seal({"state": "complete", "pad": "x" * 5000}))
    _refused(lambda: _answer(model, a), "more than the 4096 a kvtier entry may be")
