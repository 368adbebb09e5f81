"""Chunk selection policies: one small class per policy, one method to write (as kvpress's presses).

The base class does the mechanics once: every chunk is scored per (sequence, KV head), chunks holding only
padding are dropped, forced chunks (attention sinks) are always kept, and the best-scoring units are taken
while they fit the token budget. A policy only implements `score`, which rates chunks and pages alike.

`select` takes whole chunks. `select_pages` (what a sparse step uses) takes the best chunks whole while they
fit, then fills what is left of the budget with pages (kvtier.sparse.abstracts) of the chunks ranked next,
ranked by their own, tighter bounds: a needle in a chunk too large for the rest of the budget costs one page
of it, and the work follows the budget, not the context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels import chunk_scores
from .abstracts import PageView

_NEG = float("-inf")
# Pages fill what whole chunks leave of the budget, from the chunks ranked next holding up to this many times
# what is left, in tokens.
CANDIDATES = 4


@dataclass(frozen=True)
class Selection:
    """What one decode step attends to besides the recent window: chunks [B, Hkv, C] (any of their tokens)
    and pages [B, Hkv, P] bool (the tokens themselves)."""

    chunks: torch.Tensor
    pages: torch.Tensor


def take_in_order(sizes: torch.Tensor, usable: torch.Tensor, budget: int | torch.Tensor) -> torch.Tensor:
    """Units in rank order (sizes, usable: [..., N]) -> which are taken: the best while they fit the budget
    (an int, or one per row broadcast against [..., 1]), then, past the first that did not fit, the best of
    the rest that still fit what is left (one large unit does not shut out every smaller one; it matters
    most at tight budgets)."""
    taken = (torch.cumsum(sizes, dim=-1) <= budget) & usable
    left = budget - (sizes * taken).sum(-1, keepdim=True)
    fits = usable & ~taken & (sizes <= left)
    return taken | (fits & (torch.cumsum(sizes * fits, dim=-1) <= left))


class Selector:
    """Base: sinks always kept; top-scoring chunks under a per-(sequence, KV head) token budget."""

    name = "base"

    def score(self, q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        """q: [B, Hq, D]; kmin, kmax: [B, Hkv, C, D] (chunks, or pages gathered per head); starts: [C] or
        [B, Hkv, C]. Returns [B, Hkv, C] (higher: keep first)."""
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
        scores = self._chunk_scores(q, kmin, kmax, starts, forced, has_tokens)
        order = scores.argsort(dim=-1, descending=True)
        usable = torch.gather(scores, -1, order) > _NEG
        taken = take_in_order(lengths[order], usable, budget)
        sel = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, order, taken)
        if forced is not None:
            sel |= forced[None, None, :]
        return sel

    def _chunk_scores(self, q, kmin, kmax, starts, forced, has_tokens) -> torch.Tensor:
        """Chunk scores, -inf where a chunk may not be chosen (forced: taken anyway; padding only)."""
        scores = self.score(q, kmin, kmax, starts).float()
        if has_tokens is not None:
            scores = scores.masked_fill(~has_tokens[:, None, :], _NEG)
        if forced is not None:
            scores = scores.masked_fill(forced[None, None, :], _NEG)
        return scores

    def select_pages(
        self,
        q: torch.Tensor,
        kmin: torch.Tensor,
        kmax: torch.Tensor,
        lengths: torch.Tensor,
        starts: torch.Tensor,
        pages: PageView,
        max_pages: int,
        budget: int,
        forced: torch.Tensor | None = None,
        has_tokens: torch.Tensor | None = None,
    ) -> Selection:
        """The chunks and pages to attend to: the best-ranked chunks whole while they fit the budget (as
        `select`'s first pass), then, for what is left, the best pages of the chunks ranked next (up to
        CANDIDATES x what is left, in tokens), by their own bounds. Whole chunks keep transfers in large
        units; pages let a needle in a chunk too large for the rest of the budget cost one page of it.
        max_pages: most pages of one chunk (the table's)."""
        if max_pages <= 1:  # one page per chunk: pages are the chunks
            sel = self.select(q, kmin, kmax, lengths, starts, budget, forced, has_tokens)
            return Selection(sel, sel[:, :, pages.chunk])
        scores = self._chunk_scores(q, kmin, kmax, starts, forced, has_tokens)
        order = scores.argsort(dim=-1, descending=True, stable=True)  # stable: shared scores rank alike per head
        sizes = lengths[order]
        usable = torch.gather(scores, -1, order) > _NEG
        whole = usable & (sizes.cumsum(-1) <= budget)  # a prefix of the ranking
        left = budget - (sizes * whole).sum(-1, keepdim=True)  # [B, Hkv, 1]
        rest = usable & ~whole
        ahead = (sizes * rest).cumsum(-1) - sizes  # tokens of the rest ranked before each chunk
        cand = rest & (ahead < CANDIDATES * left)  # the chunks ranked right after the whole ones
        pid, page_ok = _candidate_pages(order, cand, int((whole.sum(-1) + cand.sum(-1)).max()), pages)
        pscores = self.score(q, *pages.bounds(pid), pages.starts[pid]).float().masked_fill(~page_ok, _NEG)
        porder = pscores.argsort(dim=-1, descending=True, stable=True)
        taken = take_in_order(pages.lengths[pid].gather(-1, porder), pscores.gather(-1, porder) > _NEG, left)
        chosen = torch.zeros_like(taken).scatter_(-1, porder, taken).long()
        chunk_sel = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, order, whole)
        page_sel = chunk_sel[:, :, pages.chunk].long().scatter_add_(-1, pid, chosen) > 0
        chunk_sel = chunk_sel.long().scatter_add_(-1, pages.chunk[pid], chosen) > 0
        if forced is not None:
            chunk_sel |= forced[None, None, :]
            page_sel |= forced[pages.chunk][None, None, :]
        return Selection(chunk_sel, page_sel)


def _candidate_pages(order: torch.Tensor, cand: torch.Tensor, reach: int,
                     pages: PageView) -> tuple[torch.Tensor, torch.Tensor]:
    """The pages of each (row, KV head)'s candidate chunks (cand, in rank order, all within the first `reach`
    ranks), listed end to end: page rows [B, Hkv, W] and which entries are real [B, Hkv, W] (W: the longest
    list). O(candidate pages), whatever the context."""
    b, h, _ = order.shape
    width_c = max(1, reach)
    rows = order[..., :width_c]
    counts = torch.where(cand[..., :width_c], pages.count[rows], 0).flatten()  # pages per candidate
    per_bh = counts.view(b * h, width_c).sum(-1)
    width = max(1, int(per_bh.max()))
    pid = torch.zeros(b * h, width, dtype=torch.long, device=order.device)
    ok = torch.zeros(b * h, width, dtype=torch.bool, device=order.device)
    total = int(per_bh.sum())
    if total:
        entry = torch.arange(total, device=order.device)
        src = torch.repeat_interleave(torch.arange(counts.numel(), device=order.device), counts, output_size=total)
        within = entry - (counts.cumsum(0) - counts)[src]  # page index inside its chunk
        bh = src // width_c
        col = entry - (per_bh.cumsum(0) - per_bh)[bh]  # place in the (row, head) list
        pid[bh, col] = pages.first[rows.flatten()[src]] + within
        ok[bh, col] = True
    return pid.view(b, h, width), ok.view(b, h, width)


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
        return starts.float().expand(b, hkv, starts.shape[-1])  # starts: [C], or [B, Hkv, C] gathered per head


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
