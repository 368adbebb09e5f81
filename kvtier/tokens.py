"""The token ids a cache holds, so a saved session can tell whether a prompt is the one it was built from.

The cache sees only keys and values; the ids come from the model's forward (a hook `kvtier.enable`
installs records `input_ids` as each forward starts). A forward fed embeddings, or KV written into the
cache directly, leaves the ids unknown: the log says so rather than guess.
"""

from __future__ import annotations

import torch

from .errors import PromptMismatchError
from .sampling import integer_dtype


class TokenLog:
    """ids: [batch, n] long on the CPU, kept as parts and joined when read."""

    def __init__(self) -> None:
        self._parts: list[torch.Tensor] = []
        self.length = 0
        self.known = True

    def ids(self) -> torch.Tensor | None:
        if not self.known or not self._parts:
            return None
        if len(self._parts) > 1:
            self._parts = [torch.cat(self._parts, dim=1)]
        return self._parts[0]

    def record(self, ids: torch.Tensor | None, past: int) -> None:
        """A forward starts `past` tokens into the cache with these input ids ([B, Q]; None: embeddings)."""
        if not self.known:
            return
        if ids is None or ids.dim() != 2 or self.length < past:
            self.forget()
            return
        if ids.device.type != "cpu" or ids.dtype != torch.long:  # (a decode step's ids usually are already)
            ids = ids.to("cpu", torch.long)
        if past < self.length:  # a forward that never finished, or a crop: the log runs ahead of the KV
            self.truncate(past)
        rows = self._parts[0].shape[0] if self._parts else None  # no join per step: parts are joined when read
        if rows is not None and rows != ids.shape[0]:
            if rows != 1:
                self.forget()
                return
            self._parts = [self.ids().expand(ids.shape[0], -1).clone()]  # one prefix, many continuations
        self._parts.append(ids)
        self.length = past + ids.shape[1]

    def restore(self, ids: torch.Tensor | None, length: int) -> None:
        self._parts, self.length, self.known = ([] if ids is None else [ids]), length, ids is not None

    def checkpoint(self) -> tuple:
        """What `rollback` restores, in O(1) (one is taken per forward pass): the parts list only ever grows
        at its end while it is current, and is replaced (never changed) by anything else."""
        return self._parts, len(self._parts), self.length, self.known

    def rollback(self, mark: tuple) -> None:
        parts, n, self.length, self.known = mark
        self._parts = parts[:n]

    def forget(self) -> None:
        self._parts, self.length, self.known = [], 0, False

    def truncate(self, n: int) -> None:
        held = self.ids()
        if held is not None and n < self.length:
            self._parts, self.length = [held[:, :n]], n

    def remove(self, start: int, end: int) -> None:
        """Positions [start, end) left the cache (`remove_span`); later ids move left with their KV."""
        held = self.ids()
        if held is not None:
            self._parts = [torch.cat([held[:, :start], held[:, end:]], dim=1)]
        if self.known:
            self.length -= end - start

    def select_rows(self, index: torch.Tensor) -> None:
        held = self.ids()
        if held is not None:
            self._parts = [held.index_select(0, index.to("cpu", torch.long))]

    def reset(self) -> None:
        self._parts, self.length, self.known = [], 0, True


def check_prefix(held: torch.Tensor | None, prompt: torch.Tensor, n: int) -> None:
    """Raise PromptMismatchError unless `prompt` ([B, L] or [L]) starts with the `n` ids `held` ([B', n])."""
    if held is None:
        raise PromptMismatchError(
            "this cache does not know which token ids it holds (it was fed embeddings, or KV written directly), "
            "so the prompt cannot be checked against it"
        )
    try:
        prompt = torch.as_tensor(prompt)
    except (TypeError, ValueError, RuntimeError):
        raise PromptMismatchError(f"prompt ids must be an integer tensor [batch, length] (or [length]), got "
                                  f"{type(prompt).__name__}") from None
    if prompt.dim() == 1:
        prompt = prompt[None]
    if prompt.dim() != 2 or not integer_dtype(prompt):
        raise PromptMismatchError(f"prompt ids must be an integer tensor [batch, length], got {tuple(prompt.shape)}")
    if held.shape[0] not in (1, prompt.shape[0]):
        raise PromptMismatchError(f"the prompt has {prompt.shape[0]} rows, the session holds {held.shape[0]}")
    if prompt.shape[1] < n:
        raise PromptMismatchError(f"the prompt has {prompt.shape[1]} tokens, fewer than the {n} the session holds; "
                                  "a prompt must start with the session's tokens")
    held = held.expand(prompt.shape[0], -1)
    differ = (prompt[:, :n].to("cpu", torch.long) != held).nonzero()
    if differ.numel():
        row, pos = min(differ.tolist(), key=lambda rc: (rc[1], rc[0]))
        raise PromptMismatchError(
            f"the prompt differs from the session's tokens at position {pos} (row {row}): the session holds id "
            f"{int(held[row, pos])}, the prompt has {int(prompt[row, pos])}. It was built from another text; "
            "prefill this prompt into a new store"
        )
