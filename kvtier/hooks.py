"""Hooks on a model's forward that tell a KVTierCache when a forward pass starts and ends.

As a pass starts, the cache checks that it runs in the cache's owner thread and records the pass's input
ids (a saved session knows its tokens); as it ends, the cache learns whether it finished. `kvtier.enable`
installs them once per model; `kvtier.disable` removes them. State stays in the cache, never on the model.
"""

from __future__ import annotations

import torch

from .errors import CacheInputError


def _cache_of(kwargs: dict):
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    return cache if hasattr(cache, "forward_starts") else None


def _forward_starts(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    cache = _cache_of(kwargs)
    if cache is not None:
        if kwargs.get("use_cache") is False:
            raise CacheInputError("use_cache=False with a kvtier cache: transformers then feeds the whole sequence "
                                  "again at every step over the cache that holds it; drop use_cache=False (or the "
                                  "cache)")
        ids = kwargs.get("input_ids", args[0] if args else None)
        cache.forward_starts(ids if isinstance(ids, torch.Tensor) else None, model=module,
                             position_ids=kwargs.get("position_ids"), attention_mask=kwargs.get("attention_mask"))


def _forward_ends(module: torch.nn.Module, args: tuple, kwargs: dict, output) -> None:
    cache = _cache_of(kwargs)
    if cache is not None:
        cache.forward_ends(finished=output is not None)  # torch passes None when forward raised


def install(model: torch.nn.Module) -> None:
    """Hook `model`'s forward (idempotent). The end hook also runs when the forward raises."""
    if _forward_starts not in model._forward_pre_hooks.values():
        model.register_forward_pre_hook(_forward_starts, with_kwargs=True)
    if _forward_ends not in model._forward_hooks.values():
        model.register_forward_hook(_forward_ends, with_kwargs=True, always_call=True)


def remove(model: torch.nn.Module) -> None:
    for hooks, extra in ((model._forward_pre_hooks, (model._forward_pre_hooks_with_kwargs,)),
                         (model._forward_hooks, (model._forward_hooks_with_kwargs,
                                                 model._forward_hooks_always_called))):
        for key, hook in list(hooks.items()):
            if hook in (_forward_starts, _forward_ends):
                del hooks[key]
                for d in extra:
                    d.pop(key, None)
