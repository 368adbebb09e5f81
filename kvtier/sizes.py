"""Budgets as sizes: "8GiB" of KV becomes tokens per layer for a given model; "64GiB" of store becomes bytes.

The command line and the API read sizes the same way: `KVTierCache.for_model` and `KVTierCache.open` turn a
`device_budget` or `host_budget` written as a string into tokens per layer for their model (`budgets_in_tokens`),
and `KVTierConfig` reads its byte options (`max_store_bytes`, `initial_map_bytes`) with `parse_size`.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any

import torch

from .config import TOKEN_BUDGETS
from .errors import brief
from .model_spec import FULL, ModelSpec

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def kv_bytes_per_token(spec: ModelSpec, dtype: torch.dtype | None = None, batch: int = 1) -> int:
    """Bytes of K and V one token takes in ONE full-attention layer."""
    itemsize = torch.empty((), dtype=dtype or spec.dtype).element_size()
    return 2 * batch * spec.kv_heads * spec.head_dim * itemsize


def _number_and_unit(text: str) -> tuple[Fraction, str] | None:
    """(exact number, lower-case unit) of "8192", "1.5GB", "64 GiB"; None for anything else. Exact: a long
    number of digits is read as written, never rounded through a float (or to infinity); one of more digits than
    Python converts (4300) is None too."""
    m = _SIZE.match(str(text))
    if not m or m.group(2).lower() not in _UNITS or (m.group(2) == "" and "." in m.group(1)):
        return None
    try:
        return Fraction(m.group(1)), m.group(2).lower()
    except ValueError:
        return None


def split_budget(text: str) -> tuple[Fraction, str]:
    """(number, lower-case unit) of a budget written as tokens ("8192", unit "") or a size ("8GiB").

    Checks the spelling only, so a command line can refuse a bad budget before it loads a model.
    """
    parsed = _number_and_unit(text)
    if parsed is None:
        raise ValueError(f"budget {brief(text)}: write a number of tokens (8192) or a size (8GiB, 512MB)")
    return parsed


def parse_budget(text: str | int, spec: ModelSpec, dtype: torch.dtype | None = None) -> int:
    """Tokens per layer for a budget written as tokens ("8192") or a size of KV ("8GiB", "1.5GB").

    A size covers all full-attention layers together: 8GiB on a 32-layer model is 256 MiB per layer.
    A size above zero that holds less than one token per layer is refused (it would mean no budget at all).
    """
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"parse_budget needs the model's ModelSpec (ModelSpec.from_model(model)), got {brief(spec)}")
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype (torch.float16, ...) or None, got {brief(dtype)}")
    if isinstance(text, int):
        return text
    number, unit = split_budget(text)
    if unit == "":
        return int(number)
    layers = sum(1 for layer in spec.layers if layer.kind == FULL) or 1
    token_bytes = kv_bytes_per_token(spec, dtype) * layers
    tokens = int(number * _UNITS[unit] // token_bytes)
    if tokens == 0 and number > 0:
        raise ValueError(f"budget {str(text).strip()} is less than one token per layer "
                         f"(needs at least {token_bytes} bytes)")
    return tokens


def parse_size(text: str | int) -> int:
    """Bytes of a size written as a number of bytes ("1048576") or with a unit ("64GiB", "1.5GB", "512MiB")."""
    if isinstance(text, int):
        return text
    parsed = _number_and_unit(text)
    if parsed is None:
        raise ValueError(f"size {brief(text)}: write a number of bytes (1048576) or a size (64GiB, 512MB)")
    number, unit = parsed
    return int(number * _UNITS[unit])


def budgets_in_tokens(options: dict[str, Any], spec: ModelSpec) -> dict[str, Any]:
    """`options` with each budget written as a string ("8192" tokens, "8GiB" of KV) in tokens per layer.

    A size covers every full-attention layer of `spec`'s model in its dtype, at batch 1, as on the command line.
    A string that is neither raises ValueError naming the option."""
    out = dict(options)
    for name in TOKEN_BUDGETS:
        value = out.get(name)
        if isinstance(value, str):
            try:
                out[name] = parse_budget(value, spec)
            except ValueError as exc:
                raise ValueError(f"`{name}`: {exc}") from None
    return out


def parse_sparse_budget(text: str) -> int | float:
    """A sparse budget as written on a command line: tokens ("256"), a share ("0.05") or a percentage ("5%")."""
    s = str(text).strip()
    try:
        if s.endswith("%"):
            value: int | float = float(s[:-1]) / 100
        elif any(c in s for c in ".eE"):
            value = float(s)
        else:
            value = int(s)
    except ValueError:
        value = 0
    if isinstance(value, int) and value >= 1 or isinstance(value, float) and 0.0 < value <= 1.0:
        return value
    raise ValueError(f"{brief(text)} is not a sparse budget: write tokens per step (256), a share of the context "
                     "in (0, 1] (0.05) or a percentage (5%)")


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n /= 1024
        i += 1
    return f"{int(n)} B" if i == 0 else f"{n:.1f} {units[i]}"
