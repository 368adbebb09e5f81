"""block_decode_attention (Hogwild! Inference, arXiv 2504.06261): turning a worker's query once per block equals
attending over that worker's view built as one ordinary sequence, with every key moved to its view position.

The brute force below builds each view the expensive way: each visible block's keys moved by `Rope.shift` from
their block-local positions to the block's place in the view, the query moved to its own view position, and
plain softmax attention over the concatenation. The reference must equal it to fp32 round-off for both pair
layouts, partial rotary, GQA, head dims that are not powers of two, soft-capping, a sliding window, blocks a
worker does not see, and a worker that sees nothing.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kvtier.kernels import (
    block_decode_attention,
    block_decode_attention_ref,
    partial_attention,
)
from kvtier.kernels import native
from kvtier.kernels._triton import use_triton

from kvtier.rope import Rope

if importlib.util.find_spec("triton") is not None:
    from kvtier.kernels.block_attention import _block_decode_attention_triton

TOL = {"rtol": 5e-5, "atol": 5e-5}  # fp32 round-off: the two sides turn through different angles
needs_native = pytest.mark.skipif(native.library() is None, reason="kvtier's C kernels are not built here")


def _inv_freq(rotary_dim: int, theta: float = 10000.0) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)


def _brute(q, q_pos, k, v, block_start, block_len, qrel, inv_freq, interleaved, scale, softcap=None, window=None):
    """Each worker's view as one sequence: keys moved to view positions, the query to its own, plain softmax."""
    n_workers, hq, d = q.shape
    hkv = k.shape[0]
    rope = Rope(inv_freq, interleaved=interleaved)
    out = torch.zeros(n_workers, hq, d)
    lse = torch.full((n_workers, hq), float("-inf"))
    for n in range(n_workers):
        at = 300 + 11 * n  # the query's position in n's view: any value, RoPE sees only distances
        keys, values, seen = [], [], []
        for b in range(block_start.shape[0]):
            rel, start, length = int(qrel[n, b]), int(block_start[b]), int(block_len[b])
            if rel < 0:
                continue  # not in n's view
            first = at - rel  # the view position of the block's first key
            keys.append(rope.shift(k[None, :, start:start + length].float(), first)[0])  # [Hkv, len, D]
            values.append(v[:, start:start + length].float())
            j = torch.arange(length)
            vis = j <= rel
            if window is not None:
                vis &= rel - j < window
            seen.append(vis)
        if not keys or not bool(torch.cat(seen).any()):
            continue
        kk = torch.cat(keys, 1).repeat_interleave(hq // hkv, 0)  # [Hq, K, D]
        vv = torch.cat(values, 1).repeat_interleave(hq // hkv, 0)
        qv = rope.shift(q[n].float()[None, :, None], at - int(q_pos[n]))[0, :, 0]  # [Hq, D] at position `at`
        s = torch.einsum("hd,hkd->hk", qv, kk) * scale
        if softcap is not None:
            s = torch.tanh(s / softcap) * softcap
        s = s.masked_fill(~torch.cat(seen)[None], float("-inf"))
        out[n] = torch.einsum("hk,hkd->hd", torch.softmax(s, -1), vv)
        lse[n] = torch.logsumexp(s, -1)
    return out, lse


def _case(seed, n, hq, hkv, d, lens, rotary_dim=None, dtype=torch.float32, unseen=0.25):
    """Random inputs: blocks of `lens` keys end to end, qrel anywhere from -1 (unseen) to past the block's end."""
    g = torch.Generator().manual_seed(seed)
    t = sum(lens)
    q = torch.randn(n, hq, d, generator=g).to(dtype)
    k = torch.randn(hkv, t, d, generator=g).to(dtype)
    v = torch.randn(hkv, t, d, generator=g).to(dtype)
    block_len = torch.tensor(lens, dtype=torch.long)
    block_start = torch.cumsum(block_len, 0) - block_len
    qrel = torch.stack([torch.randint(0, max(length, 1) + 4, (n,), generator=g) for length in lens], 1)
    qrel = torch.where(torch.rand(n, len(lens), generator=g) < unseen, -1, qrel)
    q_pos = torch.randint(0, 200, (n,), generator=g)
    return q, q_pos, k, v, block_start, block_len, qrel, _inv_freq(rotary_dim or d)


def _check(args, interleaved, scale, softcap=None, window=None, fn=block_decode_attention_ref, tol=TOL):
    got_o, got_l = fn(*args, interleaved, scale, softcap, window)
    want_o, want_l = _brute(*args, interleaved, scale, softcap, window)
    assert got_o.dtype == got_l.dtype == torch.float32
    torch.testing.assert_close(got_o, want_o, **tol)
    torch.testing.assert_close(got_l, want_l, **tol)


@pytest.mark.parametrize("interleaved", [False, True], ids=["rotate-half", "interleaved"])
@pytest.mark.parametrize("g", [1, 2, 4])
@pytest.mark.parametrize("d, rotary_dim", [(64, 64), (64, 32), (80, 80), (96, 48)])
def test_reference_equals_each_view_built_as_one_sequence(interleaved, g, d, rotary_dim):
    args = _case(d + g, n=3, hq=2 * g, hkv=2, d=d, lens=[9, 4, 0, 6], rotary_dim=rotary_dim)
    _check(args, interleaved, d ** -0.5)


@pytest.mark.parametrize("softcap, window", [(2.0, None), (None, 3), (5.0, 2), (None, 1)])
def test_reference_softcap_and_window(softcap, window):
    args = _case(7, n=4, hq=4, hkv=2, d=32, lens=[10, 7, 5], rotary_dim=16)
    _check(args, False, 0.3, softcap, window)
    _check(args, True, 0.3, softcap, window)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 4), hkv=st.integers(1, 2), g=st.sampled_from([1, 2, 4]),
       d=st.sampled_from([16, 24, 40]), rot=st.sampled_from([1.0, 0.5, 0.25]), interleaved=st.booleans(),
       lens=st.lists(st.integers(0, 9), min_size=1, max_size=5), softcap=st.sampled_from([None, 3.0]),
       window=st.sampled_from([None, 1, 4]))
