"""`kvtier bench codec`: which record encoding (raw, or a zstd level and byte-plane setting) reads KV back
fastest from this disk?

KV comes from a random-weight Llama prefilled on text bytes (natural text when a haystack directory is
given), plus plain Gaussian noise as a worst case, cut into records of `--chunk` tokens as a store holds
them. For each dtype x encoding (raw records, zstd levels with the fast negative ones, byte planes on/off
for zstd) it reports the
compression ratio and single-thread encode/decode throughput, and the effective read rate: the disk's
sequential read speed times the ratio, capped by the decode speed (one reader thread).

The disk part writes a store of `--disk-mb` of such records and reads it back cold (its pages dropped from the
page cache) with LMDB readahead on and off: every record in order, as an exact-mode reopen reads them, and a
random 5% of them, as sparse steps do, beside a plain sequential read of the same file.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import transformers as tf

from ..config import KVTierConfig
from ..store.codec import RecordCodec, RecordHeader
from ..store.disk import DATA_FILE, DiskStore
from .common import (
    add_out_argument,
    drop_page_cache,
    existing_dir,
    haystack_text,
    non_negative_int,
    positive_int,
    sequential_read_mb_s,
    text_dir,
    write_result,
    zstd_level,
)

LEVELS = (None, -5, -3, -1, 1, 3)  # None: raw records
SPARSE_SHARE = 0.05


def _model_kv(tokens: int, data_dir: str | None) -> tuple[torch.Tensor, torch.Tensor, str]:
    text, source = haystack_text(tokens * 2, data_dir)
    ids = torch.tensor([list(text.encode()[:tokens])])
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=256, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=8)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    cache = tf.DynamicCache()
    with torch.inference_mode():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    layer = cache.layers[-1]
    return layer.keys, layer.values, source


def _records(k: torch.Tensor, v: torch.Tensor, chunk: int) -> list[tuple[RecordHeader, torch.Tensor, torch.Tensor]]:
    """k, v: [B, H, n, D] -> one (header, k, v) per `chunk` tokens, each contiguous as the tiers hand them over."""
    b, h, n, d = k.shape
    out = []
    for i, start in enumerate(range(0, n, chunk)):
        kc, vc = k[:, :, start:start + chunk].contiguous(), v[:, :, start:start + chunk].contiguous()
        out.append((RecordHeader(0, i, start, kc.shape[2], b, h, d, k.dtype, b"\0" * 16), kc, vc))
    return out


def _median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _measure(codec: RecordCodec, records, reps: int) -> tuple[dict[str, float], list[bytes]]:
    raw = sum(k.nbytes + v.nbytes for _, k, v in records)
    blobs = [codec.encode(h, k, v) for h, k, v in records]
    enc = _median_time(lambda: [codec.encode(h, k, v) for h, k, v in records], reps)
    dec = _median_time(lambda: [codec.decode(blob, h) for blob, (h, _, _) in zip(blobs, records)], reps)
    return {"ratio": round(raw / sum(map(len, blobs)), 4), "encode_mb_s": round(raw / enc / 1e6, 1),
            "decode_mb_s": round(raw / dec / 1e6, 1)}, blobs


# ------------------------------------------------------------------------------------------------ disk
def _read_bytes() -> int | None:
    """Bytes this process has had read from storage (Linux /proc/self/io), or None."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _cold_read(path: Path, keys: list[bytes], readahead: bool) -> dict[str, Any]:
    """Open the store cold, drop its pages from the page cache again (opening walks the file's structure, and
    the kernel's readahead on that walk may bring records in), then read `keys` one record at a time."""
    drop_page_cache(path)
    start = time.perf_counter()
    store = DiskStore(path, create=False, readonly=True, readahead=readahead)
    try:
        opened = time.perf_counter() - start
        drop_page_cache(path)
        before, start, total = _read_bytes(), time.perf_counter(), 0
        for key in keys:
            total += len(store.get(key))
        seconds = time.perf_counter() - start
        after = _read_bytes()
    finally:
        store.close()
    row = {"records": len(keys), "mb": round(total / 1e6, 1), "mb_s": round(total / seconds / 1e6, 1),
           "open_s": round(opened, 4)}
    if before is not None and after is not None:
        row["disk_bytes_per_byte"] = round((after - before) / total, 2)  # what the kernel read per byte asked
    return row


