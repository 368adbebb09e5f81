"""C kernels for the CPU, built on first use with the system's C compiler and loaded with ctypes.

torch's CPU kernels need the rows they attend to in one dense tensor, so a sparse decode step first copies
its selected rows out of the arena: on the benchmark CPU that copy alone cost more than the attention over
the copy. `run_attention.c` reads the arena's rows in place instead (the Triton kernel's job on a GPU).
Decode over dense keys takes it too (`dense_attention`): torch's flash kernel
pays again for every query row a KV head, where this one reads each key once for all of them.
`linear_rows.c` is a linear layer for the few rows of a batched
decode step (Hogwild's workers), which torch's CPU GEMM reads the weights for at ~60% of its one-row speed.
`select_pages.c` makes the step's Quest-bound page selection in one call where torch took a few dozen small
ops (on the benchmark CPU their per-call cost was most of the selection's time). `copy_rows.c` writes
chunks into scattered arena slots (promotion) as plain row copies, and large decoded records into place with
streaming stores that skip the CPU cache.

The library is compiled once per source, compiler and CPU (`-march=native`) into $KVTIER_HOME/native
(~/.cache/kvtier/native), owner-only, and loaded only if this user owns it and nobody else can write it.
Without a compiler, or with KVTIER_NATIVE=0, `library()` is None and callers use the torch path (a warning
says so once).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

_SOURCES = [Path(__file__).with_name(name) for name in ("run_attention.c", "select_pages.c", "copy_rows.c",
                                                              "linear_rows.c")]
_HEADERS = [Path(__file__).with_name("select_pages.h")]  # part of the build's key, not compiled alone
_FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-fPIC", "-shared"]
_BLOCK = 64  # run_attention.c's BLOCK: scratch per thread is g * (BLOCK + 2) floats
_reads_half: dict[int, bool] = {}  # per loaded library: whether it reads float16 chunk bounds
LINEAR_ROWS = 8  # rows up to which `linear_rows` was measured faster than torch's GEMM (0.33-0.65x at 2-8)
LINEAR_MIN_WEIGHTS = 1 << 17  # from here the call pays (four rows: 1.02x torch at 2^16 weights, 0.64x at 2^17)
DENSE_ROWS = 64  # query rows a KV head up to which `dense_attention` was measured faster than torch's kernel

_lock = threading.Lock()
_loaded: list[ctypes.CDLL | None] = []  # [] before the first try, then [library or None]
_pool: ThreadPoolExecutor | None = None


def library() -> ctypes.CDLL | None:
    """The built C library, or None where it cannot be had (no compiler, a failed build, KVTIER_NATIVE=0)."""
    if _loaded:
        return _loaded[0]
    with _lock:
        if not _loaded:
            lib = None
            if os.environ.get("KVTIER_NATIVE", "1") != "0":
                try:
                    lib = _load(_build())
                except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                    warnings.warn(f"kvtier: CPU sparse attention falls back to torch's kernels (slower): {exc}",
                                  RuntimeWarning, stacklevel=3)
            _loaded.append(lib)
    return _loaded[0]


def kvtier_home() -> Path:
    """kvtier's own files: $KVTIER_HOME, else ~/.cache/kvtier (this library's builds, `kvtier qa`'s stores). An
    empty KVTIER_HOME is unset (as an empty XDG_CACHE_HOME is): read as a path it would be the current directory."""
    return Path(os.environ.get("KVTIER_HOME") or Path.home() / ".cache" / "kvtier")


def _compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise RuntimeError("no C compiler found (install gcc, or set CC)")
    return cc


def _cpu() -> bytes:
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        with open("/proc/cpuinfo", "rb") as f:
            return b"".join(line for line in f if line.startswith((b"model name", b"flags")))[:4096]
    except OSError:
        return os.uname().machine.encode()


def _owned_private(path: Path, directory: bool) -> bool:
    st = os.lstat(path)
    kind = stat.S_ISDIR(st.st_mode) if directory else stat.S_ISREG(st.st_mode)
    return kind and st.st_uid == os.getuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _build() -> Path:
    cc = _compiler()
    sources = [path.read_bytes() for path in (*_SOURCES, *_HEADERS)]
    key = hashlib.sha256(b"\0".join([*sources, cc.encode(), " ".join(_FLAGS).encode(), _cpu()])).hexdigest()[:20]
    where = kvtier_home() / "native"
    where.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not _owned_private(where, directory=True):
        raise RuntimeError(f"{where} is not a directory owned by this user and closed to others")
    target = where / f"kvtier-{key}.so"
    if target.exists():
        return target
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=where)
    os.close(fd)
    try:
        done = subprocess.run([cc, *_FLAGS, "-o", tmp, *map(str, _SOURCES), "-lm"], capture_output=True,
                              timeout=120)
        if done.returncode:
            first = (done.stderr.decode(errors="replace").strip().splitlines() or ["no output"])[0]
            raise RuntimeError(f"{Path(cc).name} failed to build {', '.join(p.name for p in _SOURCES)}: {first}")
        os.chmod(tmp, 0o700)
        os.replace(tmp, target)  # atomic: a concurrent build of the same key writes the same bytes
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _load(path: Path) -> ctypes.CDLL:
    if not _owned_private(path, directory=False):
        raise RuntimeError(f"{path} is not a file owned by this user and closed to others")
    lib = ctypes.CDLL(str(path))
    f = lib.kvtier_run_attention_f32
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    f.argtypes = [p, p, p, p, p, i64, i64, i64, i64, i64, i64, ctypes.c_float, p, p, p]
    f.restype = ctypes.c_int
    lib.kvtier_scatter_rows.argtypes = [p, i64, i64, i64, p, p, i64, i64, i64, i64, i64]
    lib.kvtier_scatter_rows.restype = ctypes.c_int
    lib.kvtier_stream_planes.argtypes = [p, i64, p, i64, i64, i64]
    lib.kvtier_stream_planes.restype = ctypes.c_int
    slots, window = [p, i64, p, p], [i64, p, p, p, i64, i64, ctypes.c_float]  # the Arena's flat .. run_first; win_n ..
    f = lib.kvtier_unit_attention_f32
    f.argtypes = [p, i64, i64, p, p, p, i64, i64, *slots, p, *window, i64, i64, p, p]
    f.restype = ctypes.c_int
    f = lib.kvtier_select_pages_f32
    selection = [p, i64, i64, i64, i64, p, p, i64, i64, i64, i64, p, p, i64, i64, i64, p, p, p, p, p, p, p, p,
                 i64, i64, i64]
    f.argtypes = [*selection, i64, i64, p, p, p, p, p, p, p, p]
    f.restype = ctypes.c_int
    f = lib.kvtier_sparse_step_f32
    f.argtypes = [*selection, *slots, *window, i64, i64, p, p, p, p]
    f.restype = ctypes.c_int
    lib.kvtier_linear_rows_f32.argtypes = [p, i64, i64, i64, p, p, p, i64, i64, i64]
    lib.kvtier_linear_rows_f32.restype = ctypes.c_int
    lib.kvtier_select_reads_half.argtypes = []
    lib.kvtier_select_reads_half.restype = ctypes.c_int
    return lib


def takes(*tensors: torch.Tensor) -> bool:
    """Whether `run_attention` runs on these tensors: float32 on a CPU, with the library built."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors) and library() is not None


