"""The tier manager: places sealed chunks and moves them device -> host -> disk and back.

Placement always tries the fastest tier first and makes room by evicting downwards; nothing is ever
dropped, only moved (a chunk leaves the cache only when the cache frees it). Reads for attention promote
a chunk upwards only into free room, so a steady state never thrashes.

Row maps: a device copy is in the cache's logical batch order (batch reorders move it); a host copy and
a disk record keep the order they were written in, and `Chunk.rows` / `Chunk.disk_rows` map logical
rows onto them, so a beam-search reorder never rewrites data below the device.
"""

from __future__ import annotations

import copy
import secrets
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..config import KVTierConfig
from ..errors import StoreCorruptError, StoreFullError, StoreMissingRecordError
from .backend import RecordStore
from .chunk import MAX_CHUNK_ID, TABLE_NAMES, Chunk, Tier, chunk_key, group_positions, token_groups
from .codec import FLAG_INT8, SESSION_ID_BYTES, RecordCodec, RecordHeader, byte_view
from .eviction import LRUEviction
from .pools import DevicePool, HostPool, _as_run, _runs_of, storage_mode
from .prefetch import Prefetcher
from .stats import CacheStats

if TYPE_CHECKING:
    from ..rope import Rope


def _apply_rows(t: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return t if rows is None else t.index_select(0, rows.to(t.device))


# Most bytes of KV one prefetch task reads and decodes (see kvtier/store/prefetch.py): large enough that a
# task's own cost is small beside its decoding, small enough to spread a request over the reader threads.
PREFETCH_PART_BYTES = 256 * 1024


def _place(pieces: list[tuple[int, torch.Tensor, torch.Tensor]], k_out: torch.Tensor, v_out: torch.Tensor) -> None:
    """Copy pieces (first token, k, v [B, H, n, D]) into k_out, v_out: each run of adjacent pieces on the
    destination's device by one `torch.cat` into place (one copy per small chunk costs more than its bytes)."""
    i = 0
    while i < len(pieces):
        a, k, v = pieces[i]
        end, j = a + k.shape[2], i + 1
        if k.device == k_out.device:
            while j < len(pieces) and pieces[j][0] == end and pieces[j][1].device == k_out.device:
                end += pieces[j][1].shape[2]
                j += 1
        if j == i + 1:
            k_out[:, :, a:end].copy_(k)
            v_out[:, :, a:end].copy_(v)
        else:
            torch.cat([p[1] for p in pieces[i:j]], dim=2, out=k_out[:, :, a:end])
            torch.cat([p[2] for p in pieces[i:j]], dim=2, out=v_out[:, :, a:end])
        i = j


def _run_owners(chunks: list[Chunk], device: torch.device) -> torch.Tensor:
    """Each token's chunk row for consecutive chunks, made on `device` by one arange per run of equal-length
    chunks with consecutive rows (a list uploaded to a GPU would make the CPU wait for it)."""
    parts, i = [], 0
    while i < len(chunks):
        length, row, j = chunks[i].length, chunks[i].row, i + 1
        while j < len(chunks) and chunks[j].length == length and chunks[j].row == row + j - i:
            j += 1
        parts.append(torch.arange((j - i) * length, device=device) // length + row)
        i = j
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _group_owners(chunks: list[Chunk], device: torch.device) -> torch.Tensor:
    """Each token's chunk row for chunks of any lengths end to end (a group brought up from below), in a few
    numpy operations whatever the number of chunks."""
    lengths = np.fromiter((c.length for c in chunks), np.int64, len(chunks))
    return torch.from_numpy(np.repeat(np.fromiter((c.row for c in chunks), np.int64, len(chunks)), lengths)).to(device)


def _positions(chunk: Chunk, device: torch.device) -> torch.Tensor:
    return torch.arange(chunk.start, chunk.end, device=device)


class TierManager:
    """Owns the per-layer device and host pools, the shared disk store, and the accounting of all three."""

    def __init__(
        self,
        config: KVTierConfig,
        tiered_layers: Iterable[int],
        device: torch.device,
        dtype: torch.dtype,
        signature: bytes,
        disk_factory: Callable[[], RecordStore],
        kv_shape: tuple[int, int],
    ):
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype
        self.signature = signature
        self.kv_heads, self.head_dim = kv_shape
        self.session_id = secrets.token_bytes(SESSION_ID_BYTES)  # names every record this cache writes
        pin = self.device.type == "cuda"
        layers = list(tiered_layers)
        self.device_pools = {i: DevicePool(config.device_budget, self.device, dtype) for i in layers}
        self.host_pools = {i: HostPool(config.host_budget, pin) for i in layers}
        self._on_device: dict[int, dict[int, Chunk]] = {i: {} for i in layers}
        self._on_host: dict[int, dict[int, Chunk]] = {i: {} for i in layers}
        self.codec = RecordCodec(config.zstd_level, config.byte_planes)
        self.policy = LRUEviction()
        self._disk: RecordStore | None = None
        self._disk_factory = disk_factory
        self.record_sizes: dict[bytes, tuple[int, int, int]] = {}  # key -> (tokens, raw bytes, stored bytes)
        self.counters = CacheStats()
        self.clock = 0  # forward passes seen; chunks remember when they were last read
        self.next_chunk_id = 0
        from ..sparse.select import make_selector

        self.selector = make_selector(config.selector, config.shared_selection)
        threads = config.reader_threads if config.prefetch else 0
        token_bytes = 2 * self.kv_heads * self.head_dim * dtype.itemsize
        self.prefetcher = Prefetcher(self._load_records, threads, config.prefetch_tokens, warm=self._warm_records,
                                     part_tokens=max(1, PREFETCH_PART_BYTES // token_bytes))
        self.layers: list = []  # the tiered layers in model order (set by the cache), for next-layer prefetch
        self.lookahead = None  # kvtier.sparse.lookahead.Lookahead when the cache can guess next-layer queries
        self.ropes: dict[int, "Rope"] = {}  # layer -> its RoPE, once a chunk of it can have moved (remove_span)
        self._side_stream = None  # CUDA stream for host -> device copies ahead of need
        self._uploads: dict[int, tuple] = {}  # layer -> (event, tensors kept alive until the copy is done)
        self._staging: tuple[torch.Tensor, torch.Tensor] | None = None  # reused by every streamed group
        self._host_staging: tuple[torch.Tensor, torch.Tensor] | None = None  # groups decoded for the device

    def staging(self, batch: int, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v buffers [batch, kv_heads, n, head_dim] that streamed chunks are copied into for one attention
        call. One pair, grown when needed and reused by every group and layer, so streaming allocates (and
        faults in) no new memory per group."""
        buf = self._staging
        if (buf is None or buf[0].shape[0] != batch or buf[0].shape[2] < n or buf[0].device != device):
            shape = (batch, self.kv_heads, max(n, buf[0].shape[2] if buf is not None else 0), self.head_dim)
            with storage_mode():
                buf = (torch.empty(shape, dtype=self.dtype, device=device),
                       torch.empty(shape, dtype=self.dtype, device=device))
            self._staging = buf
        return buf[0][:, :, :n], buf[1][:, :, :n]

    def new_chunk_id(self) -> int:
        if self.next_chunk_id > MAX_CHUNK_ID:  # only a reopened manifest's next_chunk_id can bring it here
            raise StoreCorruptError(f"the session's chunk ids are used up (next_chunk_id {self.next_chunk_id}, the "
                                    f"last is {MAX_CHUNK_ID}): the manifest it was reopened from is damaged")
        self.next_chunk_id += 1
        return self.next_chunk_id - 1

    # --------------------------------------------------------------------------------------- disk
    @property
    def disk(self) -> RecordStore:
        if self._disk is None:
            self._disk = self._disk_factory()
        return self._disk

    @property
    def has_disk(self) -> bool:
        return self._disk is not None

    def write_records(self, items: list[tuple[Chunk, torch.Tensor, torch.Tensor]]) -> None:
        """Encode chunks (k, v in the chunk's stored row order) and write them in one transaction."""
        if not items:
            return
        blobs, sizes = [], []
        for chunk, k, v in items:
            b, h, n, d = k.shape
            header = RecordHeader(chunk.layer, chunk.chunk_id, chunk.start, n, b, h, d, k.dtype, self.signature,
                                  self.session_id)
            lossy = self._lossy(chunk)
            blob = self.codec.encode(header, k, v, lossy=lossy)
            blobs.append((chunk.key, blob))
            sizes.append((b, lossy, (n, k.nbytes + v.nbytes, len(blob))))
        self.disk.put_many(blobs)  # may raise StoreFullError: then nothing below has changed
        for (chunk, _, _), (b, lossy, size) in zip(items, sizes):
            chunk.on_disk, chunk.stored_batch, chunk.lossy, chunk.writer = True, b, lossy, self.session_id
            chunk.record_start = chunk.start
            self.record_sizes[chunk.key] = size
            self.counters.disk.bytes_written += size[2]

    def _lossy(self, chunk: Chunk) -> bool:
        """Opt-in: chunks that got little attention at prefill are stored as int8 on disk."""
        cfg = self.config
        return cfg.lossy_disk and chunk.importance is not None and chunk.importance < cfg.lossy_below

    def read_record(self, chunk: Chunk) -> tuple[torch.Tensor, torch.Tensor]:
        """The chunk's disk record in stored row order (CPU tensors), counted as a disk read."""
        k, v = self._load_record(chunk)
        self.counters.disk.bytes_read += self.record_sizes[chunk.key][2]
        return self.to_logical(chunk, k), v

    def to_logical(self, chunk: Chunk, k: torch.Tensor) -> torch.Tensor:
        """Keys read from the chunk's disk record, turned to the chunk's current positions (see
        `Chunk.record_shift`); unchanged when it never moved."""
        shift = chunk.record_shift
        if shift == 0:
            return k
        rope = self.ropes.get(chunk.layer)
        if rope is None:  # remove_span and load set it before any chunk can move; keep the invariant loud
            raise RuntimeError(f"{chunk.name()} moved {shift} positions but the cache has no RoPE to turn its keys")
        return rope.shift(k, shift)

    def _where(self) -> str:
        return f"kvtier store {self.disk.where}: "

    def expected_header(self, chunk: Chunk) -> RecordHeader:
        """What the chunk's record must say about itself: its session, place, shape, dtype and encoding."""
        start = chunk.start if chunk.record_start is None else chunk.record_start
        return RecordHeader(chunk.layer, chunk.chunk_id, start, chunk.length, chunk.stored_batch,
                            self.kv_heads, self.head_dim, self.dtype, self.signature, chunk.writer,
                            flags=FLAG_INT8 if chunk.lossy else 0)

    def _warm_records(self, chunks: list[Chunk]) -> None:
        """Tell the store which records are read next (a server-backed store fetches them in one batch)."""
        if chunks:
            self.disk.warm([chunk.key for chunk in chunks])

    def _load_record(self, chunk: Chunk, record: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Read, check and decode one record. Thread-safe (reader threads call it, record=False); counts nothing."""
        blob = self._present(chunk, self.disk.get(chunk.key))
        k, v = self.codec.decode(blob, self.expected_header(chunk), self._where())
        self._check_size(chunk, len(blob), record)
        return k, v

    def _load_records(self, chunks: list[Chunk]) -> list[tuple[torch.Tensor, torch.Tensor] | Exception]:
        """Read, check and decode some records in one read transaction: for each chunk its k, v (stored row
        order) or the error its record raised. Records of one batch size are decoded into one pair of buffers
        and handed out as views of it (half the Python of a tensor pair per record). Thread-safe (reader
        threads call it); counts nothing."""
        batch = chunks[0].stored_batch
        if len(chunks) == 1 or any(c.stored_batch != batch for c in chunks):
            return [self._load_or_error(c) for c in chunks]
        shape = (batch, self.kv_heads, sum(c.length for c in chunks), self.head_dim)
        with storage_mode():
            k, v = torch.empty(shape, dtype=self.dtype), torch.empty(shape, dtype=self.dtype)
        k_bytes, v_bytes = byte_view(k), byte_view(v)
        loaded: list[tuple[torch.Tensor, torch.Tensor] | Exception] = []
        at = 0
        with self.disk.viewing() as get:
            for chunk in chunks:
                a, at = at, at + chunk.length
                try:
                    self._decode_pieces(get, chunk, [(0, k_bytes[:, :, a:at], v_bytes[:, :, a:at])], record=False)
                    loaded.append((k[:, :, a:at], v[:, :, a:at]))
                except Exception as exc:  # noqa: BLE001 - this chunk's read failed; the caller re-raises it
                    loaded.append(exc)
        return loaded

    def _load_or_error(self, chunk: Chunk) -> tuple[torch.Tensor, torch.Tensor] | Exception:
        try:
            return self._load_record(chunk, record=False)
        except Exception as exc:  # noqa: BLE001 - this chunk's read failed; the caller re-raises it
            return exc

    def _present(self, chunk: Chunk, blob: bytes | memoryview | None) -> bytes | memoryview:
        if blob is None:
            raise StoreMissingRecordError(f"{chunk.name()}: record missing from store {self.disk.where}")
        return blob

    def _check_size(self, chunk: Chunk, stored: int, record: bool = True) -> None:
        """A decoded record must have the size the session recorded for it (the first read records it).

        record=False (reader threads, which never write the cache's bookkeeping): compared only when known. A
        chunk read ahead has a known size (written by this cache, or listed by the session it opened) unless it
        was freed while its part was decoded: recording it then would count a dropped record again."""
        if not record:
            known = self.record_sizes.get(chunk.key)
            if known is None:
                return
        else:
            raw = 2 * chunk.stored_batch * chunk.length * self.kv_heads * self.head_dim * self.dtype.itemsize
            known = self.record_sizes.setdefault(chunk.key, (chunk.length, raw, stored))
        if known[2] != stored:
            raise StoreCorruptError(f"{self._where()}{chunk.name()}: record is {stored} bytes, the session "
                                    f"recorded {known[2]}")

    def read_abstracts(self, expect: RecordHeader) -> tuple[torch.Tensor, torch.Tensor]:
        """A layer's chunk or page abstracts (minima, maxima), which must be exactly the record `expect`
        describes."""
        name = f"layer {expect.layer}: {TABLE_NAMES[expect.chunk_id]}"
        blob = self.disk.get(chunk_key(expect.layer, expect.chunk_id))
        if blob is None:
            raise StoreMissingRecordError(f"{name} missing from store {self.disk.where}")
        kmin, kmax = self.codec.decode(blob, expect, self._where())
        if not bool((kmin <= kmax).all()):  # NaN fails too
            raise StoreCorruptError(f"{name} in store {self.disk.where} are damaged (a minimum above its maximum)")
        return kmin, kmax

    # ---------------------------------------------------------------------------------- placement
    def place(self, chunk: Chunk, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store a newly sealed chunk (k, v: [B, H, n, D] in logical row order) in the fastest tier with room."""
        chunk.rows = None
        slots = self.allocate_device(chunk.layer, chunk.length)
        if slots is not None:
            try:
                self._write_device(chunk, slots, k, v)
            except BaseException:
                self.device_pools[chunk.layer].release(slots)  # a failed write holds no slots
                raise
        else:
            self._to_host(chunk, k, v)

    def place_on_device(self, chunks: list[Chunk], k: torch.Tensor, v: torch.Tensor) -> bool:
        """Store consecutive new chunks of one layer (k, v: [B, H, n, D], their tokens end to end) in one run of
        device slots: one write and one owner table, not one of each per chunk (a prefill segment seals dozens
        per layer, and on a GPU each small write is a kernel launch). False, with nothing changed, when the
        device has no room for all of them without evicting: then `place` takes them one by one."""
        if not chunks:
            return True
        pool = self.device_pools[chunks[0].layer]
        n = k.shape[2]
        slots = pool.allocate(n)
        if slots is None:
            return False
        positions = torch.arange(chunks[0].start, chunks[0].start + n, device=pool.device)
        try:
            pool.write(slots, k, v, positions, _run_owners(chunks, pool.device))
        except BaseException:
            pool.release(slots)
            raise
        self.counters.device.bytes_written += k.nbytes + v.nbytes
        at = 0
        for chunk in chunks:
            chunk.rows = None
            self._register_device(chunk, slots[at:at + chunk.length])
            at += chunk.length
        return True

    def allocate_device(self, layer: int, n: int, protect: set[int] | frozenset[int] = frozenset(),
                        after: int | None = None) -> torch.Tensor | None:
        """Device slots for n tokens, evicting least recently used chunks (not in `protect`) to the host; right
        after slot `after` where they are free (`DevicePool.allocate`)."""
        pool = self.device_pools[layer]
        victims = self.policy.victims(self._on_device[layer].values(), protect)  # sorted at the first eviction only
        while (slots := pool.allocate(n, after)) is None:
            victim = next(victims, None)
            if victim is None:
                return None
            self.evict_from_device(victim)
        return slots

    def device_chunks(self, layer: int) -> Iterable[Chunk]:
        """The layer's chunks that hold device slots (in no particular order)."""
        return self._on_device[layer].values()

    def adopt_device(self, chunk: Chunk, slots: torch.Tensor) -> None:
        """Register a chunk whose tokens already sit in device slots (sealed from the recent window)."""
        self.device_pools[chunk.layer].set_owner(slots, chunk.row)
        self._register_device(chunk, slots)

    def _register_device(self, chunk: Chunk, slots: torch.Tensor) -> None:
        """The chunk's bookkeeping once its slots hold its tokens and name it as their owner."""
        chunk.tier, chunk.slots, chunk.rows = Tier.DEVICE, slots, None
        self._on_device[chunk.layer][chunk.chunk_id] = chunk

    def _write_device(self, chunk: Chunk, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        pool = self.device_pools[chunk.layer]
        pool.write(slots, k, v, _positions(chunk, pool.device), chunk.row)  # marks the owner too
        self.counters.device.bytes_written += k.nbytes + v.nbytes
        self._register_device(chunk, slots)

    def evict_from_device(self, chunk: Chunk) -> None:
        """Move a chunk one tier down. The copy below is made first: if it fails (a full store), the chunk
        stays on the device untouched.

        On a CPU device a chunk whose record is on disk is dropped, not copied, unless the host pool has free
        room for it: there the device and the host are the same memory, and the copy (displacing an older host
        chunk) only spares a decode of the record, from the page cache, if the chunk is read again before the
        host drops it. Measured at 32k tokens and a 5% budget, three in ten were, and the tiered step took
        34.6 ms with the copies, 29.5 ms without. On a GPU the copy down costs little beside decoding the record
        again, and the host keeps it."""
        pool = self.device_pools[chunk.layer]
        slots = chunk.slots
        if chunk.on_disk and self.device.type == "cpu" and not self.host_pools[chunk.layer].fits(chunk.length):
            self._to_disk(chunk, None, None)  # the record holds it already: nothing to write
        else:
            k, v = pool.read(slots)
            chunk.rows = None  # the device copy was in logical order
            self._to_host(chunk, k, v)
            self.counters.device.bytes_read += k.nbytes + v.nbytes
        pool.release(slots)
        del self._on_device[chunk.layer][chunk.chunk_id]
        chunk.slots = None

    def _to_host(self, chunk: Chunk, k: torch.Tensor, v: torch.Tensor) -> None:
        host = self.host_pools[chunk.layer]
        while not host.fits(chunk.length):
            victim = self.policy.victim(self._on_host[chunk.layer].values())
            if victim is None:
                break
            self.evict_from_host(victim)
        if host.put(chunk.chunk_id, k, v):
            chunk.tier = Tier.HOST
            self._on_host[chunk.layer][chunk.chunk_id] = chunk
            self.counters.host.bytes_written += k.nbytes + v.nbytes
        else:
            self._to_disk(chunk, k.cpu(), v.cpu())

    def evict_from_host(self, chunk: Chunk) -> None:
        """Move a host chunk to disk; the host copy is dropped only once the record is written."""
        k, v = self.host_pools[chunk.layer].get(chunk.chunk_id)
        self._to_disk(chunk, k, v)
        self.host_pools[chunk.layer].pop(chunk.chunk_id)
        del self._on_host[chunk.layer][chunk.chunk_id]
        self.counters.host.bytes_read += k.nbytes + v.nbytes

    def _to_disk(self, chunk: Chunk, k: torch.Tensor | None, v: torch.Tensor | None) -> None:
        """Leave the chunk on disk only, writing its record first if it has none (then k, v are needed)."""
        if not chunk.on_disk:
            self.write_records([(chunk, k, v)])
            chunk.disk_rows = chunk.rows
        chunk.rows = None
        chunk.tier = Tier.DISK

    def persist(self, chunks: Iterable[Chunk]) -> None:
        """Give every chunk a disk record (one transaction) and keep it past this cache's lifetime."""
        items = []
        for chunk in chunks:
            if not chunk.on_disk:
                if chunk.tier == Tier.DEVICE:
                    k, v = self.device_pools[chunk.layer].read(chunk.slots)
                    items.append((chunk, k.cpu(), v.cpu(), None))
                else:
                    k, v = self.host_pools[chunk.layer].get(chunk.chunk_id)
                    items.append((chunk, k, v, chunk.rows))
            chunk.persisted = True
        self.write_records([(c, k, v) for c, k, v, _ in items])
        for chunk, _, _, rows in items:
            chunk.disk_rows = rows

    # -------------------------------------------------------------------------------------- reads
    def fetch(self, chunk: Chunk) -> tuple[torch.Tensor, torch.Tensor]:
        """The chunk's k, v on the compute device in logical row order, wherever it lives."""
        c = self.counters
        if chunk.tier == Tier.DEVICE:
            c.device.hits += 1
            return self.device_pools[chunk.layer].read(chunk.slots)
        c.device.misses += 1
        if chunk.tier == Tier.HOST:
            c.host.hits += 1
            k, v = self.host_pools[chunk.layer].get(chunk.chunk_id)
            k, v = _apply_rows(k, chunk.rows), _apply_rows(v, chunk.rows)
            c.host.bytes_read += k.nbytes + v.nbytes
        else:
            c.host.misses += 1
            c.disk.hits += 1
            kv = self.prefetcher.take(chunk)
            if kv is None:
                kv = self.prefetcher.load_now(chunk)
                c.disk_loads_sync += 1
            k, v = kv
            c.disk.bytes_read += self.record_sizes[chunk.key][2]
            k, v = self.to_logical(chunk, _apply_rows(k, chunk.disk_rows)), _apply_rows(v, chunk.disk_rows)
        chunk.last_used = self.clock
        n = k.nbytes + v.nbytes
        if self.device.type != "cpu":
            k, v = k.to(self.device, non_blocking=True), v.to(self.device, non_blocking=True)
        c.device.bytes_written += n
        return k, v

    def read_into(self, chunks: list[Chunk], k_out: torch.Tensor, v_out: torch.Tensor) -> None:
        """The chunks' k, v in logical row order, one after another in k_out, v_out [B, H, N, D] (N: their total
        length), wherever they live, counted as `fetch` counts each chunk.

        The disk records are read in one transaction, as views of the mapped file (no copy per record), each
        checked as `fetch` checks it, and decoded straight into place when the destination is on the CPU; for
        a device destination the group is decoded into a host buffer and copied over once."""
        if k_out.device.type != "cpu":
            hk, hv = self._host_buffer(k_out.shape[0], k_out.shape[2])
            self.read_into(chunks, hk, hv)
            k_out.copy_(hk)  # synchronous: the host buffer is reused by the next group
            v_out.copy_(hv)
            return
        starts, at = [], 0
        for chunk in chunks:
            starts.append(at)
            at += chunk.length
        pieces, direct = self._sources(chunks, k_out.shape[0])
        _place([(starts[i], k, v) for i, k, v in pieces], k_out, v_out)
        if direct:
            kb, vb = byte_view(k_out), byte_view(v_out)  # sliced per chunk: a numpy slice costs a tenth of a view
            self._decode_direct([(chunks[i], [(0, kb[:, :, starts[i]:starts[i] + chunks[i].length],
                                               vb[:, :, starts[i]:starts[i] + chunks[i].length])]) for i in direct])

    def read_each(self, chunks: list[Chunk], dests: list[list[tuple[int, np.ndarray, np.ndarray]]]) -> None:
        """As `read_into`, each chunk into its own CPU destinations: pieces (first token in the chunk, k_bytes,
        v_bytes: `byte_view`s of [B, H, n, D] destinations of any strides, such as runs of a device arena's
        slots) that together hold it. Nothing passes through an intermediate buffer."""
        pieces, direct = self._sources(chunks, dests[0][0][1].shape[0] if dests else 0)
        for i, k, v in pieces:
            kb, vb = byte_view(k), byte_view(v)
            for a, kd, vd in dests[i]:
                np.copyto(kd, kb[:, :, a:a + kd.shape[2]])
                np.copyto(vd, vb[:, :, a:a + vd.shape[2]])
        self._decode_direct([(chunks[i], dests[i]) for i in direct])

    def _sources(self, chunks: list[Chunk], batch: int
                 ) -> tuple[list[tuple[int, torch.Tensor, torch.Tensor]], list[int]]:
        """Where each chunk's k, v come from, counted as `fetch` counts them: (index, k, v) in logical row order
        for those held on the device or host or read ahead, and the indices of the disk records to decode
        straight into place (`_decode_direct`)."""
        c, prefetcher = self.counters, self.prefetcher
        token_bytes = 2 * batch * self.kv_heads * self.head_dim * self.dtype.itemsize
        pieces: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        direct: list[int] = []
        for i, chunk in enumerate(chunks):
            chunk.last_used = self.clock
            if chunk.tier == Tier.DEVICE:
                c.device.hits += 1
                pieces.append((i, *self.device_pools[chunk.layer].read(chunk.slots)))
                continue
            c.device.misses += 1
            c.device.bytes_written += chunk.length * token_bytes
            if chunk.tier == Tier.HOST:
                c.host.hits += 1
                k, v = self.host_pools[chunk.layer].get(chunk.chunk_id)
                pieces.append((i, _apply_rows(k, chunk.rows), _apply_rows(v, chunk.rows)))
                c.host.bytes_read += chunk.length * token_bytes
                continue
            c.host.misses += 1
            c.disk.hits += 1
            kv = prefetcher.take(chunk)  # a read started ahead
            if kv is None and chunk.disk_rows is None and chunk.stored_batch == batch:  # the usual case
                direct.append(i)
                continue
            if kv is None:
                kv = prefetcher.load_now(chunk)
                c.disk_loads_sync += 1
            pieces.append((i, self.to_logical(chunk, _apply_rows(kv[0], chunk.disk_rows)),
                           _apply_rows(kv[1], chunk.disk_rows)))
            c.disk.bytes_read += self.record_sizes[chunk.key][2]
        return pieces, direct

    def _decode_direct(self, items: list[tuple[Chunk, list[tuple[int, np.ndarray, np.ndarray]]]]) -> None:
        """Read the chunks' records in one transaction and decode each straight into its CPU destinations
        (pieces: first token in the chunk, k_bytes, v_bytes: `byte_view`s of [B, H, n, D]), counted as
        synchronous disk loads, the time as a stall. One thread: a reader thread taking half of a group was
        measured no faster on 2 cores (the copies are bound by memory bandwidth) and slower for small records."""
        if not items:
            return
        t = time.perf_counter()
        self.disk.warm([chunk.key for chunk, _ in items])
        where = self._where()
        with self.disk.viewing() as get:
            for chunk, pieces in items:
                self._decode_pieces(get, chunk, pieces, where=where)
        for chunk, pieces in items:
            if chunk.record_shift:
                for _, kb, _ in pieces:
                    k = torch.from_numpy(kb).view(self.dtype)
                    k.copy_(self.to_logical(chunk, k))
        self.prefetcher.stats.stall_s += time.perf_counter() - t
        self.counters.disk_loads_sync += len(items)
        self.counters.disk.bytes_read += sum(self.record_sizes[chunk.key][2] for chunk, _ in items)

    def _decode_pieces(self, get: Callable[[bytes], memoryview | None], chunk: Chunk,
                       pieces: list[tuple[int, np.ndarray, np.ndarray]], record: bool = True,
                       where: str | None = None) -> None:
        """One record, read through a `viewing` transaction's `get`, checked and decoded into pieces (first
        token in the chunk, k_bytes, v_bytes: uint8 arrays [B, H, n, D * itemsize]) that together hold it.
        where: `_where()`, when the caller reads many records."""
        blob = self._present(chunk, get(chunk.key))
        self.codec.decode_into(blob, self.expected_header(chunk), pieces, self._where() if where is None else where)
        self._check_size(chunk, len(blob), record)

    def _host_buffer(self, batch: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [batch, kv_heads, n, head_dim] in host memory (pinned for a CUDA device) that a group bound for
        the device is decoded into; one pair, grown when needed (groups hold at most `staging_tokens`)."""
        buf = self._host_staging
        if buf is None or buf[0].shape[0] != batch or buf[0].shape[2] < n:
            shape = (batch, self.kv_heads, max(n, buf[0].shape[2] if buf is not None else 0), self.head_dim)
            pin = self.device.type == "cuda"
            with storage_mode():
                buf = (torch.empty(shape, dtype=self.dtype, pin_memory=pin),
                       torch.empty(shape, dtype=self.dtype, pin_memory=pin))
            self._host_staging = buf
        return buf[0][:, :, :n], buf[1][:, :, :n]

    def promote_into_free_room(self, layer: int, chunks: list[Chunk]) -> list[Chunk]:
        """Bring host and disk chunks of one layer into its free device room (nothing is evicted for them) and
        return, in order, those that found none.

        Group by group of at most `staging_tokens` tokens: one slot allocation, the group's records read in one
        transaction and decoded straight into a run of arena slots (on a CPU device; on a GPU, one copy per group
        from a host buffer), and one write of the slots' positions and owners."""
        pool = self.device_pools[layer]
        if pool.k is None:  # the arena's shape is not known before the layer's first write
            return [c for c in chunks if c.tier != Tier.DEVICE]
        free = pool.free
        fit, rest = [], []
        for chunk in chunks:
            if chunk.tier == Tier.DEVICE:
                continue
            if free is None or chunk.length <= free:
                fit.append(chunk)
                free = None if free is None else free - chunk.length
            else:
                rest.append(chunk)
        for group in token_groups(fit, self.config.staging_tokens):
            self._promote_group(layer, group)
        return rest

    def keep_staged(self, group: list[Chunk], k: torch.Tensor, v: torch.Tensor) -> None:
        """After a group was read into the staging buffers k, v [B, H, n, D] (reused by the next group): keep a
        copy of each chunk where free room allows, as `promote` does (the device, else the host for a chunk
        that is only on disk), so that the next step finds it higher up."""
        at = 0
        for chunk in group:
            n = chunk.length
            host_room = chunk.tier == Tier.DISK and self.host_pools[chunk.layer].fits(n)
            if host_room or self.device_has_room(chunk.layer, n):
                self.promote(chunk, k[:, :, at:at + n].clone(), v[:, :, at:at + n].clone())
            at += n

    def _promote_group(self, layer: int, group: list[Chunk]) -> None:
        pool = self.device_pools[layer]
        run = pool.allocate_run(sum(c.length for c in group))  # fresh room after a reopen: the whole group
        each = pool.allocate_each([c.length for c in group]) if run is None else None  # holes: chunk by chunk
        if run is None and each is None:  # the caller counted the free room: unreachable; never write without slots
            raise RuntimeError(f"layer {layer}: no device room for the tokens the free room was counted for")
        try:
            if run is not None:
                self._read_to_run(pool, group, run)
            elif pool.device.type == "cpu":
                self._read_to_slots(pool, group, each)
            else:
                self._upload_to_slots(pool, group, torch.cat(each))
        except BaseException:
            for slots in [run] if run is not None else each:
                pool.release(slots)  # a damaged record: the group stays where it was, its slots free again
            raise
        if run is not None:
            each = list(run.split([c.length for c in group]))
        host, on_host = self.host_pools[layer], self._on_host[layer]
        for chunk, slots in zip(group, each):
            if chunk.tier == Tier.HOST:
                host.pop(chunk.chunk_id)
                del on_host[chunk.chunk_id]
            self._register_device(chunk, slots)

    def _read_to_run(self, pool: DevicePool, group: list[Chunk], slots: torch.Tensor) -> None:
        """The group into one run of slots, its chunks end to end: one read into the arena's view (decoded in
        place on a CPU; one copy from the host buffer on a GPU), one write of the slots' positions and owners."""
        run = _as_run(slots)
        self.read_into(group, pool.k[:, :, run], pool.v[:, :, run])
        pool.claim(slots, group_positions(group, pool.device), _group_owners(group, pool.device))

    def _read_to_slots(self, pool: DevicePool, group: list[Chunk], each: list[torch.Tensor]) -> None:
        """CPU arena: each chunk read straight into its slots, run by run (one copy, or one check and copy of
        its record, per chunk: nothing passes through a buffer), then the group's slot positions and owners in
        one indexed write (a write per chunk cost ~20 us each)."""
        kb, vb = byte_view(pool.k), byte_view(pool.v)
        dests = [[(a, kb[:, :, run], vb[:, :, run]) for a, run in _runs_of(slots.numpy())] for slots in each]
        self.read_each(group, dests)
        pool.claim(torch.cat(each), group_positions(group, pool.device), _group_owners(group, pool.device))

    def _upload_to_slots(self, pool: DevicePool, group: list[Chunk], slots: torch.Tensor) -> None:
        """GPU arena, chunks in holes: the group decoded into the host buffer and written into its slots by one
        indexed write, each slot's position and owner with it."""
        k, v = self._host_buffer(pool.k.shape[0], slots.numel())
        self.read_into(group, k, v)
        pool.write(slots, k, v, group_positions(group, pool.device), _group_owners(group, pool.device))

    def layer_kv(self, layer) -> tuple[torch.Tensor, torch.Tensor]:
        """Every stored token of a tiered layer in position order: k, v [B, Hkv, length, D] (copies; for
        tests, benchmarks and debugging, not the decode path)."""
        parts = [self.fetch(c) for c in layer.chunks]
        if layer.win_slots.numel():
            parts.append(self.device_pools[layer.index].read(layer.win_slots))
        return torch.cat([p[0] for p in parts], dim=2), torch.cat([p[1] for p in parts], dim=2)

    def make_resident(self, layer: int, needed: list[Chunk]) -> list[tuple[Chunk, torch.Tensor, torch.Tensor]]:
        """Bring every needed chunk to the device, evicting chunks not needed now; return (chunk, k, v) of
        those that cannot fit (staged copies, attended from there).

        Room for all of them is made first (least recently used chunks outside `needed` move down), then they
        come up in groups as a reopen's do (`promote_into_free_room`: disk records decoded straight into arena
        slots, no intermediate copy); what still finds no room is fetched and staged one by one."""
        protect = {c.chunk_id for c in needed}
        missing = [c for c in needed if c.tier != Tier.DEVICE]
        self.counters.device.hits += len(needed) - len(missing)
        if not missing:
            return []
        self._warm_records([c for c in missing if c.tier == Tier.DISK and not self.prefetcher.pending(c)])
        self._make_room(layer, sum(c.length for c in missing), protect)
        staged = []
        for chunk in self.promote_into_free_room(layer, missing):
            k, v = self.fetch(chunk)
            if not self.promote(chunk, k, v, protect=protect):
                staged.append((chunk, k, v))
        return staged

    def _make_room(self, layer: int, n: int, protect: set[int]) -> None:
        """Evict least recently used device chunks outside `protect` until `n` tokens fit (or none is left)."""
        pool = self.device_pools[layer]
        victims = self.policy.victims(self._on_device[layer].values(), protect)  # sorted at the first eviction only
        while pool.free is not None and pool.free < n:
            victim = next(victims, None)
            if victim is None:
                return
            self.evict_from_device(victim)

    def prefetch_next(self, layer) -> None:
        """While `layer` computes, start reading what the next tiered layer attended to last step (and
        what this layer staged): attention moves slowly from step to step."""
        if not self.layers:
            return
        i = self.layers.index(layer)
        nxt = self.layers[(i + 1) % len(self.layers)]
        if layer.wholly_on_device and nxt.wholly_on_device:
            self.prefetcher.request((), self.clock)  # (drops reads gone stale, if any)
            return
        wanted = [c for c in nxt.last_union if c.tier == Tier.DISK]
        wanted += [c for c in layer.last_union if c.tier == Tier.DISK]
        self.prefetcher.request(wanted, self.clock)
        if self.device.type == "cuda" and nxt is not layer:
            self._upload_ahead(nxt.index, [c for c in nxt.last_union if c.tier == Tier.HOST], nxt.last_union)

    def _upload_ahead(self, layer: int, chunks: list[Chunk], keep: list[Chunk]) -> None:
        """CUDA: copy host chunks the next layer will likely need into its device pool on a side stream,
        overlapping the current layer's compute. The next layer waits for the copies (`wait_uploads`)."""
        if not chunks:
            return
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(self.device)
        protect = {c.chunk_id for c in keep}
        pool, host = self.device_pools[layer], self.host_pools[layer]
        in_flight = []
        for chunk in chunks:
            slots = self.allocate_device(layer, chunk.length, protect)
            if slots is None:
                break
            hk, hv = host.pop(chunk.chunk_id)
            del self._on_host[layer][chunk.chunk_id]
            # The slots may have just been freed by an eviction whose read is still queued on the compute stream.
            self._side_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._side_stream):
                k = _apply_rows(hk.to(self.device, non_blocking=True), chunk.rows)
                v = _apply_rows(hv.to(self.device, non_blocking=True), chunk.rows)
                pool.write(slots, k, v, _positions(chunk, pool.device), chunk.row)
            in_flight.append((hk, hv, k, v))  # keep sources alive until the copies are done
            chunk.rows = None
            self.adopt_device(chunk, slots)
            self.counters.host.bytes_read += hk.nbytes + hv.nbytes
            self.counters.device.bytes_written += hk.nbytes + hv.nbytes
        event = torch.cuda.Event()
        event.record(self._side_stream)  # one stream: this event also covers earlier uploads for the layer
        earlier = self._uploads.get(layer, (None, []))[1]
        self._uploads[layer] = (event, earlier + in_flight)

    def wait_uploads(self, layer: int) -> None:
        """Make the compute stream wait for side-stream copies into this layer's pool."""
        item = self._uploads.pop(layer, None)
        if item is not None:
            torch.cuda.current_stream(self.device).wait_event(item[0])

    def promote(self, chunk: Chunk, k: torch.Tensor, v: torch.Tensor,
                protect: set[int] | None = None) -> bool:
        """Move a fetched chunk (k, v in logical order) onto the device: into free room only, or, with
        `protect` given, evicting least recently used chunks outside it. Failing that, a disk-only chunk
        moves into free host room. True if it ended on the device."""
        if chunk.tier == Tier.DEVICE:
            return True
        pool = self.device_pools[chunk.layer]
        if protect is None:
            slots = pool.allocate(chunk.length)
        else:
            slots = self.allocate_device(chunk.layer, chunk.length, protect)
        if slots is not None:
            if chunk.tier == Tier.HOST:
                self.host_pools[chunk.layer].pop(chunk.chunk_id)
                del self._on_host[chunk.layer][chunk.chunk_id]
            chunk.rows = None
            pool.write(slots, k, v, _positions(chunk, pool.device), chunk.row)  # marks the owner too
            self._register_device(chunk, slots)
            return True
        host = self.host_pools[chunk.layer]
        if chunk.tier == Tier.DISK and host.fits(chunk.length):
            host.put(chunk.chunk_id, k, v)
            chunk.tier, chunk.rows = Tier.HOST, None
            self._on_host[chunk.layer][chunk.chunk_id] = chunk
            self.counters.host.bytes_written += k.nbytes + v.nbytes
        return False

    def move(self, chunks: list[Chunk], delta: int) -> tuple[list[Chunk], torch.Tensor | None]:
        """Move chunks of one layer by delta positions (a span before them was removed). The device copies are
        turned all in one read, turn and write, into the lowest free slots (their owners: the chunks' current
        rows); host copies are turned in place; a disk record is left as written and turned when read
        (`to_logical`), so a move never reads the disk. Returns the device chunks and their turned keys end to
        end ([B, H, N, D]; None when there are none), for their abstracts. delta 0 only rewrites the device
        copies into the lowest free slots."""
        if not chunks:
            return [], None
        layer = chunks[0].layer
        rope = self.ropes[layer]
        on_device = [c for c in chunks if c.tier == Tier.DEVICE]
        for chunk in chunks:
            if chunk.tier == Tier.HOST and delta:
                k = self.host_pools[layer].get(chunk.chunk_id)[0]
                with storage_mode():
                    k.copy_(rope.shift(k, delta))  # in place: a pinned host copy stays pinned
            chunk.start += delta
        if not on_device:
            return [], None
        pool = self.device_pools[layer]
        slots = torch.cat([c.slots for c in on_device])  # on the CPU, as every slot list
        lengths = [c.length for c in on_device]
        owners = torch.repeat_interleave(torch.tensor([c.row for c in on_device]), torch.tensor(lengths))
        k, v = pool.read(slots)
        if delta:
            k = rope.shift(k, delta)
        positions = pool.slot_pos[slots] + delta
        # Written back into the lowest free slots (the removed span's among them), not in place: when they held the
        # top of the arena (the newest tokens follow the span) it stays dense, so attention over it needs no mask
        # for holes and spans no more slots than tokens.
        pool.release(slots)
        slots = pool.allocate(slots.numel())
        pool.write(slots, k, v, positions, owners.to(pool.device))
        for chunk, part in zip(on_device, slots.split(lengths)):
            self._register_device(chunk, part)
        return on_device, k

    def device_has_room(self, layer: int, n: int) -> bool:
        free = self.device_pools[layer].free
        return free is None or free >= n

    # ----------------------------------------------------------------------------------- lifetime
    def free(self, chunks: Iterable[Chunk]) -> None:
        """Drop chunks from every tier (disk records of a saved session stay)."""
        doomed = []
        for chunk in chunks:
            self.prefetcher.discard(chunk)
            if chunk.tier == Tier.DEVICE:
                if chunk.slots is not None:  # None: a new chunk whose placement failed (a full store) holds nothing
                    self.device_pools[chunk.layer].release(chunk.slots)
                self._on_device[chunk.layer].pop(chunk.chunk_id, None)
                chunk.slots = None
            elif chunk.tier == Tier.HOST:
                self.host_pools[chunk.layer].pop(chunk.chunk_id)
                del self._on_host[chunk.layer][chunk.chunk_id]
            if chunk.on_disk and not chunk.persisted:
                doomed.append(chunk.key)
                chunk.on_disk = False
        self.drop_records(doomed)

    def drop_records(self, keys: list[bytes]) -> None:
        """Delete records nothing refers to any more (freed chunks, what a previous save named and the new one
        does not). A full store can refuse even a deletion (LMDB writes the pages it changes to free pages
        first): the records then stay, harmless, as no manifest names them and chunk ids are never reused (a
        record written under one's key replaces it), and the next `open` drops them. Raising would leave the
        caller's change half made: a crop with some layers cut, a save committed but not synced."""
        if not keys:
            return
        for key in keys:
            self.record_sizes.pop(key, None)
        try:
            self.disk.remove_many(keys)
        except StoreFullError:
            self.counters.records_left += len(keys)

    def select_rows(self, layer: int, chunks: Iterable[Chunk], index: torch.Tensor) -> None:
        """Apply a batch reorder to one layer: device data moves, host/disk copies get a row map."""
        self.device_pools[layer].select_rows(index)
        for chunk in chunks:
            if chunk.tier == Tier.HOST:
                chunk.remap_rows(index)
            if chunk.on_disk:
                chunk.disk_rows = _compose(chunk.disk_rows, index)

    def stats(self) -> CacheStats:
        """A snapshot of the counters and pool sizes (a copy: safe to read while the cache goes on)."""
        s = copy.deepcopy(self.counters)
        p = self.prefetcher.stats
        s.prefetch_issued, s.prefetch_hits, s.prefetch_wasted, s.stall_s = p.issued, p.hits, p.wasted, p.stall_s
        devices, hosts = list(self.device_pools.values()), list(self.host_pools.values())
        sizes = list(self.record_sizes.values())  # one C-level copy: other threads may be adding records
        s.device.tokens = sum(p.used for p in devices)
        s.device.bytes = sum(p.used * p.bytes_per_token() for p in devices)
        s.device.budget_tokens = self.config.device_budget
        s.device.peak_tokens = max((p.peak for p in devices), default=0)
        s.host.tokens = sum(p.used for p in hosts)
        s.host.bytes = sum(p.nbytes for p in hosts)
        s.host.budget_tokens = self.config.host_budget
        s.host.peak_tokens = max((p.peak for p in hosts), default=0)
        s.disk.tokens = sum(n for n, _, _ in sizes)
        s.disk.raw_bytes = sum(raw for _, raw, _ in sizes)
        s.disk.bytes = sum(stored for _, _, stored in sizes)
        return s

    def clear(self) -> None:
        for pool in self.device_pools.values():
            pool.clear()
        for pool in self.host_pools.values():
            pool.clear()
        for d in (*self._on_device.values(), *self._on_host.values()):
            d.clear()
        self._staging = None

    def close(self) -> None:
        self.prefetcher.close()
        if self._disk is not None:
            self._disk.close()


def _compose(rows: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor:
    index = index.to("cpu", torch.long)
    return index.clone() if rows is None else rows[index]
