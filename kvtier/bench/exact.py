"""`kvtier bench exact`: prefill time and decode step time of exact mode against DynamicCache.

Three configurations on the same random-weight Llama, in one run:
  dynamic      transformers' DynamicCache (sdpa attention)
  all-device   KVTierCache with no budgets: every chunk in the device pool
  disk-heavy   KVTierCache with a device budget of (1 - disk_fraction) of the context and no host pool,
               so about `disk_fraction` of the chunks live only on disk and are read back every step
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

import torch
import transformers as tf
from tqdm import tqdm

from ..cache import KVTierCache, cache_argument
from .common import bytes_moved, median_ms, timed, write_result


def bench_model(layers: int, kv_heads: int, head_dim: int, max_len: int, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    hidden = kv_heads * head_dim
    cfg = tf.LlamaConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=kv_heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                         max_position_embeddings=max_len)
    return tf.AutoModelForCausalLM.from_config(cfg).to(dtype).eval()


@torch.inference_mode()
def run_one(model, cache, ids: torch.Tensor, steps: int, warmup: int = 2) -> dict[str, Any]:
    """Prefill `ids`, then time `steps` single-token decode forwards (after `warmup` untimed ones)."""
    kw = {cache_argument(model): cache}
    prefill_s, out = timed(lambda: model(input_ids=ids, use_cache=True, **kw))
    tok = out.logits[:, -1:].argmax(-1)
    times, before = [], None
    for i in range(warmup + steps):
        if i == warmup and isinstance(cache, KVTierCache):
            before = copy.deepcopy(cache.stats())
        dt, out = timed(lambda: model(input_ids=tok, use_cache=True, **kw))
        tok = out.logits[:, -1:].argmax(-1)
        if i >= warmup:
            times.append(dt)
    result = {"prefill_s": round(prefill_s, 3), "decode_step_ms": median_ms(times),
              "decode_step_ms_max": round(max(times) * 1000, 3), "last_logits": out.logits[:, -1].float()}
    if isinstance(cache, KVTierCache):
        after = cache.stats()
        result["bytes_moved_per_step"] = bytes_moved(before, after, steps)
        result["tiers"] = {t: {"tokens": getattr(after, t).tokens, "bytes": getattr(after, t).bytes}
                           for t in ("device", "host", "disk")}
        result["disk_compression_ratio"] = after.disk.compression_ratio
        result["disk_token_share"] = _disk_share(cache)
    return result


def _disk_share(cache: KVTierCache) -> float:
    from ..layers import TieredLayer
    from ..store.chunk import Tier

    total = on_disk = 0
    for layer in cache.layers:
        if isinstance(layer, TieredLayer):
            total += layer.length
            on_disk += sum(c.length for c in layer.chunks if c.tier == Tier.DISK)
    return round(on_disk / total, 3) if total else 0.0


def run(contexts: list[int], steps: int, layers: int, kv_heads: int, head_dim: int, disk_fraction: float,
        dtype: torch.dtype, chunk_size: int) -> dict[str, Any]:
    base = bench_model(layers, kv_heads, head_dim, max(contexts) + steps + 16, dtype)
    kv_model = copy.deepcopy(base)
    rows = []
    for n in tqdm(contexts, desc="contexts"):
        ids = torch.randint(0, 1024, (1, n), generator=torch.Generator().manual_seed(n))
        dyn = run_one(base, tf.DynamicCache(), ids, steps)
        configs = {
            "all-device": dict(chunk_size=chunk_size),
            "disk-heavy": dict(chunk_size=chunk_size, device_budget=max(int(n * (1 - disk_fraction)), 2 * chunk_size + 68),
                               host_budget=0),
        }
        row: dict[str, Any] = {"context": n, "dynamic": _public(dyn)}
        for name, options in configs.items():
            with KVTierCache.for_model(kv_model, **options) as cache:
                r = run_one(kv_model, cache, ids, steps)
            r["max_abs_logit_diff_vs_dynamic"] = float((r["last_logits"] - dyn["last_logits"]).abs().max())
            r["decode_ratio_vs_dynamic"] = round(r["decode_step_ms"] / dyn["decode_step_ms"], 3)
            r["prefill_ratio_vs_dynamic"] = round(r["prefill_s"] / dyn["prefill_s"], 3)
            r["options"] = options
            row[name] = _public(r)
        rows.append(row)
    return {
        "config": {"layers": layers, "kv_heads": kv_heads, "head_dim": head_dim, "dtype": str(dtype).removeprefix("torch."),
                   "decode_steps": steps, "disk_fraction": disk_fraction, "chunk_size": chunk_size},
        "results": rows,
    }


def _public(r: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in r.items() if k != "last_logits"}


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["results"]
    names = ["dynamic", "all-device", "disk-heavy"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.25
    for ax, metric, label in ((axes[0], "decode_step_ms", "decode step (ms)"), (axes[1], "prefill_s", "prefill (s)")):
        for i, name in enumerate(names):
            xs = [j + (i - 1) * width for j in range(len(rows))]
            ax.bar(xs, [row[name][metric] for row in rows], width, label=name)
        ax.set_xticks(range(len(rows)), [f"{row['context'] // 1024}k" for row in rows])
        ax.set_xlabel("context tokens")
        ax.set_ylabel(label)
        ax.set_yscale("log")
    axes[0].legend()
    fig.suptitle(f"kvtier exact mode vs DynamicCache ({result['machine']['cpu']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="kvtier bench exact", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=int, nargs="+", default=[16384, 32768])
    p.add_argument("--steps", type=int, default=16, help="timed decode steps per configuration")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--disk-fraction", type=float, default=0.9)
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default="docs/benchmarks")
    p.add_argument("--no-plot", action="store_true")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    result = run(a.contexts, a.steps, a.layers, a.kv_heads, a.head_dim, a.disk_fraction, getattr(torch, a.dtype),
                 a.chunk_size)
    path = write_result("exact", result, a.out)
    if not a.no_plot:
        result["machine"] = __import__("json").loads(path.read_text())["machine"]
        plot(result, path.with_suffix(".png"))
    for row in result["results"]:
        print(f"{row['context']:>7} tokens  dynamic {row['dynamic']['decode_step_ms']:8.1f} ms/step  "
              f"all-device {row['all-device']['decode_step_ms']:8.1f} ({row['all-device']['decode_ratio_vs_dynamic']}x)  "
              f"disk-heavy {row['disk-heavy']['decode_step_ms']:8.1f} ({row['disk-heavy']['decode_ratio_vs_dynamic']}x)")
    print(f"wrote {path}")
