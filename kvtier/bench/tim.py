"""`kvtier bench tim`: a long TIM thread on a model with a 4k context window, with and without pruning, and
pruning by moving keys against pruning by re-encoding.

The thread is synthetic and deterministic, the realistic TIM case (arXiv 2507.16784): one reasoning task whose
subtask list holds `parts` top-level tasks; each of them has its own list of `--leaves` leaf tasks (depth 3),
and every leaf calls the built-in calculator (the runtime runs it and writes its result into the generation).
The work happens in the leaf lists, which finish; only the top-level tasks' thoughts and conclusions
accumulate. Parts are added until the thread holds at least `--tokens` generated tokens (default 50000); the
model never sees more than the prompt and what the cache holds.

The model is a random-weight Llama whose config says `max_position_embeddings=4096` (the 4k context window),
fp32, by default with the layer shape of Qwen2.5-0.5B (14 query and 2 KV heads of 64, hidden 896, MLP 4864) and
2 layers, its vocabulary a byte-level BPE trained at run time on a fixed sample of the thread. The layer shape
sets how much of a step is attention over the KV held: at 4200 tokens a layer reads 7% as many KV values as
weights here (Llama-3-8B: 4%), against 137% for the earlier default (4 query and 2 KV heads of 64, hidden 256,
MLP 768: `--layers 4 --heads 4 --intermediate 768`), a shape on which a step mostly measures attention. Its logits are ignored: `kvtier.tim.generate` runs with
`choose` returning the scripted tokens (`constrain=False`) and a short prompt (`prompt_ids`), so each method
writes the same thread, token for token, into its own KVTierCache (default options: every token on the
device), one forward per generated token:

  shift     pruning with the default buffer (`--prune-buffer`, 2 finished lists kept): a list pushed out of
            the buffer leaves the cache by `KVTierCache.remove_span`, the tokens after it moved left by one
            RoPE turn of their keys
  reencode  the same buffer, `reencode=True`: the cache is cropped at the list and the kept suffix encoded
            again at its new positions (TIM's paper formulation)
  none      no pruning (a buffer larger than the thread has lists): the cache holds every token, and its
            positions run past the window

Measured per method: generated and injected tokens, peak and final KV tokens held, the largest position
written (the cache is compacted, so it is the peak held less one) and whether it stayed below the window,
share pruned, positions reused, device KV bytes at the peak (per-layer peak occupancy of the device pools)
and the pools' allocated bytes; the step time at the start and at the end of the thread (median of the
first and last `--edge-steps` steps, default 500; a step is the time between two calls of `choose`: the
tracker, any pruning or tool call, and the forward), and from the first removal on (the same count of steps:
the start of the pruned regime); and the time pruning takes, from the start of the cache
call (`remove_span`, or `crop` for reencode) to the runtime's `Pruned` event (for reencode, the re-encoding
forward included). Each method's text is checked against the script (with the calculator's results), and
reencode's kept tokens against shift's. The methods run one after the other (each over the whole thread).

Targets (the issue's): the run finishes past the context window with the peak KV held at most 0.3x the
unpruned run's; the pruned (shift) step at the end within 1.2x of its step at the start.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import transformers as tf
from tqdm import tqdm

from ..cache import KVTierCache
from ..tim import Pruned, calculator, generate
from ..tim.schema import dump_json
from ..tim.tools import calculate
from .common import add_out_argument, median_ms, non_negative_int, positive_int, print_targets, write_result
from .speed import speed_model

METHODS = ("shift", "reencode", "none")
WINDOW = 4096  # the model's max_position_embeddings: the context window the thread runs past
TARGET_PEAK_VS_NONE = 0.3  # peak KV held, shift / none, at most
TARGET_END_VS_START = 1.2  # shift's step at the end / at the start, at most
# Qwen2.5-0.5B's layer shape (hidden 896), 2 layers: a step's weights and KV in a real model's proportions.
DEFAULT_SHAPE = dict(layers=2, heads=14, kv_heads=2, head_dim=64, intermediate=4864)
NO_PRUNING = 10**9  # a prune buffer no thread fills
RESULT_SPLIT = ', "tool_result": null'  # the script stops where the runtime writes a tool's result
PROMPT = "Problem: show that the claim holds in every part, checking each case with the calculator.\n"
SERIES_EVERY = 250  # generated tokens between two points of the series kept in the JSON


# ------------------------------------------------------------------------------------------- the thread
def leaf(part: int, case: int, seed: int) -> dict[str, Any]:
    """Case `case` of top-level task `part`: a thought, one calculator call, a conclusion quoting its result."""
    rng = random.Random(f"{seed}-{part}-{case}")
    a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(1, 999)
    expression = f"{a} * {b} + {c}"
    verb = rng.choice(("check that", "confirm that", "verify that", "work out whether"))
    return {"thought": f"case {case + 1} of part {part + 1}: {verb} {a} times {b} plus {c} matches the table",
            "tooluse": {"tool_name": "calculator", "parameters": {"expression": expression},
                        "tool_result": None},
            "conclusion": f"case {case + 1} holds, the value is {calculate(expression)}"}


def thread(parts: int, leaves: int, seed: int = 0) -> dict[str, Any]:
    """The reasoning task with `parts` top-level tasks of `leaves` leaf tasks each (tool results left None)."""
    tasks = [{"thought": f"part {i + 1}: check its {leaves} cases",
              "subtasks": [leaf(i, j, seed) for j in range(leaves)],
              "conclusion": f"part {i + 1} holds"} for i in range(parts)]
    return {"reasoning": {"thought": "split the claim into parts and check every case of each part",
                          "subtasks": tasks, "conclusion": f"all {parts} parts hold"},
            "answer": f"the claim holds in all {parts * leaves} cases"}


def script(tokenizer, doc: dict[str, Any]) -> list[int]:
    """The tokens the model writes for `doc`: its JSON text without the tool results (the runtime writes them),
    tokenized piece by piece so that a piece ends where a tool's parameters close."""
    ids: list[int] = []
    for piece in dump_json(doc).split(RESULT_SPLIT):
        ids += tokenizer.encode(piece, add_special_tokens=False)
    return ids


