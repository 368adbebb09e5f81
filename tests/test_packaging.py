"""Packaging: `kernels/` ships as `kvtier.kernels`, never as a top-level `kernels` that transformers would probe."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import kvtier.kernels

ROOT = Path(__file__).resolve().parent.parent


def test_no_top_level_kernels_package():
    assert importlib.util.find_spec("kernels") is None


def test_kernels_ship_inside_kvtier():
    assert Path(kvtier.kernels.__file__).resolve().parent == ROOT / "kernels"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```(?:bash|sh)\n(.*?)```", readme, flags=re.S)
    test_cmd = next(line.strip() for block in commands for line in block.splitlines() if line.strip().startswith(
        ("pip install -e \".[dev]\" && pytest", "pytest")))
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd.split("&&")[-1].strip() in ci
