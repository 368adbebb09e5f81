"""`kvtier bench speed`: decode step time against context length, sparse vs exact vs DynamicCache.

For each context length the document is prefilled once by kvtier (sparse mode, so chunks are planned
from the measured skew) into a store, then every configuration decodes from that same KV:

  dynamic          transformers' DynamicCache holding the same KV (sdpa attention)
  exact            the saved session reopened in exact mode, everything on the device
  sparse           reopened in sparse mode at `--budget` of the context, everything on the device
  sparse-tiered    sparse, with device and host budgets of `--device-fraction` / `--host-fraction` of the
                   context per layer: the rest lives on disk and is fetched (and prefetched) as selected
  shared-tiered    sparse-tiered with one selection shared by a layer's KV heads, so at most the budget is
                   loaded per layer and step
  shared-tiered+lookahead  the same with the next-layer query guess (`lookahead=True`, InfiniGen) added
                   to the previous step's selection as a prefetch source

The model is random-weight and attention-heavy (few layers, many KV heads, a small MLP), as the
attention share of a long-context decode step is what sparse decoding changes.
"""

from __future__ import annotations

import argparse
import copy
import resource
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import transformers as tf
from tqdm import tqdm

from ..cache import KVTierCache, cache_argument
from .common import bytes_moved, median_ms, timed, write_result


def speed_model(layers: int, kv_heads: int, head_dim: int, intermediate: int, max_len: int) -> torch.nn.Module:
    torch.manual_seed(0)
    hidden = kv_heads * head_dim
    cfg = tf.LlamaConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=kv_heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                         max_position_embeddings=max_len, rope_theta=1e6)
    return tf.AutoModelForCausalLM.from_config(cfg).eval()


@torch.inference_mode()
def decode_steps(model, cache, first: torch.Tensor, steps: int, warmup: int
                 ) -> tuple[list[float], torch.Tensor | None, torch.Tensor]:
    """Greedy steps from `first`: (times of the steps after `warmup`, last logits, the next token to feed)."""
    kw = {cache_argument(model): cache}
    tok, times, logits = first, [], None
    for i in range(warmup + steps):
        dt, out = timed(lambda: model(input_ids=tok, use_cache=True, **kw))
        logits = out.logits[:, -1]
        tok = logits.argmax(-1, keepdim=True)
        if i >= warmup:
            times.append(dt)
    return times, logits, tok


def dynamic_from(cache: KVTierCache) -> tf.DynamicCache:
    """A DynamicCache holding exactly the KV a kvtier cache stores."""
    dyn = tf.DynamicCache()
    for layer in cache.tiers.layers:
        k, v = cache.tiers.layer_kv(layer)
        dyn.update(k.clone(), v.clone(), layer.index)
    return dyn


def _tier_summary(cache: KVTierCache, steps: int, warm) -> dict[str, Any]:
    s = cache.stats()
    return {
        "bytes_moved_per_step": bytes_moved(warm, s, steps),
        "prefetch_hit_rate": s.prefetch_hit_rate,
        "lookahead_recall": s.lookahead_recall,
        "stall_s_per_step": round((s.stall_s - warm.stall_s) / steps, 6),
        "mean_attended_tokens": round(s.mean_attended_tokens or 0, 1),
        "device_pool_bytes": sum(p.capacity * p.bytes_per_token() for p in cache.tiers.device_pools.values()),
        "device_peak_tokens_per_layer": s.device.peak_tokens,
        "host_peak_tokens_per_layer": s.host.peak_tokens,
        "disk_tokens": s.disk.tokens,
    }