def with_results(doc: dict[str, Any]) -> str:
    """The thread's full text as the runtime writes it: every tool result filled in by the calculator."""
    def fill(task: dict[str, Any]) -> None:
        use = task.get("tooluse")
        if use is not None:
            use["tool_result"] = calculate(use["parameters"]["expression"])
        for sub in task.get("subtasks", ()):
            fill(sub)

    doc = json.loads(dump_json(doc))
    fill(doc["reasoning"])
    return dump_json(doc)


def sized_thread(tokenizer, tokens: int, leaves: int, seed: int = 0) -> tuple[dict[str, Any], list[int]]:
    """The thread with the fewest parts whose script holds at least `tokens` generated tokens, and its script."""
    per_part = len(script(tokenizer, thread(2, leaves, seed))) / 2
    parts = max(1, int(tokens / per_part))
    ids = script(tokenizer, thread(parts, leaves, seed))
    while len(ids) < tokens:
        parts += 1
        ids = script(tokenizer, thread(parts, leaves, seed))
    while parts > 1 and len(shorter := script(tokenizer, thread(parts - 1, leaves, seed))) >= tokens:
        parts, ids = parts - 1, shorter
    return thread(parts, leaves, seed), ids


def build_tokenizer(vocab_size: int = 512) -> tf.PreTrainedTokenizerFast:
    """A byte-level BPE trained offline, at run time, on a fixed sample of the thread and the prompt."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([PROMPT, with_results(thread(4, 8, seed=12345))], trainer)
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                      unk_token="<unk>")


# ------------------------------------------------------------------------------------------ measuring
class TimedCache(KVTierCache):
    """A KVTierCache that notes when each removal starts (`remove_span`; `crop`, which re-encoding starts with)
    and how long that call took. For this benchmark only."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.removal_started = 0.0
        self.call_s: list[float] = []

    def remove_span(self, start: int, end: int, **kwargs: Any) -> None:
        self.removal_started = time.perf_counter()
        super().remove_span(start, end, **kwargs)
        self.call_s.append(time.perf_counter() - self.removal_started)

    def crop(self, max_length: int) -> None:
        self.removal_started = time.perf_counter()
        super().crop(max_length)
        self.call_s.append(time.perf_counter() - self.removal_started)


