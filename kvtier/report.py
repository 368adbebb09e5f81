"""`kvtier inspect STORE`: what a store holds, read from its header and session manifest (no model needed)."""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path
from typing import Any

from . import session
from .cli import error_line, printable
from .errors import IncompleteSessionError, KVTierError
from .store import manifest as mf
from .store.disk import DiskStore


def describe(path: str | Path) -> dict[str, Any]:
    """A plain-data summary of a store: model, session, and per-layer chunks, bytes and skew.

    Opens the store read-only (nothing in it is written, not even a lock file) and checks it as `open` does,
    against the model facts in its own header, so a damaged or foreign store is one KVTierError."""
    path = Path(path)
    disk = DiskStore(path, create=False, readonly=True)
    try:
        header = session.read_header(disk)
        try:
            _, manifest = session.read_session(disk, None)
        except IncompleteSessionError:
            manifest = None
        n_records, map_bytes = disk.record_count(), disk.map_bytes
    finally:
        disk.close()
    out: dict[str, Any] = {
        "path": str(path),
        "layout_version": header.get("layout_version"),
        "model": header.get("structure", {}),
        "signature": header.get("signature"),
        "dtype": header.get("dtype"),
        "chunking": header.get("layout"),
        "records": n_records,
        "map_bytes": map_bytes,
        "session": "complete" if manifest is not None else "incomplete",
    }
    if manifest is None:
        return out
    layers, total_raw, total_stored = [], 0, 0
    shape = mf.parse_shape(header, str(path))
    for i, entry in enumerate(manifest.layers):
        if entry.kind != mf.FULL:
            layers.append({"layer": i, "kind": "sliding", "tokens_kept": entry.buffer.length if entry.buffer else 0})
            continue
        sizes = [c.length for c in entry.chunks]
        raw = sum(shape.kv_bytes(c.record_batch, c.length) for c in entry.chunks)
        stored = sum(c.stored_bytes for c in entry.chunks)
        total_raw += raw
        total_stored += stored
        skew = entry.skew or {}
        layers.append({
            "layer": i, "kind": "full", "chunks": len(sizes), "tokens": sum(sizes),
            "window_tokens": entry.tail.length if entry.tail else 0,
            "raw_bytes": raw, "stored_bytes": stored,
            "chunk_min": min(sizes, default=0), "chunk_median": int(statistics.median(sizes)) if sizes else 0,
            "chunk_max": max(sizes, default=0), "chunk_sizes": sizes,
            "decode_chunk": entry.decode_chunk,
            "top5_mass": skew.get("top5"), "desert_share": skew.get("desert"),
        })
    out.update({
        "context_tokens": manifest.length,
        "batch": manifest.batch,
        "token_ids": "kept" if manifest.tokens is not None else "unknown",
        "options": manifest.options,
        "info": manifest.info,
        "raw_bytes": total_raw,
        "stored_bytes": total_stored,
        "compression_ratio": round(total_raw / total_stored, 3) if total_stored else None,
        "layers": layers,
    })
    return out


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def format_report(d: dict[str, Any]) -> str:
    """The text report. Every value read from the store goes through `printable`: a session's `info` and the
    paths in it are whatever a user wrote, and must not reach the terminal as escape sequences."""
    m, p = d["model"], printable
    lines = [
        f"store       {p(d['path'])}",
        f"model       {p(m.get('model_type'))}: {p(m.get('num_layers'))} layers, {p(m.get('kv_heads'))} KV heads "
        f"of {p(m.get('head_dim'))}, signature {p(str(d['signature'])[:16])}",
        f"dtype       {p(d['dtype'])}   layout version {p(d['layout_version'])}   chunking {p(d['chunking'])}",
        f"session     {p(d['session'])}   records {d['records']}   LMDB map {_mb(d['map_bytes'])}",
    ]
    if d["session"] != "complete":
        return "\n".join(lines)
    opts = d["options"]
    lines += [
        f"context     {d['context_tokens']} tokens x batch {d['batch']}",
        f"on disk     {_mb(d['stored_bytes'])} stored, {_mb(d['raw_bytes'])} raw, compression x{d['compression_ratio']}",
        f"tiers       a saved session lives on disk; reopened with device budget {p(opts.get('device_budget'))} "
        f"and host budget {p(opts.get('host_budget'))} tokens per layer ({p(opts.get('mode'))} mode)",
    ]
    if d["info"]:
        lines.append("info        " + ", ".join(f"{p(k)}={p(v)}" for k, v in d["info"].items()))
    if d["info"].get("prefill") == "partial":  # a kvtier qa checkpoint: a valid session of the document's start
        lines.append(f"prefill     unfinished: {d['context_tokens']} of {p(d['info'].get('prefix_tokens'))} tokens; the "
                     "same kvtier qa command resumes it")
    lines.append("")
    lines.append(f"{'layer':>5} {'kind':8} {'chunks':>6} {'tokens':>8} {'stored':>10} {'ratio':>6} "
                 f"{'chunk min/med/max':>18} {'top5%':>6} {'desert':>6}")
    for layer in d["layers"]:
        if layer["kind"] == "sliding":
            lines.append(f"{layer['layer']:>5} {'sliding':8} {'-':>6} {layer['tokens_kept']:>8}  (device only, window-bounded)")
            continue
        ratio = layer["raw_bytes"] / layer["stored_bytes"] if layer["stored_bytes"] else 0
        sizes = f"{layer['chunk_min']}/{layer['chunk_median']}/{layer['chunk_max']}"
        top5 = "-" if layer["top5_mass"] is None else f"{layer['top5_mass']:.3f}"
        desert = "-" if layer["desert_share"] is None else f"{layer['desert_share']:.3f}"
        lines.append(f"{layer['layer']:>5} {'full':8} {layer['chunks']:>6} {layer['tokens']:>8} "
                     f"{_mb(layer['stored_bytes']):>10} {ratio:>6.2f} {sizes:>18} {top5:>6} {desert:>6}")
    return "\n".join(lines)


