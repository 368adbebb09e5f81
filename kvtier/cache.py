"""`KVTierCache`: the transformers `Cache` contract, and nothing else.

Storage lives in the per-layer objects (`kvtier.layers`) and the tier manager (`kvtier.store.tiers`);
attention lives in `kvtier.attention`. This class translates transformers' calls into theirs.
"""

from __future__ import annotations

import dataclasses
import inspect
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any

import torch
from transformers.cache_utils import Cache

from .attention import enable
from .config import KVTierConfig
from .errors import (
    CacheInputError,
    IncompleteSessionError,
    StoreError,
    StoreMismatchError,
)
from .handle import KVHandle
from .layers import SlidingLayer, TieredLayer
from .model_spec import FULL, ModelSpec
from .sparse.profile import LayerSkew
from .store.chunk import Chunk, Tier, chunk_key
from .store.codec import LAYOUT_VERSION, dtype_name
from .store.disk import DiskStore
from .store.stats import CacheStats
from .store.tiers import ABSTRACT_ID, TierManager

STORE_META = "store"
SESSION_META = "session"
# Options a saved session fixes (they shape the chunk table); budgets and the rest may change on reopen.
_LAYOUT_OPTIONS = ("chunk_size", "sink_tokens", "recent_window")
# Options a reopened session takes from the saved one unless the caller overrides them.
_RUNTIME_OPTIONS = tuple(f.name for f in dataclasses.fields(KVTierConfig)
                         if f.name not in (*_LAYOUT_OPTIONS, "store_path", "initial_map_bytes"))


