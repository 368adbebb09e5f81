"""Blocked exact attention over keys with known positions, built on `kvtier.kernels.partial_attention`.

Never materialises a [Q, K] score matrix larger than one block, so a long prompt costs O(block) memory.
Masks are built per block from positions: causal (key <= query), sliding window (key > query - W) and a
per-row key validity mask (padding, free slots).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .kernels import merge_partials, partial_attention

_SCORE_ELEMS = 1 << 24  # most fp32 scores one block may hold (64 MiB)
_BLOCK_Q = 512


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    q_pos0: int,
    key_pos: torch.Tensor | int,
    scale: float,
    key_valid: torch.Tensor | None = None,
    causal: bool = True,
    window: int | None = None,
    softcap: float | None = None,
    need_lse: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of q over (k, v).

    q: [B, Hq, Q, D] at positions q_pos0 .. q_pos0+Q-1; k, v: [B, Hkv, K, D];
    key_pos: [K] positions of the keys, or an int (contiguous keys starting there);
    key_valid: [B, K] bool, False for padding or empty slots.
    Returns out [B, Hq, Q, D] (float32 if need_lse, else q.dtype) and lse [B, Hq, Q] (float32) or None.
    """
    b, hq, nq, _ = q.shape
    nk = k.shape[2]
    contiguous = isinstance(key_pos, int)
    if nk == 0:
        return _empty(q, need_lse)
    if not need_lse and softcap is None and key_valid is None:
        fast = _sdpa_single(q, k, v, q_pos0, key_pos, scale, causal, window)
        if fast is not None:
            return fast, None
    pos = torch.arange(key_pos, key_pos + nk, device=k.device) if contiguous else key_pos
    block_q = min(nq, _BLOCK_Q)
    block_k = max(256, _SCORE_ELEMS // max(1, b * hq * block_q))
    outs, lses = [], []
    for q0 in range(0, nq, block_q):
        q1 = min(nq, q0 + block_q)
        qpos = torch.arange(q_pos0 + q0, q_pos0 + q1, device=k.device)
        lo, hi = 0, nk
        if contiguous:  # skip key blocks no query of this block can see
            if causal:
                hi = max(0, min(nk, q_pos0 + q1 - key_pos))
            if window is not None:
                lo = min(hi, max(0, q_pos0 + q0 - window + 1 - key_pos))
        out = lse = None
        for k0 in range(lo, hi, block_k):
            k1 = min(hi, k0 + block_k)
            mask = _block_mask(pos[k0:k1], qpos, key_valid, k0, k1, causal, window)
            o, l = partial_attention(q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1], scale, mask, softcap)
            out, lse = (o, l) if out is None else merge_partials(out, lse, o, l)
        if out is None:
            out, lse = _empty(q[:, :, q0:q1], True)
        outs.append(out)
        lses.append(lse)
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    lse = lses[0] if len(lses) == 1 else torch.cat(lses, dim=2)
    return (out, lse) if need_lse else (out.to(q.dtype), None)


def _block_mask(
    kpos: torch.Tensor,
    qpos: torch.Tensor,
    key_valid: torch.Tensor | None,
    k0: int,
    k1: int,
    causal: bool,
    window: int | None,
) -> torch.Tensor | None:
    mask = None
    if causal or window is not None:
        rel = kpos[None, :] - qpos[:, None]  # [Q, K]: key position - query position
        m = torch.ones_like(rel, dtype=torch.bool)
        if causal:
            m &= rel <= 0
        if window is not None:
            m &= rel > -window
        mask = m[None, None]  # [1, 1, Q, K]
    if key_valid is not None:
        kv = key_valid[:, None, None, k0:k1]  # [B, 1, 1, K]
        mask = kv if mask is None else mask & kv
    return mask


def _sdpa_single(q, k, v, q_pos0, key_pos, scale, causal, window) -> torch.Tensor | None:
    """torch's fused attention, when the mask is empty or plainly causal (no LSE, no padding)."""
    nq, nk = q.shape[2], k.shape[2]
    contiguous = isinstance(key_pos, int)
    if window is not None and not (contiguous and key_pos >= q_pos0 + nq - window):
        return None  # the window may hide some keys
    is_causal = False
    if causal:
        if not contiguous:
            return None
        if key_pos + nk - 1 <= q_pos0:
            pass  # every key precedes every query
        elif key_pos == q_pos0 and nk == nq:
            is_causal = True  # sdpa's top-left aligned causal mask is exactly ours
        else:
            return None
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale, enable_gqa=gqa)


def _empty(q: torch.Tensor, need_lse: bool):
    b, hq, nq, d = q.shape
    out = torch.zeros(b, hq, nq, d, dtype=torch.float32 if need_lse else q.dtype, device=q.device)
    lse = torch.full((b, hq, nq), float("-inf"), device=q.device) if need_lse else None
    return out, lse
