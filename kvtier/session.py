"""Saved sessions: a store's header, creating a store, saving a cache into it and loading it back.

A store holds a sealed JSON header (layout version, store id, model signature, dtype, chunking options)
and, once `save()` ran, a sealed session manifest (`kvtier.store.manifest`: chunk table, lengths, row
maps, the session ids that wrote each record, options, user info, the token ids) beside the chunk records.
A store created for a cache is marked "incomplete" until `save()` completes, so an interrupted prefill is
recognisable as such. Everything read back is checked before it is used; nothing here unpickles anything.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .config import KVTierConfig
from .errors import (
    CacheInputError,
    IncompleteSessionError,
    StoreCorruptError,
    StoreError,
    StoreMismatchError,
    StoreMissingRecordError,
    brief,
)
from .layers import TieredLayer
from .model_spec import FULL, SIGNATURE_VERSION, ModelSpec
from .sparse.profile import LayerSkew
from .store import manifest as mf
from .store.backend import RecordStore
from .store.chunk import ABSTRACT_ID, PAGES_ID, Chunk, Tier, chunk_key
from .store.codec import LAYOUT_VERSION, RecordHeader, dtype_name
from .store.disk import DiskStore, is_store

if TYPE_CHECKING:
    from .cache import KVTierCache

STORE_META, SESSION_META = mf.STORE_META, mf.SESSION_META
# Options a saved session fixes (they shape the chunk table); budgets and the rest may change on reopen.
LAYOUT_OPTIONS = ("chunk_size", "sink_tokens", "recent_window", "page_size")
# Options a session was saved with (shown by `kvtier inspect`; a reopened session takes the caller's).
RUNTIME_OPTIONS = tuple(f.name for f in dataclasses.fields(KVTierConfig)
                        if f.name not in (*LAYOUT_OPTIONS, "store_path", "initial_map_bytes"))


# ------------------------------------------------------------------------------------------ header
def store_header(spec: ModelSpec, config: KVTierConfig) -> dict[str, Any]:
    return {
        "format": "kvtier",
        "layout_version": LAYOUT_VERSION,
        "store_id": secrets.token_hex(16),
        "signature": spec.signature,
        "dtype": dtype_name(spec.dtype),
        "structure": spec.structure,
        "layout": {name: getattr(config, name) for name in LAYOUT_OPTIONS},
        "created": time.time(),
    }


def read_header(disk: RecordStore) -> dict[str, Any]:
    """The store's header, checked for shape (not yet against a model)."""
    header = disk.get_meta(STORE_META)
    if header is None:
        raise IncompleteSessionError(
            f"kvtier store {disk.where} was interrupted before its first commit (it has no header yet); prefill "
            "again with overwrite=True"
        )
    where = f"kvtier store {disk.where}: header"
    if not isinstance(header, dict):
        raise StoreCorruptError(f"{where} is not an object")
    version = header.get("layout_version")
    if version != LAYOUT_VERSION:
        raise StoreMismatchError(
            f"kvtier store {disk.where} has layout version {version}; this kvtier reads version {LAYOUT_VERSION}. "
            "Prefill the document again with this version."
        )
    if header.get("format") != "kvtier" or not isinstance(header.get("store_id"), str):
        raise StoreCorruptError(f"{where} is not a kvtier store header")
    if not isinstance(header.get("signature"), str) or not isinstance(header.get("layout"), dict):
        raise StoreCorruptError(f"{where}: signature or layout is missing")
    try:
        KVTierConfig(**{name: header["layout"].get(name) for name in LAYOUT_OPTIONS})
    except (ValueError, TypeError) as exc:
        raise StoreCorruptError(f"{where}: layout {exc}") from None
    mf.parse_shape(header, where)
    return header


def check_header(header: dict, spec: ModelSpec, path: Path | str) -> None:
    """Refuse a store of another dtype or model, saying which."""
    if header.get("dtype") != dtype_name(spec.dtype):
        raise StoreMismatchError(
            f"kvtier store {path} was written with dtype {header.get('dtype')}, the model runs in "
            f"{dtype_name(spec.dtype)}; load the model with dtype={header.get('dtype')} or prefill again"
        )
    theirs = header.get("structure", {})
    if header.get("signature") != spec.signature:
        if not isinstance(theirs, dict) or theirs.get("signature_version") != SIGNATURE_VERSION:
            raise StoreMismatchError(
                f"kvtier store {path} was written by a kvtier whose model signature covers other things (version "
                f"{theirs.get('signature_version', 1) if isinstance(theirs, dict) else '?'}, this kvtier's is "
                f"{SIGNATURE_VERSION}); prefill the document again")
        raise StoreMismatchError(f"kvtier store {path} was written by another model ({_differences(theirs, spec)})")
    if theirs != spec.structure:
        raise StoreCorruptError(f"kvtier store {path}: header structure does not match its own model signature")


