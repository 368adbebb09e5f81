"""kvtier: a drop-in transformers Cache that keeps the KV cache in a GPU -> CPU -> disk hierarchy."""

from .attention import ATTENTION_NAME, disable, enable, register
from .cache import KVTierCache, cache_argument
from .config import KVTierConfig
from .errors import (
    AttentionNotEnabledError,
    CacheInputError,
    CacheMemoryError,
    CacheThreadError,
    IncompleteSessionError,
    KVTierError,
    PromptMismatchError,
    RemoteStoreError,
    SessionExistsError,
    StoreCorruptError,
    StoreError,
    StoreFullError,
    StoreLockedError,
    StoreMismatchError,
    StoreMissingRecordError,
    StoreNotFoundError,
    UnsupportedModelError,
)
from .hogwild import CollaborationTemplate, HogwildCache, HogwildResult, HogwildStats
from .model_spec import ModelSpec
from .prefill import prefill
from .rope import Rope
from .sizes import parse_budget
from .store.remote import RemoteURL, list_sessions, unpublish
from .store.stats import CacheStats, DiskStats, TierStats

__version__ = "0.1.0"

__all__ = [
    "ATTENTION_NAME",
    "AttentionNotEnabledError",
    "CacheInputError",
    "CacheMemoryError",
    "CacheStats",
    "CacheThreadError",
    "CollaborationTemplate",
    "DiskStats",
    "HogwildCache",
    "HogwildResult",
    "HogwildStats",
    "IncompleteSessionError",
    "KVTierCache",
    "KVTierConfig",
    "KVTierError",
    "ModelSpec",
    "PromptMismatchError",
    "RemoteStoreError",
    "RemoteURL",
    "Rope",
    "SessionExistsError",
    "StoreCorruptError",
    "StoreError",
    "StoreFullError",
    "StoreLockedError",
    "StoreMismatchError",
    "StoreMissingRecordError",
    "StoreNotFoundError",
    "TierStats",
    "UnsupportedModelError",
    "cache_argument",
    "disable",
    "enable",
    "list_sessions",
    "parse_budget",
    "prefill",
    "register",
    "unpublish",
]
