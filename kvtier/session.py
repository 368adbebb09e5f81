"""Saved sessions: a store's header, creating a store, saving a cache into it and loading it back.

A store holds a JSON header (layout version, model signature, dtype, chunking options) and, once
`save()` ran, a JSON session manifest (chunk table, lengths, row maps, options, user info) beside the
chunk records. A store created for a cache is marked "incomplete" until `save()` completes, so an
interrupted prefill is recognisable as such. Nothing here unpickles anything.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .config import KVTierConfig
from .errors import IncompleteSessionError, StoreError, StoreMismatchError
from .layers import TieredLayer
from .model_spec import ModelSpec
from .sparse.profile import LayerSkew
from .store.chunk import Chunk, Tier, chunk_key
from .store.codec import LAYOUT_VERSION, dtype_name
from .store.disk import DiskStore
from .store.tiers import ABSTRACT_ID

if TYPE_CHECKING:
    from .cache import KVTierCache

STORE_META = "store"
SESSION_META = "session"
# Options a saved session fixes (they shape the chunk table); budgets and the rest may change on reopen.
LAYOUT_OPTIONS = ("chunk_size", "sink_tokens", "recent_window")
# Options a reopened session takes from the saved one unless the caller overrides them.
RUNTIME_OPTIONS = tuple(f.name for f in dataclasses.fields(KVTierConfig)
                        if f.name not in (*LAYOUT_OPTIONS, "store_path", "initial_map_bytes"))


# ------------------------------------------------------------------------------------------ header
def store_header(spec: ModelSpec, config: KVTierConfig) -> dict[str, Any]:
    return {
        "format": "kvtier",
        "layout_version": LAYOUT_VERSION,
        "signature": spec.signature,
        "dtype": dtype_name(spec.dtype),
        "structure": spec.structure,
        "layout": {name: getattr(config, name) for name in LAYOUT_OPTIONS},
        "created": time.time(),
    }


def check_header(header: dict, spec: ModelSpec, path: Path) -> None:
    """Refuse a store of another layout version, dtype or model, saying which."""
    version = header.get("layout_version")
    if version != LAYOUT_VERSION:
        raise StoreMismatchError(
            f"kvtier store {path} has layout version {version}; this kvtier reads version {LAYOUT_VERSION}. "
            "Prefill the document again with this version."
        )
    if header.get("dtype") != dtype_name(spec.dtype):
        raise StoreMismatchError(
            f"kvtier store {path} was written with dtype {header.get('dtype')}, the model runs in "
            f"{dtype_name(spec.dtype)}; load the model with dtype={header.get('dtype')} or prefill again"
        )
    if header.get("signature") != spec.signature:
        theirs = header.get("structure", {})
        detail = ", ".join(f"{k}: store {theirs.get(k)!r} vs model {v!r}" for k, v in spec.structure.items()
                           if theirs.get(k) != v) or "same architecture, different weights"
        raise StoreMismatchError(f"kvtier store {path} was written by another model ({detail})")


def create_store(path: Path, spec: ModelSpec, config: KVTierConfig, overwrite: bool) -> DiskStore:
    """A fresh store for a cache, its session marked incomplete until `save()`."""
    disk = DiskStore(path, create=True, initial_map_bytes=config.initial_map_bytes, max_bytes=config.max_store_bytes)
    try:
        if disk.get_meta(STORE_META) is not None or any(True for _ in disk.keys()):
            if not overwrite:
                raise StoreError(
                    f"kvtier store {path} already holds data; reopen it with KVTierCache.open(path, model), "
                    "or pass overwrite=True to replace it"
                )
            disk.remove_many(list(disk.keys()))
        disk.put_many([], meta={STORE_META: store_header(spec, config),
                                SESSION_META: {"state": "incomplete", "started": time.time()}})
        disk.sync()
    except BaseException:
        disk.close()
        raise
    return disk


def read_session(disk: DiskStore, spec: ModelSpec) -> tuple[dict, dict]:
    """The store's header and complete session manifest, checked against the model."""
    header = disk.get_meta(STORE_META)
    if header is None:
        raise StoreMismatchError(f"{disk.path} is not a kvtier store (no store header)")
    check_header(header, spec, disk.path)
    session = disk.get_meta(SESSION_META)
    if session is None or session.get("state") != "complete":
        raise IncompleteSessionError(
            f"kvtier store {disk.path} holds no complete session: its prefill was interrupted or it was never "
            "saved. Prefill again (KVTierCache.for_model(model, store_path=..., overwrite=True)) and call "
            "cache.save()."
        )
    return header, session


