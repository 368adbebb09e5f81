"""Whether a Triton kernel may run: Triton importable, and either a CUDA tensor or the CPU interpreter."""

from __future__ import annotations

import importlib.util
import os

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """Triton for CUDA tensors; on CPU only under TRITON_INTERPRET=1 (tests). KVTIER_NO_TRITON=1 opts out."""
    if not HAS_TRITON or os.environ.get("KVTIER_NO_TRITON") == "1":
        return False
    return t.is_cuda or (INTERPRET and t.device.type == "cpu")
