"""`kvtier inspect STORE`: what a store or a published session holds, read from its header and session manifest
(no model needed); `kvtier sessions URL`: the sessions published on a Redis/Valkey server."""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from . import session
from .cli import error_line
from .cli_args import UsageError, run_command
from .errors import IncompleteSessionError, KVTierError, printable
from .sizes import human_bytes
from .store import manifest as mf
from .store.backend import RecordStore
from .store.disk import DiskStore
from .store.remote import (
    DEFAULT_PREFIX,
    REMOTE_META,
    RemoteSessionStore,
    RemoteURL,
    is_remote,
    list_sessions,
)


def open_store(target: str | Path) -> RecordStore:
    """The store `describe` reads: a directory opened read-only, or a session published on a server
    (`redis://host:6379/0/NAME`), of which only the metadata is read: its records stay on the server."""
    if isinstance(target, str) and is_remote(target):
        url = RemoteURL.parse(target)
        if url.name is None:
            raise UsageError(f"{url.shown} names no session: add /NAME to the URL (`kvtier sessions "
                             f"{url.shown}` lists them)")
        return RemoteSessionStore(url)  # its local record cache is a temporary directory, left empty
    return DiskStore(Path(target), create=False, readonly=True)


def describe(path: str | Path) -> dict[str, Any]:
    """A plain-data summary of a store or a published session: model, session, and per-layer chunks, bytes
    and skew.

    A store is opened read-only (nothing in it is written, not even a lock file); a published session is read
    through the same `RecordStore` interface, its metadata only (records are not downloaded; the server is
    asked that each one is there). Either is checked as `open` does, against the model facts in its own
    header, so a damaged or foreign store is one KVTierError."""
    disk = open_store(path)
    try:
        header = session.read_header(disk)
        try:
            _, manifest = session.read_session(disk, None)
        except IncompleteSessionError:
            manifest = None
        n_records = disk.record_count()
        server = _server_facts(disk) if isinstance(disk, RemoteSessionStore) else None
        map_bytes = None if server is not None else disk.map_bytes
        caches = None if server is not None else disk.get_meta(REMOTE_META)
    finally:
        disk.close()
    out: dict[str, Any] = {
        "path": disk.where if server is not None else str(disk.path),
        "layout_version": header.get("layout_version"),
        "model": header.get("structure", {}),
        "signature": header.get("signature"),
        "dtype": header.get("dtype"),
        "chunking": header.get("layout"),
        "records": n_records,
        "map_bytes": map_bytes,
        "session": "complete" if manifest is not None else "incomplete",
    }
    if server is not None:
        out["server"] = server
    if isinstance(caches, dict):  # a local cache of a server session (kvtier qa --remote keeps one)
        out["caches"] = {"name": caches.get("name"), "prefix": caches.get("prefix")}
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


def _server_facts(store: RemoteSessionStore) -> dict[str, Any]:
    """What the published session's pointer says about it on the server."""
    pointer = store.pointer
    return {"url": store.url.shown, "name": store.url.name, "prefix": store.url.prefix,
            "bytes": pointer["bytes"], "published": _when(pointer.get("published"))}


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _when(value: Any) -> float | None:
    """A publish time from a pointer (untrusted: anything that is not a plausible time is None)."""
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < 1e11:
        return float(value)
    return None


def _local_time(epoch: float | None) -> str:
    return "-" if epoch is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(epoch))


