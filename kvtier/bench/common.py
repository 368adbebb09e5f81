"""What every benchmark shares: machine facts, JSON output, timing, the synthetic haystack."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from ..cli_args import write_file

DEFAULT_OUT = Path(".")  # results go where the user runs the command, never into the package
HAYSTACK_ENV = "KVTIER_HAYSTACK_DIR"


def machine_info() -> dict[str, Any]:
    """The hardware and software a result was measured on."""
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    gpu = torch.cuda.is_available()
    info = {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gib": mem,
        "gpu": torch.cuda.get_device_name(0) if gpu else None,
        "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if gpu else None,
        "gpu_capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if gpu else None,
        "cuda": torch.version.cuda,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "triton": _version("triton"),
    }
    return info


def _version(dist: str) -> str | None:
    """The installed version of a distribution, or None."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _whole(text: str, low: int, bound: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"{value} must be {bound}")
    return value


def positive_int(text: str) -> int:
    """argparse type for counts and sizes: a bad value is one usage line, not a traceback mid-run."""
    return _whole(text, 1, "at least 1")


def non_negative_int(text: str) -> int:
    """argparse type for counts where 0 means none (warm-up steps, a skipped part)."""
    return _whole(text, 0, "0 or more")


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def share(text: str) -> float:
    """argparse type for a share of something (a sparse budget, the part of a context on the device): in (0, 1]."""
    value = _finite(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} must be in (0, 1]")
    return value


def share_or_zero(text: str) -> float:
    """argparse type for a share that may be 0 (none): in [0, 1]."""
    value = _finite(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} must be in [0, 1]")
    return value


def positive_number(text: str) -> float:
    """argparse type for seconds, GiB and the like: a finite number above 0."""
    value = _finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be above 0")
    return value


def non_negative_number(text: str) -> float:
    """argparse type for a tolerance or a reserve: a finite number, 0 or more."""
    value = _finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be 0 or more")
    return value


def zstd_level(text: str) -> int | None:
    """argparse type for a zstd level, checked as KVTierConfig checks `zstd_level`; "raw": None (raw records)."""
    from ..store.codec import check_zstd_level

    if text == "raw":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a zstd level (an integer) nor raw") from None
    try:
        check_zstd_level(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: {err}") from None
    return value


def device_name(text: str) -> str:
    """argparse type for --device: a device this machine has (as kvtier qa checks it)."""
    from ..cli_args import UsageError, check_device

    try:
        check_device(text)
    except UsageError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix(f"--device {text}: ")) from None
    return text


def existing_dir(text: str) -> str:
    """argparse type for a directory that must already be there (--data-dir, --store-dir)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path; name a directory")
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is not a directory")
    return text


def text_dir(text: str) -> str:
    """argparse type for --data-dir: a directory holding the .txt files a haystack is read from."""
    existing_dir(text)
    if not haystack_files(text):
        raise argparse.ArgumentTypeError(f"{text} holds no .txt files")
    return text


def out_dir(text: str) -> str:
    """argparse type for --out: a directory (made if missing) that is not a file."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path; name a directory")
    path = Path(text)
    place = path
    while not place.exists() and place.parent != place:
        place = place.parent
    if not place.is_dir():
        raise argparse.ArgumentTypeError(f"{place} is not a directory")
    if not os.access(place, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{place} is not writable")
    return text


def result_name(text: str) -> str:
    """argparse type for --name: a plain file name (the result is NAME.json in --out), no directories."""
    if not text.strip() or text in (".", "..") or "/" in text or os.sep in text:
        raise argparse.ArgumentTypeError(f"{text!r} is not a file name (the result is written as NAME.json in --out)")
    return text


def add_out_argument(parser) -> None:
    """`--out DIR`, the same for every benchmark."""
    parser.add_argument("--out", type=out_dir, default=str(DEFAULT_OUT),
                        help="directory for the result JSON and plot (default: the current directory)")


def write_result(name: str, result: dict[str, Any], out_dir: str | Path = DEFAULT_OUT) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    result = {"benchmark": name, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine_info(), **result}
    write_file(path, json.dumps(result, indent=2) + "\n")
    return path


def drop_page_cache(path: str | Path) -> bool:
    """Ask the kernel to forget the cached pages of every file under `path` (posix_fadvise DONTNEED), so the
    next read comes from the disk. False where the platform has no such call."""
    if not hasattr(os, "posix_fadvise"):
        return False
    files = [Path(path)] if Path(path).is_file() else [p for p in Path(path).rglob("*") if p.is_file()]
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def sequential_read_mb_s(path: str | Path, block: int = 8 * 2**20) -> float:
    """Plain sequential read speed of one file (MB/s), the yardstick for reading a store."""
    start, total = time.perf_counter(), 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(block):
            total += len(chunk)
    return total / 1e6 / max(time.perf_counter() - start, 1e-9)


def timed(fn: Callable[[], Any], sync: bool = False) -> tuple[float, Any]:
    if sync and torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if sync and torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def bytes_moved(before, after, steps: int) -> dict[str, dict[str, int]]:
    """Bytes read from and written to each tier per step, between two CacheStats snapshots."""
    out = {}
    for tier in ("device", "host", "disk"):
        a, b = getattr(after, tier), getattr(before, tier)
        out[tier] = {"bytes_read": (a.bytes_read - b.bytes_read) // steps,
                     "bytes_written": (a.bytes_written - b.bytes_written) // steps}
    return out


def median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 3)


_WORDS = (
    "the of and to in is was that for on with as by at from his her they this which be are an or had not "
    "but have one all were when there their what so out up if about into who them some could time would "
    "people other than then now only its over also after new first because way even most made many "
    "river garden letter window market winter history language engine number village science morning"
).split()


def haystack_files(directory: str | Path) -> list[Path]:
    """The text files a haystack is read from: the directory's .txt files but its licence, in name order."""
    return sorted(p for p in Path(directory).glob("*.txt") if not p.name.startswith("LICENSE"))


def haystack_text(min_chars: int, data_dir: str | Path | None = None, seed: int = 0) -> tuple[str, str]:
    """Natural text from `data_dir` (or $KVTIER_HAYSTACK_DIR) when present, else generated sentences.

    Returns (text, source) where source says which was used.
    """
    candidates = [data_dir, os.environ.get(HAYSTACK_ENV)]
    for cand in candidates:
        if cand and Path(cand).is_dir():
            files = haystack_files(cand)
            if files:
                text, i = "", 0
                while len(text) < min_chars:
                    text += files[i % len(files)].read_text(errors="replace") + "\n"
                    i += 1
                return text, f"dir:{Path(cand).name}"
    rng = random.Random(seed)
    parts, n = [], 0
    while n < min_chars:
        sentence = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(6, 18))).capitalize() + ". "
        parts.append(sentence)
        n += len(sentence)
    return "".join(parts), "generated"


def print_targets(targets: dict[str, dict[str, Any]]) -> None:
    """One line per target of a result: met, not met or not measured, with the measured ratio and its limit."""
    for key, t in targets.items():
        state = "not measured" if t["met"] is None else "met" if t["met"] else "not met"
        print(f"target {key}: {state}" + (f" ({t['measured']}x, at most {t['target_at_most']}x)"
                                          if t.get("measured") is not None else ""))
