"""`kvtier bench hogwild`: N workers continuing one shared prompt, per decode step and KV held, four ways.

For each worker count N (`--workers`, default 1 2 4 8), on the same random-weight Llama, in one run: the prompt
(`--prompt` random tokens) is prefilled, then every worker decodes one token per step for `--warmup` untimed
and `--steps` timed steps (each worker's own text grows to warmup + steps tokens); every method is fed the same
tokens. The caches of every worker count and method are built first and all of them take turns step by step,
so that a change in the machine's speed touches every method and worker count alike (the memory of all of
them is held at once: with the defaults on the CPU shape the process peaked at 8.7 GB resident):

  independent  what users do today: N separate continuations of the prompt, each with its own copy of the
               prompt's KV, held as one transformers StaticCache of batch N (sdpa attention, sized to the tokens
               it will hold). One batched forward advances all N: the strongest way to run N independent
               decodes per step (N batch-1 forwards read the weights N times and pay N times the Python), and
               what `generate(..., num_return_sequences=N)` does. Worker w reads the prompt and its own tokens.
  independent_kvtier_linears
               the same, in its own StaticCache, with the model's linear layers through kvtier's few-row C
               kernel (`FewRowLinears`), as hogwild's and rerotate's steps run them on a CPU: the comparison
               with the linear layers equal, so what is left is the cache's.
  hogwild      `HogwildCache` with N workers (Hogwild! Inference, arXiv 2504.06261): the prompt's KV held once
               as the shared history, one batched forward per step (`cache.step`), worker w reading the prompt,
               the other workers' tokens and its own; each query turned to every block's offset in its view
               (no key is moved), partial attentions merged by log-sum-exp.
  rerotate     the reference implementation's pure-PyTorch method, written here as a baseline over the same
               cache: the same model and cache writes, but at every layer of every step each worker's view is
               rebuilt as one contiguous KV tensor, every block after the prompt re-rotated to its offset in that
               view with `Rope.shift` (once per distinct block and offset, and none for a zero offset, as the
               reference does; the prompt sits at offset 0 in every view, so it is copied but not turned),
               then ordinary sdpa attention of the N queries over the N views. O(cache) copying per layer per
               step.

Reported per N: the median step time of each method (all N workers advance one token), the ratios hogwild /
one worker's hogwild step, hogwild / independent (and / independent_kvtier_linears) and rerotate / hogwild,
the KV bytes each method holds (independent: N copies of the prompt; hogwild and rerotate: one) and
rerotate's transient view bytes per layer;
the largest logit difference between hogwild and rerotate (the same views: fp32 round-off) and, at N = 1,
between hogwild and independent (then the same sequence). Targets on a CPU: at N = 4 the hogwild step at most
1.5x one worker's and at most 0.5x the independent step, the prompt's KV held once.

Shapes (`--shape`): "attention-heavy" (default; 4 layers, 16 query and 16 KV heads of 64, MLP 1024) so that
attention over the prompt matters as it does in a long-context step of a large model; "llama3-8b" (32 layers,
32 query and 8 KV heads of 128, MLP 14336, bf16) for a GPU (`--device cuda`).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers as tf
from tqdm import tqdm

from ..cache import cache_argument
from ..few_rows import FewRowLinears, few_rows_linear
from ..handle import KVHandle
from ..hogwild import HogwildCache, Layout
from ..hogwild.layer import HogwildLayer
from ..kernels import fused_attention
from .common import (
    add_out_argument,
    device_name,
    median_ms,
    non_negative_int,
    positive_int,
    print_targets,
    result_name,
    timed,
    write_result,
)
from .speed import SHAPES, shape_from_args, speed_model

METHODS = ("independent", "independent_kvtier_linears", "hogwild", "rerotate")
ROW_COSTS = ("linear", "linear_kvtier", "attention", "attention_kvtier")
TARGET_WORKERS = 4
TARGET_VS_ONE = 1.5  # hogwild step at N = 4 / hogwild step at N = 1, at most
TARGET_VS_INDEPENDENT = 0.5  # hogwild step at N = 4 / independent step at N = 4, at most


# ------------------------------------------------------------------------------ the reference's method
class _RerotatedView:
    """One layer of a `RerotateCache` as kvtier's attention sees it during a step: attention over each worker's
    view rebuilt with re-rotated keys. Storage stays the wrapped `HogwildLayer`'s."""

    is_sliding = False

    def __init__(self, layer: HogwildLayer, layout: Layout, prompt: tuple[torch.Tensor, torch.Tensor]):
        self.layer, self.layout, self.prompt, self.index = layer, layout, prompt, layer.index

    def attend(self, q: torch.Tensor, handle: KVHandle, pad: torch.Tensor | None, scale: float,
               softcap: float | None, need_lse: bool = False) -> tuple[torch.Tensor, None]:
        """q: [N, Hq, 1, D], worker w's query rotated at its block-local position. Returns out [N, Hq, 1, D]."""
        if softcap is not None or need_lse:
            raise ValueError("the re-rotation baseline covers plain softmax attention (no softcap, no sinks)")
        layer, layout = self.layer, self.layout
        n, hq, _, d = q.shape
        hk, hv = self.prompt  # [Hkv, H, D], rotated at 0..H-1: offset 0 in every view
        h, total = hk.shape[1], layout.total
        # Every view holds every block, so all have `total` tokens and the new token is the last of each.
        k = hk.new_empty(n, hk.shape[0], total, d)  # [N, Hkv, total, D]: each worker's view, contiguous
        v = hv.new_empty(n, hv.shape[0], total, d)
        k[:, :, :h] = hk
        v[:, :, :h] = hv
        starts, turned = layout.starts, {}
        for w in range(n):
            vstart = layout.view_starts(w)
            for b in layout.view_order(w):
                length, at, src = layout.lengths[b], vstart[b], starts[b]
                if not length:
                    continue
                if (b, at) not in turned:  # the reference reuses a rotation shared by several views
                    kb = layer.k[:, src : src + length]  # rotated at block-local 0..length-1
                    turned[b, at] = layer.rope.shift(kb[None], at)[0] if at else kb
                k[w, :, at : at + length] = turned[b, at]
                v[w, :, at : at + length] = layer.v[:, src : src + length]
        # The reference feeds each worker's view position to the model; here q was rotated at its block-local
        # position, so turn it there (one small rotation per worker).
        delta = torch.tensor([[total - layout.step_len(w)] for w in range(n)], device=q.device)  # [N, 1]
        qv = layer.rope.shift(q, delta)
        out = F.scaled_dot_product_attention(qv, k, v, scale=scale, enable_gqa=hq != hk.shape[0])
        return out, None


