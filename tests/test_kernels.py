"""Invariant 4: one reference per kernel. The references match plain softmax attention; the Triton
kernels match the references under TRITON_INTERPRET=1 on the CPU, and compiled for real on CUDA."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import cpu_path
from hypothesis import given, settings
from hypothesis import strategies as st
from kvtier.kernels import (
    arena_rows,
    chunk_scores_ref,
    merge_partials,
    partial_attention,
    run_decode_attention,
    sparse_decode_attention_ref,
)

CASES = Path(__file__).with_name("kernel_cases.py")


def _naive(q, k, v, scale, mask=None, softcap=None):
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1).float(), v.repeat_interleave(g, 1).float()
    s = q.float() @ k.transpose(-1, -2) * scale
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 40), split=st.integers(1, 39), g=st.sampled_from([1, 2, 4]), softcap=st.sampled_from([None, 3.0]))
def test_partials_merge_to_full_attention(n, split, g, softcap):
    split = min(split, n - 1)
    gen = torch.Generator().manual_seed(n * 7 + split)
    q = torch.randn(2, 2 * g, 3, 8, generator=gen)
    k, v = torch.randn(2, 2, n, 8, generator=gen), torch.randn(2, 2, n, 8, generator=gen)
    want, want_lse = _naive(q, k, v, 0.3, softcap=softcap)
    a = partial_attention(q, k[:, :, :split], v[:, :, :split], 0.3, softcap=softcap)
    b = partial_attention(q, k[:, :, split:], v[:, :, split:], 0.3, softcap=softcap)
    out, lse = merge_partials(*a, *b)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)


def test_fully_masked_rows_drop_out_of_the_merge():
    q, k, v = torch.randn(1, 2, 1, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    none = partial_attention(q, k, v, 1.0, mask=torch.zeros(1, 1, 1, 5, dtype=torch.bool))
    assert torch.all(none[1] == float("-inf")) and torch.all(none[0] == 0)
    full = partial_attention(q, k, v, 1.0)
    for a, b in ((none, full), (full, none)):
        out, lse = merge_partials(*a, *b)
        torch.testing.assert_close(out, full[0])
        torch.testing.assert_close(lse, full[1])
    out, lse = merge_partials(*none, *none)  # a row no part saw: out 0, lse -inf, never NaN
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))


def test_per_head_masks():
    q, k, v = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    mask = torch.tensor([[1, 1, 0, 0, 1, 0], [0, 1, 1, 1, 0, 1]], dtype=torch.bool).view(1, 2, 1, 6)
    out, _ = partial_attention(q, k, v, 0.5, mask=mask)
    want, _ = _naive(q, k, v, 0.5, mask=mask.repeat_interleave(2, 1))
    torch.testing.assert_close(out, want)


def test_chunk_score_is_an_upper_bound():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 16, generator=gen)
    keys = torch.randn(2, 2, 10, 7, 16, generator=gen)  # [B, Hkv, C, tokens, D]
    bound = chunk_scores_ref(q, keys.amin(3), keys.amax(3))  # [B, Hkv, C]
    exact = torch.einsum("bhgd,bhctd->bhgct", q.view(2, 2, 2, 16), keys).amax(-1).amax(2)  # best key per chunk
    assert torch.all(bound >= exact - 1e-5)


def test_sparse_reference_equals_dense_attention_over_the_selection():
    gen = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(1, 4, 8, generator=gen), torch.randn(1, 2, 20, 8, generator=gen), torch.randn(1, 2, 20, 8, generator=gen)
    idx = torch.tensor([[[3, 7, 1, 0], [19, 2, 0, 0]]])
    counts = torch.tensor([[3, 2]])
    out, lse = sparse_decode_attention_ref(q, k, v, idx, counts, 0.4)
    for h, sel in enumerate([[3, 7, 1], [19, 2]]):
        want, want_lse = _naive(q[:, 2 * h:2 * h + 2, None], k[:, h:h + 1, sel], v[:, h:h + 1, sel], 0.4)
        torch.testing.assert_close(out[:, 2 * h:2 * h + 2], want[:, :, 0])
        torch.testing.assert_close(lse[:, 2 * h:2 * h + 2], want_lse[:, :, 0])


def _reserved(t: torch.Tensor, extra: int, gen: torch.Generator) -> torch.Tensor:
    """t [B, H, S, D] as the first S slots of planes `extra` slots wider (a CPU arena's reserved layout), the
    extra slots holding large values that would show in any result that read them unmasked."""
    if not extra:
        return t
    b, h, s, d = t.shape
    wide = torch.randn(b, h, s + extra, d, generator=gen) * 1e3
    wide[:, :, :s] = t
    return wide[:, :, :s]


@pytest.mark.parametrize("path", ["native", "torch"])
def test_runs_of_slots_attend_as_their_slots_listed_one_by_one(path):
    """Runs read in place by the C kernel, or as 16-slot windows (a window may pass the run's end, the head's
    plane or the arena's end) for torch's, give what the slot-by-slot reference gives over the same slots, in
    a contiguous arena or one whose planes are reserved wider than its slots."""
    with cpu_path(path):
        _runs_match_lists()


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 2), g=st.sampled_from([1, 2, 3]), slots=st.integers(16, 90), units=st.integers(1, 5),
       extra=st.sampled_from([0, 0, 1, 7, 40]), seed=st.integers(0, 10_000),
       d=st.sampled_from([8, 8, 64, 80]))
def _runs_match_lists(b, g, slots, units, extra, seed, d):
    gen = torch.Generator().manual_seed(seed)
    hkv = 2
    q = torch.randn(b, hkv * g, d, generator=gen)
    k, v = torch.randn(b, hkv, slots, d, generator=gen), torch.randn(b, hkv, slots, d, generator=gen)
    k_arena, v_arena = _reserved(k, extra, gen), _reserved(v, extra, gen)
    length = torch.randint(0, 20, (b, hkv, units), generator=gen).clamp(max=slots)
    length[..., 0] = torch.randint(1, 17, (b, hkv), generator=gen)  # every head attends to something
    start = (torch.rand(b, hkv, units, generator=gen) * (slots - length + 1)).long()
    res = run_decode_attention(q, k_arena, v_arena, start, length, 0.3)
    lists = [[list(range(s, s + n)) for s, n in zip(start[i, h].tolist(), length[i, h].tolist())]
             for i in range(b) for h in range(hkv)]
    flat = [sum(runs, []) for runs in lists]
    width = max(len(f) for f in flat)
    idx = torch.tensor([f + [0] * (width - len(f)) for f in flat]).view(b, hkv, width)
    counts = torch.tensor([len(f) for f in flat]).view(b, hkv)
    want, want_lse = sparse_decode_attention_ref(q, k, v, idx, counts, 0.3)
    assert res is not None  # a window past the arena's last row starts earlier
    torch.testing.assert_close(res[0], want)
    torch.testing.assert_close(res[1], want_lse)
    listed = sparse_decode_attention_ref(q, k_arena, v_arena, idx, counts, 0.3)  # the slot lists' own gather
    torch.testing.assert_close(listed[0], want)
    torch.testing.assert_close(listed[1], want_lse)


def test_arena_rows_take_only_arena_layouts():
    k = torch.randn(2, 3, 10, 4)
    rows, _, plane = arena_rows(k, k)
    assert plane == 10 and rows.shape == (60, 4) and torch.equal(rows[13], k[0, 1, 3])
    wide = torch.randn(2, 3, 16, 4)
    rows, _, plane = arena_rows(wide[:, :, :10], wide[:, :, :10])
    assert plane == 16 and rows.shape == (5 * 16 + 10, 4) and torch.equal(rows[16 * 4 + 3], wide[1, 1, 3])
    assert arena_rows(k[:, :, :, ::2], k[:, :, :, ::2]) is None  # channels not contiguous
    assert arena_rows(k.transpose(0, 1), k.transpose(0, 1)) is None  # planes not in (sequence, head) order
    assert arena_rows(k, wide[:, :, :10]) is None  # k and v laid out differently


@pytest.mark.parametrize("path", ["native", "torch"])
def test_a_run_ending_at_the_arenas_last_slot_reads_the_right_slots(path):
    gen = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(1, 2, 8, generator=gen), torch.randn(1, 2, 40, 8, generator=gen), torch.randn(1, 2, 40, 8, generator=gen)
    start, length = torch.tensor([[[0, 5], [33, 20]]]), torch.tensor([[[3, 2], [7, 4]]])  # head 1: slots 33..39
    with cpu_path(path):
        out, lse = run_decode_attention(q, k, v, start, length, 0.5)
    idx = torch.tensor([[[0, 1, 2, 5, 6, 0, 0], [33, 34, 35, 36, 37, 38, 39]]])
    idx = torch.cat([idx, torch.tensor([[[0, 0, 0, 0], [20, 21, 22, 23]]])], dim=-1)
    want, want_lse = sparse_decode_attention_ref(q, k, v, idx, torch.tensor([[5, 11]]), 0.5)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(lse, want_lse)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_triton_kernels_match_reference_under_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, str(CASES)], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "passed" in out.stdout and "skipped" not in out.stdout


@pytest.mark.gpu
def test_triton_kernels_compiled_on_cuda():
    # Compiled for real: a TRITON_INTERPRET=1 left in the environment would run the interpreter on CUDA tensors.
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "KVTIER_NO_TRITON")}
    out = subprocess.run([sys.executable, str(CASES)], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "passed" in out.stdout and "skipped" not in out.stdout


def test_ragged_layout_places_each_rows_items_first_in_order():
    from kvtier.kernels.ragged import ragged_layout

    sizes = torch.tensor([2, 0, 3, 1, 1, 0])  # row 0: units of 2, 0, 3 items; row 1: 1, 1, 0
    unit, within, dest, per_row, width = ragged_layout(sizes, rows=2, extra=1)
    assert per_row.tolist() == [5, 2] and width == 6  # the longest row, plus the column asked for
    assert unit.tolist() == [0, 0, 2, 2, 2, 3, 4]
    assert within.tolist() == [0, 1, 0, 1, 2, 0, 0]
    assert dest.tolist() == [0, 1, 2, 3, 4, 6, 7]
    empty = ragged_layout(torch.zeros(4, dtype=torch.long), rows=2)
    assert empty[0].numel() == 0 and empty[4] == 1


def test_the_numpy_ragged_layout_is_the_torch_one():
    from kvtier.kernels.ragged import ragged_layout, ragged_layout_np

    gen = torch.Generator().manual_seed(3)
    for rows, units in [(1, 1), (2, 3), (16, 92), (5, 7)]:
        sizes = torch.randint(0, 6, (rows * units,), generator=gen)
        sizes[::4] = 0  # empty units, and rows with nothing
        want = ragged_layout(sizes, rows)
        got = ragged_layout_np(sizes.numpy(), rows)
        for w, g in zip(want[:4], got[:4]):
            assert w.tolist() == g.tolist()
        assert want[4] == got[4]
    empty = ragged_layout_np(torch.zeros(4, dtype=torch.long).numpy(), rows=2)
    assert empty[0].size == 0 and empty[4] == 1
