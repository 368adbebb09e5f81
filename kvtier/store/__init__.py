"""The three tiers: chunk records, budgeted pools, the LMDB disk store and the manager that moves chunks."""

from .chunk import Chunk, Tier
from .codec import LAYOUT_VERSION, RecordCodec, RecordHeader
from .disk import DiskStore
from .stats import CacheStats, DiskStats, TierStats
from .tiers import TierManager

__all__ = ["LAYOUT_VERSION", "CacheStats", "Chunk", "DiskStats", "DiskStore", "RecordCodec", "RecordHeader",
           "Tier", "TierManager", "TierStats"]
