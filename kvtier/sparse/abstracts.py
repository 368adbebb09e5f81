"""Key abstracts of one layer's chunks: per KV head and channel, the min and max of the keys, at two grains.

Chunk rows bound a whole chunk; page rows bound each `page_size`-token page of a chunk (pages start at the
chunk's start, the last one may be shorter). Both live on the device for every chunk, wherever the chunk's
KV lives, so a decode step scores chunks without loading them (kvtier.kernels.chunk_scores) and then cuts
its selection down to the pages that matter: a large chunk is never taken whole only because a needle sits
in one of its pages. Chunk rows follow the layer's chunk list (row i describes layer.chunks[i]); a chunk's
pages are consecutive page rows, in chunk order.

Chunk bounds are float32; page bounds keep the keys' dtype, where a min or max is exact, so they cost
1/page_size of the keys' memory. On a CPU the C selection reads the chunk bounds as float16 rounded outward
(`half_bounds`, kept beside them): every chunk's row is read at every sparse step, and that read was the
selection's largest cost.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from ..kernels import native
from ..rope import round_outward
from ..store.pools import storage_mode

Row = tuple[torch.Tensor, torch.Tensor, int, int, torch.Tensor, torch.Tensor]
"""One chunk: kmin, kmax [B, Hkv, D] float32, start, length, page mins and maxes [B, Hkv, pages, D]."""


@dataclass(frozen=True)
class PageView:
    """The live page rows: bounds [B, Hkv, P, D]; starts, lengths, offset in the chunk, chunk row: [P];
    per chunk row, its first page row and page count: [C]."""

    pmin: torch.Tensor
    pmax: torch.Tensor
    starts: torch.Tensor
    lengths: torch.Tensor
    offsets: torch.Tensor
    chunk: torch.Tensor
    first: torch.Tensor
    count: torch.Tensor
    capacity: int  # page rows allocated per (batch row, KV head) in the buffers pmin and pmax are views of

    def bounds(self, pid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Page bounds for each (batch row, KV head)'s own page rows pid [B, Hkv, W]: ([B, Hkv, W, D],) x 2.
        Whole rows are copied out of the contiguous buffers (much faster than an element-wise gather)."""
        b, h, w = pid.shape
        d = self.pmin.shape[-1]
        rows = (torch.arange(b * h, device=pid.device) * self.capacity).view(b, h, 1) + pid
        flat = rows.flatten()
        full = (self.pmin.as_strided((b * h * self.capacity, d), (d, 1)),
                self.pmax.as_strided((b * h * self.capacity, d), (d, 1)))
        return tuple(t.index_select(0, flat).view(b, h, w, d) for t in full)