class Stepper:
    """`choose`: the next scripted token, whatever the logits; notes the time of each call and the tokens the
    cache holds then. Also the `on_event` callback, timing each removal up to the runtime's `Pruned` event."""

    def __init__(self, ids: list[int], cache: TimedCache, bar: tqdm):
        self.ids, self.cache, self.bar = ids, cache, bar
        self.at = 0
        self.stamps: list[float] = []
        self.held: list[int] = []  # tokens in the cache when each token was chosen (prompt included)
        self.prune_s: list[float] = []
        self.pruned_at: list[int] = []  # generated tokens when each removal happened

    def __call__(self, logits: torch.Tensor) -> int:
        self.stamps.append(time.perf_counter())
        self.held.append(self.cache.get_seq_length())
        self.bar.update(1)
        if self.at == len(self.ids):
            raise RuntimeError("the script ended before the thread: the tracker did not see its end")
        self.at += 1
        return self.ids[self.at - 1]

    def on_event(self, event: Any) -> None:
        if isinstance(event, Pruned):
            self.prune_s.append(time.perf_counter() - self.cache.removal_started)
            self.pruned_at.append(self.at)

    def step_s(self, ended: float) -> list[float]:
        """Each generated token's step: from its `choose` to the next (the last one: to the end of the run)."""
        stamps = self.stamps + [ended]
        return [b - a for a, b in zip(stamps, stamps[1:])]


def _per_token_layer_bytes(model: torch.nn.Module) -> int:
    cfg = model.config
    return 2 * cfg.num_key_value_heads * cfg.head_dim * model.dtype.itemsize


def run_method(model: torch.nn.Module, tokenizer, method: str, ids: list[int], prompt_ids: list[int],
               expected_text: str, prune_buffer: int, edge: int) -> tuple[dict[str, Any], dict[str, list]]:
    """One method over the whole script: its numbers, and its per-step series (KV held, step seconds)."""
    cache = TimedCache.for_model(model)
    with tqdm(total=len(ids), desc=method, unit="tok", file=sys.stderr, mininterval=2.0) as bar:
        stepper = Stepper(ids, cache, bar)
        try:
            result = generate(model, tokenizer, "", tools=[calculator], constrain=False, choose=stepper,
                              prompt_ids=prompt_ids, cache=cache, on_event=stepper.on_event,
                              prune_buffer=NO_PRUNING if method == "none" else prune_buffer,
                              reencode=method == "reencode", max_new_tokens=len(ids) + 1)
            ended = time.perf_counter()
            stats = cache.stats()
            pools = cache.tiers.device_pools.values()
            arena_bytes = sum(p.allocated_bytes for p in pools)
        finally:
            cache.close()
    s = result.stats
    steps = stepper.step_s(ended)
    start_ms, end_ms = median_ms(steps[:edge]), median_ms(steps[-edge:])
    first = stepper.pruned_at[0] if stepper.pruned_at else None
    pruned_ms = median_ms(steps[first:first + edge]) if first is not None else None
    layers = len(cache.tiers.device_pools)
    row: dict[str, Any] = {
        "stopped": result.stopped,
        "text_matches_script": result.text == expected_text and result.stats.generated_tokens == len(ids),
        "generated_tokens": s.generated_tokens,
        "injected_tokens": s.injected_tokens,
        "prompt_tokens": s.prompt_tokens,
        "tool_calls": s.tool_calls,
        "peak_kv_tokens": s.peak_kv_tokens,
        "final_kv_tokens": s.final_kv_tokens,
        "max_position": s.peak_kv_tokens - 1,
        "within_window": s.peak_kv_tokens <= WINDOW,
        "share_pruned": round(s.share_pruned, 4),
        "pruned_tokens": s.pruned_tokens,
        "removals": len(result.pruned),
        "positions_reused": s.positions_reused,
        "reencoded_tokens": s.reencoded_tokens,
        "device_kv_bytes_at_peak": stats.device.peak_tokens * _per_token_layer_bytes(model) * layers,
        "device_arena_bytes": arena_bytes,
        "step_ms_start": start_ms,
        "step_ms_end": end_ms,
        "end_vs_start": _ratio(end_ms, start_ms),
        "first_removal_at": first,  # generated tokens
        "step_ms_after_first_removal": pruned_ms,  # median of the edge_steps steps from the first removal on
        "end_vs_after_first_removal": _ratio(end_ms, pruned_ms),
        "step_ms_mean": round(1000 * statistics.fmean(steps), 3),
        "prune_s_total": round(sum(stepper.prune_s), 4),
        "prune_ms_per_removal": median_ms(stepper.prune_s) if stepper.prune_s else None,
        "cache_call_ms_per_removal": median_ms(cache.call_s) if cache.call_s else None,
        "seconds": round(s.seconds, 2),
    }
    return row, {"held": stepper.held, "step_s": steps, "kept_ids": result.kept_ids}


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def rolling_median(values: list[float], width: int) -> list[float]:
    """The median of each `width` consecutive values, one per value from the `width`-th on."""
    out, window = [], []
    for i, v in enumerate(values):
        window.append(v)
        if i >= width:
            window.pop(0)
        if i >= width - 1:
            out.append(statistics.median(window))
    return out


