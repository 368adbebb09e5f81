"""`kvtier bench kernels`: each Triton kernel against its plain-torch reference, at a model's decode shapes.

For each context length, what one sparse decode step of one layer asks of each kernel, at Llama-3-8B's
attention shape by default (32 query and 8 KV heads of 128, bf16, batch 1):

  chunk_scores             the Quest bound of the step's query over every chunk's key min and max
                           (float32 abstracts, context / --chunk chunks per KV head)
  sparse_decode_attention  attention of each KV head's query group over its own selected slots of a device
                           arena that holds the whole context: --budget of the context, as runs of --chunk
                           consecutive slots at random places, in ascending slot order (as kvtier selects)

  block_decode_attention   Hogwild!: --workers workers over one cache of the context's length, a shared
                           history block and each worker's current step of --step tokens; each worker sees
                           the history, the others' steps, then its own (its query turned per block)

Each is run as the Triton kernel and as the reference on the same inputs. `ratio_vs_reference` is kernel
time / reference time (below 1: the kernel is faster). For sparse_decode_attention, `dense_sdpa_ms` is
torch's fused attention over the whole context for the same query: what a full (non-sparse) decode step
spends on that layer's attention; for block_decode_attention it is the same for the workers' N queries over
the whole cache as one sequence (no per-block rotation), and `per_block_fused_ms` is what runs without
Triton (one fused attention call per block).

On CUDA, every timed call starts with the L2 cache flushed (a 256 MiB buffer is zeroed) and is timed with
CUDA events; the median of --reps calls is reported, with the bytes the kernel has to read and the
bandwidth that implies. Outputs must match the reference within --rtol / --atol (|got - want| <= atol +
rtol * |want|; both sides accumulate in float32, in a different order): the result is written either way,
and the command exits with status 1 if one does not match.

On a CPU the kernels run only under TRITON_INTERPRET=1 (interpreted: a check of the plumbing, not a
timing); without it only the references are timed. TRITON_INTERPRET=1 on CUDA is refused.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ..kernels import (
    block_decode_attention,
    block_decode_attention_ref,
    chunk_scores,
    chunk_scores_ref,
    sparse_decode_attention,
    sparse_decode_attention_ref,
)
from ..kernels._triton import HAS_TRITON, INTERPRET, use_triton
from ..kernels.block_attention import _per_block
from .common import (
    add_out_argument,
    device_name,
    non_negative_int,
    non_negative_number,
    positive_int,
    result_name,
    share,
    write_result,
)
from .speed import SHAPES

_FLUSH_BYTES = 256 * 2**20  # larger than any GPU's L2 cache (60 MB on an H200)


def triton_mode(device: torch.device) -> str:
    """How the kernels run on `device`: "compiled", "interpreted" or "unavailable" (references only)."""
    if not use_triton(torch.empty(0, device=device)):
        return "unavailable"
    return "interpreted" if INTERPRET else "compiled"


class Timer:
    """Median wall time of a callable: CUDA events with a flushed L2 on CUDA, perf_counter elsewhere."""

    def __init__(self, device: torch.device, reps: int, warmup: int):
        self.device, self.reps, self.warmup = device, reps, warmup
        self.cuda = device.type == "cuda"
        self.flush = torch.empty(_FLUSH_BYTES, dtype=torch.int8, device=device) if self.cuda else None

    def __call__(self, fn: Callable[[], Any]) -> float:
        """Milliseconds, the median over `reps` calls after `warmup` untimed ones."""
        for _ in range(self.warmup):
            fn()
        if not self.cuda:
            times = []
            for _ in range(self.reps):
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1000)
            return round(statistics.median(times), 4)
        events = []
        for _ in range(self.reps):
            self.flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize(self.device)
        return round(statistics.median(s.elapsed_time(e) for s, e in events), 4)


def _errors(got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float) -> tuple[float, bool]:
    """Largest |got - want| and whether every element is within atol + rtol * |want| (-inf == -inf)."""
    got, want = got.float(), want.float()
    same_inf = torch.isinf(got) & torch.isinf(want) & (torch.sign(got) == torch.sign(want))
    diff = torch.where(same_inf, 0.0, (got - want).abs())
    diff = torch.nan_to_num(diff, nan=float("inf"))
    ok = bool((diff <= atol + rtol * torch.where(same_inf, 0.0, want.abs())).all())
    return float(diff.max()) if diff.numel() else 0.0, ok


def _selection(b: int, hkv: int, arena: int, n: int, chunk: int, device: torch.device,
               gen: torch.Generator) -> torch.Tensor:
    """[b, hkv, n] slot indices: per (row, KV head), runs of `chunk` consecutive slots at random chunk
    places, ascending (as the arena compaction lists them), cut to exactly n slots."""
    chunks = max(1, arena // chunk)
    take = min(chunks, -(-n // chunk))
    rows = []
    for _ in range(b * hkv):
        starts = torch.randperm(chunks, generator=gen)[:take].sort().values * chunk
        slots = (starts[:, None] + torch.arange(chunk)[None, :]).flatten()
        rows.append(slots[slots < arena][:n])
    width = min(len(r) for r in rows)
    return torch.stack([r[:width] for r in rows]).view(b, hkv, width).to(device)


def bench_chunk_scores(b: int, hq: int, hkv: int, d: int, context: int, chunk: int, dtype: torch.dtype,
                       device: torch.device, timer: Timer, mode: str, rtol: float, atol: float) -> dict[str, Any]:
    gen = torch.Generator(device=device).manual_seed(context)
    c = max(1, context // chunk)
    q = torch.randn(b, hq, d, device=device, dtype=dtype, generator=gen)
    a = torch.randn(b, hkv, c, d, device=device, generator=gen)
    z = torch.randn(b, hkv, c, d, device=device, generator=gen)
    kmin, kmax = torch.minimum(a, z), torch.maximum(a, z)  # float32, as kvtier keeps its abstracts
    del a, z
    want = chunk_scores_ref(q, kmin, kmax)
    row: dict[str, Any] = {
        "kernel": "chunk_scores", "context": context,
        "shape": {"batch": b, "q_heads": hq, "kv_heads": hkv, "head_dim": d, "chunks": c, "chunk_tokens": chunk,
                  "q_dtype": str(dtype).removeprefix("torch."), "abstract_dtype": "float32"},
        "bytes_read": 2 * kmin.numel() * kmin.element_size() + q.numel() * q.element_size(),
        "reference_ms": timer(lambda: chunk_scores_ref(q, kmin, kmax)),
    }
    if mode != "unavailable":
        got = chunk_scores(q, kmin, kmax)
        err, ok = _errors(got, want, rtol, atol)
        row["kernel_ms"] = timer(lambda: chunk_scores(q, kmin, kmax))
        row.update(max_abs_err=err, match=ok)
    return _rates(row)


def bench_sparse_decode(b: int, hq: int, hkv: int, d: int, context: int, budget: float, chunk: int,
                        dtype: torch.dtype, device: torch.device, timer: Timer, mode: str, rtol: float,
                        atol: float) -> dict[str, Any]:
    gen = torch.Generator(device=device).manual_seed(context + 1)
    cpu_gen = torch.Generator().manual_seed(context + 2)
    n = max(1, min(context, round(budget * context)))
    q = torch.randn(b, hq, d, device=device, dtype=dtype, generator=gen)
    k = torch.randn(b, hkv, context, d, device=device, dtype=dtype, generator=gen)
    v = torch.randn(b, hkv, context, d, device=device, dtype=dtype, generator=gen)
    idx = _selection(b, hkv, context, n, chunk, device, cpu_gen)
    n = idx.shape[-1]
    counts = torch.full((b, hkv), n, dtype=torch.long, device=device)
    scale = d ** -0.5
    want_o, want_l = sparse_decode_attention_ref(q, k, v, idx, counts, scale)
    qd = q.unsqueeze(2)
    row: dict[str, Any] = {
        "kernel": "sparse_decode_attention", "context": context,
        "shape": {"batch": b, "q_heads": hq, "kv_heads": hkv, "head_dim": d, "arena_slots": context,
                  "selected_slots": n, "budget": budget, "chunk_tokens": chunk,
                  "dtype": str(dtype).removeprefix("torch.")},
        "bytes_read": (2 * b * hkv * n * d * k.element_size() + idx.numel() * idx.element_size()
                       + q.numel() * q.element_size()),
        "reference_ms": timer(lambda: sparse_decode_attention_ref(q, k, v, idx, counts, scale)),
        "dense_sdpa_ms": timer(lambda: F.scaled_dot_product_attention(qd, k, v, scale=scale,
                                                                        enable_gqa=hq != hkv)),
    }
    if mode != "unavailable":
        got_o, got_l = sparse_decode_attention(q, k, v, idx, counts, scale)
        err_o, ok_o = _errors(got_o, want_o, rtol, atol)
        err_l, ok_l = _errors(got_l, want_l, rtol, atol)
        row["kernel_ms"] = timer(lambda: sparse_decode_attention(q, k, v, idx, counts, scale))
        row.update(max_abs_err=err_o, max_abs_err_lse=err_l, match=ok_o and ok_l)
    return _rates(row)


def bench_block_decode(workers: int, step: int, hq: int, hkv: int, d: int, context: int, dtype: torch.dtype,
                       device: torch.device, timer: Timer, mode: str, rtol: float, atol: float) -> dict[str, Any]:
    gen = torch.Generator(device=device).manual_seed(context + 3)
    step = max(1, min(step, context // (workers + 1)))
    lens = [context - workers * step] + [step] * workers  # history, then each worker's current step
    q = torch.randn(workers, hq, d, device=device, dtype=dtype, generator=gen)
    k = torch.randn(hkv, context, d, device=device, dtype=dtype, generator=gen)
    v = torch.randn(hkv, context, d, device=device, dtype=dtype, generator=gen)
    block_len = torch.tensor(lens, device=device)
    block_start = torch.cumsum(block_len, 0) - block_len
    # worker n's view: history, the other workers' steps in order, its own step last; its query one past that
    first = torch.zeros(workers, workers + 1, dtype=torch.long)
    for n in range(workers):
        at = lens[0]
        for b in [w for w in range(workers) if w != n] + [n]:
            first[n, b + 1] = at
            at += step
    qrel = (context - first).to(device)  # the query sits at view position `context`
    q_pos = torch.full((workers,), step, device=device)  # rotated at its own step's local position
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d)
    args = (q, q_pos, k, v, block_start, block_len, qrel, inv_freq, False, d ** -0.5)
    want_o, want_l = block_decode_attention_ref(*args)
    qd, kd, vd = q.permute(1, 0, 2)[None], k[None], v[None]  # [1, Hq, N, D], [1, Hkv, T, D]
    row: dict[str, Any] = {
        "kernel": "block_decode_attention", "context": context,
        "shape": {"workers": workers, "q_heads": hq, "kv_heads": hkv, "head_dim": d, "blocks": len(lens),
                  "step_tokens": step, "dtype": str(dtype).removeprefix("torch.")},
        "bytes_read": 2 * k.numel() * k.element_size() + q.numel() * q.element_size(),  # the cache read once
        "reference_ms": timer(lambda: block_decode_attention_ref(*args)),
        "per_block_fused_ms": timer(lambda: _per_block(*args, None, None, fused=True)),
        "dense_sdpa_ms": timer(lambda: F.scaled_dot_product_attention(qd, kd, vd, scale=d ** -0.5,
                                                                        enable_gqa=hq != hkv)),
    }
    if mode != "unavailable":
        got_o, got_l = block_decode_attention(*args)
        err_o, ok_o = _errors(got_o, want_o, rtol, atol)
        err_l, ok_l = _errors(got_l, want_l, rtol, atol)
        row["kernel_ms"] = timer(lambda: block_decode_attention(*args))
        row.update(max_abs_err=err_o, max_abs_err_lse=err_l, match=ok_o and ok_l)
    return _rates(row)


def _rates(row: dict[str, Any]) -> dict[str, Any]:
    """Ratio to the reference and the read bandwidth each side implies (GB/s, 1e9 bytes)."""
    ref = row["reference_ms"]
    row["reference_read_gbps"] = round(row["bytes_read"] / (ref * 1e6), 1) if ref > 0 else None
    if "kernel_ms" in row:
        ker = row["kernel_ms"]
        row["ratio_vs_reference"] = round(ker / ref, 3) if ref > 0 else None
        row["kernel_read_gbps"] = round(row["bytes_read"] / (ker * 1e6), 1) if ker > 0 else None
    return row


def run(contexts: list[int], shape: dict[str, int], budget: float = 0.05, chunk: int = 64, batch: int = 1,
        dtype: torch.dtype = torch.bfloat16, device: str = "cuda", reps: int = 50, warmup: int = 5,
        rtol: float = 1e-3, atol: float = 1e-3, workers: int = 4, step: int = 256) -> dict[str, Any]:
    dev = torch.device(device)
    if dev.type == "cuda" and INTERPRET:
        raise SystemExit("TRITON_INTERPRET=1 would interpret the kernels on CUDA: unset it to time them compiled")
    mode = triton_mode(dev)
    timer = Timer(dev, reps, warmup)
    hq, hkv, d = shape["heads"], shape["kv_heads"], shape["head_dim"]
    rows = []
    with torch.inference_mode():
        for n in contexts:
            rows.append(bench_chunk_scores(batch, hq, hkv, d, n, chunk, dtype, dev, timer, mode, rtol, atol))
            rows.append(bench_sparse_decode(batch, hq, hkv, d, n, budget, chunk, dtype, dev, timer, mode, rtol,
                                            atol))
            rows.append(bench_block_decode(workers, step, hq, hkv, d, n, dtype, dev, timer, mode, rtol, atol))
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    return {
        "config": {"device": device, "triton_mode": mode, "triton_installed": HAS_TRITON, "batch": batch,
                   "q_heads": hq, "kv_heads": hkv, "head_dim": d, "dtype": str(dtype).removeprefix("torch."),
                   "budget": budget, "chunk_tokens": chunk, "workers": workers, "step_tokens": step, "reps": reps, "warmup": warmup,
                   "timing": "CUDA events, L2 flushed before each call, median" if dev.type == "cuda"
                   else "perf_counter, median", "rtol": rtol, "atol": atol},
        "results": rows,
        "all_match": all(r.get("match", True) for r in rows),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="kvtier bench kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=positive_int, nargs="+", default=[32768, 65536, 131072])
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b", help="attention shape (heads, head dim)")
    p.add_argument("--heads", type=positive_int, help="override the shape's query heads")
    p.add_argument("--kv-heads", type=positive_int, help="override the shape's KV heads")
    p.add_argument("--head-dim", type=positive_int, help="override the shape's head dimension")
    p.add_argument("--batch", type=positive_int, default=1)
    p.add_argument("--budget", type=share, default=0.05, help="selected share of the context (sparse attention)")
    p.add_argument("--chunk", type=positive_int, default=64, help="tokens per chunk (kvtier's default chunk_size)")
    p.add_argument("--workers", type=positive_int, default=4, help="Hogwild workers (block_decode_attention)")
    p.add_argument("--step", type=positive_int, default=256, help="tokens in each worker's current step (block_decode_attention)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                   help="query and KV dtype (the abstracts are float32)")
    p.add_argument("--device", type=device_name, help="cuda or cpu (default: cuda when torch sees one)")
    p.add_argument("--reps", type=positive_int, default=50, help="timed calls per measurement (median reported)")
    p.add_argument("--warmup", type=non_negative_int, default=5)
    p.add_argument("--rtol", type=non_negative_number, default=1e-3)
    p.add_argument("--atol", type=non_negative_number, default=1e-3)
    add_out_argument(p)
    p.add_argument("--name", type=result_name, help="result file name (default: kernels on cpu, kernels-cuda on a GPU)")
    a = p.parse_args(argv)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    shape = dict(SHAPES[a.shape])
    shape.update({k: v for k, v in (("heads", a.heads), ("kv_heads", a.kv_heads), ("head_dim", a.head_dim)) if v})
    if shape["heads"] % shape["kv_heads"]:
        raise SystemExit(f"--heads {shape['heads']} is not a multiple of --kv-heads {shape['kv_heads']}")
    result = run(a.contexts, shape, a.budget, a.chunk, a.batch, getattr(torch, a.dtype), device, a.reps, a.warmup,
                 a.rtol, a.atol, a.workers, a.step)
    result["config"]["shape"] = a.shape
    name = a.name or ("kernels" if device == "cpu" else "kernels-cuda")
    path = write_result(name, result, a.out)
    print(f"triton: {result['config']['triton_mode']}")
    for r in result["results"]:
        line = f"{r['kernel']:<24} {r['context']:>7}  reference {r['reference_ms']:9.4f} ms"
        if "kernel_ms" in r:
            line += (f"  kernel {r['kernel_ms']:9.4f} ms ({r['ratio_vs_reference']}x)  max err {r['max_abs_err']:.2e}"
                     f"  {'ok' if r['match'] else 'MISMATCH'}")
        if "dense_sdpa_ms" in r:
            line += f"  dense sdpa {r['dense_sdpa_ms']:.4f} ms"
        if "per_block_fused_ms" in r:
            line += f"  per-block fused {r['per_block_fused_ms']:.4f} ms"
        print(line)
    print(f"wrote {path}")
    if not result["all_match"]:
        raise SystemExit(f"kernel outputs differ from the references beyond rtol={a.rtol}, atol={a.atol}")