def _differences(theirs: dict, spec: ModelSpec) -> str:
    """What differs between a store's model and this one, setting by setting."""
    out = []
    for key, ours in spec.structure.items():
        stored = theirs.get(key)
        if isinstance(ours, dict) and isinstance(stored, dict):
            out += [f"{key}.{k}: store {stored.get(k)!r} vs model {ours.get(k)!r}"
                    for k in sorted({*ours, *stored}) if stored.get(k) != ours.get(k)]
        elif stored != ours:
            out.append(f"{key}: store {stored!r} vs model {ours!r}")
    return ", ".join(out) or "same architecture and settings, different weights"


def spec_shape(spec: ModelSpec) -> mf.Shape:
    return mf.Shape([mf.FULL if layer.kind == FULL else mf.SLIDING for layer in spec.layers],
                    [layer.window for layer in spec.layers], spec.kv_heads, spec.head_dim, spec.dtype)


def create_store(path: Path, spec: ModelSpec, config: KVTierConfig, overwrite: bool) -> DiskStore:
    """A fresh store for a cache, its session marked incomplete until `save()`.

    overwrite: replace the store at `path`, even a damaged one; never a directory that is not a store."""
    disk = DiskStore(path, create=True, wipe=overwrite and is_store(path),
                     initial_map_bytes=config.initial_map_bytes, max_bytes=config.max_store_bytes)
    try:
        if disk.get_meta(STORE_META) is not None or disk.record_count():
            raise StoreError(
                f"kvtier store {path} already holds data; reopen it with KVTierCache.open(path, model), "
                "or pass overwrite=True to replace it"
            )
        disk.put_many([], meta={STORE_META: store_header(spec, config),
                                SESSION_META: {"state": "incomplete", "started": time.time()}})
        disk.sync()
    except BaseException:
        disk.close()
        raise
    return disk


def read_session(disk: RecordStore, spec: ModelSpec | None) -> tuple[dict, mf.Manifest]:
    """The store's header and complete session manifest, checked (against the model when one is given)."""
    header = read_header(disk)
    if spec is not None:
        check_header(header, spec, disk.where)
    shape = spec_shape(spec) if spec is not None else mf.parse_shape(header, f"kvtier store {disk.where}")
    session = disk.get_meta(SESSION_META)
    if not isinstance(session, dict) or session.get("state") != "complete":
        raise IncompleteSessionError(
            f"kvtier store {disk.where} holds no complete session: its prefill was interrupted or it was never "
            "saved. Prefill again (KVTierCache.for_model(model, store_path=..., overwrite=True)) and call "
            "cache.save()."
        )

    def check_options(options: dict[str, Any]) -> None:
        unknown = sorted(set(options) - set(RUNTIME_OPTIONS))
        if unknown:
            raise ValueError(f"unknown options {unknown}")
        KVTierConfig(**{**header["layout"], **options})

    manifest = mf.parse(session, where=f"kvtier store {disk.where}: session manifest", header=header, shape=shape,
                        records=disk.record_count(), data_bytes=disk.data_bytes(), check_options=check_options)
    names = dict(manifest.record_keys())
    sizes = dict(zip(names, disk.record_sizes(names)))
    missing = [key for key, size in sizes.items() if size is None]
    if missing:
        raise StoreMissingRecordError(f"{names[missing[0]]}: record missing from store {disk.where}"
                                      + (f" ({len(missing) - 1} more missing)" if len(missing) > 1 else ""))
    manifest.check_record_sizes(sizes, shape, f"kvtier store {disk.where}: session manifest")
    return header, manifest


