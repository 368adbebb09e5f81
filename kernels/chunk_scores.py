"""Chunk scoring: an upper bound of q.k over every key of a chunk, from the chunk's per-channel key
min and max (Quest, arXiv 2406.10774; ArkVale). For each channel d, q_d * k_d <= max(q_d*min_d, q_d*max_d),
so the sum over d bounds q.k for all keys in the chunk. Under GQA a KV head is scored with every query
head of its group and keeps the max.
"""

from __future__ import annotations

import torch

from ._triton import HAS_TRITON, use_triton


def chunk_scores_ref(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """q: [B, Hq, D]; kmin, kmax: [B, Hkv, C, D]. Returns [B, Hkv, C] float32."""
    b, hq, d = q.shape
    hkv = kmin.shape[1]
    qg = q.float().view(b, hkv, hq // hkv, d)  # [B, Hkv, G, D]
    pos, neg = qg.clamp(min=0), qg.clamp(max=0)
    # sum_d max(q*min, q*max) = q+ . max + q- . min
    s = torch.matmul(pos, kmax.float().transpose(-1, -2)) + torch.matmul(neg, kmin.float().transpose(-1, -2))
    return s.amax(dim=2)  # [B, Hkv, C]


def chunk_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """Dispatch: the Triton kernel where it may run, else the reference."""
    if kmin.shape[2] and use_triton(q):
        return _chunk_scores_triton(q, kmin, kmax)
    return chunk_scores_ref(q, kmin, kmax)


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _chunk_scores_kernel(
        q_ptr, kmin_ptr, kmax_ptr, out_ptr,
        C, D, G,
        sq_b, sq_h, sk_b, sk_h, sk_c, so_b, so_h,
        HKV: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # one program: one (batch, kv head) and BLOCK_C chunks
        pid_bh = tl.program_id(0)
        pid_c = tl.program_id(1)
        b = pid_bh // HKV
        h = pid_bh % HKV
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        offs_d = tl.arange(0, BLOCK_D)
        cmask = offs_c < C
        dmask = offs_d < D
        kp = b * sk_b + h * sk_h + offs_c[:, None] * sk_c + offs_d[None, :]
        m2 = cmask[:, None] & dmask[None, :]
        kmn = tl.load(kmin_ptr + kp, mask=m2, other=0.0).to(tl.float32)  # [BLOCK_C, BLOCK_D]
        kmx = tl.load(kmax_ptr + kp, mask=m2, other=0.0).to(tl.float32)
        best = tl.full([BLOCK_C], float("-inf"), tl.float32)
        for g in range(G):
            qv = tl.load(q_ptr + b * sq_b + (h * G + g) * sq_h + offs_d, mask=dmask, other=0.0).to(tl.float32)
            s = tl.sum(tl.maximum(qv[None, :] * kmn, qv[None, :] * kmx), axis=1)
            best = tl.maximum(best, s)
        tl.store(out_ptr + b * so_b + h * so_h + offs_c, best, mask=cmask)

    def _chunk_scores_triton(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
        b, hq, d = q.shape
        _, hkv, c, _ = kmin.shape
        q = q.contiguous()
        kmin, kmax = kmin.contiguous(), kmax.contiguous()
        out = torch.empty(b, hkv, c, dtype=torch.float32, device=q.device)
        block_c = 64
        grid = (b * hkv, triton.cdiv(c, block_c))
        _chunk_scores_kernel[grid](
            q, kmin, kmax, out, c, d, hq // hkv,
            q.stride(0), q.stride(1), kmin.stride(0), kmin.stride(1), kmin.stride(2), out.stride(0), out.stride(1),
            HKV=hkv, BLOCK_C=block_c, BLOCK_D=triton.next_power_of_2(d),
        )
        return out
