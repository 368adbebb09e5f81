"""Parallel workers over one shared cache (Hogwild! Inference, arXiv 2504.06261).

`HogwildCache` holds the shared history (prompt and finished steps), two headers and one current step per
worker; every worker attends to its own ordered view of them in one batched forward pass, with keys stored
once at block-local positions and each query turned per block instead. `generate` runs N workers on one problem
over it: the collaboration prompt (`CollaborationTemplate`), step boundaries, check-ins, the budget finisher.
"""

from .cache import HogwildCache
from .history import History
from .layer import HogwildLayer
from .layout import Layout, Target
from .prompts import CollaborationTemplate, step_ends
from .runtime import HogwildResult, HogwildStats, Step, generate

__all__ = ["CollaborationTemplate", "History", "HogwildCache", "HogwildLayer", "HogwildResult", "HogwildStats",
           "Layout", "Step", "Target", "generate", "step_ends"]
