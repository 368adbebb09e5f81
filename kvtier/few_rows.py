"""A model's linear layers through kvtier's C kernel while a forward pass over a few rows runs on the CPU.

A batched decode step multiplies a few rows (Hogwild: one a worker) by every weight, so its linear layers take
the time to read the weights once. torch's CPU GEMM reads them at ~60% of its one-row speed for 2-8 rows;
`native.linear_rows` streams them once for all rows (see kernels/linear_rows.c). `FewRowLinears(model)` routes
the model's plain `nn.Linear` layers through it inside a `with` block only: the model is as it was outside
the block, and any call the kernel does not take (more rows, another dtype or device, gradients) goes to
`F.linear` as before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import brief
from .kernels import native


def few_rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, by the C kernel where it takes the call."""
    out = native.linear_rows(x, weight, bias)
    return F.linear(x, weight, bias) if out is None else out


class _Routed:
    """A layer's forward while routed: a plain callable stored on the instance, found before the class's."""

    __slots__ = ("layer",)

    def __init__(self, layer: torch.nn.Linear):
        self.layer = layer

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return few_rows_linear(x, self.layer.weight, self.layer.bias)


class FewRowLinears:
    """Inside `with FewRowLinears(model):`, the model's `nn.Linear` layers (that class exactly: subclasses such as
    quantised layers compute otherwise) with float32 CPU weights run inputs of 2-8 rows through the C kernel.
    Nothing is routed where the C library is not built. Re-entrant use is refused (the outer block owns it)."""

    def __init__(self, model: torch.nn.Module):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"FewRowLinears takes a torch.nn.Module, got {brief(model)}")
        built = native.library() is not None
        self._layers = [m for m in model.modules() if type(m) is torch.nn.Linear] if built else []
        self._routed: list[torch.nn.Linear] = []

    def __enter__(self) -> FewRowLinears:
        if self._routed:
            raise RuntimeError("FewRowLinears is already active")
        for layer in self._layers:
            w = layer.weight
            if "forward" not in layer.__dict__ and w.device.type == "cpu" and w.dtype == torch.float32:
                layer.__dict__["forward"] = _Routed(layer)
                self._routed.append(layer)
        return self

    def __exit__(self, *exc: object) -> None:
        for layer in self._routed:
            if isinstance(layer.__dict__.get("forward"), _Routed):
                del layer.__dict__["forward"]
        self._routed = []
