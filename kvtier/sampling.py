"""Choosing the next token from logits, as transformers' `generate` does, for kvtier's own decoding loops
(`kvtier.hogwild.generate`, `kvtier.tim.generate`): greedy, or sampling with temperature, top-k and top-p."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    generator: torch.Generator | None = None  # reproducible sampling; None: torch's global generator

    @classmethod
    def from_options(cls, do_sample: bool, temperature: float, top_p: float, top_k: int, seed: int | None,
                     device: torch.device) -> Sampling:
        """Checked options (ValueError naming the argument); `seed` gives sampling a generator of its own."""
        check_sampling(do_sample, temperature, top_p, top_k)
        generator = torch.Generator(device=device).manual_seed(seed) if do_sample and seed is not None else None
        return cls(bool(do_sample), float(temperature), top_k, float(top_p), generator)

    def __call__(self, logits: torch.Tensor) -> list[int]:
        """One token per row of logits [R, V]."""
        if not self.do_sample:
            return logits.argmax(-1).tolist()
        x = logits.float() / self.temperature
        if self.top_k:
            kth = torch.topk(x, min(self.top_k, x.shape[-1]), dim=-1).values[:, -1:]
            x = x.masked_fill(x < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_x, order = x.sort(dim=-1, descending=True)
            probs = sorted_x.softmax(-1)
            drop = probs.cumsum(-1) - probs >= self.top_p  # mass before a token already reaches top_p
            x = x.scatter(-1, order, sorted_x.masked_fill(drop, float("-inf")))
        return torch.multinomial(x.softmax(-1), 1, generator=self.generator)[:, 0].tolist()


def is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_sampling(do_sample: bool, temperature: float, top_p: float, top_k: int) -> None:
    """ValueError naming the argument and its allowed range."""
    if do_sample and not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature!r}")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if not is_int(top_k) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0: no top-k), got {top_k!r}")


def eos_ids(model: torch.nn.Module, tokenizer, given: int | Sequence[int] | None) -> set[int]:
    """The tokens that end generation: `given`, else the model's generation config's, else the tokenizer's."""
    if given is None:
        config = getattr(model, "generation_config", None)
        given = getattr(config, "eos_token_id", None)
        if given is None:
            given = getattr(tokenizer, "eos_token_id", None)
    if given is None:
        return set()
    return {int(given)} if isinstance(given, int) else {int(t) for t in given}