def reopen_options(header: dict, session: dict, options: dict[str, Any]) -> dict[str, Any]:
    """Chunking options from the store; every other option from the saved session unless given."""
    options = dict(options)
    for name in LAYOUT_OPTIONS:
        options.setdefault(name, header["layout"][name])
    for name, value in session.get("options", {}).items():
        if name in RUNTIME_OPTIONS:
            options.setdefault(name, value)
    return options


# -------------------------------------------------------------------------------------------- save
def save(cache: "KVTierCache", info: dict[str, Any] | None) -> Path:
    """Write every chunk, the recent windows and sliding buffers, the abstracts, then the manifest in one
    transaction (the commit point), then fsync."""
    lengths = {layer.logical_length for layer in cache.layers}
    if len(lengths) != 1:
        raise IncompleteSessionError(
            f"the last forward pass did not finish (layers hold {sorted(lengths)} tokens); the cache cannot be "
            "saved. Reset it and prefill again."
        )
    tiers = cache.tiers
    disk = tiers.disk
    manifest_layers, keys = [], set()
    for layer in cache.layers:
        if isinstance(layer, TieredLayer):
            layer.commit_pending()
            tiers.persist(layer.chunks)
            window = layer.pool.read(layer.win_slots) if layer.win_slots.numel() else (None, None)
            entry: dict[str, Any] = {
                "kind": "full",
                "chunks": [[c.chunk_id, c.start, c.length, c.pinned, _rows_list(c.disk_rows),
                            *tiers.record_sizes[c.key][1:], c.importance] for c in layer.chunks],
                "tail": _persist_run(cache, layer.index, layer.win_start, *window),
                "decode_chunk": layer.decode_chunk,
                "skew": None if layer.skew is None else layer.skew.to_dict(),
            }
            keys.update(c.key for c in layer.chunks)
            if layer.chunks:
                kmin, kmax, _, _ = layer.abstracts.view()
                keys.add(tiers.write_abstracts(layer.index, kmin, kmax))
        else:
            start = layer.length - (0 if layer.k is None else layer.k.shape[2])
            entry = {"kind": "sliding", "buffer": _persist_run(cache, layer.index, start, layer.k, layer.v)}
        for run in (entry.get("tail"), entry.get("buffer")):
            if run is not None:
                keys.add(chunk_key(layer.index, run[0]))
        manifest_layers.append(entry)
    manifest = {
        "state": "complete",
        "layout_version": LAYOUT_VERSION,
        "signature": cache.spec.signature,
        "dtype": dtype_name(cache.dtype),
        "length": cache.get_seq_length(),
        "batch": cache.batch_size,
        "next_chunk_id": tiers.next_chunk_id,
        "saved": time.time(),
        "options": {name: getattr(cache.config, name) for name in RUNTIME_OPTIONS},
        "info": dict(info if info is not None else cache.info),
        "layers": manifest_layers,
    }
    disk.put_meta(SESSION_META, manifest)
    live = {c.key for layer in cache.layers if isinstance(layer, TieredLayer) for c in layer.chunks if c.on_disk}
    tiers.drop_records([k for k in cache._saved_keys - keys if k not in live])
    cache._saved_keys = keys
    disk.sync()
    return disk.path


