"""A save killed at its commit point: a reopened session, extended by decoding and saved again, is killed (SIGKILL)
just before the transaction that writes its manifest, inside it, or just after it. Reopened, the store holds
either the old session or the new one, whole (the logits of a one-shot run), never a mix."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_model
from helpers import cache_kw

from kvtier import KVTierCache
from kvtier.segmented import prefill
from kvtier.session import SESSION_META

CHUNKING = dict(chunk_size=16, sink_tokens=4, recent_window=16, device_budget=40, host_budget=32)
DOC, DECODED = 120, 24

CHILD = f"""
import os, signal, sys
sys.path.insert(0, sys.argv[3])
import torch
from conftest import build_model
from helpers import cache_kw
from kvtier import KVTierCache
from kvtier.segmented import prefill
from kvtier.store import disk

where, store = sys.argv[1], sys.argv[2]
model = build_model("llama")
ids = torch.randint(3, 128, (1, {DOC + DECODED}), generator=torch.Generator().manual_seed(11))
cache = KVTierCache.for_model(model, store_path=store, **{CHUNKING!r})
prefill(model, cache, ids[:, :{DOC}], progress=False)
cache.save()
cache.close()

cache = KVTierCache.open(store, model)
with torch.no_grad():
    for i in range({DOC}, {DOC + DECODED}):  # a continuation: one token at a time, as decoding adds them
        model(input_ids=ids[:, i:i + 1], use_cache=True, **{{cache_kw(model): cache}})

put_many, write = disk.DiskStore.put_many, disk.DiskStore._write
manifest = []

def put_many_(self, items, meta=None):
    manifest.append(bool(meta) and "session" in meta)
    return put_many(self, items, meta)

def write_(self, fn, size=0):
    is_manifest = bool(manifest) and manifest[-1]
    if is_manifest and where == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    if is_manifest and where == "inside":
        def fn_(txn):
            fn(txn)
            os.kill(os.getpid(), signal.SIGKILL)  # every put done, not committed
        return write(self, fn_, size)
    write(self, fn, size)
    if manifest and manifest[-1] and where == "after":
        os.kill(os.getpid(), signal.SIGKILL)  # committed; the old session's records not dropped yet
    manifest.append(False)

disk.DiskStore.put_many, disk.DiskStore._write = put_many_, write_
cache.save()
"""


@pytest.mark.parametrize("where, length", [("before", DOC), ("inside", DOC), ("after", DOC + DECODED)])
def test_a_continuation_killed_at_its_commit_point(tmp_path, where, length):
    store = tmp_path / "s"
    out = subprocess.run([sys.executable, "-c", CHILD, where, str(store), str(Path(__file__).parent)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == -signal.SIGKILL, out.stderr
    assert SESSION_META == "session"  # the child recognises the manifest's write by this name

    model = build_model("llama")
    ids = torch.randint(3, 128, (1, DOC + DECODED), generator=torch.Generator().manual_seed(11))
    probe = torch.tensor([[5, 6, 7]])
    cache = KVTierCache.open(store, model)
    try:
        assert cache.get_seq_length() == length
        cache.check_prompt(ids[:, :length])
        records = cache.tiers.disk.record_count()
        with torch.no_grad():
            got = model(input_ids=probe, use_cache=True, **{cache_kw(model): cache}).logits[0, -1]
    finally:
        cache.close()
    again = KVTierCache.for_model(model, **CHUNKING)
    try:
        prefill(model, again, ids[:, :length], progress=False)
        with torch.no_grad():
            want = model(input_ids=probe, use_cache=True, **{cache_kw(model): again}).logits[0, -1]
    finally:
        again.close()
    torch.testing.assert_close(got, want)
    cache = KVTierCache.open(store, model)  # the killed save's leftovers were dropped by the first reopen
    try:
        assert cache.tiers.disk.record_count() == records
    finally:
        cache.close()