def test_reference_property(seed, n, hkv, g, d, rot, interleaved, lens, softcap, window):
    rotary_dim = max(2, int(d * rot) // 2 * 2)
    args = _case(seed, n=n, hq=g * hkv, hkv=hkv, d=d, lens=lens, rotary_dim=rotary_dim)
    _check(args, interleaved, 0.25, softcap, window)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 4), hkv=st.integers(1, 2), g=st.sampled_from([1, 2, 4]),
       d=st.sampled_from([16, 24, 40]), rot=st.sampled_from([1.0, 0.5]), interleaved=st.booleans(),
       lens=st.lists(st.integers(0, 9), min_size=1, max_size=5).filter(any), softcap=st.sampled_from([None, 3.0]),
       window=st.sampled_from([None, 1, 4]), fused=st.booleans())
def test_views_at_once_property(seed, n, hkv, g, d, rot, interleaved, lens, softcap, window, fused):
    """The CPU path for few held keys (every worker's turned copy of the keys, one call) against each view
    built as one sequence: blocks out of a view, empty blocks, windows, soft-capping, workers that see nothing."""
    from kvtier.kernels.block_attention import _views_at_once

    rotary_dim = max(2, int(d * rot) // 2 * 2)
    args = _case(seed, n=n, hq=g * hkv, hkv=hkv, d=d, lens=lens, rotary_dim=rotary_dim)
    _check(args, interleaved, 0.25, softcap, window,
           fn=lambda *a: _views_at_once(*a, fused=fused and softcap is None))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 4), hkv=st.integers(1, 2), g=st.sampled_from([1, 2, 4]),
       d=st.sampled_from([16, 24, 40]), rot=st.sampled_from([1.0, 0.5]), interleaved=st.booleans(),
       lens=st.lists(st.integers(0, 9), min_size=1, max_size=5).filter(any), softcap=st.sampled_from([None, 3.0]),
       window=st.sampled_from([None, 1, 4]), unseen=st.sampled_from([0.25, 1.0]))
