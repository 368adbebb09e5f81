"""Where every block sits in each worker's view: plain integer bookkeeping, the same for every layer.

Hogwild! Inference (arXiv 2504.06261) gives each of N workers its own ordered view of one shared cache::

    worker w:  | history | others' header | step 0 | .. | step N-1 (all but w) | own header | step w |
               0         H                                                                    ^ w's next token

Every block's keys are stored once, rotated at block-local positions 0..len-1 (the history's at 0..H-1), so
a view costs no key rotation: attention turns the query instead, to its distance from each block's first key
(`qrel`, what `kvtier.kernels.block_decode_attention` takes). Every block is in every view, so all views have
the same length; only the order of the blocks after the others' header differs.

The headers and the steps live in one device arena per layer, block b in rows start[b] .. start[b] + cap[b]::

    | others' header | own header | step 0 (cap) | step 1 (cap) | ... | step N-1 (cap) |

Headers are sized exactly (prefilled once); steps share one capacity that doubles when a step outgrows it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

OTHERS, OWN = 0, 1  # arena blocks of the two headers; worker w's current step is block STEP0 + w
STEP0 = 2
MAX_WORKERS = 1024  # each worker's view holds every other worker's step: a step's attention grows as workers**2


class Target(enum.Enum):
    """Which block a forward pass writes its new tokens to."""

    HISTORY = "history"  # batch 1: the prompt (or any shared text) appended to the history
    OTHERS_HEADER = "others header"  # batch 1: the header read before the other workers' steps
    OWN_HEADER = "own header"  # batch 1: the header read before a worker's own step
    STEPS = "steps"  # batch N: one row per worker, each appended to its own current step


@dataclass(frozen=True, slots=True)
class Rows:
    """One forward pass's query rows, row r = (batch row b, token i) at r = b * Q + i.

    q_pos: the position each new token's q and k are rotated at (block-local; absolute for the history);
    view_pos: its position in its worker's view (= relative to the history's first key);
    qrel: per row and arena block, view_pos minus the block's first view position, -1 for an empty block;
    slots: arena rows the new keys are written to (empty for the history)."""

    target: Target
    batch: int
    q_len: int
    q_pos: list[int]
    view_pos: list[int]
    qrel: list[list[int]]
    slots: list[int]


@dataclass
class Layout:
    """Block lengths and arena regions of a cache of `workers` current steps."""

    workers: int
    step_capacity: int = 64
    history: int = 0
    lengths: list[int] = field(default_factory=list)  # arena blocks: [others' header, own header, step 0 .. N-1]
    caps: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, got {self.workers}")
        if self.step_capacity < 1:
            raise ValueError(f"step_capacity must be at least 1, got {self.step_capacity}")
        if not self.lengths:
            self.lengths = [0] * (STEP0 + self.workers)
            self.caps = [0, 0] + [self.step_capacity] * self.workers

    @property
    def blocks(self) -> int:
        return STEP0 + self.workers

    @property
    def starts(self) -> list[int]:
        """First arena row of each block."""
        out, at = [], 0
        for cap in self.caps:
            out.append(at)
            at += cap
        return out

    @property
    def arena_size(self) -> int:
        return sum(self.caps)

    @property
    def total(self) -> int:
        """Tokens in every worker's view (all views hold every block)."""
        return self.history + sum(self.lengths)

    def step_len(self, worker: int) -> int:
        return self.lengths[STEP0 + worker]

    def view_order(self, worker: int) -> list[int]:
        """Arena blocks in worker's view, after the history: others' header, the other workers' steps in
        worker order, own header, own step."""
        others = [STEP0 + m for m in range(self.workers) if m != worker]
        return [OTHERS, *others, OWN, STEP0 + worker]

    def view_starts(self, worker: int) -> list[int]:
        """Where each arena block begins in worker's view (indexed by arena block)."""
        starts = [0] * self.blocks
        at = self.history
        for b in self.view_order(worker):
            starts[b] = at
            at += self.lengths[b]
        return starts

    # ------------------------------------------------------------------------------------ changes
    def set_headers(self, others: int, own: int) -> None:
        """Make room for new headers (their tokens are written by the next forward passes)."""
        if any(self.lengths[STEP0:]):
            raise ValueError("headers can only be set while every worker's current step is empty")
        self.lengths[OTHERS] = self.lengths[OWN] = 0
        self.caps[OTHERS], self.caps[OWN] = others, own

    def write(self, target: Target, batch: int, q_len: int) -> Rows:
        """Grow the target block(s) by q_len tokens per batch row and return the rows of that forward pass."""
        if target is Target.STEPS:
            if batch != self.workers:
                raise ValueError(f"a step feeds one row per worker ({self.workers}), got a batch of {batch}")
        elif batch != 1:
            raise ValueError(f"writing the {target.value} takes a batch of 1, got {batch}")
        if target is Target.HISTORY:
            h = self.history
            self.history += q_len
            pos = list(range(h, h + q_len))
            return Rows(target, 1, q_len, pos, pos, [[-1] * self.blocks for _ in pos], [])
        if target is Target.STEPS:
            before = [self.step_len(w) for w in range(self.workers)]
            need = max(before) + q_len
            if need > self.caps[STEP0]:
                cap = self.caps[STEP0]
                while cap < need:
                    cap *= 2
                self.caps[STEP0:] = [cap] * self.workers
            for w in range(self.workers):
                self.lengths[STEP0 + w] += q_len
            owners = [(w, STEP0 + w, before[w]) for w in range(self.workers)]
        else:
            b = OTHERS if target is Target.OTHERS_HEADER else OWN
            if self.lengths[b] + q_len > self.caps[b]:
                raise ValueError(f"the {target.value} was set to {self.caps[b]} tokens; this forward pass would "
                                 f"make it {self.lengths[b] + q_len}")
            owners = [(0, b, self.lengths[b])]  # headers are read as in worker 0's view, where every step is empty
            self.lengths[b] += q_len
        starts = self.starts
        q_pos, view_pos, qrel, slots = [], [], [], []
        for worker, block, old in owners:
            vstart = self.view_starts(worker)
            for i in range(q_len):
                p = vstart[block] + old + i
                q_pos.append(old + i)
                view_pos.append(p)
                qrel.append([p - vstart[c] if self.lengths[c] else -1 for c in range(self.blocks)])
                slots.append(starts[block] + old + i)
        return Rows(target, batch, q_len, q_pos, view_pos, qrel, slots)

    def clear_step(self, worker: int) -> int:
        """Empty worker's current step (after it joined the history); returns its former length."""
        n = self.step_len(worker)
        self.lengths[STEP0 + worker] = 0
        self.history += n
        return n
