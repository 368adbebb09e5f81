"""kvtier: a drop-in transformers Cache that keeps the KV cache in a GPU -> CPU -> disk hierarchy.

The public names are imported on first use (PEP 562): `import kvtier` and `kvtier --version` stay quick,
and torch and transformers load with the first name that needs them."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the module (relative to this package) that defines it.
_EXPORTS = {
    **dict.fromkeys(("ATTENTION_NAME", "disable", "enable", "register"), ".attention"),
    **dict.fromkeys(("KVTierCache", "cache_argument"), ".cache"),
    "KVTierConfig": ".config",
    **dict.fromkeys((
        "AttentionNotEnabledError", "CacheInputError", "CacheMemoryError", "CacheThreadError",
        "IncompleteSessionError", "KVTierError", "PromptMismatchError", "RemoteStoreError", "SessionExistsError",
        "StoreCorruptError", "StoreError", "StoreFullError", "StoreLockedError", "StoreMismatchError",
        "StoreMissingRecordError", "StoreNotFoundError", "UnsupportedModelError"), ".errors"),
    **dict.fromkeys(("CollaborationTemplate", "HogwildCache", "HogwildResult", "HogwildStats"), ".hogwild"),
    "FewRowLinears": ".few_rows",
    "ModelSpec": ".model_spec",
    "prefill": ".segmented",
    "Rope": ".rope",
    "parse_budget": ".sizes",
    **dict.fromkeys(("RemoteURL", "list_sessions", "unpublish"), ".store.remote"),
    **dict.fromkeys(("CacheStats", "DiskStats", "TierStats"), ".store.stats"),
}


# Subpackages the docs name as `kvtier.hogwild.generate` and the like: `import kvtier` reaches them too.
_SUBPACKAGES = ("bench", "hogwild", "kernels", "sparse", "store", "tim")


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        if name in _SUBPACKAGES:
            return importlib.import_module(f".{name}", __name__)  # importing sets the attribute: found once
        raise AttributeError(f"module 'kvtier' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # found once; later lookups never come back here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBPACKAGES))


if TYPE_CHECKING:  # what type checkers and IDEs see: the same names, imported eagerly
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
    from .few_rows import FewRowLinears
    from .hogwild import CollaborationTemplate, HogwildCache, HogwildResult, HogwildStats
    from .model_spec import ModelSpec
    from .rope import Rope
    from .segmented import prefill
    from .sizes import parse_budget
    from .store.remote import RemoteURL, list_sessions, unpublish
    from .store.stats import CacheStats, DiskStats, TierStats

__all__ = [
    "ATTENTION_NAME",
    "AttentionNotEnabledError",
    "CacheInputError",
    "CacheMemoryError",
    "CacheStats",
    "CacheThreadError",
    "CollaborationTemplate",
    "DiskStats",
    "FewRowLinears",
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
