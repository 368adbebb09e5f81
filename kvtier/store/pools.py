"""Budgeted memory pools of one layer: the device arena and the host pool.

Budgets are hard: `allocate`/`put` return None/False when a request does not fit, and the caller
(the tier manager) decides what to evict. Nothing here picks victims.

Device arena layout (one per full-attention layer)::

    k, v : [batch, kv_heads, capacity, head_dim]
    slot_pos : [capacity]  logical position held by each slot, -1 when free
    slot_owner : [capacity]  row of the chunk owning the slot in the layer's chunk table, -1: recent window
               |  used slots  | holes (free, reused first) | ... | high water | never used ... |

Attention never cares about key order, so a layer attends over `k[:, :, :high_water]` in one call,
masking free slots; slots are handed out lowest first to keep that prefix dense, and as one run where a
run of holes fits the request (a chunk in one run is read, written and evicted with sliced copies instead
of index kernels). Holes are kept as runs, so a chunk's allocation and release cost O(runs), not O(slots).

The arena grows rarely and tightly: to what is needed plus 1/32 headroom (at least 16 slots), never past
the budget, and in one step to a size announced ahead (`reserve`: a prefill's whole prompt, a reopened
session's length), so a decode step right after a prefill finds room without a copy and the arena stays
within a few percent of the tokens it holds (a preallocated StaticCache's footprint). On a GPU a growth
copies. On a CPU each (sequence, head) plane is reserved twice as wide as the capacity, in address space
backed by memory only up to the capacity (`ReservedPlanes`): a growth commits the new slots and widens the
view, copying nothing; only outgrowing the reservation copies (a copy into fresh pages ran at ~1 GB/s, so
decoding paid about one more pass over its KV every 1/32 of growth). The whole 2 MiB pages inside committed
slots are asked for as transparent huge pages, the rest of the reservation stays on 4 KiB pages, so huge
pages spare the TLB without holding memory ahead of need. `allocated_bytes`, the capacity's worth, is the
memory the arena holds either way.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import math
import mmap
import warnings
from collections import OrderedDict
from collections.abc import Iterator

import numpy as np
import torch

from ..errors import CacheMemoryError
from ..kernels import native

_MIN_HEADROOM = 16  # slots added beyond a growth's need, at least
_HEADROOM_SHARE = 32  # ... or 1/32 of the need, whichever is larger
_RESERVE = 2  # on a CPU, planes reserved (address space, not memory) this many times the capacity
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux's value; older Pythons lack the name
_HUGE_PAGE = 2 << 20  # a transparent huge page (x86-64, arm64 with 4 KiB pages)


def _with_headroom(n: int) -> int:
    return n + max(_MIN_HEADROOM, n // _HEADROOM_SHARE)


class ReservedPlanes:
    """One CPU arena tensor's planes (k's or v's, [batch, heads, reserve, head_dim]) in a private anonymous
    mapping: address space for `reserve` slots per (sequence, head) plane, memory only for the slots committed,
    so the arena grows into the rest by widening its view, without a copy."""

    def __init__(self, tensor: torch.Tensor, mapping: mmap.mmap, offset: int):
        self.tensor = tensor
        self._mapping = mapping
        self._offset = offset  # where the tensor starts in the mapping (bytes)

    @classmethod
    def create(cls, batch: int, heads: int, reserve: int, head_dim: int, dtype: torch.dtype) -> ReservedPlanes | None:
        """Zeros, nothing committed; None where the mapping is refused (then the arena is allocated as usual).
        Planes of 2 MiB or more are widened to whole 2 MiB pages and the first starts on one, so that the
        committed slots of every plane can be backed by huge pages (`commit`); only address space is added."""
        row = head_dim * dtype.itemsize
        if reserve * row >= _HUGE_PAGE:
            step = _HUGE_PAGE // math.gcd(_HUGE_PAGE, row)
            reserve = -(-reserve // step) * step
        nbytes = batch * heads * reserve * row
        try:
            mapping = mmap.mmap(-1, nbytes + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        except (AttributeError, OSError, ValueError, OverflowError):
            return None
        try:  # 4 KiB pages where nothing is committed: a 2 MiB page would commit memory ahead of need (`commit`)
            mapping.madvise(mmap.MADV_NOHUGEPAGE)
        except (AttributeError, OSError):
            pass
        offset = -torch.frombuffer(mapping, dtype=torch.uint8, count=1).data_ptr() % _HUGE_PAGE
        tensor = torch.frombuffer(mapping, dtype=dtype, count=nbytes // dtype.itemsize, offset=offset)
        return cls(tensor.view(batch, heads, reserve, head_dim), mapping, offset)

    @property
    def slots(self) -> int:
        return self.tensor.shape[2]

    def commit(self, start: int, stop: int) -> None:
        """Back slots [start, stop) of every plane with memory now: with one MADV_POPULATE_WRITE per plane
        (Linux 5.14+; 1.8 GB/s on the benchmark VM, where writing fresh pages one fault at a time ran at
        1.2 GB/s), else by writing zeros. The arena then holds the memory it reports, and the first write
        into it (a reopened session's records) runs at the speed of touched memory. The whole 2 MiB pages
        inside the slots are asked for as transparent huge pages first (`_huge_inside`)."""
        if stop <= start:
            return
        b, h, _, d = self.tensor.shape
        item = self.tensor.element_size()
        plane_bytes, page = self.slots * d * item, mmap.PAGESIZE
        for p in range(b * h):  # offsets in the mapping
            lo = self._offset + p * plane_bytes + start * d * item
            hi = self._offset + p * plane_bytes + stop * d * item
            first = lo - lo % page
            self._huge_inside(lo, hi)
            try:
                self._mapping.madvise(_MADV_POPULATE_WRITE, first, hi - first)
            except OSError as exc:
                if exc.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    self.tensor[:, :, start:stop] = 0  # no populate: touch every page by writing
                    return
                raise MemoryError(f"committing memory for slots {start}-{stop}: {exc.strerror}") from None

    def _huge_inside(self, lo: int, hi: int) -> None:
        """Ask for 2 MiB pages (MADV_HUGEPAGE) over the whole 2 MiB pages inside bytes [lo, hi) of the mapping:
        they hold slots being committed, so nothing is committed ahead of need, and attention reading the arena
        in scattered runs misses the TLB less (a sparse 32k step's C attention 1.29 -> 1.18-1.23 ms a layer on the
        benchmark VM). Best effort: the kernel may give 4 KiB pages anyway."""
        base = self.tensor.data_ptr() - self._offset  # the mapping's address
        first = -(-(base + lo) // _HUGE_PAGE) * _HUGE_PAGE - base
        last = (base + hi) // _HUGE_PAGE * _HUGE_PAGE - base
        if last > first:
            try:
                self._mapping.madvise(mmap.MADV_HUGEPAGE, first, last - first)
            except (AttributeError, OSError):
                pass


def available_bytes(device: torch.device) -> int | None:
    """Memory an allocation on `device` can still get: the GPU's free memory plus what torch's caching
    allocator holds unused; on a CPU, the kernel's MemAvailable (an arena past it would be zeroed into swap or
    the OOM killer, since Linux grants large allocations before touching them). None where unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        return host_available_bytes()
    return None


