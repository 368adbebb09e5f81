"""`ForwardGuard`: whether a forward pass that raised left the cache's layers in a state a rollback can trust.

kvtier's own work inside a pass (each layer's write and attention) runs inside the guard. An exception that
leaves it means a layer may be half-changed, except the errors kvtier raises before it changes anything: a
full store (`StoreFullError`) and memory it could not get (`CacheMemoryError`). An exception raised outside
it (the model's own layers, a user's hook) finds every layer whole. Ctrl-C never reaches the cache's end-of-
pass hook (torch calls it for `Exception` only), so it always leaves the cache `interrupted`."""

from __future__ import annotations

from types import TracebackType

from .errors import CacheMemoryError, StoreFullError

# Raised by the store and the pools before they change anything, and by a layer's write only at points where
# it is whole (see TieredLayer.commit).
CLEAN_FAILURES = (StoreFullError, CacheMemoryError)


class ForwardGuard:
    """`with guard:` around kvtier's work in a pass; `broken` once an unexpected exception left it."""

    def __init__(self) -> None:
        self.broken = False

    def __enter__(self) -> ForwardGuard:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool:
        if kind is not None and not issubclass(kind, CLEAN_FAILURES):
            self.broken = True
        return False
