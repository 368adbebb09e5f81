"""kvtier.rope: `rotate` is the model's own RoPE, `shift` moves a rotated key or query exactly (one rotation, the
attention scaling not applied twice), and the relative-position identity Hogwild's per-block query rotation and
TIM's span removal rely on holds; RoPE whose frequencies change with the length, and models without RoPE, are refused.
"""

from __future__ import annotations

import functools
import importlib

import pytest
import torch
import transformers as tf
from conftest import family_config
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.errors import UnsupportedModelError
from kvtier.rope import Rope

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _llama(**rope):
    return lambda: tf.LlamaConfig(**COMMON, rope_parameters={"rope_theta": 10000.0, **rope})


CONFIGS = {  # name -> tiny config: what it exercises
    "llama": lambda: family_config("llama"),  # default
    "llama-linear": _llama(rope_type="linear", factor=4.0),
    "llama-llama3": _llama(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                           original_max_position_embeddings=64),
    "llama-yarn": _llama(rope_type="yarn", factor=4.0, original_max_position_embeddings=256),  # scaling 1.14
    "qwen2": lambda: family_config("qwen2"),
    "qwen3": lambda: family_config("qwen3"),
    "phi3": lambda: family_config("phi3"),  # partial rotary: 8 of 16 channels
    "stablelm": lambda: tf.StableLmConfig(**COMMON, partial_rotary_factor=0.25),  # 4 of 16
    "glm": lambda: tf.GlmConfig(**COMMON, head_dim=16, partial_rotary_factor=0.5),  # partial and interleaved
    "glm4": lambda: tf.Glm4Config(**COMMON, head_dim=16),
    "cohere": lambda: tf.CohereConfig(**COMMON),  # interleaved by its rotary module
    "cohere2": lambda: tf.Cohere2Config(**COMMON, head_dim=16),
    "helium": lambda: tf.HeliumConfig(**COMMON, head_dim=16),
    "ernie4_5": lambda: tf.Ernie4_5Config(**COMMON, head_dim=16),
    "gemma2": lambda: family_config("gemma2"),
    "gemma3": lambda: family_config("gemma3"),  # local (theta 1e4) and global (theta 1e6) RoPE
    "gpt_oss": lambda: family_config("gpt_oss"),  # yarn, truncate=False, half-width cos/sin
}
# (config name, layer type) for every distinct RoPE in the table
CASES = [(name, None) for name in CONFIGS if name != "gemma3"] + [("gemma3", "sliding_attention"),
                                                                    ("gemma3", "full_attention")]
POS = st.integers(0, 4000)


@functools.cache
def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(CONFIGS[name]()).eval()


@functools.cache
def _rope(name: str, layer_type: str | None) -> Rope:
    return Rope.from_model(_model(name), layer_type)


def _model_rotate(name: str, layer_type: str | None, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D] rotated at positions [B, T] by the model's own rotary module and apply_rotary_pos_emb."""
    model = _model(name)
    rotary = model.model.rotary_emb
    cos, sin = rotary(x, positions) if layer_type is None else rotary(x, positions, layer_type)
    apply = importlib.import_module(type(model).__module__).apply_rotary_pos_emb
    r = getattr(model.model.layers[0].self_attn, "rotary_ndims", x.shape[-1])  # StableLM splits before apply
    return torch.cat((apply(x[..., :r], x[..., :r], cos, sin)[0], x[..., r:]), dim=-1)