def disk_speeds(blobs: list[bytes], disk_mb: int, store_dir: str | None, reps: int = 3) -> dict[str, Any]:
    """Cold and warm reads of a store of `disk_mb` MB of `blobs` (cycled), readahead on and off."""
    root = Path(tempfile.mkdtemp(prefix="kvtier-bench-codec-", dir=store_dir))
    try:
        path = root / "store"
        store = DiskStore(path)
        count = max(20, disk_mb * 10**6 // (sum(map(len, blobs)) // len(blobs)))
        keys = [b"r%08d" % i for i in range(count)]
        for start in range(0, count, 256):
            store.put_many([(key, blobs[i % len(blobs)]) for i, key in enumerate(keys[start:start + 256], start)])
        store.close()
        data = path / DATA_FILE
        dropped = drop_page_cache(path)
        sequential = []
        for _ in range(reps):
            drop_page_cache(path)
            sequential.append(sequential_read_mb_s(data))
        warm = statistics.median(sequential_read_mb_s(data) for _ in range(reps))
        sparse = random.Random(0).sample(keys, max(1, round(SPARSE_SHARE * count)))
        reads: dict[str, Any] = {}
        for readahead in (True, False):
            for name, subset in (("all_in_order", keys), ("sparse_random_5pct", sparse)):
                rows = [_cold_read(path, subset, readahead) for _ in range(reps)]
                best = sorted(rows, key=lambda r: r["mb_s"])[len(rows) // 2]  # the median run
                reads[f"readahead_{'on' if readahead else 'off'}/{name}"] = best
        return {"store_mb": round(data.stat().st_size / 1e6, 1), "record_bytes": sum(map(len, blobs)) // len(blobs),
                "page_cache_dropped": dropped, "sequential_cold_mb_s": round(statistics.median(sequential), 1),
                "sequential_warm_mb_s": round(warm, 1), "cold_reads": reads, "store_dir": str(root.parent)}
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------------------------------------- run
def _effective(row: dict[str, Any], disk_mb_s: float) -> tuple[float, str]:
    """Decoded MB/s one reader thread delivers from a disk reading `disk_mb_s` of records."""
    from_disk = disk_mb_s * row["ratio"]
    return (round(from_disk, 1), "disk") if from_disk < row["decode_mb_s"] else (row["decode_mb_s"], "decode")


def _choose(rows: list[dict[str, Any]], default: KVTierConfig) -> dict[str, Any]:
    """Per data and dtype, the setting that pays for itself: the fastest effective cold read, and among those
    within 5% of it the one that stores the fewest bytes; and how the default compares with it."""
    out = {}
    for key in dict.fromkeys(f"{r['data']}/{r['dtype']}" for r in rows):
        group = [r for r in rows if f"{r['data']}/{r['dtype']}" == key]
        fastest = max(r["effective_cold_mb_s"] for r in group)
        best = max((r for r in group if r["effective_cold_mb_s"] >= 0.95 * fastest),
                   key=lambda r: (r["ratio"], r["decode_mb_s"]))
        mine = next((r for r in group if (r["zstd_level"], r["byte_planes"]) == (default.zstd_level,
                                                                                 default.byte_planes)), None)
        out[key] = {"best": {f: best[f] for f in ("zstd_level", "byte_planes", "ratio", "effective_cold_mb_s")},
                    "default_effective_cold_vs_best": None if mine is None else
                    round(mine["effective_cold_mb_s"] / best["effective_cold_mb_s"], 3)}
    return out


def _label(level: int | None) -> str:
    return "raw" if level is None else f"L{level}"


def run(tokens: int = 4096, data_dir: str | None = None, levels: tuple[int | None, ...] = LEVELS, chunk: int = 64,
        disk_mb: int = 128, store_dir: str | None = None, reps: int = 5) -> dict[str, Any]:
    torch.set_num_threads(1)
    mk, mv, source = _model_kv(tokens, data_dir)
    g = torch.Generator().manual_seed(0)
    sources = {"model_kv": (mk, mv), "gaussian": (torch.randn(mk.shape, generator=g), torch.randn(mk.shape, generator=g))}
    default = KVTierConfig()
    rows, store_blobs = [], []
    for name, (k32, v32) in sources.items():
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            records = _records(k32.to(dtype), v32.to(dtype), chunk)
            for level in levels:
                for planes in (False,) if level is None else (False, True):  # planes only help zstd
                    m, blobs = _measure(RecordCodec(level, planes), records, reps)
                    rows.append({"data": name, "dtype": str(dtype).removeprefix("torch."), "zstd_level": level,
                                 "byte_planes": planes, **m})
                    if (name, dtype, level, planes) == ("model_kv", torch.float32, default.zstd_level,
                                                        default.byte_planes):
                        store_blobs = blobs
    if not store_blobs:  # the default level was not among those measured
        store_blobs = _measure(RecordCodec(default.zstd_level, default.byte_planes), _records(mk, mv, chunk), 1)[1]
    disk = disk_speeds(store_blobs, disk_mb, store_dir) if disk_mb > 0 else None
    for r in rows:
        if disk is not None:
            for kind in ("cold", "warm"):
                r[f"effective_{kind}_mb_s"], r[f"bound_{kind}"] = _effective(r, disk[f"sequential_{kind}_mb_s"])
    choice = _choose(rows, default) if disk is not None else None
    wins = {}
    for r in rows:
        if r["byte_planes"]:
            base = next(x for x in rows if not x["byte_planes"] and all(x[f] == r[f] for f in ("data", "dtype", "zstd_level")))
            wins[f"{r['data']}/{r['dtype']}/{_label(r['zstd_level'])}"] = round(r["ratio"] / base["ratio"], 3)
    return {"config": {"tokens": tokens, "chunk_tokens": chunk, "kv_shape": list(mk.shape), "text_source": source,
                       "levels": list(levels), "reps": reps,
                       "default": {"zstd_level": default.zstd_level, "byte_planes": default.byte_planes}},
            "results": rows, "disk": disk, "choice": choice, "byte_planes_gain": wins}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="kvtier bench codec", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=positive_int, default=4096)
    p.add_argument("--chunk", type=positive_int, default=64, help="tokens per record (default: kvtier's chunk_size)")
    p.add_argument("--levels", type=zstd_level, nargs="+", default=list(LEVELS),
                   help="encodings: raw, or zstd levels (-5 ... 22); default: raw -5 -3 -1 1 3")
    p.add_argument("--data-dir", type=text_dir,
                   help="directory of .txt files for natural text (default: generated text)")
    p.add_argument("--disk-mb", type=non_negative_int, default=128, help="size of the store read back cold (0: skip)")
    p.add_argument("--store-dir", type=existing_dir,
                   help="where to write that store (default: the system's temporary directory)")
    p.add_argument("--reps", type=positive_int, default=5, help="timed repetitions (the median is reported)")
    add_out_argument(p)
    a = p.parse_args(argv)
    result = run(a.tokens, a.data_dir, tuple(a.levels), a.chunk, a.disk_mb, a.store_dir, a.reps)
    path = write_result("codec", result, a.out)
    for r in result["results"]:
        if r["data"] == "model_kv":
            eff = f"  effective cold {r['effective_cold_mb_s']:7.1f} MB/s ({r['bound_cold']})" if result["disk"] else ""
            print(f"{r['dtype']:9s} {_label(r['zstd_level']):4s} planes={r['byte_planes']!s:5s} ratio {r['ratio']:.3f}  "
                  f"encode {r['encode_mb_s']:7.1f}  decode {r['decode_mb_s']:7.1f} MB/s{eff}")
    if result["disk"]:
        d = result["disk"]
        print(f"disk: sequential cold {d['sequential_cold_mb_s']} MB/s, warm {d['sequential_warm_mb_s']} MB/s")
        for name, row in d["cold_reads"].items():
            print(f"  {name:40s} {row['mb_s']:8.1f} MB/s  disk bytes per byte {row.get('disk_bytes_per_byte')}")
    for key, c in (result["choice"] or {}).items():
        ratio = c["default_effective_cold_vs_best"]
        versus = ("the default was not among the settings measured" if ratio is None else
                  f"default reads at {ratio}x its effective cold rate")
        print(f"{key:18s} best {_label(c['best']['zstd_level'])} planes={c['best']['byte_planes']}; {versus}")
    print(f"wrote {path}")
