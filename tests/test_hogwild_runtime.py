"""kvtier.hogwild.generate and `kvtier hogwild`: N workers on one problem over one HogwildCache.

What is checked: one worker is ordinary greedy generation over the same prompt (token for token); the step
detector on scripted text; the check-in question lands every `check_in_every` generated tokens and both of its
answers do what they say; the run stops on an answer, on the budget (then the finisher answers, reading every
step in the history), and on EOS (never written); sampling with a seed repeats; the streaming callback sees
every token written; the command line prints lanes and one-line errors. Models are tiny and random, so what
they write is noise: the tests check the mechanics, not the reasoning.
"""

from __future__ import annotations

import copy
import io
import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
import transformers as tf
from tiny import build_tokenizer, save_tiny_model

from kvtier.hogwild import CollaborationTemplate, generate, step_ends
from kvtier.hogwild.cli import Lanes
from kvtier.hogwild.prompts import encode_text
from kvtier.hogwild.runtime import Step

PROBLEM = "What is 2 + 3?"
# the default rules are long for a character-level tokenizer; most tests read a short prompt (same mechanics)
SHORT = dict(rules="Workers {names} ({n}) share the work; {example} opens a step.", history_intro="\n")


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(cfg).eval()


def run(model, tok, **kw):
    kw.setdefault("template", CollaborationTemplate(**SHORT))
    kw.setdefault("eos_token_id", [])
    kw.setdefault("check_in_every", None)
    return generate(model, tok, PROBLEM, **kw)


def own_ids(result, worker: int) -> list[int]:
    """Every token written into worker's steps, in order."""
    steps = sorted([s for s in [*result.trace, *result.open_steps] if s.worker == worker], key=lambda s: s.number)
    return [t for s in steps for t in s.token_ids]


# ------------------------------------------------------------------------------------ step detector
@pytest.mark.parametrize("text", [
    "**Alice [1]:** It is 5.\n\n", "Done!\n\n", "Why?\n \n", "So 2 + 3 = 5.\n\n\n", "He said \"yes.\"\n\n",
    "**Bold.**\n\n", "$$x = 1$$\n\n", "\\[ x = 1 \\]\n\n", "```\nprint(1)\n```\n\n", "Now (see above.)\n\n",
])
def test_a_step_ends_at_a_blank_line_after_a_sentence(text):
    assert step_ends(text)


@pytest.mark.parametrize("text", [
    "", "It is 5.", "It is 5.\n", "It is 5\n\n", "**Alice [1]:**\n\n", "Let x = 3, y = 4\n\n",
    "$$\nx = 1.\n\n", "```\nx = 1.\n\n", "```python\n\n", "We get 5. Then\n\nmore",
])
def test_no_step_boundary_elsewhere(text):
    assert not step_ends(text)


# -------------------------------------------------------------------------------------- the prompt
def test_template_names_rules_and_prefixes(tok):
    t = CollaborationTemplate()
    assert t.worker_names(3) == ["Alice", "Bob", "Carol"] and t.worker_names(10)[-1] == "Worker 10"
    user = t.user_text(PROBLEM, 3)
    assert "Alice, Bob and Carol (3 in all)" in user and "**Alice [1]:**" in user and user.endswith(PROBLEM)
    assert "shared history" in user and "current steps" in user and "Do not repeat" in user
    enc = t.encode(tok, PROBLEM, 3)
    text = tok.decode(enc.history)
    assert text.startswith("<s><|user|>") and "<|assistant|>" in text  # the tokenizer's chat template
    assert tok.decode(enc.others_header).strip().startswith("# Steps the other workers")
    assert t.encode(tok, PROBLEM, 1).others_header == []  # no others: no header for them
    plain = CollaborationTemplate(names=["Ann", "Ben"], use_chat_template=False, step_prefix="[{name} #{step}]")
    assert "<|user|>" not in tok.decode(plain.encode(tok, PROBLEM, 2).history) and plain.prefix("Ben", 4) == "[Ben #4]"
    for bad, match in ((dict(names=["A", "A"]), "differ"), (dict(step_prefix="{who}"), "step_prefix"),
                       (dict(yes=" no"), "yes and no")):
        with pytest.raises(ValueError, match=match):
            CollaborationTemplate(**bad)
    with pytest.raises(ValueError, match="2 names for 3 workers"):
        CollaborationTemplate(names=["A", "B"]).worker_names(3)