def run(contexts: list[int], steps: int, warmup: int, budget: float, device_fraction: float, host_fraction: float,
        layers: int, kv_heads: int, head_dim: int, intermediate: int) -> dict[str, Any]:
    base = speed_model(layers, kv_heads, head_dim, intermediate, max(contexts) + steps + warmup + 8)
    kv_model = copy.deepcopy(base)
    rows = []
    for n in tqdm(contexts, desc="contexts"):
        ids = torch.randint(0, 1024, (1, n), generator=torch.Generator().manual_seed(n))
        store = Path(tempfile.mkdtemp(prefix="kvtier-speed-")) / "doc"
        first = torch.tensor([[7]])
        with KVTierCache.for_model(kv_model, mode="sparse", store_path=store) as cache:
            prefill_s, _ = timed(lambda: kv_model(input_ids=ids, use_cache=True, **{cache_argument(kv_model): cache}))
            cache.save()
            dyn = dynamic_from(cache)
            skew = [layer.skew.top5 if layer.skew else None for layer in cache.tiers.layers]
            chunk_sizes = [sorted(c.length for c in layer.chunks) for layer in cache.tiers.layers]
        times, dyn_logits, _ = decode_steps(base, dyn, first, steps, warmup)
        del dyn
        row: dict[str, Any] = {"context": n, "kvtier_prefill_s": round(prefill_s, 2), "top5_mass_by_layer": skew,
                               "median_chunk_by_layer": [s[len(s) // 2] if s else None for s in chunk_sizes],
                               "dynamic": {"decode_step_ms": median_ms(times)}}
        configs = {
            "exact": dict(mode="exact", device_budget=None, host_budget=None),
            "sparse": dict(mode="sparse", sparse_budget=budget, device_budget=None, host_budget=None),
            "sparse-tiered": dict(mode="sparse", sparse_budget=budget, device_budget=max(512, int(device_fraction * n)),
                                  host_budget=int(host_fraction * n)),
            "shared-tiered": dict(mode="sparse", sparse_budget=budget, device_budget=max(512, int(device_fraction * n)),
                                  host_budget=int(host_fraction * n), shared_selection=True),
        }
        configs["shared-tiered+lookahead"] = dict(configs["shared-tiered"], lookahead=True)
        for name, options in configs.items():
            cache = KVTierCache.open(store, kv_model, **options)
            cache.warm()  # reopened chunks start on disk: fill the device and host budgets first
            _, _, tok = decode_steps(kv_model, cache, first, 0, warmup)  # the same tokens DynamicCache was fed
            warm = copy.deepcopy(cache.stats())
            times, logits, _ = decode_steps(kv_model, cache, tok, steps, 0)
            result = {"decode_step_ms": median_ms(times),
                      "decode_ratio_vs_dynamic": round(median_ms(times) / row["dynamic"]["decode_step_ms"], 3),
                      "options": options, **_tier_summary(cache, steps, warm)}
            if name == "exact":
                result["max_abs_logit_diff_vs_dynamic"] = float((logits - dyn_logits).abs().max())
            row[name] = result
            cache.close()
        shutil.rmtree(store.parent, ignore_errors=True)
        rows.append(row)
    return {
        "config": {"layers": layers, "kv_heads": kv_heads, "head_dim": head_dim, "intermediate": intermediate,
                   "dtype": "float32", "decode_steps": steps, "warmup_steps": warmup, "sparse_budget": budget,
                   "device_fraction": device_fraction, "host_fraction": host_fraction},
        "results": rows,
        "max_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["results"]
    xs = [r["context"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name in ("dynamic", "exact", "sparse", "sparse-tiered", "shared-tiered", "shared-tiered+lookahead"):
        ax.plot(xs, [r[name]["decode_step_ms"] for r in rows], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(xs, [f"{x // 1024}k" for x in xs])
    ax.set_xlabel("context tokens")
    ax.set_ylabel("decode step (ms)")
    ax.set_title(f"sparse budget {result['config']['sparse_budget']:.0%} ({result['machine']['cpu']})", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="kvtier bench speed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--budget", type=float, default=0.05, help="sparse budget, a fraction of the context")
    p.add_argument("--device-fraction", type=float, default=0.10)
    p.add_argument("--host-fraction", type=float, default=0.10)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default="docs/benchmarks")
    p.add_argument("--no-plot", action="store_true")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    result = run(a.contexts, a.steps, a.warmup, a.budget, a.device_fraction, a.host_fraction, a.layers, a.kv_heads,
                 a.head_dim, a.intermediate)
    path = write_result("speed", result, a.out)
    if not a.no_plot:
        import json

        result["machine"] = json.loads(path.read_text())["machine"]
        plot(result, path.with_suffix(".png"))
    for row in result["results"]:
        print(f"{row['context']:>7}  dynamic {row['dynamic']['decode_step_ms']:9.1f} ms  "
              + "  ".join(f"{name} {row[name]['decode_step_ms']:8.1f} ({row[name]['decode_ratio_vs_dynamic']}x)"
                          for name in ("exact", "sparse", "sparse-tiered", "shared-tiered", "shared-tiered+lookahead")))
    print(f"wrote {path}")
