"""`kvtier bench speed`: decode step time against context length, sparse vs exact vs StaticCache.

For each context length the document is prefilled once by kvtier (sparse mode, so chunks are planned
from the measured skew) into a store, then every configuration decodes from that same KV:

  static           transformers' StaticCache holding the same KV, sized to it (sdpa attention): the baseline
  static-ideal     a StaticCache holding only as many tokens as a sparse step attends to (the budget): what
                   a sparse step would cost if selecting and gathering were free
  dynamic          transformers' DynamicCache holding the same KV
  exact            the saved session reopened in exact mode, everything on the device
  sparse           reopened in sparse mode at `--budget` of the context, everything on the device
  sparse-tiered    sparse, with device and host budgets of `--device-fraction` / `--host-fraction` of the
                   context per layer: the rest lives on disk and is fetched (and prefetched) as selected
  shared-tiered    sparse-tiered with one selection shared by a layer's KV heads, so at most the budget is
                   loaded per layer and step
  shared-tiered+lookahead  the same with the next-layer query guess (`lookahead=True`, InfiniGen) added
                   to the previous step's selection as a prefetch source

and, on a CUDA device,

  offloaded        transformers' DynamicCache(offloading=True): the KV lives in CPU memory and each layer's
                   is copied to the GPU (one layer ahead, on a side stream) at every step

Shapes (`--shape`): "attention-heavy" (default) is a random-weight Llama with few layers, many KV heads and a
small MLP, as the attention share of a long-context decode step is what sparse decoding changes.
"llama3-8b" is Llama-3-8B's shape (32 layers, 32 query and 8 KV heads of 128, MLP 14336, 128k vocabulary)
with random weights, for a GPU. `--gpu-memory-gib G` emulates a smaller card: the tiered configurations get
the device budget that the weights leave of G GiB (less `--reserve-gib` for activations).

The baselines are first timed alone (their own rows). Then each kvtier configuration's timed steps alternate
one by one with steps of a StaticCache holding the same KV and of the ideal, and its ratios
(`decode_ratio_vs_static`, `ratio_vs_ideal`) are to those interleaved steps (`static_step_ms_interleaved`,
`ideal_step_ms_interleaved`): on a shared machine a slow spell then slows both sides of a ratio alike.

On CUDA, `peak_device_bytes` is the most device memory a configuration held on top of what was allocated
before its cache was built (the weights, and the interleaved baselines' caches): its KV on the device and the
activations of its decode steps and of the interleaved baselines' (a few MB).
"""

from __future__ import annotations

import argparse
import copy
import math
import resource
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers as tf
from tqdm import tqdm

from ..cache import KVTierCache, cache_argument
from .common import (
    add_out_argument,
    bytes_moved,
    device_name,
    median_ms,
    non_negative_int,
    non_negative_number,
    positive_int,
    positive_number,
    result_name,
    share,
    share_or_zero,
    timed,
    write_result,
)

SHAPES: dict[str, dict[str, int]] = {
    "attention-heavy": dict(layers=4, heads=16, kv_heads=16, head_dim=64, intermediate=1024, vocab=1024),
    # Qwen2.5-0.5B's attention and MLP geometry (hidden 896 = 14 query heads x 64, 2 KV heads) in 4 layers
    "qwen2.5-0.5b": dict(layers=4, heads=14, kv_heads=2, head_dim=64, intermediate=4864, vocab=1024),
    "llama3-8b": dict(layers=32, heads=32, kv_heads=8, head_dim=128, intermediate=14336, vocab=128256),
}