def test_queries_turned_property(seed, n, hkv, g, d, rot, interleaved, lens, softcap, window, unseen):
    """The CPU path for few held keys (each worker's query turned once per block, every key scored by its own
    block's turn) against each view built as one sequence, workers that see nothing included."""
    from kvtier.kernels.block_attention import HeldKeys, _queries_turned

    rotary_dim = max(2, int(d * rot) // 2 * 2)
    args = _case(seed, n=n, hq=g * hkv, hkv=hkv, d=d, lens=lens, rotary_dim=rotary_dim, unseen=unseen)
    q, q_pos, _, _, block_start, block_len, qrel, _ = args
    _check(args, interleaved, 0.25, softcap, window,
           fn=lambda *a: _queries_turned(*a, held=HeldKeys(q_pos, block_start, block_len, qrel, window)))


@needs_native
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 4), hkv=st.integers(1, 2), g=st.sampled_from([1, 2, 4, 5]),
       d=st.sampled_from([12, 16, 40, 64]), rot=st.sampled_from([1.0, 0.5]), interleaved=st.booleans(),
       lens=st.lists(st.integers(0, 80), min_size=1, max_size=5).filter(any), window=st.sampled_from([None, 1, 4]),
       unseen=st.sampled_from([0.25, 1.0]))
