"""The docs describe the code that exists: every public name and every option is documented."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import kvtier
from kvtier import KVTierConfig

ROOT = Path(__file__).resolve().parent.parent
API = (ROOT / "docs" / "api.md").read_text()


def test_every_public_name_is_documented():
    missing = [name for name in kvtier.__all__ if f"`{name}" not in API]
    assert not missing, f"docs/api.md does not mention {missing}"


def test_every_option_is_documented_with_its_default():
    for field in dataclasses.fields(KVTierConfig):
        default = field.default
        row = next((line for line in API.splitlines() if line.startswith(f"| `{field.name}` |")), None)
        assert row is not None, f"option {field.name} missing from docs/api.md"
        assert f"`{default!r}`".replace("'", '"') in row, f"{field.name}: docs default differs from {default!r}"


def test_readme_links_resolve():
    readme = (ROOT / "README.md").read_text()
    import re

    for target in re.findall(r"\]\(([^)#]+)\)", readme):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), target
