"""`kvtier qa` saves its prefill after each segment: an interrupted prefill resumes from the last completed
segment, proven to be this document's by the session's token ids, and ends as an uninterrupted one does.

Run in process (`kvtier.qa.main`, the command's own entry) so that a Ctrl-C can be raised inside a chosen
segment's forward pass."""

from __future__ import annotations

import json
import resource

import pytest
from test_cli import DOC
from tiny import save_tiny_model

from kvtier import qa
from kvtier.report import describe, format_report

SEGMENT = 512


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    save_tiny_model(root / "model")
    (root / "doc.txt").write_text(DOC)
    (root / "other.txt").write_text("A different document entirely. " * 120)
    return root


def _interrupt_segment(monkeypatch, segment: int) -> None:
    """Make the next `kvtier qa` raise KeyboardInterrupt inside the forward pass of prefill segment `segment`
    (1-based), after its first decoder layer has stored its KV: a Ctrl-C in the middle of a segment."""
    real = qa.load

    def load(*args):
        tokenizer, model = real(*args)
        calls = 0

        def hook(*_):
            nonlocal calls
            calls += 1
            if calls == segment:
                raise KeyboardInterrupt

        model.model.layers[1].register_forward_pre_hook(hook)
        return tokenizer, model

    monkeypatch.setattr(qa, "load", load)


def _qa(tiny, store, capsys, doc: str = "doc.txt") -> tuple[int, str, str]:
    code = qa.main(["--model", str(tiny / "model"), "--doc", str(tiny / doc), "--store", str(store), "--quiet",
                    "--segment-tokens", str(SEGMENT), "--question", "What is the pass key?", "--max-new-tokens", "5",
                    "--json"])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_an_interrupted_prefill_resumes_from_its_last_segment(tiny, tmp_path, monkeypatch, capsys):
    store = tmp_path / "s"
    _interrupt_segment(monkeypatch, 4)
    code, _, err = _qa(tiny, store, capsys)
    n = int(err.split("prefilling ")[1].split(" tokens")[0])
    assert code == 130 and f"prefill interrupted; its first {3 * SEGMENT} of {n} tokens are saved" in err
    partial = describe(store)
    assert partial["context_tokens"] == 3 * SEGMENT and partial["info"]["prefill"] == "partial"
    assert f"unfinished: {3 * SEGMENT} of {n} tokens; the same kvtier qa command resumes it" in format_report(partial)
    monkeypatch.undo()

    code, out, err = _qa(tiny, store, capsys)
    assert code == 0, err
    assert f"resuming the prefill of {tiny / 'doc.txt'} at token {3 * SEGMENT} of {n}" in err
    assert f"(resumed at token {3 * SEGMENT})" in err and "prefilling" not in err
    resumed = json.loads(out)
    assert resumed["resumed_at"] == 3 * SEGMENT and resumed["prefill_s"] > 0

    code, out, err = _qa(tiny, tmp_path / "whole", capsys)  # the same document, never interrupted
    assert code == 0, err
    whole = json.loads(out)
    assert whole["answer"] == resumed["answer"] and whole["resumed_at"] is None
    a, b = describe(store), describe(tmp_path / "whole")
    assert a["info"]["prefill"] == b["info"]["prefill"] == "complete"
    assert a["context_tokens"] == b["context_tokens"] == n
    assert [layer["chunk_sizes"] for layer in a["layers"]] == [layer["chunk_sizes"] for layer in b["layers"]]

    code, out, err = _qa(tiny, store, capsys)  # complete now: reopened, answered at once
    assert code == 0 and "resuming" not in err and "prefilling" not in err and json.loads(out)["reopen_s"] > 0


def test_an_interrupt_after_the_final_save_says_the_prefill_is_complete(tiny, tmp_path, monkeypatch, capsys):
    """A Ctrl-C or SIGTERM that lands after the final save (with --remote: while publishing) finds every token
    saved: the message says so, not that a rerun resumes the prefill, and the next run answers at once."""
    from kvtier import KVTierCache
    real = KVTierCache.save

    def save(self, info=None, **kw):
        path = real(self, info, **kw)
        if (info or {}).get("prefill") == "complete":
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(KVTierCache, "save", save)
    store = tmp_path / "s"
    code, _, err = _qa(tiny, store, capsys)
    n = int(err.split("prefilling ")[1].split(" tokens")[0])
    assert code == 130 and f"interrupted after the prefill was saved: {store} holds all {n} tokens" in err
    assert "run the same command again" not in err
    monkeypatch.undo()
    code, out, err = _qa(tiny, store, capsys)
    assert code == 0 and "resuming" not in err and "prefilling" not in err and json.loads(out)["reopen_s"] > 0


def test_an_interrupted_first_segment_starts_over(tiny, tmp_path, monkeypatch, capsys):
    store = tmp_path / "s"
    _interrupt_segment(monkeypatch, 1)
    code, _, err = _qa(tiny, store, capsys)
    assert code == 130 and "no segment was saved yet: run the same command again to start over" in err
    monkeypatch.undo()
    code, _, err = _qa(tiny, store, capsys)
    assert code == 0, err
    assert "stopped before its first segment was saved; starting over" in err and "prefilling" in err


def test_the_unfinished_prefill_of_another_document_is_started_over(tiny, tmp_path, monkeypatch, capsys):
    """The token ids of the partial session prove it is another document's: one line, then a clean prefill."""
    store = tmp_path / "s"
    _interrupt_segment(monkeypatch, 3)
    assert _qa(tiny, store, capsys, doc="other.txt")[0] == 130
    monkeypatch.undo()
    code, out, err = _qa(tiny, store, capsys)
    assert code == 0, err
    notes = [line for line in err.splitlines() if "not this document's" in line]
    assert len(notes) == 1 and "differs from the session's tokens at position" in notes[0]
    assert notes[0].endswith("starting over") and json.loads(out)["resumed_at"] is None
    assert describe(store)["info"]["prefill"] == "complete"
    # a finished store of another document is never wiped: refused, --rebuild replaces it
    code, _, err = _qa(tiny, store, capsys, doc="other.txt")
    assert code == 2 and "holds another document" in err and "--rebuild" in err


def test_a_disk_that_fills_up_mid_prefill_keeps_the_checkpoint_and_says_so(tiny, tmp_path, monkeypatch, capsys):
    """The disk fills up during segment 3 (here: the process's file size limit, which fails a write as a full file
    system does): one line saying how much is saved and that the same command resumes once there is room."""
    store = tmp_path / "s"
    real, calls = qa.prefill, []
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)

    def prefill(*args, **kw):
        calls.append(1)
        if len(calls) == 3:  # not one byte more for the store from here on
            resource.setrlimit(resource.RLIMIT_FSIZE, ((store / "data.mdb").stat().st_size, hard))
        return real(*args, **kw)

    monkeypatch.setattr(qa, "prefill", prefill)
    try:
        code, _, err = _qa(tiny, store, capsys)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    n = int(err.split("prefilling ")[1].split(" tokens")[0])
    line = err.strip().splitlines()[-1]
    assert code == 2 and line.startswith("kvtier qa: error: prefill stopped: kvtier store") and "no room on the disk" in line
    assert line.endswith(f"its first {2 * SEGMENT} of {n} tokens are saved, and the same command resumes from there "
                         "once there is room")
    monkeypatch.undo()
    code, out, err = _qa(tiny, store, capsys)
    assert code == 0, err
    assert json.loads(out)["resumed_at"] == 2 * SEGMENT and describe(store)["info"]["prefill"] == "complete"