def run(tokens: int, leaves: int, methods: list[str], prune_buffer: int, shape: dict[str, int],
        edge: int = 500) -> tuple[dict[str, Any], dict[str, dict[str, list]]]:
    """Every method over the same scripted thread; the result and each method's per-step series. Not under
    `torch.inference_mode()`: `generate` runs its forwards under `no_grad`, as a user's call does."""
    tokenizer = build_tokenizer()
    doc, ids = sized_thread(tokenizer, tokens, leaves)
    expected = with_results(doc)
    prompt_ids = tokenizer.encode(PROMPT, add_special_tokens=False)
    prompt_ids = [tokenizer.bos_token_id, *prompt_ids]
    shape = {**shape, "vocab": len(tokenizer)}
    model = speed_model(shape, WINDOW)
    rows, series = {}, {}
    for method in methods:
        rows[method], series[method] = run_method(model, tokenizer, method, ids, prompt_ids, expected,
                                                  prune_buffer, edge)
    if "shift" in rows and "reencode" in rows:
        rows["reencode"]["kept_ids_match_shift"] = series["reencode"]["kept_ids"] == series["shift"]["kept_ids"]
    parts = len(doc["reasoning"]["subtasks"])
    result = {
        "config": {**shape, "hidden": shape["heads"] * shape["head_dim"], "dtype": "float32", "device": "cpu",
                   "max_position_embeddings": WINDOW, "tokens_asked": tokens, "script_tokens": len(ids),
                   "parts": parts, "leaves": leaves, "lists": parts + 1, "prune_buffer": prune_buffer,
                   "edge_steps": edge, "methods": methods, "torch_threads": torch.get_num_threads(),
                   "cache": "KVTierCache defaults (exact mode, no budgets: every token on the device)",
                   "timing": "a step is the time between two calls of choose (tracker, pruning, tool call, "
                             "forward); start/end: median of the first/last edge_steps steps; the methods run "
                             "one after the other"},
        "results": rows,
        "ratios": ratios(rows),
        "series": {m: _series(s) for m, s in series.items()},
    }
    result["targets"] = targets(rows, result["ratios"])
    return result, series


def _series(s: dict[str, list]) -> dict[str, list]:
    """Every SERIES_EVERY-th generated token: the KV held and the median step (ms) of the steps since the last."""
    held, steps = s["held"], s["step_s"]
    at = list(range(0, len(held), SERIES_EVERY))
    return {"generated": at, "kv_tokens": [held[i] for i in at],
            "step_ms": [median_ms(steps[i:i + SERIES_EVERY]) for i in at]}


