"""Damage a small saved store at random and check what reopening and decoding it does.

Every outcome must be one of: the damage is *detected* (a KVTierError), or it is *harmless* (the logits equal
the intact store's). Anything else is a bug: *silent* (other logits, no error), *raw* (another exception)
or a *crash* (the process died). `tests/test_store_fuzz.py` runs a few dozen damages in CI; for a long run:

    python tests/store_fuzz.py --runs 5000 [--seed 1] [--json out.json]

which runs each damage in a forked child, so a crash is counted instead of ending the run.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import random
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

import lmdb
import torch

sys.path.insert(0, str(Path(__file__).parent))

from conftest import build_model, twin  # noqa: E402

from kvtier import KVTierCache, KVTierError, cache_argument, prefill  # noqa: E402
from kvtier.store.disk import seal, unseal  # noqa: E402

CHUNKING = dict(chunk_size=16, sink_tokens=4, recent_window=16, device_budget=40, host_budget=32)
DOC_LEN = 120
QUESTION = torch.tensor([[5, 6, 7]])
DECODE_STEPS = 2
KINDS = ("file-bytes", "lmdb-structure", "truncate", "extend", "lock-files", "record-bytes", "record-swap",
         "record-delete", "record-from-other-session", "record-duplicate", "manifest-bytes", "manifest-field",
         "header-field")


def _doc(seed: int) -> torch.Tensor:
    return torch.randint(3, 128, (1, DOC_LEN), generator=torch.Generator().manual_seed(seed))


class Harness:
    """Two saved sessions of one tiny model (A is damaged, B lends records), and A's intact logits."""

    def __init__(self, root: Path):
        torch.set_num_threads(1)
        self.root = root
        self.model = build_model("llama")
        for name, seed in (("a", 1), ("b", 2)):
            m = twin(self.model)
            cache = KVTierCache.for_model(m, store_path=root / name, **CHUNKING)
            prefill(m, cache, _doc(seed), segment_tokens=50, progress=False)
            cache.save()
            cache.close()
        self.reader = twin(self.model)
        self.intact = self.probe(root / "a")

    def probe(self, store: Path) -> torch.Tensor:
        """Reopen with the prompt check, feed a question and decode a few greedy tokens: all the logits."""
        cache = KVTierCache.open(store, self.reader, prompt_ids=_doc(1))
        try:
            kw = {cache_argument(self.reader): cache}
            with torch.no_grad():
                logits = [self.reader(input_ids=QUESTION, **kw).logits]
                for _ in range(DECODE_STEPS):
                    logits.append(self.reader(input_ids=logits[-1][:, -1:].argmax(-1), **kw).logits)
            return torch.cat(logits, dim=1)
        finally:
            cache.close()

    def outcome(self, store: Path) -> tuple[str, str]:
        """(class, detail) of reopening a damaged store."""
        try:
            logits = self.probe(store)
        except KVTierError as exc:
            return "detected", type(exc).__name__
        except Exception as exc:  # noqa: BLE001 - the point is to see it
            return "raw", f"{type(exc).__name__}: {str(exc)[:200]}"
        if torch.equal(logits, self.intact):
            return "harmless", ""
        return "silent", f"max logit difference {float((logits - self.intact).abs().max()):.3g}"

    def damaged_copy(self, kind: str, seed: int, where: Path) -> Path:
        store = where / "store"
        shutil.rmtree(store, ignore_errors=True)
        shutil.copytree(self.root / "a", store)
        DAMAGES[kind](random.Random(seed), store, self.root / "b")
        return store


# ----------------------------------------------------------------------------------------------- damages
def _edit_bytes(data: bytearray, rng: random.Random, positions: list[int]) -> None:
    for i in positions:
        if rng.random() < 0.5:
            data[i] ^= 1 << rng.randrange(8)
        else:
            data[i] = rng.randrange(256)


def _file_bytes(rng, store, other):
    data = bytearray((store / "data.mdb").read_bytes())
    _edit_bytes(data, rng, [rng.randrange(len(data)) for _ in range(rng.choice((1, 1, 2, 3, 8, 32)))])
    (store / "data.mdb").write_bytes(data)


