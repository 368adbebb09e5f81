"""kvtier's attention and mask functions, registered with transformers, and `enable(model)`.

The causal mask transformers builds can only describe one contiguous run of positions, so kvtier asks
for none: its mask function hands the 2-D padding mask through, and its attention function builds the
causal, sliding-window and padding masks itself from logical positions, over KV wherever it lives.
"""

from __future__ import annotations

import weakref

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from .attend import attend
from .errors import CacheInputError, UnsupportedModelError
from .layers import KVHandle, SlidingLayer
from .sparse.lookahead import decoder_layers

# Not containing "sdpa", "flash_attention" or "flex_attention": transformers dispatches on those substrings.
ATTENTION_NAME = "kvtier"

_previous: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = weakref.WeakKeyDictionary()


def kvtier_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
    """Mask function: pass the 2-D padding mask [B, past + Q] (True = real token) through untouched."""
    return attention_mask


def kvtier_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: KVHandle | torch.Tensor,
    value: KVHandle | torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query: [B, Hq, Q, D]. Returns attn_output [B, Q, Hq, D] and no weights."""
    if module.training and dropout > 0:
        raise UnsupportedModelError("kvtier attention is for inference; call model.eval() (dropout is not supported)")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    pad = _padding_mask(attention_mask)
    if isinstance(key, KVHandle):
        layer = key.layer
        if sliding_window is not None and not isinstance(layer, SlidingLayer):
            raise UnsupportedModelError(
                f"layer {layer.index} attends with sliding_window={sliding_window} but its config marks it as a "
                "full-attention layer; set config.layer_types to match the model"
            )
        total = key.past_len + query.shape[2]
        if pad is not None and pad.shape[-1] != total:
            raise CacheInputError(
                f"attention_mask covers {pad.shape[-1]} positions; it must cover the {key.past_len} cached tokens "
                f"plus the {query.shape[2]} new ones ({total})"
            )
        out = layer.attend(query, key, pad, scale, softcap)
    else:
        out = _plain_attention(query, key, value, pad, scale, sliding_window, softcap)
    return out.transpose(1, 2).contiguous(), None


def _padding_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    if mask is None:
        return None
    if mask.dim() != 2:
        raise CacheInputError(
            f"kvtier attention takes a 2-D padding mask [batch, length], got a {mask.dim()}-D mask; "
            "custom 4-D masks are not supported"
        )
    return mask.bool()


def _plain_attention(query, key, value, pad, scale, window, softcap) -> torch.Tensor:
    """The model runs kvtier attention without a KVTierCache (e.g. use_cache=False, or another Cache):
    keys are the last K positions, queries the last Q."""
    total = pad.shape[-1] if pad is not None else key.shape[2]
    k_pos0, q_pos0 = total - key.shape[2], total - query.shape[2]
    valid = None
    if pad is not None and not bool(pad.all()):
        valid = pad[:, k_pos0:]
    out, _ = attend(query, key, value, q_pos0=q_pos0, key_pos=k_pos0, scale=scale, key_valid=valid,
                    causal=True, window=window, softcap=softcap, need_lse=False)
    return out


def register() -> None:
    """Register kvtier's attention and mask functions with transformers (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, kvtier_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, kvtier_mask)


def enable(model: torch.nn.Module) -> torch.nn.Module:
    """Switch `model` to kvtier attention (a KVTierCache needs it; without one it computes plain attention)."""
    register()
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current != ATTENTION_NAME:
        _switch(model, current)
    # Every decoder layer reports its start to the cache (next-layer prefetch); once per layer, also for a
    # model loaded with attn_implementation="kvtier" or copied from an enabled one.
    for layer in decoder_layers(model).values():
        if _layer_starts not in layer._forward_pre_hooks.values():
            layer.register_forward_pre_hook(_layer_starts, with_kwargs=True)
    return model


def _switch(model: torch.nn.Module, current: str | None) -> None:
    if not hasattr(model, "set_attn_implementation"):
        raise UnsupportedModelError(f"{type(model).__name__} cannot switch its attention implementation")
    _previous[model] = current or "sdpa"
    model.set_attn_implementation(ATTENTION_NAME)
    if model.config._attn_implementation != ATTENTION_NAME:
        raise UnsupportedModelError(
            f"{type(model).__name__} does not use transformers' AttentionInterface, so kvtier cannot serve it"
        )


def _layer_starts(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """Pre-hook of every decoder layer: tell a kvtier cache that the layer starts (for next-layer prefetch)."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    notify = getattr(cache, "layer_starts", None)
    if notify is not None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        if isinstance(hidden, torch.Tensor):
            notify(module.self_attn.layer_idx, hidden, kwargs.get("position_embeddings"))


def disable(model: torch.nn.Module) -> torch.nn.Module:
    """Put back the attention implementation the model had before `enable`."""
    for layer in decoder_layers(model).values():
        for key, hook in list(layer._forward_pre_hooks.items()):
            if hook is _layer_starts:
                del layer._forward_pre_hooks[key]
                layer._forward_pre_hooks_with_kwargs.pop(key, None)
    previous = _previous.pop(model, None)
    if previous is not None:
        model.set_attn_implementation(previous)
    return model
