"""Linear layers for a few rows through the C kernel: `native.linear_rows` against `F.linear` (shapes that
are not a multiple of its blocks, strided and batched inputs, several threads), what it refuses, and
`FewRowLinears`, which routes a model's layers through it only inside its block (a Hogwild step's path)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from conftest import family_config

from kvtier.few_rows import FewRowLinears
from kvtier.hogwild import HogwildCache
from kvtier.kernels import native

TOL = {"atol": 1e-4, "rtol": 1e-5}


@pytest.fixture(autouse=True)
def lib():
    if native.library() is None:
        pytest.skip("the C kernel cannot be built here (no C compiler?)")


@pytest.fixture
def calls(monkeypatch):
    """How many linear layers the C kernel computed (calls that returned a result)."""
    done = []
    real = native.linear_rows

    def spy(*args):
        out = real(*args)
        done.append(out is not None)
        return out

    monkeypatch.setattr(native, "linear_rows", spy)
    return done


@pytest.mark.parametrize("rows", range(2, native.LINEAR_ROWS + 1))
@pytest.mark.parametrize("bias", [False, True])
def test_few_rows_equal_torch_s_linear(rows, bias):
    """601 x 259 weights: neither a multiple of the kernel's 6 weight rows a block nor of its 16 lanes."""
    g = torch.Generator().manual_seed(rows)
    w, b = torch.randn(601, 259, generator=g), torch.randn(601, generator=g) if bias else None
    x = torch.randn(rows, 259, generator=g)
    torch.testing.assert_close(native.linear_rows(x, w, b), F.linear(x, w, b), **TOL)


def test_strided_and_batched_rows_and_several_threads():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(640, 256, generator=g), torch.randn(640, generator=g)
    wide = torch.randn(5, 300, generator=g)[:, :256]  # rows 300 apart
    torch.testing.assert_close(native.linear_rows(wide, w, b), F.linear(wide, w, b), **TOL)
    batched = torch.randn(4, 1, 256, generator=g)  # [workers, 1 token, hidden], as a Hogwild step
    out = native.linear_rows(batched, w, b)
    assert out.shape == (4, 1, 640)
    torch.testing.assert_close(out, F.linear(batched, w, b), **TOL)
    same = torch.randn(1, 256, generator=g).expand(3, 256)  # rows 0 apart
    torch.testing.assert_close(native.linear_rows(same, w, b), F.linear(same, w, b), **TOL)
    columns = torch.randn(256, 3, generator=g).t()  # columns strided: copied into rows first
    torch.testing.assert_close(native.linear_rows(columns, w), F.linear(columns, w), **TOL)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)  # output columns split three ways
    try:
        torch.testing.assert_close(native.linear_rows(wide, w, b), F.linear(wide, w, b), **TOL)
    finally:
        torch.set_num_threads(threads)


def test_what_the_kernel_does_not_take_is_left_to_torch():
    w, x = torch.randn(512, 256), torch.randn(4, 256)
    assert native.linear_rows(torch.randn(native.LINEAR_ROWS + 1, 256), w) is None  # too many rows
    assert native.linear_rows(torch.randn(1, 256), w) is None  # one row: torch's is as fast
    assert native.linear_rows(torch.randn(256), w) is None
    assert native.linear_rows(torch.randn(0, 256), w) is None
    assert native.linear_rows(x.double(), w.double()) is None
    assert native.linear_rows(torch.randn(4, 16), torch.randn(16, 16)) is None  # too small to pay for a call
    assert native.linear_rows(x, torch.randn(256, 512).t()) is None  # weight not contiguous
    assert native.linear_rows(x, torch.randn(512, 255)) is None  # K differs
    assert native.linear_rows(x, w, torch.randn(511)) is None  # bias of another length
    assert native.linear_rows(x, w, torch.randn(1024)[::2]) is None  # bias not contiguous
    assert native.linear_rows(x.requires_grad_(), w) is None  # no backward here
    with torch.no_grad():
        assert native.linear_rows(x, w) is not None


