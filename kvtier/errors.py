"""Exceptions raised by kvtier. Each one names what is wrong and, where it can, what to change."""

from __future__ import annotations


def printable(value: object) -> str:
    """`value` as text safe for a terminal: control and other non-printing characters become escapes.

    Paths, model ids and a session's `info` come from users; printed raw, an escape sequence in one of
    them would drive the terminal (colours, titles, cursor moves) instead of being shown.
    """
    text = str(value)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def not_utf8(text: str) -> str | None:
    """Where `text` cannot be written as UTF-8 (None: it can): bytes that were not UTF-8 reach Python as lone
    surrogates (a Latin-1 terminal, a pasted binary), and a tokenizer fails on them with a traceback."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        code = ord(text[err.start])
        byte = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"U+{code:04X}"
        return f"{byte} at character {err.start}"
    return None


def brief_path(path: object, limit: int = 200) -> str:
    """A path as messages show it: printable, and cut in the middle past `limit` characters (its start and its
    file name kept), so a path built by mistake or by an attacker never makes a message span lines or pages."""
    text = printable(path)
    if len(text) <= limit:
        return text
    head = limit // 3
    return f"{text[:head]}...{text[len(text) - (limit - head - 3):]}"


def brief(value: object, limit: int = 80) -> str:
    """How a message shows a value it refuses: one short line whatever the caller passed (an array or tensor by
    its type, dtype and shape, an object whose repr spans lines by its type, any other repr cut to `limit`
    characters), so a model, a tensor or a megabyte of text never floods the error."""
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    if shape is not None and dtype is not None and not isinstance(value, (str, bytes, type)):
        try:
            return f"a {type(value).__name__} of dtype {str(dtype).removeprefix('torch.')} and shape {tuple(shape)}"
        except Exception:  # noqa: BLE001 - a shape that is not a sequence: fall back to the type below
            pass
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - a repr that fails (an int too long to print, a broken __repr__)
        text = "\n"
    if "\n" in text or "\r" in text:
        return f"a {type(value).__name__} object"
    return text if len(text) <= limit else text[:limit - 3] + "..."


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