def ratios(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    def get(method: str, key: str):
        return rows[method][key] if method in rows else None

    return {
        "peak_kv_shift_vs_none": _ratio(get("shift", "peak_kv_tokens"), get("none", "peak_kv_tokens")),
        "peak_kv_reencode_vs_none": _ratio(get("reencode", "peak_kv_tokens"), get("none", "peak_kv_tokens")),
        "end_vs_start": {m: r["end_vs_start"] for m, r in rows.items()},
        "end_vs_after_first_removal": {m: r["end_vs_after_first_removal"] for m, r in rows.items()
                                       if r["end_vs_after_first_removal"] is not None},
        "prune_time_reencode_vs_shift": _ratio(get("reencode", "prune_s_total"), get("shift", "prune_s_total")),
        "step_end_shift_vs_none": _ratio(get("shift", "step_ms_end"), get("none", "step_ms_end")),
    }


def targets(rows: dict[str, dict[str, Any]], r: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets (met: None where a method they need was not run)."""
    none = rows.get("none")
    past = None if none is None else none["max_position"] >= WINDOW and none["stopped"] == "answer"
    peak = r["peak_kv_shift_vs_none"]
    end = r["end_vs_start"].get("shift")
    return {
        "finishes_past_the_window": {"measured_max_position": None if none is None else none["max_position"],
                                     "window": WINDOW, "met": past},
        "peak_kv_shift_vs_none": {"target_at_most": TARGET_PEAK_VS_NONE, "measured": peak,
                                  "met": None if peak is None else peak <= TARGET_PEAK_VS_NONE},
        "shift_step_end_vs_start": {"target_at_most": TARGET_END_VS_START, "measured": end,
                                    "met": None if end is None else end <= TARGET_END_VS_START},
        "texts_match_script": {"met": all(row["text_matches_script"] for row in rows.values())},
    }


def plot(result: dict[str, Any], series: dict[str, dict[str, list]], path: Path, width: int = 250) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    styles = {"shift": "-", "reencode": "--", "none": "-"}  # shift and reencode hold the same tokens
    for method, s in series.items():
        ax.plot(range(len(s["held"])), s["held"], styles[method], label=method, linewidth=1)
        smooth = rolling_median(s["step_s"], width)
        bx.plot(range(width - 1, width - 1 + len(smooth)), [1000 * v for v in smooth], label=method, linewidth=1)
    ax.axhline(WINDOW, color="grey", linestyle=":", linewidth=1, label=f"context window ({WINDOW})")
    ax.set_ylabel("KV tokens held")
    bx.set_ylabel(f"step (ms, rolling median of {width})")
    for a in (ax, bx):
        a.set_yscale("log")
        a.set_xlabel("generated tokens")
        a.legend(fontsize=8)
    m, c = result["machine"], result["config"]
    fig.suptitle(f"TIM thread of {c['script_tokens']} generated tokens ({c['parts']} parts x {c['leaves']} leaves), "
                 f"Llama {c['layers']} layers, hidden {c['hidden']}, window {WINDOW}, fp32 "
                 f"({m['cpu']}, {c['torch_threads']} thread)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="kvtier bench tim", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=positive_int, default=50000, help="generated tokens the thread holds at least")
    p.add_argument("--leaves", type=positive_int, default=10, help="leaf tasks in each top-level task's list")
    p.add_argument("--prune-buffer", type=non_negative_int, default=2,
                   help="finished lists kept in the cache by the pruning methods (0: each leaves as it closes)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--edge-steps", type=positive_int, default=500,
                   help="steps at the start and at the end whose median is the step time there")
    p.add_argument("--layers", type=positive_int, default=DEFAULT_SHAPE["layers"])
    p.add_argument("--heads", type=positive_int, default=DEFAULT_SHAPE["heads"], help="query heads")
    p.add_argument("--kv-heads", type=positive_int, default=DEFAULT_SHAPE["kv_heads"])
    p.add_argument("--head-dim", type=positive_int, default=DEFAULT_SHAPE["head_dim"])
    p.add_argument("--intermediate", type=positive_int, default=DEFAULT_SHAPE["intermediate"], help="MLP width")
    p.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads (default 1)")
    add_out_argument(p)
    p.add_argument("--no-plot", action="store_true")
    a = p.parse_args(argv)
    if a.heads % a.kv_heads:
        p.error(f"--heads {a.heads} must be a multiple of --kv-heads {a.kv_heads}")
    torch.set_num_threads(a.threads)
    shape = dict(layers=a.layers, heads=a.heads, kv_heads=a.kv_heads, head_dim=a.head_dim,
                 intermediate=a.intermediate)
    methods = [m for m in METHODS if m in a.methods]
    result, series = run(a.tokens, a.leaves, methods, a.prune_buffer, shape, a.edge_steps)
    path = write_result("tim", result, a.out)
    if not a.no_plot:
        result["machine"] = json.loads(path.read_text())["machine"]
        plot(result, series, path.with_suffix(".png"))
    for method, r in result["results"].items():
        print(f"{method:<8} peak KV {r['peak_kv_tokens']:>6}  final {r['final_kv_tokens']:>6}  max position "
              f"{r['max_position']:>6}  pruned {r['share_pruned']:.1%}  step ms {r['step_ms_start']:.2f} -> "
              f"{r['step_ms_end']:.2f} ({r['end_vs_start']}x)  pruning {r['prune_s_total']:.2f} s  "
              f"text ok: {r['text_matches_script']}")
    print_targets(result["targets"])
    print(f"wrote {path}")
