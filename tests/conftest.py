"""Shared fixtures: tiny random models of every supported family, built offline in milliseconds."""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf

sys.path.insert(0, str(Path(__file__).parent))  # helpers importable as `from helpers import ...`

from redis_server import private_redis, redis_base, redis_url  # noqa: E402,F401 - fixtures for the remote tier

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # one process per core already: a second torch thread only competes
    torch.set_num_threads(1)
tf.logging.set_verbosity_error()

VOCAB = 128
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
WINDOW = 24


def family_config(name: str):
    if name == "llama":
        return tf.LlamaConfig(**_COMMON)
    if name == "mistral":  # every layer sliding
        return tf.MistralConfig(**_COMMON, sliding_window=WINDOW)
    if name == "qwen2":  # qkv bias, sliding layers from max_window_layers on
        return tf.Qwen2Config(**_COMMON, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2)
    if name == "qwen3":  # q/k norm
        return tf.Qwen3Config(**_COMMON, head_dim=16)
    if name == "phi3":  # fused qkv, partial rotary
        return tf.Phi3Config(**_COMMON, partial_rotary_factor=0.5)
    if name == "gemma2":  # softcap, alternating sliding
        return tf.Gemma2Config(**_COMMON, head_dim=16, sliding_window=WINDOW, attn_logit_softcapping=20.0)
    if name == "gemma3":  # local/global RoPE, alternating sliding
        return tf.Gemma3TextConfig(
            **_COMMON, head_dim=16, sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        )
    if name == "gpt_oss":  # attention sinks (s_aux), alternating sliding, MoE, YaRN RoPE
        return tf.GptOssConfig(
            **_COMMON, head_dim=16, sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        )
    if name == "gpt2":  # no RoPE
        return tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=4, n_head=4, n_positions=1024,
                             bos_token_id=1, eos_token_id=2, pad_token_id=0)
    raise KeyError(name)


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "gpt_oss", "gpt2"]


def build_model(name: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(family_config(name))
    with torch.no_grad():  # sink logits initialise near 0; trained ones differ per head, so a head mix-up shows
        for module in model.modules():
            if isinstance(getattr(module, "sinks", None), torch.nn.Parameter):
                module.sinks.normal_(0.0, 2.0)
    model = model.to(dtype).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None  # random models: never stop early, compare full lengths
    return model


def twin(model: torch.nn.Module) -> torch.nn.Module:
    """An independent copy (the kvtier one gets its attention switched; the reference keeps its own)."""
    return copy.deepcopy(model)


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def llama() -> torch.nn.Module:
    return build_model("llama")


def pytest_addoption(parser):
    parser.addoption("--fuzz-examples", type=int, default=40,
                     help="random damages tests/test_store_fuzz.py tries (default 40: seconds)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
