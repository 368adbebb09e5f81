"""Gathered decode attention: each (sequence, KV head) attends to its own list of cache slots.

The selector picks different chunks per KV head; instead of materialising each head's keys, the
kernel reads them through an index list (`idx[b, h, :counts[b, h]]` are slots of the device arena).
It returns the output and the log-sum-exp, so the result merges with other partial attentions
(`merge_partials`), e.g. chunks that were staged from the host instead of living in the arena.
"""

from __future__ import annotations

import numpy as np
import torch

from . import native
from .native import arena_rows
from ._triton import HAS_TRITON, use_triton
from .fused_attention import fused_attention, fused_available
from .partial_attention import partial_attention
from .ragged import ragged_layout_np


def sparse_decode_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    idx: torch.Tensor,
    counts: torch.Tensor,
    scale: float,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [B, Hq, D]; k, v: [B, Hkv, S, D] (the arena); idx: [B, Hkv, N] slot indices, valid below
    counts [B, Hkv].
    Returns out [B, Hq, D] and lse [B, Hq], float32 (lse -inf and out 0 where a head attends to nothing)."""
    ks, vs, mask = _gather(k, v, idx, counts)
    out, lse = partial_attention(q.unsqueeze(2), ks, vs, scale, mask, softcap)
    return out.squeeze(2), lse.squeeze(2)


def _rows_of(k, v):
    """`arena_rows`, through contiguous copies where the layout has no rows view."""
    rows = arena_rows(k, v)
    return rows if rows is not None else arena_rows(k.contiguous(), v.contiguous())


def _gather(k, v, idx, counts):
    """Each (sequence, KV head)'s listed slots as dense rows: ks, vs [B, Hkv, N, D] and mask [B, Hkv, 1, N]."""
    b, hkv, n = idx.shape
    d = k.shape[3]
    # Row gather on the arena's rows: whole head_dim rows are copied at once (much faster than gather).
    krows, vrows, plane = _rows_of(k, v)
    base = (torch.arange(b * hkv, device=idx.device) * plane).view(b, hkv, 1)
    flat = (idx.clamp(min=0) + base).reshape(-1)
    ks = krows.index_select(0, flat).view(b, hkv, n, d)  # [B, Hkv, N, D]
    vs = vrows.index_select(0, flat).view(b, hkv, n, d)
    mask = (torch.arange(n, device=idx.device)[None, None, :] < counts[..., None]).unsqueeze(2)  # [B, Hkv, 1, N]
    return ks, vs, mask


def sparse_decode_attention(q, k, v, idx, counts, scale, softcap=None):
    """Dispatch: the Triton kernel where it may run; else the listed rows gathered and attended by torch's
    fused kernel (the reference's own math where soft-capping leaves no fused kernel)."""
    if idx.shape[-1] and use_triton(q):
        return _sparse_decode_triton(q, k, v, idx, counts, scale, softcap)
    if fused_available(q, softcap):
        ks, vs, mask = _gather(k, v, idx, counts)
        res = fused_attention(q.unsqueeze(2), ks, vs, scale, None if bool(mask.all()) else mask)
        if res is not None:
            return res[0].squeeze(2), res[1].squeeze(2)
    return sparse_decode_attention_ref(q, k, v, idx, counts, scale, softcap)


WINDOW = 16  # slots per row copy of `run_decode_attention`


