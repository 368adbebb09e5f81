"""The prefetcher's batching: every chunk a request issues is announced to the store at once (`warm`, on a
reader thread) before any of their loads starts, so a store with a slow source (a server) fetches them in one
round trip; loads still run, back-pressure still holds, and a failing warm-up fails no load. Small chunks are
loaded in parts (one task, one transaction) and a bad record fails only its own chunk."""

from __future__ import annotations

import threading

import torch

import pytest

from kvtier.store.chunk import Chunk, Tier
from kvtier.store.prefetch import Prefetcher


def chunks(n: int, length: int = 4) -> list[Chunk]:
    return [Chunk(0, i, i * length, length, Tier.DISK, 1) for i in range(n)]


class Recorder:
    """A store's view of the reads: the order of warm-ups and loads, from any thread."""

    def __init__(self, warm_fails: bool = False):
        self.events: list[tuple[str, tuple[int, ...]]] = []
        self.lock = threading.Lock()
        self.warm_fails = warm_fails
        self.bad: set[int] = set()  # chunk ids whose record fails to load

    def warm(self, batch: list[Chunk]) -> None:
        with self.lock:
            self.events.append(("warm", tuple(c.chunk_id for c in batch)))
        if self.warm_fails:
            raise ConnectionError("the source went away")

    def load(self, part: list[Chunk]) -> list:
        with self.lock:
            self.events.append(("load", tuple(c.chunk_id for c in part)))
        return [ValueError(f"chunk {c.chunk_id} is damaged") if c.chunk_id in self.bad
                else (torch.full((1,), float(c.chunk_id)), torch.zeros(1)) for c in part]


def test_a_request_warms_its_whole_batch_before_any_load():
    rec = Recorder()
    pf = Prefetcher(rec.load, threads=2, max_tokens=1000, warm=rec.warm)
    cs = chunks(6)
    assert pf.request(cs + cs[:2], clock=0) == 6  # repeated chunks are issued once
    got = [pf.take(c)[0].item() for c in cs]
    pf.close()
    assert got == [float(i) for i in range(6)]
    assert rec.events[0] == ("warm", tuple(range(6)))
    assert sorted(e for e in rec.events[1:]) == [("load", (i,)) for i in range(6)]


def test_back_pressure_limits_the_batch_and_a_later_request_warms_only_what_it_issues():
    rec = Recorder()
    pf = Prefetcher(rec.load, threads=1, max_tokens=12, warm=rec.warm)
    cs = chunks(5)
    assert pf.request(cs, clock=0) == 3
    assert pf.pending(cs[2]) and not pf.pending(cs[3])
    assert pf.request(cs, clock=0) == 0  # nothing fits until staged chunks are taken
    for c in cs[:3]:
        pf.take(c)
    assert pf.request(cs[3:], clock=1) == 2
    for c in cs[3:]:
        pf.take(c)
    pf.close()
    assert [e for e in rec.events if e[0] == "warm"] == [("warm", (0, 1, 2)), ("warm", (3, 4))]


def test_a_failed_warm_up_fails_no_load():
    rec = Recorder(warm_fails=True)
    pf = Prefetcher(rec.load, threads=2, max_tokens=1000, warm=rec.warm)
    cs = chunks(3)
    pf.request(cs, clock=0)
    assert [pf.take(c)[0].item() for c in cs] == [0.0, 1.0, 2.0]
    pf.close()


def test_small_chunks_load_in_parts_and_a_bad_record_fails_only_its_chunk():
    rec = Recorder()
    rec.bad = {2}
    pf = Prefetcher(rec.load, threads=2, max_tokens=1000, part_tokens=12)
    cs = chunks(7)  # 4 tokens each: parts of 3 chunks
    assert pf.request(cs, clock=0) == 7
    got = []
    for c in cs:
        try:
            got.append(pf.take(c)[0].item())
        except ValueError as exc:
            got.append(str(exc))
    pf.close()
    assert got == [0.0, 1.0, "chunk 2 is damaged", 3.0, 4.0, 5.0, 6.0]
    assert sorted(rec.events) == [("load", (0, 1, 2)), ("load", (3, 4, 5)), ("load", (6,))]
    assert pf.staged_tokens == 0 and pf.stats.hits == 7


def test_load_now_raises_its_records_error_and_a_discarded_part_is_let_go():
    rec = Recorder()
    rec.bad = {1}
    pf = Prefetcher(rec.load, threads=1, max_tokens=1000, part_tokens=8)
    with pytest.raises(ValueError, match="chunk 1 is damaged"):
        pf.load_now(chunks(2)[1])
    cs = chunks(4)
    pf.request(cs, clock=0)  # parts (0, 1) and (2, 3)
    for c in cs[:2]:
        pf.discard(c)
    pf.discard(cs[2])
    assert not pf.pending(cs[2]) and pf.pending(cs[3]) and pf.staged_tokens == 4
    assert pf.take(cs[3])[0].item() == 3.0
    assert pf.take(cs[2]) is None  # discarded: read again by whoever needs it
    pf.close()
    assert pf.staged_tokens == 0
