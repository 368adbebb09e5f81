"""The docs describe the code that exists: every public name, every option and every flag is documented."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import kvtier
from kvtier import KVTierConfig
from kvtier.hogwild.cli import build_parser as hogwild_parser
from kvtier.qa import build_parser as qa_parser
from kvtier.report import build_parser as inspect_parser
from kvtier.tim.cli import build_parser as tim_parser

ROOT = Path(__file__).resolve().parent.parent
API = (ROOT / "docs" / "api.md").read_text()
CONFIG = (ROOT / "docs" / "configuration.md").read_text()


def _flags(parser) -> list[str]:
    return [s for a in parser._actions for s in a.option_strings if s.startswith("--") and s != "--help"]


def test_every_public_name_is_documented():
    missing = [name for name in kvtier.__all__ if f"`{name}" not in API]
    assert not missing, f"docs/api.md does not mention {missing}"


def test_every_option_is_documented_with_its_default():
    for field in dataclasses.fields(KVTierConfig):
        row = next((line for line in CONFIG.splitlines() if line.startswith(f"| `{field.name}` |")), None)
        assert row is not None, f"option {field.name} missing from docs/configuration.md"
        assert f"`{field.default!r}`".replace("'", '"') in row, f"{field.name}: docs default differs"


def test_every_cli_flag_is_documented_and_no_other():
    documented = set(re.findall(r"^\| `(--[a-z-]+)` \|", CONFIG, flags=re.M))
    actual = set(_flags(qa_parser())) | set(_flags(inspect_parser())) | set(_flags(hogwild_parser())) | \
        set(_flags(tim_parser()))
    assert documented == actual, f"undocumented: {actual - documented}, stale: {documented - actual}"
    for action in qa_parser()._actions:
        if action.option_strings and action.default not in (None, False) and action.dest != "help":
            row = next(line for line in CONFIG.splitlines() if line.startswith(f"| `{action.option_strings[0]}` |"))
            if action.dest != "device":
                assert f"`{action.default}`" in row, f"{action.option_strings[0]}: docs default differs"


def test_hogwild_flags_are_documented_with_their_defaults():
    section = CONFIG.split("## `kvtier hogwild`")[1].split("\n## ")[0]
    rows = {m.group(1): line for line in section.splitlines() if (m := re.match(r"^\| `(--[a-z-]+)` \|", line))}
    assert set(rows) == set(_flags(hogwild_parser()))
    for action in hogwild_parser()._actions:
        if action.option_strings and action.default not in (None, False) and action.dest not in ("help", "device"):
            assert f"`{action.default}`" in rows[action.option_strings[0]], f"{action.option_strings[0]}: docs default"


def test_tim_flags_are_documented_with_their_defaults():
    section = CONFIG.split("## `kvtier tim`")[1].split("\n## ")[0]
    rows = {m.group(1): line for line in section.splitlines() if (m := re.match(r"^\| `(--[a-z-]+)` \|", line))}
    assert set(rows) == set(_flags(tim_parser()))
    for action in tim_parser()._actions:
        if action.option_strings and action.default not in (None, False) and action.dest not in ("help", "device"):
            assert f"`{action.default}`" in rows[action.option_strings[0]], f"{action.option_strings[0]}: docs default"


def test_tutorial_uses_real_flags():
    tutorial = (ROOT / "docs" / "long-doc-qa.md").read_text()
    used = set(re.findall(r"(--[a-z][a-z-]+)", tutorial))
    assert used <= set(_flags(qa_parser())) | set(_flags(inspect_parser())) | {"--help"}, used


def test_doc_links_resolve():
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#]+)\)", page.read_text()):
            if not target.startswith("http"):
                assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


def test_hogwild_tutorial_uses_real_flags_and_its_example_runs(tmp_path):
    """docs/hogwild.md's flags exist, and its Python example runs as written on a tiny model and tokenizer."""
    import torch
    import transformers as tf
    from tiny import save_tiny_model

    tutorial = (ROOT / "docs" / "hogwild.md").read_text()
    used = set(re.findall(r"(--[a-z][a-z-]+)", tutorial))
    assert used <= set(_flags(hogwild_parser())) | {"--help"}, used - set(_flags(hogwild_parser()))
    blocks = re.findall(r"```python\n(.*?)```", tutorial, flags=re.S)
    assert len(blocks) == 1
    path = save_tiny_model(tmp_path / "model")
    torch.manual_seed(0)
    scope = {"tokenizer": tf.AutoTokenizer.from_pretrained(path),
             "model": tf.AutoModelForCausalLM.from_pretrained(path).eval()}
    exec(compile(blocks[0], "docs/hogwild.md", "exec"), scope)
    result = scope["result"]
    assert result.names == ["Ada", "Brian", "Chen"] and result.stopped in ("answer", "eos", "budget")
    assert sum(result.stats.tokens_per_worker) <= 64
