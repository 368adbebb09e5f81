"""Runs one side of a saved-session test in its own process (tests call it through subprocess)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import torch
import transformers as tf

from kvtier import KVTierCache, cache_argument

CHUNKING = dict(chunk_size=16, sink_tokens=4, recent_window=16, device_budget=40, host_budget=32)


def _kw(model) -> str:
    return cache_argument(model)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("action", choices=["prefill", "answer", "hold"])
    p.add_argument("model")
    p.add_argument("store")
    p.add_argument("--ids", default="")
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--interrupt-layer", type=int)
    p.add_argument("--kill", action="store_true")
    a = p.parse_args()
    tf.logging.set_verbosity_error()
    model = tf.AutoModelForCausalLM.from_pretrained(a.model).eval()
    ids = torch.tensor([[int(t) for t in a.ids.split(",")]]) if a.ids else None

    if a.action == "hold":
        cache = KVTierCache.open(a.store, model)
        print("HOLDING", flush=True)
        time.sleep(60)
        return
    if a.action == "prefill":
        cache = KVTierCache.for_model(model, store_path=a.store, **CHUNKING)
        if a.interrupt_layer is not None:
            layer = model.model.layers[a.interrupt_layer]

            def stop(*_):
                if a.kill:
                    os.kill(os.getpid(), signal.SIGKILL)
                raise KeyboardInterrupt

            layer.register_forward_pre_hook(stop)
        try:
            with torch.no_grad():
                model(input_ids=ids, use_cache=True, **{_kw(model): cache})
        except KeyboardInterrupt:
            print("INTERRUPTED", flush=True)
            sys.exit(130)
        cache.save()
        print("SAVED", cache.get_seq_length(), flush=True)
        cache.close()
        return
    cache = KVTierCache.open(a.store, model)
    out = model.generate(input_ids=ids, max_new_tokens=a.new_tokens, do_sample=False, **{_kw(model): cache})
    print("TOKENS", ",".join(map(str, out[0, ids.shape[1]:].tolist())), flush=True)
    cache.close()


if __name__ == "__main__":
    main()
