"""Chunked prefill: feed a long prompt in segments so only one segment's activations exist at a time.

Each segment attends to everything before it (exact: the device arena, plus spilled chunks streamed from
the host and disk, read ahead by the reader threads) and its own KV is sealed into chunks as it goes, so
the device holds at most the KV budget plus one segment. The result equals a one-shot prefill.
"""

from __future__ import annotations

import inspect
import time

import torch
from tqdm import tqdm

from .cache import KVTierCache, cache_argument
from .errors import brief


def _fmt_tokens(n: int) -> str:
    return f"{n / 1000:.1f}k" if n >= 1000 else str(n)


@torch.inference_mode()
def prefill(
    model: torch.nn.Module,
    cache: KVTierCache,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    segment_tokens: int = 2048,
    progress: bool = True,
) -> torch.Tensor:
    """Prefill `input_ids` ([B, T], appended to whatever `cache` holds) in segments of `segment_tokens`.

    attention_mask: [B, cached + T] padding mask, as generate takes it (None: no padding).
    Returns the logits of the last position, [B, vocab] (what generate would sample the next token from).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"prefill(model, cache, input_ids) takes a transformers model, got {type(model).__name__}")
    if not isinstance(cache, KVTierCache):
        raise TypeError(f"prefill() fills a KVTierCache (KVTierCache.for_model(model)), got {type(cache).__name__}")
    if isinstance(segment_tokens, bool) or not isinstance(segment_tokens, int) or segment_tokens < 1:
        raise ValueError(f"`segment_tokens` must be an int >= 1, got {brief(segment_tokens)}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 \
            or input_ids.dtype not in (torch.int64, torch.int32):  # what an embedding looks up
        raise ValueError(f"input_ids must be an int64 (or int32) tensor [batch, tokens], got {_described(input_ids)}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} hold no tokens; pass at least one token of one sequence")
    past = cache.get_seq_length()
    total = input_ids.shape[1]
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2 \
                or attention_mask.shape[0] != input_ids.shape[0]:
            raise ValueError(f"attention_mask must be a [batch, cached + new] = [{input_ids.shape[0]}, "
                             f"{past + total}] padding mask, got {_described(attention_mask)}")
        if attention_mask.shape[-1] != past + total:
            raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions, expected {past + total}")
        # positions count the mask's ones: any other value (2, 0.5, NaN) would give positions no forward pass uses
        if attention_mask.dtype != torch.bool and bool(((attention_mask != 0) & (attention_mask != 1)).any()):
            raise ValueError("attention_mask must hold 1 for tokens and 0 for padding only")
    kw = {cache_argument(model): cache, "use_cache": True}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kw["logits_to_keep"] = 1  # a segment's full logits would dwarf its KV
    if attention_mask is not None:  # left padding: positions count real tokens only, as generate does
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
    else:
        positions = torch.arange(past, past + total, device=input_ids.device).expand(input_ids.shape[0], -1)
    cache.reserve(past + total)  # the device pools grow once, not at every segment
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc="prefill", disable=not progress, leave=False)
    start_time, logits = time.perf_counter(), None
    try:
        for start in range(0, total, segment_tokens):
            end = min(total, start + segment_tokens)
            seg_kw = dict(kw)
            if attention_mask is not None:
                seg_kw["attention_mask"] = attention_mask[:, : past + end]
            out = _exact_forward(model, cache, input_ids[:, start:end], positions[:, start:end], seg_kw)
            logits = out.logits[:, -1]
            bar.update(end - start)
            s = cache.stats()
            bar.set_postfix_str(f"{end / (time.perf_counter() - start_time):.0f} tok/s | device "
                                f"{_fmt_tokens(s.device.tokens)} host {_fmt_tokens(s.host.tokens)} "
                                f"disk {_fmt_tokens(s.disk.tokens)}")
    finally:
        bar.close()
    return logits


def _described(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of dtype {str(x.dtype).removeprefix('torch.')} and shape {tuple(x.shape)}"
    return type(x).__name__


def _exact_forward(model, cache: KVTierCache, ids: torch.Tensor, positions: torch.Tensor, kw: dict):
    """One segment's forward, always with exact attention: a one-token forward in sparse mode would otherwise
    take the sparse decode path, and a prefill must give what a one-shot prefill gives."""
    if ids.shape[1] > 1 or cache.config.mode == "exact":
        return model(input_ids=ids, position_ids=positions, **kw)
    mode = cache.config.mode
    cache.set_mode("exact")
    try:
        return model(input_ids=ids, position_ids=positions, **kw)
    finally:
        cache.set_mode(mode)
