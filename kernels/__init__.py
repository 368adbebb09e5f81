"""kvtier's compute kernels, shipped as `kvtier.kernels`.

Every kernel has a plain-torch reference beside it; the reference is what runs without Triton or a GPU.
"""

from .partial_attention import merge_partials, partial_attention

__all__ = ["merge_partials", "partial_attention"]