def format_report(d: dict[str, Any]) -> str:
    """The text report. Every value read from the store goes through `printable`: a session's `info` and the
    paths in it are whatever a user wrote, and must not reach the terminal as escape sequences."""
    m, p = d["model"], printable
    server = d.get("server")
    where = (f"on the server {human_bytes(server['bytes'])}, published {_local_time(server['published'])}"
             if server else f"LMDB map {_mb(d['map_bytes'])}")
    lines = [
        f"store       {p(d['path'])}" + (
            f"   (key prefix {p(server['prefix'])})" if server and server["prefix"] != DEFAULT_PREFIX else ""),
        f"model       {p(m.get('model_type'))}: {p(m.get('num_layers'))} layers, {p(m.get('kv_heads'))} KV heads "
        f"of {p(m.get('head_dim'))}, signature {p(str(d['signature'])[:16])}",
        f"dtype       {p(d['dtype'])}   layout version {p(d['layout_version'])}   chunking {p(d['chunking'])}",
    ]
    if d.get("caches"):
        c = d["caches"]
        lines.append(f"session     none here: a local cache of the records of server session {p(c['name'])} (key "
                     f"prefix {p(c['prefix'])}); records {d['records']}   {where}")
        return "\n".join(lines)
    lines.append(f"session     {p(d['session'])}   records {d['records']}   {where}")
    if d["session"] != "complete":
        return "\n".join(lines)
    opts = d["options"]
    lines += [
        f"context     {d['context_tokens']} tokens x batch {d['batch']}",
        f"{'stored' if server else 'on disk':12}{_mb(d['stored_bytes'])} stored, {_mb(d['raw_bytes'])} raw, "
        f"compression x{d['compression_ratio']}",
        f"tiers       a {'published session lives on the server' if server else 'saved session lives on disk'}; "
        f"reopened with device budget {p(opts.get('device_budget'))} "
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
    if not str(path).strip():
        raise KVTierError("--plot needs a file name, such as chunks.png")
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


def sessions(target: str) -> dict[str, Any]:
    """The sessions published on a server under the URL's key prefix, as plain data (`kvtier sessions --json`).

    What a pointer says is untrusted: each value is checked for its type before it is used."""
    url = RemoteURL.parse(target)
    if url.name is not None:
        raise UsageError(f"{url.shown} names a session: `kvtier sessions` takes the server alone "
                         f"(redis://host:6379/0), and `kvtier inspect {url.shown}` shows that session")
    out = []
    for pointer in list_sessions(url):
        name = pointer["name"]
        if "error" in pointer:  # a damaged pointer or one of another kvtier version: listed, not read
            out.append({"name": name, "url": url.with_name(name).shown, "error": pointer["error"]})
            continue
        structure = pointer.get("structure") if isinstance(pointer.get("structure"), dict) else {}
        info = pointer.get("info") if isinstance(pointer.get("info"), dict) else {}
        published = _when(pointer.get("published"))
        out.append({
            "name": name, "url": url.with_name(name).shown,
            "model_type": structure.get("model_type"), "num_layers": structure.get("num_layers"),
            "dtype": pointer.get("dtype"), "signature": pointer.get("signature"),
            "tokens": pointer["length"], "batch": pointer.get("batch"), "records": pointer["records"],
            "bytes": pointer["bytes"], "published": published,
            "published_utc": None if published is None else
            datetime.datetime.fromtimestamp(published, datetime.timezone.utc).isoformat(timespec="seconds"),
            "info": info,
        })
    return {"server": url.server, "prefix": url.prefix, "sessions": out}


def format_sessions(d: dict[str, Any]) -> str:
    """The text listing: one row per session, every string from the server through `printable`."""
    p = printable
    if not d["sessions"]:
        return f"no kvtier sessions on {p(d['server'])} under the key prefix {p(d['prefix'])}"
    rows = [("NAME", "MODEL", "TOKENS", "SIZE", "PUBLISHED", "INFO")]
    for s in d["sessions"]:
        if "error" in s:
            rows.append((p(s["name"]), "-", "-", "-", "-", "unreadable: " + error_line(Exception(s["error"]))[:200]))
            continue
        model = ", ".join(x for x in (p(s["model_type"] or "?"), f"{p(s['num_layers'])} layers" if s["num_layers"]
                                      is not None else "", p(s["dtype"] or "")) if x)
        info = ", ".join(f"{p(k)}={p(v)}" for k, v in s["info"].items()) or "-"
        rows.append((p(s["name"]), model, str(s["tokens"]), human_bytes(s["bytes"]), _local_time(s["published"]),
                     info))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    right = {2, 3}  # numbers
    return "\n".join("  ".join([*(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in
                                  enumerate(zip(r[:5], widths))), r[5]]) for r in rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvtier inspect", description=__doc__.split("; `kvtier sessions")[0] + ".")
    p.add_argument("store", help="store directory, or a session on a Redis/Valkey server "
                                 "(redis://[user:password@]host:6379/0/NAME[?prefix=P], rediss:// for TLS): "
                                 "its metadata is read, its records stay on the server")
    p.add_argument("--plot", metavar="FILE.png", help="draw chunk sizes and skew by layer (png, pdf, svg, ...)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    return p


def _inspect(args: argparse.Namespace) -> int:
    if args.plot is not None:
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
    return 0


def main(argv: list[str] | None = None) -> int:
    """`kvtier inspect`: a damaged or foreign store, a missing one, a server that fails: one line, exit code 2."""
    return run_command("kvtier inspect", _inspect, build_parser().parse_args(argv))


def build_sessions_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvtier sessions",
        description="List the sessions published on a Redis/Valkey server (by cache.save(remote=...) or kvtier qa "
                    "--remote): name, model, tokens, size, when published, and the session's info. Nothing is "
                    "downloaded but each session's pointer.")
    p.add_argument("server", help="redis://[user:password@]host:6379/0[?prefix=P] (rediss:// for TLS; valkey:// "
                                  "too); the key prefix defaults to kvtier")
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    return p


def _sessions(args: argparse.Namespace) -> int:
    d = sessions(args.server)
    if args.json:
        import json

        print(json.dumps(d, indent=2))
    else:
        print(format_sessions(d))
    return 0


def sessions_main(argv: list[str] | None = None) -> int:
    return run_command("kvtier sessions", _sessions, build_sessions_parser().parse_args(argv))
