"""`kvtier bench quality`: retrieval accuracy and logit error of sparse decoding against the full cache.

For each task (passkey, multi-key needle-in-a-haystack on generated and on natural text, variable
tracking) and each budget (a fraction of the context), every method answers the same prompts:

  full            transformers' DynamicCache (the reference)
  kvtier          sparse mode: chunks planned from the measured attention skew, Quest-bound selection
  kvtier-shared   kvtier with one selection shared by the KV heads of a layer (I/O-bounded)
  quest           fixed 16-token pages, Quest-bound selection (a fixed-page Quest-style selector)
  streamingllm    attention sinks + the newest tokens within the budget
  kvtier+refine   kvtier with adaptive split/merge of chunks during decoding
  kvtier+lossy    kvtier with most chunks on disk, the low-importance ones stored as int8

The prompt minus its last token is prefilled (exactly, as every method does); the last prompt token and
the answer are then decoded step by step, so every answer token is predicted under the method's sparse
attention. Answers are scored teacher-forced: a prompt counts as solved when every answer token is the
argmax (what greedy decoding would produce); the logit error is the KL divergence of the method's
next-token distribution from the full cache's, and the max absolute logit difference, over the answer.
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import transformers as tf
from tqdm import tqdm

from ..cache import KVTierCache, cache_argument
from ..session import LAYOUT_OPTIONS
from .common import add_out_argument, positive_int, result_name, share, text_dir, write_result
from .tasks import TASKS, Example, decode_ids, make_example

DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "checkpoints" / "retrieval-llama"
METHODS = ("kvtier", "kvtier-shared", "quest", "streamingllm", "kvtier+refine", "kvtier+lossy")
_SHARED = dict(mode="sparse", sink_tokens=4, recent_window=8, observation_window=32)
# method -> (cache options, selector); methods with equal options share one prefill
CACHES = {
    "adaptive": dict(**_SHARED, chunk_size=32, min_chunk_size=8, max_chunk_size=128),
    "pages": dict(**_SHARED, chunk_size=16, adaptive_chunks=False),
    "refine": dict(**_SHARED, chunk_size=32, min_chunk_size=8, max_chunk_size=128, refine=True, refine_every=2),
    "lossy": dict(**_SHARED, chunk_size=32, min_chunk_size=8, max_chunk_size=128, lossy_disk=True, host_budget=0),
}
# method -> (prefilled cache, selector, shared selection)
METHOD_CACHE = {"kvtier": ("adaptive", "quest_bound", False), "kvtier-shared": ("adaptive", "quest_bound", True),
                "quest": ("pages", "quest_bound", False), "streamingllm": ("pages", "recency", False),
                "kvtier+refine": ("refine", "quest_bound", False), "kvtier+lossy": ("lossy", "quest_bound", False)}


def load_model(path: str | Path) -> tuple[torch.nn.Module, Any]:
    """The model (fp32) and its tokenizer, or None for a model of the task vocabulary; one clear line if it fails."""
    try:
        model = tf.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    except Exception as exc:  # noqa: BLE001 - whatever transformers raises, the user needs one line
        hint = " (train it with scripts/train_retrieval_model.py, or pass --model)" if Path(path) == DEFAULT_MODEL else ""
        raise SystemExit(f"kvtier bench quality: cannot load model {str(path)!r}{hint}: {exc}") from None
    try:
        tokenizer = tf.AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, TypeError):
        tokenizer = None  # a task-vocabulary model without a tokenizer
    if tokenizer is not None and _speaks_task_ids(tokenizer):
        tokenizer = None  # the retrieval checkpoint's own tokenizer: its ids are the task ids, feed them as they are
    return model, tokenizer


def _speaks_task_ids(tokenizer) -> bool:
    """Whether the tokenizer's text for task ids encodes back to the same ids (the retrieval checkpoint's does)."""
    ex = make_example("niah_multikey", 300, random.Random(0))
    ids = list(ex.prompt_ids) + list(ex.answer_ids)
    try:
        return tokenizer(tokenizer.decode(ids), add_special_tokens=False).input_ids == ids
    except Exception:  # noqa: BLE001 - a tokenizer of another vocabulary may refuse foreign ids
        return False


def encode_example(ex: Example, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt and answer ids for this model: task ids as they are, or re-tokenized text."""
    if tokenizer is None:
        return torch.tensor([ex.prompt_ids]), torch.tensor(ex.answer_ids)
    prompt = tokenizer(decode_ids(ex.prompt_ids), return_tensors="pt").input_ids
    answer = tokenizer(decode_ids(ex.answer_ids[:-1]), add_special_tokens=False, return_tensors="pt").input_ids[0]
    return prompt, answer


