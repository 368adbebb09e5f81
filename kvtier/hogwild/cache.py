"""`HogwildCache`: N workers generate in one batched forward pass over one shared cache (Hogwild! Inference,
arXiv 2504.06261). It is a transformers `Cache` (what the model's attention modules call) plus the small
stepping API a runtime drives: prefill the history, set the headers, step every worker by one token, move a
finished step into the history.

Positions are block-local: a worker's new token is fed at its position inside its own current step, so the
model rotates q and k there and the key is stored once. Attention (`HogwildLayer.attend`, reached through
kvtier's registered attention function) turns each query to its distance from every block of its view.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from typing import Any

import torch
from transformers.cache_utils import Cache

from ..attention import enable
from ..cache import KVTierCache, cache_argument
from ..config import MAX_RECORD_TOKENS
from ..errors import CacheInputError, StoreError, UnsupportedModelError, brief
from ..few_rows import FewRowLinears
from ..handle import KVHandle
from ..model_spec import SLIDING, ModelSpec
from ..rope import Rope
from ..sampling import id_outside, integer_dtype, is_int, vocab_size
from ..sizes import kv_bytes_per_token
from ..store.pools import check_fits
from .history import TieredHistory
from .layer import HogwildLayer, Plan, SlidingHogwildLayer
from .layout import MAX_WORKERS, OTHERS, OWN, STEP0, Layout, Target

TokenIds = torch.Tensor | Sequence[int]


class HogwildCache(Cache):
    """A shared cache for `workers` parallel workers of one model.

    Worker w's view, the sequence its next token is predicted from::

        history | others' header | steps of the other workers (worker order) | own header | w's current step

    Build it with `HogwildCache.for_model(model, workers=N)`, then `prefill_history(prompt_ids)`,
    `set_headers(others_ids, own_ids)`, and `step(tokens)` (one token per worker, returns the next-token logits
    of every worker) as often as needed; `finish_step(w)` moves worker w's step to the end of the history.
    Every worker's token of a step is written before attention runs, so each worker already sees the tokens
    the others write in the same step. `view_ids(w)` is worker w's view as token ids.

    Raises UnsupportedModelError for models whose positions cannot be moved exactly (no RoPE, dynamic-NTK,
    longrope), since each view places the same stored keys at other positions.
    """

    def __init__(self, model: torch.nn.Module, workers: int, *, step_capacity: int = 64, **history_options: Any):
        if not is_int(workers) or not 1 <= workers <= MAX_WORKERS:
            raise ValueError(f"workers must be an int in [1, {MAX_WORKERS}] (each worker's view holds every other "
                             f"worker's step, so a step's attention grows as workers squared), got {brief(workers)}")
        if not is_int(step_capacity) or not 1 <= step_capacity <= MAX_RECORD_TOKENS:
            raise ValueError(f"step_capacity must be an int in [1, {MAX_RECORD_TOKENS}], got {brief(step_capacity)}")
        try:
            ropes = Rope.for_layers(model)
        except UnsupportedModelError as err:
            raise UnsupportedModelError(f"Hogwild reads each stored key at a different position in every worker's "
                                        f"view, which needs RoPE it can move exactly: {err}") from None
        spec = ModelSpec.from_model(model)
        param = next(model.parameters(), None)
        self.device = param.device if param is not None else torch.device("cpu")
        self.dtype = spec.dtype
        self.spec = spec
        check_fits(self.device, workers * step_capacity * kv_bytes_per_token(spec) * len(spec.layers),
                   f"{workers} workers' steps of {step_capacity} tokens", "lower step_capacity or workers")
        # The history of full-attention layers is a batch-1 KVTierCache: budgets, store and sparse mode are its.
        self.history_cache = KVTierCache(spec, device=self.device, **history_options)
        # a layer of it that holds the history (its sliding layers stay empty): its length is the history's
        self._history_layer = next((i for i, layer in enumerate(spec.layers) if layer.kind != SLIDING), None)
        layers = [SlidingHogwildLayer(i, layer, rope, spec.kv_heads, spec.head_dim, spec.dtype, self.device)
                  if layer.kind == SLIDING else
                  HogwildLayer(i, layer, rope, spec.kv_heads, spec.head_dim, spec.dtype, self.device,
                               TieredHistory(rope, self.history_cache.layers[i], spec.kv_heads, spec.head_dim))
                  for i, (layer, rope) in enumerate(zip(spec.layers, ropes))]
        super().__init__(layers=layers)
        enable(model)
        self.model = model
        self._linears = FewRowLinears(model)  # a step's few rows (one a worker) through the C kernel on a CPU
        self._vocab: int | None = vocab_size(model)
        self._closed = False
        self.layout = Layout(workers, step_capacity)
        self._cache_kwarg = cache_argument(model)
        self._keep_last = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._history_ids: list[int] = []
        self._block_ids: list[list[int]] = [[] for _ in range(self.layout.blocks)]
        self._ids_known = True
        self._target = Target.STEPS  # what a forward pass writes (a plain model call steps every worker)
        self._plan: Plan | None = None
        self._layers_done = 0
        self._fed: torch.Tensor | None = None  # input ids of the running forward pass (kvtier's forward hook)
        self._broken = False

    @classmethod
    def for_model(cls, model: torch.nn.Module, *, workers: int, step_capacity: int = 64,
                  **history_options: Any) -> HogwildCache:
        """A cache for `workers` workers of `model`, with the model's attention switched to kvtier.

        step_capacity: device rows first reserved per current step (they double when a step outgrows them).
        history_options: `KVTierConfig` options of the shared history (full-attention layers), e.g.
        device_budget / host_budget (it spills to host and disk beyond them), mode="sparse" and sparse_budget
        (each worker reads only the history pages that matter), store_path. The current steps and headers
        stay on the device."""
        return cls(model, workers, step_capacity=step_capacity, **history_options)

    def close(self) -> None:
        """Release the history's store and memory (a temporary store is deleted)."""
        if self._closed:
            return
        self.history_cache._check_thread("close()", "HogwildCache")
        self.history_cache.close()
        self._closed = True

    def claim(self) -> None:
        """Make the calling thread the cache's owner (as `KVTierCache.claim`)."""
        self.history_cache.claim()

    def __enter__(self) -> HogwildCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def workers(self) -> int:
        return self.layout.workers

    @property
    def held(self) -> dict[str, Any]:
        """What the cache holds now (read-only). Tokens per block: "history", "headers" (both), "steps" (one count
        per worker), each stored once. Per tier, summed over layers as `KVTierCache.stats()` counts residency (a
        chunk may be resident in two tiers at once): "tiers" (tokens) and "bytes" (on disk: compressed). The
        full-attention layers' history is in `history_cache`'s tiers; sliding layers' history (the keys their
        window can still reach), the headers and the steps are on the device."""
        steps = [self.layout.step_len(w) for w in range(self.workers)]
        headers = self.layout.lengths[OTHERS] + self.layout.lengths[OWN]
        sliding = sum(layer.history.held for layer in self.layers if layer.is_sliding)  # window-bounded
        on_device = (headers + sum(steps)) * len(self.layers) + sliding
        per_token = 2 * self.spec.kv_heads * self.spec.head_dim * self.dtype.itemsize  # one layer's k and v
        s = self.history_cache.stats()
        return {"history": self.layout.history, "headers": headers, "steps": steps,
                "tiers": {"device": on_device + s.device.tokens, "host": s.host.tokens, "disk": s.disk.tokens},
                "bytes": {"device": on_device * per_token + s.device.bytes, "host": s.host.bytes,
                          "disk": s.disk.bytes}}

    # ------------------------------------------------------------------------------ stepping API
    def prefill_history(self, ids: TokenIds) -> torch.Tensor | None:
        """Append tokens (the prompt, or any text every worker should read) to the shared history. Returns the
        logits [V] after its last token (None for no tokens)."""
        self._check_idle("prefill_history()")
        ids = self._ids_1d(ids, "prefill_history()")
        if not ids.numel():
            return None
        h = self.layout.history
        pos = torch.arange(h, h + ids.numel(), device=self.device)[None]
        return self._forward(ids[None], pos, Target.HISTORY)[0]

    def set_headers(self, others: TokenIds, own: TokenIds) -> torch.Tensor | None:
        """Prefill the two headers every view holds: `others` before the other workers' steps, `own` before the
        worker's own step. Allowed while every current step is empty. Returns the logits [V] after the last
        header token (every worker's, as long as the steps are empty), or None for two empty headers."""
        self._check_idle("set_headers()")
        others, own = self._ids_1d(others, "set_headers()"), self._ids_1d(own, "set_headers()")
        try:
            self.layout.set_headers(others.numel(), own.numel())
        except ValueError as err:
            raise CacheInputError(f"set_headers(): {err}; call finish_step() for each worker first") from None
        self._block_ids[OTHERS], self._block_ids[OWN] = [], []
        logits = None
        for ids, target in ((others, Target.OTHERS_HEADER), (own, Target.OWN_HEADER)):
            if ids.numel():
                pos = torch.arange(ids.numel(), device=self.device)[None]
                logits = self._forward(ids[None], pos, target)[0]
        return logits

    def step(self, tokens: TokenIds) -> torch.Tensor:
        """Feed one token per worker (tokens [N], or [N, Q] for Q tokens each) in one batched forward pass.
        Returns logits [N, V]: each worker's prediction after its last new token, over its own view."""
        self._check_idle("step()")
        tokens = self._token_ids(tokens, "step()")
        if tokens.dim() == 1:
            tokens = tokens[:, None]
        if tokens.dim() != 2 or tokens.shape[0] != self.workers or tokens.shape[1] == 0:
            raise CacheInputError(f"step() takes one token per worker ([{self.workers}] or [{self.workers}, Q]), "
                                  f"got shape {tuple(tokens.shape)}")
        q = tokens.shape[1]
        pos = torch.tensor([[self.layout.step_len(w) + i for i in range(q)] for w in range(self.workers)],
                           device=self.device)
        return self._forward(tokens, pos, Target.STEPS)

    def finish_step(self, worker: int) -> int:
        """Worker's current step joins the end of the shared history (its keys re-rotated once, by the history's
        length) and the worker starts an empty step. Returns the number of tokens moved."""
        self._check_idle("finish_step()")
        self._check_worker(worker)
        n = self.layout.step_len(worker)
        for layer in self.layers:
            layer.promote(STEP0 + worker, n)
        self.layout.clear_step(worker)
        self._history_ids += self._block_ids[STEP0 + worker]
        self._block_ids[STEP0 + worker] = []
        return n

    def view_ids(self, worker: int) -> torch.Tensor:
        """Worker's view as one sequence of token ids ([total] long, CPU): what a plain model would read."""
        self._check_worker(worker)
        if not self._ids_known:
            raise CacheInputError("the token ids are unknown: a forward pass fed embeddings instead of input ids")
        ids = list(self._history_ids)
        for b in self.layout.view_order(worker):
            ids += self._block_ids[b]
        return torch.tensor(ids, dtype=torch.long)

    def view_kv(self, worker: int, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Worker's view at one layer as an ordinary cache would hold it: k, v [Hkv, total, D], keys rotated at
        their view positions (computed on request by re-rotating every block; attention never needs it)."""
        self._check_idle("view_kv()")
        self._check_worker(worker)
        if not is_int(layer_idx) or not 0 <= layer_idx < len(self.layers):
            raise CacheInputError(f"layer_idx must be an int in [0, {len(self.layers)}), got {brief(layer_idx)}")
        return self.layers[layer_idx].view_kv(self.layout, worker)

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, target: Target) -> torch.Tensor:
        """One forward pass writing `target`; returns the logits of each row's last token [B, V]."""
        self._check_idle("a forward pass")
        kwargs: dict[str, Any] = {"input_ids": ids, "position_ids": pos, "use_cache": True, self._cache_kwarg: self}
        if self._keep_last:
            kwargs["logits_to_keep"] = 1
        self._target = target
        try:
            with torch.no_grad(), self._linears:
                out = self.model(**kwargs)
        finally:
            self._target = Target.STEPS
        return out.logits[:, -1]

    def _check_worker(self, worker: object) -> None:
        if not is_int(worker) or not 0 <= worker < self.workers:
            raise CacheInputError(f"worker must be an int in [0, {self.workers}) (this cache has {self.workers} "
                                  f"workers), got {brief(worker)}")

    def _token_ids(self, ids: TokenIds, what: str) -> torch.Tensor:
        """`ids` as a long tensor on the device, refused unless they are integer ids the model can embed."""
        try:
            t = torch.as_tensor(ids)
        except (TypeError, ValueError, RuntimeError):
            raise CacheInputError(f"{what} takes token ids (a list or tensor of ints), got {brief(ids)}") from None
        if t.numel() and not integer_dtype(t):
            raise CacheInputError(f"{what} takes integer token ids, got {str(t.dtype).removeprefix('torch.')} "
                                  f"values {t.flatten()[:8].tolist()}")
        if t.numel() and (bad := id_outside(t, self._vocab)) is not None:
            raise CacheInputError(f"{what}: token id {bad} is outside the model's vocabulary [0, {self._vocab})")
        return t.to(device=self.device, dtype=torch.long)

    def _ids_1d(self, ids: TokenIds, what: str) -> torch.Tensor:
        ids = self._token_ids(ids, what)
        if ids.dim() == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.dim() != 1:
            raise CacheInputError(f"expected token ids [L] (or [1, L]), got shape {tuple(ids.shape)}")
        return ids

    def _check_idle(self, what: str) -> None:
        if self._closed:
            raise StoreError(f"{what}: this HogwildCache is closed")
        self.history_cache._check_thread(what, "HogwildCache")
        if self.history_cache._closed:
            raise StoreError(f"{what}: this HogwildCache's history_cache was closed; close the HogwildCache instead")
        layer = self._history_layer
        held = self.layout.history if layer is None else self.history_cache.get_seq_length(layer)
        if held != self.layout.history:  # cropped, reset or fed outside this cache
            self._broken = True
            raise CacheInputError(f"{what}: history_cache holds {held} tokens where the workers' views hold "
                                  f"{self.layout.history}: it was changed outside this HogwildCache; call reset() and "
                                  "start again")
        if self._broken or (self._plan is not None and self._layers_done != len(self.layers)):
            self._broken = True
            raise CacheInputError(f"{what}: a forward pass through this HogwildCache stopped part-way, so its layers "
                                  "hold different tokens; call reset() and start again")

    # ------------------------------------------------------------------------- forward-pass hooks
    def forward_starts(self, input_ids: torch.Tensor | None, **_: Any) -> None:
        """Called (by the hook kvtier.enable installs) as a forward pass through this cache starts."""
        self._fed = input_ids

    def forward_ends(self, finished: bool) -> None:
        self._fed = None

    # --------------------------------------------------------------------------- the HF contract
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[KVHandle, KVHandle]:
        """Store one layer's new KV ([B, Hkv, Q, D], rotated at block-local positions) before attention runs and
        return the handle kvtier's attention reads (both elements are the same handle)."""
        if layer_idx == 0:
            self._begin(key_states, value_states, kwargs)
        elif self._plan is None or layer_idx != self._layers_done:
            self._broken = True
            raise CacheInputError(f"update() for layer {layer_idx} out of order; layers must run 0, 1, ...")
        past = self.layout.total - len(self._plan.rows.q_pos)  # tokens before this pass (what a padding mask covers)
        handle = self.layers[layer_idx].update(key_states, value_states, self._plan, past)
        self._layers_done += 1
        return handle, handle

    def _begin(self, k: torch.Tensor, v: torch.Tensor, kwargs: dict) -> None:
        """Layer 0 of a forward pass: check the inputs, grow the layout and build the rows every layer reads."""
        self._check_idle("a forward pass")
        if k.dtype != self.dtype or k.shape != v.shape or k.dim() != 4 or k.shape[2] == 0:
            raise CacheInputError(f"expected key/value states [batch, kv_heads, seq, head_dim] in {self.dtype}, got "
                                  f"{tuple(k.shape)} {k.dtype} and {tuple(v.shape)} {v.dtype}")
        if k.shape[1] != self.spec.kv_heads or k.shape[3] != self.spec.head_dim:
            raise CacheInputError(f"key states have {k.shape[1]} heads of {k.shape[3]}, the model has "
                                  f"{self.spec.kv_heads} of {self.spec.head_dim}")
        b, q = k.shape[0], k.shape[2]
        before = copy.deepcopy(self.layout)
        try:
            rows = self.layout.write(self._target, b, q)
        except ValueError as err:
            raise CacheInputError(str(err)) from None
        plan = Plan.build(rows, self.layout, k.device)
        pos = kwargs.get("kwargs", kwargs).get("position_ids")
        if isinstance(pos, torch.Tensor) and not torch.equal(pos.expand(b, q).long(), plan.q_pos.view(b, q).long()):
            self.layout = before
            raise CacheInputError(
                f"position_ids {pos.tolist()} are not the new tokens' positions in their own blocks "
                f"{plan.q_pos.view(b, q).tolist()}; drive the cache with step() (or feed those position_ids)")
        self._plan, self._layers_done = plan, 0
        self._record(rows.target, self._fed, b, q)

    def _record(self, target: Target, ids: torch.Tensor | None, b: int, q: int) -> None:
        if ids is None or tuple(ids.shape) != (b, q):
            self._ids_known = False
            return
        rows = ids.tolist()
        if target is Target.HISTORY:
            self._history_ids += rows[0]
        elif target is Target.STEPS:
            for w, row in enumerate(rows):
                self._block_ids[STEP0 + w] += row
        else:
            self._block_ids[OTHERS if target is Target.OTHERS_HEADER else OWN] += rows[0]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens in each worker's view (every view holds every block, so all have this length)."""
        return self.layout.total

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.layout.total + query_length, 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.layout.total

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    @property
    def is_compileable(self) -> bool:
        return False  # a compileable custom cache makes generate compile the forward; the layout is dynamic

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def batch_size(self) -> int:
        return self.workers

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise CacheInputError("a HogwildCache's batch rows are its workers; beam search and batch reordering do "
                              "not apply")

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.reorder_cache(torch.empty(0, dtype=torch.long))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(torch.empty(0, dtype=torch.long))

    def crop(self, max_length: int) -> None:
        raise CacheInputError("a HogwildCache cannot be cropped; finish_step() and reset() change what it holds")

    def reset(self) -> None:
        """Forget every token (history, headers, steps)."""
        if self._closed:
            raise StoreError("reset(): this HogwildCache is closed")
        self.history_cache._check_thread("reset()", "HogwildCache")
        for layer in self.layers:
            layer.reset()
        self.layout = Layout(self.workers, self.layout.step_capacity)
        self._history_ids, self._block_ids = [], [[] for _ in range(self.layout.blocks)]
        self._ids_known, self._plan, self._layers_done, self._broken = True, None, 0, False

    def __repr__(self) -> str:
        steps = [self.layout.step_len(w) for w in range(self.workers)]
        return (f"HogwildCache(workers={self.workers}, history={self.layout.history}, "
                f"headers={self.layout.lengths[OTHERS]}+{self.layout.lengths[OWN]}, steps={steps})")
