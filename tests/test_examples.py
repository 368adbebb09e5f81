"""The examples run as a user would run them, on a tiny model saved with its tokenizer."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from tiny import save_tiny_model

ROOT = Path(__file__).resolve().parent.parent


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    """Run an example with a temp directory of its own, and check it leaves no store behind there."""
    with tempfile.TemporaryDirectory(prefix="kvtier-test-tmp-") as tmp:
        out = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], capture_output=True,
                             text=True, timeout=300, cwd=ROOT, env={**os.environ, "TMPDIR": tmp})
        assert out.returncode == 0, out.stderr
        # torch may keep its compile cache (torchinductor_<user>) in the temp directory; anything else is a leak
        left = sorted(p.name for p in Path(tmp).iterdir() if not p.name.startswith("torchinductor_"))
        assert not left, f"{script} left {left} in the temp directory"
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


def test_hogwild_runs(tiny):
    out = run("hogwild.py", "--model", str(tiny), "--workers", "2", "--max-new-tokens", "40")
    assert "stopped: " in out.stdout and "tokens per worker" in out.stdout and "each stored once" in out.stdout
    assert "[Alice, step 1," in out.stdout and "[Bob, step 1," in out.stdout  # steps as they joined the history


def test_training_script_finds_the_shared_data_beside_the_repository(tmp_path):
    """The default haystack is ../shared/data/ beside whichever checkout holds the script, not one machine's path."""
    script = tmp_path / "checkout" / "scripts" / "train_retrieval_model.py"
    script.parent.mkdir(parents=True)
    script.write_text((ROOT / "scripts" / "train_retrieval_model.py").read_text())
    env = {k: v for k, v in os.environ.items() if k != "KVTIER_HAYSTACK_DIR"}
    work = tmp_path / "work"
    work.mkdir()
    code = "import runpy, sys; print(runpy.run_path(sys.argv[1], run_name='probe')['DEFAULT_DATA_DIR'])"
    default = subprocess.run([sys.executable, "-c", code, str(script)], capture_output=True, text=True, timeout=300,
                             cwd=work, env=env)
    assert default.returncode == 0, default.stderr
    assert Path(default.stdout.strip()) == tmp_path / "shared" / "data" / "paul_graham_essays"
    # a directory asked for and missing is one line, before any checkpoint is read or written
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_retrieval_model.py"), "--eval-only",
                          str(work / "ckpt"), "--data-dir", str(work / "no-essays")], capture_output=True, text=True,
                         timeout=300, cwd=work, env=env)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    errors = [line for line in out.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "no-essays" in errors[0] and "--data-dir" in errors[0], out.stderr
    assert list(work.iterdir()) == []


def test_tim_example_runs_the_tool_and_prunes(tiny):
    out = run("tim.py", "--model", str(tiny), "--max-new-tokens", "20")
    lines = out.stdout.splitlines()
    assert "  tool calculator({\"expression\": \"3 * 8\"}) -> 24" in lines
    assert any(line.startswith("  pruned the sub-tasks of task root") for line in lines)
    assert "  answer: '48' (stopped: answer)" in lines
    assert out.stdout.count("answer:") == 2  # the constrained run ends too (on its budget, with random weights)