def float16_bounds(kmin: torch.Tensor, kmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """float32 bounds as float16 rounded outward (`round_outward`: min down, max up, every key stays inside
    them), or None where a finite bound is beyond float16's range (it would become infinite, and 0 x inf has no
    score)."""
    lo, hi = round_outward(kmin, torch.float16, -1.0), round_outward(kmax, torch.float16, 1.0)
    if bool((lo.isinf() & kmin.isfinite()).any() | (hi.isinf() & kmax.isfinite()).any()):
        return None
    return lo, hi


class AbstractTable:
    """Chunk rows (kmin, kmax [B, Hkv, capacity, D], lengths, starts [capacity]) and their page rows."""

    def __init__(self, device: torch.device, page_size: int):
        self.device = device
        self.page_size = page_size
        self.kmin: torch.Tensor | None = None
        self.kmax: torch.Tensor | None = None
        self.pmin: torch.Tensor | None = None
        self.pmax: torch.Tensor | None = None
        # Integer columns, kept on the CPU whatever the device: built from Python ints as chunks are sealed and
        # read back as ints, neither of which may wait for a GPU; selection reads a device copy (`_device_cols`),
        # made again only after they change.
        self._chunk_cols = torch.empty(4, 0, dtype=torch.long)  # start, length, first page, pages
        self._page_cols = torch.empty(4, 0, dtype=torch.long)  # start, length, offset, chunk row
        self._cols_version = 0
        self._mirror: tuple[tuple[int, int, int], torch.Tensor, torch.Tensor] | None = None
        self._page_view: tuple | None = None  # (version, pmin, pmax, PageView) of the last `pages()`
        self._half: tuple[torch.Tensor, torch.Tensor] | None = None  # `half_bounds`' float16 chunk bounds
        self._half_rows = 0  # leading chunk rows of `_half` that match kmin, kmax
        self._no_half = False  # a bound beyond float16's range: float32 until the rows are rebuilt
        self.count = 0
        self.page_count = 0
        self.max_pages = 0  # most pages of one chunk

    def __len__(self) -> int:
        return self.count

    @property
    def version(self) -> tuple[int, int, int]:
        """Changes whenever a chunk row is added, removed or moved (tables derived from the rows rebuild)."""
        return self._cols_version, self.count, self.page_count

    def pages_of(self, length: int) -> int:
        return -(-length // self.page_size)

    # ------------------------------------------------------------------------------------ building
    def summarize(self, k: torch.Tensor, start: int) -> Row:
        """The row of a chunk of keys k [B, Hkv, n, D] starting at position `start`."""
        k = k.detach()
        b, h, n, d = k.shape
        pages = self.pages_of(n)
        if pages == 1:
            pmin, pmax = k.amin(dim=2, keepdim=True), k.amax(dim=2, keepdim=True)
        else:
            if pages * self.page_size != n:  # repeat the last key into the short last page: min, max stay exact
                k = torch.cat([k, k[:, :, -1:].expand(b, h, pages * self.page_size - n, d)], dim=2)
            paged = k.reshape(b, h, pages, self.page_size, d)
            pmin, pmax = paged.amin(dim=3), paged.amax(dim=3)
        return pmin.float().amin(dim=2), pmax.float().amax(dim=2), start, n, pmin, pmax

    def add(self, k: torch.Tensor, start: int) -> None:
        """Append the row of a new chunk of keys k [B, Hkv, n, D]."""
        self.append(self.summarize(k, start))

    def add_run(self, k: torch.Tensor, start: int, sizes: list[int]) -> None:
        """Append the rows of consecutive chunks of `sizes` tokens, their keys end to end in k [B, Hkv, n, D],
        the first at position `start`: chunks of one whole-page size are summarised together (two reductions
        for the run, not two per chunk), the rest one by one; then one `extend`."""
        k = k.detach()
        b, h, _, d = k.shape
        parts, at, i = [], 0, 0
        while i < len(sizes):
            size, j = sizes[i], i
            while j < len(sizes) and sizes[j] == size:
                j += 1
            n = (j - i) * size
            if size % self.page_size == 0:
                pages = size // self.page_size
                paged = k[:, :, at:at + n].reshape(b, h, (j - i) * pages, self.page_size, d)
                pmin, pmax = paged.amin(dim=3), paged.amax(dim=3)
                kmin = pmin.view(b, h, j - i, pages, d).float().amin(dim=3)
                kmax = pmax.view(b, h, j - i, pages, d).float().amax(dim=3)
                parts.append((kmin, kmax, pmin, pmax))
            else:
                for c in range(i, j):
                    off = at + (c - i) * size
                    kmn, kmx, _, _, pmn, pmx = self.summarize(k[:, :, off:off + size], start + off)
                    parts.append((kmn.unsqueeze(2), kmx.unsqueeze(2), pmn, pmx))
            at += n
            i = j
        starts = [start + a for a in itertools.accumulate(sizes, initial=0)][:-1]
        self.extend(*(torch.cat([p[f] for p in parts], dim=2) for f in (0, 1)), starts, list(sizes),
                    *(torch.cat([p[f] for p in parts], dim=2) for f in (2, 3)))

    def append(self, row: Row) -> None:
        kmin, kmax, start, length, pmin, pmax = row
        pages = pmin.shape[2]
        if pages != self.pages_of(length):
            raise ValueError(f"a chunk of {length} tokens has {self.pages_of(length)} pages, got {pages}")
        with storage_mode():
            if self.kmin is None or self.count == self.kmin.shape[2]:
                self._grow_chunks(kmin.shape)
            if self.pmin is None or self.page_count + pages > self.pmin.shape[2]:
                self._grow_pages(pmin.shape, pmin.dtype, self.page_count + pages)
            c, p = self.count, self.page_count
            self.kmin[:, :, c] = kmin.to(self.device, torch.float32)
            self.kmax[:, :, c] = kmax.to(self.device, torch.float32)
            self.pmin[:, :, p:p + pages] = pmin.to(self.device)
            self.pmax[:, :, p:p + pages] = pmax.to(self.device)
            self._cols_version += 1
            self._chunk_cols[:, c] = torch.tensor([start, length, p, pages])
            offsets = torch.arange(pages) * self.page_size
            self._page_cols[:, p:p + pages] = torch.stack([
                start + offsets, (length - offsets).clamp(max=self.page_size), offsets, torch.full((pages,), c)])
        self.count += 1
        self.page_count += pages
        self.max_pages = max(self.max_pages, pages)

    def extend(self, kmin: torch.Tensor, kmax: torch.Tensor, starts: list[int], lengths: list[int],
               pmin: torch.Tensor, pmax: torch.Tensor) -> None:
        """Append many chunk rows at once, as `append` would one by one (a reopened session's: per-row appends
        cost ~0.2 ms each, 0.35 s for a 32k-token session's 2048 chunks). kmin, kmax [B, Hkv, C, D] for C chunks
        at `starts` of `lengths`; pmin, pmax [B, Hkv, P, D]: their pages end to end."""
        n = len(starts)
        if n == 0:
            return
        lengths_t, starts_t = torch.tensor(lengths, dtype=torch.long), torch.tensor(starts, dtype=torch.long)
        pages = -(-lengths_t // self.page_size)
        total = int(pages.sum())
        if len(lengths) != n or kmin.shape[2] != n or kmax.shape[2] != n or pmin.shape[2] != total \
                or pmax.shape[2] != total:
            raise ValueError(f"{n} chunks of {total} pages, got abstracts of {kmin.shape[2]} chunks and "
                             f"{pmin.shape[2]} pages")
        b, h, _, d = kmin.shape
        with storage_mode():
            if self.kmin is None or self.count + n > self.kmin.shape[2]:
                self._grow_chunks(torch.Size((b, h, d)), self.count + n)
            if self.pmin is None or self.page_count + total > self.pmin.shape[2]:
                self._grow_pages(pmin.shape, pmin.dtype, self.page_count + total)
            c, p = self.count, self.page_count
            self.kmin[:, :, c:c + n] = kmin.to(self.device, torch.float32)
            self.kmax[:, :, c:c + n] = kmax.to(self.device, torch.float32)
            self.pmin[:, :, p:p + total] = pmin.to(self.device)
            self.pmax[:, :, p:p + total] = pmax.to(self.device)
            first = pages.cumsum(0) - pages  # each chunk's first page, counted from p
            self._cols_version += 1
            self._chunk_cols[:, c:c + n] = torch.stack([starts_t, lengths_t, first + p, pages])
            offsets = (torch.arange(total) - torch.repeat_interleave(first, pages, output_size=total)) * self.page_size
            self._page_cols[:, p:p + total] = torch.stack([
                torch.repeat_interleave(starts_t, pages, output_size=total) + offsets,
                (torch.repeat_interleave(lengths_t, pages, output_size=total) - offsets).clamp(max=self.page_size),
                offsets, torch.repeat_interleave(torch.arange(c, c + n), pages, output_size=total)])
        self.count += n
        self.page_count += total
        self.max_pages = max(self.max_pages, int(pages.max()))

    def _grow_chunks(self, shape: torch.Size, need: int = 0) -> None:
        b, h, d = shape
        cap = max(64, 2 * self.count, need)
        kmin, kmax = (torch.empty(b, h, cap, d, device=self.device) for _ in range(2))
        cols = torch.zeros(4, cap, dtype=torch.long)
        self._cols_version += 1
        if self.kmin is not None:
            n = self.count
            kmin[:, :, :n], kmax[:, :, :n] = self.kmin[:, :, :n], self.kmax[:, :, :n]
            cols[:, :n] = self._chunk_cols[:, :n]
        self.kmin, self.kmax, self._chunk_cols = kmin, kmax, cols

    def _grow_pages(self, shape: torch.Size, dtype: torch.dtype, need: int) -> None:
        b, h, _, d = shape
        cap = max(256, 2 * self.page_count, need)
        pmin, pmax = (torch.empty(b, h, cap, d, dtype=dtype, device=self.device) for _ in range(2))
        cols = torch.zeros(4, cap, dtype=torch.long)
        self._cols_version += 1
        if self.pmin is not None:
            n = self.page_count
            pmin[:, :, :n], pmax[:, :, :n] = self.pmin[:, :, :n], self.pmax[:, :, :n]
            cols[:, :n] = self._page_cols[:, :n]
        self.pmin, self.pmax, self._page_cols = pmin, pmax, cols

    # ------------------------------------------------------------------------------------- reading
    def view(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """kmin, kmax [B, Hkv, C, D], lengths [C], starts [C] of the live chunk rows."""
        n = self.count
        if self.kmin is None:
            empty = torch.empty(0, dtype=torch.long, device=self.device)
            return torch.empty(0, 0, 0, 0, device=self.device), torch.empty(0, 0, 0, 0, device=self.device), empty, empty
        chunk_cols, _ = self._device_cols()
        return self.kmin[:, :, :n], self.kmax[:, :, :n], chunk_cols[1], chunk_cols[0]

    def pages(self) -> PageView:
        """The live page rows (call only when the table has chunks). Kept until the rows or the buffers change:
        a sparse step asks twice per layer, and building the view costs more than a step's use of it."""
        cached = self._page_view
        if cached is None or cached[0] != self.version or cached[1] is not self.pmin or cached[2] is not self.pmax:
            p = self.page_count
            chunk_cols, page_cols = self._device_cols()
            starts, lengths, offsets, chunk = page_cols
            view = PageView(self.pmin[:, :, :p], self.pmax[:, :, :p], starts, lengths, offsets, chunk,
                            chunk_cols[2], chunk_cols[3], self.pmin.shape[2])
            cached = self._page_view = (self.version, self.pmin, self.pmax, view)
        return cached[3]

    def half_bounds(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The live chunk bounds [B, Hkv, C, D] as float16 rounded outward (`float16_bounds`: still bounds),
        for the C selection on a CPU, which reads every chunk's row at every step: half the bytes of float32
        (at 32k tokens a layer's rows are 4.2 MB; reading them cold took 0.27 ms, 0.14 ms as float16). Kept
        beside the float32 rows, which stay the table's own, and brought up to date from the first row changed
        since the last call (a decode step seals a chunk now and then: one row). None off the CPU, where the C
        build does not read float16, or where a bound lies beyond float16's range."""
        n = self.count
        if self.kmin is None or n == 0 or self.device.type != "cpu" or self._no_half or not native.reads_half():
            return None
        b, h, cap, d = self.kmin.shape
        fits = self._half is not None and self._half[0].shape[:2] == (b, h) and self._half[0].shape[3] == d
        if fits and self._half_rows >= n:  # the usual step: nothing changed, or only rows past the count
            return self._half[0][:, :, :n], self._half[1][:, :, :n]
        with storage_mode():  # kept across calls, so never an inference tensor
            if not fits or self._half[0].shape[2] < n:
                keep = self._half_rows if fits else 0
                new = tuple(torch.empty(b, h, cap, d, dtype=torch.float16) for _ in range(2))
                if keep:
                    new[0][:, :, :keep], new[1][:, :, :keep] = self._half[0][:, :, :keep], self._half[1][:, :, :keep]
                self._half, self._half_rows = new, keep
            r = self._half_rows
            got = float16_bounds(self.kmin[:, :, r:n], self.kmax[:, :, r:n])
            if got is None:
                self._no_half, self._half, self._half_rows = True, None, 0
                return None
            self._half[0][:, :, r:n], self._half[1][:, :, r:n] = got
            self._half_rows = n
        return self._half[0][:, :, :n], self._half[1][:, :, :n]

    def _changed(self, row: int) -> None:
        """Chunk rows from `row` on were rewritten (appends need no call: they only add rows past the count)."""
        self._half_rows = min(self._half_rows, row)
        if row == 0:
            self._no_half = False

    def _device_cols(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The live chunk and page columns on the table's device (views of the CPU columns on a CPU)."""
        key = self.version
        if self._mirror is None or self._mirror[0] != key:
            self._mirror = (key, self._chunk_cols[:, :self.count].to(self.device),
                            self._page_cols[:, :self.page_count].to(self.device))
        return self._mirror[1], self._mirror[2]

    def row(self, i: int) -> Row:
        """A copy of chunk row i (to carry it into a rebuilt table)."""
        start, length, first, pages = (int(x) for x in self._chunk_cols[:, i])
        return (self.kmin[:, :, i].clone(), self.kmax[:, :, i].clone(), start, length,
                self.pmin[:, :, first:first + pages].clone(), self.pmax[:, :, first:first + pages].clone())

    # ---------------------------------------------------------------------------------- maintenance
    def truncate(self, n: int) -> None:
        """Keep the first n chunk rows and their pages."""
        self._changed(n)
        if n < self.count:
            self.count = n
            self.page_count = int(self._chunk_cols[2, n])

    def rebuild(self, rows: list[Row]) -> None:
        """Replace every row (chunks split or merged)."""
        self._changed(0)
        self.count = self.page_count = self.max_pages = 0
        for row in rows:
            self.append(row)

    def splice(self, a: int, b: int, rows: list[Row]) -> None:
        """Replace chunk rows [a, b) (and their pages) by `rows`; the rows after b follow them, moved as one
        block (a span removed from the layer: its chunks go, at most two cut chunks come back as pieces)."""
        self._changed(a)
        if self.kmin is None:
            for row in rows:
                self.append(row)
            return
        pa, pb = self._first_page(a), self._first_page(b)
        tail = (self.kmin[:, :, b:self.count].clone(), self.kmax[:, :, b:self.count].clone(),
                self._chunk_cols[:, b:self.count].clone(), self.pmin[:, :, pb:self.page_count].clone(),
                self.pmax[:, :, pb:self.page_count].clone(), self._page_cols[:, pb:self.page_count].clone())
        self.count, self.page_count = a, pa
        for row in rows:
            self.append(row)
        kmin, kmax, cols, pmin, pmax, pcols = tail
        n, m = cols.shape[1], pcols.shape[1]
        if not n:
            return
        with storage_mode():
            if self.count + n > self.kmin.shape[2]:
                self._grow_chunks(kmin.shape[:2] + kmin.shape[3:], self.count + n)
            if self.page_count + m > self.pmin.shape[2]:
                self._grow_pages(pmin.shape, pmin.dtype, self.page_count + m)
            c, p = self.count, self.page_count
            cols[2] += p - pb  # first page row
            self._cols_version += 1
            pcols[3] += c - b  # chunk row
            self.kmin[:, :, c:c + n], self.kmax[:, :, c:c + n], self._chunk_cols[:, c:c + n] = kmin, kmax, cols
            self.pmin[:, :, p:p + m], self.pmax[:, :, p:p + m], self._page_cols[:, p:p + m] = pmin, pmax, pcols
        self.count += n
        self.page_count += m

    def move(self, first: int, delta: int, rope) -> None:
        """Chunk rows from `first` on moved by `delta` positions (`Rope.shift`): starts follow, and bounds turn
        by interval arithmetic (`Rope.shift_bounds`: they still hold, a little looser; `refresh` makes a
        chunk's exact again from its keys). One call for all of them, whatever their number."""
        if first >= self.count:
            return
        self._changed(first)
        c, p = slice(first, self.count), slice(self._first_page(first), self.page_count)
        with storage_mode():
            self.kmin[:, :, c], self.kmax[:, :, c] = rope.shift_bounds(self.kmin[:, :, c], self.kmax[:, :, c], delta)
            self.pmin[:, :, p], self.pmax[:, :, p] = rope.shift_bounds(self.pmin[:, :, p], self.pmax[:, :, p], delta)
            self._cols_version += 1
            self._chunk_cols[0, c] += delta
            self._page_cols[0, p] += delta

    def refresh(self, rows: torch.Tensor, k: torch.Tensor) -> None:
        """Exact bounds for chunk rows `rows` ([R], their chunks' keys end to end in k [B, Hkv, N, D]), computed
        for all of them at once (segment minima and maxima by scatter), not chunk by chunk."""
        if rows.numel():
            self._changed(int(rows.min()))
        cols = self._chunk_cols[:, rows.cpu()]
        n_pages = int(cols[3].sum())
        _, lengths, first, pages = cols.to(self.device)
        rows = rows.to(self.device)
        b, h, n, d = k.shape
        r = rows.numel()
        local_first = pages.cumsum(0) - pages
        offset = torch.arange(n, device=self.device) - torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths,
                                                                                output_size=n)
        tok_page = torch.repeat_interleave(local_first, lengths, output_size=n) + offset // self.page_size
        index = tok_page.view(1, 1, n, 1).expand(b, h, n, d)
        pmin = k.new_full((b, h, n_pages, d), float("inf")).scatter_reduce_(2, index, k, "amin")
        pmax = k.new_full((b, h, n_pages, d), float("-inf")).scatter_reduce_(2, index, k, "amax")
        page_chunk = torch.repeat_interleave(torch.arange(r, device=self.device), pages, output_size=n_pages)
        page_rows = first[page_chunk] + torch.arange(n_pages, device=self.device) - local_first[page_chunk]
        index = page_chunk.view(1, 1, n_pages, 1).expand(b, h, n_pages, d)
        kmin = torch.full((b, h, r, d), float("inf"), device=self.device).scatter_reduce_(2, index, pmin.float(), "amin")
        kmax = torch.full((b, h, r, d), float("-inf"), device=self.device).scatter_reduce_(2, index, pmax.float(), "amax")
        with storage_mode():
            self.pmin[:, :, page_rows], self.pmax[:, :, page_rows] = pmin, pmax
            self.kmin[:, :, rows], self.kmax[:, :, rows] = kmin, kmax

    def _first_page(self, row: int) -> int:
        return int(self._chunk_cols[2, row]) if row < self.count else self.page_count

    def select_rows(self, index: torch.Tensor) -> None:
        """Reorder the batch rows (beam search)."""
        self._changed(0)
        if self.kmin is not None:
            with storage_mode():
                index = index.to(self.device)
                self.kmin, self.kmax = self.kmin.index_select(0, index), self.kmax.index_select(0, index)
                self.pmin, self.pmax = self.pmin.index_select(0, index), self.pmax.index_select(0, index)

    def clear(self) -> None:
        self._changed(0)
        self._half = None
        self.kmin = self.kmax = self.pmin = self.pmax = None
        self.count = self.page_count = self.max_pages = 0
