"""`kvtier bench codec`: does splitting values into byte planes before zstd pay, and at which level?

KV comes from a random-weight Llama prefilled on text bytes (natural text when a haystack directory is
given), plus plain Gaussian noise as a worst case. Reports compression ratio and single-thread
compress/decompress throughput for each dtype x layout x level.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
import transformers as tf

from ..store.codec import RecordCodec, RecordHeader
from .common import add_out_argument, haystack_text, write_result


def _model_kv(tokens: int, data_dir: str | None) -> tuple[torch.Tensor, torch.Tensor, str]:
    text, source = haystack_text(tokens * 2, data_dir)
    ids = torch.tensor([list(text.encode()[:tokens])])
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=256, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=8)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    cache = tf.DynamicCache()
    with torch.inference_mode():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    layer = cache.layers[-1]
    return layer.keys, layer.values, source


def _median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _measure(codec: RecordCodec, k: torch.Tensor, v: torch.Tensor, reps: int = 9) -> dict[str, float]:
    b, h, n, d = k.shape
    header = RecordHeader(0, 0, 0, n, b, h, d, k.dtype, b"\0" * 16)
    raw = k.nbytes + v.nbytes
    blob = codec.encode(header, k, v)
    enc = _median_time(lambda: codec.encode(header, k, v), reps)
    dec = _median_time(lambda: codec.decode(blob, header), reps)
    return {"ratio": round(raw / len(blob), 4), "encode_mb_s": round(raw / enc / 1e6, 1),
            "decode_mb_s": round(raw / dec / 1e6, 1)}


def run(tokens: int = 4096, data_dir: str | None = None, levels: tuple[int, ...] = (1, 3, 6)) -> dict[str, Any]:
    torch.set_num_threads(1)
    mk, mv, source = _model_kv(tokens, data_dir)
    g = torch.Generator().manual_seed(0)
    sources = {"model_kv": (mk, mv), "gaussian": (torch.randn(mk.shape, generator=g), torch.randn(mk.shape, generator=g))}
    rows = []
    for name, (k32, v32) in sources.items():
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            k, v = k32.to(dtype).contiguous(), v32.to(dtype).contiguous()
            for level in levels:
                for planes in (False, True):
                    m = _measure(RecordCodec(level, planes), k, v)
                    rows.append({"data": name, "dtype": str(dtype).removeprefix("torch."), "zstd_level": level,
                                 "byte_planes": planes, **m})
    wins = {}
    for r in rows:
        if r["byte_planes"]:
            base = next(x for x in rows if not x["byte_planes"] and all(x[f] == r[f] for f in ("data", "dtype", "zstd_level")))
            wins[f"{r['data']}/{r['dtype']}/L{r['zstd_level']}"] = round(r["ratio"] / base["ratio"], 3)
    return {"config": {"tokens": tokens, "kv_shape": list(mk.shape), "text_source": source}, "results": rows,
            "byte_planes_gain": wins}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="kvtier bench codec", description=__doc__)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--data-dir", help="directory of .txt files for natural text (default: generated text)")
    add_out_argument(p)
    a = p.parse_args(argv)
    result = run(a.tokens, a.data_dir)
    path = write_result("codec", result, a.out)
    for key, gain in result["byte_planes_gain"].items():
        print(f"{key:32s} byte planes ratio gain x{gain}")
    print(f"wrote {path}")