def reopen_options(header: dict, options: dict[str, Any]) -> dict[str, Any]:
    """Chunking options from the store; every runtime option (budgets, mode, threads) from the caller alone.

    A store is data: it never decides how much memory, how many threads or which attention a process uses.
    The saver's options stay in the manifest for `kvtier inspect` to show. A chunking option the caller gives
    must be the store's own: the saved chunk table, recent windows and page abstracts were cut by it."""
    options = dict(options)
    for name in LAYOUT_OPTIONS:
        stored = header["layout"][name]
        if name in options and options[name] != stored:
            raise ValueError(f"`{name}`={brief(options[name])}: this session was saved with {name}={stored}, and a "
                             "reopened session keeps the chunking it was saved with; leave it out (or prefill again "
                             "with the new value)")
        options[name] = stored
    # Sparse mode plans new chunks within [min_chunk_size, max_chunk_size]; a session saved with a chunk_size
    # outside the default bounds (an exact-mode session, or other bounds) widens them, unless the caller set them.
    size = options["chunk_size"]
    for name, default, outside in (("min_chunk_size", KVTierConfig.min_chunk_size, lambda b: size < b),
                                   ("max_chunk_size", KVTierConfig.max_chunk_size, lambda b: size > b)):
        bound = options.get(name, default)
        if isinstance(bound, int) and not isinstance(bound, bool) and outside(bound):
            if name in options and options.get("mode") == "sparse" and options.get("adaptive_chunks", True):
                raise ValueError(f"`{name}`={bound}: this session was saved with chunk_size={size}, which sparse "
                                 f"mode's chunk planning must allow; pass {name}={size} or leave it out")
            if name not in options:
                options[name] = size
    return options


# -------------------------------------------------------------------------------------------- save
MAX_INFO_DEPTH = 100  # nesting of `info` (deeper JSON is refused: its parser and ours recurse)


def check_info(info: Any) -> None:
    """ValueError unless `info` is a dict of JSON data (str keys; str, finite numbers, bools, None, lists, dicts),
    which a reopened session reads back as it was written; checked before a save writes anything."""
    def bad(where: str, value: Any, depth: int = 0) -> str | None:
        if depth > MAX_INFO_DEPTH and isinstance(value, (dict, list, tuple)):
            return f"info nests deeper than {MAX_INFO_DEPTH} levels (at {where[:80]}...)"
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    return f"{where} has the key {key!r}; keys must be str"
                found = bad(f"{where}[{key!r}]", item, depth + 1)
                if found:
                    return found
            return None
        if isinstance(value, (list, tuple)):
            return next((found for i, item in enumerate(value) if (found := bad(f"{where}[{i}]", item, depth + 1))),
                        None)
        if isinstance(value, float) and not math.isfinite(value):
            return f"{where} is {value!r}; JSON has no NaN or infinity"
        if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 1024:
            return f"{where} is an integer of {value.bit_length()} bits; info holds numbers up to 1024 bits"
        if value is None or isinstance(value, (str, int, float)):
            return None
        return f"{where} is a {type(value).__name__}; info holds JSON data (str, numbers, bools, None, lists, dicts)"

    if not isinstance(info, dict):
        raise ValueError(f"info must be a dict of JSON data, got {type(info).__name__}")
    problem = bad("info", info)
    if problem:
        raise ValueError(problem)


