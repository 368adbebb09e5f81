"""What kvtier needs to know about a model: layer kinds, KV shape, and a signature that ties a store to it."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch

from .errors import UnsupportedModelError
from .sparse.lookahead import decoder_layers

FULL = "full_attention"
SLIDING = "sliding_attention"
_SLIDING_ALIASES = {"sliding_attention", "sliding_window_attention", "local_attention"}
_FULL_ALIASES = {"full_attention", "global_attention", "attention"}

# Model features kvtier's attention would silently ignore: (feature, test on the decoder's text config).
# Attention sinks, sliding windows, softcapping and scaling are implemented (docs/how-it-works.md).
_REFUSED_FEATURES = (
    ("bidirectional attention (config.is_causal=False)", lambda c: getattr(c, "is_causal", True) is False),
    ("bidirectional attention (use_bidirectional_attention)",
     lambda c: bool(getattr(c, "use_bidirectional_attention", None))),
    ("chunked attention (attention_chunk_size)", lambda c: getattr(c, "attention_chunk_size", None) is not None),
    ("cross-attention (add_cross_attention)", lambda c: bool(getattr(c, "add_cross_attention", False))),
    ("multi-head latent attention (kv_lora_rank): keys and values of different widths",
     lambda c: getattr(c, "kv_lora_rank", None) is not None),
)


# What a store's signature covers. 2: the settings that shape the forward pass (below), and weights sampled
# across every tensor (`weight_fingerprint`); 1 (no `signature_version` in a store header): the first 64 values
# of every parameter alone.
SIGNATURE_VERSION = 2

# Config settings that change the keys and values a model computes from the same weights: RoPE (keys are stored
# rotated), norms, activations, attention scaling (a layer's output feeds the next layer's K and V). Only these
# named ones, where a config has them: the whole config would change with every transformers release that adds a
# field, and refuse a store the new version computes exactly as the old one did.
_FORWARD_SETTINGS = (
    "rope_theta", "rope_local_base_freq", "partial_rotary_factor", "rotary_dim", "rotary_pct", "rotary_emb_base",
    "max_position_embeddings", "rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_eps", "hidden_act",
    "hidden_activation", "activation_function", "query_pre_attn_scalar", "attn_logit_softcapping",
    "attention_multiplier", "embedding_multiplier", "residual_multiplier", "scale_embedding", "use_qk_norm",
    "scale_attn_weights", "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "normalize_embedding",
)
# The RoPE parameters transformers reads (rope_parameters, or rope_scaling before it), per layer type where a
# model has several (Gemma3: full and sliding).
_ROPE_KEYS = (
    "rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings", "low_freq_factor",
    "high_freq_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "short_factor",
    "long_factor", "partial_rotary_factor", "truncate",
)


@dataclass(frozen=True)
class LayerSpec:
    kind: str  # FULL (tiered) or SLIDING (device-resident, window-bounded)
    window: int | None = None  # sliding window W: a query at p sees keys in (p - W, p]


@dataclass(frozen=True)
class ModelSpec:
    model_type: str
    layers: tuple[LayerSpec, ...]
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    structure: dict  # architecture facts that must match for a store to be reused
    signature: str  # hex sha256 of structure + a weight fingerprint

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> "ModelSpec":
        config = getattr(model, "config", None)
        if config is None:
            raise UnsupportedModelError(f"{type(model).__name__} has no `config`; pass a transformers model")
        if getattr(config, "is_encoder_decoder", False):
            raise UnsupportedModelError(
                f"{type(model).__name__} is an encoder-decoder model; kvtier serves decoder-only causal LMs"
            )
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        _refuse_features(model, text)
        layers = _layer_specs(text)
        heads = _first_attr(text, ("num_attention_heads", "n_head"))
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        hidden = _first_attr(text, ("hidden_size", "n_embd"))
        head_dim = getattr(text, "head_dim", None) or hidden // heads
        params = list(model.parameters())
        dtype = params[0].dtype if params else torch.float32
        structure = {
            "model_type": getattr(text, "model_type", type(model).__name__),
            "num_layers": len(layers),
            "kv_heads": kv_heads,
            "head_dim": head_dim,
            "hidden_size": hidden,
            "vocab_size": getattr(text, "vocab_size", None),
            "layers": [[layer.kind, layer.window] for layer in layers],
            "signature_version": SIGNATURE_VERSION,
            "forward": forward_settings(text),
        }
        digest = hashlib.sha256(json.dumps(structure, sort_keys=True).encode())
        digest.update(weight_fingerprint(model))
        return cls(structure["model_type"], tuple(layers), kv_heads, head_dim, dtype, structure, digest.hexdigest())


def _refuse_features(model: torch.nn.Module, text) -> None:
    """Raise UnsupportedModelError naming the family and the first feature kvtier would not honour."""
    family = getattr(text, "model_type", None) or type(model).__name__
    for feature, present in _REFUSED_FEATURES:
        if present(text):
            raise UnsupportedModelError(f"{family} uses {feature}, which kvtier does not support")
    for index, layer in sorted(decoder_layers(model).items()):
        if getattr(layer.self_attn, "is_causal", True) is False:
            raise UnsupportedModelError(
                f"{family} layer {index} attends bidirectionally (is_causal=False), which kvtier does not support"
            )


def _first_attr(config, names: tuple[str, ...]) -> int:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    raise UnsupportedModelError(f"config {type(config).__name__} has none of {names}")


def _layer_specs(config) -> list[LayerSpec]:
    n = _first_attr(config, ("num_hidden_layers", "n_layer"))
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types is None:
        types = [SLIDING if window is not None else FULL] * n
    if len(types) != n:
        raise UnsupportedModelError(f"config has {len(types)} layer_types for {n} layers")
    specs = []
    for i, t in enumerate(types):
        if t in _FULL_ALIASES:
            specs.append(LayerSpec(FULL))
        elif t in _SLIDING_ALIASES:
            if window is None:
                raise UnsupportedModelError(f"layer {i} is {t!r} but the config has no sliding_window")
            specs.append(LayerSpec(SLIDING, int(window)))
        else:
            raise UnsupportedModelError(
                f"layer {i} has type {t!r}; kvtier supports full and sliding-window attention layers only"
            )
    return specs


def forward_settings(config) -> dict:
    """The settings of `_FORWARD_SETTINGS` and the RoPE parameters a config has, as JSON values. Wherever a
    transformers version keeps a RoPE parameter (on the config, or in `rope_parameters`/`rope_scaling`), it gets
    one name; per layer type where a model has several."""
    out = {name: _json_value(getattr(config, name)) for name in _FORWARD_SETTINGS
           if getattr(config, name, None) is not None}
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if isinstance(rope, dict):
        per_type = rope if rope and all(isinstance(v, dict) for v in rope.values()) else {"": rope}
        for kind, params in sorted(per_type.items()):
            for key in _ROPE_KEYS:
                if params.get(key) is not None:
                    name = "rope_type" if key == "type" else key
                    out[f"{kind}.{name}" if kind else name] = _json_value(params[key])
    # the context length changes the computation only for RoPE types that scale with it
    if {v for k, v in out.items() if k.endswith("rope_type")} <= {"default", "linear", "llama3"}:
        out.pop("max_position_embeddings", None)
    return out


def _json_value(value):
    """Numbers as floats (a config may say 10000 or 10000.0 for one setting), lists element by element."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, list | tuple):
        return [_json_value(v) for v in value]
    return str(value)


def weight_fingerprint(model: torch.nn.Module, values: int = 256) -> bytes:
    """Hash of every parameter's name, shape, dtype and values sampled across it: `values` spread evenly over
    the whole tensor, its first row and the first value of every row, rows along the last dimension (a
    fine-tune that trains some rows, such as new tokens' embeddings, or some input features, changes a sampled
    value; an expert tensor [experts, out, in] is read as experts x out rows). Exact bytes, so the same
    weights on any device give the same hash; reading a few values per row keeps it cheap for a 13B model."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.device.type == "meta" or p.numel() == 0:
                continue
            flat = p.detach().reshape(-1)
            rows = p.detach().reshape(-1, p.shape[-1]) if p.dim() > 1 else flat[None]  # rows of the last dim
            step = max(1, flat.numel() // values)
            parts = [flat[::step][:values], rows[0], rows[:, 0]]
            h.update(f"{name} {tuple(p.shape)} {p.dtype}".encode())
            for part in parts:
                part = part.to("cpu").clone(memory_format=torch.contiguous_format)  # [1] views keep odd strides
                h.update(part.view(torch.uint8).numpy().tobytes())
    return h.digest()
