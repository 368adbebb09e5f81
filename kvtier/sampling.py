"""Choosing the next token from logits, as transformers' `generate` does, for kvtier's own decoding loops
(`kvtier.hogwild.generate`, `kvtier.tim.generate`): greedy, or sampling with temperature, top-k and top-p."""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .errors import brief, not_utf8


_SHIFT_BELOW = 1e-2  # temperatures below which the logits are shifted to a maximum of 0 first; above, the bits
# are those of transformers' temperature warper (the same softmax once normalised)


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
        check_sampling(do_sample, temperature, top_p, top_k, seed)
        generator = torch.Generator(device=device).manual_seed(seed) if do_sample and seed is not None else None
        return cls(bool(do_sample), float(temperature), top_k, float(top_p), generator)

    def __call__(self, logits: torch.Tensor) -> list[int]:
        """One token per row of logits [R, V]."""
        if not self.do_sample:
            return logits.argmax(-1).tolist()
        x = logits.float()
        if self.temperature < _SHIFT_BELOW:  # logits / 1e-39 overflow to inf (softmax: NaN); less the max, to -inf
            x = x - x.amax(-1, keepdim=True)
        x = x / self.temperature
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


def integer_dtype(t: torch.Tensor) -> bool:
    """Whether a tensor's values can be token ids (not bool, floating point or complex)."""
    return not (t.dtype == torch.bool or t.dtype.is_floating_point or t.dtype.is_complex)


def id_outside(ids: torch.Tensor, vocab: int | None) -> int | None:
    """Of a non-empty integer tensor of ids: its smallest id if negative, else its largest if at or past `vocab`
    (None: no bound); None when every id is one the model can embed. Runs at every forward pass: one read of the
    two extremes (on a GPU, one wait for the device instead of two; on a CPU through numpy, whose reductions
    over a decode step's few ids cost a tenth of torch's)."""
    if ids.device.type == "cpu":
        arr = ids.detach().numpy()
        low, high = int(arr.min()), int(arr.max())
    else:
        low, high = torch.stack((ids.min(), ids.max())).tolist()
    if low < 0:
        return low
    return high if vocab is not None and high >= vocab else None


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_sampling(do_sample: bool, temperature: float, top_p: float, top_k: int, seed: int | None = None) -> None:
    """ValueError naming the argument and its allowed range."""
    if not isinstance(do_sample, bool):
        raise ValueError(f"do_sample must be True or False, got {brief(do_sample)}")
    if do_sample and not (_is_number(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0 when sampling, got {brief(temperature)}")
    if not (_is_number(temperature) and temperature >= 0):  # unused when greedy, but never meaningful
        raise ValueError(f"temperature must be a finite number >= 0, got {brief(temperature)}")
    if not (_is_number(top_p) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {brief(top_p)}")
    if not is_int(top_k) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0: no top-k), got {brief(top_k)}")
    if seed is not None and (not is_int(seed) or not -(2**63) <= seed < 2**64):
        raise ValueError(f"seed must be None or an int in [-2**63, 2**64), got {brief(seed)}")


def check_tokenizer(tokenizer: object) -> None:
    """The runtimes' tokenizer: something that tokenizes when called and decodes (a None failed deep inside)."""
    if not (callable(tokenizer) and callable(getattr(tokenizer, "decode", None))):
        raise TypeError(f"tokenizer must be the model's tokenizer (AutoTokenizer.from_pretrained(...)), got "
                        f"{type(tokenizer).__name__}")


def check_text(name: str, text: object) -> None:
    """The runtimes' problem text: a str (bytes were called empty) of UTF-8 (lone surrogates failed in the
    tokenizer)."""
    if not isinstance(text, str):
        raise ValueError(f"{name} must be text (a str), got {type(text).__name__}")
    problem = not_utf8(text)
    if problem is not None:
        raise ValueError(f"{name} is not UTF-8 text ({problem})")


def vocab_size(model: torch.nn.Module) -> int | None:
    """How many token ids `model` can embed (None when it does not say)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return getattr(embeddings, "num_embeddings", None)


def check_token(token: object, vocab: int | None, what: str) -> int:
    """`token` (an int, or anything integer that `operator.index` takes: a numpy integer, a one-element integer
    tensor) as an int id the model can embed; ValueError naming `what` otherwise."""
    try:
        tid = None if isinstance(token, bool) or getattr(token, "dtype", None) == torch.bool else operator.index(token)
    except TypeError:
        tid = None
    if tid is None or tid < 0 or (vocab is not None and tid >= vocab):
        allowed = f"[0, {vocab})" if vocab is not None else ">= 0"
        raise ValueError(f"{what} must be a token id (an int in {allowed}), got {brief(token)}")
    return tid


def eos_ids(model: torch.nn.Module, tokenizer, given: int | Sequence[int] | None) -> set[int]:
    """The tokens that end generation: `given`, else the model's generation config's, else the tokenizer's.
    A given id outside the model's vocabulary would never be sampled: ValueError."""
    if given is None:
        config = getattr(model, "generation_config", None)
        given = getattr(config, "eos_token_id", None)
        if given is None:
            given = getattr(tokenizer, "eos_token_id", None)
        if given is None:
            return set()
        return {int(given)} if isinstance(given, int) else {int(t) for t in given}
    vocab = vocab_size(model)
    if hasattr(given, "tolist") and getattr(given, "ndim", 2) <= 1:  # a numpy or torch scalar, or a 1-d array of ids
        given = given.tolist()
    if is_int(given):
        return {check_token(given, vocab, "eos_token_id")}
    if isinstance(given, (str, bytes)) or not isinstance(given, Sequence):
        raise ValueError(f"eos_token_id must be a token id, a list of them, [] for none, or None, got {brief(given)}")
    return {check_token(t, vocab, "each eos_token_id") for t in given}
