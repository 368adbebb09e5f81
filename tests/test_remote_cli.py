"""`kvtier sessions`, `kvtier inspect URL` and `kvtier qa --remote` against a real Redis server, through the
command's own entry point (`kvtier.cli.main`, in process: each run loads a tiny model with a real tokenizer)."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import build_model
from redis_server import _free_port, with_name
from test_cli import DOC, _one_error_line
from test_qa_resume import _interrupt_segment
from tiny import save_tiny_model

from kvtier import KVTierCache
from kvtier.cli import main as kvtier_main
from kvtier.report import describe

pytestmark = pytest.mark.redis
CHUNKING = dict(chunk_size=16, sink_tokens=4, recent_window=16, device_budget=40, host_budget=32)
PASSWORD = "s3cret-Pw_4kvtier"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote-cli")
    save_tiny_model(root / "model")
    save_tiny_model(root / "sliding", family="qwen2")  # layer 0 sliding-window: a rewind reopens the session
    (root / "doc.txt").write_text(DOC)
    return root


def run(capsys, *args: str) -> subprocess.CompletedProcess:
    """`kvtier ARGS` in process: exit code, stdout and stderr."""
    code = kvtier_main(list(args))
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def publish(url: str, info: dict, tokens: int = 230, seed: int = 5) -> None:
    model = build_model("llama")
    doc = torch.randint(3, 128, (1, tokens), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        cache = KVTierCache.for_model(model, **CHUNKING)  # a temporary store: published, not kept
        model(doc, past_key_values=cache, use_cache=True)
        cache.save(info, remote=url)
        cache.close()


def qa(capsys, tiny, store: Path, *extra: str, model: str = "model",
       question: str = "What is the pass key?") -> tuple[subprocess.CompletedProcess, dict]:
    out = run(capsys, "qa", "--model", str(tiny / model), "--doc", str(tiny / "doc.txt"), "--store", str(store),
              "--question", question, "--max-new-tokens", "5", "--json", "--quiet", *extra)
    assert out.returncode == 0, out.stderr
    return out, json.loads(out.stdout)


def test_sessions_lists_what_is_published(redis_url, capsys):
    empty = run(capsys, "sessions", redis_url)
    assert empty.returncode == 0 and "no kvtier sessions" in empty.stdout, empty.stderr
    publish(with_name(redis_url, "alpha"), {"document": "red\x1b[31mreport.txt"})
    publish(with_name(redis_url, "beta"), {"document": "b.txt"}, tokens=100, seed=6)
    text = run(capsys, "sessions", redis_url)
    assert text.returncode == 0, text.stderr
    header, alpha, beta = text.stdout.splitlines()
    assert header.split() == ["NAME", "MODEL", "TOKENS", "SIZE", "PUBLISHED", "INFO"]
    assert alpha.startswith("alpha ") and "llama, 4 layers, float32" in alpha and " 230 " in alpha and "KiB" in alpha
    assert "\x1b" not in alpha and "document=red\\x1b[31mreport.txt" in alpha  # escaped, never sent raw
    assert beta.startswith("beta ") and " 100 " in beta and "document=b.txt" in beta
    listed = json.loads(run(capsys, "sessions", redis_url, "--json").stdout)
    assert "prefix" not in listed["server"] and listed["prefix"] == redis_url.split("prefix=")[1]
    a, b = listed["sessions"]
    assert (a["name"], a["tokens"], b["name"], b["tokens"]) == ("alpha", 230, "beta", 100)
    assert a["url"] == with_name(redis_url, "alpha")  # what kvtier inspect and KVTierCache.open take
    assert (a["model_type"], a["num_layers"], a["dtype"]) == ("llama", 4, "float32")
    assert a["info"] == {"document": "red\x1b[31mreport.txt"} and a["bytes"] > b["bytes"] > 0
    assert a["records"] > 0 and a["published"] > 0 and a["published_utc"].endswith("+00:00")
    _one_error_line(run(capsys, "sessions", with_name(redis_url, "alpha")), "kvtier inspect")


def test_inspect_a_published_session_reads_its_metadata_only(private_redis, tmp_path, capsys):
    server = private_redis()
    url = with_name(server.url, "doc")
    model = build_model("llama")
    doc = torch.randint(3, 128, (1, 230), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        cache = KVTierCache.for_model(model, store_path=tmp_path / "local", **CHUNKING)
        model(doc, past_key_values=cache, use_cache=True)
        cache.save({"document": "a.txt"}, remote=url)
        cache.close()
    client = server.client()
    client.config_resetstat()
    out = run(capsys, "inspect", url)
    assert out.returncode == 0, out.stderr
    stats = client.info("commandstats")
    # values are read with GETRANGE: the pointer, the header, the manifest and the record index, no record
    assert stats["cmdstat_getrange"]["calls"] == 4, stats
    lines = out.stdout.splitlines()
    assert lines[0] == f"store       {url}" and "model       llama: 4 layers" in lines[1]
    assert "on the server" in out.stdout and "context     230 tokens" in out.stdout and "info        document=a.txt" in out.stdout
    remote, local = json.loads(run(capsys, "inspect", url, "--json").stdout), describe(tmp_path / "local")
    assert remote["path"] == url and remote["server"]["bytes"] > remote["stored_bytes"] > 0
    for key in ("context_tokens", "layers", "stored_bytes", "records", "info", "signature"):
        assert remote[key] == local[key], key
    _one_error_line(run(capsys, "inspect", server.url), "kvtier sessions")
    _one_error_line(run(capsys, "inspect", with_name(server.url, "nothing")), "no session named 'nothing'")


def test_qa_remote_publishes_its_prefill_and_a_second_machine_answers_from_it(tiny, redis_url, tmp_path, capsys):
    first, one = qa(capsys, tiny, tmp_path / "a", "--remote", redis_url)
    assert one["source"] == "prefill" and one["prefill_s"] > 0 and "publishing the session" in first.stderr
    assert one["remote"].startswith(redis_url.split("?")[0] + "/qa-float32-") and one["remote"].endswith(
        "?" + redis_url.split("?")[1])
    listed = json.loads(run(capsys, "sessions", redis_url, "--json").stdout)["sessions"]
    assert [s["url"] for s in listed] == [one["remote"]] and listed[0]["info"]["document"] == str(tiny / "doc.txt")
    # "another machine": an empty local store; the session is read from the server, nothing is prefilled
    second, two = qa(capsys, tiny, tmp_path / "b", "--remote", redis_url)
    assert "prefilling" not in second.stderr and "reopen from the server" in second.stderr
    assert two["source"] == "server" and two["prefill_s"] is None and 0 < two["reopen_s"] <= two["first_token_s"]
    assert two["answer"] == one["answer"] and two["context_tokens"] == one["context_tokens"]
    again = qa(capsys, tiny, tmp_path / "b", "--remote", redis_url)[1]  # its records now cached in b
    assert again["source"] == "server" and again["answer"] == one["answer"]
    # b caches a server session: without --remote it is not mistaken for an unfinished prefill
    _one_error_line(run(capsys, "qa", "--model", str(tiny / "model"), "--doc", str(tiny / "doc.txt"), "--store",
                        str(tmp_path / "b"), "--question", "x"), "pass the same --remote URL")
    # a name taken meanwhile (here by the first machine) is said, and this machine answers from its own prefill
    taken, three = qa(capsys, tiny, tmp_path / "c", "--remote", redis_url, "--rebuild")
    assert "is already published" in taken.stderr and three["source"] == "prefill"
    assert three["answer"] == one["answer"]


def test_qa_remote_publishes_a_finished_local_session(tiny, redis_url, tmp_path, capsys):
    local = qa(capsys, tiny, tmp_path / "a")[1]  # prefilled without --remote
    assert local["remote"] is None
    out, record = qa(capsys, tiny, tmp_path / "a", "--remote", redis_url)
    assert record["source"] == "store" and "publishing the session" in out.stderr
    assert [s["url"] for s in json.loads(run(capsys, "sessions", redis_url, "--json").stdout)["sessions"]] == [
        record["remote"]]
    out, record = qa(capsys, tiny, tmp_path / "a", "--remote", redis_url)
    assert "publishing" not in out.stderr


def test_qa_remote_prefers_a_published_session_to_resuming_a_prefill(tiny, redis_url, tmp_path, capsys,
                                                                     monkeypatch):
    _interrupt_segment(monkeypatch, 2)  # a local prefill, interrupted after its first segment was saved
    out = run(capsys, "qa", "--model", str(tiny / "model"), "--doc", str(tiny / "doc.txt"), "--store",
              str(tmp_path / "partial"), "--segment-tokens", "512", "--question", "x", "--quiet")
    assert out.returncode == 130, out.stderr
    monkeypatch.undo()
    published = qa(capsys, tiny, tmp_path / "a", "--remote", redis_url)[1]
    out, record = qa(capsys, tiny, tmp_path / "partial", "--remote", redis_url, "--segment-tokens", "512")
    assert "instead of resuming the prefill at token 512" in out.stderr and "prefilling" not in out.stderr
    assert record["source"] == "server" and record["answer"] == published["answer"]
    assert describe(tmp_path / "partial")["caches"]["name"] == record["remote"].split("/")[-1].split("?")[0]


def test_qa_remote_rewinds_and_reopens_between_questions(tiny, redis_url, tmp_path, capsys, monkeypatch):
    """A sliding-window layer cannot crop back past its window, so each question after the first reopens the
    session: from the server, for a session read from there. Answers match the prefilling machine's."""
    runs = []
    for store in ("a", "b"):
        monkeypatch.setattr("sys.stdin", io.StringIO("Who?\nWhat is the pass key?\n"))
        out = run(capsys, "qa", "--model", str(tiny / "sliding"), "--doc", str(tiny / "doc.txt"), "--remote",
                  redis_url, "--store", str(tmp_path / store), "--max-new-tokens", "80", "--json", "--quiet")
        assert out.returncode == 0, out.stderr
        runs.append([json.loads(line) for line in out.stdout.splitlines()])
    (p1, p2), (s1, s2) = runs
    assert p1["source"] == "prefill" and s1["source"] == s2["source"] == "server"
    assert p2["reopen_s"] is not None and s2["reopen_s"] is not None  # the second question reopened the session
    assert (s1["answer"], s2["answer"]) == (p1["answer"], p2["answer"])


