"""Next-layer query guess (InfiniGen, arXiv 2406.19707): name layer j's chunks before layer j runs.

The residual stream changes little from one layer to the next, so layer j's own input norm, query
projection and rotary embedding applied to the hidden state *entering layer i* (the tiered layer before
j) give a query close to the one layer j will compute. Scoring layer j's chunk abstracts with it names
the chunks j will likely select, and their disk reads (and, on CUDA, uploads) start while layer i still
computes. A wrong guess only wastes a prefetch: attention always waits for what it really selects.

`QueryGuesser.from_model` finds what it needs in the model (decoder layers holding `input_layernorm`
and an attention module with `q_proj` or a fused `qkv_proj`, optional `q_norm`); for a model without
them it returns None and prefetch falls back to the previous step's selection.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class _LayerQuery:
    norm: torch.nn.Module  # the decoder layer's input norm
    project: Callable[[torch.Tensor], torch.Tensor]  # normed hidden [B, Q, H] -> [B, Q, Hq * D]
    q_norm: torch.nn.Module | None  # per-head query norm (Qwen3, Gemma3), applied before the rotary
    heads: int
    head_dim: int


def decoder_layers(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """layer index -> decoder layer, for every module holding an attention module with a `layer_idx`."""
    found = {}
    for module in model.modules():
        attn = getattr(module, "self_attn", None)
        idx = getattr(attn, "layer_idx", None)
        if isinstance(idx, int):
            found[idx] = module
    return found


def _layer_query(layer: torch.nn.Module) -> _LayerQuery | None:
    attn, norm = layer.self_attn, getattr(layer, "input_layernorm", None)
    head_dim = getattr(attn, "head_dim", None)
    if norm is None or not isinstance(head_dim, int):
        return None
    if isinstance(getattr(attn, "q_proj", None), torch.nn.Linear):
        proj = attn.q_proj
        heads = proj.out_features // head_dim
        project = proj
    elif isinstance(getattr(attn, "qkv_proj", None), torch.nn.Linear):  # Phi3: [q | k | v] rows
        fused = attn.qkv_proj
        heads = attn.config.num_attention_heads
        rows = heads * head_dim

        def project(x: torch.Tensor, fused=fused, rows=rows) -> torch.Tensor:
            bias = fused.bias[:rows] if fused.bias is not None else None
            return torch.nn.functional.linear(x, fused.weight[:rows], bias)
    else:
        return None
    return _LayerQuery(norm, project, getattr(attn, "q_norm", None), heads, head_dim)


def _rotate(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (rotate-half layout) of q [B, Hq, Q, D] by cos/sin [B, Q, R]; R < D: partial rotary."""
    r = cos.shape[-1]
    cos, sin = cos[:, None].to(q.dtype), sin[:, None].to(q.dtype)
    rot, rest = q[..., :r], q[..., r:]
    half = r // 2
    rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    return torch.cat((rot * cos + rotated * sin, rest), dim=-1)


class QueryGuesser:
    """Layer j's query, guessed from the hidden state entering an earlier layer (see the module doc)."""

    def __init__(self, queries: dict[int, _LayerQuery]):
        self.queries = queries

    @classmethod
    def from_model(cls, model: torch.nn.Module, layer_indices: list[int]) -> "QueryGuesser | None":
        """A guesser for the given layers, or None if the model's layers are not of a known shape."""
        layers = decoder_layers(model)
        queries = {}
        for j in layer_indices:
            q = _layer_query(layers[j]) if j in layers else None
            if q is None:
                return None
            queries[j] = q
        return cls(queries)

    @torch.no_grad()
    def guess(self, layer: int, hidden: torch.Tensor,
              position_embeddings: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """hidden [B, Q, H] (a decoder layer's input); returns layer `layer`'s guessed query [B, Hq, Q, D]."""
        lq = self.queries[layer]
        b, n, _ = hidden.shape
        q = lq.project(lq.norm(hidden)).view(b, n, lq.heads, lq.head_dim)
        if lq.q_norm is not None:
            q = lq.q_norm(q)
        q = q.transpose(1, 2)
        if position_embeddings is not None:
            q = _rotate(q, *position_embeddings)
        return q


class Lookahead:
    """Per cache: when a tiered layer starts a decode step, guess the next tiered layer's chunks and start
    fetching the ones not on the device; when that layer selects, count how many the guess named."""

    def __init__(self, guesser: QueryGuesser, tiers):
        self.guesser = guesser
        self.tiers = tiers
        self.guessed: dict[int, set[int]] = {}  # layer index -> chunk ids of the pending guess

    def layer_starts(self, index: int, hidden: torch.Tensor,
                     position_embeddings: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        from ..read import select_chunks
        from ..store.chunk import Tier

        tiers = self.tiers
        order = [layer.index for layer in tiers.layers]
        if hidden.shape[1] != 1 or index not in order or order.index(index) + 1 >= len(order):
            return  # prefill, a non-tiered layer, or the last tiered layer
        nxt = tiers.layers[order.index(index) + 1]
        if not nxt.chunks or all(c.tier == Tier.DEVICE for c in nxt.chunks):
            return  # nothing to fetch
        q = self.guesser.guess(nxt.index, hidden, position_embeddings)
        sel, _ = select_chunks(nxt, q[:, :, -1].to(nxt.abstracts.view()[0].dtype), None)
        chunks = [nxt.chunks[i] for i in sel.chunks.any(dim=1).any(dim=0).nonzero().flatten().tolist()]
        self.guessed[nxt.index] = {c.chunk_id for c in chunks}
        tiers.counters.lookahead_guesses += 1
        tiers.prefetcher.request([c for c in chunks if c.tier == Tier.DISK], tiers.clock)
        if tiers.device.type == "cuda":
            tiers._upload_ahead(nxt.index, [c for c in chunks if c.tier == Tier.HOST], chunks)

    def score(self, index: int, needed: list) -> None:
        """Layer `index` selected `needed`: count how many of them its pending guess named."""
        guess = self.guessed.pop(index, None)
        if guess is None:
            return
        counters = self.tiers.counters
        counters.lookahead_selected += len(needed)
        counters.lookahead_named += sum(1 for c in needed if c.chunk_id in guess)
