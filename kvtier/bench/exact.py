"""`kvtier bench exact`: exact mode against transformers' own caches, on the paths users run.

For each shape and context length, on the same random-weight Llama, in one run:

  static     StaticCache sized to the tokens it will hold (one-shot prefill, sdpa attention): the baseline
  dynamic    DynamicCache (one-shot prefill)
  kvtier     `kvtier.prefill` in `--segment`-token segments (the `kvtier qa` path), then decoding with every
             chunk on the device (no budgets)
  offloaded  on CUDA: DynamicCache(offloading=True), the KV in CPU memory, each layer's copied to the GPU
  reopen     the kvtier session saved, then `KVTierCache.open` and the first token, with the store's pages
             in memory (warm) and dropped from the page cache first (cold), against a plain sequential read
             of the same file; and the path `kvtier qa` takes (open, `warm()`, then the first token), where
             `warm()` alone gives the streaming speed, against what the record codec alone decodes (into
             reused, cache-resident memory, and straight into one session-sized buffer, written as `warm()`
             writes (streaming stores for large records): one pass to memory)

Reported: prefill time, the first decode step and the steady (median) and mean step, the KV bytes each cache
allocated for the same tokens, and the largest logit difference from StaticCache. Ratios are kvtier over
the baseline named in the key, so below 1 is faster or smaller.

Shapes (`--shapes`): "attention-heavy" (4 layers, 16 query and 16 KV heads of 64) and "qwen2.5-0.5b" (its
attention and MLP geometry: 14 query and 2 KV heads of 64, MLP 4864) in 4 layers; on a GPU "llama3-8b".
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers as tf
from tqdm import tqdm

from ..cache import KVTierCache, cache_argument
from ..segmented import prefill as segmented_prefill
from ..store.codec import MAGIC, RecordCodec, RecordHeader, place_bytes
from ..store.disk import DATA_FILE, DiskStore
from .common import (
    add_out_argument,
    device_name,
    drop_page_cache,
    median_ms,
    positive_int,
    result_name,
    sequential_read_mb_s,
    timed,
    write_result,
)
from .speed import SHAPES, speed_model

DEFAULT_SHAPES = ("attention-heavy", "qwen2.5-0.5b")


@torch.inference_mode()
def decode(runs: dict[str, tuple[torch.nn.Module, Any]], first: torch.Tensor, steps: int) -> dict[str, dict[str, Any]]:
    """`steps` + 1 greedy steps of every (model, cache) in `runs`, taken in turn step by step (the order
    rotating, so none always follows the same one) so that a change in the machine's speed during the run
    touches all of them alike: the first step's time, and the median and the mean of the rest, per run (the
    mean is what a long generation pays: it counts the rare slow step, an arena's growth, that the median
    leaves out)."""
    toks = {name: first for name in runs}
    times: dict[str, list[float]] = {name: [] for name in runs}
    logits: dict[str, torch.Tensor] = {}
    order = list(runs.items())
    for step in range(steps + 1):
        for name, (model, cache) in order[step % len(order):] + order[:step % len(order)]:  # each goes first in turn
            kw = {cache_argument(model): cache, "use_cache": True}
            dt, out = timed(lambda m=model, t=toks[name], kw=kw: m(input_ids=t, **kw), sync=first.is_cuda)
            toks[name] = out.logits[:, -1:].argmax(-1)
            logits[name] = out.logits[:, -1].float()
            times[name].append(dt)
    return {name: {"first_step_ms": round(t[0] * 1000, 3), "decode_step_ms": median_ms(t[1:]),
                   "decode_mean_ms": round(statistics.fmean(t[1:]) * 1000, 3),
                   "last_logits": logits[name]} for name, t in times.items()}


@torch.inference_mode()
def one_shot(model, cache, ids: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Prefill `ids` in one forward, as `generate` does: (seconds, last logits)."""
    seconds, out = timed(lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1,
                                       **{cache_argument(model): cache}), sync=ids.is_cuda)
    return seconds, out.logits[:, -1].float()


def kv_bytes_static(cache: tf.StaticCache) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def kv_bytes_kvtier(cache: KVTierCache) -> int:
    """Device memory the cache allocated for KV: the pools' capacity and the sliding layers' buffers."""
    pools = sum(p.allocated_bytes for p in cache.tiers.device_pools.values())
    sliding = sum(layer.k.nbytes + layer.v.nbytes for layer in cache.layers
                  if getattr(layer, "is_sliding", False) and layer.k is not None)
    return pools + sliding


