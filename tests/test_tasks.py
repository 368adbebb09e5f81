"""The synthetic retrieval tasks: exact prompt lengths, answers that are really in the prompt, sane weights."""

from __future__ import annotations

import random

import pytest

from kvtier.bench import tasks as T


@pytest.mark.parametrize("task", T.TASKS)
@pytest.mark.parametrize("length", [300, 1024])
def test_example_has_exact_length_and_its_answer_in_a_needle(task, length):
    ex = T.make_example(task, length, random.Random(f"{task}{length}"))
    assert len(ex.prompt_ids) == length
    assert ex.prompt_ids[0] == T.BOS
    assert len(ex.answer_ids) == 2 and ex.answer_ids[1] == T.EOS
    value = ex.answer_ids[0]
    assert value in T.VALUE_TOKENS.values()
    # the value closes the first relevant needle (a chain's first assignment for variable tracking)
    first = ex.relevant_needles[0]
    s, e = ex.needle_spans[first]
    needle = ex.prompt_ids[s:e]
    assert needle[0] == T.NEEDLE_START and needle[-2] == value and needle[-1] == T.NEEDLE_END
    assert sum(t == value for t in ex.prompt_ids) == 1  # nowhere else: only the needle gives it away


def test_multikey_question_names_exactly_one_needle():
    ex = T.make_example("niah_multikey", 2048, random.Random(3))
    key = ex.prompt_ids[-1]
    assert key in T.KEY_TOKENS.values() and T.decode_ids(ex.prompt_ids[-5:-1]) == "<query>KEY"
    needles = [ex.prompt_ids[s:e] for s, e in ex.needle_spans]
    assert len(needles) >= 4
    assert [n[-3] == key for n in needles].count(True) == 1
    assert ex.needle_spans[ex.relevant_needles[0]] == next(sp for sp, n in zip(ex.needle_spans, needles) if n[-3] == key)


def test_variable_tracking_chain_leads_from_question_to_value():
    ex = T.make_example("variable_tracking", 2048, random.Random(5))
    assign = {}  # variable -> right-hand side, from "<needle>VAR name rhs</needle>"
    for s, e in ex.needle_spans:
        needle = ex.prompt_ids[s:e]
        assign[needle[-3]] = needle[-2]
    name = ex.prompt_ids[-1]
    for _ in range(T.VT_HOPS):  # follow the chain backwards from the asked variable
        name = assign[name]
    assert name == ex.answer_ids[0] and name in T.VALUE_TOKENS.values()


def test_decoded_text_reads_as_plain_words():
    """Other models get the prompt as text: "<needle>KEY boot lilac</needle> ... <query>KEY boot" -> " lilac"."""
    ex = T.make_example("niah_multikey", 400, random.Random(7))
    text = T.decode_ids(ex.prompt_ids)
    needles = [n.split("</needle>")[0].split() for n in text.split("<needle>")[1:]]
    assert all(w[0] == "KEY" and w[1] in T.KEY_WORDS and w[2] in T.VALUE_WORDS for w in needles)
    asked = text.rsplit("<query>KEY ", 1)[1]
    assert T.decode_ids(ex.answer_ids) == " " + dict((w[1], w[2]) for w in needles)[asked] + "<eos>"


@pytest.mark.parametrize("task", ["niah_multikey", "niah_multikey_text", "variable_tracking", "passkey"])
def test_training_sequence_weights_mark_answers_only(task):
    ids, w = T.make_training_sequence(task, 512, random.Random(1))
    assert len(ids) == len(w) == 512 and ids[0] == T.BOS
    marked = [t for t, x in zip(ids, w) if x > 0]
    assert marked and all(t in T.VALUE_TOKENS.values() or t == T.EOS for t in marked)


@pytest.mark.parametrize("task", ["niah_multikey", "variable_tracking"])
def test_training_keys_and_values_stay_unique_in_long_dense_sequences(task):
    ids, w = T.make_training_sequence(task, 4096, random.Random(2), density=0.6)
    assert len(ids) == 4096
    needles = [ids[i + 1 : ids.index(T.NEEDLE_END, i)] for i, t in enumerate(ids) if t == T.NEEDLE_START]
    keys = [n[-2] for n in needles]
    assert len(needles) > 40 and len(set(keys)) == len(keys)


def test_variable_tracking_training_holds_two_chains_unless_asked_for_one():
    """With one chain any question's answer is its value, so matching the variable is not learned."""
    for seed in range(5):
        for single in (0.0, 1.0):
            ids, _ = T.make_training_sequence("variable_tracking", 64, random.Random(seed), single_chain=single)
            needles = ids.count(T.NEEDLE_START)
            assert len(ids) == 64
            assert needles == T.VT_HOPS if single else needles >= 2 * T.VT_HOPS


def test_text_haystack_falls_back_to_generated_text(tmp_path, monkeypatch):
    monkeypatch.delenv("KVTIER_HAYSTACK_DIR", raising=False)
    ex = T.make_example("niah_multikey_text", 512, random.Random(0), data_dir=str(tmp_path / "missing"))
    assert ex.haystack_source == "generated"


def test_unknown_task_is_an_error():
    with pytest.raises(ValueError, match="unknown task"):
        T.make_example("nope", 512, random.Random(0))
