"""`KVTierCache`: the transformers `Cache` contract, and nothing else.

Storage lives in the per-layer objects (`kvtier.layers`) and the tier manager (`kvtier.store.tiers`);
attention lives in `kvtier.attention`. This class translates transformers' calls into theirs.
"""

from __future__ import annotations

import inspect
import os
import tempfile
import threading
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers.cache_utils import Cache

from . import session
from .attention import enable
from .config import KVTierConfig
from .errors import CacheInputError, CacheThreadError, StoreError, StoreMismatchError, UnsupportedModelError, brief
from .guard import ForwardGuard
from .handle import COMPILE_REFUSED, KVHandle
from .layers import SlidingLayer, SpanCut, TieredLayer
from .model_spec import FULL, ModelSpec
from .rope import Rope
from .sampling import id_outside, integer_dtype, is_int, vocab_size
from .sizes import budgets_in_tokens
from .sparse.lookahead import Lookahead, QueryGuesser
from .store.backend import RecordStore
from .store.chunk import Tier
from .store.codec import dtype_name
from .store.disk import DiskStore
from .store.remote import RemoteSessionStore, RemoteURL, is_remote, publish
from .store.pools import check_fits, storage_mode
from .store.stats import CacheStats
from .store.tiers import TierManager
from .tokens import TokenLog, check_prefix


