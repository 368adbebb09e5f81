"""`kvtier inspect STORE`: what a store holds, read from its header and session manifest (no model needed)."""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

from .errors import KVTierError
from .store.disk import DiskStore


def describe(path: str | Path) -> dict[str, Any]:
    """A plain-data summary of a store: model, session, and per-layer chunks, bytes and skew."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no kvtier store at {path}")
    disk = DiskStore(path, create=False)
    try:
        header = disk.get_meta("store")
        session = disk.get_meta("session")
        n_records = sum(1 for _ in disk.keys())
        map_bytes = disk.map_bytes
    finally:
        disk.close()
    if header is None:
        raise KVTierError(f"{path} is not a kvtier store (no store header)")
    out: dict[str, Any] = {
        "path": str(path),
        "layout_version": header.get("layout_version"),
        "model": header.get("structure", {}),
        "signature": header.get("signature"),
        "dtype": header.get("dtype"),
        "chunking": header.get("layout"),
        "records": n_records,
        "map_bytes": map_bytes,
        "session": (session or {}).get("state", "none"),
    }
    if not session or session.get("state") != "complete":
        return out
    layers, total_raw, total_stored = [], 0, 0
    for i, entry in enumerate(session["layers"]):
        if entry["kind"] != "full":
            buf = entry.get("buffer")
            layers.append({"layer": i, "kind": "sliding", "tokens_kept": buf[2] if buf else 0})
            continue
        sizes = [c[2] for c in entry["chunks"]]
        raw = sum(c[5] for c in entry["chunks"])
        stored = sum(c[6] for c in entry["chunks"])
        total_raw += raw
        total_stored += stored
        skew = entry.get("skew") or {}
        layers.append({
            "layer": i, "kind": "full", "chunks": len(sizes), "tokens": sum(sizes),
            "window_tokens": entry["tail"][2] if entry.get("tail") else 0,
            "raw_bytes": raw, "stored_bytes": stored,
            "chunk_min": min(sizes, default=0), "chunk_median": int(statistics.median(sizes)) if sizes else 0,
            "chunk_max": max(sizes, default=0), "chunk_sizes": sizes,
            "decode_chunk": entry.get("decode_chunk"),
            "top5_mass": skew.get("top5"), "desert_share": skew.get("desert"),
        })
    out.update({
        "context_tokens": session["length"],
        "batch": session["batch"],
        "options": session.get("options", {}),
        "info": session.get("info", {}),
        "raw_bytes": total_raw,
        "stored_bytes": total_stored,
        "compression_ratio": round(total_raw / total_stored, 3) if total_stored else None,
        "layers": layers,
    })
    return out


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def format_report(d: dict[str, Any]) -> str:
    m = d["model"]
    lines = [
        f"store       {d['path']}",
        f"model       {m.get('model_type')}: {m.get('num_layers')} layers, {m.get('kv_heads')} KV heads of "
        f"{m.get('head_dim')}, signature {str(d['signature'])[:16]}",
        f"dtype       {d['dtype']}   layout version {d['layout_version']}   chunking {d['chunking']}",
        f"session     {d['session']}   records {d['records']}   LMDB map {_mb(d['map_bytes'])}",
    ]
    if d["session"] != "complete":
        return "\n".join(lines)
    opts = d["options"]
    lines += [
        f"context     {d['context_tokens']} tokens x batch {d['batch']}",
        f"on disk     {_mb(d['stored_bytes'])} stored, {_mb(d['raw_bytes'])} raw, compression x{d['compression_ratio']}",
        f"tiers       a saved session lives on disk; reopened with device budget {opts.get('device_budget')} and "
        f"host budget {opts.get('host_budget')} tokens per layer ({opts.get('mode')} mode)",
    ]
    if d["info"]:
        lines.append("info        " + ", ".join(f"{k}={v}" for k, v in d["info"].items()))
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvtier inspect", description=__doc__)
    p.add_argument("store", help="store directory")
    p.add_argument("--plot", metavar="FILE.png", help="draw chunk sizes and skew by layer")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        d = describe(args.store)
        if args.json:
            import json

            print(json.dumps(d, indent=2))
        else:
            print(format_report(d))
        if args.plot:
            plot(d, args.plot)
            print(f"wrote {args.plot}", file=sys.stderr)
    except (KVTierError, FileNotFoundError) as exc:
        print(f"kvtier inspect: error: {exc}", file=sys.stderr)
        return 2
    return 0