def _lmdb_structure(rng, store, other):
    """Bytes where LMDB itself looks: meta pages, B-tree pages, overflow page headers."""
    data = bytearray((store / "data.mdb").read_bytes())
    pages = [p for p in range(len(data) // 4096) if struct.unpack_from("<H", data, p * 4096 + 10)[0] in (1, 2, 8)]
    overflow = [p for p in range(len(data) // 4096) if struct.unpack_from("<H", data, p * 4096 + 10)[0] == 4]
    spots = []
    for _ in range(rng.choice((1, 1, 2, 4))):
        if overflow and rng.random() < 0.25:
            spots.append(rng.choice(overflow) * 4096 + rng.randrange(16))
        else:
            spots.append(rng.choice(pages) * 4096 + rng.randrange(4096 if rng.random() < 0.3 else 256))
    _edit_bytes(data, rng, spots)
    (store / "data.mdb").write_bytes(data)


def _truncate(rng, store, other):
    size = (store / "data.mdb").stat().st_size
    with open(store / "data.mdb", "r+b") as f:
        f.truncate(rng.choice((rng.randrange(size), rng.randrange(size) // 4096 * 4096)))


def _extend(rng, store, other):
    with open(store / "data.mdb", "ab") as f:
        f.write(os.urandom(rng.randrange(1, 20000)))


def _lock_files(rng, store, other):
    for name in ("lock.mdb", "kvtier.lock"):
        path = store / name
        if path.exists() and path.stat().st_size:
            data = bytearray(path.read_bytes())
            _edit_bytes(data, rng, [rng.randrange(len(data)) for _ in range(4)])
            path.write_bytes(data)


def _records(store: Path, fn):
    env = lmdb.open(str(store), max_dbs=4, map_size=1 << 30)
    try:
        with env.begin(write=True) as txn:
            return fn(txn, env.open_db(b"chunks", txn=txn), env.open_db(b"meta", txn=txn))
    finally:
        env.close()


def _keys(txn, db) -> list[bytes]:
    return [k for k, _ in txn.cursor(db=db)]


def _record_bytes(rng, store, other):
    def fn(txn, chunks, meta):
        key = rng.choice(_keys(txn, chunks))
        value = bytearray(txn.get(key, db=chunks))
        _edit_bytes(value, rng, [rng.randrange(len(value)) for _ in range(rng.choice((1, 2, 8)))])
        txn.put(key, bytes(value), db=chunks)
    _records(store, fn)


def _record_swap(rng, store, other):
    def fn(txn, chunks, meta):
        a, b = rng.sample(_keys(txn, chunks), 2)
        va, vb = txn.get(a, db=chunks), txn.get(b, db=chunks)
        txn.put(a, vb, db=chunks)
        txn.put(b, va, db=chunks)
    _records(store, fn)


def _record_delete(rng, store, other):
    _records(store, lambda txn, chunks, meta: txn.delete(rng.choice(_keys(txn, chunks)), db=chunks))


def _record_from_other_session(rng, store, other):
    borrowed = _records(other, lambda txn, chunks, meta: {k: txn.get(k, db=chunks) for k in _keys(txn, chunks)})

    def fn(txn, chunks, meta):
        shared = [k for k in _keys(txn, chunks) if k in borrowed]
        key = rng.choice(shared)
        txn.put(key, borrowed[key], db=chunks)
    _records(store, fn)


def _record_duplicate(rng, store, other):
    def fn(txn, chunks, meta):
        a, b = rng.sample(_keys(txn, chunks), 2)
        txn.put(b, txn.get(a, db=chunks), db=chunks)
    _records(store, fn)


def _manifest_bytes(rng, store, other):
    def fn(txn, chunks, meta):
        value = bytearray(txn.get(b"session", db=meta))
        _edit_bytes(value, rng, [rng.randrange(len(value)) for _ in range(rng.choice((1, 2, 5)))])
        txn.put(b"session", bytes(value), db=meta)
    _records(store, fn)


def _leaves(obj, path=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(obj, list) and obj:
        for i, v in enumerate(obj):
            yield from _leaves(v, (*path, i))
    else:
        yield path, obj


def _odd_value(rng: random.Random, old):
    # extremes just inside and outside the widths a store's numbers have (32-bit record lengths, 64-bit positions)
    choices = [None, True, False, 0, -1, 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**63 - 1, 2**63, 10**30, 0.5, -0.0,
               math.inf, "x", "", [], {}, [0], "0" * 32]
    if isinstance(old, bool):
        choices += [not old]
    elif isinstance(old, (int, float)):
        choices += [old + 1, old - 1, old * 2, old // 2 if isinstance(old, int) else old / 2]
    return rng.choice(choices)


def _edit_json(name: bytes, rng, store):
    def fn(txn, chunks, meta):
        obj = unseal(txn.get(name, db=meta), name.decode())
        leaves = list(_leaves(obj))
        for _ in range(rng.choice((1, 1, 2))):
            path, old = rng.choice(leaves)
            if not path:
                continue
            target = obj
            for part in path[:-1]:
                target = target[part]
            target[path[-1]] = _odd_value(rng, old)
        txn.put(name, seal(obj), db=meta)  # a deliberate edit: the seal is recomputed
    _records(store, fn)


DAMAGES = {
    "file-bytes": _file_bytes,
    "lmdb-structure": _lmdb_structure,
    "truncate": _truncate,
    "extend": _extend,
    "lock-files": _lock_files,
    "record-bytes": _record_bytes,
    "record-swap": _record_swap,
    "record-delete": _record_delete,
    "record-from-other-session": _record_from_other_session,
    "record-duplicate": _record_duplicate,
    "manifest-bytes": _manifest_bytes,
    "manifest-field": lambda rng, store, other: _edit_json(b"session", rng, store),
    "header-field": lambda rng, store, other: _edit_json(b"store", rng, store),
}
assert set(DAMAGES) == set(KINDS)


# ------------------------------------------------------------------------------------------- long run
def _forked(harness: Harness, kind: str, seed: int, work: Path) -> tuple[str, str]:
    """Damage and probe in a child process: a crash (a signal) is an outcome, not the end of the run."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read)
        try:
            result = harness.outcome(harness.damaged_copy(kind, seed, work))
        except BaseException as exc:  # noqa: BLE001 - damaging itself failed
            result = ("raw", f"harness: {type(exc).__name__}: {exc}")
        os.write(write, json.dumps(result).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        text = f.read()
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return "crash", f"signal {os.WTERMSIG(status)}"
    return tuple(json.loads(text)) if text else ("crash", f"exit status {os.WEXITSTATUS(status)}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the counts and the failures here")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="kvtier-fuzz-") as tmp:
        root = Path(tmp)
        harness = Harness(root)
        rng = random.Random(a.seed)
        counts: dict[str, collections.Counter] = {kind: collections.Counter() for kind in KINDS}
        failures = []
        start = time.time()
        for i in range(a.runs):
            kind, seed = rng.choice(KINDS), rng.randrange(2**32)
            result, detail = _forked(harness, kind, seed, root)
            counts[kind][result] += 1
            if result not in ("detected", "harmless"):
                failures.append({"kind": kind, "seed": seed, "result": result, "detail": detail})
                print(f"{result}: {kind} seed {seed}: {detail}", file=sys.stderr)
            if (i + 1) % 200 == 0:
                print(f"{i + 1}/{a.runs} in {time.time() - start:.0f} s", file=sys.stderr)
        total = collections.Counter()
        for c in counts.values():
            total.update(c)
        report = {"runs": a.runs, "seed": a.seed, "seconds": round(time.time() - start, 1), "total": dict(total),
                  "by_kind": {k: dict(v) for k, v in counts.items()}, "failures": failures}
        print(json.dumps({k: report[k] for k in ("runs", "seconds", "total")}))
        if a.json:
            Path(a.json).write_text(json.dumps(report, indent=2))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
