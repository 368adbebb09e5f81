"""kvtier's compute kernels, shipped as `kvtier.kernels`.

Every kernel has a plain-torch reference beside it; the reference is what runs without Triton or a GPU.
"""

from .block_attention import HeldKeys, block_decode_attention, block_decode_attention_ref
from .chunk_scores import chunk_scores, chunk_scores_ref
from .fused_attention import fused_attention, fused_available
from .native import arena_rows
from .partial_attention import merge_partials, merge_sink, partial_attention
from .sparse_attention import run_decode_attention, sparse_decode_attention, sparse_decode_attention_ref

__all__ = [
    "HeldKeys",
    "arena_rows",
    "block_decode_attention",
    "block_decode_attention_ref",
    "chunk_scores",
    "chunk_scores_ref",
    "fused_attention",
    "fused_available",
    "merge_partials",
    "merge_sink",
    "partial_attention",
    "run_decode_attention",
    "sparse_decode_attention",
    "sparse_decode_attention_ref",
]
