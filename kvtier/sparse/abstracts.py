"""Per-chunk KV abstracts of one layer: per KV head and channel, the min and max of the chunk's keys.

Small enough to keep on the device for every chunk (2 x heads x head_dim floats per chunk and row), they
let a decode step score every chunk without loading it (see kvtier.kernels.chunk_scores).
Rows follow the layer's chunk list: row i describes layer.chunks[i].
"""

from __future__ import annotations

import torch

from ..store.pools import storage_mode


class AbstractTable:
    """kmin, kmax: [B, Hkv, capacity, D] float32 on the device; lengths, starts: [capacity] on the device."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kmin: torch.Tensor | None = None
        self.kmax: torch.Tensor | None = None
        self.lengths = torch.empty(0, dtype=torch.long, device=device)
        self.starts = torch.empty(0, dtype=torch.long, device=device)
        self.count = 0

    def __len__(self) -> int:
        return self.count

    @staticmethod
    def summarize(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k: [B, Hkv, n, D] -> (min, max) over tokens, each [B, Hkv, D] float32."""
        kf = k.detach().float()
        return kf.amin(dim=2), kf.amax(dim=2)

    def append(self, kmin: torch.Tensor, kmax: torch.Tensor, start: int, length: int) -> None:
        with storage_mode():
            kmin, kmax = kmin.to(self.device, torch.float32), kmax.to(self.device, torch.float32)
            if self.kmin is None or self.count == self.kmin.shape[2]:
                self._grow(kmin.shape)
            self.kmin[:, :, self.count] = kmin
            self.kmax[:, :, self.count] = kmax
            self.lengths[self.count] = length
            self.starts[self.count] = start
        self.count += 1

    def _grow(self, shape: torch.Size) -> None:
        b, h, d = shape
        cap = max(64, 2 * (0 if self.kmin is None else self.kmin.shape[2]))
        kmin = torch.empty(b, h, cap, d, device=self.device)
        kmax = torch.empty(b, h, cap, d, device=self.device)
        lengths = torch.zeros(cap, dtype=torch.long, device=self.device)
        starts = torch.zeros(cap, dtype=torch.long, device=self.device)
        if self.kmin is not None:
            n = self.count
            kmin[:, :, :n], kmax[:, :, :n] = self.kmin[:, :, :n], self.kmax[:, :, :n]
            lengths[:n], starts[:n] = self.lengths[:n], self.starts[:n]
        self.kmin, self.kmax, self.lengths, self.starts = kmin, kmax, lengths, starts

    def view(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """kmin, kmax [B, Hkv, C, D], lengths [C], starts [C] of the live rows."""
        n = self.count
        if self.kmin is None:
            empty = torch.empty(0, dtype=torch.long, device=self.device)
            return torch.empty(0, 0, 0, 0, device=self.device), torch.empty(0, 0, 0, 0, device=self.device), empty, empty
        return self.kmin[:, :, :n], self.kmax[:, :, :n], self.lengths[:n], self.starts[:n]

    def truncate(self, n: int) -> None:
        self.count = min(self.count, n)

    def replace(self, first: int, last: int, rows: list[tuple[torch.Tensor, torch.Tensor, int, int]]) -> None:
        """Replace rows [first, last) with new ones (chunk split or merge), shifting the rest."""
        kmin, kmax, lengths, starts = self.view()
        tail = (kmin[:, :, last:].clone(), kmax[:, :, last:].clone(), lengths[last:].clone(), starts[last:].clone())
        self.count = first
        for mn, mx, start, length in rows:
            self.append(mn, mx, start, length)
        for i in range(tail[0].shape[2]):
            self.append(tail[0][:, :, i], tail[1][:, :, i], int(tail[3][i]), int(tail[2][i]))

    def select_rows(self, index: torch.Tensor) -> None:
        if self.kmin is not None:
            with storage_mode():
                index = index.to(self.device)
                self.kmin, self.kmax = self.kmin.index_select(0, index), self.kmax.index_select(0, index)

    def clear(self) -> None:
        self.kmin = self.kmax = None
        self.count = 0