def _rows_apply(arena: torch.Tensor, block: torch.Tensor) -> bool:
    """Whether the C row copies run between this arena [B, H, S, D] and block [B, H, n, D]: the library built,
    both on the CPU in one dtype, the arena dense, the block's rows of D contiguous elements."""
    return (library() is not None and arena.device.type == "cpu" and block.device.type == "cpu"
            and arena.dtype == block.dtype and arena.ndim == 4 and arena.is_contiguous() and block.ndim == 4
            and block.stride(3) == 1)


def scatter_rows(arena: torch.Tensor, slots: torch.Tensor, block: torch.Tensor) -> bool:
    """arena[:, :, slots] = block ([B, H, n, D], any strides but rows of D contiguous elements) by row copies
    (copy_rows.c); False (nothing written) where they do not apply (then use index_copy_)."""
    if not _rows_apply(arena, block):
        return False
    b, h, rows, d = arena.shape
    slots = slots.reshape(-1).to(torch.int64).contiguous()
    n = slots.numel()
    if block.shape != (b, h, n, d):
        raise ValueError("scatter_rows: the block must be [B, H, slots, D] for the arena's B, H and D")
    size = block.element_size()
    if library().kvtier_scatter_rows(block.data_ptr(), block.stride(0) * size, block.stride(1) * size,
                                     block.stride(2) * size, arena.data_ptr(), slots.data_ptr(), n, b * h, h, rows,
                                     d * size):
        raise ValueError(f"scatter_rows: a slot lies outside the arena's {rows} slots")
    return True


