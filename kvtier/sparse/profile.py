"""Layer-skew profiling at prefill: how concentrated is attention, per layer and KV head?

Attention in LLMs is skewed, with long runs of near-zero weight ("attention deserts"), and how skewed
differs by layer (LeoAM, arXiv 2506.20187). kvtier measures it from an observation window of the
prompt's last queries, blockwise over the keys (never a full [Q, K] matrix): first the log-sum-exp of
each query, then each key's attention probability, averaged over the window and the query heads of
its KV group.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

_BLOCK_K = 4096


def _scores(q: torch.Tensor, k: torch.Tensor, scale: float, softcap: float | None) -> torch.Tensor:
    """q: [B, Hkv, G, W, D], k: [B, Hkv, n, D] -> [B, Hkv, G, W, n] float32."""
    s = torch.einsum("bhgwd,bhnd->bhgwn", q, k.float()) * scale
    return torch.tanh(s / softcap) * softcap if softcap is not None else s


@torch.no_grad()
def token_importance(
    q_obs: torch.Tensor,
    k: torch.Tensor,
    q_pos0: int,
    k_pos0: int,
    scale: float,
    softcap: float | None = None,
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean attention probability each key receives from the observation queries.

    q_obs: [B, Hq, W, D] at positions q_pos0..q_pos0+W-1; k: [B, Hkv, n, D] at k_pos0..;
    key_valid: [B, n] (False: padding). Causal: a query sees keys at positions <= its own.
    Returns [B, Hkv, n] float32; each (row, head) sums to about 1 over the keys the window sees.
    """
    b, hq, w, d = q_obs.shape
    hkv, n = k.shape[1], k.shape[2]
    q = q_obs.float().view(b, hkv, hq // hkv, w, d)
    qpos = torch.arange(q_pos0, q_pos0 + w, device=k.device)

    def block_mask(k0: int, k1: int) -> torch.Tensor:
        kpos = torch.arange(k_pos0 + k0, k_pos0 + k1, device=k.device)
        m = (kpos[None, :] <= qpos[:, None])[None, None, None]  # [1, 1, 1, W, nb]
        if key_valid is not None:
            m = m & key_valid[:, None, None, None, k0:k1]
        return m

    lse = torch.full((b, hkv, hq // hkv, w), float("-inf"), device=k.device)
    for k0 in range(0, n, _BLOCK_K):
        k1 = min(n, k0 + _BLOCK_K)
        s = _scores(q, k[:, :, k0:k1], scale, softcap).masked_fill(~block_mask(k0, k1), float("-inf"))
        lse = torch.logaddexp(lse, torch.logsumexp(s, dim=-1))
    lse = torch.where(torch.isfinite(lse), lse, 0.0)
    imp = torch.empty(b, hkv, n, device=k.device)
    for k0 in range(0, n, _BLOCK_K):
        k1 = min(n, k0 + _BLOCK_K)
        s = _scores(q, k[:, :, k0:k1], scale, softcap).masked_fill(~block_mask(k0, k1), float("-inf"))
        imp[:, :, k0:k1] = torch.exp(s - lse[..., None]).mean(dim=(2, 3))
    return imp


@dataclass
class LayerSkew:
    """Concentration of one layer's attention (means over batch rows and KV heads, plus per-head lists).

    top1/top5/top10: share of the attention mass held by the top 1/5/10% of tokens (uniform: 0.01/0.05/0.1).
    desert: share of tokens that each get less than a tenth of the uniform weight 1/n.
    """

    tokens: int
    top1: float
    top5: float
    top10: float
    desert: float
    top5_per_head: list[float]
    desert_per_head: list[float]

    def to_dict(self) -> dict:
        return asdict(self)


def skew_stats(importance: torch.Tensor) -> LayerSkew:
    """importance: [B, Hkv, n] (from token_importance)."""
    b, h, n = importance.shape
    p = importance / importance.sum(-1, keepdim=True).clamp(min=1e-30)
    sorted_p = p.sort(dim=-1, descending=True).values.cumsum(-1)

    def top(frac: float) -> torch.Tensor:
        return sorted_p[..., max(1, round(frac * n)) - 1]  # [B, H]

    desert = (p < 0.1 / n).float().mean(-1)  # [B, H]
    t5 = top(0.05).mean(0)
    return LayerSkew(
        tokens=n,
        top1=round(float(top(0.01).mean()), 4),
        top5=round(float(t5.mean()), 4),
        top10=round(float(top(0.10).mean()), 4),
        desert=round(float(desert.mean()), 4),
        top5_per_head=[round(float(x), 4) for x in t5],
        desert_per_head=[round(float(x), 4) for x in desert.mean(0)],
    )