def test_queries_turned_in_place_property(seed, n, hkv, g, d, rot, interleaved, lens, window, unseen):
    """The CPU path through kvtier's C kernel (each worker's query turned once per block, the keys it sees read in
    place as one run per block, the blocks merged by log-sum-exp) against each view built as one sequence:
    blocks longer than the kernel's 64-row block, empty blocks, windows, query positions past a block's end,
    workers that see nothing."""
    from kvtier.kernels.block_attention import HeldKeys, _queries_turned_in_place

    rotary_dim = max(2, int(d * rot) // 2 * 2)
    args = _case(seed, n=n, hq=g * hkv, hkv=hkv, d=d, lens=lens, rotary_dim=rotary_dim, unseen=unseen)
    q, q_pos, _, _, block_start, block_len, qrel, _ = args

    def in_place(q, q_pos, k, v, block_start, block_len, qrel, inv_freq, interleaved, scale, softcap, window):
        held = HeldKeys(q_pos, block_start, block_len, qrel, window)
        return _queries_turned_in_place(q, k, v, inv_freq, interleaved, scale, held)

    _check(args, interleaved, 0.25, None, window, fn=in_place)


def test_cpu_dispatch(monkeypatch):
    """block_decode_attention on a CPU: float32 keys without soft-capping go to the C kernel where it is built;
    otherwise few held keys (the Hogwild step's headers and current steps) to `_queries_turned`, more to the
    per-block loop."""
    from kvtier.kernels import block_attention as ba

    args = _case(1, n=2, hq=4, hkv=2, d=16, lens=[5, 3, 4])
    want = block_decode_attention_ref(*args, False, 0.25)
    seen = []
    for name in ("_queries_turned_in_place", "_queries_turned", "_views_at_once", "_per_block"):
        real = getattr(ba, name)
        monkeypatch.setattr(ba, name, lambda *a, _n=name, _f=real, **kw: seen.append(_n) or _f(*a, **kw))
    got = block_decode_attention(*args, False, 0.25)
    assert seen == (["_queries_turned_in_place"] if native.library() is not None else ["_queries_turned"])
    torch.testing.assert_close(got, want, **TOL)
    seen.clear()
    block_decode_attention(*args, False, 0.25, 3.0)  # soft-capped: no C kernel
    assert seen == ["_queries_turned"]
    seen.clear()
    monkeypatch.setattr(native, "takes", lambda *t: False)
    block_decode_attention(*args, False, 0.25)
    assert seen == ["_queries_turned"]
    seen.clear()
    monkeypatch.setattr(ba, "_SCORE_ELEMS", 8)
    monkeypatch.setattr(ba, "_VIEW_ELEMS", 8)
    block_decode_attention(*args, False, 0.25)
    assert seen == ["_per_block"]


def test_hogwild_views():
    """Two workers over [prompt, step of worker 0, step of worker 1]: each sees the prompt, the other's step, then
    its own step last (the paper's layout); the query is the next token of its own step."""
    prompt, step0, step1 = 8, 3, 5
    q, _, k, v, block_start, block_len, _, inv_freq = _case(3, n=2, hq=4, hkv=2, d=32, lens=[prompt, step0, step1])
    # view positions of each block's first key, and of the query (one past its own step)
    first = torch.tensor([[0, prompt + step1, prompt], [0, prompt, prompt + step0]])
    at = torch.tensor([prompt + step1 + step0, prompt + step0 + step1])
    qrel = at[:, None] - first
    q_pos = torch.tensor([step0, step1])  # e.g. queries rotated at their own step's local position
    _check((q, q_pos, k, v, block_start, block_len, qrel, inv_freq), False, 0.2)


def test_one_block_at_its_own_positions_is_plain_causal_attention():
    """qrel == q_pos: no rotation at all, and the block's first keys up to the query are attended as usual."""
    q, _, k, v, block_start, block_len, _, inv_freq = _case(5, n=3, hq=4, hkv=2, d=16, lens=[12])
    q_pos = torch.tensor([0, 5, 11])
    out, lse = block_decode_attention_ref(q, q_pos, k, v, block_start, block_len, q_pos[:, None], inv_freq, False, 0.5)
    for n, p in enumerate(q_pos.tolist()):
        want_o, want_l = partial_attention(q[n][None, :, None], k[None, :, :p + 1], v[None, :, :p + 1], 0.5)
        torch.testing.assert_close(out[n], want_o[0, :, 0], **TOL)
        torch.testing.assert_close(lse[n], want_l[0, :, 0], **TOL)


def test_worker_that_sees_nothing():
    args = list(_case(9, n=3, hq=4, hkv=2, d=16, lens=[4, 6]))
    qrel = args[6]
    qrel[0] = -1  # block list not in view
    qrel[1, 0], qrel[1, 1] = -1, -5  # any negative means unseen
    qrel[2] = torch.tensor([2, 0])
    for fn in (block_decode_attention_ref, block_decode_attention):
        for window in (None, 1):
            out, lse = fn(*args, False, 0.5, None, window)
            assert torch.all(lse[:2] == float("-inf")) and torch.all(out[:2] == 0)
            assert torch.isfinite(lse[2]).all() and not torch.isnan(out).any()
    _check(tuple(args), False, 0.5)


def test_no_blocks_and_no_workers():
    q, q_pos, k, v, _, _, _, inv_freq = _case(1, n=2, hq=2, hkv=1, d=8, lens=[3])
    none = torch.zeros(0, dtype=torch.long)
    out, lse = block_decode_attention(q, q_pos, k, v, none, none, torch.zeros(2, 0, dtype=torch.long), inv_freq,
                                      False, 1.0)
    assert out.shape == (2, 2, 8) and torch.all(out == 0) and torch.all(lse == float("-inf"))
    out, lse = block_decode_attention(q[:0], q_pos[:0], k, v, torch.tensor([0]), torch.tensor([3]),
                                      torch.zeros(0, 1, dtype=torch.long), inv_freq, False, 1.0)
    assert out.shape == (0, 2, 8) and lse.shape == (0, 2)


@pytest.mark.parametrize("softcap", [None, 4.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dispatch_matches_reference(softcap, dtype):
    """Without Triton (here: CPU, no interpreter) the dispatcher runs torch's fused attention per block."""
    args = _case(11, n=4, hq=8, hkv=2, d=48, lens=[20, 0, 7, 13], rotary_dim=32, dtype=dtype)
    for interleaved in (False, True):
        got = block_decode_attention(*args, interleaved, 0.15, softcap, 6)
        want = block_decode_attention_ref(*args, interleaved, 0.15, softcap, 6)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_bad_shapes_are_refused():
    q, q_pos, k, v, block_start, block_len, qrel, inv_freq = _case(2, n=2, hq=4, hkv=2, d=16, lens=[3, 4])
    with pytest.raises(ValueError, match="qrel"):
        block_decode_attention(q, q_pos, k, v, block_start, block_len, qrel[:, :1], inv_freq, False, 1.0)
    with pytest.raises(ValueError, match="multiple"):
        block_decode_attention(q[:, :3], q_pos, k, v, block_start, block_len, qrel, inv_freq, False, 1.0)
    with pytest.raises(ValueError, match="inv_freq"):
        block_decode_attention(q, q_pos, k, v, block_start, block_len, qrel, _inv_freq(32), False, 1.0)
    with pytest.raises(ValueError, match="window"):
        block_decode_attention(q, q_pos, k, v, block_start, block_len, qrel, inv_freq, False, 1.0, None, 0)


@needs_native
def test_in_place_reads_heads_spaced_wider_than_their_keys(monkeypatch):
    """k, v whose heads sit further apart in their storage than their keys (an arena reserved wider, viewed to
    its used rows) are read in place too, each head from its own rows, and a block past the used rows is
    refused though the storage goes on."""
    from kvtier.kernels import block_attention as ba

    q, q_pos, k, v, block_start, block_len, qrel, inv_freq = _case(4, n=3, hq=4, hkv=2, d=16, lens=[5, 0, 7])
    wide_k, wide_v = torch.randn(2, k.shape[1] + 9, 16), torch.randn(2, k.shape[1] + 9, 16)
    wide_k[:, :k.shape[1]], wide_v[:, :k.shape[1]] = k, v
    kk, vv = wide_k[:, :k.shape[1]], wide_v[:, :k.shape[1]]
    assert not kk.is_contiguous()
    seen, real = [], ba._queries_turned_in_place
    monkeypatch.setattr(ba, "_queries_turned_in_place", lambda *a, **kw: seen.append(1) or real(*a, **kw))
    args = (q, q_pos, kk, vv, block_start, block_len, qrel, inv_freq)
    got = block_decode_attention(*args, False, 0.25)
    want = block_decode_attention_ref(q, q_pos, k, v, block_start, block_len, qrel, inv_freq, False, 0.25)
    assert seen == [1]
    torch.testing.assert_close(got, want, **TOL)
    with pytest.raises(ValueError, match="inside the 12 rows"):
        block_decode_attention(q, q_pos, kk, vv, block_start, torch.tensor([5, 0, 8]), qrel, inv_freq, False, 0.25)


@needs_native
def test_blocks_outside_the_keys_are_refused_in_place():
    """The C path reads rows of k and v where the layout says: a block reaching past them (into the next KV
    head's rows, or past the end) is refused before anything is read, not read from the wrong head."""
    q, q_pos, k, v, block_start, block_len, qrel, inv_freq = _case(2, n=2, hq=4, hkv=2, d=16, lens=[3, 4])
    for start, length in (([0, 4], [3, 4]), ([-1, 3], [3, 4]), ([0, 3], [3, 5])):
        with pytest.raises(ValueError, match="inside the 7 rows"):
            block_decode_attention(q, q_pos, k, v, torch.tensor(start), torch.tensor(length), qrel, inv_freq, False,
                                   1.0)


# --- the Triton kernel against the reference: run in a TRITON_INTERPRET=1 subprocess on the CPU, compiled on CUDA

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_ACTIVE = use_triton(torch.empty(1, device=DEVICE))
needs_triton = pytest.mark.skipif(
    not TRITON_ACTIVE, reason="run by test_triton_kernel_under_interpreter (TRITON_INTERPRET=1) or on CUDA")
KERNEL_CASES = {  # name -> (workers, Hq, Hkv, head_dim, rotary_dim, block lengths)
    "g2-d16": (3, 4, 2, 16, 16, [9, 4, 0, 6]),
    "g1-d64-partial": (2, 2, 2, 64, 32, [5, 70, 3]),
    "g4-d24": (2, 8, 2, 24, 12, [17, 1, 6]),
    "g3-d80": (2, 6, 2, 80, 40, [11, 5]),
}


def _kernel_case(name, dtype):
    n, hq, hkv, d, r, lens = KERNEL_CASES[name]
    args = _case(len(name) + d, n=n, hq=hq, hkv=hkv, d=d, lens=lens, rotary_dim=r, dtype=dtype)
    args[6][-1] = -1  # the last worker sees nothing
    return tuple(a.to(DEVICE) for a in args)


# (case, interleaved, softcap, window, dtype): every combination under the interpreter (seconds); on CUDA, where
# each combination is one more compile of a few seconds, a subset that still has each case, layout, feature and
# dtype (gpu_check.sh's tests step has about three minutes for every compile of the project).
FULL = [(name, inter, cap, win, dt) for name in KERNEL_CASES for inter in (False, True)
        for cap in (None, 3.0) for win in (None, 4) for dt in (torch.float32, torch.bfloat16)]
COMPILED = [("g2-d16", False, None, None, torch.float32), ("g2-d16", True, 3.0, None, torch.bfloat16),
            ("g1-d64-partial", True, 3.0, 4, torch.bfloat16), ("g4-d24", True, None, None, torch.float32),
            ("g4-d24", False, None, 4, torch.bfloat16), ("g3-d80", False, 3.0, 4, torch.bfloat16)]


@needs_triton
@pytest.mark.parametrize("name, interleaved, softcap, window, dtype", FULL if DEVICE == "cpu" else COMPILED)
def test_triton_kernel_matches_reference(name, interleaved, softcap, window, dtype):
    args = _kernel_case(name, dtype)
    got_o, got_l = block_decode_attention(*args, interleaved, 0.2, softcap, window)
    want_o, want_l = block_decode_attention_ref(*args, interleaved, 0.2, softcap, window)
    torch.testing.assert_close(got_o, want_o, rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(got_l, want_l, rtol=2e-4, atol=2e-4)
    assert torch.all(got_l[-1] == float("-inf")) and torch.all(got_o[-1] == 0)


@needs_triton
@pytest.mark.parametrize("splits, window", [(2, None), (5, 3)])
def test_triton_kernel_split_keys(splits, window):
    """Each block's visible keys cut into splits (as on a GPU that N * Hkv programs would not fill), merged by LSE."""
    args = _kernel_case("g1-d64-partial", torch.float32)
    got_o, got_l = _block_decode_attention_triton(*args, True, 0.2, 2.0, window, splits=splits)
    want_o, want_l = block_decode_attention_ref(*args, True, 0.2, 2.0, window)
    torch.testing.assert_close(got_o, want_o, rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(got_l, want_l, rtol=2e-4, atol=2e-4)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_triton_kernel_under_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    out = _run_kernel_cases(env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert " passed" in out.stdout and "skipped" not in out.stdout, out.stdout[-3000:]


@pytest.mark.gpu
def test_triton_kernel_compiled_on_cuda():
    # Compiled for real: a TRITON_INTERPRET=1 left in the environment would run the interpreter on CUDA tensors.
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "KVTIER_NO_TRITON")}
    out = _run_kernel_cases(env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert " passed" in out.stdout and "skipped" not in out.stdout, out.stdout[-3000:]


def _run_kernel_cases(env):
    cmd = [sys.executable, "-m", "pytest", __file__, "-k", "triton_kernel_matches or triton_kernel_split",
           "-o", "addopts=--import-mode=importlib", "-p", "no:cacheprovider", "-q", "-W", "ignore"]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=Path(__file__).parent,
                          check=False)


def test_held_keys_made_once_serve_every_layer_of_a_layout():
    """A caller attending many layers over one block layout (a Hogwild forward pass) passes one `HeldKeys`:
    each layer's result equals a call that derives the layout itself, and a `HeldKeys` of other layout
    tensors or another window is refused rather than read."""
    from kvtier.kernels import HeldKeys

    q, q_pos, k, v, block_start, block_len, qrel, inv_freq = _case(11, n=3, hq=4, hkv=2, d=16, lens=[5, 0, 3, 4])
    held = HeldKeys(q_pos, block_start, block_len, qrel, 4)
    for layer in range(3):  # other keys, values and queries at every layer; the same layout
        gen = torch.Generator().manual_seed(layer)
        kl, vl, ql = (torch.randn(x.shape, generator=gen) for x in (k, v, q))
        args = (ql, q_pos, kl, vl, block_start, block_len, qrel, inv_freq, False, 0.25, None, 4)
        want = block_decode_attention(*args)
        got = block_decode_attention(*args, held=held)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert held.count == 12
    with pytest.raises(ValueError, match="other layout tensors or another window"):
        block_decode_attention(q, q_pos, k, v, block_start, block_len, qrel.clone(), inv_freq, False, 0.25, None, 4,
                               held=held)
    with pytest.raises(ValueError, match="other layout tensors or another window"):
        block_decode_attention(q, q_pos, k, v, block_start, block_len, qrel, inv_freq, False, 0.25, None, None,
                               held=held)