def _ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else float("nan")


def run_context(base, kv_model, n: int, steps: int, segment: int, vocab: int,
                with_reopen: bool = True) -> dict[str, Any]:
    device = base.device
    ids = torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(n)).to(device)
    first = torch.tensor([[7]], device=device)
    row: dict[str, Any] = {"context": n}

    static = tf.StaticCache(config=base.config, max_cache_len=n + steps + 1)
    static_prefill_s, logits = one_shot(base, static, ids)
    dynamic = tf.DynamicCache()
    dynamic_prefill_s, dyn_logits = one_shot(base, dynamic, ids)
    runs = {"static": (base, static), "dynamic": (base, dynamic)}
    if device.type == "cuda":  # transformers' own answer to a KV cache larger than the GPU
        offloaded = tf.DynamicCache(config=base.config, offloading=True)
        offloaded_prefill_s, _ = one_shot(base, offloaded, ids)
        runs["offloaded"] = (base, offloaded)
    store = Path(tempfile.mkdtemp(prefix="kvtier-exact-")) / "doc"
    try:
        with KVTierCache.for_model(kv_model, mode="exact", store_path=store if with_reopen else None) as cache:
            prefill_s, kv_logits = timed(lambda: segmented_prefill(kv_model, cache, ids, segment_tokens=segment,
                                                                   progress=False))
            prefill_diff = float((kv_logits.float() - logits).abs().max())
            prefill_diff_dyn = float((kv_logits.float() - dyn_logits).abs().max())
            if with_reopen:
                cache.save()
            steps_out = decode({**runs, "kvtier": (kv_model, cache)}, first, steps)
            kv_alloc = kv_bytes_kvtier(cache)
        static_bytes = kv_bytes_static(static)
        del static, dynamic, runs
        st_logits = steps_out["static"].pop("last_logits")
        dyn_last = steps_out["dynamic"].pop("last_logits")
        if "offloaded" in steps_out:
            steps_out["offloaded"].pop("last_logits")
            row["offloaded"] = {"prefill_s": round(offloaded_prefill_s, 3), **steps_out["offloaded"]}
        kv_logits = steps_out["kvtier"].pop("last_logits")
        row["static"] = {"prefill_s": round(static_prefill_s, 3), **steps_out["static"], "kv_bytes": static_bytes}
        row["dynamic"] = {"prefill_s": round(dynamic_prefill_s, 3), **steps_out["dynamic"]}
        kv = steps_out["kvtier"]
        row["kvtier"] = {
            "prefill_s": round(prefill_s, 3), **kv, "kv_bytes": kv_alloc,
            "prefill_ratio_vs_dynamic": _ratio(prefill_s, row["dynamic"]["prefill_s"]),
            "prefill_ratio_vs_static": _ratio(prefill_s, row["static"]["prefill_s"]),
            "decode_ratio_vs_static": _ratio(kv["decode_step_ms"], row["static"]["decode_step_ms"]),
            "decode_mean_ratio_vs_static": _ratio(kv["decode_mean_ms"], row["static"]["decode_mean_ms"]),
            "decode_ratio_vs_dynamic": _ratio(kv["decode_step_ms"], row["dynamic"]["decode_step_ms"]),
            "first_step_ratio_vs_steady": _ratio(kv["first_step_ms"], kv["decode_step_ms"]),
            "kv_bytes_ratio_vs_static": _ratio(kv_alloc, static_bytes),
            "max_abs_logit_diff_vs_static": max(prefill_diff, float((kv_logits - st_logits).abs().max())),
            # DynamicCache: the exactness reference
            "max_abs_logit_diff_vs_dynamic": max(prefill_diff_dyn, float((kv_logits - dyn_last).abs().max())),
        }
        if with_reopen:
            row["reopen"] = reopen(kv_model, store, first, steps)
    finally:
        shutil.rmtree(store.parent, ignore_errors=True)
    return row