class RerotateCache(HogwildCache):
    """A `HogwildCache` whose decode steps attend the way the reference's pure-PyTorch path does (see
    `_RerotatedView`); prefill and writes are HogwildCache's own. For this benchmark only.

    The reference holds its prompt block as one contiguous tensor per layer; here that is a copy of the
    history's keys and values, taken when a step first finds the history changed (the first step after the
    prefill: a warm-up step), so the timed steps read the prompt as the reference does."""

    def __init__(self, model: torch.nn.Module, workers: int, *, step_capacity: int = 64):
        super().__init__(model, workers, step_capacity=step_capacity)
        if any(layer.is_sliding for layer in self.layers):
            raise ValueError("the re-rotation baseline covers full-attention layers only")
        self._stepping = False
        self.prompt_blocks: dict[int, tuple[int, torch.Tensor, torch.Tensor]] = {}  # layer -> (length, k, v)

    def step(self, tokens) -> torch.Tensor:
        self._stepping = True
        try:
            return super().step(tokens)
        finally:
            self._stepping = False

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        handle, _ = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if not self._stepping:
            return handle, handle
        if key_states.shape[2] != 1:
            raise ValueError("the re-rotation baseline steps one token per worker")
        layer = self.layers[layer_idx]
        block = self.prompt_blocks.get(layer_idx)
        if block is None or block[0] != layer.history.length:
            block = self.prompt_blocks[layer_idx] = (layer.history.length, *layer.history.kv())
        view = KVHandle(_RerotatedView(layer, self.layout, block[1:]), handle.past_len, handle.k_new,
                        handle.v_new)
        return view, view

    def prompt_bytes(self) -> int:
        """Bytes of the contiguous prompt blocks the re-rotation reads (the reference's storage of the prompt)."""
        return sum(k.nbytes + v.nbytes for _, k, v in self.prompt_blocks.values())


