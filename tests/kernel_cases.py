"""Kernel-vs-reference cases, run by test_kernels.py in a process with TRITON_INTERPRET=1 (CPU) and
directly on CUDA by the gpu-marked test. Not collected on its own (no test_ prefix)."""

from __future__ import annotations

import sys

import pytest
import torch
from kvtier.kernels import chunk_scores, chunk_scores_ref, sparse_decode_attention, sparse_decode_attention_ref
from kvtier.kernels._triton import INTERPRET, use_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_triton_is_in_use():
    assert use_triton(torch.empty(1, device=DEVICE)), "this file must run with Triton active"
    if DEVICE == "cuda":
        assert not INTERPRET, "on CUDA the kernels must be compiled: unset TRITON_INTERPRET"


@pytest.mark.parametrize("b, hq, hkv, c, d", [(1, 4, 2, 37, 16), (2, 8, 8, 5, 64), (1, 6, 2, 130, 24)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunk_scores_kernel(b, hq, hkv, c, d, dtype):
    g = torch.Generator().manual_seed(c)
    q = torch.randn(b, hq, d, generator=g).to(DEVICE, dtype)
    a, z = torch.randn(b, hkv, c, d, generator=g), torch.randn(b, hkv, c, d, generator=g)
    kmin, kmax = torch.minimum(a, z).to(DEVICE, dtype), torch.maximum(a, z).to(DEVICE, dtype)
    got, want = chunk_scores(q, kmin, kmax), chunk_scores_ref(q, kmin, kmax)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("b, hq, hkv, s, d, n", [(1, 4, 2, 90, 16, 40), (2, 8, 8, 64, 64, 64), (2, 6, 2, 300, 24, 77)])
@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_decode_kernel(b, hq, hkv, s, d, n, softcap, dtype):
    g = torch.Generator().manual_seed(s + n)
    q = torch.randn(b, hq, d, generator=g).to(DEVICE, dtype)
    k = torch.randn(b, hkv, s, d, generator=g).to(DEVICE, dtype)
    v = torch.randn(b, hkv, s, d, generator=g).to(DEVICE, dtype)
    idx = torch.stack([torch.randperm(s, generator=g)[:n] for _ in range(b * hkv)]).view(b, hkv, n).to(DEVICE)
    counts = torch.randint(0, n + 1, (b, hkv), generator=g).to(DEVICE)
    counts[0, 0] = 0  # a head with nothing to attend to
    counts[-1, -1] = n
    got_o, got_l = sparse_decode_attention(q, k, v, idx, counts, 0.125, softcap)
    want_o, want_l = sparse_decode_attention_ref(q, k, v, idx, counts, 0.125, softcap)
    torch.testing.assert_close(got_o, want_o, rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(got_l, want_l, rtol=2e-4, atol=2e-4)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-o", "addopts=", "-p", "no:cacheprovider", "-W", "ignore"]))