def _persist_run(cache: "KVTierCache", layer_idx: int, start: int, k: torch.Tensor | None, v: torch.Tensor | None):
    """Write an unchunked run of tokens (a recent window, a sliding buffer) as one record."""
    if k is None or k.shape[2] == 0:
        return None
    run = Chunk(layer_idx, cache.tiers.new_chunk_id(), start, k.shape[2], Tier.DISK, k.shape[0])
    cache.tiers.write_records([(run, k.cpu(), v.cpu())])
    return [run.chunk_id, start, k.shape[2]]


def _rows_list(rows: torch.Tensor | None) -> list[int] | None:
    return None if rows is None else rows.tolist()


# -------------------------------------------------------------------------------------------- load
def load(cache: "KVTierCache", session: dict) -> None:
    """Rebuild the layers of a freshly built cache from a manifest: chunks stay on disk until needed."""
    if len(session["layers"]) != len(cache.layers):
        raise StoreMismatchError(f"session has {len(session['layers'])} layers, the model has {len(cache.layers)}")
    tiers = cache.tiers
    tiers.next_chunk_id = session["next_chunk_id"]
    cache.info = dict(session.get("info", {}))
    length, batch = session["length"], session["batch"]
    keys: set[bytes] = set()
    for layer, entry in zip(cache.layers, session["layers"]):
        if isinstance(layer, TieredLayer):
            if entry["kind"] != "full":
                raise StoreMismatchError(f"layer {layer.index}: stored as {entry['kind']}, the model's is full")
            for chunk_id, start, n, pinned, rows, raw_bytes, stored_bytes, importance in entry["chunks"]:
                chunk = Chunk(layer.index, chunk_id, start, n, Tier.DISK, batch, on_disk=True, pinned=bool(pinned),
                              persisted=True, disk_rows=None if rows is None else torch.tensor(rows),
                              row=len(layer.chunks), importance=importance)
                layer.chunks.append(chunk)
                keys.add(chunk.key)
                tiers.record_sizes[chunk.key] = (n, raw_bytes, stored_bytes)
            if layer.chunks:
                kmin, kmax = tiers.read_abstracts(layer.index)
                keys.add(chunk_key(layer.index, ABSTRACT_ID))
                for c in layer.chunks:
                    layer.abstracts.append(kmin[:, :, c.row], kmax[:, :, c.row], c.start, c.length)
            layer.decode_chunk = entry.get("decode_chunk", cache.config.chunk_size)
            if entry.get("skew"):
                layer.skew = LayerSkew(**entry["skew"])
            layer.length = layer.chunks[-1].end if layer.chunks else 0
            layer.batch = batch
            _load_window(cache, layer, entry["tail"], keys)
            layer.length = length
        else:
            buf = entry["buffer"]
            if buf is not None:
                run = Chunk(layer.index, buf[0], buf[1], buf[2], Tier.DISK, batch)
                keys.add(run.key)
                k, v = tiers.read_record(run)
                layer.k, layer.v = k.to(cache.device), v.to(cache.device)
            layer.length, layer.batch = length, batch
    cache._saved_keys = keys
    # Records no saved session refers to are leftovers of an interrupted continuation: drop them.
    tiers.drop_records([k for k in tiers.disk.keys() if k not in keys])


def _load_window(cache: "KVTierCache", layer: TieredLayer, tail: list | None, keys: set[bytes]) -> None:
    if tail is None:
        return
    run = Chunk(layer.index, tail[0], tail[1], tail[2], Tier.DISK, layer.batch or 1)
    keys.add(run.key)
    k, v = cache.tiers.read_record(run)
    layer.pool.init_shape(k.shape[0], k.shape[1], k.shape[3])
    slots = cache.tiers.allocate_device(layer.index, run.length)
    layer.pool.write(slots, k, v, torch.arange(run.start, run.end, device=layer.pool.device))
    layer.win_slots = slots
