"""Importance-aware sparse decoding (LeoAM, arXiv 2506.20187): layer-skew profiling, variable-size chunk
planning, per-chunk and per-page key abstracts and selection under a token budget."""

from .abstracts import AbstractTable, PageView
from .plan import decode_granularity, plan_chunks
from .profile import LayerSkew, skew_stats, token_importance
from .select import QuestBound, Recency, Selection, Selector, SharedAcrossHeads, make_selector

__all__ = ["AbstractTable", "LayerSkew", "PageView", "QuestBound", "Recency", "Selection", "Selector",
           "SharedAcrossHeads", "decode_granularity", "make_selector", "plan_chunks", "skew_stats", "token_importance"]
