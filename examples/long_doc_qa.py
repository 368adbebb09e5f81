"""Long-document QA with the Python API: prefill a document once into a store, then ask questions.

    python examples/long_doc_qa.py --model PATH_OR_HUB_ID --doc report.txt \
        --question "What are the main findings?" --question "Who wrote it?"

The first run prefills the document in segments (only the device budget plus one segment is ever on the
device) and saves it; later runs reopen the store and answer at once. `kvtier qa` does the same from the
command line.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import transformers as tf

from kvtier import KVTierCache, cache_argument, prefill


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="local path or hub id of a causal LM with a tokenizer")
    p.add_argument("--doc", required=True, help="a text file")
    p.add_argument("--question", action="append", required=True, help="repeat for several questions")
    p.add_argument("--store", default=None, help="store directory (default: DOC.kvt next to the document)")
    p.add_argument("--device-budget", type=int, default=4096, help="tokens per layer on the device")
    p.add_argument("--max-new-tokens", type=int, default=64)
    a = p.parse_args()

    tok = tf.AutoTokenizer.from_pretrained(a.model)
    model = tf.AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    document = Path(a.doc).read_text()
    store = Path(a.store or f"{a.doc}.kvt")

    # The document and the question go in one user message; split the rendered prompt at the question so
    # the document part can be prefilled once and reused.
    marker = "<<QUESTION>>"
    if tok.chat_template:
        text = tok.apply_chat_template([{"role": "user", "content": f"{document}\n\nQuestion: {marker}"}],
                                       tokenize=False, add_generation_prompt=True)
    else:
        text = f"{document}\n\nQuestion: {marker}\nAnswer:"
    prefix, suffix = text.split(marker)
    prefix_ids = tok(prefix, add_special_tokens=False, return_tensors="pt").input_ids

    # How this process runs (budgets, mode) is chosen here, every time; the store holds only the document.
    options = dict(device_budget=a.device_budget, mode="sparse", sparse_budget=0.1)
    if store.exists():
        cache = KVTierCache.open(store, model, prompt_ids=prefix_ids, **options)  # refuses another document
        print(f"reopened {store}: {cache.get_seq_length()} tokens, no prefill")
    else:
        cache = KVTierCache.for_model(model, store_path=store, **options)
        prefill(model, cache, prefix_ids, segment_tokens=1024)
        cache.save(info={"document": str(a.doc)})
        print(f"prefilled {cache.get_seq_length()} tokens into {store}")

    kw = {cache_argument(model): cache}
    for question in a.question:
        q_ids = tok(question + suffix, add_special_tokens=False, return_tensors="pt").input_ids
        ids = torch.cat([prefix_ids, q_ids], dim=1)
        out = model.generate(input_ids=ids, max_new_tokens=a.max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id or tok.eos_token_id, **kw)
        print(f"Q: {question}\nA: {tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()}")
        cache.crop(prefix_ids.shape[1] - cache.get_seq_length())  # back to the document for the next one
    s = cache.stats()
    print(f"tiers: device {s.device.tokens}, host {s.host.tokens}, disk {s.disk.tokens} tokens; "
          f"mean attended per step {s.mean_attended_tokens or 0:.0f} tokens")
    cache.close()


if __name__ == "__main__":
    main()
