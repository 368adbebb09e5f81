"""Where kvtier's time goes on a GPU, beside transformers' own caches: a diagnostic, not a benchmark.

On a Llama-3-8B-shaped model cut to a few layers (every layer does the same work), it reports:
  prefill   kvtier.prefill in segments against DynamicCache's one-shot prefill, and the top operations of
            one segment (torch profiler, CPU and CUDA time)
  decode    exact decode steps against StaticCache, the top operations and the top Python functions
            (cProfile) of kvtier's steps
  syncs     every operation that made the CPU wait for the GPU (torch's sync debug mode) during one segment
            and one decode step, with the line of kvtier that asked for it
  hogwild   HogwildCache steps of 4 workers over a 16k-token prompt: step time, top operations, top
            Python functions and syncs
  memory    peak device memory of a one-shot prefill through KVTierCache (exact and sparse) and DynamicCache
  parity    the largest logit difference from StaticCache on the same tokens, in bf16 and in fp32

Run on a CUDA machine (scripts/gpu_check.sh runs it as its `profile` step):
    python scripts/gpu_profile.py --context 32768 --layers 4 --out DIR
Writes DIR/profile-llama3-8b-cuda.json and prints the tables.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import time
import warnings
from pathlib import Path

import torch
import transformers as tf
from torch.profiler import ProfilerActivity, profile

import kvtier
from kvtier.bench.common import machine_info
from kvtier.cache import cache_argument
from kvtier.segmented import prefill

SHAPE = dict(heads=32, kv_heads=8, head_dim=128, intermediate=14336, vocab=128256)
DEVICE = "cuda"


def activities() -> list:
    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def build(layers: int, max_len: int, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=SHAPE["vocab"], hidden_size=SHAPE["heads"] * SHAPE["head_dim"],
                         intermediate_size=SHAPE["intermediate"], num_hidden_layers=layers,
                         num_attention_heads=SHAPE["heads"], num_key_value_heads=SHAPE["kv_heads"],
                         head_dim=SHAPE["head_dim"], max_position_embeddings=max_len, rope_theta=5e5)
    with torch.device(DEVICE):
        return tf.AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


def sync_time(fn):
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t, out


def forward(model, cache, ids, **kw):
    return model(input_ids=ids, use_cache=True, **{cache_argument(model): cache}, **kw)


def top_ops(prof, key: str, n: int = 12) -> list[dict]:
    rows = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:n]
    return [{"op": e.key, "count": e.count, "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 3),
             "self_device_ms": round(getattr(e, "self_device_time_total", 0) / 1e3, 3)} for e in rows]


def python_top(pr: cProfile.Profile, n: int = 15) -> list[str]:
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(n)
    return [line for line in s.getvalue().splitlines() if "/" in line or "{" in line][:n]


def syncs_during(fn) -> dict[str, int]:
    """Operations that synchronised with the device, by the Python line that called them."""
    sync()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if DEVICE == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            if DEVICE == "cuda":
                torch.cuda.set_sync_debug_mode("default")
    where: dict[str, int] = {}
    for w in caught:
        if "synchroniz" in str(w.message):
            k = f"{Path(w.filename).name}:{w.lineno}"
            where[k] = where.get(k, 0) + 1
    return dict(sorted(where.items(), key=lambda kv: -kv[1]))


@torch.inference_mode()
def prefill_part(model, n: int, segment: int) -> dict:
    ids = torch.randint(0, SHAPE["vocab"], (1, n), generator=torch.Generator().manual_seed(n)).to(DEVICE)
    forward(model, tf.DynamicCache(), ids[:, :segment], logits_to_keep=1)  # warm both paths once
    warm = kvtier.KVTierCache.for_model(model, mode="exact")
    prefill(model, warm, ids[:, : 2 * segment], segment_tokens=segment, progress=False)
    warm.close()
    dyn_s, _ = sync_time(lambda: forward(model, tf.DynamicCache(), ids, logits_to_keep=1))
    cache = kvtier.KVTierCache.for_model(model, mode="exact")
    kv_s, _ = sync_time(lambda: prefill(model, cache, ids[:, : n - segment], segment_tokens=segment,
                                        progress=False))
    per_segment = kv_s / max(1, (n - segment) // segment)
    with profile(activities=activities()) as prof:
        prefill(model, cache, ids[:, n - segment:], segment_tokens=segment, progress=False)
        sync()
    cache.close()
    cache = kvtier.KVTierCache.for_model(model, mode="exact")
    prefill(model, cache, ids[:, : n - segment], segment_tokens=segment, progress=False)
    syncs = syncs_during(lambda: prefill(model, cache, ids[:, n - segment:], segment_tokens=segment,
                                         progress=False))
    cache.close()
    return {"context": n, "segment": segment, "dynamic_one_shot_s": round(dyn_s, 3),
            "kvtier_segmented_s_without_last_segment": round(kv_s, 3),
            "kvtier_s_per_segment": round(per_segment, 4),
            "ratio_vs_dynamic_scaled": round(kv_s * n / (n - segment) / dyn_s, 3),
            "top_ops_by_cpu": top_ops(prof, "self_cpu_time_total"),
            "top_ops_by_device": top_ops(prof, "self_device_time_total"),
            "syncs_in_one_segment": syncs}


@torch.inference_mode()
def decode_part(model, n: int, steps: int) -> dict:
    ids = torch.randint(0, SHAPE["vocab"], (1, n), generator=torch.Generator().manual_seed(n)).to(DEVICE)
    static = tf.StaticCache(config=model.config, max_cache_len=n + 4 * steps + 8)
    forward(model, static, ids, logits_to_keep=1)
    cache = kvtier.KVTierCache.for_model(model, mode="exact")
    prefill(model, cache, ids, segment_tokens=2048, progress=False)
    tok = torch.tensor([[7]], device=DEVICE)
    times = {"static": [], "kvtier": []}
    for i in range(steps + 2):
        for name, c in (("static", static), ("kvtier", cache)):
            dt, _ = sync_time(lambda c=c: forward(model, c, tok))
            if i >= 2:
                times[name].append(dt * 1e3)
    med = {k: round(statistics.median(v), 3) for k, v in times.items()}
    with profile(activities=activities()) as prof:
        for _ in range(5):
            forward(model, cache, tok)
        sync()
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(10):
        forward(model, cache, tok)
    sync()
    pr.disable()
    syncs = syncs_during(lambda: forward(model, cache, tok))
    cache.close()
    return {"context": n, "layers": model.config.num_hidden_layers, "step_ms": med,
            "ratio_vs_static": round(med["kvtier"] / med["static"], 3),
            "top_ops_by_cpu_5_steps": top_ops(prof, "self_cpu_time_total"),
            "top_ops_by_device_5_steps": top_ops(prof, "self_device_time_total"),
            "python_top_10_steps": python_top(pr), "syncs_in_one_step": syncs}


@torch.inference_mode()
def hogwild_part(model, n: int, workers: int, steps: int) -> dict:
    """HogwildCache.step for `workers` workers over an n-token prompt: step time, top operations, top Python
    functions and syncs."""
    from kvtier.hogwild import HogwildCache

    ids = torch.randint(3, SHAPE["vocab"], (n,), generator=torch.Generator().manual_seed(n)).to(DEVICE)
    toks = torch.randint(3, SHAPE["vocab"], (steps + 10, workers), generator=torch.Generator().manual_seed(2))
    toks = toks.to(DEVICE)
    with HogwildCache.for_model(model, workers=workers, step_capacity=max(64, steps + 10)) as hog:
        hog.prefill_history(ids)
        times = []
        for t in range(steps):
            dt, _ = sync_time(lambda t=t: hog.step(toks[t]))
            times.append(dt * 1e3)
        with profile(activities=activities()) as prof:
            for t in range(steps, steps + 4):
                hog.step(toks[t])
            sync()
        pr = cProfile.Profile()
        pr.enable()
        for t in range(steps + 4, steps + 8):
            hog.step(toks[t])
        sync()
        pr.disable()
        syncs = syncs_during(lambda: hog.step(toks[steps + 8]))
    return {"prompt": n, "workers": workers, "step_ms": round(statistics.median(times[2:]), 3),
            "top_ops_by_cpu_4_steps": top_ops(prof, "self_cpu_time_total"),
            "top_ops_by_device_4_steps": top_ops(prof, "self_device_time_total"),
            "python_top_4_steps": python_top(pr, 25), "syncs_in_one_step": syncs}


@torch.inference_mode()
def memory_part(model, n: int) -> dict:
    ids = torch.randint(0, SHAPE["vocab"], (1, n), generator=torch.Generator().manual_seed(n)).to(DEVICE)
    out = {}
    if DEVICE != "cuda":
        return {"context": n, "skipped": "no CUDA device"}
    for name in ("dynamic", "exact", "sparse"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        cache = tf.DynamicCache() if name == "dynamic" else kvtier.KVTierCache.for_model(model, mode=name)
        try:
            forward(model, cache, ids, logits_to_keep=1)
            sync()
            out[name] = round((torch.cuda.max_memory_allocated() - base) / 2**30, 3)
        except torch.OutOfMemoryError as exc:
            out[name] = f"out of memory: {str(exc).splitlines()[0][:160]}"
        finally:
            if name != "dynamic":
                cache.close()
            del cache
    return {"context": n, "one_shot_peak_gib_above_weights": out}


@torch.inference_mode()
def parity_part(layers: int, n: int, steps: int) -> dict:
    """kvtier's logits against DynamicCache's (the exactness reference) and StaticCache's, same tokens."""
    out = {}
    for dtype in (torch.bfloat16, torch.float32):
        model = build(layers, n + steps + 8, dtype)
        ids = torch.randint(0, SHAPE["vocab"], (1, n + steps), generator=torch.Generator().manual_seed(1)).to(DEVICE)
        caches = {"dynamic": tf.DynamicCache(), "static": tf.StaticCache(config=model.config, max_cache_len=n + steps + 8)}
        cache = kvtier.KVTierCache.for_model(model, mode="exact")
        got = [prefill(model, cache, ids[:, :n], segment_tokens=2048, progress=False).float()]
        got += [forward(model, cache, ids[:, t:t + 1]).logits[:, -1].float() for t in range(n, n + steps)]
        row = {}
        for name, ref in caches.items():
            want = [forward(model, ref, ids[:, :n], logits_to_keep=1).logits[:, -1].float()]
            want += [forward(model, ref, ids[:, t:t + 1]).logits[:, -1].float() for t in range(n, n + steps)]
            row[f"max_abs_logit_diff_vs_{name}"] = round(max(float((a - b).abs().max()) for a, b in zip(got, want)), 6)
        row["max_abs_logit"] = round(max(float(a.abs().max()) for a in got), 3)
        cache.close()
        out[str(dtype).removeprefix("torch.")] = row
        del model, caches
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    return {"context": n, "layers": layers, **out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--segment", type=int, default=2048)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--parts", nargs="+", default=["prefill", "decode", "hogwild", "memory", "parity"])
    p.add_argument("--out", type=Path, default=Path("."))
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shape on the CPU: checks the script, measures nothing")
    a = p.parse_args()
    global DEVICE
    if a.cpu_smoke:
        DEVICE = "cpu"
        SHAPE.update(heads=4, kv_heads=2, head_dim=16, intermediate=64, vocab=256)
    elif not torch.cuda.is_available():
        raise SystemExit("gpu_profile.py: no CUDA device (try --cpu-smoke)")
    result: dict = {"benchmark": "profile-llama3-8b-cuda", "machine": machine_info(),
                    "config": {**SHAPE, "layers": a.layers, "dtype": "bfloat16"}}
    path = a.out / "profile-llama3-8b-cuda.json"
    a.out.mkdir(parents=True, exist_ok=True)
    model = build(a.layers, a.context + 4 * a.steps + 16, torch.bfloat16)
    for part in a.parts:
        t = time.perf_counter()
        try:
            if part == "prefill":
                result[part] = prefill_part(model, a.context, a.segment)
            elif part == "decode":
                result[part] = decode_part(model, a.context, a.steps)
            elif part == "hogwild":
                result[part] = hogwild_part(model, min(a.context, 16384), 4, a.steps)
            elif part == "memory":
                result[part] = memory_part(model, a.context)
            elif part == "parity":
                del model
                if DEVICE == "cuda":
                    torch.cuda.empty_cache()
                result[part] = parity_part(a.layers, min(a.context, 16384), 8)
        except Exception as exc:  # keep what the other parts measured
            result[part] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
        result[part]["seconds"] = round(time.perf_counter() - t, 1)
        print(json.dumps({part: result[part]}, indent=1), flush=True)
        path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
