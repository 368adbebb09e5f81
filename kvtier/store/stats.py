"""Per-tier accounting, read by `KVTierCache.stats()` and by the tests that check budgets."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class TierStats:
    """One tier, summed over layers. Budgets and peaks are per layer (the unit budgets are given in)."""

    tokens: int = 0  # tokens resident now, all layers
    bytes: int = 0  # bytes resident now (on disk: compressed bytes of live records)
    budget_tokens: int | None = None  # per-layer budget; None: no limit
    peak_tokens: int = 0  # highest per-layer occupancy seen
    hits: int = 0  # chunk reads served by this tier
    misses: int = 0  # chunk reads that had to go to a lower tier
    bytes_read: int = 0  # bytes moved out of this tier (to serve attention or a promotion)
    bytes_written: int = 0  # bytes moved into this tier (placement, eviction, promotion)

    @property
    def bytes_moved(self) -> int:
        return self.bytes_read + self.bytes_written


@dataclass
class DiskStats(TierStats):
    raw_bytes: int = 0  # uncompressed size of the live records

    @property
    def compression_ratio(self) -> float | None:
        return self.raw_bytes / self.bytes if self.bytes else None


@dataclass
class CacheStats:
    device: TierStats = field(default_factory=TierStats)
    host: TierStats = field(default_factory=TierStats)
    disk: DiskStats = field(default_factory=DiskStats)
    staging_peak_tokens: int = 0  # most tokens fetched into one attention batch
    steps: int = 0  # forward passes seen
    stall_s: float = 0.0  # time attention waited for disk reads (synchronous reads and unfinished prefetches)
    prefetch_issued: int = 0  # disk reads started ahead of need
    prefetch_hits: int = 0  # disk reads attention needed that had been started ahead
    prefetch_wasted: int = 0  # prefetched chunks dropped unused
    disk_loads_sync: int = 0  # disk reads done on the critical path, not prefetched
    selected_tokens: int = 0  # sparse decode: tokens attended, summed over (step, layer, row, KV head)
    selection_steps: int = 0  # sparse decode: (step, layer, row, KV head) selections made
    lookahead_guesses: int = 0  # next-layer guesses made (one per tiered layer and decode step)
    lookahead_selected: int = 0  # chunks selected by layers that had a guess
    lookahead_named: int = 0  # of those, chunks the guess had named (and started fetching)
    records_left: int = 0  # unreferenced records a full store refused to delete (harmless; the next open drops them)

    @property
    def prefetch_hit_rate(self) -> float | None:
        """Share of the disk reads attention needed whose read had been started ahead of time."""
        total = self.prefetch_hits + self.disk_loads_sync
        return self.prefetch_hits / total if total else None

    @property
    def lookahead_recall(self) -> float | None:
        """Share of the chunks a layer selected that the next-layer guess had named ahead of time."""
        return self.lookahead_named / self.lookahead_selected if self.lookahead_selected else None

    @property
    def mean_attended_tokens(self) -> float | None:
        """Sparse decode: tokens attended per (layer, row, KV head) and step, on average."""
        return self.selected_tokens / self.selection_steps if self.selection_steps else None

    def per_step(self) -> dict[str, dict[str, float]]:
        """Bytes moved per tier and forward pass."""
        n = max(1, self.steps)
        return {tier: {"bytes_read": getattr(self, tier).bytes_read / n, "bytes_written": getattr(self, tier).bytes_written / n}
                for tier in ("device", "host", "disk")}

    def as_dict(self) -> dict:
        out = asdict(self)
        for tier in ("device", "host", "disk"):
            out[tier]["bytes_moved"] = getattr(self, tier).bytes_moved
        out["disk"]["compression_ratio"] = self.disk.compression_ratio
        out["prefetch_hit_rate"] = self.prefetch_hit_rate
        out["mean_attended_tokens"] = self.mean_attended_tokens
        out["lookahead_recall"] = self.lookahead_recall
        out["per_step"] = self.per_step()
        return out
