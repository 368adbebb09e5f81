"""One RoPE helper for everything in kvtier that moves keys or queries in position without recomputing them.

Stored keys are rotated at their logical positions. Two features move them afterwards: Hogwild
(arXiv 2504.06261) rotates a worker's *query* by each block's offset in that worker's view, and TIM
(arXiv 2507.16784) moves the keys kept after a pruned span left by the span's length. RoPE
(arXiv 2104.09864) turns the pair (x_i, x_j) of a key by the angle p * inv_freq, so a key already at
p reaches p + d by one more turn through d * inv_freq: exact, with no recompute, provided the
frequencies never change with the sequence length.

`Rope` holds the model's own inverse frequencies (so default, linear, llama3 and yarn are exact), its
rotary width (partial rotary: Phi3, GLM, StableLM rotate the first R of D channels) and its attention
scaling (yarn multiplies cos and sin by it once, when a position is first applied; `shift` never does),
and the channel layout of the pairs:

    rotate-half (Llama, most):  pairs (i, i + R/2)   x = [x_0 .. x_{R/2-1} | x_{R/2} .. x_{R-1} | pass]
    interleaved (GLM, Cohere):  pairs (2i, 2i + 1)   x = [x_0 x_1 | x_2 x_3 | ... | pass]

Dynamic-NTK and longrope change their frequencies with the sequence length, so a key rotated under
one set cannot be moved exactly later; they are refused, as are models without RoPE.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from transformers import PreTrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from .errors import UnsupportedModelError, brief

SUPPORTED = ("default", "linear", "llama3", "yarn")  # static frequencies: moving a position is one rotation
# Families whose pairs are adjacent channels (their rotary module or apply_rotary_pos_emb interleaves).
INTERLEAVED_FAMILIES = frozenset({"cohere", "cohere2", "ernie4_5", "ernie4_5_moe", "glm", "glm4", "helium"})

Positions = torch.Tensor | int  # () for every token, [T], or [B, T] (one row per sequence, e.g. left padding)


@dataclass(frozen=True, eq=False)
class Rope:
    inv_freq: torch.Tensor  # [R/2] float32: R = rotary_dim <= head_dim; channels past R pass through
    attention_scaling: float = 1.0  # multiplies cos and sin where a position is applied (yarn), never in shift
    interleaved: bool = False  # pairs (2i, 2i+1) instead of (i, i + R/2)

    @property
    def rotary_dim(self) -> int:
        return 2 * self.inv_freq.numel()

    @classmethod
    def from_config(cls, config: PreTrainedConfig, layer_type: str | None = None) -> Rope:
        """From a transformers config: frequencies from `ROPE_INIT_FUNCTIONS` (the standard formula for
        "default"). Models whose RoPE differs per layer type (Gemma3: local and global) need `layer_type`."""
        text, params, layer_type = _rope_parameters(config, layer_type)
        if params.get("rope_type", "default") == "default":
            head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
            dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
            inv_freq = 1.0 / params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)
            scaling = 1.0
        else:
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[params["rope_type"]](text, layer_type=layer_type)
        return cls(inv_freq.float(), float(scaling), _family(text) in INTERLEAVED_FAMILIES)

    @classmethod
    def from_model(cls, model: torch.nn.Module, layer_type: str | None = None) -> Rope:
        """From a transformers model: the inverse frequencies and scaling its rotary module holds."""
        config = getattr(model, "config", None)
        text, _, layer_type = _rope_parameters(config, layer_type)
        found = [m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")]
        rotary = next((m for m in found if getattr(m, "config", None) is text), found[0] if found else None)
        prefix = f"{layer_type}_" if layer_type is not None else ""
        inv_freq = getattr(rotary, f"{prefix}inv_freq", None)
        if not isinstance(inv_freq, torch.Tensor):
            raise UnsupportedModelError(
                f"{_family(text)} has no rotary embedding module with `{prefix}inv_freq`, so kvtier cannot move "
                "its keys or queries in position"
            )
        scaling = getattr(rotary, f"{prefix}attention_scaling", 1.0)
        return cls(inv_freq.detach().float().clone(), float(scaling), _family(text) in INTERLEAVED_FAMILIES)

    @classmethod
    def for_layers(cls, model: torch.nn.Module) -> tuple[Rope, ...]:
        """One `Rope` per decoder layer (shared by the layers of one type; Gemma3's local and global differ)."""
        text, params = _text_and_params(getattr(model, "config", None))
        types = text.layer_types if _nested(params) else [None] * text.num_hidden_layers
        ropes = {t: cls.from_model(model, t) for t in set(types)}
        return tuple(ropes[t] for t in types)

    def rotate(self, x: torch.Tensor, positions: Positions) -> torch.Tensor:
        """Apply RoPE to unrotated x [B, H, T, D] at positions (() / [T] / [B, T]) as the model does: in x's
        dtype, attention scaling included."""
        _check_positions(x, positions, "positions")
        c, s = self._factors(positions, x.shape[-1], self.attention_scaling, x.device)
        c, s = _over_heads(c.to(x.dtype), s.to(x.dtype))
        return x * c + self._partner(x) * s  # the model's q * cos + rotate_half(q) * sin, rounded as it rounds

    def shift(self, x: torch.Tensor, delta: Positions) -> torch.Tensor:
        """Move x [B, H, T, D], already rotated, by delta positions (() / [T] / [B, T], either sign): one
        rotation through delta, without attention scaling (x carries it once already). Computed in float32
        and rounded once to x's dtype."""
        _check_positions(x, delta, "delta")
        return self._turn(x, self.shift_factors(delta, x.shape[-1], x.device))

    def shift_factors(self, delta: Positions, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The factors of a `shift` by delta of tensors of `width` channels, for `shift_by`: made once, they
        serve every tensor moved by the same delta (a Hogwild step turns every layer's queries alike, and on
        a GPU each of the kernels that make them costs more to launch than to run)."""
        _check_positions(None, delta, "delta")
        if not isinstance(width, int) or isinstance(width, bool):
            raise ValueError(f"width must be the int head_dim of the tensors to move, got {brief(width)}")
        return self._factors(delta, width, 1.0, device)

    def shift_by(self, x: torch.Tensor, factors: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """`shift` through factors from `shift_factors` (their delta broadcast over x as `shift` reads it)."""
        _check_x(x)
        f = _over_heads(factors[0])[0].shape
        # By hand: torch.broadcast_shapes measured ~16 us a call, a tenth of a Hogwild step's turn of its queries
        if len(f) > x.dim() or any(a != b and b != 1 for a, b in zip(reversed(x.shape), reversed(f))):
            raise ValueError(f"factors of shape {tuple(factors[0].shape)} do not fit x of shape {tuple(x.shape)}: "
                             "make them with shift_factors(delta, x.shape[-1], ...) for a delta that fits x")
        return self._turn(x, factors)

    def shift_bounds(self, lo: torch.Tensor, hi: torch.Tensor, delta: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Bounds (elementwise min and max over some keys, [..., D]) that hold for those keys moved by delta.

        A turn mixes the two channels of a pair, so the moved keys' exact bounds cannot be read off the old
        ones; interval arithmetic gives bounds that still hold (looser by up to a factor of sqrt 2 per pair).
        This is how a chunk's abstract follows a shift without reading the chunk (it may be on disk)."""
        angles = self._angles(delta, lo.device)
        cos, sin = angles.cos(), angles.sin()
        lo32, hi32 = lo.float(), hi.float()
        r = self.rotary_dim
        if self.interleaved:
            pick = lambda t: (t[..., 0:r:2], t[..., 1:r:2])  # noqa: E731
        else:
            pick = lambda t: (t[..., : r // 2], t[..., r // 2:r])  # noqa: E731
        (lo1, lo2), (hi1, hi2) = pick(lo32), pick(hi32)

        def scaled(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.minimum(a * c, b * c), torch.maximum(a * c, b * c)

        (c1lo, c1hi), (s2lo, s2hi) = scaled(lo1, hi1, cos), scaled(lo2, hi2, sin)
        (c2lo, c2hi), (s1lo, s1hi) = scaled(lo2, hi2, cos), scaled(lo1, hi1, sin)
        first = (c1lo - s2hi, c1hi - s2lo)  # x1 cos - x2 sin
        second = (c2lo + s1lo, c2hi + s1hi)  # x2 cos + x1 sin
        out = []
        for a, b, src in ((first[0], second[0], lo32), (first[1], second[1], hi32)):
            if self.interleaved:
                rot = torch.stack((a, b), dim=-1).flatten(-2)
            else:
                rot = torch.cat((a, b), dim=-1)
            out.append((rot if r == src.shape[-1] else torch.cat((rot, src[..., r:]), dim=-1)))
        return round_outward(out[0], lo.dtype, -1.0), round_outward(out[1], hi.dtype, 1.0)

    def _angles(self, positions: Positions, device: torch.device) -> torch.Tensor:
        p = torch.as_tensor(positions, device=device)
        return p[..., None].float() * self.inv_freq.to(device)  # positions.shape + [R/2]

    def _factors(self, positions: Positions, width: int, scaling: float,
                 device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel factors (c, s) of a turn to `positions`, float32, positions.shape + [width]: the turned
        x is x * c + partner(x) * s, with c = cos and s = -sin / +sin on each pair's first / second channel,
        and c = 1, s = 0 on channels past R (partial rotary passes them through)."""
        if self.rotary_dim > width:
            raise ValueError(f"x has {width} channels but this Rope rotates {self.rotary_dim}; pass [B, H, T, "
                             "head_dim]")
        angles = self._angles(positions, device if device is not None else self.inv_freq.device)
        cos, sin = angles.cos(), angles.sin()
        if scaling != 1.0:
            cos, sin = cos * scaling, sin * scaling
        if self.interleaved:
            c, s = torch.stack((cos, cos), dim=-1).flatten(-2), torch.stack((-sin, sin), dim=-1).flatten(-2)
        else:
            c, s = torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)
        if width > self.rotary_dim:
            c = torch.nn.functional.pad(c, (0, width - self.rotary_dim), value=1.0)
            s = torch.nn.functional.pad(s, (0, width - self.rotary_dim), value=0.0)
        return c, s

    def _partner(self, x: torch.Tensor) -> torch.Tensor:
        """Each channel's pair partner (channels past R: themselves), in one copy of x."""
        r = self.rotary_dim
        if self.interleaved:
            swapped = x[..., :r].unflatten(-1, (r // 2, 2)).flip(-1).flatten(-2)
            return swapped if r == x.shape[-1] else torch.cat((swapped, x[..., r:]), dim=-1)
        return torch.cat((x[..., r // 2 : r], x[..., : r // 2], x[..., r:]), dim=-1)

    def _turn(self, x: torch.Tensor, factors: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x [B, H, T, D] turned by `_factors` (positions () / [T] / [B, T]), in float32, rounded to x's dtype."""
        c, s = _over_heads(*factors)
        # Contiguous, whatever x's strides: attention reads the result without another copy. Not addcmul: a
        # fused multiply-add rounds once where `shift_bounds`' interval arithmetic rounds twice, and a moved
        # key could then pass its chunk's bound by one ulp.
        xf = x.float().contiguous()
        return (xf * c).add_(self._partner(xf) * s).to(x.dtype)


_MAX_POSITION = 2**62


def _check_positions(x: object, positions: object, name: str) -> None:
    """x must be a floating [B, H, T, D] tensor and positions whole numbers that broadcast over it as `rotate`
    and `shift` read them (() / [T] / [B, T]); checked on shapes and dtypes only, never on values of a tensor
    (which on a GPU would wait for the device). x None: positions alone, for factors made before any x."""
    if x is not None:
        _check_x(x)
    if isinstance(positions, torch.Tensor):
        if positions.is_floating_point() or positions.is_complex() or positions.dtype == torch.bool:
            raise ValueError(f"{name} must hold whole positions (an integer tensor), got {positions.dtype}")
        if x is None:
            if positions.dim() > 2:
                raise ValueError(f"{name} of shape {tuple(positions.shape)}: pass (), [T] or [B, T]")
            return
        b, _, t, _ = x.shape
        if not (positions.dim() == 0 or (positions.dim() == 1 and positions.shape[0] in (1, t))
                or (positions.dim() == 2 and positions.shape[0] in (1, b) and positions.shape[1] in (1, t))):
            raise ValueError(f"{name} of shape {tuple(positions.shape)} does not fit x of shape {tuple(x.shape)}: "
                             f"pass (), [T] = [{t}] or [B, T] = [{b}, {t}]")
    else:
        try:
            value = None if isinstance(positions, bool) else operator.index(positions)
        except TypeError:
            value = None
        if value is None:
            raise ValueError(f"{name} must be an int or an integer tensor, got {brief(positions)}")
        if abs(value) > _MAX_POSITION:
            raise ValueError(f"{name} {value} is out of range (at most 2**62 either way)")


def _check_x(x: object) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        what = f"a {x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"Rope turns floating-point tensors [B, H, T, D], got {what}")


def round_outward(x: torch.Tensor, dtype: torch.dtype, sign: float) -> torch.Tensor:
    """x (float32) in dtype, rounded away from the interval's inside (sign -1: down, for a minimum; +1: up,
    for a maximum) to the nearest value of dtype on that side, so a bound still holds after rounding to a
    narrower type. A finite x beyond dtype's range rounds to an infinity on its outer side."""
    if dtype == torch.float32:
        return x
    y = x.to(dtype)
    inward = y.float() > x if sign < 0 else y.float() < x
    return torch.where(inward, torch.nextafter(y, y.new_tensor(sign * float("inf"))), y)


def _over_heads(*ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """[B, T, R/2] -> [B, 1, T, R/2] so per-row positions broadcast over heads; () and [T] broadcast as they are."""
    return tuple(t[:, None] if t.dim() == 3 else t for t in ts)


def _family(config) -> str:
    return getattr(config, "model_type", None) or type(config).__name__


def _text_and_params(config) -> tuple:
    if config is None:
        raise UnsupportedModelError("kvtier.rope needs a transformers model or config (one with `config`)")
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    params = getattr(text, "rope_parameters", None)
    if not params:
        raise UnsupportedModelError(f"{_family(text)} has no rotary position embedding (RoPE), so kvtier cannot "
                                    "move its keys or queries in position")
    if getattr(text, "no_rope_layers", None):
        raise UnsupportedModelError(f"{_family(text)} mixes layers with and without RoPE (no_rope_layers); "
                                    "kvtier.rope cannot move positions in such models")
    return text, params


def _nested(params: dict) -> bool:
    """RoPE parameters per layer type, {layer_type: params} (Gemma3), rather than one set."""
    return all(v is None or isinstance(v, dict) for v in params.values())


def _rope_parameters(config, layer_type: str | None) -> tuple:
    """(text config, the RoPE parameters of layer_type, layer_type or None where parameters are shared);
    raises UnsupportedModelError where a position cannot be moved exactly."""
    text, params = _text_and_params(config)
    if not _nested(params):
        known = getattr(text, "layer_types", None) or ()
        if layer_type is not None and layer_type not in known:
            raise ValueError(f"{_family(text)} has no layer type {layer_type!r}"
                             + (f"; its layers are {sorted(set(known))}" if known else "; leave `layer_type` out"))
        layer_type = None
    elif layer_type not in params:
        raise ValueError(f"{_family(text)} has RoPE per layer type; pass `layer_type`, one of {sorted(params)}")
    else:
        params = params[layer_type]
    _check(_family(text), params)
    return text, params, layer_type


def _check(family: str, params: dict | None) -> None:
    if params is None:
        raise UnsupportedModelError(f"{family} has layers without RoPE; kvtier.rope does not support moving "
                                    "positions in such models")
    rope_type = params.get("rope_type", "default")
    if "dynamic" in rope_type:
        raise UnsupportedModelError(
            f"{family} uses dynamic-NTK RoPE (rope_type={rope_type!r}): its frequencies change with the sequence "
            f"length, so a key rotated once cannot be moved exactly; use one of {', '.join(SUPPORTED)}"
        )
    if rope_type == "longrope":
        raise UnsupportedModelError(
            f"{family} uses longrope, which switches frequencies when the sequence passes "
            "original_max_position_embeddings, so a key rotated once cannot be moved exactly; "
            f"use one of {', '.join(SUPPORTED)}"
        )
    if rope_type not in SUPPORTED:
        raise UnsupportedModelError(f"{family} uses rope_type={rope_type!r}; kvtier can move positions only "
                                    f"under {', '.join(SUPPORTED)}")
    if "mrope_section" in params:
        raise UnsupportedModelError(f"{family} uses multimodal RoPE (mrope_section) with 3-D positions; kvtier.rope "
                                    "moves 1-D positions only")