# ----------------------------------------------------------------------------------------- accounting
def kv_bytes_hogwild(cache: HogwildCache) -> dict[str, int]:
    """Memory a HogwildCache allocated for KV: the history's device pools (its KVTierCache) and the arena of
    headers and current steps."""
    history = sum(p.allocated_bytes for p in cache.history_cache.tiers.device_pools.values())
    arena = sum(layer.k.nbytes + layer.v.nbytes for layer in cache.layers)
    return {"history": history, "arena": arena, "total": history + arena}


def kv_bytes_static(cache: tf.StaticCache) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def _per_token(model: torch.nn.Module) -> int:
    """KV bytes of one token over every layer."""
    cfg = model.config
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * model.dtype.itemsize


# ------------------------------------------------------------------------------------------------ run
@torch.inference_mode()
def prefill_prompt(base: torch.nn.Module, ids: torch.Tensor) -> tuple[list[tuple[torch.Tensor, torch.Tensor]],
                                                                      torch.Tensor]:
    """The prompt's KV per layer ([1, Hkv, P, D] each) from one forward of the sdpa model, and its last logits."""
    dyn = tf.DynamicCache()
    out = base(input_ids=ids[None], use_cache=True, logits_to_keep=1, **{cache_argument(base): dyn})
    return [(layer.keys, layer.values) for layer in dyn.layers], out.logits[0, -1].float()


def independent_cache(base: torch.nn.Module, prompt_kv, workers: int, extra: int) -> tf.StaticCache:
    """A StaticCache of batch `workers`, each row a copy of the prompt's KV, with room for `extra` tokens."""
    static = tf.StaticCache(config=base.config, max_cache_len=prompt_kv[0][0].shape[2] + extra)
    for i, (k, v) in enumerate(prompt_kv):
        static.update(k.expand(workers, -1, -1, -1), v.expand(workers, -1, -1, -1), i)
    return static


