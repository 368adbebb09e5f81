"""Synthetic long-context retrieval tasks on a vocabulary of bytes plus whole-word keys and values.

Tokens 0-255 are the bytes of UTF-8 text; a few special tokens follow from 256, then one token per key
word (``KEY_WORDS``) and per value word (``VALUE_WORDS``), the way a BPE vocabulary holds common words
whole. Text is always encoded byte by byte (``encode_text``); only the keys and values the tasks place
are word tokens, so a model must find the needle to answer, not spell it. ``decode_ids`` writes every
token back as text, so any other model can be given the same prompts through its own tokenizer.

Every task builds a prompt ``BOS haystack-with-needles QUERY question`` that ends right where the answer
starts; the answer is one value word followed by EOS. A needle is ``NEEDLE_START text value NEEDLE_END``
and the question repeats its text, ``QUERY text``, so the answer is what followed that text in the needle
(what an induction head copies).

Tasks (``TASKS``):

- ``passkey``: one needle ``<needle>The pass key is amber</needle>`` in a repeated noise haystack.
- ``niah_multikey``: 4-8 needles ``<needle>KEY apple amber</needle>`` in random generated
  sentences; the question (``<query>KEY apple``) names one key.
- ``niah_multikey_text``: the same in natural text (``haystack_text``: essays from ``data_dir`` or
  $KVTIER_HAYSTACK_DIR, generated sentences when absent).
- ``variable_tracking``: 2-4 chains ``VAR apple amber`` ... ``VAR tiger apple``
  (``VT_HOPS`` assignments per chain, in order) in the noise haystack; the question names the last
  variable of one chain and the answer is the value its chain starts from (``VT_HOPS`` lookups).

``make_example`` gives one evaluation prompt; ``make_training_sequence`` gives a dense training sequence
with many needles and many questions and a per-token loss weight.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from kvtier.bench.common import haystack_text

# Vocabulary: bytes 0-255, then the special tokens.
BOS = 256
EOS = 257
PAD = 258
NEEDLE_START = 259
NEEDLE_END = 260
QUERY = 261
SPECIAL_TOKENS: dict[int, str] = {
    BOS: "<bos>",
    EOS: "<eos>",
    PAD: "<pad>",
    NEEDLE_START: "<needle>",
    NEEDLE_END: "</needle>",
    QUERY: "<query>",
}

# Keys (multi-key needles, variable names) and values: one token each. Disjoint lists, so a model can
# tell a variable name (look further) from a value (the answer).
KEY_WORDS: tuple[str, ...] = tuple("""
apple anchor arrow badge barrel basket beacon bell blanket boot bottle bracelet brick broom bucket button
cabin cactus camera candle canoe canvas carpet castle chain chalk cherry chimney clock cloud coin comet compass
cotton crown crystal curtain cushion diamond dolphin dragon drum eagle falcon feather fence fiddle flag flute fossil
fountain galaxy glacier glove goblet guitar hammer harbor harp helmet hive horizon iceberg igloo jacket jigsaw kettle
kite ladder lantern lemon lizard magnet mango maple meadow mirror mitten nest oak orchid otter paddle palace panther
parrot pebble pencil pepper piano pillow pine planet pocket pumpkin puzzle quill rabbit raven ribbon rocket saddle
salmon satchel scarf shell shovel sleigh spoon spruce statue sunflower sword teapot tiger tomato torch tower trumpet
""".split())
VALUE_WORDS: tuple[str, ...] = tuple("""
amber azure crimson golden indigo ivory jade lilac magenta maroon ochre olive scarlet teal violet brave calm eager
fancy gentle happy jolly kind lively merry nimble proud silly witty zealous ancient brisk chilly dusty fluffy frosty
glossy grumpy hollow humble icy jagged lofty lucky misty noble odd plump polite rapid rusty shiny shy sleepy smoky
snowy soggy spicy steady sturdy sunny tame tidy tiny vivid wary wild windy wise zesty agile bold clever curly
dizzy fierce fuzzy giddy hasty hungry lazy loud mellow modest nervous prickly quirky royal rugged salty sharp
silent sleek smooth soft solid sour sparkly speedy stormy sweet swift tangy tender thirsty tough vast velvety
weary wobbly wooden woolly zany balmy breezy bumpy cheery crisp dainty dreamy eerie faint fizzy gleaming grand
""".split())[: len(KEY_WORDS)]
WORD_BASE = 264  # first word token; 262 byte and special tokens, rounded up to a multiple of 8
KEY_TOKENS: dict[str, int] = {w: WORD_BASE + i for i, w in enumerate(KEY_WORDS)}
VALUE_TOKENS: dict[str, int] = {w: WORD_BASE + len(KEY_WORDS) + i for i, w in enumerate(VALUE_WORDS)}
WORDS_OF_TOKENS: dict[int, str] = {t: " " + w for d in (KEY_TOKENS, VALUE_TOKENS) for w, t in d.items()}
VOCAB_SIZE = -(-(WORD_BASE + len(KEY_WORDS) + len(VALUE_WORDS)) // 8) * 8

TASKS: tuple[str, ...] = ("passkey", "niah_multikey", "niah_multikey_text", "variable_tracking")
VT_HOPS = 2  # assignments per chain: VAR B = A, VAR A = amber -> asking B takes 2 lookups

_NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
_WORDS = (
    "the of and to in is was that for on with as by at from his her they this which be are an or had not "
    "but have one all were when there their what so out up if about into who them some could time would "
    "people other than then now only its over also after new first because way even most made many "
    "river garden letter window market winter history language engine number village science morning "
    "small large quiet bright early late warm cold green blue old young open closed simple careful "
    "house road city field forest mountain ocean island bridge station school office kitchen table "
    "walks reads writes builds finds keeps brings carries watches follows opens closes starts stops "
    "teacher farmer doctor painter sailor student writer driver baker singer friend neighbor stranger "
    "slowly quickly often never always sometimes together alone again almost nearly"
).split()


@dataclass
class Example:
    """One evaluation prompt: the model should greedily continue `prompt_ids` with `answer_ids`."""

    prompt_ids: list[int]
    answer_ids: list[int]  # one value word token, then EOS
    needle_spans: list[tuple[int, int]]  # [start, end) token ranges of every needle, markers included
    relevant_needles: list[int] = field(default_factory=list)  # indices into needle_spans the answer needs
    task: str = ""
    haystack_source: str = ""


def encode_text(text: str) -> list[int]:
    """UTF-8 bytes as token ids."""
    return list(text.encode("utf-8"))


def decode_ids(ids) -> str:
    """Token ids back to text; special tokens are written as ``<name>``."""
    out: list[str] = []
    buf = bytearray()
    for t in ids:
        t = int(t)
        if t < 256:
            buf.append(t)
            continue
        if buf:
            out.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
        out.append(WORDS_OF_TOKENS.get(t) or SPECIAL_TOKENS.get(t, f"<{t}>"))
    if buf:
        out.append(buf.decode("utf-8", errors="replace"))
    return "".join(out)


# ----------------------------------------------------------------------------------------------------
# haystacks

_TEXT_CACHE: dict[str | None, tuple[bytes, str]] = {}


def _natural_text(data_dir: str | None) -> tuple[bytes, str]:
    key = str(data_dir) if data_dir else None
    if key not in _TEXT_CACHE:
        text, source = haystack_text(2_000_000, data_dir)
        _TEXT_CACHE[key] = (text.encode("utf-8"), source)
    return _TEXT_CACHE[key]


def _noise_haystack(n: int, rng: random.Random) -> list[int]:
    noise = encode_text(_NOISE)
    reps = n // len(noise) + 2
    start = rng.randrange(len(noise))
    return (noise * reps)[start : start + n]


def _sentence_haystack(n: int, rng: random.Random) -> list[int]:
    out: list[int] = []
    while len(out) < n:
        words = [rng.choice(_WORDS) for _ in range(rng.randint(5, 16))]
        out.extend(encode_text(" ".join(words).capitalize() + ". "))
    return out[:n]


def _text_haystack(n: int, rng: random.Random, data_dir: str | None) -> tuple[list[int], str]:
    text, source = _natural_text(data_dir)
    if len(text) <= n + 1:
        text = text * (n // max(1, len(text)) + 2)
    start = rng.randrange(len(text) - n)
    return list(text[start : start + n]), source


def haystack(kind: str, n: int, rng: random.Random, data_dir: str | None = None) -> tuple[list[int], str]:
    """`n` filler tokens: kind is 'noise' (repeated sentences), 'sentences' (random words) or 'text'."""
    if kind == "noise":
        return _noise_haystack(n, rng), "noise"
    if kind == "sentences":
        return _sentence_haystack(n, rng), "generated"
    if kind == "text":
        return _text_haystack(n, rng, data_dir)
    raise ValueError(f"unknown haystack kind {kind!r}")


_HAYSTACK_OF = {
    "passkey": "noise",
    "niah_multikey": "sentences",
    "niah_multikey_text": "text",
    "variable_tracking": "noise",
}

# ----------------------------------------------------------------------------------------------------
# needles and questions


def _needle(text: str, key: str | None, value: int) -> list[int]:
    """``<needle>text key value</needle>``; `key` is a key word or None, `value` a word token."""
    key_ids = [KEY_TOKENS[key]] if key else []
    return [NEEDLE_START, *encode_text(text), *key_ids, value, NEEDLE_END]


def _question(text: str, key: str | None = None) -> list[int]:
    """``<query>text key``: the answer is what followed the same words in the needle."""
    return [QUERY, *encode_text(text), *([KEY_TOKENS[key]] if key else [])]


def _answer(value: str) -> list[int]:
    return [VALUE_TOKENS[value], EOS]


def passkey_needle(value: str) -> list[int]:
    return _needle("The pass key is", None, VALUE_TOKENS[value])


def passkey_question() -> list[int]:
    return _question("What is the pass key? The pass key is")


def multikey_needle(key: str, value: str) -> list[int]:
    return _needle("KEY", key, VALUE_TOKENS[value])


def multikey_question(key: str) -> list[int]:
    return _question("KEY", key)


def vt_needle(name: str, rhs: str) -> list[int]:
    """``VAR name = rhs``: `rhs` is a value word (a chain's start) or another variable's name."""
    return _needle("VAR", name, VALUE_TOKENS.get(rhs) or KEY_TOKENS[rhs])


def vt_question(name: str) -> list[int]:
    return _question("VAR", name)


def _snap(hay: list[int], pos: int) -> int:
    """Move an insertion point forward to just after a space or newline (within 40 tokens)."""
    for p in range(pos, min(len(hay), pos + 40)):
        if p == 0 or hay[p - 1] in (32, 10):
            return p
    return pos


def _assemble(
    hay: list[int], items: list[tuple[float, list[int]]]
) -> tuple[list[int], list[tuple[int, int]]]:
    """Insert `items` (depth in [0, 1], tokens) into `hay` in depth order; return ids and item spans.

    Spans come back in the order of `items`.
    """
    order = sorted(range(len(items)), key=lambda i: items[i][0])
    points = [_snap(hay, int(items[i][0] * len(hay))) for i in order]
    # keep points non-decreasing after snapping
    for j in range(1, len(points)):
        points[j] = max(points[j], points[j - 1])
    ids: list[int] = []
    spans: list[tuple[int, int]] = [(0, 0)] * len(items)
    prev = 0
    for i, p in zip(order, points):
        ids.extend(hay[prev:p])
        start = len(ids)
        ids.extend(items[i][1])
        spans[i] = (start, len(ids))
        prev = p
    ids.extend(hay[prev:])
    return ids, spans


# ----------------------------------------------------------------------------------------------------
# evaluation examples


def make_example(task: str, context_tokens: int, rng: random.Random, data_dir: str | None = None) -> Example:
    """One prompt of exactly `context_tokens` tokens (BOS and question included) for `task`.

    Needles sit at random depths, the question is at the end and the prompt ends with the question's last token.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    needles: list[list[int]] = []
    relevant: list[int] = []
    depths: list[float] | None = None
    if task == "passkey":
        value = rng.choice(VALUE_WORDS)
        needles.append(passkey_needle(value))
        relevant = [0]
        question = passkey_question()
    elif task in ("niah_multikey", "niah_multikey_text"):
        n = rng.randint(4, 8)
        keys, values = rng.sample(KEY_WORDS, n), rng.sample(VALUE_WORDS, n)
        needles = [multikey_needle(k, v) for k, v in zip(keys, values)]
        target = rng.randrange(n)
        relevant = [target]
        value = values[target]
        question = multikey_question(keys[target])
    else:  # variable_tracking
        n_chains = rng.randint(2, 4)
        depths = []
        target = rng.randrange(n_chains)
        all_names, values = rng.sample(KEY_WORDS, n_chains * VT_HOPS), rng.sample(VALUE_WORDS, n_chains)
        for c in range(n_chains):
            names, v = all_names[c * VT_HOPS : (c + 1) * VT_HOPS], values[c]
            ds = sorted(rng.random() for _ in range(VT_HOPS))
            for h in range(VT_HOPS):
                if c == target:
                    relevant.append(len(needles))
                needles.append(vt_needle(names[h], v if h == 0 else names[h - 1]))
                depths.append(ds[h])
            if c == target:
                value, last = v, names[-1]
        question = vt_question(last)
    fixed = 1 + sum(len(x) for x in needles) + len(question)
    n_hay = max(0, context_tokens - fixed)
    hay, source = haystack(_HAYSTACK_OF[task], n_hay, rng, data_dir)
    if depths is None:
        depths = [rng.random() for _ in needles]
    body, spans = _assemble(hay, list(zip(depths, needles)))
    prompt = [BOS, *body, *question]
    spans = [(s + 1, e + 1) for s, e in spans]
    return Example(prompt, _answer(value), spans, relevant, task, source)


# ----------------------------------------------------------------------------------------------------
# dense training sequences


def make_training_sequence(
    task: str,
    seq_len: int,
    rng: random.Random,
    data_dir: str | None = None,
    end_fraction: float = 0.5,
    density: float = 0.33,
    single_chain: float = 0.25,
) -> tuple[list[int], list[float]]:
    """A training sequence of exactly `seq_len` tokens with many needles and many questions.

    Returns (ids, weights): weight 1 on the answer tokens (to be predicted from the previous position,
    i.e. weights[i] says whether ids[i] is an answer token), 0 elsewhere. Each question comes after the
    needle(s) it needs; with probability `end_fraction` a question goes to the end block, like in
    `make_example`. Each key is asked at most once, so no answer can be copied from an earlier answer.
    About `density` of the tokens are needles and questions (as many as the word lists allow: keys and
    values stay unique within a sequence), the rest is haystack. A variable-tracking sequence holds one
    chain with probability `single_chain`, else two or more.
    """
    if task == "passkey":
        ex = make_example(task, seq_len - 2, rng, data_dir)
        ids = ex.prompt_ids + ex.answer_ids
        w = [0.0] * len(ex.prompt_ids) + [1.0] * len(ex.answer_ids)
        return ids, w
    items: list[tuple[float, list[int], list[int]]] = []  # (depth, tokens, answer tokens or [])
    end_block: list[tuple[list[int], list[int]]] = []
    budget = max(32, int(seq_len * density))

    def ask(after: float, q: list[int], a: list[int]) -> None:
        if rng.random() < end_fraction:
            end_block.append((q, a))
        else:
            items.append((after + (1 - after) * rng.random(), q, a))

    used = 0
    if task in ("niah_multikey", "niah_multikey_text"):
        n_max = max(2, min(len(KEY_WORDS), budget // 16))
        n = rng.randint(max(2, n_max // 2), n_max)
        for k, v in zip(rng.sample(KEY_WORDS, n), rng.sample(VALUE_WORDS, n)):
            d = rng.random()
            needle = multikey_needle(k, v)
            items.append((d, needle, []))
            used += len(needle)
            if rng.random() < 0.8 and used < budget:
                q, a = multikey_question(k), _answer(v)
                ask(d, q, a)
                used += len(q) + len(a)
            if used >= budget:
                break
    elif task == "variable_tracking":
        # mostly two chains or more, so the question's variable must be matched (a lone chain's value
        # answers any question about it); sometimes one, as in a passkey prompt
        c_max = max(2, min(len(KEY_WORDS) // VT_HOPS, budget // 27))
        n_chains = 1 if rng.random() < single_chain else rng.randint(max(2, c_max // 2), c_max)
        all_names, values = rng.sample(KEY_WORDS, n_chains * VT_HOPS), rng.sample(VALUE_WORDS, n_chains)
        for c in range(n_chains):
            names, v = all_names[c * VT_HOPS : (c + 1) * VT_HOPS], values[c]
            ds = sorted(rng.random() for _ in range(VT_HOPS))
            for h in range(VT_HOPS):
                needle = vt_needle(names[h], v if h == 0 else names[h - 1])
                items.append((ds[h], needle, []))
                used += len(needle)
            # mostly ask the end of the chain; sometimes an intermediate variable
            h = VT_HOPS - 1 if rng.random() < 0.75 else rng.randrange(VT_HOPS)
            q, a = vt_question(names[h]), _answer(v)
            ask(ds[-1] if h == VT_HOPS - 1 else ds[h], q, a)
            used += len(q) + len(a)
            if used >= budget:
                break
    else:
        raise ValueError(f"unknown task {task!r}")
    rng.shuffle(end_block)
    tail: list[int] = []
    tail_w: list[float] = []
    for q, a in end_block:
        tail += q + a
        tail_w += [0.0] * len(q) + [1.0] * len(a)
    fixed = 1 + sum(len(t) + len(a) for _, t, a in items) + len(tail)
    n_hay = max(0, seq_len - fixed)
    hay, _ = haystack(_HAYSTACK_OF[task], n_hay, rng, data_dir)
    body, spans = _assemble(hay, [(d, t + a) for d, t, a in items])
    w_body = [0.0] * len(body)
    for (s, e), (_, t, a) in zip(spans, items):
        for i in range(s + len(t), e):
            w_body[i] = 1.0
    ids = [BOS, *body, *tail]
    w = [0.0, *w_body, *tail_w]
    if len(ids) > seq_len:  # only if the structure alone overflows a tiny seq_len
        ids, w = ids[-seq_len:], w[-seq_len:]
        ids[0] = BOS
        w[0] = 0.0
    return ids, w

