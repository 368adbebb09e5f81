"""Chunk selection policies: one small class per policy, one method to write (as kvpress's presses).

The base class does the mechanics once: every chunk is scored per (sequence, KV head), chunks holding only
padding are dropped, forced chunks (attention sinks) are always kept, and the best-scoring chunks are
taken while they fit the token budget. A policy only implements `score`.
"""

from __future__ import annotations

import torch

from ..kernels import chunk_scores


class Selector:
    """Base: sinks always kept; top-scoring chunks under a per-(sequence, KV head) token budget."""

    name = "base"

    def score(self, q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        """q: [B, Hq, D]; kmin, kmax: [B, Hkv, C, D]; starts: [C]. Returns [B, Hkv, C] (higher: keep first)."""
        raise NotImplementedError

    def select(
        self,
        q: torch.Tensor,
        kmin: torch.Tensor,
        kmax: torch.Tensor,
        lengths: torch.Tensor,
        starts: torch.Tensor,
        budget: int,
        forced: torch.Tensor | None = None,
        has_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Boolean [B, Hkv, C]: chunks to attend to.

        budget: tokens per (sequence, KV head) for the non-forced chunks; forced: [C] bool (sinks);
        has_tokens: [B, C] bool, False for chunks that hold only padding in that row.
        """
        scores = self.score(q, kmin, kmax, starts).float()
        if has_tokens is not None:
            scores = scores.masked_fill(~has_tokens[:, None, :], float("-inf"))
        if forced is not None:
            scores = scores.masked_fill(forced[None, None, :], float("-inf"))
        order = scores.argsort(dim=-1, descending=True)
        sizes = lengths[order]
        usable = torch.gather(scores, -1, order) > float("-inf")
        taken = (torch.cumsum(sizes, dim=-1) <= budget) & usable
        # A chunk larger than what is left would block every smaller one after it: a second pass fills the
        # rest of the budget with the best chunks that still fit (it matters most at tight budgets).
        left = budget - (sizes * taken).sum(-1, keepdim=True)
        fits = usable & ~taken & (sizes <= left)
        taken |= fits & (torch.cumsum(sizes * fits, dim=-1) <= left)
        sel = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, order, taken)
        if forced is not None:
            sel |= forced[None, None, :]
        return sel


class QuestBound(Selector):
    """Score = the min/max upper bound of q.k over the chunk (Quest / ArkVale), max over the GQA group."""

    name = "quest_bound"

    def score(self, q, kmin, kmax, starts):
        return chunk_scores(q, kmin, kmax)


class Recency(Selector):
    """Score = position: keeps the newest chunks. With sinks this is StreamingLLM (arXiv 2309.17453)."""

    name = "recency"

    def score(self, q, kmin, kmax, starts):
        b, hkv = kmin.shape[0], kmin.shape[1]
        return starts.float()[None, None, :].expand(b, hkv, -1)


class SharedAcrossHeads(Selector):
    """Wraps a policy so every KV head of a layer keeps the same chunks (scored by the best head).

    Per-head selection (the default) attends to `budget` tokens per head but may need to load the union
    of all heads' choices; shared selection loads at most `budget` tokens per layer and step, which is
    what bounds the transfers when most chunks live on the host or disk."""

    def __init__(self, inner: Selector):
        self.inner = inner
        self.name = f"{inner.name}+shared"

    def score(self, q, kmin, kmax, starts):
        s = self.inner.score(q, kmin, kmax, starts)
        return s.amax(dim=1, keepdim=True).expand_as(s)


SELECTORS: dict[str, type[Selector]] = {cls.name: cls for cls in (QuestBound, Recency)}


def make_selector(name: str, shared: bool = False) -> Selector:
    """The selector for a config: the named policy, wrapped to share choices across heads if asked."""
    policy = SELECTORS[name]()
    return SharedAcrossHeads(policy) if shared else policy
