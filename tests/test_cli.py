"""`kvtier qa` and `kvtier inspect` on a tiny model with a real tokenizer: most commands through `kvtier.cli.main` in
this process, some through the installed entry point in a process of their own."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_model
from helpers import cli_in_process
from tiny import save_tiny_model

import kvtier as kvtier_package
from kvtier import KVTierCache, KVTierConfig, ModelSpec, cache_argument, parse_budget

DOC = " ".join(["The pass key is 71432. Remember it."] + ["The grass is green and the sky is blue."] * 120)


def kvtier_process(*args: str, stdin: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """`kvtier *args` through the installed entry point, in a process of its own."""
    exe = shutil.which("kvtier")
    cmd = [exe, *args] if exe else [sys.executable, "-m", "kvtier.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, input=stdin, env=env)


def kvtier(*args: str, stdin: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """`kvtier *args`: in this process (`_in_process`) unless it needs its own standard input or environment.
    Each process of its own pays an interpreter start and the torch and transformers imports (seconds); the
    entry point itself is run as a process by `test_version` and `test_qa_prefills_once_then_reopens`."""
    if stdin is not None or env is not None:
        return kvtier_process(*args, stdin=stdin, env=env)
    return cli_in_process(list(args))


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


def _tree(*roots: Path, modes: bool = True) -> dict[str, tuple[int, ...]]:
    """Every path under `roots` with its size, mtime (and mode): compared before and after a refused command."""
    out = {}
    for root in roots:
        for path in [root, *sorted(root.rglob("*"))] if root.exists() else []:
            st = path.lstat()
            out[str(path)] = (st.st_size, st.st_mtime_ns, *([st.st_mode] if modes else []))
    return out


def _refused(args: list[str], text: str, watch: list[Path], env: dict | None = None, modes: bool = True) -> None:
    """`kvtier *args` fails with one line naming `text`, exit code 2, and creates or changes nothing in `watch`
    (with `env`: in a process of its own, with that environment)."""
    before = _tree(*watch, modes=modes)
    _one_error_line(kvtier(*args, env=env), text)
    assert _tree(*watch, modes=modes) == before, f"{args} changed files it should not have"


def _all_refused(cases: list[tuple[list[str], str]], watch: list[Path]) -> None:
    """`_refused` for many commands."""
    before = _tree(*watch)
    for args, text in cases:
        _one_error_line(cli_in_process(args), text)
    assert _tree(*watch) == before, "a refused command changed files it should not have"


@pytest.fixture(scope="module")
def saved(tiny):
    """A store prefilled by `kvtier qa` with a 5% sparse budget, from a document whose name holds escape codes."""
    doc = tiny / "red\x1b[31mdoc\x07.txt"
    doc.write_text(DOC)
    out = kvtier("qa", "--model", str(tiny / "model"), "--doc", str(doc), "--store", str(tiny / "saved"),
                 "--mode", "sparse", "--sparse-budget", "5%", "--question", "x", "--max-new-tokens", "2", "--quiet")
    assert out.returncode == 0, out.stderr
    assert "\x1b" not in out.stderr and "\\x1b[31m" in out.stderr  # the prefill line names the document, escaped
    return tiny / "saved"


def test_qa_prefills_once_then_reopens(tiny, tmp_path):
    store = tmp_path / "store"
    args = ["qa", "--model", str(tiny / "model"), "--doc", str(tiny / "doc.txt"), "--store", str(store),
            "--device-budget", "200", "--max-new-tokens", "6", "--question", "What is the pass key?"]
    first = kvtier_process(*args)
    assert first.returncode == 0, first.stderr
    assert "prefilling" in first.stderr and "prefill" in first.stderr and "tok/s" in first.stderr
    assert "context" in first.stderr and "first token" in first.stderr and "tiers device" in first.stderr
    second = kvtier_process(*args)
    assert second.returncode == 0, second.stderr
    assert "prefilling" not in second.stderr
    # a reopened question's time to first token counts the reopening: "first token T s (reopen R s + A s)"
    summary = next(line for line in second.stderr.splitlines() if line.startswith("[context"))
    total, reopen = (float(summary.split(key)[1].split(" s")[0]) for key in ("first token ", "(reopen "))
    assert 0 < reopen <= total, summary
    # answers are streamed to stdout and the same both times (greedy, same prefix)
    assert first.stdout.strip() == second.stdout.strip()


def test_a_question_longer_than_a_segment_goes_in_in_segments_with_the_same_answer(tiny, tmp_path):
    """A question is prefilled in --segment-tokens pieces, as the document is (bounded memory, Ctrl-C heard
    between them): the answer equals the one a single pass gives."""
    question = " ".join(["What does the document say about the pass key and the garden?"] * 12)
    args = ["qa", "--model", str(tiny / "model"), "--doc", str(tiny / "doc.txt"), "--store", str(tmp_path / "s"),
            "--max-new-tokens", "5", "--json", "--question", question]
    pieces = json.loads(kvtier(*args, "--segment-tokens", "32").stdout)
    whole = json.loads(kvtier(*args, "--segment-tokens", "4096").stdout)
    assert pieces["context_tokens"] == whole["context_tokens"] and pieces["context_tokens"] > 3000
    assert pieces["answer"] == whole["answer"]


def test_qa_json_reports_prefill_reopen_and_time_to_first_token(tiny, tmp_path):
    args = ["qa", "--model", str(tiny / "model"), "--doc", str(tiny / "doc.txt"), "--store", str(tmp_path / "s"),
            "--max-new-tokens", "4", "--json"]
    first = kvtier(*args, stdin="One?\nTwo?\n")
    assert first.returncode == 0, first.stderr
    one, two = (json.loads(line) for line in first.stdout.splitlines())
    assert (one["question"], two["question"]) == ("One?", "Two?")
    assert one["prefill_s"] > 0 and one["reopen_s"] is None and one["first_token_s"] > 0
    assert two["prefill_s"] is None and two["reopen_s"] is None  # the session stayed open between questions
    assert one["mode"] == "exact" and one["new_tokens"] == 4 and one["context_tokens"] > 3000
    assert set(one["tiers"]) == {"device", "host", "disk"}
    again = json.loads(kvtier(*args, "--question", "One?").stdout)
    assert again["prefill_s"] is None and 0 < again["reopen_s"] <= again["first_token_s"]
    assert again["answer"] == one["answer"]


def test_qa_answers_in_the_api_default_mode_and_says_why(tiny, tmp_path):
    assert KVTierConfig().mode == "exact"
    out = kvtier("qa", "--model", str(tiny / "model"), "--doc", str(tiny / "doc.txt"), "--store", str(tmp_path / "s"),
                 "--question", "x", "--max-new-tokens", "2", "--quiet")
    assert out.returncode == 0, out.stderr
    desc = json.loads(kvtier("inspect", str(tmp_path / "s"), "--json").stdout)
    assert desc["options"]["mode"] == KVTierConfig().mode
    # one store for both modes: the prefill sized its chunks by the attention skew it measured
    assert all(layer["top5_mass"] is not None for layer in desc["layers"])
    assert len({size for layer in desc["layers"] for size in layer["chunk_sizes"]}) > 2
    text = " ".join(kvtier("qa", "--help").stdout.split())
    assert "default exact, as in the API" in text and "one store serves both modes" in text


def test_qa_shared_selection(tiny, tmp_path):
    store = tmp_path / "s"
    base = ["qa", "--model", str(tiny / "model"), "--doc", str(tiny / "doc.txt"), "--store", str(store),
            "--question", "What is the pass key?", "--max-new-tokens", "3", "--json", "--mode", "sparse"]
    shared = kvtier(*base, "--shared-selection", "--sparse-budget", "256")
    assert shared.returncode == 0, shared.stderr
    assert json.loads(kvtier("inspect", str(store), "--json").stdout)["options"]["shared_selection"] is True
    per_head = kvtier(*base, "--sparse-budget", "256")  # the same store, reopened with per-head selection
    assert per_head.returncode == 0 and json.loads(per_head.stdout)["reopen_s"] > 0, per_head.stderr


def test_version():
    out = kvtier_process("--version")
    pyproject = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    version = re.search(r'^version = "([^"]+)"', pyproject, flags=re.MULTILINE).group(1)
    assert out.returncode == 0 and out.stdout.strip() == f"kvtier {version}" == f"kvtier {kvtier_package.__version__}"


def test_the_package_and_its_command_line_load_without_torch_until_a_name_needs_it():
    """`kvtier --version` and `import kvtier` stay quick: the public names are imported on first use."""
    code = ("import sys, kvtier, kvtier.cli\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'loaded eagerly'\n"
            "assert sorted(kvtier.__all__) == sorted(kvtier._EXPORTS) and set(kvtier.__all__) <= set(dir(kvtier))\n"
            "from kvtier import *\n"
            "import kvtier.segmented\n"
            "assert kvtier.prefill is kvtier.segmented.prefill and callable(kvtier.prefill)\n"
            "assert kvtier.KVTierCache.__module__ == 'kvtier.cache'\n"
            "assert callable(kvtier.hogwild.generate) and callable(kvtier.tim.generate)  # as the docs name them\n"
            "try:\n    kvtier.nope\nexcept AttributeError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "module 'kvtier' has no attribute 'nope'"


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
    _all_refused([(["qa", "--model", str(tiny / "model"), "--doc", str(tmp_path / "missing.txt"), "--question", "x"],
                   "document not found"),
                  (["qa", "--model", str(tiny / "doc.txt"), *base], "is not a causal language model"),
                  (["qa", "--model", str(tmp_path), *base], "is not a causal language model"),
                  (["qa", "--model", str(tiny / "model"), *base, "--device-budget", "lots"], "budget")], [])
    store = tmp_path / "s"
    assert kvtier("qa", "--model", str(tiny / "model"), *base, "--store", str(store), "--max-new-tokens", "2").returncode == 0
    _one_error_line(kvtier("qa", "--model", str(tiny / "other"), *base, "--store", str(store)), "another model")


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
    with pytest.raises(TypeError, match="needs the model's ModelSpec"):
        parse_budget("1GiB", None)
    with pytest.raises(TypeError, match="dtype must be a torch.dtype"):
        parse_budget("1GiB", spec, "float16")
    for bad in ("lots", "1.5", "8 parsecs", "-3"):
        with pytest.raises(ValueError, match="budget"):
            parse_budget(bad, spec)
    # a size under one token per layer is refused, not read as "nothing on this tier"; zero stays zero
    with pytest.raises(ValueError, match=rf"1000B is less than one token per layer \(needs at least {per_token * 4} "):
        parse_budget("1000B", spec)
    assert parse_budget("1KiB", spec) == 1 and parse_budget("0MiB", spec) == 0


def test_cache_info_survives_a_reopen(tmp_path):
    model = build_model("llama")
    cache = KVTierCache.for_model(model, store_path=tmp_path / "s")
    model(input_ids=torch.randint(3, 128, (1, 30)), **{cache_argument(model): cache})
    cache.save(info={"document": "a.txt"})
    cache.close()
    again = KVTierCache.open(tmp_path / "s", model)
    assert again.info == {"document": "a.txt"}
    again.close()


def test_qa_unwritable_store_places_are_one_line(tiny, tmp_path):
    """A --store or $KVTIER_HOME that cannot hold a store is refused before the model loads (and as root too)."""
    afile = tmp_path / "file.txt"
    afile.write_text("not a directory")
    base = ["qa", "--model", str(tiny / "model"), "--doc", str(tiny / "doc.txt"), "--question", "x",
            "--max-new-tokens", "2"]
    _refused([*base, "--store", str(afile / "store")], "file.txt is not a directory", [tmp_path])
    _refused(base, "set KVTIER_HOME to a writable directory", [tmp_path], env={**os.environ, "KVTIER_HOME": str(afile)})


def test_qa_and_inspect_read_only_places_are_one_line(tiny, tmp_path):
    if os.geteuid() == 0:
        pytest.skip(reason="running as root: permissions do not stop writes (the file-path variants cover root)")
    store, locked = tmp_path / "s", tmp_path / "locked"
    base = ["qa", "--model", str(tiny / "model"), "--doc", str(tiny / "doc.txt"), "--question", "x",
            "--max-new-tokens", "2"]
    assert kvtier(*base, "--store", str(store)).returncode == 0
    locked.mkdir()
    paths = [store, *store.iterdir(), locked]
    try:
        for path in paths:
            path.chmod(0o500 if path.is_dir() else 0o400)
        _refused([*base, "--store", str(store)], "is not writable", [tmp_path])
        _refused([*base, "--store", str(locked / "s")], "is not writable", [tmp_path])
        _refused(base, "is not writable", [tmp_path], env={**os.environ, "KVTIER_HOME": str(locked)})
        # modes=False: opening a store sets its directory to 0o700 (kvtier/store/disk.py), even to read it
        _refused(["inspect", str(store)], "Permission denied", [store], modes=False)
        _refused(["inspect", str(store), "--plot", str(locked / "p.png")], "is not writable", [tmp_path])
    finally:
        for path in paths:
            path.chmod(0o700 if path.is_dir() else 0o600)


def test_inspect_os_errors_are_one_line(tmp_path):
    """A filesystem error while reading a store (here a directory where the lock file goes) is one line."""
    broken = tmp_path / "broken"
    (broken / "kvtier.lock").mkdir(parents=True)
    out = kvtier("inspect", str(broken))
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert len([line for line in out.stderr.splitlines() if "error:" in line]) == 1, out.stderr


def test_qa_model_problems_have_their_own_messages(tiny, tmp_path):
    """No tokenizer, no such model, no CUDA: each says what it is, not 'is not a causal language model'."""
    notok = tmp_path / "no-tokenizer"
    shutil.copytree(tiny / "model", notok)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (notok / name).unlink(missing_ok=True)
    base = ["--doc", str(tiny / "doc.txt"), "--question", "x", "--store", str(tmp_path / "s")]
    device = (["--device", "cuda:99"], "CUDA device") if torch.cuda.is_available() else \
        (["--device", "cuda"], "CUDA is not available")
    _all_refused([(["qa", "--model", str(notok), *base], "holds no tokenizer"),
                  (["qa", "--model", str(tmp_path / "missing" / "model"), *base], "model not found"),
                  (["qa", "--model", str(tiny / "model"), *base, *device[0]], device[1])], [tmp_path])


def test_qa_arguments_are_checked_before_anything_is_written(tiny, tmp_path):
    store = tmp_path / "s"
    empty, blank = tmp_path / "empty.txt", tmp_path / "blank.txt"
    empty.write_text("")
    blank.write_text("  \n\t\n")
    base = ["qa", "--model", str(tiny / "model"), "--store", str(store)]
    doc = ["--doc", str(tiny / "doc.txt")]
    cases = [([*base, "--doc", str(path), "--question", "x"], "is empty") for path in (empty, blank)]
    cases += [([*base, *doc, "--question", question], "--question is empty") for question in ("", "   ")]
    cases += [([*base, *doc, "--question", "x", "--max-new-tokens", n], "--max-new-tokens") for n in ("0", "-3")]
    cases += [([*base, *doc, "--question", "x", "--mode", "sparse", "--sparse-budget", junk], "is not a sparse budget")
              for junk in ("5x", "0", "150%", "2.5")]
    # sparse options in the default (exact) mode would be ignored: refused, naming the missing --mode sparse
    cases += [([*base, *doc, "--question", "x", *flags], f"{flags[0]} applies to sparse mode only; add --mode sparse")
              for flags in (["--sparse-budget", "5%"], ["--shared-selection"], ["--shared-selection", "--mode", "exact"])]
    # a size under one token per layer (2 layers x 2 KV heads of 16 x fp32: 512 bytes) is not "no budget"
    cases += [([*base, *doc, "--question", "x", flag, "100B"],
               "100B is less than one token per layer (needs at least 512 bytes)")
              for flag in ("--device-budget", "--host-budget")]
    photos = tmp_path / "photos"  # a directory of the user's that is not a store: never written to
    photos.mkdir()
    (photos / "cat.jpg").write_bytes(b"\xff\xd8")
    cases += [(["qa", "--model", str(tiny / "model"), "--store", str(photos), *doc, "--question", "x"],
               "is not empty and is not a kvtier store")]
    _all_refused(cases, [tmp_path])


def test_qa_rebuild_with_a_bad_segment_leaves_the_store_alone(saved, tmp_path):
    store = tmp_path / "s"
    shutil.copytree(saved, store)
    doc = next(saved.parent.glob("red*.txt"))
    _refused(["qa", "--model", str(saved.parent / "model"), "--doc", str(doc), "--store", str(store), "--rebuild",
              "--segment-tokens", "0", "--question", "x"], "--segment-tokens 0", [store])


def test_qa_accepts_a_percentage_sparse_budget(saved):
    desc = json.loads(kvtier("inspect", str(saved), "--json").stdout)
    assert desc["options"]["mode"] == "sparse" and desc["options"]["sparse_budget"] == 0.05


def test_inspect_escapes_control_characters(saved, tmp_path):
    out = kvtier("inspect", str(saved))
    assert out.returncode == 0, out.stderr
    assert "\x1b" not in out.stdout and "\x07" not in out.stdout
    assert "red\\x1b[31mdoc\\x07.txt" in out.stdout
    desc = json.loads(kvtier("inspect", str(saved), "--json").stdout)  # JSON keeps the string as it is
    assert desc["info"]["document"].endswith("red\x1b[31mdoc\x07.txt")
    missing = tmp_path / "no\x1b[2Jstore"
    _refused(["inspect", str(missing)], "no kvtier store", [tmp_path])
    assert "\x1b" not in kvtier("inspect", str(missing)).stderr


def test_inspect_plot_errors_are_one_line(saved, tmp_path):
    afile = tmp_path / "file.txt"
    afile.write_text("not a directory")
    _all_refused([(["inspect", str(saved), "--plot", str(target)], text)
                  for target, text in ((tmp_path / "out.xyz", "cannot write .xyz files"),
                                       (tmp_path / "out", "needs a file extension"),
                                       (afile / "p.png", "is not a directory"),
                                       (tmp_path / "missing" / "p.png", "is not a directory"),
                                       ("", "--plot needs a file name"))], [tmp_path, saved])
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    _all_refused([(["inspect", str(tmp_path / "dangling")], "(a symbolic link to nothing)")], [tmp_path])
    out = kvtier("inspect", str(saved), "--plot", str(tmp_path / "p.svg"))
    assert out.returncode == 0 and (tmp_path / "p.svg").read_text().startswith("<?xml"), out.stderr


def test_qa_on_a_damaged_store_says_so_and_rebuild_repairs_it(saved, tmp_path):
    import lmdb

    store = tmp_path / "s"
    shutil.copytree(saved, store)
    env = lmdb.open(str(store), max_dbs=4)
    with env.begin(write=True, db=env.open_db(b"chunks")) as txn:  # one flipped payload byte in one record
        key, value = next(iter(txn.cursor()))
        damaged = bytearray(value)
        damaged[-5] ^= 0x10
        txn.put(key, bytes(damaged))
    env.close()
    doc = next(saved.parent.glob("red*.txt"))
    args = ["qa", "--model", str(saved.parent / "model"), "--doc", str(doc), "--store", str(store),
            "--mode", "sparse", "--sparse-budget", "5%", "--question", "x", "--max-new-tokens", "2", "--quiet"]
    _one_error_line(kvtier(*args), "pass --rebuild")
    assert kvtier(*args, "--rebuild").returncode == 0
    assert kvtier(*args).returncode == 0