def runs_read_in_place(k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether `run_decode_attention` reads runs of this arena (k, v) in place (the C kernel: float32 on a CPU),
    so that a run of one slot costs no more than its share of a long one; else runs are copied as windows."""
    return native.takes(k, v)


def run_decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    start: torch.Tensor,
    length: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Decode attention where each (sequence, KV head) reads runs of consecutive arena slots.

    q: [B, Hq, D]; k, v: [B, Hkv, S, D], the arena (`arena_rows`); start, length: [B, Hkv, U], the runs (length
    0: none). The C kernel (`native.run_attention`, float32) reads the runs in place. Without it, runs are
    read as WINDOW-slot windows, one row copy per window instead of one per slot, into dense rows for the
    fused kernel, the slots past a run's end masked: on a CPU the copy and the slot lists cost more than the
    attention itself. Returns out [B, Hq, D] and lse [B, Hq] (float32), or None where this path does not
    apply (not a CPU, no fused kernel; without the C kernel, an arena under WINDOW slots): then list the
    slots for `sparse_decode_attention`."""
    b, hkv, s, d = k.shape
    rows = arena_rows(k, v) if q.device.type == "cpu" and fused_available(q, None) else None
    if rows is None:
        return None
    krows, vrows, plane = rows
    units = start.shape[-1]
    if runs_read_in_place(k, v):  # the C kernel reads the runs in place: no copy at all
        run_rows = torch.arange(b * hkv)[:, None] * plane + start.reshape(b * hkv, units)
        res = native.run_attention(q.reshape(b * hkv, -1, d).contiguous(), krows, vrows, run_rows,
                                   length.reshape(b * hkv, units), scale)
        if res is not None:
            return res[0].view(b, -1, d), res[1].view(b, -1)
    length_np = length.reshape(-1).numpy()
    # The index arithmetic runs in numpy: a few thousand windows, where torch's per-call cost is what adds up.
    wins = (length_np + WINDOW - 1) // WINDOW  # windows per run
    run, j, dest, _, width = ragged_layout_np(wins, b * hkv)  # j: the window's index inside its run
    if run.size == 0:
        return None
    bh = run // units
    row = bh * plane + start.reshape(-1).numpy()[run] + j * WINDOW  # first row of the window in the arena's rows
    rows_total = krows.shape[0]
    if rows_total < WINDOW or int(row.min()) < 0:
        return None
    # A window running past the arena's last row starts earlier instead: its run's slots sit further in.
    shift = np.maximum(row - (rows_total - WINDOW), 0)
    first = np.zeros(b * hkv * width, dtype=np.int64)
    lo = np.zeros(b * hkv * width, dtype=np.int64)
    hi = np.zeros(b * hkv * width, dtype=np.int64)
    first[dest] = row - shift
    lo[dest] = shift
    hi[dest] = shift + np.minimum(length_np[run] - j * WINDOW, WINDOW)
    at = np.arange(WINDOW)
    mask = torch.from_numpy((at >= lo[:, None]) & (at < hi[:, None])).view(b, hkv, 1, width * WINDOW)
    first_t = torch.from_numpy(first)
    windows = (rows_total - WINDOW + 1, WINDOW * d)
    ks = krows.as_strided(windows, (d, 1)).index_select(0, first_t).view(b, hkv, width * WINDOW, d)
    vs = vrows.as_strided(windows, (d, 1)).index_select(0, first_t).view(b, hkv, width * WINDOW, d)
    res = fused_attention(q.unsqueeze(2), ks, vs, scale, mask)
    return None if res is None else (res[0].squeeze(2), res[1].squeeze(2))


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _sparse_decode_kernel(
        q_ptr, k_ptr, v_ptr, idx_ptr, cnt_ptr, out_ptr, lse_ptr,
        scale, softcap, D, N,
        sq_b, sq_h, sk_b, sk_h, sk_s, si_b, si_h, so_b, so_h, sl_b,
        HKV: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, SOFTCAP: tl.constexpr,
    ):
        # one program: one (batch, kv head) and all G query heads of its group; online softmax over slots
        pid = tl.program_id(0)
        b = pid // HKV
        h = pid % HKV
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        gmask = offs_g < G
        dmask = offs_d < D
        q = tl.load(q_ptr + b * sq_b + (h * G + offs_g)[:, None] * sq_h + offs_d[None, :],
                    mask=gmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)  # [G, D]
        count = tl.load(cnt_ptr + b * HKV + h)
        m = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        for start in range(0, N, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            nmask = offs_n < count
            slot = tl.load(idx_ptr + b * si_b + h * si_h + offs_n, mask=nmask, other=0)
            kp = b * sk_b + h * sk_h + slot[:, None] * sk_s + offs_d[None, :]
            kv_mask = nmask[:, None] & dmask[None, :]
            kb = tl.load(k_ptr + kp, mask=kv_mask, other=0.0).to(tl.float32)  # [N, D]
            vb = tl.load(v_ptr + kp, mask=kv_mask, other=0.0).to(tl.float32)
            s = tl.sum(q[:, None, :] * kb[None, :, :], axis=2) * scale  # [G, N]
            if SOFTCAP:
                s = softcap * (2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0)  # softcap * tanh(s / softcap)
            s = tl.where(nmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m - m_safe)
            l = l * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * vb[None, :, :], axis=1)
            m = m_new
        empty = l == 0.0
        out = acc / tl.where(empty, 1.0, l)[:, None]
        lse = tl.where(empty, float("-inf"), m + tl.log(tl.where(empty, 1.0, l)))
        tl.store(out_ptr + b * so_b + (h * G + offs_g)[:, None] * so_h + offs_d[None, :], out,
                 mask=gmask[:, None] & dmask[None, :])
        tl.store(lse_ptr + b * sl_b + h * G + offs_g, lse, mask=gmask)

    def _sparse_decode_triton(q, k, v, idx, counts, scale, softcap):
        b, hq, d = q.shape
        hkv = k.shape[1]
        g = hq // hkv
        q = q.contiguous()
        idx = idx.contiguous()
        counts = counts.to(torch.int32).contiguous()
        out = torch.empty(b, hq, d, dtype=torch.float32, device=q.device)
        lse = torch.empty(b, hq, dtype=torch.float32, device=q.device)
        if k.stride(3) != 1 or v.stride() != k.stride():
            raise ValueError("sparse_decode_attention needs k and v with the same layout, last dim contiguous")
        _sparse_decode_kernel[(b * hkv,)](
            q, k, v, idx, counts, out, lse,
            float(scale), float(softcap or 1.0), d, idx.shape[-1],
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), idx.stride(0), idx.stride(1),
            out.stride(0), out.stride(1), lse.stride(0),
            HKV=hkv, G=g, BLOCK_G=max(triton.next_power_of_2(g), 1), BLOCK_N=32,
            BLOCK_D=triton.next_power_of_2(d), SOFTCAP=softcap is not None,
        )
        return out, lse
