"""Attention over one slice of the keys, returning the log-sum-exp so slices merge exactly.

For keys split into parts P1..Pn, softmax attention over all of them equals the LSE-weighted mix of
the per-part results (the identity flash-attention and Hogwild! both rely on):

    out = sum_i exp(lse_i - lse) * out_i,   lse = log sum_i exp(lse_i)

A query row that sees no key in a part gets lse = -inf and out = 0, and drops out of the merge.

An attention sink (a learned per-head logit that joins every softmax denominator, as in gpt-oss) is one
more part: a single "key" with logit `sink` and a zero value vector (`merge_sink`).
"""

from __future__ import annotations

import torch


def partial_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    mask: torch.Tensor | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch reference.

    q: [B, Hq, Q, D]; k, v: [B, Hkv, K, D] with Hq a multiple of Hkv (GQA: query head h reads KV head
    h // (Hq // Hkv)); mask: bool, True = may attend, broadcastable to [B, Hkv, Q, K] (per KV head or shared).
    Returns out [B, Hq, Q, D] and lse [B, Hq, Q], both float32.
    """
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    g = hq // hkv
    qf = q.float().reshape(b, hkv, g * nq, d)
    s = torch.matmul(qf, k.float().transpose(-1, -2)) * scale  # [B, Hkv, G*Q, K]
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    s = s.view(b, hkv, g, nq, nk)
    if mask is not None:
        s = s.masked_fill(~mask.unsqueeze(2), float("-inf"))  # mask: [B, Hkv or 1, 1, Q, K]
    lse = torch.logsumexp(s, dim=-1)  # [B, Hkv, G, Q]
    finite = torch.isfinite(lse)
    p = torch.exp(s - torch.where(finite, lse, 0.0).unsqueeze(-1))
    out = torch.matmul(p.view(b, hkv, g * nq, nk), v.float()).view(b, hkv, g, nq, d)
    out = torch.where(finite.unsqueeze(-1), out, 0.0)
    return out.reshape(b, hq, nq, d), lse.reshape(b, hq, nq)


def merge_partials(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two partial attentions over disjoint key sets. out: [..., D], lse: [...] (float32).

    Five kernels, since a Hogwild step or a tiered decode merges at every layer and, on a GPU, each launch
    costs more than its arithmetic: b's weight in the mix is exp(lse_b - lse) (a's is one minus it), and a
    row neither part saw (both -inf, weight NaN) keeps a's out, which is 0."""
    lse = torch.logaddexp(lse_a, lse_b)
    w_b = torch.nan_to_num(torch.exp(lse_b - lse), nan=0.0)
    out = torch.lerp(out_a, out_b.to(out_a.dtype), w_b.unsqueeze(-1))
    return out, lse


def merge_sink(out: torch.Tensor, lse: torch.Tensor, sink: torch.Tensor) -> torch.Tensor:
    """Add a per-head sink logit to the softmax denominator of attention that is already merged.

    The sink is a part with lse = sink and a zero value, so `merge_partials` with it reduces to a rescale:
    out * exp(lse - logaddexp(lse, sink)). A row that saw no key (lse -inf) stays 0.
    out: [B, Hq, Q, D] float32, lse: [B, Hq, Q] float32, sink: [Hq]. Returns out [B, Hq, Q, D] float32.
    """
    s = sink.to(lse.dtype).view(1, -1, 1)  # [1, Hq, 1]
    return out * torch.exp(lse - torch.logaddexp(lse, s)).unsqueeze(-1)