def test_remote_errors_are_one_line_without_credentials(tiny, private_redis, tmp_path, capsys):
    server = private_redis()
    server.client().config_set("requirepass", PASSWORD)  # as --requirepass would (the fixture pings without one)
    host = server.url.split("//")[1]
    closed = f"redis://:{PASSWORD}@127.0.0.1:{_free_port()}/0"
    wrong = f"redis://:wrong-{PASSWORD}@{host}"
    qa_args = ["qa", "--model", str(tiny / "model"), "--doc", str(tiny / "doc.txt"), "--store", str(tmp_path / "s"),
               "--question", "x", "--remote"]
    cases = [(["sessions", closed], "cannot reach the server"),
             (["inspect", with_name(closed, "doc")], "cannot reach the server"),
             ([*qa_args, closed], "cannot reach the server"),
             (["sessions", wrong], "refused the credentials"),
             (["inspect", with_name(wrong, "doc")], "refused the credentials"),
             ([*qa_args, wrong], "refused the credentials"),
             (["sessions", server.url], "refused the credentials"),  # no password at all
             (["sessions", "http://127.0.0.1:6379/0"], "must be a URL such as redis://"),
             (["sessions", f"redis://:{PASSWORD}@127.0.0.1:6379/zz"], "database must be a number"),
             ([*qa_args, f"redis://:{PASSWORD}@{host}/doc"], "name the server alone"),
             ([*qa_args, "redis://127.0.0.1:6379/0?prefix=a:b"], "--remote: a key prefix is")]
    for args, text in cases:
        out = run(capsys, *args)
        _one_error_line(out, text)
        assert PASSWORD not in out.stdout + out.stderr, args
    assert not (tmp_path / "s").exists()  # refused before the model loaded: nothing written
    # the right password: a prefill published and answered; the password is in no message, store or listing
    good = f"redis://:{PASSWORD}@{host}"
    first, one = qa(capsys, tiny, tmp_path / "a", "--remote", good)
    second, two = qa(capsys, tiny, tmp_path / "b", "--remote", good)
    listing = run(capsys, "sessions", good, "--json")
    assert two["source"] == "server" and two["answer"] == one["answer"]
    client = server.client(good)
    client.config_resetstat()
    three = qa(capsys, tiny, tmp_path / "b", "--remote", good)[1]
    # b caches the records: the pointer (looked up, then opened) and the metadata are read, no record
    assert three["source"] == "server" and client.info("commandstats")["cmdstat_getrange"]["calls"] <= 5
    for out in (first, second, listing):
        assert PASSWORD not in out.stdout + out.stderr
    for path in [*(tmp_path / "a").rglob("*"), *(tmp_path / "b").rglob("*")]:
        assert PASSWORD.encode() not in path.read_bytes(), path


