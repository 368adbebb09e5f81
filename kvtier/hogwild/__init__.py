"""Parallel workers over one shared cache (Hogwild! Inference, arXiv 2504.06261).

`HogwildCache` holds the shared history (prompt and finished steps), two headers and one current step per
worker; every worker attends to its own ordered view of them in one batched forward pass, with keys stored
once at block-local positions and each query turned per block instead.
"""

from .cache import HogwildCache
from .history import History
from .layer import HogwildLayer
from .layout import Layout, Target

__all__ = ["History", "HogwildCache", "HogwildLayer", "Layout", "Target"]
