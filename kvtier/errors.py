"""Exceptions raised by kvtier. Each one names what is wrong and, where it can, what to change."""

from __future__ import annotations


class KVTierError(Exception):
    """Base class of every error kvtier raises on purpose."""


class AttentionNotEnabledError(KVTierError, RuntimeError):
    """A KVTierCache reached an attention implementation other than kvtier's."""


class UnsupportedModelError(KVTierError, ValueError):
    """The model has a feature kvtier cannot serve exactly (and would otherwise serve wrongly)."""


class CacheInputError(KVTierError, ValueError):
    """Tensors handed to the cache do not match what it was built for (dtype, device, shape)."""


class CacheMemoryError(KVTierError, MemoryError):
    """The device could not hold the arena asked of it (a `reserve` or a growth); the cache is unchanged."""


class PromptMismatchError(CacheInputError):
    """A prompt does not start with the token ids a cache (a reopened session) holds."""


class CacheThreadError(KVTierError, RuntimeError):
    """A cache was driven from a thread other than the one that owns it."""


class StoreError(KVTierError):
    """Base class of disk-store errors."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """The path holds no kvtier store (nothing was created or changed there)."""


class StoreCorruptError(StoreError):
    """A record, the session manifest or the store's files are damaged, truncated or inconsistent."""


class StoreMissingRecordError(StoreCorruptError):
    """A record the session refers to is not in the store."""


class StoreMismatchError(StoreError):
    """The store (or one record) was written for another model, dtype, session or layout version."""


class StoreLockedError(StoreError):
    """Another process holds the store open."""


class StoreFullError(StoreError):
    """The store reached its size limit; the failed write left the store as it was."""


class IncompleteSessionError(StoreError):
    """The store holds a session whose prefill never finished (it was interrupted)."""


class RemoteStoreError(StoreError):
    """A Redis/Valkey server could not be reached, timed out, refused the credentials or a command (after
    bounded retries); the local store is left as it was."""


class SessionExistsError(RemoteStoreError):
    """A session of that name is already published on the server (published sessions are immutable)."""