def cache_argument(model: torch.nn.Module) -> str:
    """The keyword a model's forward/generate take a cache under: `cache` on transformers >= 5.24 (where
    `past_key_values` is deprecated), `past_key_values` before. Use as `model.generate(**{cache_argument(m): c})`."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"cache_argument() takes a transformers model, got {type(model).__name__}")
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

    Threads: a cache belongs to the thread that built or opened it. Forward passes, `save`, `close` and
    every other call that changes it raise `CacheThreadError` from any other thread; `stats()` and the
    read-only properties work from any thread. `claim()` hands the cache to the calling thread (for a
    worker pool), refused while a forward pass is running in the owner.
    """

    def __init__(
        self,
        spec: ModelSpec,
        config: KVTierConfig | None = None,
        *,
        device: torch.device | str | None = None,
        overwrite: bool = False,
        _disk: RecordStore | None = None,
        **options: Any,
    ):
        if not isinstance(spec, ModelSpec):
            raise TypeError(f"KVTierCache(spec, ...) takes a kvtier.ModelSpec (ModelSpec.from_model(model)), got "
                            f"{type(spec).__name__}; KVTierCache.for_model(model) builds one for you")
        if config is not None and options:
            raise TypeError("pass either a KVTierConfig or keyword options, not both")
        if config is not None and not isinstance(config, KVTierConfig):
            raise TypeError(f"config must be a kvtier.KVTierConfig (or pass its fields as keyword options), got "
                            f"{type(config).__name__}")
        if not isinstance(overwrite, bool):
            raise TypeError(f"overwrite must be True or False, got {brief(overwrite)}")
        self.config = config if config is not None else KVTierConfig(**budgets_in_tokens(options, spec))
        self.spec = spec
        self.dtype = spec.dtype
        try:
            self.device = torch.device(device) if device is not None else torch.device("cpu")
        except (RuntimeError, TypeError):
            raise CacheInputError(f"device={brief(device)} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1')") from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise CacheInputError(f"device={self.device} was asked for, but CUDA is not available")
        self._signature = bytes.fromhex(spec.signature)
        self._persistent = self.config.store_path is not None or _disk is not None
        self._saved_keys: set[bytes] = set()
        self.info: dict[str, Any] = {}  # user facts saved with the session
        self._owner = threading.get_ident()
        self._owner_lock = threading.Lock()  # guards ownership changes against a forward pass starting
        self._pid = os.getpid()  # a forked child must not use it: the store, its lock and readers are this process's
        self._in_forward = False  # a forward pass started and has not finished (or was interrupted)
        self._guard = ForwardGuard()  # whether a pass that raised left the layers whole
        self._before_forward: tuple[tuple, list[Any]] | None = None  # what a pass that raised is rolled back to
        self._tokens = TokenLog()
        self.tiers = TierManager(
            self.config,
            [i for i, layer in enumerate(spec.layers) if layer.kind == FULL],
            self.device,
            self.dtype,
            self._signature,
            self._make_disk,
            (spec.kv_heads, spec.head_dim),
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
        if self.tiers._disk is not None:
            # a cache dropped without close() still releases its store (the lock, the map), as a temporary one does
            weakref.finalize(self, self.tiers._disk.close)
        # The model's RoPE per layer (`_watch`; or why it has none that can move), for remove_span.
        self._ropes: tuple[Rope, ...] | UnsupportedModelError | None = None
        self._vocab: int | None = None  # the model's vocabulary size (`_watch`): input ids are checked against it
        self._models: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()  # models whose signature matched
        self._closed = False

    # ------------------------------------------------------------------------------ construction
    @classmethod
    def for_model(
        cls, model: torch.nn.Module, *, overwrite: bool = False, **options: Any
    ) -> "KVTierCache":
        """A cache sized for `model`, with the model's attention switched to kvtier.

        options: any `KVTierConfig` field (device_budget, host_budget, store_path, mode, chunk_size, ...);
            device_budget and host_budget also as strings, tokens ("8192") or a size of KV for all
            full-attention layers ("8GiB"), converted for this model as `kvtier qa` does.
        overwrite: allow `store_path` to replace an existing store.
        """
        spec = ModelSpec.from_model(model)
        if not isinstance(overwrite, bool):
            raise TypeError(f"overwrite must be True or False, got {brief(overwrite)}")
        config = KVTierConfig(**budgets_in_tokens(options, spec))
        enable(model)
        cache = cls(spec, config, device=_model_device(model), overwrite=overwrite)
        cache._watch(model)
        return cache

    @classmethod
    def open(cls, path: str | Path, model: torch.nn.Module, *, prompt_ids: torch.Tensor | None = None,
             **options: Any) -> "KVTierCache":
        """Reopen a cache saved with `save()`; continue generating without a new prefill.

        path: the store's directory, or a session published on a Redis/Valkey server
            (`redis://[user:password@]host:6379/0/NAME`, `rediss://` for TLS; see docs/remote.md). A server
            session's records are read on demand into a local cache: `store_path=` keeps it in that directory
            (a later open reads nothing twice), else a temporary one removed on close.
        prompt_ids: the prompt you will generate from ([batch, length] or [length]); it must start with the
            token ids the session holds, else PromptMismatchError says where they diverge (see `check_prompt`).
        options: budgets (sizes such as "8GiB" too), mode and every other runtime option, as for `for_model`
            (defaults when not given: a store never decides how much memory or how many threads this process
            uses); chunking options come from the store.
        Raises StoreMismatchError for another model, dtype or layout version, IncompleteSessionError for a
        session that was never saved or whose prefill was interrupted, StoreCorruptError for a damaged store,
        RemoteStoreError when a server cannot be reached or fails.
        """
        if not isinstance(path, (str, Path)) or not str(path):
            raise TypeError(f"KVTierCache.open(path, model) takes a store directory or a redis:// URL, got {brief(path)}")
        spec = ModelSpec.from_model(model)
        options = budgets_in_tokens(options, spec)  # a bad budget fails before the store is touched
        disk: RecordStore
        local = options.pop("store_path", None) if is_remote(path) else None
        if not is_remote(path) and options.get("store_path") is not None \
                and Path(str(options["store_path"])) != Path(path):  # another directory: taken and ignored
            raise CacheInputError(f"store_path={brief(options['store_path'])}: a local session is reopened from its "
                                  "own store (the path given first); store_path names where a server session's "
                                  "records are kept, for a redis:// URL")
        # bad options fail before the store or server is touched; the checks that need the session's chunking
        # (the device budget's floor, adaptive chunk bounds) come once its header is read. The store's size
        # options hold from the start: max_store_bytes bounds what this process adds to a reopened store.
        sizes = KVTierConfig(**{**options, "device_budget": None, "adaptive_chunks": False})
        if is_remote(path):
            disk = RemoteSessionStore(RemoteURL.parse(path), local=local, initial_map_bytes=sizes.initial_map_bytes,
                                      max_bytes=sizes.max_store_bytes)
            where = disk.where
        else:
            path = Path(path)
            disk = DiskStore(path, create=False, initial_map_bytes=sizes.initial_map_bytes,
                             max_bytes=sizes.max_store_bytes)
            where = str(path)
        try:
            header, saved = session.read_session(disk, spec)
            if sizes.mode == "exact":  # every record is read by the first step: the disk starts now, while the
                disk.read_ahead(saved.load_keys())  # session is loaded and its arena's memory committed
            options = session.reopen_options(header, options)
            options["store_path"] = disk.path
            enable(model)
            cache = cls(spec, KVTierConfig(**options), device=_model_device(model), _disk=disk)
            try:
                session.load(cache, saved)
                if prompt_ids is not None:
                    cache.check_prompt(prompt_ids)
            except BaseException:
                cache.close()
                raise
        except BaseException:
            disk.close()
            raise
        cache._watch(model)
        moved = next((c for layer in cache.tiers.layers for c in layer.chunks if c.record_shift), None)
        if moved is not None and moved.layer not in cache.tiers.ropes:
            cache.close()
            raise StoreMismatchError(f"{where}: {moved.name()} was moved by a removed span, but this model has no "
                                     f"RoPE kvtier can move keys with ({cache._ropes})")
        return cache

    def _watch(self, model: torch.nn.Module) -> None:
        """Keep `model`'s RoPE (for `remove_span`) and let sparse decoding guess each next layer's query from
        its own weights (config.lookahead)."""
        self._vocab = vocab_size(model)
        self._models.add(model)
        try:
            self._ropes = Rope.for_layers(model)
        except UnsupportedModelError as err:  # said when a span is removed, the only use
            self._ropes = err
        else:
            self.tiers.ropes.update((layer.index, self._ropes[layer.index]) for layer in self.tiers.layers)
        if self.config.lookahead and self.tiers.layers:
            guesser = QueryGuesser.from_model(model, [layer.index for layer in self.tiers.layers])
            self.tiers.lookahead = Lookahead(guesser, self.tiers) if guesser is not None else None

    def layer_starts(self, layer_idx: int, hidden: torch.Tensor, position_embeddings: Any = None) -> None:
        """Called (by the hook `enable` installs) as decoder layer `layer_idx` starts a forward pass."""
        if self.tiers.lookahead is not None and self.config.mode == "sparse" and not self._closed:
            self._check_thread("a forward pass")
            self.tiers.lookahead.layer_starts(layer_idx, hidden, position_embeddings)

    # ------------------------------------------------------------------------------ forward passes
    def forward_starts(self, input_ids: torch.Tensor | None, *, model: torch.nn.Module | None = None,
                       position_ids: Any = None, attention_mask: Any = None) -> None:
        """Called (by the hook `enable` installs) as a model forward pass through this cache starts: checks the
        model and the pass's positions, claims the pass for the owner thread and records its input ids (None:
        embeddings, the ids become unknown)."""
        if torch.compiler.is_compiling():
            raise UnsupportedModelError(COMPILE_REFUSED)
        if threading.get_ident() == self._owner:
            self._before_forward = None  # a pass refused below is no pass: `forward_ends` must undo nothing
        self._check_open()
        self._check_thread("a forward pass")  # checked again below, under the lock; first, so it is what is said
        if self._in_forward:  # its layers may hold different tokens: a pass over them would be silently wrong
            raise CacheInputError(
                "this cache is interrupted (a forward pass stopped part-way, by Ctrl-C or an error inside kvtier's "
                "own work, or a remove_span failed part-way), so its layers may hold different tokens; call "
                "cache.reset() (or reopen the saved session) before the next pass")
        if model is not None:
            self._check_model(model)
        self._check_positions(position_ids, attention_mask)
        if input_ids is not None:
            self._check_ids(input_ids)
        with self._owner_lock:
            self._check_thread("a forward pass")
            self._in_forward = True
        self._guard = ForwardGuard()
        self._before_forward = (self._tokens.checkpoint(), [layer.checkpoint() for layer in self.layers])
        self._tokens.record(input_ids, self.get_seq_length())

    def _check_model(self, model: torch.nn.Module) -> None:
        """A cache holds the KV of the model it was made for: another model of the same KV shape (other weights,
        other sliding windows or RoPE) would attend over it with no error and wrong results. Each model object
        is checked once, by its signature."""
        if model in self._models:
            return
        try:
            theirs = ModelSpec.from_model(model)
        except UnsupportedModelError:
            theirs = None
        if theirs is None or theirs.signature != self.spec.signature:
            kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
            raise CacheInputError(f"this cache was made for another model ({self.spec.model_type}, signature "
                                  f"{self.spec.signature[:12]}), not this {kind} (signature "
                                  f"{'?' if theirs is None else theirs.signature[:12]}); make a cache for each model "
                                  "with KVTierCache.for_model(model)")
        self._models.add(model)

    def _check_positions(self, position_ids: Any, attention_mask: Any) -> None:
        """The pass's first new token must sit right after the tokens the cache holds. `generate` given a prompt
        the cache already holds whole feeds it again from position 0 (the cache would then hold it twice, the
        copy at positions its keys were not rotated for): refused, saying to pass at least one new token. Passes
        of one token (decode steps) are not checked: the check reads device values, which would cost a decode
        step a synchronisation."""
        if not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2 or position_ids.shape[-1] < 2:
            return
        length = self.get_seq_length()
        if length == 0:
            return
        first = position_ids[:, 0].long()
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 \
                and attention_mask.shape[-1] == length + position_ids.shape[-1]:
            real = attention_mask[:, length].bool()  # rows whose first new token is padding are not checked
            expect = attention_mask[:, :length].long().sum(-1).to(first.device)
            wrong = real.to(first.device) & (first != expect)
        else:
            expect = torch.full_like(first, length)
            wrong = first != expect
        if bool(wrong.any()):
            row = int(wrong.nonzero()[0, 0])
            raise CacheInputError(
                f"this pass starts at position {int(first[row])} (row {row}), but the cache holds {int(expect[row])} "
                "tokens there: it feeds tokens the cache already holds. Pass only the new tokens, or to generate "
                "from a cached prompt, the prompt plus at least one new token (the question)")

    def _check_ids(self, ids: torch.Tensor) -> None:
        """Input ids the model can embed, refused before the pass starts: the model would fail inside its
        embedding (on CUDA, with a device-side assert that ends the process's use of the GPU) and leave the cache
        marked interrupted."""
        if ids.dtype not in (torch.int64, torch.int32):  # what an embedding looks up (others fail inside torch)
            raise CacheInputError(f"input_ids must be int64 (or int32) token ids, got a {dtype_name(ids.dtype)} "
                                  "tensor")
        if ids.numel() == 0:
            raise CacheInputError(f"input_ids {tuple(ids.shape)} hold no tokens; feed at least one token of one "
                                  "sequence")
        bad = id_outside(ids, self._vocab)
        if bad is not None:
            raise CacheInputError(f"input_ids hold token id {bad}, outside the model's vocabulary [0, {self._vocab})"
                                  if self._vocab is not None else f"input_ids hold a negative token id ({bad})")

    def forward_ends(self, finished: bool) -> None:
        """Called as the forward pass ends; `finished` is False when it raised (an `Exception`: torch does not
        call the hook for Ctrl-C). A pass that raised is undone when every layer is whole (see `ForwardGuard`):
        the cache holds what it held before it, and the error still reaches the caller."""
        if threading.get_ident() != self._owner:
            return
        if finished:
            if self._before_forward is not None:  # the pass forward_starts let through
                self._in_forward = False
        elif self._before_forward is not None and not self._guard.broken:
            tokens, marks = self._before_forward
            try:
                for layer, mark in zip(self.layers, marks):
                    layer.rollback(mark)
                self._tokens.rollback(tokens)
            except Exception:  # the rollback itself failed (a damaged record it had to read): reset() is needed
                return
            self._in_forward = False
        self._before_forward = None

    @property
    def interrupted(self) -> bool:
        """A forward pass started through the model and never finished, and could not be undone: Ctrl-C inside
        it, or an error inside kvtier's own work other than a full store or memory it could not get (a pass
        that fails otherwise leaves the cache as it was before it); or a `remove_span` that failed half-way.
        The layers may hold different numbers of tokens: forward passes and `save()` are refused until
        `reset()`."""
        return self._in_forward

    def claim(self) -> None:
        """Make the calling thread the cache's owner (e.g. a worker thread about to run `generate`).

        Refused with CacheThreadError while a forward pass runs in the current owner; after an interrupted
        forward pass, call `reset()` in the owner thread first."""
        self._check_process("claim()", "KVTierCache")
        with self._owner_lock:
            if self._in_forward and self._owner != threading.get_ident():
                raise CacheThreadError(
                    f"this KVTierCache is inside a forward pass in thread {self._owner_name()}; wait for it to "
                    "finish (if it was interrupted, call cache.reset() in that thread) before claiming the cache"
                )
            self._owner = threading.get_ident()

    def _check_thread(self, what: str, kind: str = "KVTierCache") -> None:
        self._check_process(what, kind)
        if threading.get_ident() != self._owner:
            raise CacheThreadError(
                f"{what} from thread {threading.current_thread().name!r}, but this {kind} belongs to thread "
                f"{self._owner_name()}: use a cache from one thread at a time (call cache.claim() in the thread "
                "that uses it now)"
            )

    def _check_process(self, what: str, kind: str) -> None:
        """A process forked from the one that made the cache shares its store's files, lock and session ids (two
        children writing chunks read each other's records back as their own, every check passing), but not its
        reader threads: refused."""
        if os.getpid() != self._pid:
            raise CacheThreadError(
                f"{what} in process {os.getpid()}, but this {kind} was made in process {self._pid} and a forked "
                "process cannot use it (its store, lock and reader threads are that process's); open the session "
                "again in this process (KVTierCache.open) or make a new cache here"
            )

    def _owner_name(self) -> str:
        owner = next((t for t in threading.enumerate() if t.ident == self._owner), None)
        return repr(owner.name) if owner is not None else f"#{self._owner} (no longer running)"

    # ------------------------------------------------------------------------------ token ids
    @property
    def token_ids(self) -> torch.Tensor | None:
        """The token ids this cache holds ([batch, length] long, CPU), or None when they are unknown."""
        n = self.get_seq_length()
        if not self._tokens.known or self._tokens.length != n:
            return None
        ids = self._tokens.ids()
        return ids if ids is not None else torch.zeros(max(self.batch_size, 1), 0, dtype=torch.long)

    def check_prompt(self, input_ids: torch.Tensor) -> None:
        """Raise PromptMismatchError unless `input_ids` starts with the tokens this cache holds, saying where
        they diverge. Do it before `generate` on a reopened session: generate feeds only the ids past the
        cached length, so a prompt from another document would silently reuse this one's KV."""
        check_prefix(self.token_ids, input_ids, self.get_seq_length())

    def restore_tokens(self, ids: torch.Tensor | None, length: int) -> None:
        """Token ids of a loaded session (None: unknown)."""
        self._tokens.restore(ids, length)

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
        self._check_thread("update()")
        self._check_inputs(key_states, value_states, layer_idx)
        if layer_idx == 0:
            self.tiers.clock += 1
            self.tiers.counters.steps += 1
        with self._guard:
            handle = self.layers[layer_idx].update(key_states, value_states)
        handle.guard = self._guard
        return handle, handle

    def _check_inputs(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> None:
        if not is_int(layer_idx) or not 0 <= layer_idx < len(self.layers):
            raise CacheInputError(f"layer_idx must be an int in [0, {len(self.layers)}) (this cache has "
                                  f"{len(self.layers)} layers), got {brief(layer_idx)}")
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
        if k.shape[2] == 0 or k.shape[0] == 0:
            raise CacheInputError(f"update() got key/value states {tuple(k.shape)} with no tokens; feed at least "
                                  "one token of one sequence")
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
        self._select_rows(self._row_index("reorder_cache", beam_idx, masks=False))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if not is_int(repeats) or repeats < 1:
            raise CacheInputError(f"batch_repeat_interleave() takes an int >= 1, got {brief(repeats)}")
        batch = self.batch_size
        if batch > 0:
            self._check_rows_fit(batch * repeats)
            self._select_rows(torch.arange(batch).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_rows(self._row_index("batch_select_indices", indices, masks=True))

    def _row_index(self, what: str, index: Any, masks: bool) -> torch.Tensor:
        """`index` as a 1-D long tensor of existing rows (a bool mask of the rows too, where `masks`), checked
        before any layer changes."""
        self._check_open()
        self._check_thread("a batch reorder")
        try:
            index = torch.as_tensor(index)
        except (TypeError, ValueError, RuntimeError):
            raise CacheInputError(f"{what}() takes a 1-D tensor of row indices, got {brief(index)}") from None
        batch = self.batch_size
        if masks and index.dtype == torch.bool:
            if index.dim() != 1 or (batch > 0 and index.shape[0] != batch):
                raise CacheInputError(f"{what}(): a row mask must be 1-D with one entry per row ({batch}), got shape "
                                      f"{tuple(index.shape)}")
            index = index.nonzero().flatten()
        elif not integer_dtype(index):
            raise CacheInputError(f"{what}() takes integer row indices, got a {dtype_name(index.dtype)} tensor")
        if index.dim() != 1 or index.numel() == 0:
            raise CacheInputError(f"{what}() takes a 1-D tensor of at least one row index, got shape "
                                  f"{tuple(index.shape)}")
        if batch > 0 and (int(index.min()) < 0 or int(index.max()) >= batch):
            raise CacheInputError(f"{what}(): row indices must lie in [0, {batch}), got {index.tolist()}")
        return index

    def _check_rows_fit(self, rows: int) -> None:
        """CacheMemoryError, before any layer changes, unless the device can hold the device-resident KV for
        `rows` rows beside what it holds now (a reorder builds the new rows before it frees the old)."""
        batch = self.batch_size
        if batch <= 0 or rows <= batch:
            return
        held = sum(p.capacity * p.bytes_per_token() for p in self.tiers.device_pools.values())
        held += sum(t.nbytes for layer in self.layers if isinstance(layer, SlidingLayer)
                    for t in (layer.k, layer.v) if t is not None)
        check_fits(self.device, held // batch * rows, f"a batch of {rows} rows", "fewer beams or sequences per prompt")

    def _select_rows(self, index: torch.Tensor) -> None:
        self._check_open()
        self._check_thread("a batch reorder")
        self._check_rows_fit(index.numel())
        for layer in self.layers:
            if layer.batch is not None:
                layer.select_rows(index.long())
        self._tokens.select_rows(index)

    def crop(self, max_length: int) -> None:
        """Negative: remove that many tokens from the end. Positive (transformers < 5.x style): keep that many.
        A failure part-way (a damaged record read to refill the recent window, no memory) leaves the cache
        `interrupted`: some layers may already be cut."""
        self._check_open()
        self._check_thread("crop()")
        if not is_int(max_length):
            raise CacheInputError(f"crop() takes an int (negative: tokens to drop from the end; positive: tokens to "
                                  f"keep), got {brief(max_length)}")
        length = self.get_seq_length()
        target = length + max_length if max_length < 0 else (length if max_length == 0 else max_length)
        target = max(0, target)
        for layer in self.layers:  # every layer checked before any is cut: a refused crop changes nothing
            problem = layer.crop_problem(target) if isinstance(layer, SlidingLayer) else None
            if problem is not None:
                raise CacheInputError(problem)
        if self._in_forward:
            raise CacheInputError("crop() on an interrupted cache (its layers may hold different tokens); call "
                                  "reset() first")
        try:
            for layer in self.layers:
                layer.truncate(target)
        except BaseException:  # a damaged record read to refill a recent window, no memory: layers cut unevenly
            self._in_forward = True
            raise
        self._tokens.truncate(target)

    def remove_span(self, start: int, end: int, *, ropes: Sequence[Rope] | None = None) -> None:
        """Forget positions [start, end) in every layer and tier, and move the tokens after them left by
        `end - start`: the next token's position is the kept length, and the freed device slots are reused.

        Moving a token turns its key through RoPE (no recompute): device and host copies in place, disk
        records when they are next read, so a removal never reads the disk tier (a chunk cut by an edge of
        the span, at most two per layer, is read). Needs the model's RoPE: built from the model the cache was
        made for, or pass `ropes` (one `kvtier.Rope` per layer, `Rope.for_layers(model)`). Models without
        RoPE, and RoPE whose frequencies change with length (dynamic NTK, longrope), are refused.
        Raises CacheInputError for a span outside [0, length] and when a sliding-window layer no longer holds
        the tokens its window would reach after the move, before anything changes. A full store or a damaged
        record met while reading and storing the chunks the span cuts fails the removal with the cache as it
        was; a failure after that (a damaged record read to refill a recent window the span reached) leaves
        the cache `interrupted`."""
        self._check_open()
        self._check_thread("remove_span()")
        length = self.get_seq_length()
        if isinstance(start, bool) or isinstance(end, bool) or not isinstance(start, int) or not isinstance(end, int):
            raise CacheInputError(f"remove_span takes integer positions, got start={brief(start)}, end={brief(end)}")
        if not 0 <= start <= end <= length:
            raise CacheInputError(f"remove_span({brief(start)}, {brief(end)}): the span must lie within the {length} tokens held "
                                  "(0 <= start <= end <= length)")
        if self._in_forward:
            raise CacheInputError("remove_span() during or after an interrupted forward pass; call reset() first")
        held = [self.get_seq_length(i) for i in range(len(self.layers))]
        if len(set(held)) > 1:  # update() called for some layers only: the span would land elsewhere in each
            raise CacheInputError(f"remove_span(): the layers hold different numbers of tokens ({min(held)} to "
                                  f"{max(held)}, after update() on some layers only); crop() them to one length first")
        if start == end:
            return
        layer_ropes = self._layer_ropes(ropes)
        for layer in self.layers:
            problem = layer.span_problem(start, end) if isinstance(layer, SlidingLayer) else None
            if problem is not None:
                raise CacheInputError(problem)
        with storage_mode():  # the tables it rewrites are updated in place later: never inference tensors
            # Every tiered layer first reads and stores what the span cuts (a full store or a damaged record fails
            # here, and the new chunks are freed again: the cache is as it was) ...
            cuts: dict[int, SpanCut | None] = {}
            try:
                for layer in self.tiers.layers:
                    cuts[layer.index] = layer.plan_span(start, end)
            except BaseException:
                for index, cut in cuts.items():
                    self.layers[index].drop_span(cut)
                raise
            # ... then every layer forgets the span. What can still fail here (a damaged record read to refill a
            # recent window the span reached, no memory) leaves layers of different lengths: marked interrupted
            # (save refuses, reset() clears) rather than attended over silently by the next pass.
            try:
                for layer in self.layers:
                    if isinstance(layer, TieredLayer):
                        cut = cuts[layer.index]
                        if cut is not None:
                            layer.apply_span(cut)
                    else:
                        layer.remove_span(start, end, layer_ropes[layer.index])
            except BaseException:
                self._in_forward = True
                raise
        self._tokens.remove(start, end)

    def _layer_ropes(self, ropes: Sequence[Rope] | None) -> tuple[Rope, ...]:
        """One Rope per layer: given, kept from an earlier call, or read from the model the cache was made for."""
        if ropes is None:
            ropes = self._ropes
        if isinstance(ropes, UnsupportedModelError):
            raise ropes
        if ropes is None:
            raise CacheInputError("this cache does not know its model's RoPE: pass ropes=kvtier.Rope.for_layers("
                                  "model) to remove_span")
        ropes = tuple(ropes)
        if len(ropes) != len(self.layers) or not all(isinstance(r, Rope) for r in ropes):
            raise CacheInputError(f"ropes must hold one kvtier.Rope per layer ({len(self.layers)}), got {len(ropes)}")
        self._ropes = ropes
        for layer in self.tiers.layers:
            self.tiers.ropes[layer.index] = ropes[layer.index]
        return ropes

    def reset(self) -> None:
        """Forget every token (the store's saved session, if any, stays on disk)."""
        self._check_open()
        self._check_thread("reset()")
        for layer in self.layers:
            layer.reset()
        self._tokens.reset()
        self._in_forward = False

    # ------------------------------------------------------------------------------- kvtier API
    def stats(self) -> CacheStats:
        """Per-tier tokens, bytes, hits, misses, bytes moved, budgets and peaks; disk compression ratio.

        Safe from any thread: a snapshot (during a forward pass, of the state at some point inside it)."""
        return self.tiers.stats()

    def warm(self) -> int:
        """Load chunks from disk into free device room, then free host room (newest first, nothing evicted):
        after `open`, the first decode steps then find them resident. Returns how many chunks moved."""
        self._check_open()
        self._check_thread("warm()")
        moved = 0
        for layer in self.tiers.layers:
            on_disk = [c for c in reversed(layer.chunks) if c.tier == Tier.DISK]
            # Into the device in groups (one read transaction, one allocation, one write of slot owners each) ...
            rest = self.tiers.promote_into_free_room(layer.index, on_disk)
            moved += len(on_disk) - len(rest)
            host = self.tiers.host_pools[layer.index]
            for chunk in rest:  # ... then what fits into the host, newest first
                if not host.fits(chunk.length):
                    break
                k, v = self.tiers.fetch(chunk)
                self.tiers.promote(chunk, k, v)
                moved += chunk.tier != Tier.DISK
        return moved

    def reserve(self, tokens: int) -> None:
        """Size every device pool ahead for a context of `tokens` tokens (capped by `device_budget`).

        A pool on a GPU grows by copying (on a CPU, into room reserved ahead until that is outgrown), so
        growing to the final size in one step keeps a long prefill from copying its arena again and again and
        leaves room for the first decode tokens. `kvtier.prefill` and `open`
        call it; call it yourself before `model.generate` on a long prompt to do the same."""
        self._check_open()
        self._check_thread("reserve()")
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise CacheInputError(f"reserve() takes a token count (an int >= 0), got {brief(tokens)}")
        for pool in self.tiers.device_pools.values():
            pool.reserve(tokens)

    def set_mode(self, mode: str) -> None:
        """Attend in `mode` ("exact" or "sparse") from the next forward pass on, e.g. after a prefill.

        The chunk layout stays the one the prefill made: a prefill in sparse mode sizes chunks by the attention
        skew it measures, and exact attention reads those chunks as well as fixed ones, so one prefill can
        serve both modes (`kvtier qa` prefills that way)."""
        self._check_open()
        self._check_thread("set_mode()")
        checked = KVTierConfig(**{**self.config.to_dict(), "mode": mode})  # raises ValueError on bad values
        self.config.mode = checked.mode

    def set_sparse(self, budget: int | float | None = None, selector: str | None = None,
                   shared_selection: bool | None = None) -> None:
        """Change the sparse budget or the selection policy between questions (validated like KVTierConfig)."""
        from .sparse.select import make_selector

        self._check_open()
        self._check_thread("set_sparse()")
        changes = {k: v for k, v in (("sparse_budget", budget), ("selector", selector),
                                     ("shared_selection", shared_selection)) if v is not None}
        checked = KVTierConfig(**{**self.config.to_dict(), **changes})  # raises ValueError on bad values
        for name in changes:
            setattr(self.config, name, getattr(checked, name))
        self.tiers.selector = make_selector(self.config.selector, self.config.shared_selection)

    @property
    def store_path(self) -> Path | None:
        return self.tiers.disk.path if self.tiers.has_disk else None

    @property
    def remote(self) -> str | None:
        """The server session this cache was opened from (its URL without credentials), or None."""
        disk = self.tiers._disk
        return disk.where if isinstance(disk, RemoteSessionStore) else None

    def save(self, info: dict[str, Any] | None = None, *, remote: str | None = None,
             name: str | None = None) -> Path:
        """Persist the whole cache in its store and mark the session complete (atomically, then fsync).

        info: JSON-able facts to keep with the session (e.g. which document it holds); `open` puts them in
            `cache.info`. Needs a cache built with `store_path=`, unless it is published.
        remote: also publish the saved session on a Redis/Valkey server (`redis://host:6379/0/NAME`, see
            docs/remote.md), where `KVTierCache.open(url, model)` reopens it on any machine. name: the session's
            name there, if the URL does not end with one. A published session never changes:
            SessionExistsError if the name is taken (nothing is left on the server), RemoteStoreError if the
            server fails (the local save stands; what the publish wrote expires)."""
        self._check_open()
        self._check_thread("save()")
        url = None
        if remote is not None:
            url = RemoteURL.parse(remote, name=name)
            url.need_name()
        elif name is not None:
            raise CacheInputError("name= names a session published on a server: pass remote=URL with it")
        if self.remote is not None:
            raise StoreError(f"this cache was opened from {self.remote}; a session read from a server is not saved "
                             "again (build a cache with store_path=... to keep a local session)")
        if not self._persistent and url is None:
            raise StoreError("this cache has a temporary store; build it with store_path=... to save a session, or "
                             "publish it with save(remote=...)")
        if self.get_seq_length() == 0:  # never fed, reset or cropped to nothing: a save would replace the session
            raise CacheInputError("this cache holds no tokens, so there is no session to save (saving it would "
                                  "replace the one the store holds); feed it a prompt first")
        path = session.save(self, info)
        if url is not None:
            publish(self.tiers.disk, self._saved_keys, url)
        return path

    # ------------------------------------------------------------------------------- lifetime
    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("this KVTierCache is closed")

    def close(self) -> None:
        """Release memory and the store. A temporary store is deleted; a saved session stays on disk."""
        if self._closed:
            return
        self._check_thread("close()")
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
