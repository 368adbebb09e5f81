"""The fused path (`fused_attention`, and `attend` built on it) computes what the plain-torch reference does:
outputs and log-sum-exps, for GQA, per-row and per-head masks, causal diagonals, windows and padding."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kvtier import attend as attend_mod
from kvtier.attend import attend
from kvtier.kernels import (
    fused_attention,
    fused_available,
    partial_attention,
    sparse_decode_attention,
    sparse_decode_attention_ref,
)


def _inputs(b, hq, hkv, nq, nk, d=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, nk, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, nk, d, generator=g).to(dtype)
    return q, k, v


@pytest.mark.parametrize("g", [1, 4])
@pytest.mark.parametrize("mask_kind", ["none", "shared", "per-row", "per-head", "per-head-every-query"])
def test_fused_equals_reference(g, mask_kind):
    q, k, v = _inputs(2, 2 * g, 2, 7, 19)
    gen = torch.Generator().manual_seed(1)
    mask = {"none": None,
            "shared": torch.rand(1, 1, 7, 19, generator=gen) > 0.3,
            "per-row": torch.rand(2, 1, 7, 19, generator=gen) > 0.3,
            "per-head": torch.rand(2, 2, 7, 19, generator=gen) > 0.3,
            "per-head-every-query": torch.rand(2, 2, 1, 19, generator=gen) > 0.3}[mask_kind]
    if mask_kind == "per-head-every-query":
        mask[1, 0] = False  # a head that sees nothing
    elif mask is not None:
        mask[..., 3, :] = False  # a row that sees nothing: out 0, lse -inf, as the reference
    out, lse = fused_attention(q, k, v, 0.3, mask)
    ref_out, ref_lse = partial_attention(q, k, v, 0.3, mask)
    assert out.dtype == lse.dtype == torch.float32
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("g", [1, 2])
def test_fused_causal_is_top_left_diagonal(g):
    q, k, v = _inputs(1, 2 * g, 2, 6, 6)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()[None, None]
    out, lse = fused_attention(q, k, v, 0.25, causal=True)
    ref_out, ref_lse = partial_attention(q, k, v, 0.25, causal)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


def test_softcap_has_no_fused_kernel():
    q, _, _ = _inputs(1, 2, 2, 1, 1)
    assert fused_available(q, None) and not fused_available(q, 30.0)


@settings(max_examples=40, deadline=None)
@given(nq=st.integers(1, 24), past=st.integers(0, 40), g=st.sampled_from([1, 2, 3]),
       window=st.sampled_from([None, 1, 5, 17]), padded=st.booleans(), gather=st.booleans())
def test_attend_fused_equals_reference(nq, past, g, window, padded, gather):
    """attend() through the fused kernels against the same call with the fused path switched off."""
    q, k, v = _inputs(2, 2 * g, 2, nq, past + nq, seed=nq * 100 + past)
    valid = None
    if padded:
        valid = torch.ones(2, past + nq, dtype=torch.bool)
        valid[1, : (past + nq) // 2] = False  # left padding of row 1
    key_pos = torch.randperm(past + nq) if gather else 0
    if gather:  # keys in slot order, positions scattered (a pool's arena)
        k, v = k[:, :, key_pos], v[:, :, key_pos]
        valid = None if valid is None else valid[:, key_pos]
    kw = dict(q_pos0=past, key_pos=key_pos, scale=0.2, key_valid=valid, causal=True, window=window)
    out, lse = attend(q, k, v, **kw)
    original = attend_mod.fused_available
    try:
        attend_mod.fused_available = lambda *a: False
        ref_out, ref_lse = attend(q, k, v, **kw)
    finally:
        attend_mod.fused_available = original
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=2e-5)


def test_bf16_inputs_give_float32_partials():
    q, k, v = _inputs(1, 4, 2, 5, 9, dtype=torch.bfloat16)
    out, lse = fused_attention(q, k, v, 0.25)
    ref_out, ref_lse = partial_attention(q, k, v, 0.25)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    torch.testing.assert_close(out, ref_out, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, ref_lse, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("g", [1, 3])
def test_sparse_decode_dispatch_equals_reference(g):
    """The gathered rows through the fused kernel give the reference's output and LSE, empty lists included."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 2 * g, 16, generator=gen)
    k, v = torch.randn(2, 2, 50, 16, generator=gen), torch.randn(2, 2, 50, 16, generator=gen)
    idx = torch.randint(0, 50, (2, 2, 12), generator=gen)
    counts = torch.tensor([[12, 5], [0, 9]])
    out, lse = sparse_decode_attention(q, k, v, idx, counts, 0.3)
    ref_out, ref_lse = sparse_decode_attention_ref(q, k, v, idx, counts, 0.3)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
