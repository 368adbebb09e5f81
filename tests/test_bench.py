"""The benchmark commands run end to end through the real `kvtier` entry point and write their JSON."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys


def _kvtier(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("kvtier")
    cmd = [exe, *args] if exe else [sys.executable, "-m", "kvtier.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_bench_exact_writes_json(tmp_path):
    out = _kvtier("bench", "exact", "--contexts", "600", "--steps", "2", "--layers", "2", "--kv-heads", "2",
                  "--out", str(tmp_path), "--no-plot")
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "exact.json").read_text())
    assert result["machine"]["torch"] and result["results"][0]["context"] == 600
    row = result["results"][0]
    for name in ("dynamic", "all-device", "disk-heavy"):
        assert row[name]["decode_step_ms"] > 0
    assert row["disk-heavy"]["disk_token_share"] > 0.5
    assert row["all-device"]["max_abs_logit_diff_vs_dynamic"] < 1e-4


def test_bench_codec_writes_json(tmp_path):
    out = _kvtier("bench", "codec", "--tokens", "256", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "codec.json").read_text())
    assert result["config"]["text_source"] == "generated"
    assert {r["byte_planes"] for r in result["results"]} == {True, False}


def test_unknown_command_fails_cleanly():
    out = _kvtier("bench", "nope")
    assert out.returncode == 2 and "invalid choice" in out.stderr
