"""Several workers of one model solve a problem together over one shared cache (Hogwild! Inference).

    python examples/hogwild.py --model PATH_OR_HUB_ID --workers 3 --problem "How many primes are below 100?"

Every worker reads the others' text the moment it is written. With a reasoning model (QwQ-32B, a Qwen3
reasoning model) they split the work; with a tiny random model they write noise, but everything below runs.
docs/hogwild.md explains the prompt, the trace and the options.
"""

from __future__ import annotations

import argparse

import torch
import transformers as tf

from kvtier.hogwild import generate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="local path or hub id of a causal LM with a tokenizer")
    p.add_argument("--problem", default="How many primes are below 100?")
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=96, help="tokens all workers generate together")
    a = p.parse_args()

    tokenizer = tf.AutoTokenizer.from_pretrained(a.model)
    model = tf.AutoModelForCausalLM.from_pretrained(a.model, dtype="auto").eval()
    if not torch.cuda.is_available():
        model = model.float()  # half precision is slow (or missing) on CPUs
    else:
        model = model.cuda()

    def show(step):  # called as each step joins the shared history
        print(f"[{step.name}, step {step.number}, {step.ended}] {step.text.strip()!r}")

    result = generate(model, tokenizer, a.problem, workers=a.workers, max_new_tokens=a.max_new_tokens,
                      check_in_every=16, on_step=show)

    print(f"stopped: {result.stopped}; answer: {result.answer}")
    if result.final_text is not None:
        print(f"the finisher wrote: {result.final_text.strip()!r}")
    s = result.stats
    print(f"tokens per worker {s.tokens_per_worker}, {s.steps_finished} steps finished, {s.check_ins} check-ins, "
          f"{s.rounds} batched forward passes")
    print(f"KV held: {s.kv['history']} history + {s.kv['headers']} header + {sum(s.kv['steps'])} step tokens, "
          f"each stored once ({sum(s.kv['bytes'].values()) / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
