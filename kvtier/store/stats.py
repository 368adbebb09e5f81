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

    def as_dict(self) -> dict:
        out = asdict(self)
        for tier in ("device", "host", "disk"):
            out[tier]["bytes_moved"] = getattr(self, tier).bytes_moved
        out["disk"]["compression_ratio"] = self.disk.compression_ratio
        return out