def reopen(model, store: Path, first: torch.Tensor, steps: int) -> dict[str, Any]:
    """Open the saved session and answer with it, warm and cold; reads are compared with a raw read."""
    data = store / DATA_FILE
    out: dict[str, Any] = {"store_bytes": data.stat().st_size}
    dropped = drop_page_cache(store)
    out["raw_read_mb_s_cold"] = round(sequential_read_mb_s(data), 1)
    for kind in ("cold", "warm"):
        if kind == "cold":
            drop_page_cache(store)
        else:
            sequential_read_mb_s(data)  # every page in memory
        open_s, cache = timed(lambda: KVTierCache.open(store, model, mode="exact"))
        try:
            r = decode({"reopened": (model, cache)}, first, steps)["reopened"]
            r.pop("last_logits")
            s = cache.stats()
            read_mb = s.disk.bytes_read / 1e6
        finally:
            cache.close()
        ttft_ms = open_s * 1000 + r["first_step_ms"]
        out[kind] = {"open_ms": round(open_s * 1000, 3), **r, "time_to_first_token_ms": round(ttft_ms, 3),
                     "first_step_ratio_vs_steady": _ratio(r["first_step_ms"], r["decode_step_ms"]),
                     "disk_mb_read": round(read_mb, 1),
                     "disk_read_mb_s": round(read_mb / (ttft_ms / 1000), 1)}
    out["cold"]["read_ratio_vs_raw"] = _ratio(out["cold"]["disk_read_mb_s"], out["raw_read_mb_s_cold"])
    out["warm_then_ask"] = warm_then_ask(model, store, first, steps)
    out["codec_decode_mb_s"] = round(codec_decode_mb_s(store), 1)
    out["codec_decode_into_memory_mb_s"] = round(codec_decode_mb_s(store, into_memory=True), 1)
    out["warm"]["read_ratio_vs_codec"] = _ratio(out["warm"]["disk_read_mb_s"], out["codec_decode_mb_s"])
    stream = out["warm_then_ask"]
    stream["stream_ratio_vs_codec"] = _ratio(stream["stream_mb_s"], out["codec_decode_mb_s"])
    stream["stream_ratio_vs_codec_into_memory"] = _ratio(stream["stream_mb_s"], out["codec_decode_into_memory_mb_s"])
    out["page_cache_dropped"] = dropped
    return out


def warm_then_ask(model, store: Path, first: torch.Tensor, steps: int) -> dict[str, Any]:
    """The path `kvtier qa` takes with a warm store: open, `warm()` (the session streamed into the arena while
    the question is read), then decode. `stream_mb_s` is what `warm()` alone moves per second; the first step
    after it should cost a steady one."""
    sequential_read_mb_s(store / DATA_FILE)  # every page in memory
    open_s, cache = timed(lambda: KVTierCache.open(store, model, mode="exact"))
    try:
        warm_s, _ = timed(cache.warm)
        read_mb = cache.stats().disk.bytes_read / 1e6
        r = decode({"reopened": (model, cache)}, first, steps)["reopened"]
        r.pop("last_logits")
    finally:
        cache.close()
    return {"open_ms": round(open_s * 1000, 3), "warm_ms": round(warm_s * 1000, 3), **r,
            "first_step_ratio_vs_steady": _ratio(r["first_step_ms"], r["decode_step_ms"]),
            "time_to_first_token_ms": round((open_s + warm_s) * 1000 + r["first_step_ms"], 3),
            "disk_mb_read": round(read_mb, 1), "stream_mb_s": round(read_mb / max(warm_s, 1e-9), 1)}


def _decoded_bytes(h: RecordHeader) -> int:
    """A record's k and v bytes once decoded (an int8 record's stored size is smaller)."""
    return 2 * h.batch * h.heads * h.length * h.head_dim * h.dtype.itemsize


def codec_decode_mb_s(store: Path, into_memory: bool = False) -> float:
    """What the record codec alone decodes per second on one thread (stored MB), every record of the store
    already in memory: the yardstick for streaming from a warm store.

    By default each record decodes into memory that is reused and stays in the CPU cache, so the decoded bytes
    never travel to memory. `into_memory`: each record's k and v bytes are decoded and written as `warm()`
    writes them (`place_bytes`: streaming stores for large records), but into their own place of one buffer the
    size of the session, its pages touched beforehand (as the arena's are at `open`): the least any reader must
    do to leave the session in memory, one pass, no layout change."""
    disk = DiskStore(store, create=False, readonly=True)
    try:
        blobs = [b for b in disk.get_many(list(disk.keys())) if b is not None and b[:4] == MAGIC]
    finally:
        disk.close()
    codec, total = RecordCodec(), sum(len(b) for b in blobs)
    ends = np.cumsum([_decoded_bytes(RecordCodec.read_header(blob, "record")) for blob in blobs] or [0])
    memory = np.ones(int(ends[-1]) if into_memory else 0, dtype=np.uint8)  # every page touched
    start = time.perf_counter()
    for blob, end in zip(blobs, ends):
        header = RecordCodec.read_header(blob, "record")
        if into_memory:
            k, v = codec.decode_view(blob, header)
            place = memory[end - _decoded_bytes(header):end].reshape(2, *k.shape)
            place_bytes(place[0], k)
            place_bytes(place[1], v)
        else:
            codec.decode(blob, header)
    return total / 1e6 / max(time.perf_counter() - start, 1e-9)


