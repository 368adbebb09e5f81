"""The command line given hostile or mistaken input, in this process: each case is one line on stderr naming the
bad value, exit code 2 (130 for Ctrl-C), no traceback, and nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from tiny import save_tiny_model

from kvtier.cli import main
from kvtier.sizes import parse_budget, parse_size, split_budget

DOC = " ".join(["The pass key is 71432. Remember it."] + ["The grass is green and the sky is blue."] * 60)
HUGE = "9" * 400  # beyond a float: read as a float it was infinity


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    save_tiny_model(root / "model")
    (root / "doc.txt").write_text(DOC)
    return root


def _files(root) -> set[str]:
    return {str(p) for p in root.rglob("*")}


def _one_error(capsys, argv: list[str], text: str, code: int = 2) -> str:
    assert main(argv) == code, argv
    out = capsys.readouterr()
    lines = [line for line in out.err.splitlines() if line.strip()]
    assert len(lines) == 1 and text in lines[0], (argv, out.err)
    assert "Traceback" not in out.err, argv
    return lines[0]


def test_sizes_read_long_numbers_exactly():
    number, unit = split_budget(HUGE)
    assert number == int(HUGE) and unit == ""
    assert split_budget("1.5GB") == (1.5, "gb") and split_budget(".5 KiB") == (0.5, "kib")
    assert parse_size(HUGE + "GiB") == int(HUGE) * 2**30 and parse_size("1.5GB") == 1_500_000_000
    assert parse_size("123456789012345678901234567") == 123456789012345678901234567  # no float rounding
    for bad in ("9" * 5000, "9" * 5000 + "GiB", "nan", "inf", "1e400", "-1GiB", "8GiBB", ""):
        with pytest.raises(ValueError, match="budget"):
            split_budget(bad)
        with pytest.raises(ValueError, match="size"):
            parse_size(bad)


def test_parse_budget_of_a_huge_size(tiny):
    import transformers as tf

    from kvtier import ModelSpec

    spec = ModelSpec.from_model(tf.AutoModelForCausalLM.from_pretrained(tiny / "model"))
    per_token = 2 * 2 * 16 * 4 * 2  # K and V, 2 KV heads of 16, float32, 2 full layers
    assert parse_budget(HUGE + "B", spec) == int(HUGE) // per_token
    assert parse_budget(HUGE, spec) == int(HUGE)


def test_qa_refuses_before_loading_anything(tiny, tmp_path, capsys):
    """Checked before the model loads: each case names a model that does not exist, so a check that let one
    through would end in 'model not found' instead."""
    base = ["qa", "--doc", str(tiny / "doc.txt"), "--question", "x", "--store", str(tmp_path / "s")]
    nope = ["--model", str(tmp_path / "nope")]
    cases = [
        ([*base, *nope, "--device-budget", "0"], "--device-budget 0: `device_budget` must be an integer >= 1"),
        ([*base, *nope, "--device-budget", "12"], "--device-budget 12: `device_budget`=12 tokens per layer cannot "
                                                  "hold the sinks"),
        ([*base, *nope, "--host-budget", HUGE + "x"], f"--host-budget: budget '{HUGE[:40]}"),  # cut, one line
        ([*base, *nope, "--device-budget", "9" * 5000], "--device-budget: budget"),
        (["qa", *nope, "--doc", str(tiny), "--question", "x"], f"--doc {tiny} is a directory"),
        (["qa", *nope, "--doc", "", "--question", "x"], "--doc is empty"),
        (["qa", "--model", " ", "--doc", str(tiny / "doc.txt"), "--question", "x"], "--model is empty"),
        (["qa", *nope, "--doc", str(tiny / "doc.txt"), "--store", "", "--question", "x"], "--store is empty"),
        ([*base, *nope, "--device", "meta"], "--device meta: the meta device holds no data"),
        ([*base, *nope, "--device", "xpu"], "--device xpu: xpu is not available on this machine"),
    ]
    fifo, dangling = tmp_path / "fifo", tmp_path / "dangling"
    os.mkfifo(fifo)
    dangling.symlink_to(tmp_path / "nowhere")
    model = ["--model", str(tiny / "model")]  # these reach the document and the store, not the model
    cases += [
        (["qa", *model, "--doc", str(fifo), "--question", "x"], f"--doc {fifo} is not a regular file"),
        (["qa", *model, "--doc", "/dev/null", "--question", "x"], "--doc /dev/null is not a regular file"),
        (["qa", *model, "--doc", str(tiny / "doc.txt"), "--store", str(dangling), "--question", "x"],
         f"{dangling} is a symbolic link to {tmp_path / 'nowhere'}, which does not exist"),
        (["qa", *model, "--doc", str(tiny / "doc.txt"), "--store", str(dangling / "s"), "--question", "x"],
         f"{dangling} is a symbolic link to {tmp_path / 'nowhere'}, which does not exist"),
    ]
    before = _files(tmp_path)
    for argv, text in cases:
        _one_error(capsys, argv, text)
    assert _files(tmp_path) == before


def test_qa_a_size_too_small_for_the_model_names_its_flag(tiny, tmp_path, capsys):
    store = tmp_path / "s"
    line = _one_error(capsys, ["qa", "--model", str(tiny / "model"), "--doc", str(tiny / "doc.txt"), "--question",
                               "x", "--store", str(store), "--device", "cpu", "--device-budget", "1KiB"],
                      "--device-budget 1KiB: `device_budget`=2 tokens per layer cannot hold")
    assert line.startswith("kvtier qa: error: ") and not store.exists()


def _qa_argv(tiny, store) -> list[str]:
    """`kvtier qa` prefilling the tiny document into `store` in 256-token segments."""
    return ["qa", "--model", str(tiny / "model"), "--doc", str(tiny / "doc.txt"), "--question", "x", "--store",
            str(store), "--device", "cpu", "--segment-tokens", "256", "--max-new-tokens", "1", "--quiet"]


def _interrupt_segment(monkeypatch, segment: int, interrupt) -> None:
    """Call `interrupt()` as `kvtier qa` starts prefilling its `segment`-th segment (from 1)."""
    import kvtier.qa as qa

    real, calls = qa.prefill, []

    def prefill(*args, **kwargs):
        calls.append(1)
        if len(calls) == segment:
            interrupt()
        return real(*args, **kwargs)

    monkeypatch.setattr(qa, "prefill", prefill)


def test_qa_interrupted_prefill_is_one_line_and_resumes(tiny, tmp_path, capsys, monkeypatch):
    store = tmp_path / "s"
    argv = _qa_argv(tiny, store)

    def ctrl_c():
        raise KeyboardInterrupt

    _interrupt_segment(monkeypatch, 3, ctrl_c)
    assert main(argv) == 130
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert main(["inspect", str(store), "--json"]) == 0  # the store holds the first two segments, as said
    saved = json.loads(capsys.readouterr().out)
    assert saved["context_tokens"] == 512 and saved["info"]["prefill"] == "partial"
    assert lines[-1] == (f"kvtier: prefill interrupted; its first 512 of {saved['info']['prefix_tokens']} tokens "
                         "are saved: run the same command again to resume"), lines
    assert not any(line.startswith("kvtier qa:") for line in lines), lines  # said once, by the prefill
    monkeypatch.undo()
    assert main(argv) == 0
    assert "resuming the prefill" in capsys.readouterr().err


def test_qa_terminated_keeps_its_prefill_as_ctrl_c_does(tiny, tmp_path, capsys, monkeypatch):
    """SIGTERM (`kill`, `timeout`) in the second segment: the first is saved and said so, exit code 143."""
    import signal

    store = tmp_path / "s"
    _interrupt_segment(monkeypatch, 2, lambda: os.kill(os.getpid(), signal.SIGTERM))
    before = signal.getsignal(signal.SIGTERM)
    assert main(_qa_argv(tiny, store)) == 143
    assert signal.getsignal(signal.SIGTERM) == before  # the command's handler is gone again
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines[-1].startswith("kvtier: prefill interrupted; its first 256 of "), lines
    assert main(["inspect", str(store), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["context_tokens"] == 256


@pytest.mark.parametrize("command", ["hogwild", "tim"])
def test_generation_commands_refuse_before_loading(command, tmp_path, capsys):
    flag = "--problem" if command == "hogwild" else "--prompt"
    base = [command, "--model", str(tmp_path / "nope"), flag, "2+2?"]
    cases = [
        (["--temperature", "nan"], "--temperature nan: must be 0 (greedy) or a finite number above 0"),
        (["--temperature", "inf"], "--temperature inf"),
        (["--seed", str(2**70)], f"--seed {2**70}: seed must be None or an int in [-2**63, 2**64)"),
        (["--device-budget", "0"], "--device-budget 0: `device_budget` must be an integer >= 1"),
        (["--device-budget", "12"], "--device-budget 12: `device_budget`=12 tokens per layer"),
        (["--host-budget", HUGE + "GiBB"], "--host-budget: budget"),
        (["--json", ""], "--json is empty"),
        (["--device", "meta"], "--device meta"),
        (["--top-p", "0.9"], "--top-p 0.9 applies to sampling only; add --temperature above 0"),
        (["--top-k", "5", "--temperature", "0"], "--top-k 5 applies to sampling only"),
    ]
    for extra, text in cases:
        line = _one_error(capsys, [*base, *extra], text)
        assert line.startswith(f"kvtier {command}: error: ")
    _one_error(capsys, [command, "--model", "", flag, "2+2?"], "--model is empty")
    assert not (tmp_path / "nope").exists()


def test_text_that_is_not_utf8_is_one_line(tiny, tmp_path, capsys):
    """Bytes that are not UTF-8 in an argument (a Latin-1 terminal) reach Python as lone surrogates, on which the
    tokenizer failed with a traceback."""
    latin1 = b"\xe9t\xe9?".decode("utf-8", "surrogateescape")
    model = str(tiny / "model")
    _one_error(capsys, ["qa", "--model", model, "--doc", str(tiny / "doc.txt"), "--store", str(tmp_path / "s"),
                        "--question", latin1], "--question is not UTF-8 text (byte 0xe9 at character 0)")
    _one_error(capsys, ["hogwild", "--model", model, "--problem", latin1], "--problem is not UTF-8 text")
    _one_error(capsys, ["hogwild", "--model", model, "--problem", "p", "--names", f"{latin1},B"],
               "--names is not UTF-8 text")
    _one_error(capsys, ["tim", "--model", model, "--prompt", latin1], "--prompt is not UTF-8 text")
    assert not (tmp_path / "s").exists()
    # a store path of such bytes failed after the model loaded, in the codec's words, leaving a directory behind
    store = tmp_path / b"st\xff".decode("utf-8", "surrogateescape")
    _one_error(capsys, ["qa", "--model", model, "--doc", str(tiny / "doc.txt"), "--store", str(store),
                        "--question", "q"], "--store is not UTF-8 text")
    assert not store.exists()


def test_hogwild_refuses_more_workers_than_tokens(tmp_path, capsys):
    _one_error(capsys, ["hogwild", "--model", str(tmp_path / "nope"), "--problem", "p", "--workers", "9",
                        "--max-new-tokens", "8"], "--workers 9: more workers than --max-new-tokens 8")


def test_hogwild_refuses_absurd_worker_counts_before_loading(tmp_path, capsys):
    _one_error(capsys, ["hogwild", "--model", str(tmp_path / "nope"), "--problem", "p", "--workers", "99999999",
                        "--max-new-tokens", "999999999"], "--workers 99999999: between 1 and 1024 workers")


@pytest.mark.parametrize("command", ["hogwild", "tim"])
def test_generation_commands_name_a_size_budget_too_small_for_the_model(command, tiny, capsys):
    flag = "--problem" if command == "hogwild" else "--prompt"
    _one_error(capsys, [command, "--model", str(tiny / "model"), flag, "2+2?", "--device", "cpu", "--max-new-tokens",
                        "2", "--device-budget", "4KiB"],
               "--device-budget 4KiB: `device_budget`=8 tokens per layer cannot hold")


def test_bench_arguments_are_one_usage_error(tmp_path, capsys):
    afile = tmp_path / "file.txt"
    afile.write_text("not a directory")
    (tmp_path / "empty").mkdir()
    cases = [
        (["codec", "--tokens", "0"], "argument --tokens: 0 must be at least 1"),
        (["codec", "--reps", "0"], "argument --reps: 0 must be at least 1"),
        (["codec", "--chunk", "-3"], "argument --chunk: -3 must be at least 1"),
        (["codec", "--levels", "3", "99"], "argument --levels: '99': `zstd_level` must be an integer in [1, 22]"),
        (["codec", "--levels", "raw", "fast"], "argument --levels: 'fast' is neither a zstd level (an integer) nor raw"),
        (["codec", "--disk-mb", "-1"], "argument --disk-mb: -1 must be 0 or more"),
        (["codec", "--data-dir", str(tmp_path / "none")], "is not a directory"),
        (["codec", "--data-dir", str(tmp_path / "empty")], "holds no .txt files"),
        (["codec", "--store-dir", str(afile)], "is not a directory"),
        (["codec", "--out", str(afile)], f"argument --out: {afile} is not a directory"),
        (["codec", "--out", str(afile / "sub")], f"argument --out: {afile} is not a directory"),
        (["exact", "--name", "../elsewhere"], "'../elsewhere' is not a file name"),
        (["exact", "--device", "meta"], "argument --device: the meta device holds no data"),
        (["kernels", "--budget", "nan"], "argument --budget: 'nan' is not a finite number"),
        (["kernels", "--contexts", "0"], "argument --contexts: 0 must be at least 1"),
        (["kernels", "--rtol", "-1"], "argument --rtol: -1 must be 0 or more"),
        (["speed", "--time-limit", "inf"], "argument --time-limit: 'inf' is not a finite number"),
        (["speed", "--host-fraction", "1.5"], "argument --host-fraction: 1.5 must be in [0, 1]"),
        (["speed", "--gpu-memory-gib", "0"], "argument --gpu-memory-gib: 0 must be above 0"),
        (["quality", "--budgets", "0.05", "2"], "argument --budgets: 2 must be in (0, 1]"),
        (["quality", "--examples", "0"], "argument --examples: 0 must be at least 1"),
        (["remote", "--sparse-budget", "0"], "argument --sparse-budget: 0 must be in (0, 1]"),
        (["hogwild", "--warmup", "-1"], "argument --warmup: -1 must be 0 or more"),
        (["tim", "--prune-buffer", "-1"], "argument --prune-buffer: -1 must be 0 or more"),
    ]
    before = _files(tmp_path)
    for args, text in cases:
        with pytest.raises(SystemExit) as exit_:
            main(["bench", *args])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and "Traceback" not in err, (args, err)
        last = err.splitlines()[-1]
        assert last.startswith(f"kvtier bench {args[0]}: error: ") and text in last, (args, err)
    assert _files(tmp_path) == before


def test_bench_failure_during_the_run_is_one_line(monkeypatch, capsys):
    import kvtier.bench.codec as codec

    def fails(argv):
        raise FileExistsError(17, "File exists", "/somewhere/out")

    monkeypatch.setattr(codec, "main", fails)
    _one_error(capsys, ["bench", "codec"], "kvtier bench codec: error: /somewhere/out: File exists")

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(codec, "main", interrupted)
    _one_error(capsys, ["bench", "codec"], "kvtier bench codec: interrupted", code=130)


def test_an_option_before_the_command_is_named(capsys):
    for argv in (["--bogus"], ["--model", "x", "qa"], ["-x"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.splitlines()[-1].startswith(
            f"kvtier: error: unrecognized argument {argv[0]}: name a command first (qa, inspect, sessions"), err
    with pytest.raises(SystemExit) as exit_:
        main(["--vers"])  # an abbreviation argparse accepts
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("kvtier ")
    for flag in ("-h", "--help"):
        with pytest.raises(SystemExit) as exit_:
            main([flag])
        assert exit_.value.code == 0 and "usage: kvtier" in capsys.readouterr().out


def test_an_empty_kvtier_home_is_unset(monkeypatch, tmp_path):
    from kvtier.qa import default_store_root

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("KVTIER_HOME", "")
    assert default_store_root() == tmp_path / ".cache" / "kvtier" / "qa"  # not ./qa in the current directory
    monkeypatch.setenv("KVTIER_HOME", str(tmp_path / "k"))
    assert default_store_root() == tmp_path / "k" / "qa"


def test_qa_prints_the_answer_without_escape_sequences(capsys):
    import torch
    from tiny import build_tokenizer

    from kvtier.qa import _TimedStreamer, shown

    assert shown("line one\n\x1b[2Jline\ttwo\x07") == "line one\n\\x1b[2Jline\\ttwo\\x07"
    tok = build_tokenizer()
    streamer = _TimedStreamer(tok, quiet=False)
    streamer.put(torch.tensor([tok("prompt").input_ids]))
    for tid in tok("red \x1b[31mtext\x07\nnext line").input_ids:
        streamer.put(torch.tensor([tid]))
    streamer.end()
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\\x1b[31m" in out and "\nnext line" in out, repr(out)


@pytest.fixture(scope="module")
def store_with_unicode_info(tmp_path_factory):
    """A small saved session whose info holds text an ASCII terminal cannot show."""
    from conftest import build_model

    import kvtier

    root = tmp_path_factory.mktemp("inspect")
    model = build_model("llama")
    with kvtier.KVTierCache.for_model(model, store_path=root / "store") as cache:
        kvtier.prefill(model, cache, torch.randint(3, 100, (1, 40)), progress=False)
        cache.save(info={"title": "café ├── naïve"})
    return root / "store"


def _inspect_process(store, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kvtier.cli", "inspect", str(store)], cwd=store.parent,
                            stderr=subprocess.PIPE, text=True, **popen)


def test_output_a_terminal_cannot_encode_is_escaped_not_an_error(store_with_unicode_info):
    env = dict(os.environ, PYTHONIOENCODING="ascii")
    p = _inspect_process(store_with_unicode_info, stdout=subprocess.PIPE, env=env)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0 and not err, err
    assert "caf\\xe9 \\u251c\\u2500\\u2500 na\\xefve" in out


def test_a_reader_that_goes_away_ends_the_command_quietly(store_with_unicode_info):
    """`kvtier inspect STORE | head -0`: the pipe's reader is gone before the first write."""
    p = _inspect_process(store_with_unicode_info, stdout=subprocess.PIPE)
    p.stdout.close()
    err = p.stderr.read()
    assert p.wait(timeout=120) == 141 and not err, err