def host_available_bytes() -> int | None:
    """The kernel's MemAvailable (memory the page cache and new allocations can take without swapping), or None."""
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_fits(device: torch.device, nbytes: int, what: str, advice: str = "") -> None:
    """CacheMemoryError unless `nbytes` more fit on `device` (see `available_bytes`)."""
    from ..sizes import human_bytes  # here: sizes imports the model spec, which imports this module

    free = available_bytes(device)
    if free is not None and nbytes > free:
        raise CacheMemoryError(f"{what} needs {human_bytes(nbytes)} and {device} has {human_bytes(free)} available"
                               + (f" ({advice})" if advice else ""))


@contextlib.contextmanager
def allocation_errors(device: torch.device, what: str) -> Iterator[None]:
    """torch's allocation failures (out of memory, a size that overflows) as one-line CacheMemoryErrors."""
    try:
        yield
    except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError is a RuntimeError
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CacheMemoryError(f"cannot allocate {what} on {device}: {reason}") from None


def storage_mode() -> contextlib.ExitStack:
    """Pool tensors are updated in place across calls, so they must never be inference tensors (made
    under `torch.inference_mode()`, they could not be written outside it) nor track gradients."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode(False))
    stack.enter_context(torch.no_grad())
    return stack


def _as_run(slots: torch.Tensor) -> slice | None:
    """The slots as one slice when they are consecutive and on the CPU. `DevicePool.allocate` hands out slot
    lists on the CPU whatever the arena's device: reading a CUDA tensor's values would wait for the device,
    and a plain slice copies with no index kernel and no upload of the index. A list on another device
    takes the index kernels."""
    if not slots.is_cpu or slots.numel() == 0:
        return None
    # A few numpy calls (a torch op on a small tensor costs more than the test), no np.diff (its Python wrapper
    # took half of the test's 7.5 us): the tiered step asks this a hundred times.
    arr = slots.numpy() if slots.dim() == 1 else slots.reshape(-1).numpy()
    first, n = int(arr[0]), arr.size
    if n > 1 and (int(arr[-1]) - first != n - 1 or not (arr[1:] - arr[:-1] == 1).all()):
        return None
    return slice(first, first + n)


def _runs_of(slots: np.ndarray) -> list[tuple[int, slice]]:
    """A slot list's runs of consecutive slots, in list order: (offset in the list, slice of the arena) for each,
    found in one numpy pass (a Python loop over the slots cost ~20 us a chunk)."""
    cuts = (np.flatnonzero(slots[1:] != slots[:-1] + 1) + 1).tolist()
    if not cuts:
        return [(0, slice(int(slots[0]), int(slots[0]) + slots.size))] if slots.size else []
    bounds = [0, *cuts, slots.size]
    return [(a, slice(int(slots[a]), int(slots[a]) + b - a)) for a, b in zip(bounds, bounds[1:])]


class DevicePool:
    """Token slots of one layer on the compute device, at most `budget` of them in use."""

    def __init__(self, budget: int | None, device: torch.device, dtype: torch.dtype):
        self.budget = budget
        self.device = device
        self.dtype = dtype
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.slot_pos: torch.Tensor | None = None
        self.slot_owner: torch.Tensor | None = None
        # On a CPU, numpy views of slot_pos and slot_owner: one slot's entry is set in 0.2 us instead of a
        # torch indexing call's 2-3 us, which a decode step pays per layer (None on other devices).
        self._pos_np = None
        self._owner_np = None
        self._planes: tuple[ReservedPlanes, ReservedPlanes] | None = None  # on a CPU: k's and v's
        self._tables: torch.Tensor | None = None  # [2, reserved slots]: slot_pos and slot_owner are views of it
        self.used = 0
        self.peak = 0
        self.high_water = 0
        self.version = 0  # changes whenever a chunk's slots change (set_owner, claim, release): tables rebuild
        self.expected = 0  # tokens announced ahead (`reserve`): the next growth goes straight there
        # Free slots below high_water as maximal runs: their sorted starts and each one's length.
        self._hole_starts: list[int] = []
        self._hole_len: dict[int, int] = {}

    @property
    def capacity(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    @property
    def free(self) -> int | None:
        return None if self.budget is None else self.budget - self.used

    @property
    def dense(self) -> bool:
        """True when every slot below high water is in use (no mask needed for holes)."""
        return self.used == self.high_water

    def bytes_per_token(self) -> int:
        if self.k is None:
            return 0
        b, h, _, d = self.k.shape
        return 2 * b * h * d * self.k.element_size()

    @property
    def allocated_bytes(self) -> int:
        """Bytes the arena holds (capacity, used or not)."""
        return 0 if self.k is None else self.capacity * self.bytes_per_token()

    def init_shape(self, batch: int, heads: int, head_dim: int) -> None:
        if self.k is None:
            self._resize(batch, heads, head_dim, 0)
            if self.expected:
                try:
                    self.reserve(self.expected)
                except CacheMemoryError as exc:  # announced before the shape was known: a hint, not a need
                    warnings.warn(f"{exc}; the arena grows as tokens arrive instead", stacklevel=2)

    def reserve(self, n: int) -> None:
        """Announce that about `n` slots will be in use: grow once to hold them (capped by the budget), so
        reaching them copies nothing more. Before the first write (shape unknown) the growth happens then."""
        previous = self.expected
        self.expected = max(self.expected, n)
        if self.budget is not None:
            n = min(n, self.budget)
        if self.k is not None and n > self.capacity:
            try:
                self._grow(n)
            except CacheMemoryError:
                self.expected = previous  # an announcement the device cannot hold is not kept
                raise

    def _grow(self, needed: int) -> None:
        """Resize to `needed` slots plus headroom (or to what was announced, if more), within the budget.
        Where the memory is not there, try less (the announcement dropped, then no headroom): only `needed`
        itself failing raises CacheMemoryError."""
        b, h, _, d = self.k.shape
        sizes = [_with_headroom(max(needed, self.expected)), _with_headroom(needed)]
        if self.budget is not None:
            sizes = [min(n, self.budget) for n in sizes]
        for size in dict.fromkeys([max(n, needed) for n in sizes] + [needed]):
            try:
                self._resize(b, h, d, size)
                return
            except CacheMemoryError:
                if size == needed:
                    raise
                self.expected = min(self.expected, needed)

    def _resize(self, batch: int, heads: int, head_dim: int, capacity: int) -> None:
        """The arena with `capacity` slots; CacheMemoryError (nothing changed) where the memory is not there."""
        what = f"a layer's arena of {capacity} tokens"
        in_place = self._planes is not None and self._planes[0].slots >= capacity
        # the old arena lives on until the copy is done: the new one must fit beside it (growing in place
        # commits only the new slots)
        new_slots = capacity - self.capacity if in_place else capacity
        check_fits(self.device, new_slots * (2 * batch * heads * head_dim * self.dtype.itemsize + 16), what,
                   "reserve fewer tokens, or set device_budget")
        with allocation_errors(self.device, what), storage_mode():
            self._resize_no_grad(batch, heads, head_dim, capacity, in_place)

    def _resize_no_grad(self, batch: int, heads: int, head_dim: int, capacity: int, in_place: bool) -> None:
        # Slots below high water are copied, the rest zeroed (never left uninitialised: a slot masked out of
        # attention still meets a zero weight, and 0 * NaN would be NaN); no memset of what the copy covers,
        # which halves the cost of a growth while decoding. Every tensor is made before any is kept.
        # On a CPU the planes are reserved `_RESERVE` times wider than the capacity (`ReservedPlanes`), and the
        # slot tables as wide: while they hold the new capacity the arena grows by widening its views (`_widen`),
        # with no copy (into fresh pages a copy ran at ~1 GB/s: about one more pass over the KV per growth).
        if in_place:
            self._widen(capacity)
            return
        planes = None
        if self.device.type == "cpu" and capacity:
            reserve = capacity * _RESERVE if self.budget is None else max(capacity, min(capacity * _RESERVE,
                                                                                         self.budget))
            pk = ReservedPlanes.create(batch, heads, reserve, head_dim, self.dtype)
            pv = None if pk is None else ReservedPlanes.create(batch, heads, reserve, head_dim, self.dtype)
            planes = None if pv is None else (pk, pv)
        if planes is not None:
            for plane in planes:
                plane.commit(0, capacity)
            k, v = planes[0].tensor[:, :, :capacity], planes[1].tensor[:, :, :capacity]
        else:
            k = torch.empty(batch, heads, capacity, head_dim, dtype=self.dtype, device=self.device)
            v = torch.empty_like(k)
        # positions and owners, one row each, as wide as the planes' reservation (every slot free: -1)
        tables = torch.full((2, planes[0].slots if planes else capacity), -1, dtype=torch.long, device=self.device)
        pos, owner = tables[0, :capacity], tables[1, :capacity]
        n = self.high_water if self.k is not None else 0
        if n:
            k[:, :, :n] = self.k[:, :, :n]
            v[:, :, :n] = self.v[:, :, :n]
            pos[:n] = self.slot_pos[:n]
            owner[:n] = self.slot_owner[:n]
        if planes is None:
            k[:, :, n:] = 0
            v[:, :, n:] = 0
        self.k, self.v, self.slot_pos, self.slot_owner, self._planes, self._tables = k, v, pos, owner, planes, tables
        cpu = pos.device.type == "cpu"
        self._pos_np, self._owner_np = (tables[0].numpy(), tables[1].numpy()) if cpu else (None, None)

    def _widen(self, capacity: int) -> None:
        """Grow within the CPU reservation: commit the new slots' memory and widen the views of the planes and
        the slot tables. Nothing is copied and nothing new is made: a decode step that grows the arena pays
        one commit per plane and a few views."""
        n, old = self.high_water, self.capacity
        for plane in self._planes:
            plane.commit(old, capacity)
        self.k, self.v = (plane.tensor[:, :, :capacity] for plane in self._planes)
        # Past the old capacity nothing was ever written (zeros, free); free slots below it are cleared.
        self.k[:, :, n:old] = 0
        self.v[:, :, n:old] = 0
        self._tables[:, n:old] = -1
        self.slot_pos, self.slot_owner = self._tables[0, :capacity], self._tables[1, :capacity]

    def allocate(self, n: int, after: int | None = None) -> torch.Tensor | None:
        """Reserve `n` slots: right after slot `after` if they are free there (a growing recent window stays
        one run of slots), else the lowest run of holes that holds them all, else the lowest holes and then
        fresh slots above high water; None if that would exceed the budget. The slot list is on the CPU."""
        if self.budget is not None and self.used + n > self.budget:
            return None
        if not any(length >= n for length in self._hole_len.values()):  # grow first: a failure changes nothing
            self._grow_for(n)
        if after is not None and self._take_after(after, n):
            return torch.arange(after + 1, after + 1 + n, dtype=torch.long)
        self.used += n
        self.peak = max(self.peak, self.used)
        for start in self._hole_starts:  # the lowest run that fits: one run of slots
            if self._hole_len[start] >= n:
                self._take_holes(start, n)
                return torch.arange(start, start + n, dtype=torch.long)
        runs = []
        need = n
        while need and self._hole_starts:  # the lowest holes, run by run
            start = self._hole_starts[0]
            got = min(need, self._hole_len[start])
            self._take_holes(start, got)
            runs.append(torch.arange(start, start + got, dtype=torch.long))
            need -= got
        if need:
            first = self.high_water
            self.high_water += need
            runs.append(torch.arange(first, first + need, dtype=torch.long))
        return runs[0] if len(runs) == 1 else torch.cat(runs)

    def allocate_run(self, n: int) -> torch.Tensor | None:
        """`n` slots in one run, where a run of holes holds them or no hole is left (fresh slots above high
        water); None, with nothing taken, where they would land in pieces or exceed the budget."""
        if self._hole_len and not any(length >= n for length in self._hole_len.values()):
            return None
        return self.allocate(n)

    def allocate_each(self, lengths: list[int]) -> list[torch.Tensor] | None:
        """Slots for several chunks at once, a list for each (as `allocate` gives them: the lowest run of holes
        that holds the chunk, else the lowest holes and fresh slots), so that each chunk lands in one run where
        the holes allow, not split across the holes a group would take. The arena grows at most once.
        None, with nothing taken, if the total would exceed the budget."""
        total = sum(lengths)
        if self.budget is not None and self.used + total > self.budget:
            return None
        self._grow_for(total)
        return [self.allocate(n) for n in lengths]

    def _grow_for(self, n: int) -> None:
        """Grow so that `n` slots fit in the holes and above high water, before any is taken."""
        fresh = n - sum(self._hole_len.values())
        if fresh > 0 and self.high_water + fresh > self.capacity:
            self._grow(self.high_water + fresh)

    def allocate_after(self, after: int) -> int | None:
        """One slot, right after slot `after`, if it is free and the budget and capacity hold it: a decode
        token extending the recent window without a slot list; None otherwise (then `allocate` decides)."""
        if self.budget is not None and self.used >= self.budget:
            return None
        return after + 1 if self._take_after(after, 1) else None

    def _take_after(self, after: int, n: int) -> bool:
        """Take slots after+1 .. after+n if they are free (a run of holes, or high water with room)."""
        start = after + 1
        if self._hole_len.get(start, 0) >= n:
            self._take_holes(start, n)
        elif start == self.high_water and start + n <= self.capacity:
            self.high_water += n
        else:
            return False
        self.used += n
        self.peak = max(self.peak, self.used)
        return True

    def _take_holes(self, start: int, n: int) -> None:
        """Use the first `n` slots of the run of holes at `start`."""
        length = self._hole_len.pop(start)
        i = bisect.bisect_left(self._hole_starts, start)
        if length > n:
            self._hole_starts[i] = start + n
            self._hole_len[start + n] = length - n
        else:
            del self._hole_starts[i]

    def release(self, slots: torch.Tensor) -> None:
        """Return slots to the pool (their data is dropped)."""
        if slots.numel() == 0:
            return
        self.version += 1
        run = _as_run(slots)
        if run is not None:
            self._set_pos(run, -1)
            self._add_holes(run.start, run.stop - run.start)
        else:  # a chunk in pieces: each run of its sorted slots becomes a hole
            idx = np.sort(slots.reshape(-1).cpu().numpy())
            if self._pos_np is not None:
                self._pos_np[idx] = -1
            else:
                with storage_mode():
                    self.slot_pos[slots] = -1
            for _, run in _runs_of(idx):
                self._add_holes(run.start, run.stop - run.start)
        self.used -= slots.numel()
        # Pull the high-water mark down past trailing holes so attention spans fewer slots.
        if self._hole_starts:
            last = self._hole_starts[-1]
            if last + self._hole_len[last] == self.high_water:
                self.high_water = last
                del self._hole_len[last]
                self._hole_starts.pop()

    def _add_holes(self, start: int, n: int) -> None:
        """Mark slots [start, start + n) free, merged with the runs of holes beside them."""
        i = bisect.bisect_left(self._hole_starts, start)
        if i < len(self._hole_starts) and self._hole_starts[i] == start + n:  # joins the next run
            n += self._hole_len.pop(self._hole_starts.pop(i))
        if i and (prev := self._hole_starts[i - 1]) + self._hole_len[prev] == start:  # joins the previous run
            self._hole_len[prev] += n
            return
        self._hole_starts.insert(i, start)
        self._hole_len[start] = n

    def write(
        self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
        owner: int | torch.Tensor = -1,
    ) -> None:
        """k, v: [batch, heads, n, head_dim]; positions: [n] logical positions; owner: chunk row of every slot
        (-1: the recent window) or of each slot ([n])."""
        run = _as_run(slots)
        if run is not None:  # one run of slots: plain copies into views, no index kernels (a decode token)
            self.k[:, :, run].copy_(k.detach())  # detached: never a graph, in or out of inference mode
            self.v[:, :, run].copy_(v.detach())
        else:
            with storage_mode():
                k = k.detach().to(self.device, self.dtype)
                v = v.detach().to(self.device, self.dtype)
                # On a CPU, row copies in C (2.5-3.3x faster than index_copy_ there); else the index kernel.
                if not (native.scatter_rows(self.k, slots, k) and native.scatter_rows(self.v, slots, v)):
                    slots = slots.to(self.device)
                    self.k.index_copy_(2, slots, k)
                    self.v.index_copy_(2, slots, v)
        self._claim(slots, run, positions, owner)

    def write_token(self, slot: int, k: torch.Tensor, v: torch.Tensor, position: int) -> None:
        """One token (k, v [batch, heads, 1, head_dim]) of the recent window into `slot`: a decode step's write,
        with plain ints for the slot and position (no slot list to build or read back)."""
        self.k.narrow(2, slot, 1).copy_(k.detach())  # narrow: a third of a slice's cost in Python
        self.v.narrow(2, slot, 1).copy_(v.detach())
        self._set_pos(slot, position)
        self._set_owner(slot, -1)

    def _set_pos(self, where: int | slice, position: int) -> None:
        """slot_pos[where] = position, through its numpy view on a CPU."""
        if self._pos_np is not None:
            self._pos_np[where] = position
        else:
            self.slot_pos[where] = position

    def _set_owner(self, where: int | slice, owner: int) -> None:
        """slot_owner[where] = owner, through its numpy view on a CPU."""
        if self._owner_np is not None:
            self._owner_np[where] = owner
        else:
            self.slot_owner[where] = owner

    def claim(self, slots: torch.Tensor, positions: torch.Tensor, owner: int | torch.Tensor = -1) -> None:
        """Record the logical position ([n]) and owner (chunk row, one or [n]; -1: the recent window) of slots
        whose k and v are in place (decoded straight into `k`, `v` by the caller)."""
        self._claim(slots, _as_run(slots), positions, owner)

    def _claim(self, slots: torch.Tensor, run: slice | None, positions: torch.Tensor,
               owner: int | torch.Tensor) -> None:
        if not isinstance(owner, int) or owner >= 0:
            self.version += 1  # a chunk's slots changed: tables over them rebuild
        if run is not None:
            self.slot_pos[run].copy_(positions)
            if isinstance(owner, int):
                self._set_owner(run, owner)
            else:
                self.slot_owner[run].copy_(owner)
            return
        with storage_mode():
            self.slot_pos[slots] = positions.to(self.device)
            self.slot_owner[slots] = owner if isinstance(owner, int) else owner.to(self.device)

    def set_owner(self, slots: torch.Tensor, owner: int) -> None:
        self.version += 1
        run = _as_run(slots)
        if run is not None:  # a chunk's usual case: a plain fill of a view, no storage-mode guard needed
            self._set_owner(run, owner)
            return
        with storage_mode():
            self.slot_owner[slots] = owner

    def read(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the slots' k and v ([B, H, n, D]): a sliced memcpy for one run of slots (a chunk's usual
        case, ~10x faster than an indexed gather on CPU), else `index_select` along the slots (whole rows of
        head_dim at a time: 3.5-4x faster than advanced indexing on a CPU for a 64-slot chunk in pieces)."""
        run = _as_run(slots)
        if run is not None:
            return self.k[:, :, run].clone(), self.v[:, :, run].clone()
        slots = slots.to(self.device)
        return self.k.index_select(2, slots), self.v.index_select(2, slots)

    def view(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The used prefix of the arena: k, v [B, H, high_water, D] and slot positions [high_water]."""
        n = self.high_water
        return self.k.narrow(2, 0, n), self.v.narrow(2, 0, n), self.slot_pos.narrow(0, 0, n)

    def owners(self) -> torch.Tensor:
        """Chunk row owning each slot below high water ([high_water]; -1: recent window or free)."""
        return self.slot_owner[: self.high_water]

    def select_rows(self, index: torch.Tensor) -> None:
        """Reorder/select/repeat batch rows (`new[i] = old[index[i]]`); data moves, slots stay."""
        if self.k is not None:
            with storage_mode():
                index = index.to(self.device)
                self.k = self.k.index_select(0, index)
                self.v = self.v.index_select(0, index)
                self._planes = None  # the new arena is exactly its capacity: the next growth copies

    def clear(self) -> None:
        self.k = self.v = self.slot_pos = self.slot_owner = self._pos_np = self._owner_np = None
        self._planes = self._tables = None
        self.used = self.high_water = self.expected = 0
        self.version += 1
        self._hole_starts.clear()
        self._hole_len.clear()


class HostPool:
    """Chunks of one layer held in CPU memory (pinned when a CUDA device is the compute device)."""

    def __init__(self, budget: int | None, pin: bool):
        self.budget = budget
        self.pin = pin
        self.data: OrderedDict[int, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.used = 0
        self.peak = 0
        self.nbytes = 0

    def fits(self, n: int) -> bool:
        return self.budget is None or self.used + n <= self.budget

    def put(self, chunk_id: int, k: torch.Tensor, v: torch.Tensor) -> bool:
        """Keep a chunk's tensors; False when they would exceed the budget."""
        n = k.shape[2]
        if not self.fits(n):
            return False
        with storage_mode():
            k, v = self._to_host(k), self._to_host(v)
        self.data[chunk_id] = (k, v)
        self.used += n
        self.nbytes += k.nbytes + v.nbytes
        self.peak = max(self.peak, self.used)
        return True

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        """A host copy the pool owns; called under `storage_mode` (a span's move turns it in place later)."""
        t = t.detach()
        if t.device.type == "cpu":
            t = t.contiguous()
            # a view of a larger buffer would keep all of it alive; an inference tensor (a forward pass under
            # torch.inference_mode, as kvtier.prefill runs) could not be turned in place outside that mode
            if t.untyped_storage().nbytes() != t.nbytes or t.is_inference():
                t = t.clone()
            if self.pin and not t.is_pinned():
                t = t.pin_memory()
            return t
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=self.pin)
        out.copy_(t)  # synchronous: the device slots are reused right after
        return out

    def get(self, chunk_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data[chunk_id]

    def pop(self, chunk_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.data.pop(chunk_id)
        self.used -= k.shape[2]
        self.nbytes -= k.nbytes + v.nbytes
        return k, v

    def replace(self, chunk_id: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Swap a chunk's tensors for ones of the same length (e.g. after a batch reorder)."""
        old_k, old_v = self.data[chunk_id]
        with storage_mode():
            k, v = self._to_host(k), self._to_host(v)
        self.nbytes += k.nbytes + v.nbytes - old_k.nbytes - old_v.nbytes
        self.data[chunk_id] = (k, v)

    def clear(self) -> None:
        self.data.clear()
        self.used = self.nbytes = 0
