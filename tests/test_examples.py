"""The examples run as a user would run them, on a tiny model saved with its tokenizer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from tiny import save_tiny_model

ROOT = Path(__file__).resolve().parent.parent


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("examples") / "model")


def test_quickstart_runs():
    out = run("quickstart.py")
    assert "tokens per tier" in out.stdout
    assert "gives the same answer: True" in out.stdout


def test_long_doc_qa_prefills_then_reopens(tiny, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("The pass key is 71432. " + "The grass is green and the sky is blue. " * 150)
    args = ("--model", str(tiny), "--doc", str(doc), "--question", "What is the pass key?", "--question", "Why?",
            "--max-new-tokens", "5", "--device-budget", "200")
    first = run("long_doc_qa.py", *args)
    assert "prefilled" in first.stdout and first.stdout.count("Q: ") == 2 and "tiers:" in first.stdout
    second = run("long_doc_qa.py", *args)
    assert "reopened" in second.stdout and "no prefill" in second.stdout
    answers = lambda out: [line for line in out.stdout.splitlines() if line.startswith("A: ")]  # noqa: E731
    assert answers(first) == answers(second)


def test_custom_loop_runs(tiny):
    out = run("custom_loop.py", "--model", str(tiny), "--max-new-tokens", "300", "--prompt", "The pass key")
    assert "tokens cached" in out.stdout and "bytes moved per step" in out.stdout
