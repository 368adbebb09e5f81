"""Options of a KVTierCache, validated once at construction."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from .errors import brief

MODES = ("exact", "sparse")
# A record header holds a length in 32 bits: no chunk, window or table of a store is longer (kvtier.store.codec)
MAX_RECORD_TOKENS = 2**32 - 1
# options counted in tokens per layer that a size of KV may stand for (converted for a model: kvtier.sizes)
TOKEN_BUDGETS = ("device_budget", "host_budget")
# LMDB maps the store into the address space: a map size must fit a 64-bit size_t with room to double
MAX_MAP_BYTES = 1 << 62


def _check_int(name: str, value: Any, low: int, allow_none: bool = False, high: int | None = None) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        extra = " or None" if allow_none else ""
        allowed = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"`{name}` must be an integer {allowed}{extra}, got {brief(value)}")


@dataclass
class KVTierConfig:
    """How a KVTierCache places and finds its KV.

    Budgets count tokens per full-attention layer (every batch row and KV head of a token together).
    `KVTierCache.for_model` and `KVTierCache.open` also take them as strings, tokens ("8192") or a size of KV
    for all full-attention layers ("8GiB"), and convert them for their model as `kvtier qa` does; a config built
    alone has no model to convert a size with, so it takes tokens only. Byte options (`initial_map_bytes`,
    `max_store_bytes`) take a number of bytes or a size ("64GiB").
    A chunk is `chunk_size` consecutive tokens of one layer, sealed from the recent window once the
    window holds `recent_window + chunk_size` tokens; the first `sink_tokens` tokens form a chunk of
    their own that never leaves the device (attention sinks, arXiv 2309.17453).

    Fields:
        mode: "exact" attends to every chunk wherever it lives; "sparse" attends, at each decode step, to the
            sinks, the recent window and the best chunks within `sparse_budget` (prefill stays exact).
        device_budget: tokens per layer the device pool may hold (None: no limit). It must hold the
            sinks, the recent window and one chunk being sealed.
        host_budget: tokens per layer the host pool may hold (None: no limit; 0: go straight to disk).
        store_path: LMDB store directory; None makes a temporary one that is removed on close.
        chunk_size: tokens per sealed chunk.
        page_size: tokens per page: sparse selection takes the best chunks whole while they fit, then fills
            the rest of the budget with the best pages of the chunks ranked next, so a needle in a chunk too
            large for what is left costs one page of it (page key bounds cost 1/page_size of the keys'
            memory on the device). Fixed when the store is created.
        sink_tokens: leading tokens pinned on the device (0 disables).
        recent_window: newest tokens kept unsealed on the device (sliding-window layers also keep this many
            tokens beyond their window, so `crop` can take back that many).
        staging_tokens: most tokens fetched from host/disk into one attention batch (bounds staging memory).
        zstd_level: None (the default): disk records hold the values as they are, checked by their XXH3-64, and
            are copied straight into place; or a zstd level, 1-22 or a fast negative one, for 1.1-1.2x fewer
            bytes on disk at a few times the decoding work (`kvtier bench codec`; see docs/benchmarks.md).
        byte_planes: split 16/32-bit values into byte planes before zstd (needs a `zstd_level`): 1.1-1.3x fewer
            bytes on disk, but decoded more slowly than a fast disk delivers them (docs/benchmarks.md).
        initial_map_bytes: LMDB map size at creation; it doubles when full.
        max_store_bytes: hard limit of the store size (None: grow while the disk allows).

    Sparse mode (see docs/sparse.md):
        sparse_budget: tokens attended per sequence and KV head at each decode step, sinks and recent
            window included; an int, or a float in (0, 1] for a fraction of the context (1.0 = exact).
        selector: chunk scoring policy, "quest_bound" (key min/max upper bound) or "recency" (newest first:
            StreamingLLM).
        shared_selection: every KV head of a layer keeps the same chunks (bounds the tokens loaded per layer
            and step by the budget; per-head selection may load the union of the heads' choices).
        adaptive_chunks: plan chunk sizes per layer from the attention skew measured at prefill; False: fixed
            `chunk_size` chunks (Quest-style pages).
        min_chunk_size, max_chunk_size: bounds of planned chunk sizes.
        observation_window: last prompt queries used to measure the skew.
        refine: split chunks that keep being selected and merge neighbours that never are, every
            `refine_every` decode steps.
        prefetch: read disk chunks ahead in background threads: what the next layer and step will likely
            need (sparse), the next chunks of a stream (exact attention over spilled chunks).
        lookahead: sparse decode: as each tiered layer starts, guess the next one's query from the current
            hidden state and start fetching the chunks it names (InfiniGen); needs a model whose layers
            kvtier recognises (see kvtier/sparse/lookahead.py). Off by default: on a CPU it has cost more
            than it saved so far (docs/benchmarks.md).
        reader_threads: background disk readers.
        prefetch_tokens: most prefetched-but-unused tokens held at once (bounds staging memory).
        lossy_disk: store chunks whose attention share is below `lossy_below` x uniform as int8 on disk.
    """

    mode: str = "exact"
    device_budget: int | None = None
    host_budget: int | None = None
    store_path: str | Path | None = None
    chunk_size: int = 64
    page_size: int = 16
    sink_tokens: int = 4
    recent_window: int = 64
    staging_tokens: int = 8192
    zstd_level: int | None = None
    byte_planes: bool = False
    initial_map_bytes: int | str = 1 << 28
    max_store_bytes: int | str | None = None
    sparse_budget: int | float = 0.05
    selector: str = "quest_bound"
    shared_selection: bool = False
    adaptive_chunks: bool = True
    min_chunk_size: int = 16
    max_chunk_size: int = 256
    observation_window: int = 32
    refine: bool = False
    refine_every: int = 32
    prefetch: bool = True
    lookahead: bool = False
    reader_threads: int = 2
    prefetch_tokens: int = 16384
    lossy_disk: bool = False
    lossy_below: float = 0.5

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.type == "bool" and not isinstance(getattr(self, f.name), bool):
                raise ValueError(f"`{f.name}` must be True or False, got {brief(getattr(self, f.name))}")
        # imported here: kvtier.sizes needs the model spec, whose imports need this module
        from .sizes import parse_size

        for name in ("initial_map_bytes", "max_store_bytes"):
            if isinstance(getattr(self, name), str):
                try:
                    setattr(self, name, parse_size(getattr(self, name)))
                except ValueError as exc:
                    raise ValueError(f"`{name}`: {exc}") from None
        for name in TOKEN_BUDGETS:
            value = getattr(self, name)
            if isinstance(value, str):  # a ValueError like every bad option (STYLE: config errors)
                raise ValueError(  # noqa: TRY004
                    f"`{name}`={brief(value)}: a KVTierConfig built alone takes tokens per layer; pass the string to "
                    "KVTierCache.for_model or KVTierCache.open, which convert a size for their model, or convert "
                    "it with kvtier.parse_budget(text, ModelSpec.from_model(model))"
                )
        if self.mode not in MODES:
            raise ValueError(f"`mode` must be one of {MODES}, got {brief(self.mode)}")
        # chunking sizes become record lengths, and a record header holds a length in 32 bits
        _check_int("chunk_size", self.chunk_size, 1, high=MAX_RECORD_TOKENS)
        _check_int("page_size", self.page_size, 1, high=MAX_RECORD_TOKENS)
        _check_int("sink_tokens", self.sink_tokens, 0, high=MAX_RECORD_TOKENS)
        _check_int("recent_window", self.recent_window, 0, high=MAX_RECORD_TOKENS)
        _check_int("staging_tokens", self.staging_tokens, 1)
        _check_int("device_budget", self.device_budget, 1, allow_none=True)
        _check_int("host_budget", self.host_budget, 0, allow_none=True)
        _check_int("initial_map_bytes", self.initial_map_bytes, 1 << 16, high=MAX_MAP_BYTES)
        _check_int("max_store_bytes", self.max_store_bytes, 1 << 16, allow_none=True, high=MAX_MAP_BYTES)
        from .store.codec import check_encoding

        check_encoding(self.zstd_level, self.byte_planes)
        if self.device_budget is not None and self.device_budget < self.min_device_budget:
            raise ValueError(
                f"`device_budget`={self.device_budget} tokens per layer cannot hold the sinks, the recent window "
                f"and one chunk being sealed: sink_tokens ({self.sink_tokens}) + recent_window "
                f"({self.recent_window}) + chunk_size ({self.chunk_size}) = {self.min_device_budget}. "
                f"Raise device_budget to at least {self.min_device_budget}, or lower recent_window/chunk_size."
            )
        if isinstance(self.sparse_budget, bool) or not (
            (isinstance(self.sparse_budget, int) and self.sparse_budget >= 1)
            or (isinstance(self.sparse_budget, float) and 0.0 < self.sparse_budget <= 1.0)
        ):
            raise ValueError(
                f"`sparse_budget` must be an integer >= 1 (tokens) or a float in (0, 1] (fraction of the context), "
                f"got {brief(self.sparse_budget)}"
            )
        from .sparse.select import SELECTORS

        if self.selector not in SELECTORS:
            raise ValueError(f"`selector` must be one of {sorted(SELECTORS)}, got {brief(self.selector)}")
        _check_int("min_chunk_size", self.min_chunk_size, 1, high=MAX_RECORD_TOKENS)
        _check_int("max_chunk_size", self.max_chunk_size, 1, high=MAX_RECORD_TOKENS)
        if self.adaptive and not self.min_chunk_size <= self.chunk_size <= self.max_chunk_size:
            raise ValueError(
                f"`chunk_size` ({self.chunk_size}) must lie within [min_chunk_size, max_chunk_size] "
                f"= [{self.min_chunk_size}, {self.max_chunk_size}]"
            )
        _check_int("observation_window", self.observation_window, 1)
        _check_int("refine_every", self.refine_every, 1)
        _check_int("reader_threads", self.reader_threads, 0)
        _check_int("prefetch_tokens", self.prefetch_tokens, 0)
        if (isinstance(self.lossy_below, bool) or not isinstance(self.lossy_below, (int, float))
                or not math.isfinite(self.lossy_below) or self.lossy_below < 0):
            raise ValueError(f"`lossy_below` must be a finite number >= 0, got {brief(self.lossy_below)}")
        if self.lossy_disk and self.mode != "sparse":
            raise ValueError("`lossy_disk` needs mode='sparse': exact mode must stay exact")
        if self.max_store_bytes is not None and self.max_store_bytes < self.initial_map_bytes:
            self.initial_map_bytes = self.max_store_bytes
        if self.store_path is not None:
            if not isinstance(self.store_path, (str, Path)) or not str(self.store_path) \
                    or "\0" in str(self.store_path):  # no file system takes a NUL in a name
                raise ValueError(f"`store_path` must be a directory path (str or pathlib.Path) or None, got "
                                 f"{brief(self.store_path)}")
            self.store_path = Path(self.store_path)

    @property
    def min_device_budget(self) -> int:
        return self.sink_tokens + self.recent_window + self.chunk_size

    @property
    def adaptive(self) -> bool:
        """Whether chunk sizes are planned from attention skew (sparse mode only)."""
        return self.mode == "sparse" and self.adaptive_chunks

    def budget_tokens(self, context: int) -> int:
        """Tokens a decode step attends to per sequence and KV head, for a context of that many tokens."""
        if isinstance(self.sparse_budget, float):
            return max(1, math.ceil(self.sparse_budget * context))
        return self.sparse_budget

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["store_path"] = None if self.store_path is None else str(self.store_path)
        return out