def save(cache: "KVTierCache", info: dict[str, Any] | None) -> Path:
    """Write every chunk, the recent windows and sliding buffers, then the abstracts and the manifest in one
    transaction (the commit point), then fsync.

    Every record written before the commit point has a key no saved manifest names yet; the abstract tables
    are the only records rewritten under the same key, so they commit together with the manifest. A save
    interrupted at any point (Ctrl-C, a kill, a full disk) leaves the previous saved session readable as it
    was, which is what lets a long prefill be saved after each segment and resumed from the last save."""
    lengths = {layer.logical_length for layer in cache.layers}
    if len(lengths) != 1 or cache.interrupted:
        raise IncompleteSessionError(
            f"the last forward pass did not finish (layers hold {sorted(lengths)} tokens); the cache cannot be "
            "saved. Reset it and prefill again."
        )
    if info is not None:
        check_info(info)
    info = dict(info if info is not None else cache.info)
    tiers = cache.tiers
    disk = tiers.disk
    if isinstance(disk, DiskStore):
        disk.check_in_place()  # a store removed or moved meanwhile would take the session with it
    header = read_header(disk)
    entries = []
    abstracts: list[tuple[bytes, bytes]] = []  # written with the manifest, in its transaction
    for layer in cache.layers:
        if isinstance(layer, TieredLayer):
            layer.commit_pending()
            tiers.persist(layer.chunks)
            window = layer.pool.read(layer.win_slots) if layer.win_slots.numel() else (None, None)
            entry = mf.LayerEntry(
                mf.FULL,
                [mf.ChunkRow(c.chunk_id, c.start, c.length, c.pinned, c.writer, c.stored_batch,
                             None if c.disk_rows is None else tuple(c.disk_rows.tolist()), c.lossy,
                             tiers.record_sizes[c.key][2], c.importance, c.record_start) for c in layer.chunks],
                tail=_persist_run(cache, layer.index, layer.win_start, *window),
                decode_chunk=layer.decode_chunk,
                skew=None if layer.skew is None else layer.skew.to_dict(),
            )
            if layer.chunks:
                kmin, kmax, _, _ = layer.abstracts.view()
                pages = layer.abstracts.pages()
                abstracts.append(_abstracts_record(cache, layer.index, ABSTRACT_ID, kmin, kmax))
                abstracts.append(_abstracts_record(cache, layer.index, PAGES_ID, pages.pmin, pages.pmax))
        else:
            start = layer.length - (0 if layer.k is None else layer.k.shape[2])
            entry = mf.LayerEntry(mf.SLIDING, buffer=_persist_run(cache, layer.index, start, layer.k, layer.v))
        entries.append(entry)
    writers = list(dict.fromkeys([tiers.session_id, *(c.session for e in entries for c in e.chunks)]))
    tokens = cache.token_ids
    manifest = mf.Manifest(
        store_id=header["store_id"], session=tiers.session_id, sessions=writers, signature=cache.spec.signature,
        dtype=dtype_name(cache.dtype), length=cache.get_seq_length(), batch=cache.batch_size,
        next_chunk_id=tiers.next_chunk_id, saved=time.time(),
        options={name: getattr(cache.config, name) for name in RUNTIME_OPTIONS},
        info=info,
        tokens=None if tokens is None else tokens.to("cpu", torch.int32).contiguous().numpy().tobytes(),
        layers=entries,
    )
    disk.put_many(abstracts, meta={SESSION_META: manifest.to_json()})
    keys = {key for key, _ in manifest.record_keys()}
    live = {c.key for layer in cache.layers if isinstance(layer, TieredLayer) for c in layer.chunks if c.on_disk}
    tiers.drop_records([k for k in cache._saved_keys - keys if k not in live])
    cache._saved_keys = keys
    cache.info = info  # the next save without info= keeps it, as a reopened session does
    disk.sync()
    return disk.path


def _abstracts_record(cache: KVTierCache, layer_idx: int, table_id: int, kmin: torch.Tensor,
                      kmax: torch.Tensor) -> tuple[bytes, bytes]:
    """(key, record) of a layer's chunk or page abstracts (minima and maxima, [B, Hkv, rows, D] each), as
    `TierManager.read_abstracts` reads them back; encoded here so that `save` can commit them in the
    manifest's transaction."""
    tiers = cache.tiers
    b, h, n, d = kmin.shape
    header = RecordHeader(layer_idx, table_id, 0, n, b, h, d, kmin.dtype, tiers.signature, tiers.session_id)
    return chunk_key(layer_idx, table_id), tiers.codec.encode(header, kmin.cpu().contiguous(),
                                                              kmax.cpu().contiguous())


def _persist_run(cache: "KVTierCache", layer_idx: int, start: int, k: torch.Tensor | None,
                 v: torch.Tensor | None) -> mf.Run | None:
    """Write an unchunked run of tokens (a recent window, a sliding buffer) as one record."""
    if k is None or k.shape[2] == 0:
        return None
    run = Chunk(layer_idx, cache.tiers.new_chunk_id(), start, k.shape[2], Tier.DISK, k.shape[0])
    cache.tiers.write_records([(run, k.cpu(), v.cpu())])
    return mf.Run(run.chunk_id, start, k.shape[2])


