"""`kvtier qa` and `kvtier inspect` through the real entry point, on a tiny model with a real tokenizer."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_model
from tiny import save_tiny_model

from kvtier import KVTierCache, ModelSpec, cache_argument, parse_budget

DOC = " ".join(["The pass key is 71432. Remember it."] + ["The grass is green and the sky is blue."] * 120)


def kvtier(*args: str, stdin: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    exe = shutil.which("kvtier")
    cmd = [exe, *args] if exe else [sys.executable, "-m", "kvtier.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, input=stdin, env=env)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    save_tiny_model(root / "model")
    save_tiny_model(root / "other", family="qwen2")
    (root / "doc.txt").write_text(DOC)
    return root


def _one_error_line(out: subprocess.CompletedProcess, text: str) -> None:
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and text in errors[0], out.stderr


def test_qa_prefills_once_then_reopens(tiny, tmp_path):
    store = tmp_path / "store"
    args = ["qa", "--model", str(tiny / "model"), "--doc", str(tiny / "doc.txt"), "--store", str(store),
            "--device-budget", "200", "--max-new-tokens", "6", "--question", "What is the pass key?"]
    first = kvtier(*args)
    assert first.returncode == 0, first.stderr
    assert "prefilling" in first.stderr and "prefill" in first.stderr and "tok/s" in first.stderr
    assert "context" in first.stderr and "first token" in first.stderr and "tiers device" in first.stderr
    second = kvtier(*args)
    assert second.returncode == 0, second.stderr
    assert "prefilling" not in second.stderr and "first token" in second.stderr
    # answers are streamed to stdout and the same both times (greedy, same prefix)
    assert first.stdout.strip() == second.stdout.strip()


def test_qa_interactive_loop_answers_each_line(tiny, tmp_path):
    out = kvtier("qa", "--model", str(tiny / "model"), "--doc", str(tiny / "doc.txt"), "--store", str(tmp_path / "s"),
                 "--max-new-tokens", "4", "--quiet", stdin="First question?\nSecond question?\n\n")
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("first token") == 2 and len(out.stdout.strip().splitlines()) >= 1


def test_qa_sizes_dtype_exact_mode_and_plain_prompt(tiny, tmp_path):
    out = kvtier("qa", "--model", str(tiny / "model"), "--doc", str(tiny / "doc.txt"), "--store", str(tmp_path / "s"),
                 "--device-budget", "128KiB", "--host-budget", "0", "--mode", "exact", "--dtype", "float32",
                 "--no-chat-template", "--max-new-tokens", "3", "--question", "Key?", "--quiet")
    assert out.returncode == 0, out.stderr
    desc = json.loads(kvtier("inspect", str(tmp_path / "s"), "--json").stdout)
    assert desc["options"]["mode"] == "exact" and desc["info"]["template"] == "plain"
    assert desc["options"]["device_budget"] == 128 * 1024 // (2 * 2 * 16 * 4 * 2)  # 2 layers, 2 KV heads of 16, fp32


def test_qa_errors_are_one_line(tiny, tmp_path):
    base = ["--doc", str(tiny / "doc.txt"), "--question", "x"]
    _one_error_line(kvtier("qa", "--model", str(tiny / "model"), "--doc", str(tmp_path / "missing.txt"),
                           "--question", "x"), "document not found")
    _one_error_line(kvtier("qa", "--model", str(tiny / "doc.txt"), *base), "is not a causal language model")
    _one_error_line(kvtier("qa", "--model", str(tmp_path), *base), "is not a causal language model")
    store = tmp_path / "s"
    assert kvtier("qa", "--model", str(tiny / "model"), *base, "--store", str(store), "--max-new-tokens", "2").returncode == 0
    _one_error_line(kvtier("qa", "--model", str(tiny / "other"), *base, "--store", str(store)), "another model")
    _one_error_line(kvtier("qa", "--model", str(tiny / "model"), *base, "--device-budget", "lots"), "budget")


def test_qa_refuses_a_store_of_another_document(tiny, tmp_path):
    store = tmp_path / "s"
    base = ["--model", str(tiny / "model"), "--question", "x", "--store", str(store), "--max-new-tokens", "2"]
    assert kvtier("qa", "--doc", str(tiny / "doc.txt"), *base).returncode == 0
    other = tmp_path / "other.txt"
    other.write_text("A different document entirely. " * 50)
    _one_error_line(kvtier("qa", "--doc", str(other), *base), "holds another document")
    assert kvtier("qa", "--doc", str(other), *base, "--rebuild").returncode == 0


def test_inspect_reports_and_plots(tiny, tmp_path):
    store = tmp_path / "s"
    assert kvtier("qa", "--model", str(tiny / "model"), "--doc", str(tiny / "doc.txt"), "--store", str(store),
                  "--question", "x", "--max-new-tokens", "2", "--device-budget", "160").returncode == 0
    out = kvtier("inspect", str(store), "--plot", str(tmp_path / "p.png"))
    assert out.returncode == 0, out.stderr
    for text in ("model       llama: 2 layers", "context", "compression", "chunk min/med/max", "top5%", "desert"):
        assert text in out.stdout
    assert (tmp_path / "p.png").stat().st_size > 1000
    desc = json.loads(kvtier("inspect", str(store), "--json").stdout)
    assert desc["session"] == "complete" and len(desc["layers"]) == 2
    assert sum(layer["chunks"] for layer in desc["layers"]) > 2 and desc["compression_ratio"] > 0.5
    _one_error_line(kvtier("inspect", str(tmp_path / "nothing")), "no kvtier store")


def test_parse_budget():
    spec = ModelSpec.from_model(build_model("llama"))  # 4 full layers, 2 KV heads of 16, fp32
    per_token = 2 * 2 * 16 * 4
    assert parse_budget("8192", spec) == 8192 and parse_budget(300, spec) == 300
    assert parse_budget("1MiB", spec) == 2**20 // (per_token * 4)
    assert parse_budget("1.5GB", spec) == int(1.5e9 // (per_token * 4))
    assert parse_budget("1MiB", spec, torch.bfloat16) == 2**20 // (per_token // 2 * 4)
    for bad in ("lots", "1.5", "8 parsecs", "-3"):
        with pytest.raises(ValueError, match="budget"):
            parse_budget(bad, spec)


def test_cache_info_survives_a_reopen(tmp_path):
    model = build_model("llama")
    cache = KVTierCache.for_model(model, store_path=tmp_path / "s")
    model(input_ids=torch.randint(3, 128, (1, 30)), **{cache_argument(model): cache})
    cache.save(info={"document": "a.txt"})
    cache.close()
    again = KVTierCache.open(tmp_path / "s", model)
    assert again.info == {"document": "a.txt"}
    again.close()
