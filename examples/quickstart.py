"""kvtier quickstart: a tiered KV cache in `model.generate`, a saved session, and a reopened one.

    python examples/quickstart.py                    # a tiny random Llama, offline, < 1 minute on a CPU
    python examples/quickstart.py --model PATH_OR_ID # a real causal LM (local directory or hub id)
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import transformers as tf

from kvtier import KVTierCache, cache_argument


def load(model_id: str | None):
    if model_id is None:  # tiny random model: nothing to download
        torch.manual_seed(0)
        config = tf.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                num_attention_heads=4, num_key_value_heads=2)
        return tf.AutoModelForCausalLM.from_config(config).eval(), None
    tokenizer = tf.AutoTokenizer.from_pretrained(model_id)
    return tf.AutoModelForCausalLM.from_pretrained(model_id).eval(), tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="local path or hub id (default: a tiny random Llama)")
    p.add_argument("--tokens", type=int, default=2000, help="document length for the random model")
    a = p.parse_args()
    model, tokenizer = load(a.model)
    if tokenizer is None:
        document = torch.randint(0, 512, (1, a.tokens), generator=torch.Generator().manual_seed(1))
        question = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(2))
    else:
        document = tokenizer("kvtier keeps the KV cache on the GPU, in CPU memory and on disk. " * 40,
                             return_tensors="pt").input_ids
        question = tokenizer(" Where does kvtier keep the KV cache?", return_tensors="pt",
                             add_special_tokens=False).input_ids
    prompt = torch.cat([document, question], dim=1)
    kw = cache_argument(model)  # "cache" on transformers >= 5.24, "past_key_values" before

    # 1. A drop-in cache: at most 256 tokens per layer on the device and 256 in host memory, the rest on disk
    #    (a temporary store, deleted when the cache closes: `with` closes it even if generate fails).
    with KVTierCache.for_model(model, device_budget=256, host_budget=256) as cache:
        out = model.generate(input_ids=prompt, max_new_tokens=16, do_sample=False, **{kw: cache})
        answer = out[0, prompt.shape[1]:]
        s = cache.stats()
    print(f"generated {answer.tolist() if tokenizer is None else tokenizer.decode(answer)!r}")
    print(f"tokens per tier: device {s.device.tokens}, host {s.host.tokens}, disk {s.disk.tokens} "
          f"(disk compression x{s.disk.compression_ratio or 1:.2f})")

    # 2. Prefill the document once into a store, save it, reopen it, and ask without a new prefill.
    #    A saved store stays on disk after close; this one lives in a directory removed at the end.
    with tempfile.TemporaryDirectory(prefix="kvtier-quickstart-") as tmp:
        store = Path(tmp) / "doc.kvt"
        with KVTierCache.for_model(model, device_budget=256, host_budget=256, store_path=store) as cache:
            with torch.inference_mode():
                model(input_ids=document, use_cache=True, **{kw: cache})
            cache.save()
        with KVTierCache.open(store, model) as reopened:
            out2 = model.generate(input_ids=prompt, max_new_tokens=16, do_sample=False, **{kw: reopened})
            print(f"reopened session ({reopened.get_seq_length()} cached tokens) gives the same answer: "
                  f"{torch.equal(out2[0, prompt.shape[1]:], answer)}")


if __name__ == "__main__":
    main()