# -------------------------------------------------------------------------------------------- load
def load(cache: "KVTierCache", manifest: mf.Manifest) -> None:
    """Rebuild the layers of a freshly built cache from a checked manifest: chunks stay on disk until needed."""
    if any(c.lossy for e in manifest.layers for c in e.chunks) and cache.config.mode != "sparse":
        raise CacheInputError("this session stores int8 chunks (lossy_disk); open it in mode='sparse', exact mode "
                              "would not be exact")
    tiers = cache.tiers
    tiers.next_chunk_id = manifest.next_chunk_id
    cache.info = dict(manifest.info)
    length, batch = manifest.length, manifest.batch
    shape = spec_shape(cache.spec)
    config = cache.config  # exact mode will bring every chunk to the device; sparse mode its selection
    # never more than the session holds: the saved window size is the store's word, its length is checked
    cache.reserve(length if config.mode == "exact" else min(length, config.budget_tokens(length) + config.recent_window))
    for layer, entry in zip(cache.layers, manifest.layers):
        layer.batch = batch
        if isinstance(layer, TieredLayer):
            # the arena's shape, even when no recent window comes back to it (every token sealed in chunks):
            # a crop, a span or warm() may bring tokens to the device before any pass writes there
            layer.pool.init_shape(batch, cache.spec.kv_heads, cache.spec.head_dim)
            for row in entry.chunks:
                chunk = Chunk(layer.index, row.chunk_id, row.start, row.length, Tier.DISK, row.record_batch,
                              on_disk=True, pinned=row.pinned, persisted=True, row=len(layer.chunks),
                              disk_rows=None if row.rows is None else torch.tensor(row.rows),
                              importance=row.importance, writer=row.session, lossy=row.lossy,
                              record_start=row.record_start)
                layer.chunks.append(chunk)
                tiers.record_sizes[chunk.key] = (row.length, shape.kv_bytes(row.record_batch, row.length),
                                                 row.stored_bytes)
            if layer.chunks:
                kmin, kmax = tiers.read_abstracts(manifest.abstracts_header(layer.index, shape))
                pmin, pmax = tiers.read_abstracts(manifest.pages_header(layer.index, shape, config.page_size))
                layer.abstracts.extend(kmin, kmax, [c.start for c in layer.chunks], [c.length for c in layer.chunks],
                                       pmin, pmax)  # rows in chunk order (row == index), pages end to end
            layer.decode_chunk = entry.decode_chunk
            layer.skew = None if entry.skew is None else LayerSkew(**entry.skew)
            layer.length = layer.chunks[-1].end if layer.chunks else 0
            if entry.tail is not None:
                _load_window(cache, layer, _run_chunk(cache, layer.index, entry.tail, manifest))
            layer.length = length
        else:
            if entry.buffer is not None:
                run = _run_chunk(cache, layer.index, entry.buffer, manifest)
                k, v = tiers.read_record(run)
                layer.k, layer.v = k.to(cache.device), v.to(cache.device)
            layer.length = length
    cache.restore_tokens(manifest.token_ids(), length)
    keys = {key for key, _ in manifest.record_keys()}
    cache._saved_keys = keys
    # Records no saved session refers to are leftovers of an interrupted continuation, or of deletions a full store
    # refused: drop them, where the disk has room for the deletion (`drop_records` leaves them otherwise, so a store
    # left so by a full disk still opens; kept, they are harmless: no manifest names them, so none is read).
    tiers.drop_records([k for k in tiers.disk.keys() if k not in keys])


def _run_chunk(cache: "KVTierCache", layer_idx: int, run: mf.Run, manifest: mf.Manifest) -> Chunk:
    """A recent window or sliding buffer as a chunk, so its record is read and checked like any other."""
    return Chunk(layer_idx, run.chunk_id, run.start, run.length, Tier.DISK, manifest.batch, writer=manifest.session)


def _load_window(cache: "KVTierCache", layer: TieredLayer, run: Chunk) -> None:
    k, v = cache.tiers.read_record(run)
    layer.pool.init_shape(k.shape[0], k.shape[1], k.shape[3])
    slots = cache.tiers.allocate_device(layer.index, run.length)
    if slots is None:
        raise CacheInputError(f"device_budget={cache.config.device_budget} tokens cannot hold layer {layer.index}'s "
                              f"saved recent window of {run.length} tokens; open the session with a larger budget")
    layer.pool.write(slots, k, v, torch.arange(run.start, run.end, device=layer.pool.device))
    layer.win_slots = slots
