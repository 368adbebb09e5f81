"""The prefetcher's batching: every chunk a request issues is announced to the store at once (`warm`, on a
reader thread) before any of their loads starts, so a store with a slow source (a server) fetches them in one
round trip; loads still run, back-pressure still holds, and a failing warm-up fails no load."""

from __future__ import annotations

import threading

import torch

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

    def warm(self, batch: list[Chunk]) -> None:
        with self.lock:
            self.events.append(("warm", tuple(c.chunk_id for c in batch)))
        if self.warm_fails:
            raise ConnectionError("the source went away")

    def load(self, chunk: Chunk) -> tuple[torch.Tensor, torch.Tensor]:
        with self.lock:
            self.events.append(("load", (chunk.chunk_id,)))
        return torch.full((1,), float(chunk.chunk_id)), torch.zeros(1)


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
