"""kvtier's attention and mask functions, registered with transformers, and `enable(model)`.

The causal mask transformers builds can only describe one contiguous run of positions, so kvtier asks
for none: its mask function hands the 2-D padding mask through, and its attention function builds the
causal, sliding-window and padding masks itself from logical positions, over KV wherever it lives.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from . import hooks
from .attend import attend
from .errors import CacheInputError, UnsupportedModelError, brief
from .kernels import merge_sink
from .layers import KVHandle
from .sparse.lookahead import decoder_layers

# Not containing "sdpa", "flash_attention" or "flex_attention": transformers dispatches on those substrings.
ATTENTION_NAME = "kvtier"

_previous: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = weakref.WeakKeyDictionary()


def kvtier_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
    """Mask function: pass the 2-D padding mask [B, past + Q] (True = real token) through untouched."""
    return attention_mask


# Keyword arguments attention modules pass (audited on transformers 5.24; docs/how-it-works.md has the table).
# kvtier_attention's named parameters are implemented. These never change what attention computes:
_IGNORED = frozenset({
    "position_ids",  # RoPE is already in q and k; masks come from the cache's logical positions
    "use_cache",  # the cache acted in update(), before attention
    "output_hidden_states",  # read by the model, not by attention
    "output_router_logits",
    "num_items_in_batch",
    "tokenizer",  # generate's, for stop_strings: read by its stopping criteria; transformers passes it on
    "assistant_tokenizer",  # likewise, for assisted decoding across tokenizers
})
# These are harmless at the value that leaves attention plain; None always does (transformers' "feature off").
_PLAIN_VALUES = {"is_causal": True, "output_attentions": False}


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
    s_aux: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query: [B, Hq, Q, D]; s_aux: [Hq] attention-sink logits or None. Returns attn_output [B, Q, Hq, D] and
    no weights."""
    if module.training and dropout > 0:
        raise UnsupportedModelError("kvtier attention is for inference; call model.eval() (dropout is not supported)")
    _refuse_unknown(module, kwargs)
    sink = None if s_aux is None else _sink_logits(module, s_aux, query.shape[1])
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    pad = _padding_mask(attention_mask)
    need_lse = sink is not None  # the sink rescales the merged result by its LSE
    if isinstance(key, KVHandle):
        layer = key.layer
        if sliding_window is not None and not layer.is_sliding:
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
        with key.guard or contextlib.nullcontext():
            out, lse = layer.attend(query, key, pad, scale, softcap, need_lse)
    else:
        _refuse_packed(kwargs, pad, query.shape[2])
        out, lse = _plain_attention(query, key, value, pad, scale, sliding_window, softcap, need_lse)
    if sink is not None:  # once, after every part of this layer call is merged
        out = merge_sink(out, lse, sink).to(query.dtype)
    return out.transpose(1, 2).contiguous(), None


def _refuse_unknown(module: torch.nn.Module, kwargs: dict) -> None:
    """Raise for any keyword that asks attention for something kvtier does not do, instead of dropping it."""
    causal = kwargs.get("is_causal")
    if not (getattr(module, "is_causal", True) if causal is None else causal):
        raise UnsupportedModelError(
            f"{_family(module)} attends bidirectionally (is_causal=False); kvtier serves causal attention only"
        )
    for name, value in kwargs.items():
        if value is None or name in _IGNORED or (name in _PLAIN_VALUES and value is _PLAIN_VALUES[name]):
            continue
        shown = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else brief(value)
        raise UnsupportedModelError(
            f"{_family(module)} passes `{name}` ({shown}) to its attention function; kvtier does not implement "
            "it and refuses rather than ignore it: drop that option, or run the model without kvtier "
            "(kvtier.disable(model))"
        )


def _refuse_packed(kwargs: dict, pad: torch.Tensor | None, nq: int) -> None:
    """Without a padding mask or a cache, transformers reads position_ids that restart inside a row as several
    sequences packed into it and masks between them; kvtier's plain path would attend across them."""
    if kwargs.get("use_cache") or pad is not None or nq < 2:  # with a cache transformers does not unpack either
        return
    pos = kwargs.get("position_ids")  # [B, Q]
    if isinstance(pos, torch.Tensor) and pos.dim() == 2 and bool((pos.diff(dim=-1) != 1).any()):
        raise UnsupportedModelError(
            "position_ids restart inside a row (packed sequences); kvtier attention does not mask between packed "
            "sequences: put one sequence per row, with an attention_mask for the padding"
        )


def _sink_logits(module: torch.nn.Module, s_aux: torch.Tensor, heads: int) -> torch.Tensor:
    """s_aux as one sink logit per query head [Hq] (gpt-oss style), or an error naming what was passed."""
    if s_aux.dim() != 1 or s_aux.shape[0] != heads:
        raise UnsupportedModelError(
            f"{_family(module)} passes attention sinks `s_aux` of shape {tuple(s_aux.shape)}; kvtier supports one "
            f"sink logit per query head ([{heads}])"
        )
    return s_aux


def _family(module: torch.nn.Module) -> str:
    config = getattr(module, "config", None)
    name = getattr(config, "model_type", None)
    return f"{name} ({type(module).__name__})" if name else type(module).__name__


def _padding_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    if mask is None:
        return None
    if mask.dim() != 2:
        raise CacheInputError(
            f"kvtier attention takes a 2-D padding mask [batch, length], got a {mask.dim()}-D mask; "
            "custom 4-D masks are not supported"
        )
    return mask.bool()


def _plain_attention(query, key, value, pad, scale, window, softcap,
                     need_lse) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model runs kvtier attention without a KVTierCache (e.g. use_cache=False, or another Cache):
    keys are the last K positions, queries the last Q. Returns as `attend`."""
    total = pad.shape[-1] if pad is not None else key.shape[2]
    k_pos0, q_pos0 = total - key.shape[2], total - query.shape[2]
    valid = None
    if pad is not None and not bool(pad.all()):
        valid = pad[:, k_pos0:]
    return attend(query, key, value, q_pos0=q_pos0, key_pos=k_pos0, scale=scale, key_valid=valid,
                  causal=True, window=window, softcap=softcap, need_lse=need_lse)


def register() -> None:
    """Register kvtier's attention and mask functions with transformers (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, kvtier_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, kvtier_mask)


def enable(model: torch.nn.Module) -> torch.nn.Module:
    """Switch `model` to kvtier attention (a KVTierCache needs it; without one it computes plain attention)."""
    _check_model(model)
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
    hooks.install(model)  # forward passes report their start, input ids and end to the cache
    return model


def _check_model(model: object) -> None:
    if not isinstance(model, torch.nn.Module):
        raise UnsupportedModelError(f"kvtier attention serves a transformers model (a torch.nn.Module), got "
                                    f"{type(model).__name__}")


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
    _check_model(model)
    for layer in decoder_layers(model).values():
        for key, hook in list(layer._forward_pre_hooks.items()):
            if hook is _layer_starts:
                del layer._forward_pre_hooks[key]
                layer._forward_pre_hooks_with_kwargs.pop(key, None)
    hooks.remove(model)
    previous = _previous.pop(model, None)
    if previous is not None:
        model.set_attn_implementation(previous)
    return model