def test_layers_are_routed_inside_the_block_only(calls):
    net = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256, bias=False))
    x = torch.randn(3, 256)
    with torch.no_grad():
        plain = net(x)
        with FewRowLinears(net) as routed:
            torch.testing.assert_close(net(x), plain, **TOL)
            assert calls == [True, True]
            with pytest.raises(RuntimeError, match="already active"):
                routed.__enter__()
            net(torch.randn(native.LINEAR_ROWS + 1, 256))
            assert calls == [True, True, False, False]  # more rows: torch's GEMM
        assert all("forward" not in layer.__dict__ for layer in net)
        net(x)
        assert len(calls) == 4  # outside the block: torch's layers
        with pytest.raises(ZeroDivisionError), FewRowLinears(net):
            1 / 0
        assert all("forward" not in layer.__dict__ for layer in net)


def test_anything_but_a_module_is_refused_in_one_line():
    with pytest.raises(TypeError, match=r"^FewRowLinears takes a torch.nn.Module, got 'model'$"):
        FewRowLinears("model")


def test_subclasses_and_layers_with_their_own_forward_are_left_alone(calls):
    class Scaled(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    own = torch.nn.Linear(256, 256)
    own.forward = lambda x: torch.zeros(x.shape[0], 256)
    net = torch.nn.Sequential(Scaled(256, 256), own, torch.nn.Linear(256, 256).double())
    with torch.no_grad(), FewRowLinears(net):
        assert torch.equal(net[1](torch.randn(2, 256)), torch.zeros(2, 256))
        net[0](torch.randn(2, 256))
        net[2](torch.randn(2, 256, dtype=torch.float64))
    assert calls == []
    assert "forward" in own.__dict__


def test_a_hogwild_step_through_the_c_linears_equals_a_plain_forward(calls):
    """One layer wide enough that its linear layers take the C kernel: each worker's logits equal a plain
    forward over its view, and every step's linear layers large enough were the kernel's (the prefill's many
    rows not)."""
    cfg = family_config("llama")
    cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers = 512, 1024, 1
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = 8, 4, 64
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    ref = copy.deepcopy(model)
    cache = HogwildCache.for_model(model, workers=3, step_capacity=8)
    g = torch.Generator().manual_seed(1)
    cache.prefill_history(torch.randint(3, cfg.vocab_size, (12,), generator=g))
    assert not any(calls)
    for t in range(4):
        calls.clear()
        logits = cache.step(torch.randint(3, cfg.vocab_size, (3,), generator=g))
        assert calls == [True] * 7 + [False]  # q, k, v, o, gate, up, down; the 128-token vocabulary's head is small
        for w in range(3):
            with torch.no_grad():
                plain = ref(cache.view_ids(w)[None]).logits[0, -1]
            torch.testing.assert_close(logits[w], plain, atol=2e-5, rtol=1e-4, msg=f"step {t} worker {w}")
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_a_batched_generate_inside_the_block_writes_what_it_writes_outside(calls):
    """What docs/api.md tells users to do with any batched decode: three prompts decoded greedily by
    `generate`, their steps' linear layers through the kernel, give the tokens they give without it."""
    cfg = family_config("llama")
    cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers = 512, 1024, 2
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = 8, 4, 64
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    model.generation_config.pad_token_id = 0
    ids = torch.randint(3, cfg.vocab_size, (3, 9), generator=torch.Generator().manual_seed(2))
    kw = {"max_new_tokens": 6, "do_sample": False, "attention_mask": torch.ones_like(ids)}
    plain = model.generate(ids, **kw)
    assert not any(calls)
    with FewRowLinears(model):
        routed = model.generate(ids, **kw)
    assert any(calls)  # the decode steps' three rows took the kernel
    assert torch.equal(routed, plain)
