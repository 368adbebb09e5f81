"""A tiny causal LM with a real (small, offline-trained) tokenizer and a chat template, saved to a folder:
what the CLI and the examples load in tests."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers as tf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
TEXT = [
    "kvtier keeps the KV cache on the GPU, in CPU memory and on disk.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Long documents are prefilled once and questioned many times.",
    "Question: what is the pass key? Answer: the pass key is 71432.",
] * 20


def build_tokenizer() -> tf.PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXT, trainer)
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                      unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tiny_model(path: Path, family: str = "llama", chat: bool = True) -> Path:
    tok = build_tokenizer()
    if not chat:
        tok.chat_template = None
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = tf.Qwen2Config(**common, use_sliding_window=True, sliding_window=64, max_window_layers=1) \
        if family == "qwen2" else tf.LlamaConfig(**common)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