def speed_model(shape: dict[str, int], max_len: int, device: str = "cpu",
                dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A random-weight Llama of `shape` (see SHAPES), built directly on `device` in `dtype`."""
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["heads"] * shape["head_dim"],
                         intermediate_size=shape["intermediate"], num_hidden_layers=shape["layers"],
                         num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                         head_dim=shape["head_dim"], max_position_embeddings=max_len, rope_theta=1e6)
    with torch.device(device):
        return tf.AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


def shape_from_args(a) -> dict[str, int]:
    """The shape `--shape` names, with the `--kv-heads` (query heads follow), `--layers`, `--head-dim` and
    `--intermediate` overrides applied."""
    shape = dict(SHAPES[a.shape])
    if a.kv_heads:
        ratio = shape["heads"] // shape["kv_heads"]
        shape.update(kv_heads=a.kv_heads, heads=a.kv_heads * ratio)
    shape.update({k: v for k, v in (("layers", a.layers), ("head_dim", a.head_dim),
                                    ("intermediate", a.intermediate)) if v})
    return shape


def add_shape_arguments(p: argparse.ArgumentParser, default: str) -> None:
    """`--shape` and the overrides `shape_from_args` reads."""
    p.add_argument("--shape", choices=sorted(SHAPES), default=default, help="model shape (random weights)")
    p.add_argument("--layers", type=positive_int, help="override the shape's layer count")
    p.add_argument("--kv-heads", type=positive_int, help="override the shape's KV heads (query heads follow)")
    p.add_argument("--head-dim", type=positive_int, help="override the shape's head dimension")
    p.add_argument("--intermediate", type=positive_int, help="override the shape's MLP width")


def emulated_device_budget(model: torch.nn.Module, gpu_gib: float, reserve_gib: float) -> int:
    """Tokens per layer a `gpu_gib` card holds once the weights and `reserve_gib` of activations are in."""
    cfg = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * model.dtype.itemsize
    free = gpu_gib * 2**30 - weights - reserve_gib * 2**30
    if free <= 0:
        raise SystemExit(f"a {gpu_gib} GiB card cannot hold this model's {weights / 2**30:.1f} GiB of weights "
                         f"and {reserve_gib} GiB of activations")
    return int(free // per_token)


class Stepper:
    """One cache decoding its own greedy tokens one step at a time, so that the steps of several caches can
    interleave (a slow spell of a shared machine then falls on every one of them alike)."""

    def __init__(self, model, cache, first: torch.Tensor):
        self.model, self.cache, self.tok = model, cache, first
        self.logits: torch.Tensor | None = None

    @torch.inference_mode()
    def step(self) -> float:
        """One greedy step; returns its time in seconds."""
        kw = {cache_argument(self.model): self.cache}
        dt, out = timed(lambda: self.model(input_ids=self.tok, use_cache=True, **kw), sync=self.tok.is_cuda)
        self.logits = out.logits[:, -1]
        self.tok = self.logits.argmax(-1, keepdim=True)
        return dt


def decode_steps(model, cache, first: torch.Tensor, steps: int, warmup: int
                 ) -> tuple[list[float], torch.Tensor | None, torch.Tensor]:
    """Greedy steps from `first`: (times of the steps after `warmup`, last logits, the next token to feed)."""
    stepper = Stepper(model, cache, first)
    times = [stepper.step() for _ in range(warmup + steps)][warmup:]
    return times, stepper.logits, stepper.tok


def dynamic_from(cache: KVTierCache, config=None, offloading: bool = False) -> tf.DynamicCache:
    """A DynamicCache holding exactly the KV a kvtier cache stores (offloaded to CPU memory if asked)."""
    dyn = tf.DynamicCache(config=config, offloading=True) if offloading else tf.DynamicCache()
    for layer in cache.tiers.layers:
        k, v = cache.tiers.layer_kv(layer)
        dyn.update(k.clone(), v.clone(), layer.index)
    return dyn


def static_from(cache: KVTierCache, config, extra: int) -> tf.StaticCache:
    """A StaticCache holding exactly the KV a kvtier cache stores, with room for `extra` more tokens."""
    static = tf.StaticCache(config=config, max_cache_len=cache.get_seq_length() + extra)
    for layer in cache.tiers.layers:
        k, v = cache.tiers.layer_kv(layer)
        static.update(k.clone(), v.clone(), layer.index)
    return static


@torch.inference_mode()
def ideal_cache(model, attended: int, room: int, device: str | torch.device) -> tf.StaticCache:
    """A StaticCache holding `attended` tokens (random ids) with room for `room` more: a dense step over it is
    the floor a sparse step at that budget could reach if finding and gathering its tokens cost nothing."""
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, attended), generator=torch.Generator().manual_seed(attended)).to(device)
    static = tf.StaticCache(config=model.config, max_cache_len=attended + room + 1)
    model(input_ids=ids, use_cache=True, logits_to_keep=1, **{cache_argument(model): static})
    return static


def ideal_sparse_step(model, attended: int, first: torch.Tensor, steps: int, warmup: int) -> list[float]:
    """Dense decode steps over a StaticCache of `attended` tokens (`ideal_cache`)."""
    static = ideal_cache(model, attended, steps + warmup, first.device)
    times, _, _ = decode_steps(model, static, first, steps, warmup)
    return times


def _reset_peak(device: str) -> int:
    """Start measuring peak device memory; returns what is allocated now (weights, caches kept alive)."""
    if not device.startswith("cuda"):
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def _peak_bytes(device: str, before: int) -> int | None:
    """Peak device memory since `_reset_peak`, above what was allocated then (None off CUDA)."""
    return torch.cuda.max_memory_allocated() - before if device.startswith("cuda") else None


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
        shape: dict[str, int], device: str = "cpu", dtype: torch.dtype = torch.float32, gpu_gib: float | None = None,
        reserve_gib: float = 2.0, configs: list[str] | None = None,
        on_context: Callable[[dict[str, Any]], None] | None = None,
        time_limit_s: float | None = None) -> dict[str, Any]:
    """Every context in turn; `on_context` gets the result so far after each one (to keep what a stopped run
    finished). With `time_limit_s`, a context is skipped when the previous one's time, scaled by the ratio of
    their lengths (1.2x for the quadratic share of the prefill), says it would not finish in the time left."""
    started = time.perf_counter()
    base = speed_model(shape, max(contexts) + steps + warmup + 8, device, dtype)
    kv_model = copy.deepcopy(base)
    emulated = emulated_device_budget(base, gpu_gib, reserve_gib) if gpu_gib else None
    rows: list[dict[str, Any]] = []
    skipped: list[int] = []
    last: tuple[int, float] | None = None  # (context, seconds) of the context measured last

    def summary(complete: bool) -> dict[str, Any]:
        return {
            "config": {**shape, "device": device, "dtype": str(dtype).removeprefix("torch."), "decode_steps": steps,
                       "warmup_steps": warmup, "sparse_budget": budget, "host_fraction": host_fraction,
                       "device_fraction": None if emulated else device_fraction, "emulated_gpu_gib": gpu_gib,
                       "reserve_gib": reserve_gib if gpu_gib else None, "emulated_device_budget": emulated},
            "results": list(rows),
            "complete": complete and not skipped,  # False: written before every context was measured
            "skipped_contexts": list(skipped),  # not run: the time limit would not have allowed them
            "time_limit_s": time_limit_s,
            "max_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        }

    for n in tqdm(contexts, desc="contexts"):
        if time_limit_s is not None and last is not None:  # the first context always runs
            left = time_limit_s - (time.perf_counter() - started)
            if skipped or last[1] * n / last[0] * 1.2 > left:
                skipped.append(n)
                continue
        context_started = time.perf_counter()
        ids = torch.randint(0, shape["vocab"], (1, n), generator=torch.Generator().manual_seed(n)).to(device)
        store = Path(tempfile.mkdtemp(prefix="kvtier-speed-")) / "doc"
        first = torch.tensor([[7]], device=device)
        with KVTierCache.for_model(kv_model, mode="sparse", store_path=store) as cache:
            with torch.inference_mode():  # as generate runs it: no autograd graph keeping every layer's activations
                prefill_s, _ = timed(lambda: kv_model(input_ids=ids, use_cache=True, logits_to_keep=1,
                                                      **{cache_argument(kv_model): cache}), sync=ids.is_cuda)
            cache.save()
            skew = [layer.skew.top5 if layer.skew else None for layer in cache.tiers.layers]
            chunk_sizes = [sorted(c.length for c in layer.chunks) for layer in cache.tiers.layers]
            before = _reset_peak(device)
            static = static_from(cache, base.config, steps + warmup + 1)
            times, static_logits, _ = decode_steps(base, static, first, steps, warmup)
            row: dict[str, Any] = {"context": n, "kvtier_prefill_s": round(prefill_s, 2), "top5_mass_by_layer": skew,
                                   "median_chunk_by_layer": [s[len(s) // 2] if s else None for s in chunk_sizes],
                                   "static": {"decode_step_ms": median_ms(times),
                                              "peak_device_bytes": _peak_bytes(device, before)}}
            del static
            attended = math.ceil(budget * n)
            row["static-ideal"] = {"attended_tokens": attended, "decode_step_ms": median_ms(
                ideal_sparse_step(base, attended, first, steps, warmup))}
            before = _reset_peak(device)
            dyn = dynamic_from(cache)
            times, _, _ = decode_steps(base, dyn, first, steps, warmup)
            row["dynamic"] = {"decode_step_ms": median_ms(times), "peak_device_bytes": None}
            del dyn
            if device.startswith("cuda"):
                row["dynamic"]["peak_device_bytes"] = _peak_bytes(device, before)
                before = _reset_peak(device)
                dyn = dynamic_from(cache, base.config, offloading=True)
                times, off_logits, _ = decode_steps(base, dyn, first, steps, warmup)
                row["offloaded"] = {"decode_step_ms": median_ms(times),
                                    "peak_device_bytes": _peak_bytes(device, before),
                                    "max_abs_logit_diff_vs_static": float((off_logits - static_logits).abs().max())}
                del dyn
            names = configs or list(CONFIGS)
            room = len(names) * (steps + 1)
            # Partners: every configuration's steps alternate with a StaticCache's and the ideal's (below).
            partners = {"static": Stepper(base, static_from(cache, base.config, room), first),
                        "static-ideal": Stepper(base, ideal_cache(base, attended, room, device), first)}
        device_budget = min(n, emulated) if emulated else max(512, int(device_fraction * n))
        tiered = dict(mode="sparse", sparse_budget=budget, device_budget=device_budget,
                      host_budget=int(host_fraction * n))
        all_configs = {
            "exact": dict(mode="exact", device_budget=None, host_budget=None),
            "sparse": dict(mode="sparse", sparse_budget=budget, device_budget=None, host_budget=None),
            "sparse-tiered": tiered,
            "shared-tiered": dict(tiered, shared_selection=True),
            "shared-tiered+lookahead": dict(tiered, shared_selection=True, lookahead=True),
        }
        for name in names:
            options = all_configs[name]
            before = _reset_peak(device)
            cache = KVTierCache.open(store, kv_model, **options)
            cache.warm()  # reopened chunks start on disk: fill the device and host budgets first
            _, _, tok = decode_steps(kv_model, cache, first, 0, warmup)  # the same tokens DynamicCache was fed
            for partner in partners.values():
                partner.step()  # each partner's first step after the previous configuration's (not timed)
            warm = copy.deepcopy(cache.stats())
            kv = Stepper(kv_model, cache, tok)
            times, beside = [], {key: [] for key in partners}
            for _ in range(steps):  # one step each, in turn
                times.append(kv.step())
                for key, partner in partners.items():
                    beside[key].append(partner.step())
            step_ms = median_ms(times)
            static_ms, ideal_ms = median_ms(beside["static"]), median_ms(beside["static-ideal"])
            result = {"decode_step_ms": step_ms,
                      "decode_ratio_vs_static": round(step_ms / static_ms, 3),
                      "decode_ratio_vs_dynamic": round(step_ms / row["dynamic"]["decode_step_ms"], 3),
                      "static_step_ms_interleaved": static_ms,
                      "peak_device_bytes": _peak_bytes(device, before), "options": options,
                      **_tier_summary(cache, steps, warm)}
            if "offloaded" in row:
                result["speedup_vs_offloaded"] = round(row["offloaded"]["decode_step_ms"] / step_ms, 2)
            if name == "exact":
                result["max_abs_logit_diff_vs_static"] = float((kv.logits - static_logits).abs().max())
            else:
                result["ideal_step_ms_interleaved"] = ideal_ms
                result["ratio_vs_ideal"] = round(step_ms / ideal_ms, 3)
            row[name] = result
            cache.close()
        del partners
        shutil.rmtree(store.parent, ignore_errors=True)
        rows.append(row)
        last = (n, time.perf_counter() - context_started)
        if on_context is not None and len(rows) < len(contexts):
            on_context(summary(complete=False))
    return summary(complete=True)


CONFIGS = ("exact", "sparse", "sparse-tiered", "shared-tiered", "shared-tiered+lookahead")


def _measured(rows: list[dict[str, Any]]) -> list[str]:
    """The baselines and configurations a result holds, in a fixed order."""
    return [name for name in ("static", "static-ideal", "dynamic", "offloaded", *CONFIGS)
            if all(name in r for r in rows)]


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["results"]
    xs = [r["context"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name in _measured(rows):
        ax.plot(xs, [r[name]["decode_step_ms"] for r in rows], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(xs, [f"{x // 1024}k" for x in xs])
    ax.set_xlabel("context tokens")
    ax.set_ylabel("decode step (ms)")
    m, c = result["machine"], result["config"]
    where = m["gpu"] if c["device"].startswith("cuda") and m.get("gpu") else m["cpu"]
    ax.set_title(f"{c['shape']}, sparse budget {c['sparse_budget']:.0%} ({where})", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="kvtier bench speed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=positive_int, nargs="+", default=[4096, 8192, 16384, 32768, 65536])
    p.add_argument("--steps", type=positive_int, default=8)
    p.add_argument("--warmup", type=non_negative_int, default=3)
    p.add_argument("--budget", type=share, default=0.05, help="sparse budget, a fraction of the context")
    p.add_argument("--device-fraction", type=share, default=0.10,
                   help="device budget of the tiered configurations, a fraction of the context")
    p.add_argument("--host-fraction", type=share_or_zero, default=0.10)
    add_shape_arguments(p, "attention-heavy")
    p.add_argument("--device", type=device_name, default="cpu",
                   help="cpu or cuda (offloaded DynamicCache is measured on cuda only)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument("--gpu-memory-gib", type=positive_number,
                   help="emulate a card of this size: device budget = what the weights leave (replaces "
                        "--device-fraction)")
    p.add_argument("--reserve-gib", type=non_negative_number, default=2.0,
                   help="activations' share of the emulated card")
    p.add_argument("--configs", nargs="+", choices=CONFIGS, help="kvtier configurations to run (default: all)")
    p.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--time-limit", type=positive_number,
                   help="seconds for all contexts: skip a context the previous one's time says would not finish "
                        "(recorded as skipped_contexts)")
    add_out_argument(p)
    p.add_argument("--name", type=result_name,
                   help="result file name (default: speed on cpu, speed-<shape>-cuda on a GPU)")
    p.add_argument("--no-plot", action="store_true")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    shape = shape_from_args(a)
    dtype = getattr(torch, a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32"))
    name = a.name or ("speed" if a.device == "cpu" else f"speed-{a.shape}-cuda")

    def keep_partial(partial: dict[str, Any]) -> None:  # a run stopped later still leaves these contexts
        partial["config"]["shape"] = a.shape
        write_result(name, partial, a.out)

    result = run(a.contexts, a.steps, a.warmup, a.budget, a.device_fraction, a.host_fraction, shape, a.device,
                 dtype, a.gpu_memory_gib, a.reserve_gib, a.configs, on_context=keep_partial,
                 time_limit_s=a.time_limit)
    result["config"]["shape"] = a.shape
    path = write_result(name, result, a.out)
    if not a.no_plot:
        import json

        result["machine"] = json.loads(path.read_text())["machine"]
        plot(result, path.with_suffix(".png"))
    names = _measured(result["results"])
    for row in result["results"]:
        print(f"{row['context']:>7}  " + "  ".join(
            f"{n} {row[n]['decode_step_ms']:8.1f}" + (f" ({row[n]['decode_ratio_vs_static']}x)"
                                                       if "decode_ratio_vs_static" in row[n] else "")
            for n in names))
    if result["skipped_contexts"]:
        print(f"skipped (would not finish within --time-limit {a.time_limit:g}s): {result['skipped_contexts']}")
    print(f"wrote {path}")
