"""Ragged lists laid out row by row: the index arithmetic the sparse paths share.

A sparse step builds, for each (sequence, KV head), a list from variable-sized units (a chunk's pages, a
unit's slots, a run's windows). Each list becomes one row of a padded [rows, width] tensor, items first, in
order. `ragged_layout` gives every item its unit, its index inside that unit and its place in that layout,
in a few whole-tensor operations (no Python loop over units). `ragged_layout_np` is the same on numpy arrays,
for the CPU's sparse path, whose lists hold a few thousand items: there numpy's per-call cost is a tenth of
torch's, and the calls, not the items, are what the arithmetic costs.
"""

from __future__ import annotations

import numpy as np
import torch


def ragged_layout(sizes: torch.Tensor, rows: int, extra: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """sizes: [rows * U] items of each unit, a row's U units consecutive.

    Returns (unit, within, dest) [T] for the T items in order (each item's unit, its index inside that unit,
    its flat place in [rows, width]), per_row [rows] (items per row) and width: the most items of a row plus
    `extra` columns left free after every row's items, at least 1."""
    units = sizes.numel() // rows if rows else 0
    per_row = sizes.view(rows, units).sum(-1)
    total, most = (int(x) for x in torch.stack([per_row.sum(), per_row.max()]).tolist()) if rows else (0, 0)
    width = max(1, most + extra)
    device = sizes.device
    entry = torch.arange(total, device=device)
    unit = torch.repeat_interleave(torch.arange(sizes.numel(), device=device), sizes, output_size=total)
    within = entry - (sizes.cumsum(0) - sizes).take(unit)
    row = unit // max(1, units)
    dest = row * width + entry - (per_row.cumsum(0) - per_row).take(row)
    return unit, within, dest, per_row, width


def ragged_layout_np(sizes: np.ndarray, rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """`ragged_layout` (no extra columns) on a numpy array of sizes [rows * U]: (unit, within, dest, per_row,
    width), int64."""
    sizes = np.asarray(sizes, dtype=np.int64)
    units = sizes.size // rows if rows else 0
    per_row = sizes.reshape(rows, units).sum(-1) if rows else np.zeros(0, dtype=np.int64)
    width = max(1, int(per_row.max())) if rows else 1
    total = int(per_row.sum()) if rows else 0
    entry = np.arange(total, dtype=np.int64)
    unit = np.repeat(np.arange(sizes.size, dtype=np.int64), sizes)
    within = entry - np.repeat(np.cumsum(sizes) - sizes, sizes)
    row = unit // max(1, units)
    dest = row * width + entry - np.repeat(np.cumsum(per_row) - per_row, per_row)
    return unit, within, dest, per_row, width
