"""Helpers for the tests: padded batches, a teacher-forced step loop, the command line run in-process."""

from __future__ import annotations

import contextlib
import io
import subprocess

import pytest
import torch
from transformers import DynamicCache

from kvtier import cache_argument
from kvtier.kernels import native

VOCAB = 128


def padded_batch(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and mask for prompts of the given lengths (pad id 0, tokens 3..VOCAB-1)."""
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids = torch.zeros(len(lengths), n, dtype=torch.long)
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for i, length in enumerate(lengths):
        ids[i, n - length:] = torch.randint(3, VOCAB, (length,), generator=g)
        mask[i, n - length:] = 1
    return ids, mask


def cache_kw(model) -> str:
    """`cache` on transformers >= 5.24, `past_key_values` before."""
    return cache_argument(model)


@torch.no_grad()
def step_logits(model, cache, ids: torch.Tensor, mask: torch.Tensor, segments: list[int], decode: list[torch.Tensor]):
    """Prefill `ids` in the given segment lengths, then feed each decode token; return all logits [B, T, V].

    Positions follow the left-padding convention of generate (cumsum of the mask)."""
    kw = cache_kw(model)
    outs = []
    full_mask = mask
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    start = 0
    for n in segments:
        end = start + n
        out = model(input_ids=ids[:, start:end], attention_mask=full_mask[:, :end], position_ids=pos[:, start:end],
                    use_cache=True, **{kw: cache})
        outs.append(out.logits)
        start = end
    for tok in decode:
        full_mask = torch.cat([full_mask, torch.ones_like(full_mask[:, :1])], dim=1)
        next_pos = pos[:, -1:] + 1
        pos = torch.cat([pos, next_pos], dim=1)
        out = model(input_ids=tok, attention_mask=full_mask, position_ids=next_pos, use_cache=True, **{kw: cache})
        outs.append(out.logits)
    return torch.cat(outs, dim=1)


def reference_run(model, ids, mask, n_decode: int):
    """DynamicCache logits for the prompt and `n_decode` greedy tokens; returns (logits, decode tokens)."""
    cache = DynamicCache()
    logits = step_logits(model, cache, ids, mask, [ids.shape[1]], [])
    toks = []
    for _ in range(n_decode):
        tok = logits[:, -1:].argmax(-1)
        toks.append(tok)
        more = step_logits_continue(model, cache, mask, toks)
        logits = torch.cat([logits, more], dim=1)
    return logits, toks


@torch.no_grad()
def step_logits_continue(model, cache, mask, toks):
    kw = cache_kw(model)
    full_mask = torch.cat([mask, torch.ones(mask.shape[0], len(toks), dtype=mask.dtype, device=mask.device)], dim=1)
    pos = (full_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=toks[-1], attention_mask=full_mask, position_ids=pos[:, -1:], use_cache=True, **{kw: cache})
    return out.logits


def cli_in_process(args: list[str]) -> subprocess.CompletedProcess:
    """`kvtier *args` run by `kvtier.cli.main` in this process: no interpreter start-up and torch import (seconds
    each) for a command whose process of its own proves nothing more."""
    from kvtier.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@contextlib.contextmanager
def cpu_path(path: str):
    """Run the CPU's sparse step through the C kernels ("native", skipped without a C compiler) or torch's."""
    saved = list(native._loaded)
    native._loaded[:] = [None] if path == "torch" else saved
    try:
        if path == "native" and native.library() is None:
            pytest.skip("the C kernels cannot be built here (no C compiler?)")
        yield
    finally:
        native._loaded[:] = saved
