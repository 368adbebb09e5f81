"""docs/remote.md's two-machine example runs as written against a real server, and machine B's answer is the
one a plain `generate` over the whole prompt gives."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import transformers as tf
from redis_server import with_name
from tiny import TEXT, save_tiny_model

pytestmark = pytest.mark.redis
ROOT = Path(__file__).resolve().parent.parent
DOC_URL = "redis://kvtier:PASSWORD@kv.internal:6379/0/q3-report"
DOC_CACHE = "/var/cache/kvtier/q3-report"


def test_the_two_machine_example_runs_and_answers_as_a_full_prompt_does(redis_url, tmp_path, monkeypatch):
    page = (ROOT / "docs" / "remote.md").read_text()
    machine_a, machine_b = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    assert DOC_URL in machine_a and DOC_URL in machine_b and DOC_CACHE in machine_b
    url = with_name(redis_url, "q3-report")
    path = save_tiny_model(tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "q3-report.txt").write_text(" ".join(TEXT[:12]))

    def machine(code: str, name: str) -> dict:
        """Run one block with its own model and tokenizer, as on its own machine."""
        torch.manual_seed(0)
        scope = {"tokenizer": tf.AutoTokenizer.from_pretrained(path),
                 "model": tf.AutoModelForCausalLM.from_pretrained(path).eval()}
        code = code.replace(DOC_URL, url).replace(DOC_CACHE, str(tmp_path / "b-cache"))
        exec(compile(code, f"docs/remote.md ({name})", "exec"), scope)
        return scope

    a = machine(machine_a, "machine A")
    b = machine(machine_b, "machine B")
    assert b["cache"].remote is not None and "PASSWORD" not in b["cache"].remote
    assert torch.equal(b["ids"][:, :a["doc_ids"].shape[1]], a["doc_ids"])  # the session's ids are the document's
    plain = tf.AutoModelForCausalLM.from_pretrained(path).eval()
    want = plain.generate(input_ids=b["ids"], max_new_tokens=64, do_sample=False)
    assert torch.equal(b["out"], want)
    assert (tmp_path / "b-cache").is_dir()  # machine B's records stay in its local cache