class WorkerCount:
    """The three methods at one worker count: their caches (the prompt prefilled), the tokens they are fed, their
    step times and the logit checks."""

    def __init__(self, base: torch.nn.Module, kv_model: torch.nn.Module, ids: torch.Tensor, prompt_kv,
                 workers: int, steps: int, warmup: int, stack: contextlib.ExitStack):
        self.base, self.ids, self.workers, self.warmup = base, ids, workers, warmup
        total = warmup + steps
        self.tokens = torch.randint(3, base.config.vocab_size, (total, workers),
                                    generator=torch.Generator().manual_seed(workers)).to(ids.device)
        capacity = max(64, total)  # the current steps never outgrow their rows while timed
        self.static = independent_cache(base, prompt_kv, workers, total)
        self.static_linears = independent_cache(base, prompt_kv, workers, total)
        linears = FewRowLinears(base)
        self.hog = stack.enter_context(HogwildCache.for_model(kv_model, workers=workers, step_capacity=capacity))
        self.rer = stack.enter_context(RerotateCache.for_model(kv_model, workers=workers, step_capacity=capacity))
        self.prefill_s = {name: timed(lambda c=cache: c.prefill_history(ids), sync=ids.is_cuda)[0]
                          for name, cache in (("hogwild", self.hog), ("rerotate", self.rer))}
        kw = {cache_argument(base): self.static, "use_cache": True}
        kw_linears = {cache_argument(base): self.static_linears, "use_cache": True}

        def independent_linears(tok: torch.Tensor) -> torch.Tensor:
            with linears:
                return base(input_ids=tok[:, None], **kw_linears).logits[:, -1]

        self.steppers = {  # StaticCache first, as every kvtier benchmark runs its baseline
            "independent": lambda tok: base(input_ids=tok[:, None], **kw).logits[:, -1],
            "independent_kvtier_linears": independent_linears,
            "hogwild": self.hog.step,
            "rerotate": self.rer.step,
        }
        self.times: dict[str, list[float]] = {name: [] for name in METHODS}
        self.diff_rerotate = self.diff_independent = self.diff_linears = 0.0

    def step(self, t: int) -> None:
        """Step t of every method (timed after the warm-up), and the logit checks."""
        logits = {}
        for name in METHODS:
            dt, out = timed(lambda f=self.steppers[name]: f(self.tokens[t]), sync=self.ids.is_cuda)
            logits[name] = out.float()
            if t >= self.warmup:
                self.times[name].append(dt)
        self.diff_rerotate = max(self.diff_rerotate, float((logits["hogwild"] - logits["rerotate"]).abs().max()))
        self.diff_linears = max(self.diff_linears, float((logits["independent"]
                                                          - logits["independent_kvtier_linears"]).abs().max()))
        if self.workers == 1:  # one worker's view is the prompt and its own tokens: the independent sequence
            self.diff_independent = max(self.diff_independent,
                                        float((logits["hogwild"] - logits["independent"]).abs().max()))

    def row(self) -> dict[str, Any]:
        base, n, ids = self.base, self.workers, self.ids
        prompt_bytes = ids.numel() * _per_token(base)
        hog_bytes, rer_bytes = kv_bytes_hogwild(self.hog), kv_bytes_hogwild(self.rer)
        static_bytes = kv_bytes_static(self.static)
        cfg, view = base.config, self.hog.layout.total
        ms = {name: median_ms(t) for name, t in self.times.items()}
        row: dict[str, Any] = {
            "workers": n,
            "view_tokens": view,  # each Hogwild worker's view after the last step: the prompt and every worker's tokens
            "independent": {"step_ms": ms["independent"], "kv_bytes": static_bytes, "prompt_copies": n,
                            "prompt_kv_bytes": n * prompt_bytes, "sequence_tokens": ids.numel() + len(self.tokens)},
            "independent_kvtier_linears": {"step_ms": ms["independent_kvtier_linears"], "kv_bytes": static_bytes,
                                           "prompt_copies": n, "prompt_kv_bytes": n * prompt_bytes},
            "hogwild": {"step_ms": ms["hogwild"], "prefill_s": round(self.prefill_s["hogwild"], 3),
                        "kv_bytes": hog_bytes["total"], "kv_bytes_history": hog_bytes["history"],
                        "kv_bytes_arena": hog_bytes["arena"], "prompt_copies": 1, "prompt_kv_bytes": prompt_bytes,
                        "ratio_vs_independent": _ratio(ms["hogwild"], ms["independent"]),
                        "ratio_vs_independent_kvtier_linears": _ratio(ms["hogwild"],
                                                                      ms["independent_kvtier_linears"]),
                        "kv_bytes_ratio_vs_independent": _ratio(hog_bytes["total"], static_bytes)},
            "rerotate": {"step_ms": ms["rerotate"], "prefill_s": round(self.prefill_s["rerotate"], 3),
                         # the reference's storage: its contiguous prompt block and the same arena
                         "kv_bytes": self.rer.prompt_bytes() + rer_bytes["arena"], "prompt_copies": 1,
                         "prompt_kv_bytes": prompt_bytes,
                         # the N contiguous views one layer rebuilds per step (freed after the layer)
                         "view_bytes_per_layer": 2 * n * view * cfg.num_key_value_heads * cfg.head_dim
                         * base.dtype.itemsize,
                         "ratio_vs_hogwild": _ratio(ms["rerotate"], ms["hogwild"])},
            "max_abs_logit_diff_hogwild_vs_rerotate": self.diff_rerotate,
            "max_abs_logit_diff_independent_vs_kvtier_linears": self.diff_linears,
        }
        if n == 1:
            row["max_abs_logit_diff_hogwild_vs_independent"] = self.diff_independent
        return row