def plot(d: dict[str, Any], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = [layer for layer in d.get("layers", []) if layer["kind"] == "full"]
    if not full:
        raise KVTierError("the store holds no complete session with full-attention layers to plot")
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.boxplot([layer["chunk_sizes"] or [0] for layer in full], positions=range(len(full)), showfliers=True)
    a.set_xticks(range(len(full)), [str(layer["layer"]) for layer in full])
    a.set_xlabel("layer")
    a.set_ylabel("chunk size (tokens)")
    a.set_title("chunk sizes by layer", fontsize=10)
    xs = range(len(full))
    b.plot(xs, [layer["top5_mass"] or 0 for layer in full], marker="o", label="mass on top 5% of tokens")
    b.plot(xs, [layer["desert_share"] or 0 for layer in full], marker="s", label="share of desert tokens")
    b.set_xticks(list(xs), [str(layer["layer"]) for layer in full])
    b.set_xlabel("layer")
    b.set_ylim(0, 1)
    b.set_title("attention skew by layer (at prefill)", fontsize=10)
    b.legend(fontsize=8)
    fig.suptitle(f"{d['path']}: {d['context_tokens']} tokens", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def check_plot_target(path: str | Path) -> None:
    """Refuse a --plot file matplotlib cannot write (unknown format, no directory, not writable), before any work."""
    path = Path(path)
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise KVTierError("--plot needs matplotlib: pip install matplotlib") from None
    formats = FigureCanvasBase.get_supported_filetypes()
    kind = path.suffix[1:].lower()
    if kind not in formats:
        what = f"cannot write .{kind} files" if kind else "needs a file extension to know the format"
        raise KVTierError(f"--plot {path}: matplotlib {what}; name the file .png, .pdf, .svg "
                          f"(or {', '.join(sorted(set(formats) - {'png', 'pdf', 'svg'}))})")
    parent = path.parent
    if not parent.is_dir():
        raise KVTierError(f"--plot {path}: {parent} is not a directory; write the plot into an existing directory")
    if path.is_dir():
        raise KVTierError(f"--plot {path} is a directory; name a file")
    if not os.access(path if path.exists() else parent, os.W_OK):
        raise KVTierError(f"--plot {path}: {path if path.exists() else parent} is not writable; "
                          "write the plot somewhere else")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvtier inspect", description=__doc__)
    p.add_argument("store", help="store directory")
    p.add_argument("--plot", metavar="FILE.png", help="draw chunk sizes and skew by layer (png, pdf, svg, ...)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.plot:
            check_plot_target(args.plot)
        d = describe(args.store)
        if args.json:
            import json

            print(json.dumps(d, indent=2))
        else:
            print(format_report(d))
        if args.plot:
            plot(d, args.plot)
            print(f"wrote {printable(args.plot)}", file=sys.stderr)
    except (KVTierError, OSError) as exc:  # FileNotFoundError, PermissionError, a damaged or foreign store
        print(f"kvtier inspect: error: {error_line(exc)}", file=sys.stderr)
        return 2
    return 0
