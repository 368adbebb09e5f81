"""`KVTierCache`: the transformers `Cache` contract, and nothing else.

Storage lives in the per-layer objects (`kvtier.layers`) and the tier manager (`kvtier.store.tiers`);
attention lives in `kvtier.attention`. This class translates transformers' calls into theirs.
"""

from __future__ import annotations

import inspect
import tempfile
import weakref
from pathlib import Path
from typing import Any

import torch
from transformers.cache_utils import Cache

from . import session
from .attention import enable
from .config import KVTierConfig
from .errors import CacheInputError, StoreError
from .handle import KVHandle
from .layers import SlidingLayer, TieredLayer
from .model_spec import FULL, ModelSpec
from .sparse.lookahead import Lookahead, QueryGuesser
from .store.chunk import Tier
from .store.codec import dtype_name
from .store.disk import DiskStore
from .store.stats import CacheStats
from .store.tiers import TierManager


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
            self.tiers._disk = session.create_store(Path(self.config.store_path), spec, self.config, overwrite)
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
        cache = cls(spec, config, device=_model_device(model), overwrite=overwrite)
        cache._watch(model)
        return cache

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
            header, saved = session.read_session(disk, spec)
            options = session.reopen_options(header, saved, options)
            options["store_path"] = path
            enable(model)
            cache = cls(spec, KVTierConfig(**options), device=_model_device(model), _disk=disk)
            session.load(cache, saved)
        except BaseException:
            disk.close()
            raise
        cache._watch(model)
        return cache

    def _watch(self, model: torch.nn.Module) -> None:
        """Let sparse decoding guess each next layer's query from `model`'s own weights (config.lookahead)."""
        if self.config.lookahead and self.tiers.layers:
            guesser = QueryGuesser.from_model(model, [layer.index for layer in self.tiers.layers])
            self.tiers.lookahead = Lookahead(guesser, self.tiers) if guesser is not None else None

    def layer_starts(self, layer_idx: int, hidden: torch.Tensor, position_embeddings: Any = None) -> None:
        """Called (by the hook `enable` installs) as decoder layer `layer_idx` starts a forward pass."""
        if self.tiers.lookahead is not None and self.config.mode == "sparse" and not self._closed:
            self.tiers.lookahead.layer_starts(layer_idx, hidden, position_embeddings)

    def _make_disk(self) -> DiskStore:
        """The temporary store, created on the first spill to disk and removed on close."""
        path = tempfile.mkdtemp(prefix="kvtier-")
        disk = DiskStore(path, initial_map_bytes=self.config.initial_map_bytes, max_bytes=self.config.max_store_bytes,
                         remove_on_close=True)
        disk.put_meta(session.STORE_META, session.store_header(self.spec, self.config))
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
        `cache.info`. Needs a cache built with `store_path=`."""
        self._check_open()
        if not self._persistent:
            raise StoreError("this cache has a temporary store; build it with store_path=... to save a session")
        return session.save(self, info)

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
