"""`KVHandle`: what `KVTierCache.update` returns in place of key/value tensors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .errors import AttentionNotEnabledError, UnsupportedModelError

_NOT_ENABLED = (
    "a KVTierCache was used by an attention implementation that is not kvtier's. Switch the model with "
    "`kvtier.enable(model)`, or build the cache with `KVTierCache.for_model(model)`, which does it for you."
)


@dataclass(slots=True, eq=False)
class KVHandle:
    """The new tokens of one layer's forward, for kvtier's attention (the only code that reads it).

    Anything else touching it (sdpa, eager, flash) fails at once with a message that says how to fix it.
    k_new, v_new: [B, Hkv, Q, D]; past_len: tokens cached before them.
    """

    layer: Any  # TieredLayer | SlidingLayer
    past_len: int
    k_new: torch.Tensor
    v_new: torch.Tensor
    context: tuple[torch.Tensor, torch.Tensor, int] | None = None  # sliding layers: k, v, first position
    new_in_window: bool = False  # the new tokens already sit in the device window (decode steps)
    guard: Any = None  # the cache's ForwardGuard, entered around attention over this handle

    @property
    def q_len(self) -> int:
        return self.k_new.shape[2]

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        _refuse_compile()
        raise AttentionNotEnabledError(_NOT_ENABLED)

    def __getattr__(self, name: str):
        _refuse_compile()
        raise AttentionNotEnabledError(f"{_NOT_ENABLED} (attribute {name!r} was requested)")


def _refuse_compile() -> None:
    """torch.compile traces the cache too (its tracer reads a handle's attributes): say that, not 'not enabled'."""
    if torch.compiler.is_compiling():
        raise UnsupportedModelError(COMPILE_REFUSED)


COMPILE_REFUSED = ("a kvtier cache does not run inside torch.compile (its tiers move tokens between devices and "
                   "the disk between passes, outside any graph): call the model uncompiled with a kvtier cache")
