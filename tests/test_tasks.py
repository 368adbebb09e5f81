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
    assert ex.prompt_ids[0] == T.BOS and ex.prompt_ids[-1] == T.ANSWER
    assert ex.answer_ids[-1] == T.EOS and len(ex.answer_ids) == T.VALUE_DIGITS + 1
    value = T.decode_ids(ex.answer_ids[:-1])
    assert value.isdigit()
    # the value sits in the first relevant needle (a chain's first assignment for variable tracking)
    first = ex.relevant_needles[0]
    s, e = ex.needle_spans[first]
    needle = ex.prompt_ids[s:e]
    assert needle[0] == T.NEEDLE_START and needle[-1] == T.NEEDLE_END
    assert value in T.decode_ids(needle)


def test_multikey_question_names_exactly_one_needle():
    ex = T.make_example("niah_multikey", 2048, random.Random(3))
    question = T.decode_ids(ex.prompt_ids[-(T.MULTIKEY_KEY_LEN + 6):])
    key = question.split("KEY ")[1][: T.MULTIKEY_KEY_LEN]
    needles = [T.decode_ids(ex.prompt_ids[s:e]) for s, e in ex.needle_spans]
    assert sum(f"KEY {key}<answer>" in n for n in needles) == 1
    assert len(needles) >= 4


def test_variable_tracking_chain_leads_from_question_to_value():
    ex = T.make_example("variable_tracking", 2048, random.Random(5))
    text = T.decode_ids(ex.prompt_ids)
    name = text.rsplit("VAR ", 1)[1][: T.VT_NAME_LEN]
    for _ in range(T.VT_HOPS):  # follow the chain backwards from the asked variable
        name = text.split(f"<needle>VAR {name}<answer>", 1)[1].split("</needle>", 1)[0]
    assert name == T.decode_ids(ex.answer_ids[:-1])


@pytest.mark.parametrize("task", ["niah_multikey", "niah_multikey_text", "variable_tracking", "passkey"])
def test_training_sequence_weights_mark_answers_only(task):
    ids, w = T.make_training_sequence(task, 512, random.Random(1))
    assert len(ids) == len(w) == 512 and ids[0] == T.BOS
    marked = [t for t, x in zip(ids, w) if x > 0]
    assert marked and all(48 <= t <= 57 or t == T.EOS for t in marked)


def test_text_haystack_falls_back_to_generated_text(tmp_path, monkeypatch):
    monkeypatch.delenv("KVTIER_HAYSTACK_DIR", raising=False)
    ex = T.make_example("niah_multikey_text", 512, random.Random(0), data_dir=str(tmp_path / "missing"))
    assert ex.haystack_source == "generated"


def test_unknown_task_is_an_error():
    with pytest.raises(ValueError, match="unknown task"):
        T.make_example("nope", 512, random.Random(0))


@pytest.mark.parametrize("task", ["niah_multikey", "variable_tracking"])
def test_curriculum_sizes_shorten_keys_and_values_and_stay_unique(task):
    ids, w = T.make_training_sequence(task, 2048, random.Random(2), key_len=1, value_digits=1)
    assert len(ids) == 2048
    text = T.decode_ids(ids)
    answers = T.decode_ids([t for t, x in zip(ids, w) if x > 0]).split("<eos>")[:-1]
    assert answers and all(len(a) == 1 and a.isdigit() for a in answers)
    prefix = "KEY " if task == "niah_multikey" else "VAR "
    names = [part.split("<answer>")[0] for part in text.split("<needle>" + prefix)[1:]]
    assert all(len(n) == 1 for n in names) and len(set(names)) == len(names)  # 1-letter, unique
