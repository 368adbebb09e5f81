"""The committed retrieval checkpoint ships a tokenizer that encodes text exactly as the model was trained on it,
and `kvtier qa` answers with it."""

from __future__ import annotations

import importlib.util
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import transformers as tf

from kvtier.bench import tasks as T

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT = ROOT / "checkpoints" / "retrieval-llama"
TEXTS = [
    "The grass is green. The sky is blue.",
    "apple amber KEY VAR tiger: words of the vocabulary stay bytes inside a text",
    "  leading spaces, tabs\tand\nnew lines\r\n, trailing space ",
    "UTF-8: wörld, 日本語, emoji 🙂, a lone combining mark \u0301 and a zero-width joiner \u200d.",
    "",
]


@pytest.fixture(scope="module")
def tok():
    return tf.AutoTokenizer.from_pretrained(CHECKPOINT)


def _training_script():
    spec = importlib.util.spec_from_file_location("train_retrieval_model", ROOT / "scripts" / "train_retrieval_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("text", TEXTS)
def test_text_encodes_byte_by_byte_as_in_training(tok, text):
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids == T.encode_text(text)
    assert tok(text).input_ids == [T.BOS, *T.encode_text(text)]  # a prompt starts with <bos>, as in training
    assert tok.decode(ids) == text


@pytest.mark.parametrize("task", T.TASKS)
def test_training_prompts_round_trip_through_text(tok, task):
    """Every id of a task prompt (bytes, special tokens, key and value words) decodes to text that encodes back
    to the same ids."""
    ex = T.make_example(task, 700, random.Random(3))
    ids = ex.prompt_ids + ex.answer_ids
    text = tok.decode(ids)
    assert tok(text, add_special_tokens=False).input_ids == ids
    for word, token in (*T.KEY_TOKENS.items(), *T.VALUE_TOKENS.items()):
        assert tok.convert_ids_to_tokens(token) in (f"<key:{word}>", f"<value:{word}>")
    for token, name in T.SPECIAL_TOKENS.items():
        assert tok.convert_tokens_to_ids(name) == token
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (T.BOS, T.EOS, T.PAD)
    assert max(tok.get_vocab().values()) < T.VOCAB_SIZE


def test_chat_template_builds_the_task_prompt(tok):
    """What `kvtier qa` sends (document, a blank line, "Question: ...") becomes `<bos> document <query> question`."""
    text = tok.apply_chat_template([{"role": "user", "content": "Question: not this one\n\nQuestion: What?"}],
                                   tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids == [T.BOS, *T.encode_text("Question: not this one"), T.QUERY, *T.encode_text("What?")]


def test_the_committed_tokenizer_is_what_the_training_script_writes(tmp_path):
    _training_script().save_tokenizer(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (tmp_path / name).read_text() == (CHECKPOINT / name).read_text(), f"{name} differs: rerun " \
            "python scripts/train_retrieval_model.py --tokenizer-only checkpoints/retrieval-llama"


def test_qa_answers_the_example_passkey_with_the_checkpoint(tmp_path):
    """The tutorial's offline example: the committed model finds the pass key in examples/passkey.txt."""
    doc = ROOT / "examples" / "passkey.txt"
    needle = doc.read_text().split("<needle>The pass key is")[1].split("</needle>")[0]
    exe = shutil.which("kvtier")
    cmd = [exe] if exe else [sys.executable, "-m", "kvtier.cli"]
    out = subprocess.run([*cmd, "qa", "--model", str(CHECKPOINT), "--doc", str(doc), "--store", str(tmp_path / "s"),
                          "--question", "What is the pass key? The pass key is", "--max-new-tokens", "4", "--json"],
                         capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["answer"] == needle