def test_qa_remote_answers_past_a_damaged_pointer_and_never_publishes_over_it(tiny, redis_url, tmp_path, capsys):
    """A damaged pointer under the document's name blocked `qa --remote` for good: every run said 'pass
    --rebuild', --rebuild then called it 'already published (another machine published it first)', and the
    next run refused again. Now each run says the name cannot be used and answers from its own session."""
    from test_remote import prefix_of, raw

    published = qa(capsys, tiny, tmp_path / "a", "--remote", redis_url)[1]
    name = published["remote"].split("/")[-1].split("?")[0]
    client = raw(redis_url)
    client.set(f"{prefix_of(redis_url)}:{{{name}}}:session", b"garbage")  # the pointer, damaged
    said = "is damaged (not a sealed kvtier entry); answering from this machine's own session, not published over it"
    for store, extra, source in (("b", (), "prefill"), ("b", (), "store"), ("c", ("--rebuild",), "prefill")):
        out, record = qa(capsys, tiny, tmp_path / store, "--remote", redis_url, *extra)
        assert said in out.stderr and out.stderr.count(said) == 1, out.stderr
        assert "already published" not in out.stderr and "Traceback" not in out.stderr
        assert record["source"] == source and record["answer"] == published["answer"]
    assert client.get(f"{prefix_of(redis_url)}:{{{name}}}:session") == b"garbage"  # never written over


def test_qa_remote_says_publishing_on_a_line_of_its_own(tiny, redis_url, tmp_path, capsys):
    """The progress bar was still open when the final save printed 'kvtier: publishing ...': the line ran on
    from the bar's."""
    out = run(capsys, "qa", "--model", str(tiny / "model"), "--doc", str(tiny / "doc.txt"), "--store",
              str(tmp_path / "a"), "--question", "x", "--max-new-tokens", "2", "--remote", redis_url)
    assert out.returncode == 0 and "kvtier: publishing the session" in out.stderr, out.stderr
    before = out.stderr.split("kvtier: publishing the session")[0]
    assert before.endswith(("\n", "\r")), repr(before[-80:])
