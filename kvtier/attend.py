"""Blocked exact attention over keys with known positions.

Where a fused kernel can express the case (`kvtier.kernels.fused_attention`: no soft-capping, CPU or CUDA),
attention runs there and returns the log-sum-exp the merge needs (on a CPU, a decode step's few query rows a
head over keys they all see take kvtier's C kernel, `native.dense_attention`); otherwise the plain-torch
`partial_attention` runs block by block, never materialising a [Q, K] score matrix larger than one block.
Masks are built from positions: causal (key <= query), sliding window (key > query - W) and a per-row key
validity mask (padding, free slots); a plainly causal diagonal takes the kernel's own causal cut instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .kernels import fused_attention, fused_available, merge_partials, native, partial_attention

_SCORE_ELEMS = 1 << 24  # most fp32 scores one reference block may hold (64 MiB)
_MASK_ELEMS = 1 << 24  # most mask entries one fused call may take
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
    if k.shape[2] == 0:
        return _empty(q, need_lse)
    # Not on CUDA: there F.scaled_dot_product_attention picks cuDNN's kernel, which builds a plan for every
    # new key length, so each decode step paid ~12 ms of CPU per call (measured on an H200 at 32k tokens);
    # `fused_attention` calls the flash kernel directly.
    if not need_lse and softcap is None and key_valid is None and q.device.type != "cuda":
        fast = _sdpa_single(q, k, v, q_pos0, key_pos, scale, causal, window)
        if fast is not None:
            return fast, None
    if fused_available(q, softcap):
        res = _attend_fused(q, k, v, q_pos0, key_pos, scale, key_valid, causal, window)
        if res is not None:
            out, lse = res
            return (out, lse) if need_lse else (out.to(q.dtype), None)
    out, lse = _attend_reference(q, k, v, q_pos0, key_pos, scale, key_valid, causal, window, softcap)
    return (out, lse) if need_lse else (out.to(q.dtype), None)


def _visible_keys(nk: int, key_pos: int, q_lo: int, q_hi: int, causal: bool, window: int | None) -> tuple[int, int]:
    """For contiguous keys starting at `key_pos`, the index range [lo, hi) that queries at positions
    [q_lo, q_hi) can see at all."""
    lo, hi = 0, nk
    if causal:
        hi = max(0, min(nk, q_hi - key_pos))
    if window is not None:
        lo = min(hi, max(0, q_lo - window + 1 - key_pos))
    return lo, hi


def _attend_fused(q, k, v, q_pos0, key_pos, scale, key_valid, causal, window):
    """Fused attention with LSE: (out, lse) float32, or None when the kernel refused (then the reference runs)."""
    nq, nk = q.shape[2], k.shape[2]
    contiguous = isinstance(key_pos, int)
    if contiguous and causal and window is None and key_valid is None and key_pos <= q_pos0 <= key_pos + nk:
        # Keys before the first query are seen by every query; the rest form sdpa's top-left causal diagonal.
        before = q_pos0 - key_pos
        diag = min(nk, before + nq)
        parts = []
        if before:
            parts.append(fused_attention(q, k[:, :, :before], v[:, :, :before], scale))
        if diag > before:
            parts.append(fused_attention(q, k[:, :, before:diag], v[:, :, before:diag], scale, causal=True))
        if any(p is None for p in parts):
            return None
        return parts[0] if len(parts) == 1 else merge_partials(*parts[0], *parts[1])
    pos = torch.arange(key_pos, key_pos + nk, device=k.device) if contiguous else key_pos
    b = q.shape[0]
    needs_mask = causal or window is not None or key_valid is not None
    block_q = nq if not needs_mask else max(1, min(nq, _MASK_ELEMS // max(1, b * nk)))
    outs, lses = [], []
    for q0 in range(0, nq, block_q):
        q1 = min(nq, q0 + block_q)
        lo, hi = (_visible_keys(nk, key_pos, q_pos0 + q0, q_pos0 + q1, causal, window) if contiguous
                  else (0, nk))
        if hi <= lo:
            out, lse = _empty(q[:, :, q0:q1], True)
        else:
            mask = None
            if needs_mask:
                qpos = torch.arange(q_pos0 + q0, q_pos0 + q1, device=k.device)
                mask = _block_mask(pos[lo:hi], qpos, key_valid, lo, hi, causal, window)
                if bool(mask.all()):
                    mask = None
            res = fused_attention(q[:, :, q0:q1], k[:, :, lo:hi], v[:, :, lo:hi], scale, mask)
            if res is None:
                return None
            out, lse = res
        outs.append(out)
        lses.append(lse)
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    lse = lses[0] if len(lses) == 1 else torch.cat(lses, dim=2)
    return out, lse


def _attend_reference(q, k, v, q_pos0, key_pos, scale, key_valid, causal, window, softcap):
    """The plain-torch path, block by block: (out, lse) float32."""
    b, hq, nq, _ = q.shape
    nk = k.shape[2]
    contiguous = isinstance(key_pos, int)
    pos = torch.arange(key_pos, key_pos + nk, device=k.device) if contiguous else key_pos
    block_q = min(nq, _BLOCK_Q)
    block_k = max(256, _SCORE_ELEMS // max(1, b * hq * block_q))
    outs, lses = [], []
    for q0 in range(0, nq, block_q):
        q1 = min(nq, q0 + block_q)
        qpos = torch.arange(q_pos0 + q0, q_pos0 + q1, device=k.device)
        lo, hi = _visible_keys(nk, key_pos, q_pos0 + q0, q_pos0 + q1, causal, window) if contiguous else (0, nk)
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
    return out, lse


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
    if not is_causal:  # few rows on a CPU: kvtier's C kernel reads each key once for all of a head's rows
        res = native.dense_attention(q, k, v, scale)
        if res is not None:
            return res[0]
    b, hq, _, d = q.shape
    hkv = k.shape[1]
    if hq == hkv:
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale)
    if not is_causal:  # every query row of a group sees the same keys: fold the group into the query rows
        out = F.scaled_dot_product_attention(q.reshape(b, hkv, -1, d), k, v, scale=scale)
        return out.reshape(b, hq, nq, d)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)


def _empty(q: torch.Tensor, need_lse: bool):
    b, hq, nq, d = q.shape
    out = torch.zeros(b, hq, nq, d, dtype=torch.float32 if need_lse else q.dtype, device=q.device)
    lse = torch.full((b, hq, nq), float("-inf"), device=q.device) if need_lse else None
    return out, lse