def _x(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _head_dim(name: str) -> int:
    return _model(name).model.layers[0].self_attn.head_dim


@pytest.mark.parametrize("name, layer_type", CASES)
def test_rotate_is_the_models_rope(name, layer_type):
    """(a) At scattered positions per row (up to 4x the trained length), rotate == the model's own RoPE."""
    rope, d = _rope(name, layer_type), _head_dim(name)
    x = _x(2, 3, 7, d)
    positions = torch.stack([torch.tensor([0, 1, 2, 50, 511, 1023, 4095]), torch.randperm(4096)[:7]])
    torch.testing.assert_close(rope.rotate(x, positions), _model_rotate(name, layer_type, x, positions),
                               rtol=1e-6, atol=1e-6)
    # one row of positions for every sequence (a [T] tensor) is the same as that row repeated
    torch.testing.assert_close(rope.rotate(x, positions[0]), rope.rotate(x, positions[0].expand(2, -1)))


@pytest.mark.parametrize("name, layer_type", CASES)
def test_factors_made_once_shift_as_shift_does(name, layer_type):
    """`shift_factors` made once and applied by `shift_by` to several tensors (as every layer of a Hogwild step
    turns its queries by one set of distances) give `shift`'s bits, for a scalar, per-token or per-row delta and
    for a strided x (whose result is contiguous)."""
    rope, d = _rope(name, layer_type), _head_dim(name)
    for delta in (torch.tensor(-37), torch.arange(7) * 11 - 20, torch.randint(-500, 500, (2, 7))):
        factors = rope.shift_factors(delta, d, torch.device("cpu"))
        for seed, dtype in ((0, torch.float32), (1, torch.float32), (2, torch.bfloat16)):
            x = _x(2, 3, 7, d, seed=seed, dtype=dtype)
            assert torch.equal(rope.shift_by(x, factors), rope.shift(x, delta))
        strided = _x(3, 2, 7, d, seed=3).transpose(0, 1)  # [2, 3, 7, D] viewed across another layout
        moved = rope.shift_by(strided, factors)
        assert moved.is_contiguous() and torch.equal(moved, rope.shift(strided.contiguous(), delta))


def test_bad_factors_and_deltas_are_one_line_errors():
    rope = _rope("llama", None)
    d = _head_dim("llama")
    for call, says in ((lambda: rope.shift_factors(1.5, d, torch.device("cpu")), "must be an int or an integer"),
                       (lambda: rope.shift_factors(torch.tensor([0.5]), d, torch.device("cpu")), "whole positions"),
                       (lambda: rope.shift_factors(3, "64", torch.device("cpu")), "width must be the int"),
                       (lambda: rope.shift_by(_x(1, 2, 3, d), rope.shift_factors(torch.arange(5), d, torch.device("cpu"))),
                        "do not fit x"),
                       (lambda: rope.shift_by(torch.zeros(2, 3, d, dtype=torch.long), rope.shift_factors(1, d, "cpu")),
                        "floating-point tensors")):
        with pytest.raises(ValueError, match=says):
            call()


@pytest.mark.parametrize("name, layer_type", CASES)
def test_rotate_in_bfloat16_is_the_models_rope(name, layer_type):
    """In x's dtype, as the model: the same bits, except where the model computes in float32 and rounds once
    (Cohere, Ernie): there within one bfloat16 step."""
    rope, x = _rope(name, layer_type), _x(2, 3, 7, _head_dim(name), dtype=torch.bfloat16)
    positions = torch.tensor([[0, 3, 17, 300, 1000, 2047, 4095]]).expand(2, -1)
    ours, model = rope.rotate(x, positions), _model_rotate(name, layer_type, x, positions)
    if name in ("cohere", "cohere2", "ernie4_5"):
        torch.testing.assert_close(ours, model, rtol=2**-7, atol=2**-5)
    else:
        assert torch.equal(ours, model)


@pytest.mark.parametrize("name, layer_type", CASES)
def test_from_config_agrees_with_the_model(name, layer_type):
    from_config = Rope.from_config(CONFIGS[name](), layer_type)
    from_model = _rope(name, layer_type)
    torch.testing.assert_close(from_config.inv_freq, from_model.inv_freq, rtol=0, atol=0)
    assert from_config.attention_scaling == from_model.attention_scaling
    assert from_config.interleaved == from_model.interleaved


def test_rotary_width_and_scaling_come_from_the_model():
    assert [_rope(n, None).rotary_dim for n in ("llama", "phi3", "stablelm", "glm")] == [16, 8, 4, 8]
    assert _rope("llama-yarn", None).attention_scaling == pytest.approx(0.1 * torch.log(torch.tensor(4.0)).item() + 1)
    assert _rope("llama", None).attention_scaling == 1.0
    assert _rope("glm", None).interleaved and _rope("cohere", None).interleaved and not _rope("llama", None).interleaved
    local, glob = _rope("gemma3", "sliding_attention"), _rope("gemma3", "full_attention")
    assert local.inv_freq[1] > glob.inv_freq[1]  # theta 1e4 against 1e6


def _shift_tolerance(*positions: int) -> float:
    """Float32 angles p * inv_freq carry up to 6e-8 * |p| radians of rounding (inv_freq <= 1), on either side of
    the comparison, times |x| (a few units): a wrong frequency or a scaling applied twice is far beyond it."""
    return 3e-7 * (1 + sum(abs(p) for p in positions))


@settings(max_examples=80, deadline=None)
@given(case=st.sampled_from(CASES), p=POS, d=st.integers(-4000, 4000), per_token=st.booleans())
def test_shift_is_rotation_by_delta(case, p, d, per_token):
    """(b) shift(rotate(x, p), d) == rotate(x, p + d), for either sign of d (TIM moves kept keys left by a
    pruned span's length), with a delta per token as well as one for all; yarn's scaling is applied once."""
    rope, x = _rope(*case), _x(2, 2, 6, _head_dim(case[0]), seed=p)
    positions = p + torch.arange(6)
    delta = d + torch.arange(6) * 3 if per_token else d
    tol = _shift_tolerance(p + 6, d + 18)
    torch.testing.assert_close(rope.shift(rope.rotate(x, positions), delta), rope.rotate(x, positions + delta),
                               rtol=0, atol=tol)


@settings(max_examples=60, deadline=None)
@given(case=st.sampled_from(CASES), i=POS, block=POS, offset=POS)
def test_query_rotation_stands_for_moving_the_block(case, i, block, offset):
    """(c) Hogwild: a block's keys are stored rotated at block-local positions j; placed at `offset` in a worker's
    view, the logits of the worker's query at i are those of keys at offset + j. Turning the query by -offset
    (one rotation per block) gives them, and so does moving the keys by +offset."""
    rope, d = _rope(*case), _head_dim(case[0])
    q, k = rope.rotate(_x(2, 4, 1, d, seed=i), i), _x(2, 4, 9, d, seed=block + 1)
    local = block + torch.arange(9)  # the block's keys, stored at their own positions
    want = q @ rope.rotate(k, offset + local).transpose(-1, -2)  # keys where the view puts them
    tol = _shift_tolerance(i, offset, block + 9, offset + block + 9)
    torch.testing.assert_close(rope.shift(q, -offset) @ rope.rotate(k, local).transpose(-1, -2), want,
                               rtol=0, atol=tol)
    torch.testing.assert_close(q @ rope.shift(rope.rotate(k, local), offset).transpose(-1, -2), want,
                               rtol=0, atol=tol)


@settings(max_examples=60, deadline=None)
@given(case=st.sampled_from(CASES), d=st.integers(-4000, 4000), seed=st.integers(0, 99),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_shift_bounds_hold_for_the_moved_keys(case, d, seed, dtype):
    """A chunk's abstract (min and max per channel) moved with `shift_bounds` still bounds its keys moved with
    `shift`, in the keys' dtype too (rounded outwards): how a chunk on disk follows a removed span unread."""
    rope = _rope(*case)
    k = rope.rotate(_x(2, 3, 16, _head_dim(case[0]), seed=seed), torch.arange(16) + 100).to(dtype)
    lo, hi = rope.shift_bounds(k.amin(dim=2), k.amax(dim=2), d)
    moved = rope.shift(k, d)
    assert lo.dtype == hi.dtype == dtype
    assert (lo <= moved.amin(dim=2)).all() and (moved.amax(dim=2) <= hi).all()
    if d == 0 and dtype == torch.float32:  # no turn: the bounds stay exact
        torch.testing.assert_close(lo, k.amin(dim=2), rtol=0, atol=1e-6)


def test_shift_keeps_dtype_and_leaves_unrotated_channels():
    rope = _rope("phi3", None)  # rotates 8 of 16 channels
    k = rope.rotate(_x(1, 2, 4, 16, dtype=torch.bfloat16), torch.arange(4))
    moved = rope.shift(k, -3)
    assert moved.dtype == torch.bfloat16
    assert torch.equal(moved[..., 8:], k[..., 8:])
    assert torch.equal(rope.shift(k, 0), k)


def test_for_layers_follows_layer_types():
    gemma3 = Rope.for_layers(_model("gemma3"))
    types = _model("gemma3").config.layer_types
    assert len(gemma3) == len(types)
    assert all(r is gemma3[types.index(t)] for r, t in zip(gemma3, types))
    assert gemma3[types.index("sliding_attention")] is not gemma3[types.index("full_attention")]
    llama = Rope.for_layers(_model("llama"))
    assert len(llama) == 4 and len(set(map(id, llama))) == 1


def test_per_layer_type_rope_needs_the_layer_type():
    with pytest.raises(ValueError, match=r"pass `layer_type`, one of \['full_attention', 'sliding_attention'\]"):
        Rope.from_model(_model("gemma3"))


def test_an_unknown_layer_type_is_refused():
    with pytest.raises(ValueError, match=r"llama has no layer type 'zzz'; leave `layer_type` out"):
        Rope.from_model(_model("llama"), layer_type="zzz")


@pytest.mark.parametrize("call, message", [
    (lambda r, x: r.rotate(x, torch.arange(5)), r"positions of shape \(5,\) does not fit x of shape \(1, 2, 4, 16\)"),
    (lambda r, x: r.rotate(x, torch.zeros(3, 4, dtype=torch.long)), r"pass \(\), \[T\] = \[4\] or \[B, T\]"),
    (lambda r, x: r.rotate(x, None), r"positions must be an int or an integer tensor, got None"),
    (lambda r, x: r.shift(x, float("nan")), r"delta must be an int or an integer tensor, got nan"),
    (lambda r, x: r.shift(x, 2.5), r"delta must be an int"),
    (lambda r, x: r.shift(x, True), r"delta must be an int"),
    (lambda r, x: r.shift(x, torch.tensor([1.5, 2.0, 0.0, 1.0])), r"delta must hold whole positions.*float32"),
    (lambda r, x: r.shift(x, 10**20), r"delta 100000000000000000000 is out of range"),
    (lambda r, x: r.shift(x.long(), 3), r"Rope turns floating-point tensors \[B, H, T, D\], got a torch.int64"),
    (lambda r, x: r.shift(x[0], 3), r"got a torch.float32 tensor of shape \(2, 4, 16\)"),
])
def test_bad_positions_and_tensors_are_refused(call, message):
    """Positions that are not whole numbers, that do not fit x, or a tensor RoPE cannot turn: one clear error
    instead of a torch broadcast error, a silent NaN or integer garbage."""
    rope = _rope("llama", None)
    with pytest.raises(ValueError, match=message):
        call(rope, _x(1, 2, 4, 16))


def test_numpy_and_python_ints_are_positions():
    import numpy as np

    rope, x = _rope("llama", None), _x(1, 2, 4, 16)
    assert torch.equal(rope.shift(x, np.int64(3)), rope.shift(x, 3))


@pytest.mark.parametrize("config, message", [
    (_llama(rope_type="dynamic", factor=2.0), r"llama uses dynamic-NTK RoPE.*cannot be moved exactly"),
    (lambda: tf.Phi3Config(**COMMON, rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 256,
        "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}), r"phi3 uses longrope.*cannot be moved exactly"),
    (lambda: family_config("gpt2"), r"gpt2 has no rotary position embedding \(RoPE\)"),
    (lambda: tf.Qwen2VLTextConfig(**COMMON, rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}), r"multimodal RoPE"),
])
def test_refused(config, message):
    """(d) Frequencies that change with the length, 3-D positions, or no RoPE at all: one clear error."""
    with pytest.raises(UnsupportedModelError, match=message):
        Rope.from_config(config())
    if not isinstance(config(), tf.Qwen2VLTextConfig):  # no causal-LM class for the text part alone
        with pytest.raises(UnsupportedModelError, match=message):
            Rope.from_model(tf.AutoModelForCausalLM.from_config(config()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_round_outward_gives_the_nearest_value_on_the_outer_side(dtype):
    """What `shift_bounds` and the float16 chunk bounds round with: a minimum down and a maximum up, each to the
    nearest value of the narrower type on that side (never past it), zeros and subnormals included."""
    from kvtier.rope import round_outward
    x = torch.cat([torch.randn(4096, generator=torch.Generator().manual_seed(3)) * 100,
                   torch.tensor([0.0, -0.0, 1e-9, -1e-9, 1.0, -2.5])])
    up, down = torch.tensor(float("inf"), dtype=dtype), torch.tensor(float("-inf"), dtype=dtype)
    lo, hi = round_outward(x, dtype, -1.0), round_outward(x, dtype, 1.0)
    assert lo.dtype == hi.dtype == dtype
    assert (lo.float() <= x).all() and (hi.float() >= x).all()
    assert (torch.nextafter(lo, up).float() > x).all() and (torch.nextafter(hi, down).float() < x).all()
    assert torch.equal(round_outward(x, torch.float32, 1.0), x)
