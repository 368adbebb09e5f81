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


def weight_fingerprint(model: torch.nn.Module, values_per_tensor: int = 64) -> bytes:
    """Hash the first few values of every parameter: cheap, and different for any two trained models."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.device.type == "meta" or p.numel() == 0:
                continue
            head = p.detach().reshape(-1)[:values_per_tensor].to("cpu", torch.float32)
            h.update(name.encode())
            h.update(head.numpy().tobytes())
    return h.digest()