@torch.inference_mode()
def prefill(model, cache, prompt: torch.Tensor) -> None:
    """Everything but the last prompt token: that one is decoded like the answer."""
    model(input_ids=prompt[:, :-1], use_cache=True, **{cache_argument(model): cache})


@torch.inference_mode()
def answer_logits(model, cache, prompt: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """Logits predicting each answer token, decoded one step at a time (teacher-forced): [len(answer), V]."""
    kw = {cache_argument(model): cache}
    feed = torch.cat([prompt[0, -1:], answer[:-1]])
    return torch.stack([model(input_ids=tok.view(1, 1), use_cache=True, **kw).logits[0, -1] for tok in feed]).float()


def sparse_logits(model, store: Path, prompt: torch.Tensor, answer: torch.Tensor, budget: float,
                  selector: str, shared: bool, options: dict[str, Any]) -> torch.Tensor:
    """Answer logits at one budget, from the saved prefill reopened fresh (every budget sees the same cache).

    options: the method's cache options; the runtime ones (mode, budgets, refine, ...) are given again, as a
    store never decides them, and the chunking ones come from the store."""
    runtime = {k: v for k, v in options.items() if k not in LAYOUT_OPTIONS}
    with KVTierCache.open(store, model, **{**runtime, "sparse_budget": budget, "selector": selector,
                                            "shared_selection": shared}) as cache:
        return answer_logits(model, cache, prompt, answer)


def _score(logits: torch.Tensor, answer: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    solved = bool((logits.argmax(-1) == answer).all())
    logp, ref_logp = logits.log_softmax(-1), ref.log_softmax(-1)
    kl = float((ref_logp.exp() * (ref_logp - logp)).sum(-1).mean())
    return {"solved": solved, "kl": max(kl, 0.0), "max_abs": float((logits - ref).abs().max())}


def run(model_path: str | Path, context: int, examples: int, budgets: list[float], tasks: list[str],
        data_dir: str | None, methods: list[str], seed: int = 0) -> dict[str, Any]:
    model, tokenizer = load_model(model_path)
    rng = random.Random(seed)
    rows: dict[str, dict[str, Any]] = {}
    for task in tasks:
        stats = {"full": {"solved": 0}}
        stats.update({m: {str(b): {"solved": 0, "kl": 0.0, "max_abs": 0.0} for b in budgets} for m in methods})
        source = None
        for _ in tqdm(range(examples), desc=task):
            ex = make_example(task, context, rng, data_dir)
            source = ex.haystack_source
            prompt, answer = encode_example(ex, tokenizer)
            full = tf.DynamicCache()
            prefill(model, full, prompt)
            ref = answer_logits(model, full, prompt, answer)
            stats["full"]["solved"] += int(bool((ref.argmax(-1) == answer).all()))
            needed = {METHOD_CACHE[m][0] for m in methods}
            for cache_name in needed:
                options = dict(CACHES[cache_name])
                if cache_name == "lossy":
                    options["device_budget"] = max(64 + options["recent_window"] + options["sink_tokens"] + 128,
                                                   int(0.3 * context))
                store = Path(tempfile.mkdtemp(prefix="kvtier-quality-")) / cache_name
                with KVTierCache.for_model(model, store_path=store, **options) as cache:
                    prefill(model, cache, prompt)
                    cache.save()
                for m in methods:
                    if METHOD_CACHE[m][0] != cache_name:
                        continue
                    for b in budgets:
                        logits = sparse_logits(model, store, prompt, answer, b, *METHOD_CACHE[m][1:], options)
                        s = _score(logits, answer, ref)
                        cell = stats[m][str(b)]
                        cell["solved"] += int(s["solved"])
                        cell["kl"] += s["kl"] / examples
                        cell["max_abs"] = max(cell["max_abs"], s["max_abs"])
                shutil.rmtree(store.parent, ignore_errors=True)
        rows[task] = {"haystack": source, "full_accuracy": stats["full"]["solved"] / examples,
                      **{m: {b: {"accuracy": c["solved"] / examples, "mean_kl": round(c["kl"], 6),
                                 "max_abs_logit_diff": round(c["max_abs"], 4)} for b, c in stats[m].items()}
                         for m in methods}}
    return {"config": {"model": str(model_path), "context": context, "examples_per_task": examples,
                       "budgets": budgets, "methods": methods, "caches": {m: CACHES[METHOD_CACHE[m][0]] for m in methods},
                       "seed": seed, "tokenizer": None if tokenizer is None else type(tokenizer).__name__},
            "results": rows}


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(result["results"])
    budgets = result["config"]["budgets"]
    fig, axes = plt.subplots(2, len(tasks), figsize=(4 * len(tasks), 6.5), squeeze=False)
    for j, task in enumerate(tasks):
        row = result["results"][task]
        for m in result["config"]["methods"]:
            axes[0][j].plot(budgets, [row[m][str(b)]["accuracy"] for b in budgets], marker="o", label=m)
            axes[1][j].plot(budgets, [max(row[m][str(b)]["mean_kl"], 1e-7) for b in budgets], marker="o", label=m)
        axes[0][j].axhline(row["full_accuracy"], color="k", ls="--", lw=1, label="full cache")
        axes[0][j].set_title(task, fontsize=10)
        axes[0][j].set_ylim(-0.02, 1.02)
        for ax in (axes[0][j], axes[1][j]):
            ax.set_xscale("log")
            ax.set_xticks(budgets, [f"{b:.0%}" for b in budgets])
            ax.set_xlabel("budget (share of context)")
        axes[1][j].set_yscale("log")
    axes[0][0].set_ylabel("accuracy")
    axes[1][0].set_ylabel("mean KL vs full cache")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"{result['config']['context']} tokens, {result['config']['examples_per_task']} prompts per task",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="kvtier bench quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="local path or hub id of a causal LM")
    p.add_argument("--context", type=positive_int, default=4096)
    p.add_argument("--examples", type=positive_int, default=50, help="prompts per task")
    p.add_argument("--budgets", type=share, nargs="+", default=[0.01, 0.02, 0.05, 0.10, 0.25])
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--data-dir", type=text_dir, help="directory of .txt files for the natural-text haystack")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's choice)")
    add_out_argument(p)
    p.add_argument("--name", type=result_name, default="quality", help="output file name (without .json)")
    p.add_argument("--no-plot", action="store_true")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    result = run(a.model, a.context, a.examples, a.budgets, a.tasks, a.data_dir, a.methods, a.seed)
    path = write_result(a.name, result, a.out)
    if not a.no_plot:
        plot(result, path.with_suffix(".png"))
    for task, row in result["results"].items():
        print(f"{task}: full {row['full_accuracy']:.2f}")
        for m in a.methods:
            print("  " + m.ljust(14) + " ".join(f"{b}:{row[m][str(b)]['accuracy']:.2f}" for b in a.budgets))
    print(f"wrote {path}")
