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

from ..kernels import chunk_scores, native
from ..kernels.ragged import ragged_layout
from .abstracts import PageView

_NEG = float("-inf")
# Pages fill what whole chunks leave of the budget, from the chunks ranked next holding up to this many times
# what is left, in tokens.
CANDIDATES = 4


@dataclass(frozen=True)
class Selection:
    """What one decode step attends to besides the recent window, per (sequence, KV head):

    chunks [B, Hkv, C] bool: the chunks holding any selected token (what must be resident);
    whole [B, Hkv, U]: chunk rows attended whole (sinks included), real where whole_ok;
    parts [B, Hkv, W]: page rows attended from chunks not taken whole, real where parts_ok.

    The lists are what a step reads (their tokens cost O(budget) to find); `pages` is the same choice as a
    mask over every page row."""

    chunks: torch.Tensor
    whole: torch.Tensor
    whole_ok: torch.Tensor
    parts: torch.Tensor
    parts_ok: torch.Tensor
    page_chunk: torch.Tensor  # [P]: each page row's chunk row
    own_units: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # `units()` as made with the lists

    @property
    def pages(self) -> torch.Tensor:
        """[B, Hkv, P] bool: the selected pages (every page of a chunk taken whole)."""
        b, h, c = self.chunks.shape
        whole = torch.zeros(b, h, c + 1, dtype=torch.long, device=self.chunks.device)
        whole.scatter_(-1, torch.where(self.whole_ok, self.whole, c), 1)
        out = whole[..., :c].index_select(-1, self.page_chunk)
        out.scatter_add_(-1, self.parts, self.parts_ok.long())
        return out > 0

    def units(self, chunk_lengths: torch.Tensor, pages: PageView, whole_ok: torch.Tensor | None = None,
              parts_ok: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every entry of the lists as a unit of consecutive tokens: (chunk row, offset in the chunk, tokens),
        each [B, Hkv, U]: the chunks taken whole, then the pages. Tokens are 0 for padding entries and where
        whole_ok / parts_ok (default: the selection's own) say an entry is not to be read."""
        if self.own_units is not None and whole_ok is None and parts_ok is None:
            return self.own_units
        whole_ok = self.whole_ok if whole_ok is None else whole_ok
        parts_ok = self.parts_ok if parts_ok is None else parts_ok
        chunk = torch.cat([self.whole, self.page_chunk.take(self.parts)], dim=-1)
        offset = torch.cat([torch.zeros_like(self.whole), pages.offsets.take(self.parts)], dim=-1)
        size = torch.cat([chunk_lengths.take(self.whole) * whole_ok, pages.lengths.take(self.parts) * parts_ok],
                         dim=-1)
        return chunk, offset, size


def _rows(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, H, N] bool -> the True entries' indices per row, in order, padded: (rows, ok) [B, H, max count]."""
    n = max(1, int(mask.sum(-1).max())) if mask.numel() else 1
    ok, rows = mask.to(torch.uint8).sort(dim=-1, descending=True, stable=True)
    return rows[..., :n], ok[..., :n].bool()


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
    shared = False  # one choice for every KV head of a layer (SharedAcrossHeads)

    def quest_bound(self) -> bool:
        """Whether `score` is QuestBound's and `select_pages` this class's: then the page selection runs as one
        C call on a CPU (float32), where torch's few dozen small ops cost more than the work they do (and, with
        every chunk in the arena, the whole step: `kvtier.read`)."""
        return False

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
        half: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> Selection:
        """The chunks and pages to attend to: the best-ranked chunks whole while they fit the budget (as
        `select`'s first pass), then, for what is left, the best pages of the chunks ranked next (up to
        CANDIDATES x what is left, in tokens), by their own bounds. Whole chunks keep transfers in large
        units; pages let a needle in a chunk too large for the rest of the budget cost one page of it.
        max_pages: most pages of one chunk (the table's); half: the chunk bounds as float16 rounded outward
        (`AbstractTable.half_bounds`), which the C selection reads instead of kmin, kmax."""
        if max_pages > 1 and self.quest_bound():
            lo, hi = half or (kmin, kmax)
            got = native.select_pages(q, lo, hi, lengths, pages.pmin, pages.pmax, pages.lengths, pages.chunk,
                                      pages.offsets, pages.first, pages.count, budget, CANDIDATES, forced,
                                      has_tokens, self.shared)
            if got is not None:
                return Selection(*got[:5], pages.chunk, own_units=got[5:])
        return self.select_pages_torch(q, kmin, kmax, lengths, starts, pages, max_pages, budget, forced, has_tokens)

    def select_pages_torch(self, q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, lengths: torch.Tensor,
                           starts: torch.Tensor, pages: PageView, max_pages: int, budget: int,
                           forced: torch.Tensor | None = None, has_tokens: torch.Tensor | None = None) -> Selection:
        """`select_pages` in torch ops, for any policy and device."""
        if max_pages <= 1:  # one page per chunk: pages are the chunks
            sel = self.select(q, kmin, kmax, lengths, starts, budget, forced, has_tokens)
            whole, whole_ok = _rows(sel)
            none = torch.zeros(*sel.shape[:2], 0, dtype=torch.long, device=sel.device)
            return Selection(sel, whole, whole_ok, none, none.bool(), pages.chunk)
        scores = self._chunk_scores(q, kmin, kmax, starts, forced, has_tokens)
        order, sizes, whole, cand, left = _rank_chunks(scores, lengths, budget)
        pid, page_ok = _candidate_pages(order, cand, pages, max_pages)
        pscores = self.score(q, *pages.bounds(pid), pages.starts.take(pid)).float().masked_fill(~page_ok, _NEG)
        porder = pscores.argsort(dim=-1, descending=True, stable=True)
        taken = take_in_order(pages.lengths.take(pid).gather(-1, porder), pscores.gather(-1, porder) > _NEG, left)
        parts, parts_ok = pid.gather(-1, porder), taken
        hits = torch.zeros_like(scores, dtype=torch.long).scatter_(-1, order, whole.long())
        chunk_sel = hits.scatter_add_(-1, pages.chunk.take(parts), taken.long()) > 0
        whole_rows, whole_ok = order, whole
        if forced is not None and bool(forced.any()):
            chunk_sel |= forced[None, None, :]
            sinks = forced.nonzero().flatten()[None, None, :].expand(*order.shape[:2], -1)
            whole_rows = torch.cat([sinks, order], dim=-1)
            whole_ok = torch.cat([torch.ones_like(sinks, dtype=torch.bool), whole], dim=-1)
        return Selection(chunk_sel, whole_rows, whole_ok, parts, parts_ok, pages.chunk)


def _rank_chunks(scores: torch.Tensor, lengths: torch.Tensor, budget: int):
    """The chunks in rank order as far as page selection looks (the best first; ties in index order), and
    what it makes of them, all [B, Hkv, R]: (order, sizes, whole, cand, left [B, Hkv, 1]). whole: the best
    while they fit the budget (a prefix); cand: the chunks ranked right after, holding up to CANDIDATES x
    what is left (`left`) in tokens. On a CPU only the top R ranks are sorted (R grows until no row reaches
    its end): a full sort of every chunk cost more than all the rest of the selection there."""
    c = scores.shape[-1]
    # On a GPU one sort of every chunk is one kernel, and each check below would wait for the device.
    r = min(c, 64) if scores.device.type == "cpu" else c
    while True:
        if r == c:
            order = scores.argsort(dim=-1, descending=True, stable=True)  # stable: shared scores rank alike
            vals = scores.gather(-1, order)
        else:
            vals, order = scores.topk(r, dim=-1)
            last = vals[..., -1:]  # a score shared across the cut: which of its chunks made the top r is arbitrary
            if bool(((last > _NEG) & ((scores >= last).sum(-1, keepdim=True) > r)).any()):
                r = c
                continue
            tie = (vals[..., 1:] == vals[..., :-1]) & (vals[..., 1:] > _NEG)
            if bool(tie.any()):  # equal scores rank by index, as the stable sort ranks them
                by_index = order.argsort(dim=-1)
                order, vals = order.gather(-1, by_index), vals.gather(-1, by_index)
                again = vals.argsort(dim=-1, descending=True, stable=True)
                order, vals = order.gather(-1, again), vals.gather(-1, again)
        sizes = lengths.take(order)
        usable = vals > _NEG
        whole = usable & (sizes.cumsum(-1) <= budget)  # a prefix of the ranking
        left = budget - (sizes * whole).sum(-1, keepdim=True)  # [B, Hkv, 1]
        rest = usable & ~whole
        ahead = (sizes * rest).cumsum(-1) - sizes  # tokens of the rest ranked before each chunk
        cand = rest & (ahead < CANDIDATES * left)
        if r == c or not bool((whole | cand)[..., -1].any()):  # no row would take a chunk ranked below r
            return order, sizes, whole, cand, left
        r = min(c, 4 * r)


def _candidate_pages(order: torch.Tensor, cand: torch.Tensor, pages: PageView,
                     max_pages: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pages of each (row, KV head)'s candidate chunks (cand, in rank order): page rows [B, Hkv, W] and
    which entries are real [B, Hkv, W]. O(candidate pages), whatever the context: the candidates of every row
    lie in one band of ranks, each laid out as max_pages entries where that is at most twice the pages they
    hold (one gather, no compaction), else listed end to end."""
    b, h, _ = order.shape
    band = cand.any(dim=1).any(dim=0).nonzero().flatten()
    if band.numel() == 0:
        none = torch.zeros(b, h, 1, dtype=torch.long, device=order.device)
        return none, none.bool()
    lo, hi = (int(x) for x in torch.stack([band[0], band[-1]]).tolist())
    rows = order[..., lo:hi + 1]
    in_cand = cand[..., lo:hi + 1]
    counts = torch.where(in_cand, pages.count.take(rows), 0)  # pages per candidate
    if rows.shape[-1] * max_pages <= 2 * max(1, int(counts.sum(-1).max())):
        within = torch.arange(max_pages, device=order.device)
        pid = pages.first.take(rows)[..., None] + within
        ok = within < counts[..., None]
        return torch.where(ok, pid, 0).flatten(2), ok.flatten(2)
    src, within, dest, _, width = ragged_layout(counts.flatten(), b * h)  # within: the page's index in its chunk
    pid = torch.zeros(b * h * width, dtype=torch.long, device=order.device)
    ok = torch.zeros(b * h * width, dtype=torch.bool, device=order.device)
    pid.scatter_(0, dest, pages.first.take(rows.flatten().take(src)) + within)
    ok.scatter_(0, dest, torch.ones_like(dest, dtype=torch.bool))
    return pid.view(b, h, width), ok.view(b, h, width)


class QuestBound(Selector):
    """Score = the min/max upper bound of q.k over the chunk (Quest / ArkVale), max over the GQA group."""

    name = "quest_bound"

    def quest_bound(self) -> bool:
        # a subclass scoring or choosing otherwise takes the torch path
        return type(self).score is QuestBound.score and type(self).select_pages is Selector.select_pages

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

    shared = True

    def __init__(self, inner: Selector):
        self.inner = inner
        self.name = f"{inner.name}+shared"

    def quest_bound(self) -> bool:
        return (type(self).score is SharedAcrossHeads.score and type(self).select_pages is Selector.select_pages
                and self.inner.quest_bound())

    def score(self, q, kmin, kmax, starts):
        s = self.inner.score(q, kmin, kmax, starts)
        return s.amax(dim=1, keepdim=True).expand_as(s)


SELECTORS: dict[str, type[Selector]] = {cls.name: cls for cls in (QuestBound, Recency)}


def make_selector(name: str, shared: bool = False) -> Selector:
    """The selector for a config: the named policy, wrapped to share choices across heads if asked."""
    policy = SELECTORS[name]()
    return SharedAcrossHeads(policy) if shared else policy