def test_arguments_are_checked_before_anything_runs(model, tok):
    for kw, match in ((dict(workers=0), "workers"), (dict(max_new_tokens=0), "max_new_tokens"),
                      (dict(do_sample=True, temperature=0.0), "temperature"), (dict(top_p=1.5), "top_p"),
                      (dict(top_k=-1), "top_k"), (dict(check_in_every=-2), "check_in_every"),
                      (dict(finisher_worker=2), "finisher_worker"), (dict(answer_pattern="("), "answer_pattern"),
                      (dict(template=CollaborationTemplate(yes=" yes", no=" yes please")),
                       "one starts with the other")):
        with pytest.raises(ValueError, match=match):
            generate(model, tok, PROBLEM, **kw)
    with pytest.raises(ValueError, match="problem is empty"):
        generate(model, tok, "  ")


# ------------------------------------------------------------------------------------------ the loop
def test_one_worker_is_greedy_generate(model, tok):
    """N = 1 reads [prompt, own header, its step]: its tokens are what `generate` gives after the same ids (the
    default template, through the chat template), as long as no step boundary or check-in intervenes."""
    ref = copy.deepcopy(model)
    template = CollaborationTemplate()
    result = generate(model, tok, PROBLEM, workers=1, max_new_tokens=12, check_in_every=None, eos_token_id=[],
                      finisher_tokens=0, template=template)
    enc = template.encode(tok, PROBLEM, 1)
    prefix = encode_text(tok, template.prefix("Alice", 1))
    ids = torch.tensor([enc.history + enc.others_header + enc.own_header + prefix])
    out = ref.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id)
    assert result.trace == [] and len(result.open_steps) == 1  # no boundary intervened: one open step
    assert list(result.open_steps[0].token_ids) == prefix + out[0, ids.shape[1]:].tolist()
    assert result.texts[0] == tok.decode(prefix + out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
    s = result.stats
    assert result.stopped == "budget" and s.tokens_per_worker == [12] and s.inserted_per_worker == [len(prefix)]
    assert s.rounds == 1 + 12 and s.prompt_tokens == len(enc.history)  # the prefix in one pass, then 12
    assert s.kv["history"] == len(enc.history) and s.kv["steps"] == [len(prefix) + 12]


def _segments(ids: list[int], worker: str, tok, template, every: int) -> list[str]:
    """Parse one worker's token ids as the check-in rule says they must look: each step opens with its prefix,
    then `every` generated tokens, the question, and an answer: yes (+ blank line) ends the step, no goes on.
    Returns the answers in order ("cut": the budget ran out before one was given); fails if the ids break
    the rule."""
    question = encode_text(tok, template.check_in)
    answers = {"yes": encode_text(tok, template.yes) + encode_text(tok, "\n\n"), "no": encode_text(tok, template.no)}
    shared = next(i for i, (a, b) in enumerate(zip(*answers.values())) if a != b)  # tokens both answers open with
    out, at, step = [], 0, 1
    while at < len(ids):
        prefix = encode_text(tok, template.prefix(worker, step))
        assert ids[at:at + len(prefix)] == prefix[:len(ids) - at], f"step {step} does not open with its prefix"
        at += len(prefix)
        while at + every < len(ids):
            at += every  # the worker's own tokens
            assert ids[at:at + len(question)] == question[:len(ids) - at], f"no check-in after {every} tokens at {at}"
            at += len(question)
            rest = ids[at:]
            if len(rest) <= shared:
                return [*out, "cut"]
            word = next((w for w, tail in answers.items() if rest[:len(tail)] == tail[:len(rest)]), None)
            assert word is not None, f"the check-in answer {rest[:4]} is neither yes nor no"
            out.append(word)
            at += len(answers[word])
            if word == "yes":
                step += 1
                break
    return out


def test_check_in_asks_at_the_interval_and_both_answers_act(model, tok):
    """Every 4 generated tokens each worker is asked; after yes its step ends (a blank line) and a new one opens,
    after no it goes on. Swapping the two words flips the first answer (the model ranks the same two tokens)."""
    runs = []
    for yes, no in ((" yes", " no"), (" no", " yes")):
        template = CollaborationTemplate(**SHORT, yes=yes, no=no)
        r = run(model, tok, workers=2, max_new_tokens=24, check_in_every=4, finisher_tokens=0, template=template)
        answers = [_segments(own_ids(r, w), name, tok, template, 4) for w, name in enumerate(r.names)]
        assert r.stats.check_ins == sum(map(len, answers)) >= 4
        assert r.stats.redundant == sum(a.count("yes") for a in answers)
        assert all(s.ended == "redundant" for s in r.trace) and len(r.trace) == r.stats.redundant
        runs.append(answers)
    assert runs[0][0][0] != runs[1][0][0]
    assert {a for answers in runs for w in answers for a in w} >= {"yes", "no"}


def test_stops_on_the_answer_pattern(model, tok):
    free = run(model, tok, workers=2, max_new_tokens=20, finisher_tokens=0, answer_pattern=None)
    body = free.texts[1][len("**Bob [1]:**"):]
    wanted = body[3:6]
    assert len(wanted) == 3
    r = run(model, tok, workers=2, max_new_tokens=20, finisher_tokens=0, answer_pattern=re.escape(wanted))
    assert r.stopped == "answer" and r.answer == wanted and r.final_text is None
    assert sum(r.stats.tokens_per_worker) < 20
    assert all(free.texts[w].startswith(r.texts[w]) for w in range(2))  # the same greedy run, cut short
    assert any(wanted in s.text for s in r.open_steps)


def test_the_answer_waits_for_a_character_split_across_tokens(model, tok, monkeypatch):
    """A multi-byte character written one byte-token at a time decodes to U+FFFD until its last byte: a pattern
    such as `Answer: \\S+` is not matched against that placeholder, but against the whole character."""
    from kvtier.hogwild import runtime

    byte_ids = tok.convert_tokens_to_ids(list(tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str("日")[0][0]))
    assert len(byte_ids) == 3 and tok.decode(byte_ids[:1]) == "\ufffd" and tok.decode(byte_ids) == "日"
    script = iter(encode_text(tok, "Answer: ") + byte_ids + encode_text(tok, " and more"))

    def scripted(self, logits):  # every worker writes the script, one token per round
        token = next(script)
        return [token] * logits.shape[0]

    monkeypatch.setattr(runtime.Sampling, "__call__", scripted)
    r = run(model, tok, workers=2, max_new_tokens=40, finisher_tokens=0, answer_pattern=r"Answer: \S+")
    assert r.stopped == "answer" and r.answer == "Answer: 日"


def test_stops_on_eos_without_writing_it(model, tok):
    free = run(model, tok, workers=2, max_new_tokens=16, finisher_tokens=0)
    prefix = encode_text(tok, "**Bob [1]:**")
    eos = own_ids(free, 1)[len(prefix) + 3]  # worker 1's fourth own token
    r = run(model, tok, workers=2, max_new_tokens=16, eos_token_id=eos)
    assert r.stopped == "eos" and r.final_text is None and r.answer is None
    assert all(free.texts[w].startswith(r.texts[w]) for w in range(2))
    assert sum(r.stats.tokens_per_worker) <= 2 * 3
    assert all(eos not in own_ids(r, w)[len(prefix) + 1:] for w in range(2))


def test_budget_runs_the_finisher_over_every_step_and_streams_every_token(model, tok):
    """At the budget every open step joins the history (the finisher's own last) and worker 0 completes the
    finisher prompt greedily there; on_token saw each token written, on_step each step that joined."""
    seen, steps = [], []
    template = CollaborationTemplate(**SHORT)
    r = run(model, tok, workers=3, max_new_tokens=12, finisher_tokens=5, template=template, check_in_every=2,
            on_token=lambda w, t, text: seen.append((w, t, text)), on_step=steps.append)
    assert r.stopped == "budget" and r.stats.tokens_per_worker == [4, 4, 4]
    assert r.final_text.startswith(template.finisher) and r.stats.finisher_tokens == 5
    assert [s.ended for s in r.trace[-3:]] == ["cut"] * 3 and r.trace[-1].worker == 0 and r.open_steps == []
    assert steps == r.trace
    finisher_ids = encode_text(tok, template.finisher)
    s = r.stats
    assert s.kv["history"] == s.prompt_tokens + sum(len(x.token_ids) for x in r.trace) + len(finisher_ids) + 4
    layers = model.config.num_hidden_layers  # every token on the device, counted per layer
    assert s.kv["steps"] == [0, 0, 0] and s.kv["tiers"]["device"] == (s.kv["history"] + s.kv["headers"]) * layers
    for w in range(3):
        mine = [(t, text) for v, t, text in seen if v == w]
        extra = 5 if w == 0 else 0  # the finisher's tokens come last, for the finisher worker
        assert [t for t, _ in mine][:len(mine) - extra] == own_ids(r, w)
        # the text streamed is each step's, but for a character still incomplete when the step was cut
        steps = sorted([s for s in r.trace if s.worker == w], key=lambda s: s.number)
        assert "".join(text for _, text in mine[:len(mine) - extra]) == "".join(s.text.rstrip("\ufffd") for s in steps)
    assert "".join(text for v, _, text in seen[-5:]) == r.final_text[len(template.finisher):].rstrip("\ufffd")
    assert r.stats.inserted_per_worker == [len(own_ids(r, w)) - 4 for w in range(3)]
    # an answer pattern the finisher's own prompt completes stops it after one token
    short = run(model, tok, workers=2, max_new_tokens=2, finisher_tokens=5, answer_pattern=r"answer: \\boxed\{")
    assert short.answer == "answer: \\boxed{" and short.stats.finisher_tokens == 1


def test_history_spilled_to_host_and_disk_gives_the_same_run(model, tok):
    """history_options reach the shared history's tiers: with budgets that push most of it to host memory and
    disk, exact attention gives the same tokens, and `stats.kv` says where the KV is."""
    kw = dict(workers=2, max_new_tokens=16, check_in_every=4, finisher_tokens=3, template=CollaborationTemplate())
    on_device = run(model, tok, **kw)
    tiered = run(model, tok, history_options=dict(device_budget=132, host_budget=200), **kw)
    assert [own_ids(tiered, w) for w in range(2)] == [own_ids(on_device, w) for w in range(2)]
    assert tiered.final_text == on_device.final_text and tiered.stats.kv["history"] == on_device.stats.kv["history"]
    tiers, total = tiered.stats.kv["tiers"], on_device.stats.kv["tiers"]
    # residency per tier: a chunk brought back from disk may be counted in two tiers
    assert tiers["host"] > 0 and tiers["disk"] > 0 and sum(tiers.values()) >= sum(total.values())
    assert tiers["device"] < total["device"] / 4
    assert on_device.stats.kv["tiers"]["host"] == on_device.stats.kv["tiers"]["disk"] == 0


def test_sampling_with_a_seed_repeats(model, tok):
    kw = dict(workers=2, max_new_tokens=12, do_sample=True, temperature=1.5, top_k=40, top_p=0.9, finisher_tokens=0)
    a, b = run(model, tok, seed=7, **kw), run(model, tok, seed=7, **kw)
    c = run(model, tok, seed=8, **kw)
    assert [own_ids(a, w) for w in range(2)] == [own_ids(b, w) for w in range(2)]
    assert [own_ids(a, w) for w in range(2)] != [own_ids(c, w) for w in range(2)]
    greedy = run(model, tok, workers=2, max_new_tokens=12, finisher_tokens=0)
    assert [own_ids(a, w) for w in range(2)] != [own_ids(greedy, w) for w in range(2)]


# ----------------------------------------------------------------------------------- command line
def test_lanes_rewrite_in_place_on_a_terminal():
    out = io.StringIO()
    lanes = Lanes(["Alice", "Bob"], out, live=True)
    lanes.token(0, 5, "**Alice [1]:** x\x1b[2J")
    lanes.draw()
    lanes.step(Step(0, "Alice", 1, "**Alice [1]:** done.\n\n", (5,), "boundary"))
    lanes.token(1, 6, "**Bob [1]:** y\nz")
    lanes.draw()
    lanes.close()
    text = out.getvalue()
    assert text.count("\x1b[2F\x1b[J") == 4  # back over both lanes before each redraw, the step, the end
    assert "\x1b[2J" not in text and "\\x1b[2J" in text  # the model's text never drives the terminal
    assert "Alice | **Alice [1]:** done." in text and "  Bob \u2502 **Bob [1]:** y\u21b5z" in text


def test_lanes_show_worker_names_without_their_control_characters():
    out = io.StringIO()
    name = "Eve\x1b]0;title\x07"
    lanes = Lanes(["Al", name], out, live=True)
    lanes.token(1, 5, "x")
    lanes.draw()
    lanes.step(Step(1, name, 1, "**Eve [1]:** done.\n\n", (5,), "boundary"))
    lanes.close()
    text = out.getvalue()
    assert "\x1b]" not in text and "\x07" not in text
    assert "Eve\\x1b]0;title\\x07 | **Eve [1]:** done." in text
    assert "                Al \u2502 " in text  # the lanes line up on the names as shown


def _kvtier(*args: str, **kw) -> subprocess.Popen:
    exe = shutil.which("kvtier")
    cmd = [exe, *args] if exe else [sys.executable, "-m", "kvtier.cli", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_cli_shows_lanes_then_the_answer(tmp_path):
    model = save_tiny_model(tmp_path / "model")
    out_json = tmp_path / "run.json"
    procs = {
        "run": _kvtier("hogwild", "--model", str(model), "--workers", "2", "--problem", PROBLEM, "--max-new-tokens",
                       "6", "--check-in-every", "2", "--json", str(out_json), "--device-budget", "140",
                       "--host-budget", "300"),
        "missing": _kvtier("hogwild", "--model", str(tmp_path / "nope"), "--problem", PROBLEM),
    }
    done = {name: (p.wait(timeout=600), *p.communicate()) for name, p in procs.items()}
    rc, out, err = done["run"]
    assert rc == 0, err
    lanes = [line for line in out.splitlines() if re.match(r"^ *(Alice|Bob) \| ", line)]
    assert any(line.lstrip().startswith("Alice | **Alice [1]:**") for line in lanes), out
    assert any(line.lstrip().startswith("Bob | **Bob [1]:**") for line in lanes), out
    assert "answer:" in out and "stopped: budget | 2 workers | 6 tokens" in out and "KV: history" in out
    record = json.loads(out_json.read_text())
    assert record["stopped"] == "budget" and record["names"] == ["Alice", "Bob"]
    assert record["stats"]["kv"]["tiers"]["disk"] > 0  # the budgets reached the history: it spilled
    rc, out, err = done["missing"]
    assert rc == 2 and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("kvtier hogwild: error: model not found"), err


def test_cli_help_and_argument_errors(tmp_path, capsys):
    """Through kvtier's entry point, in this process (no model loads): --help, and one line per bad argument."""
    from kvtier.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["hogwild", "--help"])
    assert exit_.value.code == 0 and "--workers" in capsys.readouterr().out
    base = ["hogwild", "--model", str(tmp_path / "nope"), "--problem", PROBLEM]
    for extra, text in ((["--workers", "0"], "--workers 0"), (["--max-new-tokens", "0"], "--max-new-tokens 0"),
                        (["--top-p", "0"], "--top-p 0"), (["--names", "A"], "give 2 non-empty names"),
                        (["--json", str(tmp_path)], "is a directory"), (["--device", "nonsense"], "--device"),
                        (["--host-budget", "lots"], "--host-budget: budget 'lots'")):
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("kvtier hogwild: error:") and text in err[0], err
    assert not (tmp_path / "nope").exists()