@torch.inference_mode()
def row_costs(base: torch.nn.Module, prompt_kv, workers: list[int], reps: int = 9) -> dict[str, Any]:
    """What N query rows cost the two big operations of a step on this machine, measured alone: one pass of N
    rows through every linear layer of the model (the weights every method reads once per step), by torch's
    F.linear and by kvtier's few-row kernel where it takes the layer (what hogwild's steps run), and the fused
    attention of N query rows over the prompt's KV of every layer, by torch's sdpa and by kvtier's
    `fused_attention` (what hogwild's history costs). Medians of
    `reps`, the row counts taking turns. On a CPU these set how a batched step grows with N, whoever runs it."""
    linears = [m for m in base.modules() if isinstance(m, torch.nn.Linear)]
    device, dtype = prompt_kv[0][0].device, prompt_kv[0][0].dtype
    kv_heads, d = prompt_kv[0][0].shape[1], prompt_kv[0][0].shape[-1]
    group = base.config.num_attention_heads // kv_heads
    times: dict[str, dict[int, list[float]]] = {name: {n: [] for n in workers}
                                                for name in ROW_COSTS}
    scale = prompt_kv[0][0].shape[-1] ** -0.5
    xs = {n: [torch.randn(n, m.in_features, device=device, dtype=dtype) for m in linears] for n in workers}
    # GQA folded as hogwild folds it: a KV head's query heads and the N workers are the query rows of one call
    qs = {n: torch.randn(1, kv_heads, group * n, d, device=device, dtype=dtype) for n in workers}
    for _ in range(reps):
        for n in workers:
            times["linear"][n].append(timed(lambda: [F.linear(x, m.weight) for x, m in zip(xs[n], linears)],
                                            sync=device.type == "cuda")[0])
            times["linear_kvtier"][n].append(timed(lambda: [few_rows_linear(x, m.weight)
                                                            for x, m in zip(xs[n], linears)],
                                                   sync=device.type == "cuda")[0])
            times["attention"][n].append(timed(lambda: [F.scaled_dot_product_attention(qs[n], k, v)
                                                        for k, v in prompt_kv], sync=device.type == "cuda")[0])
            times["attention_kvtier"][n].append(timed(lambda: [fused_attention(qs[n], k, v, scale)
                                                               for k, v in prompt_kv], sync=device.type == "cuda")[0])
    out: dict[str, Any] = {}
    for name, by_n in times.items():
        ms = {n: median_ms(t) for n, t in by_n.items()}
        one = ms.get(1)
        out[name] = {str(n): {"ms": ms[n], "x_one_row": _ratio(ms[n], one) if one else None} for n in workers}
    out["what"] = ("per step, measured alone: 'linear' = N rows through every nn.Linear of the model once; "
                   "'linear_kvtier' = the same through kvtier's few-row C kernel where it takes the layer "
                   "(FewRowLinears; F.linear elsewhere); "
                   "'attention' = sdpa of N query rows (x the GQA group) over every layer's prompt KV; "
                   "'attention_kvtier' = the same through kvtier's fused_attention, as hogwild's history reads "
                   "the prompt (on a CPU in float32: kvtier's C kernel, every key read once for all rows)")
    return out


def _ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else float("nan")