def test_a_closed_stdout_is_one_line(store_with_unicode_info):
    """`kvtier inspect STORE >&-`: no stdout at all ended in an AttributeError traceback."""
    p = _inspect_process(store_with_unicode_info, preexec_fn=lambda: os.close(1))
    err = p.stderr.read()
    assert p.wait(timeout=120) == 2 and err.strip() == "kvtier inspect: error: standard output is closed; redirect " \
        "it to a file or /dev/null", err


STOP_TWICE = """
import os, signal, sys
from kvtier.cli_args import run_command
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (a background job starts ignoring it)
def run(args):
    try:
        os.kill(os.getpid(), signal.SIG)  # the first: interrupts
        raise SystemExit("not interrupted")
    finally:
        os.kill(os.getpid(), signal.SIG)  # another, while the command cleans up
        print("cleanup done", flush=True)
code = run_command("kvtier x", run, None)
print("restored", signal.getsignal(signal.SIG) in (signal.default_int_handler, signal.SIG_DFL), flush=True)
sys.exit(code)
"""


@pytest.mark.parametrize("sig, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_second_ctrl_c_does_not_cut_the_cleanup_of_the_first(sig, code):
    """Ctrl-C pressed again while the command closed its stores cut that work short with a KeyboardInterrupt
    traceback, or dropped the line saying what a prefill had saved; the handlers are the caller's again after."""
    out = subprocess.run([sys.executable, "-c", STOP_TWICE.replace("signal.SIG)", f"signal.{sig})")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == code and out.stdout.split() == ["cleanup", "done", "restored", "True"], out
    assert "Traceback" not in out.stderr and out.stderr.strip().splitlines() == [
        "kvtier x: " + ("interrupted" if sig == "SIGINT" else "terminated")], out.stderr


def test_a_ctrl_c_as_the_program_exits_is_ignored(tmp_path):
    """The `kvtier` program ignores Ctrl-C once its command returned: finalizers close stores at exit."""
    script = ("import atexit, os, signal, sys; from kvtier.cli import console_main; "
              "signal.signal(signal.SIGINT, signal.default_int_handler); "
              "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), print('exit done', flush=True))); "
              "sys.exit(console_main(['inspect', sys.argv[1]]))")
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "none")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and out.stdout == "exit done\n" and "Traceback" not in out.stderr, out


def test_result_files_are_written_whole_or_not_at_all(tmp_path):
    """--json and benchmark results: a write cut by a file size limit (or a full disk) left the previous
    result as 1 KiB of invalid JSON."""
    target = tmp_path / "result.json"
    target.write_text('{"previous": 1}')
    script = ("import resource, signal, sys; from kvtier.cli_args import write_file; "
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024)); "
              "write_file(sys.argv[1], 'x' * 5000)")
    out = subprocess.run([sys.executable, "-c", script, str(target)], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "File too large" in out.stderr
    assert target.read_text() == '{"previous": 1}' and sorted(os.listdir(tmp_path)) == ["result.json"]


def test_qa_loads_a_half_precision_checkpoint_in_float32_on_any_cpu_device(tmp_path):
    """--device cpu:0 loaded a bfloat16 checkpoint in bfloat16 where --device cpu gives float32 (the docs'
    'auto: the checkpoint's; float32 on a CPU'): another store, other answers."""
    import transformers as tf

    from kvtier.qa import load

    save_tiny_model(tmp_path / "m")
    tf.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.bfloat16).save_pretrained(tmp_path / "m")
    for device in ("cpu", "cpu:0"):
        assert load(str(tmp_path / "m"), "auto", device)[1].dtype == torch.float32, device


class _Template:
    """A tokenizer reduced to its chat template, which writes `render(content)` or raises."""

    chat_template = "{{ messages }}"

    def __init__(self, render):
        self.render = render

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        return self.render(messages[0]["content"])


@pytest.mark.parametrize("render, says", [
    (lambda content: 1 / 0, r"chat template cannot write the prompt \(ZeroDivisionError"),
    (lambda content: "<user>a summary</user>", "question's place"),  # the message dropped
    (lambda content: content + content, "question's place"),  # written twice
])
def test_qa_a_chat_template_that_fails_or_drops_the_question_is_one_line(render, says):
    from kvtier.qa import build_prompt

    with pytest.raises(ValueError, match=says) as info:
        build_prompt(_Template(render), "the document", use_chat=True)
    assert "--no-chat-template" in str(info.value) and "\n" not in str(info.value)
