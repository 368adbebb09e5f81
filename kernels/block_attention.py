"""Decode attention of N workers over a cache of blocks, each worker with its own view (Hogwild! Inference,
arXiv 2504.06261).

Keys are stored once, rotated at block-local positions 0..len-1. Worker n sees block b with its first key at
some position of its view; `qrel[n, b]` is the query's position relative to that first key. Since RoPE
scores depend only on the distance between query and key, the query is turned once per block, to position
qrel[n, b] (it was rotated at q_pos[n]), instead of turning every key into every view:

    k:  | block 0 ........ | block 1 .... | block 2 ...... |      rows block_start[b] .. + block_len[b]
          0 1 2 ... len-1    0 1 ... len-1  0 1 ...           keys rotated at these local positions
    worker n:  q turned by qrel[n, b] - q_pos[n] for block b; sees key j iff j <= qrel[n, b]
               (and qrel[n, b] - j < window); qrel[n, b] = -1: block b is not in n's view

Each block's partial attention comes with its log-sum-exp, and the partials merge exactly
(`merge_partials`). The Triton kernel does the rotation, the visibility and the merge in one pass: an
online softmax per (worker, KV head) over the visible keys of every block, all query heads of a GQA
group together.
"""

from __future__ import annotations

import torch

from ..rope import Rope
from .fused_attention import fused_attention, fused_available
from .partial_attention import merge_partials, partial_attention


def block_decode_attention_ref(
    q: torch.Tensor,
    q_pos: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_start: torch.Tensor,
    block_len: torch.Tensor,
    qrel: torch.Tensor,
    inv_freq: torch.Tensor,
    interleaved: bool,
    scale: float,
    softcap: float | None = None,
    window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch reference of `block_decode_attention`: one `partial_attention` per block, on the query
    turned by `Rope.shift`, merged by log-sum-exp. Same arguments and results."""
    return _per_block(q, q_pos, k, v, block_start, block_len, qrel, inv_freq, interleaved, scale, softcap, window,
                      fused=False)


def block_decode_attention(
    q: torch.Tensor,
    q_pos: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_start: torch.Tensor,
    block_len: torch.Tensor,
    qrel: torch.Tensor,
    inv_freq: torch.Tensor,
    interleaved: bool,
    scale: float,
    softcap: float | None = None,
    window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [N, Hq, D], worker n's query rotated (RoPE) at position q_pos[n] ([N] long);
    k, v: [Hkv, T, D], every block's keys/values end to end, keys rotated at block-local positions 0..len-1;
    block_start, block_len: [NB] long (block b = rows block_start[b] .. +block_len[b] of k and v);
    qrel: [N, NB] long, the query's position relative to block b's first key in worker n's view
          (-1: block b is not in n's view). Key j of block b is visible to worker n iff j <= qrel[n, b]
          and, with a sliding window, qrel[n, b] - j < window.
    inv_freq: [R/2] float32 (R = rotary dim <= D; channels past R are not rotated), interleaved: pair layout
          (False: rotate-half pairs (i, i+R/2); True: pairs (2i, 2i+1)), as `kvtier.rope.Rope` holds them.
    For block b, worker n's query is turned by (qrel[n, b] - q_pos[n]) positions (a pure rotation: no
    attention scaling), so q.k sees the relative distance of the view.
    GQA: Hq = G * Hkv, query head h reads KV head h // G. `scale` multiplies q.k; `softcap` caps the scaled
    scores with softcap * tanh(s / softcap).
    Returns out [N, Hq, D] float32 and lse [N, Hq] float32 (natural log; -inf and out 0 for a worker that
    sees no key).

    Dispatch: one fused attention call per block (the reference's own math where soft-capping leaves no
    fused kernel)."""
    _check(q, q_pos, k, v, block_start, block_len, qrel, inv_freq, window)
    return _per_block(q, q_pos, k, v, block_start, block_len, qrel, inv_freq, interleaved, scale, softcap, window,
                      fused=fused_available(q, softcap))


def _per_block(q, q_pos, k, v, block_start, block_len, qrel, inv_freq, interleaved, scale, softcap, window,
               fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    n, hq, d = q.shape
    out = torch.zeros(n, hq, d, dtype=torch.float32, device=q.device)
    lse = torch.full((n, hq), float("-inf"), dtype=torch.float32, device=q.device)
    if n == 0:
        return out, lse
    rope = Rope(inv_freq.float(), interleaved=interleaved)
    # Workers become the query rows of one batch-1 call per block: x [1, Hq, N, D], delta [N] per row.
    qrows = q.float().permute(1, 0, 2).unsqueeze(0)  # [1, Hq, N, D]
    qrel, q_pos = qrel.to(q.device), q_pos.to(q.device)
    starts, lens = block_start.tolist(), block_len.tolist()  # block layout: host ints to slice with
    for b, (start, length) in enumerate(zip(starts, lens)):
        rel = qrel[:, b]  # [N]
        if length == 0:
            continue
        qb = rope.shift(qrows, rel - q_pos)  # [1, Hq, N, D] float32: q at position rel[n]
        j = torch.arange(length, device=q.device)
        seen = j[None, :] <= rel[:, None]  # [N, len]
        if window is not None:
            seen &= rel[:, None] - j[None, :] < window
        kb = k[None, :, start:start + length]  # [1, Hkv, len, D]
        vb = v[None, :, start:start + length]
        mask = seen[None, None]  # [1, 1, N, len]
        res = None
        if fused:
            res = fused_attention(qb, kb.float(), vb.float(), scale, mask)
        if res is None:
            res = partial_attention(qb, kb, vb, scale, mask, softcap)
        ob, lb = res[0][0].permute(1, 0, 2), res[1][0].permute(1, 0)  # [N, Hq, D], [N, Hq]
        out, lse = merge_partials(out, lse, ob, lb)
    return out, lse


def _check(q, q_pos, k, v, block_start, block_len, qrel, inv_freq, window) -> None:
    """Shapes only (no device sync): a wrong layout fails here with a message, not deep inside a kernel."""
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"block_decode_attention wants q [N, Hq, D] and k, v [Hkv, T, D] of one shape; got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    n, hq, d = q.shape
    hkv, _, dk = k.shape
    if dk != d or hkv == 0 or hq % hkv:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)}: head_dim must match and Hq be a multiple of Hkv")
    nb = block_start.shape[0]
    if block_start.shape != (nb,) or block_len.shape != (nb,) or qrel.shape != (n, nb) or q_pos.shape != (n,):
        raise ValueError(f"block_start and block_len want [NB], qrel [N, NB], q_pos [N]; got {tuple(block_start.shape)}, "
                         f"{tuple(block_len.shape)}, {tuple(qrel.shape)}, {tuple(q_pos.shape)} for N={n}")
    if inv_freq.dim() != 1 or 2 * inv_freq.shape[0] > d:
        raise ValueError(f"inv_freq wants [R/2] with R <= head_dim {d}; got {tuple(inv_freq.shape)}")
    if window is not None and window < 1:
        raise ValueError(f"window must be None or at least 1; got {window}")