def cache_argument(model: torch.nn.Module) -> str:
    """The keyword a model's forward/generate take a cache under: `cache` on transformers >= 5.24 (where
    `past_key_values` is deprecated), `past_key_values` before. Use as `model.generate(**{cache_argument(m): c})`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _model_device(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


class KVTierCache(Cache):
    """A drop-in transformers cache that keeps KV in a device -> host -> disk hierarchy.

    Build it with `KVTierCache.for_model(model, **options)` (options: see `KVTierConfig`), pass it to
    `model.generate(..., past_key_values=cache)` (or `cache=` on transformers >= 5.24), and read
    `cache.stats()` for per-tier accounting. `cache.save()` persists a prefilled cache in its store, and
    `KVTierCache.open(path, model)` reopens it in another process.
    """

    def __init__(
        self,
        spec: ModelSpec,
        config: KVTierConfig | None = None,
        *,
        device: torch.device | str | None = None,
        overwrite: bool = False,
        _disk: DiskStore | None = None,
        **options: Any,
    ):
        if config is not None and options:
            raise TypeError("pass either a KVTierConfig or keyword options, not both")
        self.config = config if config is not None else KVTierConfig(**options)
        self.spec = spec
        self.dtype = spec.dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise CacheInputError(f"device={self.device} was asked for, but CUDA is not available")
        self._signature = bytes.fromhex(spec.signature)
        self._persistent = self.config.store_path is not None or _disk is not None
        self._saved_keys: set[bytes] = set()
        self.info: dict[str, Any] = {}  # user facts saved with the session
        self.tiers = TierManager(
            self.config,
            [i for i, layer in enumerate(spec.layers) if layer.kind == FULL],
            self.device,
            self.dtype,
            self._signature,
            self._make_disk,
        )
        layers = [
            TieredLayer(i, layer, self.config, self.tiers) if layer.kind == FULL
            else SlidingLayer(i, layer, slack=self.config.recent_window)
            for i, layer in enumerate(spec.layers)
        ]
        super().__init__(layers=layers)
        self.tiers.layers = [layer for layer in layers if isinstance(layer, TieredLayer)]
        if _disk is not None:
            self.tiers._disk = _disk
        elif self.config.store_path is not None:
            self._create_store(Path(self.config.store_path), overwrite)
        self._closed = False

    # ------------------------------------------------------------------------------ construction
    @classmethod
    def for_model(
        cls, model: torch.nn.Module, *, overwrite: bool = False, **options: Any
    ) -> "KVTierCache":
        """A cache sized for `model`, with the model's attention switched to kvtier.

        options: any `KVTierConfig` field (device_budget, host_budget, store_path, mode, chunk_size, ...).
        overwrite: allow `store_path` to replace an existing store.
        """
        config = KVTierConfig(**options)
        spec = ModelSpec.from_model(model)
        enable(model)
        return cls(spec, config, device=_model_device(model), overwrite=overwrite)

    @classmethod
    def open(cls, path: str | Path, model: torch.nn.Module, **options: Any) -> "KVTierCache":
        """Reopen a cache saved with `save()`; continue generating without a new prefill.

        options override budgets and other runtime options; chunking options come from the store.
        Raises StoreMismatchError for another model, dtype or layout version and IncompleteSessionError
        for a session that was never saved or whose prefill was interrupted.
        """
        path = Path(path)
        spec = ModelSpec.from_model(model)
        disk = DiskStore(path, create=False)
        try:
            header = disk.get_meta(STORE_META)
            if header is None:
                raise StoreMismatchError(f"{path} is not a kvtier store (no store header)")
            _check_header(header, spec, path)
            session = disk.get_meta(SESSION_META)
            if session is None or session.get("state") != "complete":
                raise IncompleteSessionError(
                    f"kvtier store {path} holds no complete session: its prefill was interrupted or it was never "
                    "saved. Prefill again (KVTierCache.for_model(model, store_path=..., overwrite=True)) and call "
                    "cache.save()."
                )
            for name in _LAYOUT_OPTIONS:
                options.setdefault(name, header["layout"][name])
            for name, value in session.get("options", {}).items():
                if name in _RUNTIME_OPTIONS:
                    options.setdefault(name, value)
            options["store_path"] = path
            enable(model)
            cache = cls(spec, KVTierConfig(**options), device=_model_device(model), _disk=disk)
            cache._load_session(session)
        except BaseException:
            disk.close()
            raise
        return cache

    def _store_header(self) -> dict:
        return {
            "format": "kvtier",
            "layout_version": LAYOUT_VERSION,
            "signature": self.spec.signature,
            "dtype": dtype_name(self.dtype),
            "structure": self.spec.structure,
            "layout": {name: getattr(self.config, name) for name in _LAYOUT_OPTIONS},
            "created": time.time(),
        }

    def _create_store(self, path: Path, overwrite: bool) -> None:
        disk = DiskStore(path, create=True, initial_map_bytes=self.config.initial_map_bytes,
                         max_bytes=self.config.max_store_bytes)
        try:
            if disk.get_meta(STORE_META) is not None or any(True for _ in disk.keys()):
                if not overwrite:
                    raise StoreError(
                        f"kvtier store {path} already holds data; reopen it with KVTierCache.open(path, model), "
                        "or pass overwrite=True to replace it"
                    )
                disk.remove_many(list(disk.keys()))
                disk.delete_meta(SESSION_META) if disk.get_meta(SESSION_META) is not None else None
            # The session stays "incomplete" until save(): an interrupted prefill is recognisable as such.
            disk.put_many([], meta={STORE_META: self._store_header(), SESSION_META: {"state": "incomplete",
                                                                                     "started": time.time()}})
            disk.sync()
        except BaseException:
            disk.close()
            raise
        self.tiers._disk = disk

    def _make_disk(self) -> DiskStore:
        """The temporary store, created on the first spill to disk and removed on close."""
        path = tempfile.mkdtemp(prefix="kvtier-")
        disk = DiskStore(path, initial_map_bytes=self.config.initial_map_bytes, max_bytes=self.config.max_store_bytes,
                         remove_on_close=True)
        disk.put_meta(STORE_META, self._store_header())
        weakref.finalize(self, disk.close)
        return disk

    # --------------------------------------------------------------------------- the HF contract
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[KVHandle, KVHandle]:
        """Store new KV of one layer ([B, Hkv, Q, D], RoPE already applied) and return the handle kvtier's
        attention reads (both elements are the same handle)."""
        self._check_open()
        self._check_inputs(key_states, value_states, layer_idx)
        if layer_idx == 0:
            self.tiers.clock += 1
            self.tiers.counters.steps += 1
        handle = self.layers[layer_idx].update(key_states, value_states)
        return handle, handle

    def _check_inputs(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> None:
        if not 0 <= layer_idx < len(self.layers):
            raise CacheInputError(f"layer_idx {layer_idx} out of range: this cache has {len(self.layers)} layers")
        if not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor):
            raise CacheInputError("key_states and value_states must be tensors")
        if k.dtype != self.dtype or v.dtype != self.dtype:
            raise CacheInputError(
                f"key/value states are {dtype_name(k.dtype)}/{dtype_name(v.dtype)} but this cache holds "
                f"{dtype_name(self.dtype)}; build the cache for the model as it runs (KVTierCache.for_model "
                "after moving/casting the model)"
            )
        if k.device != self.device and not (k.device.type == self.device.type == "cuda" and self.device.index is None):
            raise CacheInputError(
                f"key/value states are on {k.device} but this cache keeps its device tier on {self.device}; "
                "build the cache after moving the model (KVTierCache.for_model(model))"
            )
        if k.dim() != 4 or k.shape != v.shape:
            raise CacheInputError(f"expected key/value states [batch, kv_heads, seq, head_dim], got {tuple(k.shape)}"
                                  f" and {tuple(v.shape)}")
        if k.shape[1] != self.spec.kv_heads or k.shape[3] != self.spec.head_dim:
            raise CacheInputError(
                f"key states have {k.shape[1]} heads of {k.shape[3]}, the model spec says {self.spec.kv_heads} of "
                f"{self.spec.head_dim}"
            )
        layer = self.layers[layer_idx]
        if layer.batch is not None and layer.logical_length and k.shape[0] != layer.batch:
            if layer.batch == 1:
                layer.select_rows(torch.zeros(k.shape[0], dtype=torch.long))  # one prefix, many continuations
            else:
                raise CacheInputError(
                    f"layer {layer_idx} holds a batch of {layer.batch} rows, got {k.shape[0]}; use a new cache or "
                    "cache.reset() for another batch"
                )

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Logical tokens consumed (generate derives positions from it); where they are stored never shows."""
        return self.layers[layer_idx].logical_length if layer_idx < len(self.layers) else 0

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.get_seq_length(layer_idx) + query_length, 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.get_seq_length(layer_idx)

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1  # no maximum: the store grows

    @property
    def is_compileable(self) -> bool:
        # A compileable custom cache makes generate auto-compile the forward on CUDA; kvtier is dynamic.
        return False

    @property
    def is_croppable(self) -> bool:
        return True

    @property
    def batch_size(self) -> int:
        sizes = {layer.batch for layer in self.layers if layer.batch is not None}
        return sizes.pop() if len(sizes) == 1 else -1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row i of the batch becomes old row beam_idx[i]."""
        for layer in self.layers:
            layer.select_rows(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        for layer in self.layers:
            if layer.batch is not None:
                layer.select_rows(torch.arange(layer.batch).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        indices = torch.as_tensor(indices)
        if indices.dtype == torch.bool:
            indices = indices.nonzero().flatten()
        for layer in self.layers:
            layer.select_rows(indices.long())

    def crop(self, max_length: int) -> None:
        """Negative: remove that many tokens from the end. Positive (transformers < 5.x style): keep that many."""
        length = self.get_seq_length()
        target = length + max_length if max_length < 0 else (length if max_length == 0 else max_length)
        target = max(0, target)
        for layer in self.layers:
            layer.truncate(target)

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()

    # ------------------------------------------------------------------------------- kvtier API
    def stats(self) -> CacheStats:
        """Per-tier tokens, bytes, hits, misses, bytes moved, budgets and peaks; disk compression ratio."""
        return self.tiers.stats()

    def warm(self) -> int:
        """Load chunks from disk into free device room, then free host room (newest first, nothing evicted):
        after `open`, the first decode steps then find them resident. Returns how many chunks moved."""
        moved = 0
        for layer in self.tiers.layers:
            for chunk in reversed(layer.chunks):
                if chunk.tier != Tier.DISK:
                    continue
                pool_free, host = self.tiers.device_pools[layer.index].free, self.tiers.host_pools[layer.index]
                if (pool_free is not None and pool_free < chunk.length) and not host.fits(chunk.length):
                    break
                k, v = self.tiers.fetch(chunk)
                self.tiers.promote(chunk, k, v)
                moved += chunk.tier != Tier.DISK
        return moved

    def set_sparse(self, budget: int | float | None = None, selector: str | None = None,
                   shared_selection: bool | None = None) -> None:
        """Change the sparse budget or the selection policy between questions (validated like KVTierConfig)."""
        from .sparse.select import make_selector

        changes = {k: v for k, v in (("sparse_budget", budget), ("selector", selector),
                                     ("shared_selection", shared_selection)) if v is not None}
        checked = KVTierConfig(**{**self.config.to_dict(), **changes})  # raises ValueError on bad values
        for name in changes:
            setattr(self.config, name, getattr(checked, name))
        self.tiers.selector = make_selector(self.config.selector, self.config.shared_selection)

    @property
    def store_path(self) -> Path | None:
        return self.tiers.disk.path if self.tiers.has_disk else None

    def save(self, info: dict[str, Any] | None = None) -> Path:
        """Persist the whole cache in its store and mark the session complete (atomically, then fsync).

        info: JSON-able facts to keep with the session (e.g. which document it holds); `open` puts them in
        `cache.info`."""
        self._check_open()
        if not self._persistent:
            raise StoreError("this cache has a temporary store; build it with store_path=... to save a session")
        lengths = {layer.logical_length for layer in self.layers}
        if len(lengths) != 1:
            raise IncompleteSessionError(
                f"the last forward pass did not finish (layers hold {sorted(lengths)} tokens); the cache cannot be "
                "saved. Reset it and prefill again."
            )
        disk = self.tiers.disk
        manifest_layers, keys = [], set()
        for layer in self.layers:
            entry: dict[str, Any]
            if isinstance(layer, TieredLayer):
                layer.commit_pending()
                self.tiers.persist(layer.chunks)
                tail = self._persist_aux(layer.index, layer.win_start, *self._window_tensors(layer))
                entry = {
                    "kind": "full",
                    "chunks": [[c.chunk_id, c.start, c.length, c.pinned, _rows_list(c.disk_rows),
                                *self.tiers.record_sizes[c.key][1:], c.importance] for c in layer.chunks],
                    "tail": tail,
                    "decode_chunk": layer.decode_chunk,
                    "skew": None if layer.skew is None else layer.skew.to_dict(),
                }
                keys.update(c.key for c in layer.chunks)
                if layer.chunks:
                    kmin, kmax, _, _ = layer.abstracts.view()
                    keys.add(self.tiers.write_abstracts(layer.index, kmin, kmax))
            else:
                start = layer.length - (0 if layer.k is None else layer.k.shape[2])
                buf = self._persist_aux(layer.index, start, layer.k, layer.v)
                entry = {"kind": "sliding", "buffer": buf}
            for aux in (entry.get("tail"), entry.get("buffer")):
                if aux is not None:
                    keys.add(Chunk(layer.index, aux[0], 0, 0, Tier.DISK, 0).key)
            manifest_layers.append(entry)
        manifest = {
            "state": "complete",
            "layout_version": LAYOUT_VERSION,
            "signature": self.spec.signature,
            "dtype": dtype_name(self.dtype),
            "length": self.get_seq_length(),
            "batch": self.batch_size,
            "next_chunk_id": self.tiers.next_chunk_id,
            "saved": time.time(),
            "options": {name: getattr(self.config, name) for name in _RUNTIME_OPTIONS},
            "info": dict(info if info is not None else self.info),
            "layers": manifest_layers,
        }
        disk.put_meta(SESSION_META, manifest)
        stale = self._saved_keys - keys
        self._saved_keys = keys
        self.tiers.drop_records([k for k in stale if not self._is_live(k)])
        disk.sync()
        return disk.path

    def _window_tensors(self, layer: TieredLayer) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if layer.win_slots.numel() == 0:
            return None, None
        return layer.pool.read(layer.win_slots)

    def _persist_aux(self, layer_idx: int, start: int, k: torch.Tensor | None, v: torch.Tensor | None):
        """Write an unchunked run of tokens (recent window, sliding buffer) as one record."""
        if k is None or k.shape[2] == 0:
            return None
        chunk = Chunk(layer_idx, self.tiers.new_chunk_id(), start, k.shape[2], Tier.DISK, k.shape[0])
        self.tiers.write_records([(chunk, k.cpu(), v.cpu())])
        return [chunk.chunk_id, start, k.shape[2]]

    def _is_live(self, key: bytes) -> bool:
        return any(c.key == key and c.on_disk for layer in self.layers if isinstance(layer, TieredLayer)
                   for c in layer.chunks)

    def _load_session(self, session: dict) -> None:
        if len(session["layers"]) != len(self.layers):
            raise StoreMismatchError(f"session has {len(session['layers'])} layers, the model has {len(self.layers)}")
        self.tiers.next_chunk_id = session["next_chunk_id"]
        self.info = dict(session.get("info", {}))
        length, batch = session["length"], session["batch"]
        keys: set[bytes] = set()
        for layer, entry in zip(self.layers, session["layers"]):
            if isinstance(layer, TieredLayer):
                if entry["kind"] != "full":
                    raise StoreMismatchError(f"layer {layer.index}: stored as {entry['kind']}, the model's is full")
                for chunk_id, start, n, pinned, rows, raw_bytes, stored_bytes, importance in entry["chunks"]:
                    chunk = Chunk(layer.index, chunk_id, start, n, Tier.DISK, batch, on_disk=True, pinned=bool(pinned),
                                  persisted=True, disk_rows=None if rows is None else torch.tensor(rows),
                                  row=len(layer.chunks), importance=importance)
                    layer.chunks.append(chunk)
                    keys.add(chunk.key)
                    self.tiers.record_sizes[chunk.key] = (n, raw_bytes, stored_bytes)
                if layer.chunks:
                    kmin, kmax = self.tiers.read_abstracts(layer.index)
                    keys.add(chunk_key(layer.index, ABSTRACT_ID))
                    for c in layer.chunks:
                        layer.abstracts.append(kmin[:, :, c.row], kmax[:, :, c.row], c.start, c.length)
                layer.decode_chunk = entry.get("decode_chunk", self.config.chunk_size)
                if entry.get("skew"):
                    layer.skew = LayerSkew(**entry["skew"])
                layer.length = layer.chunks[-1].end if layer.chunks else 0
                layer.batch = batch
                self._load_window(layer, entry["tail"], keys)
                layer.length = length
            else:
                buf = entry["buffer"]
                if buf is not None:
                    aux = Chunk(layer.index, buf[0], buf[1], buf[2], Tier.DISK, batch)
                    keys.add(aux.key)
                    k, v = self.tiers.read_record(aux)
                    layer.k, layer.v = k.to(self.device), v.to(self.device)
                layer.length, layer.batch = length, batch
        self._saved_keys = keys
        # Records no saved session refers to are leftovers of an interrupted continuation: drop them.
        self.tiers.drop_records([k for k in self.tiers.disk.keys() if k not in keys])

    def _load_window(self, layer: TieredLayer, tail: list | None, keys: set[bytes]) -> None:
        if tail is None:
            return
        aux = Chunk(layer.index, tail[0], tail[1], tail[2], Tier.DISK, layer.batch or 1)
        keys.add(aux.key)
        k, v = self.tiers.read_record(aux)
        layer.pool.init_shape(k.shape[0], k.shape[1], k.shape[3])
        slots = self.tiers.allocate_device(layer.index, aux.length)
        layer.pool.write(slots, k, v, torch.arange(aux.start, aux.end, device=layer.pool.device))
        layer.win_slots = slots

    # ------------------------------------------------------------------------------- lifetime
    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("this KVTierCache is closed")

    def close(self) -> None:
        """Release memory and the store. A temporary store is deleted; a saved session stays on disk."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.tiers.has_disk and self._persistent:
                for layer in self.layers:
                    if isinstance(layer, TieredLayer):
                        self.tiers.free(layer.chunks)
                        layer.chunks = []
        finally:
            self.tiers.clear()
            self.tiers.close()

    def __enter__(self) -> "KVTierCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        s = self.tiers.stats()
        return (f"KVTierCache(layers={len(self.layers)}, tokens={self.get_seq_length()}, "
                f"device={s.device.tokens}, host={s.host.tokens}, disk={s.disk.tokens})")


def _rows_list(rows: torch.Tensor | None) -> list[int] | None:
    return None if rows is None else rows.tolist()


def _check_header(header: dict, spec: ModelSpec, path: Path) -> None:
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
