"""Packaging: `kernels/` ships as `kvtier.kernels`, never as a top-level `kernels` that transformers would probe."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import kvtier.kernels

ROOT = Path(__file__).resolve().parent.parent


def test_no_top_level_kernels_package(tmp_path):
    """The installed kvtier exposes no top-level `kernels`: asked of a fresh interpreter, isolated (-I: no
    PYTHONPATH, no script directory) and started outside the repository, since `python -m pytest` from the root
    puts the root, and with it the `kernels/` folder, on this process's sys.path."""
    code = (
        "import importlib.metadata as md, importlib.util as u\n"
        "top = (md.distribution('kvtier').read_text('top_level.txt') or '').split()\n"
        "print(u.find_spec('kernels') is None, 'kernels' not in top)\n"
    )
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True"], "the installed kvtier ships a top-level `kernels` package"


def test_kernels_ship_inside_kvtier():
    assert Path(kvtier.kernels.__file__).resolve().parent == ROOT / "kernels"


def test_readme_says_cpu_torch_before_the_install_command():
    """A newcomer without a GPU reads the CPU torch note before running the command that would pull CUDA torch."""
    readme = (ROOT / "README.md").read_text()
    install = readme.index('pip install -e ".[dev]"')
    assert "download.pytorch.org/whl/cpu" in readme[:install]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```(?:bash|sh)\n(.*?)```", readme, flags=re.S)
    test_cmd = next(line.strip() for block in commands for line in block.splitlines() if line.strip().startswith(
        ("pip install -e \".[dev]\" && pytest", "pytest")))
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd.split("&&")[-1].strip() in ci
