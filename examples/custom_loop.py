"""KVTierCache in your own decoding loop: prefill, then sample token by token, with the accounting.

    python examples/custom_loop.py --model PATH_OR_HUB_ID --prompt "Once upon a time"

transformers' generate is not needed: a cache is passed to the model's forward like any other.
"""

from __future__ import annotations

import argparse

import torch
import transformers as tf

from kvtier import KVTierCache, cache_argument


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="local path or hub id of a causal LM with a tokenizer")
    p.add_argument("--prompt", default="Once upon a time")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    tok = tf.AutoTokenizer.from_pretrained(a.model)
    model = tf.AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    cache = KVTierCache.for_model(model, device_budget=256, host_budget=256)  # small, to show the tiers
    kw = {cache_argument(model): cache, "use_cache": True}
    generator = torch.Generator().manual_seed(a.seed)

    ids = tok(a.prompt, return_tensors="pt").input_ids
    logits = model(input_ids=ids, **kw).logits[:, -1]  # prefill: positions follow cache.get_seq_length()
    out = []
    for _ in range(a.max_new_tokens):
        probs = torch.softmax(logits / a.temperature, dim=-1)
        nxt = torch.multinomial(probs, 1, generator=generator)
        if nxt.item() == tok.eos_token_id:
            break
        out.append(nxt.item())
        logits = model(input_ids=nxt, **kw).logits[:, -1]

    print(a.prompt + tok.decode(out, skip_special_tokens=True))
    s = cache.stats()
    print(f"{cache.get_seq_length()} tokens cached; device {s.device.tokens}, host {s.host.tokens}, "
          f"disk {s.disk.tokens}; bytes moved per step: "
          + ", ".join(f"{t} {v['bytes_read'] + v['bytes_written']:.0f}" for t, v in s.per_step().items()))
    cache.close()


if __name__ == "__main__":
    main()