def run(shapes: list[str], contexts: list[int], steps: int, segment: int, layers: int | None = None,
        device: str = "cpu", dtype: torch.dtype = torch.float32, with_reopen: bool = True) -> dict[str, Any]:
    results = []
    for name in shapes:
        shape = dict(SHAPES[name], **({"layers": layers} if layers else {}))
        base = speed_model(shape, max(contexts) + steps + 16, device, dtype)
        kv_model = copy.deepcopy(base)
        for n in tqdm(contexts, desc=name):
            results.append({"shape": name, **run_context(base, kv_model, n, steps, segment, shape["vocab"],
                                                         with_reopen)})
        del base, kv_model
    return {"config": {"shapes": {s: dict(SHAPES[s], **({"layers": layers} if layers else {})) for s in shapes},
                       "device": device, "dtype": str(dtype).removeprefix("torch."), "decode_steps": steps,
                       "segment_tokens": segment, "torch_threads": torch.get_num_threads()},
            "results": results}


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(result["config"]["shapes"])
    fig, axes = plt.subplots(len(shapes), 3, figsize=(12, 3.4 * len(shapes)), squeeze=False)
    for row_axes, shape in zip(axes, shapes):
        rows = [r for r in result["results"] if r["shape"] == shape]
        xs = [r["context"] for r in rows]
        panels = (("prefill_s", "prefill (s)", ("static", "dynamic", "kvtier")),
                  ("decode_step_ms", "decode step (ms)", ("static", "dynamic", "kvtier")),
                  ("kv_bytes", "KV allocated (MiB)", ("static", "kvtier")))
        for ax, (metric, label, names) in zip(row_axes, panels):
            for name in names:
                ys = [r[name][metric] / (2**20 if metric == "kv_bytes" else 1) for r in rows]
                ax.plot(xs, ys, marker="o", label=name)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(xs, [f"{x / 1024:g}k" for x in xs])
            ax.set_title(f"{shape}: {label}", fontsize=9)
            ax.legend(fontsize=8)
    m, c = result["machine"], result["config"]
    where = m["gpu"] if c["device"].startswith("cuda") else f"{m['cpu']}, {c['torch_threads']} thread"
    fig.suptitle(f"kvtier exact mode vs StaticCache and DynamicCache ({where})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="kvtier bench exact", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(DEFAULT_SHAPES))
    p.add_argument("--contexts", type=positive_int, nargs="+", default=[512, 2048, 8192, 32768])
    p.add_argument("--steps", type=positive_int, default=48, help="decode steps timed after the first")
    p.add_argument("--layers", type=positive_int, help="override the shapes' layer count")
    p.add_argument("--segment", type=positive_int, default=2048, help="kvtier.prefill segment length")
    p.add_argument("--device", type=device_name, default="cpu",
                   help="cpu or cuda (offloaded DynamicCache is measured on cuda only)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument("--no-reopen", action="store_true", help="skip saving the session and reopening it")
    p.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's choice)")
    add_out_argument(p)
    p.add_argument("--name", type=result_name, default="exact", help="result file name (default: exact)")
    p.add_argument("--no-plot", action="store_true")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32"))
    result = run(a.shapes, a.contexts, a.steps, a.segment, a.layers, a.device, dtype, not a.no_reopen)
    path = write_result(a.name, result, a.out)
    if not a.no_plot:
        result["machine"] = json.loads(path.read_text())["machine"]
        plot(result, path.with_suffix(".png"))
    for r in result["results"]:
        k = r["kvtier"]
        cold = f"  cold reopen read {r['reopen']['cold']['read_ratio_vs_raw']}x raw" if "reopen" in r else ""
        print(f"{r['shape']:>16} {r['context']:>6}  prefill {k['prefill_ratio_vs_dynamic']}x dynamic  "
              f"decode {k['decode_ratio_vs_static']}x static (mean {k['decode_mean_ratio_vs_static']}x)  "
              f"KV {k['kv_bytes_ratio_vs_static']}x static  "
              f"first step {k['first_step_ratio_vs_steady']}x steady{cold}")
    print(f"wrote {path}")