@torch.inference_mode()
def run(workers: list[int], prompt: int, steps: int, warmup: int, shape: dict[str, int], device: str = "cpu",
        dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Every worker count's caches are built first; then at each step every worker count and every method takes
    its turn, so that a change in the machine's speed touches all of them alike (ratios across worker counts
    included)."""
    base = speed_model(shape, prompt + max(workers) * (warmup + steps) + 8, device, dtype)
    kv_model = copy.deepcopy(base)  # switched to kvtier attention by the Hogwild caches; `base` keeps sdpa
    ids = torch.randint(3, shape["vocab"], (prompt,), generator=torch.Generator().manual_seed(prompt)).to(device)
    prefill_s, (prompt_kv, _) = timed(lambda: prefill_prompt(base, ids), sync=ids.is_cuda)
    costs = row_costs(base, prompt_kv, workers)
    with contextlib.ExitStack() as stack:
        counts = [WorkerCount(base, kv_model, ids, prompt_kv, n, steps, warmup, stack)
                  for n in tqdm(workers, desc="prefill")]
        del prompt_kv
        for t in tqdm(range(warmup + steps), desc="steps"):
            for count in counts:
                count.step(t)
        rows = [count.row() for count in counts]
    one = next((r for r in rows if r["workers"] == 1), None)
    for r in rows:
        r["hogwild"]["ratio_vs_one_worker"] = _ratio(r["hogwild"]["step_ms"], one["hogwild"]["step_ms"]) if one \
            else None
    return {
        "config": {**shape, "device": device, "dtype": str(dtype).removeprefix("torch."), "prompt_tokens": prompt,
                   "timed_steps": steps, "warmup_steps": warmup, "workers": workers,
                   "torch_threads": torch.get_num_threads(), "independent_prefill_s": round(prefill_s, 3),
                   "timing": "median step time (every worker advances one token); every worker count and method "
                             "takes its turn at each step"},
        "results": rows,
        "row_costs": costs,
        "targets": targets(rows),
    }


def targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The targets at N = 4 (met: None where N = 1 or 4 was not run)."""
    four = next((r for r in rows if r["workers"] == TARGET_WORKERS), None)
    vs_one = four["hogwild"]["ratio_vs_one_worker"] if four else None
    vs_ind = four["hogwild"]["ratio_vs_independent"] if four else None
    return {
        "hogwild_step_vs_one_worker": {"target_at_most": TARGET_VS_ONE, "measured": vs_one,
                                       "met": None if vs_one is None else vs_one <= TARGET_VS_ONE},
        "hogwild_step_vs_independent": {"target_at_most": TARGET_VS_INDEPENDENT, "measured": vs_ind,
                                        "met": None if vs_ind is None else vs_ind <= TARGET_VS_INDEPENDENT},
        "prompt_kv_held_once": {"met": all(r["hogwild"]["prompt_copies"] == 1
                                           and r["hogwild"]["kv_bytes_history"] < 2 * r["hogwild"]["prompt_kv_bytes"]
                                           for r in rows)},
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["results"]
    xs = [r["workers"] for r in rows]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name in METHODS:
        ax.plot(xs, [r[name]["step_ms"] for r in rows], marker="o", label=name)
        bx.plot(xs, [r[name]["kv_bytes"] / 2**20 for r in rows], marker="o", label=name)
    ax.set_yscale("log")
    bx.set_ylim(bottom=0)
    for a, label in ((ax, "step, all workers one token (ms)"), (bx, "KV held (MiB)")):
        a.set_xscale("log", base=2)
        a.set_xticks(xs, [str(x) for x in xs])
        a.set_xlabel("workers")
        a.set_ylabel(label)
        a.legend(fontsize=8)
    m, c = result["machine"], result["config"]
    where = m["gpu"] if c["device"].startswith("cuda") and m.get("gpu") else f"{m['cpu']}, {c['torch_threads']} thread"
    fig.suptitle(f"{c['shape']}, prompt {c['prompt_tokens']} tokens, {c['dtype']} ({where})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="kvtier bench hogwild", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=positive_int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--prompt", type=positive_int, default=4096, help="tokens of the shared prompt")
    p.add_argument("--steps", type=positive_int, default=32, help="timed decode steps per worker count")
    p.add_argument("--warmup", type=non_negative_int, default=3, help="untimed decode steps before them")
    p.add_argument("--shape", choices=sorted(SHAPES), default="attention-heavy")
    p.add_argument("--layers", type=positive_int, help="override the shape's layer count")
    p.add_argument("--kv-heads", type=positive_int, help="override the shape's KV heads (query heads follow)")
    p.add_argument("--head-dim", type=positive_int, help="override the shape's head dimension")
    p.add_argument("--intermediate", type=positive_int, help="override the shape's MLP width")
    p.add_argument("--device", type=device_name, default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's choice)")
    add_out_argument(p)
    p.add_argument("--name", type=result_name,
                   help="result file name (default: hogwild on cpu, hogwild-<shape>-cuda on a GPU)")
    p.add_argument("--no-plot", action="store_true")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    shape = shape_from_args(a)
    dtype = getattr(torch, a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32"))
    result = run(sorted(set(a.workers)), a.prompt, a.steps, a.warmup, shape, a.device, dtype)
    result["config"]["shape"] = a.shape
    name = a.name or ("hogwild" if a.device == "cpu" else f"hogwild-{a.shape}-cuda")
    path = write_result(name, result, a.out)
    if not a.no_plot:
        result["machine"] = json.loads(path.read_text())["machine"]
        plot(result, path.with_suffix(".png"))
    for r in result["results"]:
        h = r["hogwild"]
        print(f"N={r['workers']:<2} step ms: independent {r['independent']['step_ms']:8.2f}"
              f"  (kvtier linears {r['independent_kvtier_linears']['step_ms']:8.2f})  hogwild {h['step_ms']:8.2f}"
              f"  rerotate {r['rerotate']['step_ms']:8.2f}  | hogwild x1-worker {h['ratio_vs_one_worker']}"
              f"  x independent {h['ratio_vs_independent']} ({h['ratio_vs_independent_kvtier_linears']})"
              f"  rerotate x hogwild {r['rerotate']['ratio_vs_hogwild']}"
              f"  | KV MiB {r['independent']['kv_bytes'] / 2**20:.1f} vs {h['kv_bytes'] / 2**20:.1f}")
    for name in ROW_COSTS:
        costs = result["row_costs"][name]
        print(f"{name} alone, ms by rows: " + "  ".join(f"{n}: {c['ms']:.2f} (x{c['x_one_row']})" for n, c in costs.items()))
    print_targets(result["targets"])
    print(f"wrote {path}")
