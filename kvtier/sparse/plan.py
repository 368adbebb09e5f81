"""Variable-size chunk planning from attention skew.

Cut a run of tokens so every chunk holds about the same attention mass, within [min_size, max_size]:
attention deserts merge into large chunks, important regions split into small ones, and a layer whose
attention is flat gets chunks of about `base` tokens. (The LeoAM idea, arXiv 2506.20187, made concrete
as mass-balanced segmentation.)
"""

from __future__ import annotations

import numpy as np
import torch


def plan_chunks(importance: torch.Tensor | None, n: int, base: int, min_size: int, max_size: int) -> list[int]:
    """Chunk lengths for a run of n tokens.

    importance: [n] non-negative weights. Target mass per chunk is base / n of the total, so flat
    attention yields `base`-token chunks. None: fixed chunks of `base`. Either way the plan covers all n
    tokens; its last chunk may be shorter.
    """
    fixed = [base] * (n // base) + ([n % base] if n % base else [])
    if importance is None:
        return fixed
    imp = importance.detach().float().cpu().numpy()[:n].astype(np.float64)
    total = imp.sum()
    if total <= 0 or n == 0:
        return fixed
    target = total * base / n
    desert = 0.1 * total / n  # a token getting under a tenth of the uniform share is in a desert
    sizes, length, mass = [], 0, 0.0
    for x in imp:
        # Close the chunk before this token if it is full, if the token would push it past its share of
        # mass, or if it is a desert chunk and the token is not: deserts end where important regions begin.
        in_desert = mass < desert * length
        if length >= max_size or (length >= min_size and (mass + x > target * (1 + 1e-9)
                                                          or (in_desert and x >= desert))):
            sizes.append(length)
            length, mass = 0, 0.0
        length += 1
        mass += x
    if length:
        sizes.append(length)
    return sizes


def decode_granularity(sizes: list[int], min_size: int, base: int) -> int:
    """Chunk size for tokens produced while decoding: the layer's median planned size, within [min, base]."""
    if not sizes:
        return base
    return int(min(base, max(min_size, int(np.median(sizes)))))