def stream_planes(dst: np.ndarray, src: np.ndarray) -> bool:
    """dst[...] = src for uint8 arrays [B, H, n, W] whose (n, W) planes are each one contiguous stretch, planes
    evenly spaced (a record's runs of rows and their runs of arena slots), by streaming stores that skip the
    CPU cache (copy_rows.c): for bulk writes into an arena that is not read again soon. False (nothing
    written) where that does not apply; then use np.copyto."""
    lib = library()
    if (lib is None or dst.dtype != np.uint8 or src.dtype != np.uint8 or dst.ndim != 4 or dst.shape != src.shape
            or not dst.flags.writeable):
        return False
    if dst.size == 0:
        return True  # (an empty array's strides may be anything)
    b, h, n, w = dst.shape
    strides = []
    for a in (dst, src):
        if (w > 1 and a.strides[3] != 1) or (n > 1 and a.strides[2] != w):
            return False
        if b > 1 and h > 1 and a.strides[0] != h * a.strides[1]:
            return False
        strides.append(a.strides[1] if h > 1 else a.strides[0])
    lib.kvtier_stream_planes(dst.ctypes.data, strides[0], src.ctypes.data, strides[1], b * h, n * w)
    return True


def arena_rows(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """The arena's k and v [B, Hkv, S, D] as rows [R, D] of their storage, plane (sequence, head) p's slot i
    at row p * plane + i, and `plane`: rows from one plane's start to the next. That is S for a contiguous
    arena and more where a CPU arena's planes are reserved wider than its capacity; None for any other
    layout (then take `contiguous()` copies)."""
    b, h, s, d = k.shape
    plane = _plane_rows(k)
    if plane is None or v.shape != k.shape or _plane_rows(v) != plane or b * h * s == 0:
        return None
    rows = ((b * h - 1) * plane + s, d)
    return k.as_strided(rows, (d, 1)), v.as_strided(rows, (d, 1)), plane


def _plane_rows(t: torch.Tensor) -> int | None:
    """Rows of D elements between consecutive (sequence, head) planes of t [B, H, S, D], whose slots are rows of
    D contiguous elements; None if its layout is not that. (A size-1 dimension's stride means nothing.)"""
    b, h, s, d = t.shape
    step = t.stride(1) if h > 1 else t.stride(0) if b > 1 else s * d
    plane, rem = divmod(step, d) if d else (0, 1)
    if rem or plane < s or (d > 1 and t.stride(3) != 1) or (s > 1 and t.stride(2) != d):
        return None
    if b > 1 and h > 1 and t.stride(0) != h * step:
        return None
    return plane


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Every query row of q [B, Hq, Q, D] over every key of k, v [B, Hkv, K, D] (no mask, no causal cut), read in
    place by `run_attention`: a KV head's Hq / Hkv * Q query rows (a GQA group, a Hogwild step's workers) share
    one pass over its rows. On the benchmark CPU, keys read from memory, this took 0.5-0.9x the time of torch's
    flash kernel from 1 to 64 rows a head (0.5x at 4-8 rows; 0.5x at one row with head_dim 128); keys in the CPU
    cache (a short context), about as long (1.04x at 512 keys, one row a head). Returns out [B, Hq, Q, D] and lse
    [B, Hq, Q] (float32), or None where it does not apply: not float32 on a CPU, more than DENSE_ROWS rows a
    head, a layout without rows (`arena_rows`)."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    rows_per_head = hq // hkv * nq
    if rows_per_head > DENSE_ROWS or nk == 0 or not takes(q, k, v):
        return None
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return None  # the C kernel has no backward: leave it to torch's
    rows = arena_rows(k, v)
    if rows is None:
        return None
    krows, vrows, plane = rows
    first = torch.arange(b * hkv, dtype=torch.int64)[:, None] * plane
    count = torch.full((b * hkv, 1), nk, dtype=torch.int64)
    out, lse = run_attention(q.reshape(b * hkv, rows_per_head, d).contiguous(), krows, vrows, first, count, scale)
    return out.view(b, hq, nq, d), lse.view(b, hq, nq)


