"""`kvtier bench span`: what removing a span costs when most of the cache is on disk, three ways.

On a random-weight Llama (`--shape`, default "qwen2.5-0.5b": 4 layers, 14 query and 2 KV heads of 64), `--context`
random tokens (default 32768) are prefilled in sparse mode with the device holding `--device-fraction` of them
(default 0.2) and no host tier, so about 80% of every layer's chunks are only on disk. Then `--span` tokens
(default 1024) starting at `--at` (default 1024) leave the cache: every token after them moves left. How the
moved chunks follow is the design question; this measures the choice and the two alternatives:

  turn-on-read  what kvtier does (`KVTierCache.remove_span`): device copies are turned in place, a disk record
                stays as written and is turned by `Rope.shift` when it is next read; abstracts of disk chunks
                follow by interval bounds (`Rope.shift_bounds`). Reported: the removal's time and the disk bytes
                it read, and the sparse decode step before and after the move (reads of moved chunks now pay
                the turn).
  rewrite       turning every moved disk record at once: reading each record after the span, turning its keys
                and writing it back (measured into a scratch store of the same kind, so the session is not
                touched): the removal reads and writes the whole disk tier behind the span.
  reencode      TIM's paper formulation: cut the cache back to the span's start and encode the kept suffix
                again (`kvtier.prefill`), so no stored key moves; its time is a prefill of the suffix.

Ratios: rewrite / turn-on-read and reencode / turn-on-read removal time, and the steady sparse step after the
move over the step before it.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ..cache import KVTierCache
from ..segmented import prefill
from ..store.chunk import Tier
from ..store.disk import DiskStore
from .common import add_out_argument, median_ms, positive_int, share, write_result
from .speed import add_shape_arguments, decode_steps, shape_from_args, speed_model


def _disk_read(cache: KVTierCache) -> int:
    return cache.stats().disk.bytes_read


def _steps_ms(model, cache, token: torch.Tensor, steps: int, warmup: int) -> tuple[float, float, torch.Tensor]:
    """(first step ms, median of the steady steps ms, next token)."""
    times, _, nxt = decode_steps(model, cache, token, steps + warmup, 0)
    return times[0] * 1e3, median_ms(times[warmup:]), nxt


def rewrite_cost(cache: KVTierCache, moved: list, delta: int) -> tuple[float, int]:
    """Seconds and bytes to read, turn and write back every moved disk record (into a scratch store)."""
    tiers = cache.tiers
    scratch = DiskStore(tempfile.mkdtemp(prefix="kvtier-span-"), remove_on_close=True)
    moved_bytes = 0
    try:
        start = time.perf_counter()
        for chunk in moved:
            k, v = tiers.read_record(chunk)
            k = tiers.ropes[chunk.layer].shift(k, delta)
            header = tiers.expected_header(chunk)
            blob = tiers.codec.encode(header, k, v)
            scratch.put_many([(chunk.key, blob)])
            moved_bytes += len(blob)
        scratch.sync()
        return time.perf_counter() - start, moved_bytes
    finally:
        scratch.close()


def run(shape: dict[str, int], context: int, at: int, span: int, device_fraction: float, steps: int,
        warmup: int, segment: int) -> dict[str, Any]:
    model = speed_model(shape, context + steps * 4 + warmup * 4 + 64)
    ids = torch.randint(0, shape["vocab"], (1, context), generator=torch.Generator().manual_seed(0))
    options = dict(mode="sparse", device_budget=int(device_fraction * context), host_budget=0, shared_selection=True)
    cache = KVTierCache.for_model(model, **options)
    with torch.no_grad():
        logits = prefill(model, cache, ids, segment_tokens=segment, progress=False)
    token = logits.argmax(-1, keepdim=True)
    out: dict[str, Any] = {}
    _, out["step_before_ms"], token = _steps_ms(model, cache, token, steps, warmup)
    layers = cache.tiers.layers
    moved_disk = [c for layer in layers for c in layer.chunks if c.start >= at + span and c.tier == Tier.DISK]
    out["tokens_after_span"] = cache.get_seq_length() - at - span
    out["disk_chunks_moved"] = len(moved_disk)
    out["disk_share_moved"] = round(sum(c.length for c in moved_disk) / (len(layers) * out["tokens_after_span"]), 3)
    cut = [c for layer in layers for c in layer.chunks if c.tier == Tier.DISK and c.start < at + span < c.end
           or c.tier == Tier.DISK and c.start < at < c.end]
    out["disk_chunks_cut"] = len(cut)  # read to keep their parts outside the span
    out["disk_bytes_of_cut_chunks"] = sum(cache.tiers.record_sizes[c.key][2] for c in cut)
    read_before = _disk_read(cache)
    t = time.perf_counter()
    cache.remove_span(at, at + span)
    out["turn_on_read"] = {"remove_ms": round((time.perf_counter() - t) * 1e3, 2),
                           "disk_bytes_read": _disk_read(cache) - read_before}
    first, steady, token = _steps_ms(model, cache, token, steps, warmup)
    out["turn_on_read"].update(first_step_after_ms=round(first, 2), step_after_ms=round(steady, 2))
    seconds, nbytes = rewrite_cost(cache, [c for c in moved_disk if c.record_shift], -span)
    out["rewrite"] = {"remove_ms": round(seconds * 1e3, 2), "disk_bytes_read_and_written": nbytes}
    suffix = cache.token_ids[:, at:]
    cache.crop(at)
    t = time.perf_counter()
    with torch.no_grad():
        prefill(model, cache, suffix, segment_tokens=segment, progress=False)
    out["reencode"] = {"remove_ms": round((time.perf_counter() - t) * 1e3, 2), "tokens_encoded": suffix.shape[1]}
    cache.close()
    base = out["turn_on_read"]["remove_ms"]
    out["ratios"] = {"rewrite_vs_turn_on_read": round(out["rewrite"]["remove_ms"] / base, 1),
                     "reencode_vs_turn_on_read": round(out["reencode"]["remove_ms"] / base, 1),
                     "step_after_vs_before": round(out["turn_on_read"]["step_after_ms"] / out["step_before_ms"], 3)}
    out["step_before_ms"] = round(out["step_before_ms"], 2)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="kvtier bench span", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(p, "qwen2.5-0.5b")
    p.add_argument("--context", type=positive_int, default=32768, help="tokens prefilled (default 32768)")
    p.add_argument("--at", type=positive_int, default=1024, help="first position removed (default 1024)")
    p.add_argument("--span", type=positive_int, default=1024, help="tokens removed (default 1024)")
    p.add_argument("--device-fraction", type=share, default=0.2, help="share of the context on the device (0.2)")
    p.add_argument("--steps", type=positive_int, default=20, help="timed decode steps before and after (20)")
    p.add_argument("--warmup", type=positive_int, default=3, help="untimed steps first (3)")
    p.add_argument("--segment", type=positive_int, default=2048, help="prefill segment tokens (2048)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads (default 1)")
    add_out_argument(p)
    a = p.parse_args(argv)
    if a.at + a.span >= a.context:
        p.error(f"--at {a.at} + --span {a.span} must end before --context {a.context}")
    if not 0 < a.device_fraction < 1:
        p.error(f"--device-fraction {a.device_fraction} must be in (0, 1)")
    torch.set_num_threads(a.threads)
    shape = shape_from_args(a)
    result = {"config": {"shape": shape, "context": a.context, "at": a.at, "span": a.span,
                         "device_fraction": a.device_fraction, "steps": a.steps, "warmup": a.warmup,
                         "threads": a.threads, "dtype": "float32"},
              "result": run(shape, a.context, a.at, a.span, a.device_fraction, a.steps, a.warmup, a.segment)}
    path = write_result("span", result, a.out)
    r = result["result"]
    print(f"remove {a.span} of {a.context} tokens at {a.at}: turn-on-read {r['turn_on_read']['remove_ms']} ms "
          f"({r['turn_on_read']['disk_bytes_read']} disk bytes read), rewrite {r['rewrite']['remove_ms']} ms, "
          f"reencode {r['reencode']['remove_ms']} ms; step {r['step_before_ms']} -> "
          f"{r['turn_on_read']['step_after_ms']} ms")
    print(f"wrote {Path(path)}")
