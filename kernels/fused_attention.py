"""Attention over one slice of the keys through torch's fused kernels, returning the log-sum-exp.

Same contract as `partial_attention` (its plain-torch reference), at the speed of the kernels transformers
itself runs: on CPU `_scaled_dot_product_flash_attention_for_cpu`, on CUDA the flash kernel (fp16/bf16,
no mask) or the memory-efficient one (any dtype, additive mask); all three return the LSE the merge needs.

What no fused kernel expresses, and so stays with the reference: tanh soft-capping of the scores (Gemma 2),
and devices other than CPU and CUDA. `fused_attention` returns None for those.

GQA is handled without copying keys: with no mask every query row of a KV head's group sees the same keys,
so the group folds into the query dimension (one call, as transformers' sdpa path does); with a mask or a
causal cut the group's query heads take one call each, on a strided view.
"""

from __future__ import annotations

import warnings

import torch

from . import native

_FALLBACKS: set[str] = set()  # CUDA cases a fused kernel refused once (warned once each)


def fused_available(q: torch.Tensor, softcap: float | None) -> bool:
    """Whether `fused_attention` can take this query (else the caller uses `partial_attention`)."""
    return softcap is None and q.device.type in ("cpu", "cuda")


def fused_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    mask: torch.Tensor | None = None,
    causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """q: [B, Hq, Q, D]; k, v: [B, Hkv, K, D]; mask: bool [B or 1, Hkv or 1, Q, K] (True = may attend), or
    None; causal: query i sees keys 0..i (top-left aligned, as sdpa's is_causal), only without a mask.

    Returns out [B, Hq, Q, D] and lse [B, Hq, Q], both float32 (rows that see no key: out 0, lse -inf),
    or None when no fused kernel takes the case.
    """
    if q.device.type not in ("cpu", "cuda"):
        return None
    if mask is not None and causal:
        raise ValueError("fused_attention takes a mask or causal=True, not both")
    b, hq, nq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    bias = None if mask is None else _additive(mask, q.dtype)
    if not causal and (bias is None or bias.shape[-2] == 1):
        # Every query row of a group sees the same keys: fold the group into the rows, one call over
        # [B, Hkv, G*Q, D] (a mask that does not vary by query broadcasts over the folded rows).
        if bias is not None:
            bias = bias.expand(*bias.shape[:2], g * nq, bias.shape[-1])
        else:  # few rows on a CPU: kvtier's C kernel reads each key once for all of a head's rows
            res = native.dense_attention(q, k, v, scale)
            if res is not None:
                return res
        res = _call(q.reshape(b, hkv, g * nq, d), k, v, scale, bias, False)
        if res is None:
            return None
        out, lse = res
        out, lse = out.reshape(b, hq, nq, d).float(), lse.reshape(b, hq, nq)
        return _unseen(out, lse, mask, b, hkv, g, nq)
    if g == 1:
        res = _call(q, k, v, scale, bias, causal)
        if res is None:
            return None
        out, lse = res
    else:
        grouped = q.view(b, hkv, g, nq, d)
        out = torch.empty(b, hkv, g, nq, d, dtype=q.dtype, device=q.device)
        lse = torch.empty(b, hkv, g, nq, dtype=torch.float32, device=q.device)
        for i in range(g):
            res = _call(grouped[:, :, i], k, v, scale, bias, causal)
            if res is None:
                return None
            out[:, :, i], lse[:, :, i] = res
        out, lse = out.view(b, hq, nq, d), lse.view(b, hq, nq)
    return _unseen(out.float(), lse, mask, b, hkv, g, nq)


def _unseen(out, lse, mask, b, hkv, g, nq) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows that see no key get out 0 and lse -inf (kernels differ on what they return; the merge needs that)."""
    if mask is None:
        return out, lse
    sees = mask.any(-1)  # [B or 1, Hkv or 1, Q or 1]
    if bool(sees.all()):
        return out, lse
    sees = sees.unsqueeze(2).expand(b, hkv, g, nq).reshape(b, hkv * g, nq)
    return out.masked_fill(~sees.unsqueeze(-1), 0.0), lse.masked_fill(~sees, float("-inf"))


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool mask -> additive bias in the query's dtype (the kernels take no bool mask with an LSE)."""
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return bias.masked_fill_(~mask, float("-inf"))


def _call(q, k, v, scale, bias, causal) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One fused call on [B, H, Q, D] inputs with equal head counts: (out in q.dtype, lse float32 [B, H, Q])."""
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=bias, scale=scale)
        return out, lse
    return _call_cuda(q, k, v, scale, bias, causal)


def _call_cuda(q, k, v, scale, bias, causal) -> tuple[torch.Tensor, torch.Tensor] | None:
    nq = q.shape[2]
    case = f"{q.dtype}, head_dim {q.shape[-1]}, {'mask' if bias is not None else 'no mask'}"
    try:
        if bias is None and q.dtype in (torch.float16, torch.bfloat16):
            res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
            return res[0], res[1][..., :nq].float()
        if bias is not None:
            bias = _aligned(bias).expand(q.shape[0], q.shape[1], nq, k.shape[2])
        res = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, 0.0, causal, scale=scale)
        return res[0], res[1][..., :nq].float()
    except RuntimeError as exc:  # a kernel's shape/alignment limits: the reference computes the same thing
        if case not in _FALLBACKS:
            _FALLBACKS.add(case)
            warnings.warn(f"kvtier: no fused CUDA attention for {case} ({str(exc).splitlines()[0]}); "
                          "using the reference kernel", stacklevel=3)
        return None


def _aligned(bias: torch.Tensor) -> torch.Tensor:
    """The memory-efficient kernel wants the bias's row stride a multiple of 16 elements: pad, then view
    (before broadcasting over heads, so the bias is never copied per head)."""
    b, h, nq, nk = bias.shape
    padded = torch.empty(b, h, nq, -(-nk // 16) * 16, dtype=bias.dtype, device=bias.device)
    padded[..., :nk] = bias
    return padded[..., :nk]