def linear_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """`F.linear(x, weight, bias)` for an x of 2 to LINEAR_ROWS rows ([..., K]), by `linear_rows.c`, which reads
    the weights once for all rows (threads split the output columns). On the benchmark CPU, one thread:
    0.33-0.65x torch's time at 2-8 rows on 7B-13B and Qwen2.5-0.5B layer shapes. One row is left to torch,
    whose matrix-vector product measured as fast (0.8-1.1x). None where it does not apply (then call
    F.linear): not float32 on a CPU, one row or more than LINEAR_ROWS, a small or non-contiguous weight,
    gradients wanted."""
    k = x.shape[-1] if x.dim() else -1
    if (weight.dim() != 2 or weight.shape[1] != k or weight.numel() < LINEAR_MIN_WEIGHTS
            or not weight.is_contiguous() or not takes(x, weight) or not 2 * k <= x.numel() <= LINEAR_ROWS * k):
        return None
    if bias is not None and (bias.shape != weight.shape[:1] or not bias.is_contiguous() or not takes(bias)):
        return None
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return None  # the C kernel has no backward
    rows = x.reshape(-1, k)
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    m, n = rows.shape[0], weight.shape[0]
    out = torch.empty(m, n, dtype=torch.float32)
    lib = library()
    threads = _thread_count(n // 64)  # a thread's share at least 64 weight rows
    args = (rows.data_ptr(), m, k, rows.stride(0), weight.data_ptr(), 0 if bias is None else bias.data_ptr(),
            out.data_ptr(), n)
    _over_pairs(n, threads, lambda t, lo, hi: lib.kvtier_linear_rows_f32(*args, lo, hi), "linear_rows", "")
    return out.view(*x.shape[:-1], n)


def run_attention(q: torch.Tensor, krows: torch.Tensor, vrows: torch.Tensor, first: torch.Tensor | np.ndarray,
                  count: torch.Tensor | np.ndarray, scale: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """q: [P, G, D] float32, contiguous (P = sequence x KV head pairs); krows, vrows: the arena's rows [R, D]
    (`arena_rows`); first, count: int64 [P, U], each pair's runs of rows (count 0: none), all inside [0, R)
    (checked in C before it reads). Returns out [P, G, D] and lse [P, G] (float32), or None without the C
    library or for other dtypes. Runs on torch's intra-op thread count, pairs split across threads (ctypes
    drops the GIL)."""
    if not takes(q, krows, vrows):
        return None
    lib = library()
    pairs, g, d = q.shape
    first = torch.as_tensor(first).contiguous()
    count = torch.as_tensor(count).contiguous()
    units = first.shape[-1]
    if first.shape != (pairs, units) or count.shape != (pairs, units) or krows.shape != vrows.shape or \
            first.dtype != torch.int64 or count.dtype != torch.int64:
        raise ValueError("run_attention: runs must be int64 [pairs, units] for q's pairs, k and v rows one shape")
    rows = krows.shape[0]
    if krows.shape[1] != d or krows.stride() != (d, 1) or vrows.stride() != (d, 1) or not q.is_contiguous():
        raise ValueError("run_attention: q must be contiguous and k, v rows of D contiguous elements")
    out = torch.empty(pairs, g, d, dtype=torch.float32)
    lse = torch.empty(pairs, g, dtype=torch.float32)
    threads = _thread_count(pairs)
    work = torch.empty(threads, g * (_BLOCK + 2), dtype=torch.float32)
    args = (q.data_ptr(), krows.data_ptr(), vrows.data_ptr(), first.data_ptr(), count.data_ptr(), rows)
    tail = (units, g, d, ctypes.c_float(scale), out.data_ptr(), lse.data_ptr())
    _over_pairs(pairs, threads, lambda t, lo, hi: lib.kvtier_run_attention_f32(*args, lo, hi, *tail,
                                                                               work[t].data_ptr()),
                "run_attention", f"a run reaches outside the arena's {rows} rows")
    return out, lse


def _thread_count(pairs: int) -> int:
    """Threads a C call over `pairs` (sequence, KV head) pairs splits them across: torch's intra-op thread
    count, at most one a pair (`linear_rows` passes its blocks of weight rows as the pairs)."""
    return max(1, min(torch.get_num_threads(), pairs))


def _over_pairs(pairs: int, threads: int, call: Callable[[int, int, int], int], name: str, outside: str
                ) -> list[int]:
    """call(t, lo, hi) for each thread t's share [lo, hi) of the pairs (or of any items a C call splits, such as
    `linear_rows`' weight rows), on the pool where there are several (ctypes drops the GIL). A code -1 raises MemoryError, -2 ValueError(f"{name}: {outside}"); returns the
    codes (what else they mean is the caller's)."""
    def part(t: int) -> int:
        return call(t, pairs * t // threads, pairs * (t + 1) // threads)

    codes = [part(0)] if threads == 1 else list(_threads().map(part, range(threads)))
    if -1 in codes:
        raise MemoryError(f"{name}: out of memory")
    if -2 in codes:
        raise ValueError(f"{name}: {outside}")
    return codes


def _threads() -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max(1, (os.cpu_count() or 1)), thread_name_prefix="kvtier-attention")
        return _pool


def reads_half() -> bool:
    """Whether `select_pages` reads float16 chunk bounds (the library built with AVX2, FMA and F16C)."""
    lib = library()
    if lib is None:
        return False
    if _reads_half.get(id(lib)) is None:  # asked at every sparse step: one ctypes call per library
        _reads_half[id(lib)] = bool(lib.kvtier_select_reads_half())
    return _reads_half[id(lib)]


def _selection(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, lengths: torch.Tensor, pmin: torch.Tensor,
               pmax: torch.Tensor, page_lengths: torch.Tensor, page_chunk: torch.Tensor, page_offsets: torch.Tensor,
               first: torch.Tensor, count: torch.Tensor, budget: int, candidates: int, forced: torch.Tensor | None,
               has_tokens: torch.Tensor | None, shared: bool) -> tuple[tuple[int, ...], list, tuple] | None:
    """The C selection's arguments (q through shared), checked: ((B, Hkv, G, C, P), args, the contiguous
    copies args point into: hold them until the call returns), or None where it does not run. `select_pages`
    says what each is."""
    half = kmin.dtype == torch.float16
    if half and not reads_half():
        return None
    if kmin.ndim != 4 or kmin.shape[2] == 0 or not takes(q, pmin, pmax, *(() if half else (kmin, kmax))):
        return None
    if half and (kmax.dtype != torch.float16 or kmin.device.type != "cpu" or kmax.device.type != "cpu"):
        raise ValueError("select_pages: float16 chunk bounds must both be float16, on the CPU")
    b, hkv, c, d = kmin.shape
    p = pmin.shape[2]
    hq = q.shape[1]
    q = q.contiguous()
    if (q.shape != (b, hq, d) or hq % hkv or kmax.shape != kmin.shape or pmin.shape != (b, hkv, p, d)
            or pmax.shape != pmin.shape):
        raise ValueError("select_pages: q, chunk bounds and page bounds disagree in shape")
    for t in (kmin, kmax, pmin, pmax):
        if t.stride(-1) != 1 or t.stride(-2) != d:
            raise ValueError("select_pages: bounds must be rows of D contiguous elements")
    if pmin.stride() != pmax.stride() or kmin.stride() != kmax.stride():
        raise ValueError("select_pages: min and max bounds must share a layout")
    cols = [t.contiguous() for t in (lengths, first, count, page_lengths, page_chunk, page_offsets)]
    if (any(t.dtype != torch.int64 or t.device.type != "cpu" for t in cols)
            or [t.numel() for t in cols] != [c, c, c, p, p, p]):
        raise ValueError("select_pages: chunk and page columns must be int64 on the CPU, one entry per chunk or page")
    masks = []
    for t, shape in ((forced, (c,)), (has_tokens, (b, c))):
        if t is not None and (t.dtype != torch.bool or tuple(t.shape) != shape or t.device.type != "cpu"):
            raise ValueError("select_pages: forced must be [C] and has_tokens [B, C], bool")
        masks.append(None if t is None else t.contiguous())
    args = [q.data_ptr(), b, hkv, hq // hkv, d, kmin.data_ptr(), kmax.data_ptr(), kmin.stride(0), kmin.stride(1),
            int(half), c, pmin.data_ptr(), pmax.data_ptr(), pmin.stride(0), pmin.stride(1), p,
            *(t.data_ptr() for t in cols), *(None if t is None else t.data_ptr() for t in masks),
            min(max(budget, 0), 1 << 40), candidates, int(shared)]
    return (b, hkv, hq // hkv, c, p), args, (q, cols, masks)


def select_pages(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, lengths: torch.Tensor, pmin: torch.Tensor,
                 pmax: torch.Tensor, page_lengths: torch.Tensor, page_chunk: torch.Tensor, page_offsets: torch.Tensor,
                 first: torch.Tensor, count: torch.Tensor, budget: int, candidates: int, forced: torch.Tensor | None,
                 has_tokens: torch.Tensor | None, shared: bool) -> tuple[torch.Tensor, ...] | None:
    """QuestBound's `select_pages` in one call (select_pages.c says what it computes).

    q: [B, Hq, D]; kmin, kmax: chunk bounds [B, Hkv, C, D]; lengths, first, count: [C] (tokens, first page row,
    pages); pmin, pmax: page bounds [B, Hkv, P, D]; page_lengths, page_chunk, page_offsets: [P] (tokens, chunk
    row, offset in it); candidates: as kvtier.sparse.select.CANDIDATES; forced: [C] bool; has_tokens: [B, C]
    bool. Returns (chunks [B, Hkv, C] bool, whole, whole_ok, parts, parts_ok, unit_chunk, unit_offset,
    unit_size [B, Hkv, *]): the lists compact and padded with 0 / False, the units as `Selection.units` has
    them; or None where it does not run (no library, not float32 on a CPU, no chunks). The chunk bounds may be
    float16 instead (`AbstractTable.half_bounds`: rounded outward, so they still bound every key) where
    `reads_half()`."""
    got = _selection(q, kmin, kmax, lengths, pmin, pmax, page_lengths, page_chunk, page_offsets, first, count, budget,
                     candidates, forced, has_tokens, shared)
    if got is None:
        return None
    (b, hkv, _, c, p), args, _held = got
    pairs = b * hkv
    whole, parts = torch.empty(pairs, c, dtype=torch.int64), torch.empty(pairs, p, dtype=torch.int64)
    n_whole, n_parts = torch.empty(pairs, dtype=torch.int64), torch.empty(pairs, dtype=torch.int64)
    units = torch.empty(3, pairs, c + p, dtype=torch.int64)
    chunks = torch.empty(b, hkv, c, dtype=torch.bool)
    rc = library().kvtier_select_pages_f32(
        *args, 0, pairs, whole.data_ptr(), n_whole.data_ptr(), parts.data_ptr(), n_parts.data_ptr(),
        chunks.data_ptr(), units[0].data_ptr(), units[1].data_ptr(), units[2].data_ptr())
    if rc == -1:
        raise MemoryError("select_pages: out of memory")
    if rc:
        raise ValueError("select_pages: a chunk or page table points outside the bounds it was given")
    counts = torch.stack([n_whole, n_parts]).tolist()
    most_w, most_p = max(1, max(counts[0])), max(1, max(counts[1]))
    most_u = max(1, max(w + n for w, n in zip(*counts)))  # the C wrote 0 past each pair's entries up to these
    whole_ok = torch.arange(most_w) < n_whole[:, None]
    parts_ok = torch.arange(most_p) < n_parts[:, None]
    return (chunks, whole[:, :most_w].view(b, hkv, most_w), whole_ok.view(b, hkv, most_w),
            parts[:, :most_p].view(b, hkv, most_p), parts_ok.view(b, hkv, most_p),
            *units[:, :, :most_u].reshape(3, b, hkv, most_u).unbind(0))


def sparse_step(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, lengths: torch.Tensor, pmin: torch.Tensor,
                pmax: torch.Tensor, page_lengths: torch.Tensor, page_chunk: torch.Tensor, page_offsets: torch.Tensor,
                first: torch.Tensor, count: torch.Tensor, budget: int, candidates: int, forced: torch.Tensor | None,
                has_tokens: torch.Tensor | None, shared: bool, slot_table: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                window: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                scale: float) -> tuple[torch.Tensor, torch.Tensor, list[int], int] | None:
    """A whole sparse decode step in one C call per thread (run_attention.c's `kvtier_sparse_step_f32`): the
    selection `select_pages` makes (its arguments, q through shared), then `unit_attention` over the units it
    selected (slot_table, window, k, v: as `unit_attention` takes them). Returns out [B, Hq, D] and lse [B, Hq]
    (float32), the rows of the chunks holding anything selected (increasing) and the tokens selected in all; or
    None where it does not run (as `select_pages`, or an arena without rows) or where a selected token is not in
    the arena (then stage it: the step's parts one by one)."""
    got = _selection(q, kmin, kmax, lengths, pmin, pmax, page_lengths, page_chunk, page_offsets, first, count, budget,
                     candidates, forced, has_tokens, shared)
    if got is None:
        return None
    (b, hkv, g, c, _), args, _held = got
    arena = _arena(slot_table, window, k, v, b, hkv, q.shape[-1], c, scale)
    if arena is None:
        return None
    table, rest, _held_arena = arena
    tail = (*table, *rest)
    pairs = b * hkv
    threads = _thread_count(pairs)
    out, lse = torch.empty(b, hkv * g, q.shape[-1]), torch.empty(b, hkv * g)
    held, found = np.empty((threads, c), dtype=np.int64), np.empty((threads, 2), dtype=np.int64)
    outs = (out.data_ptr(), lse.data_ptr())
    lib = library()
    codes = _over_pairs(pairs, threads, lambda t, lo, hi: lib.kvtier_sparse_step_f32(
        *args, *tail, lo, hi, *outs, held[t].ctypes.data, found[t].ctypes.data),
        "sparse_step", "a chunk, page, slot table or window points outside what it indexes")
    if -3 in codes:
        return None
    if threads == 1:
        n_held, tokens = found[0].tolist()
        return out, lse, held[0, :n_held].tolist(), tokens
    rows = np.unique(np.concatenate([held[t, :found[t, 0]] for t in range(threads)]))
    return out, lse, rows.tolist(), int(found[:, 1].sum())


def _arena(slot_table: tuple[torch.Tensor, torch.Tensor, torch.Tensor], window: torch.Tensor, k: torch.Tensor,
           v: torch.Tensor, b: int, hkv: int, d: int, c: int, scale: float) -> tuple[tuple, tuple, tuple] | None:
    """The C library's arena arguments (run_attention.c's Arena: flat, flat_n, offset, run_first; then win_n ..
    slots and the scale), checked, and the contiguous copies they point into (hold them until the call returns);
    None where the arena is not float32 rows on a CPU (`arena_rows`)."""
    if not takes(k, v):
        return None
    rows = arena_rows(k, v)
    if rows is None:
        return None
    krows, vrows, plane = rows
    if k.shape[:2] != (b, hkv) or k.shape[3] != d:
        raise ValueError("unit_attention: the arena's batch, KV heads and head size must be the query's")
    flat, offsets, run_first, window = (t.contiguous() for t in (*slot_table, window))
    if (any(t.dtype != torch.int64 or t.device.type != "cpu" or t.ndim != 1 for t in (flat, offsets, run_first, window))
            or offsets.numel() != c or run_first.numel() != c):
        raise ValueError("unit_attention: the slot table and window must be int64 [n] on the CPU, an offset a chunk")
    table = (flat.data_ptr(), flat.numel(), offsets.data_ptr(), run_first.data_ptr())
    rest = (window.numel(), window.data_ptr(), krows.data_ptr(), vrows.data_ptr(), plane, k.shape[2],
            ctypes.c_float(scale))
    return table, rest, (flat, offsets, run_first, window, krows, vrows)


def unit_attention(q: torch.Tensor, units: tuple[torch.Tensor, torch.Tensor, torch.Tensor], lengths: torch.Tensor,
                   slot_table: tuple[torch.Tensor, torch.Tensor, torch.Tensor], window: torch.Tensor, k: torch.Tensor,
                   v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Decode attention of q [B, Hq, D] over each (sequence, KV head)'s units (chunk row, offset in the chunk,
    tokens, [B, Hkv, U] each: `Selection.units`; size 0: none), then its recent window, read in place from the
    arena k, v [B, Hkv, S, D] (run_attention.c's `kvtier_unit_attention_f32`). lengths: the chunk rows' tokens
    [C]; slot_table: the device chunks' slots end to end, each chunk row's offset in them (-1 off the arena) and
    its first slot where they are one run, else -1 (`TieredLayer.slot_table`, `run_first`); window: the recent
    window's slots [W]. Each unit's slots are read as runs of consecutive slots. Returns out [B, Hq, D] and lse
    [B, Hq] (float32), or None where it does not run (no library, not float32 on a CPU, an arena without rows)
    or where a unit's chunk is off the arena."""
    if not takes(q):
        return None
    b, hq, d = q.shape
    chunk, off, size, lengths = (t.contiguous() for t in (*units, lengths))
    hkv, width, c = chunk.shape[1], chunk.shape[2], lengths.numel()
    if (chunk.shape[0] != b or hkv == 0 or hq % hkv or off.shape != chunk.shape or size.shape != chunk.shape
            or any(t.dtype != torch.int64 or t.device.type != "cpu" for t in (chunk, off, size, lengths))):
        raise ValueError("unit_attention: units must be int64 [B, Hkv, U] on the CPU, Hkv dividing q's heads")
    arena = _arena(slot_table, window, k, v, b, hkv, d, c, scale)
    if arena is None:
        return None
    table, rest, _held = arena
    q = q.contiguous()
    pairs = b * hkv
    out, lse = torch.empty(b, hq, d), torch.empty(b, hq)
    lib = library()
    head = (q.data_ptr(), hq // hkv, d, chunk.data_ptr(), off.data_ptr(), size.data_ptr(), width, c)
    codes = _over_pairs(pairs, _thread_count(pairs), lambda t, lo, hi: lib.kvtier_unit_attention_f32(
        *head, *table, lengths.data_ptr(), *rest, lo, hi, out.data_ptr(), lse.data_ptr()),
        "unit_attention", "a unit, slot table or window points outside what it indexes")
    return None if -3 in codes else (out, lse)
