"""`kvtier.hogwild.generate`: N workers solve one problem together over one `HogwildCache` (Hogwild! Inference,
arXiv 2504.06261).

The loop, one batched forward pass per round (every worker writes one token per round)::

    prompt -> history, headers                       (prefilled once)
    each round, per worker, the token it writes is
        the next inserted token, if any is queued    (its step's prefix "**Bob [2]:**", a check-in question)
        its yes/no answer, if a check-in asked        (whichever of the two its model ranks higher)
        else a token sampled from its logits         (greedy by default; counts against max_new_tokens)
    then, per worker that wrote a token of its own:
        text matches answer_pattern      -> the run stops ("answer")
        step ends at a blank line        -> finish_step: the step joins the history, a new one opens
        check_in_every tokens since last -> queue the check-in; a "yes" is followed by a blank line, then the
                                            step ends and a new one opens
    EOS sampled by any worker            -> the run stops ("eos"; the EOS is not written)
    the next round's tokens would pass max_new_tokens -> "budget": every open step joins the history (the
        finisher's own last) and one worker completes the finisher prompt greedily, in the history

Inserted tokens enter a worker's step one per round, beside the others' own tokens, so no worker waits for
another's inserted text; when every worker has inserted text queued (the first prefixes, check-ins that
fall together), the length they all have is written in one pass (`HogwildCache.step` with [N, Q] tokens).
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..errors import brief
from ..sampling import Sampling, check_sampling, check_text, check_tokenizer, eos_ids, is_int
from .cache import HogwildCache
from .layout import MAX_WORKERS
from .prompts import CollaborationTemplate, encode_text, step_ends

SPLIT_CHARACTER = "\ufffd"  # what decode shows for the bytes of a character whose last byte is still to come
# \boxed{...} with up to two levels of braces inside (\boxed{\frac{1}{2}} is one answer, not "\boxed{\frac{1}")
BOXED = r"\\boxed\{(?:[^{}]|\{(?:[^{}]|\{[^{}]*\})*\})*\}"

TokenCallback = Callable[[int, int, str], None]


@dataclass(frozen=True)
class Step:
    """One step of one worker: `text` as written (its prefix included) and its `token_ids`.

    ended: "boundary" (a blank line after a sentence), "redundant" (the worker answered yes at a check-in),
    "cut" (still open when the budget ran out: it joined the history so the finisher reads it), or "open"
    (still being written when the run stopped on an answer or EOS; not in the history)."""

    worker: int
    name: str
    number: int
    text: str
    token_ids: tuple[int, ...]
    ended: str


@dataclass
class HogwildStats:
    """Counts of one run. tokens_per_worker: tokens each worker generated (what max_new_tokens limits);
    inserted_per_worker: tokens written into its steps for it (step prefixes, check-in questions and answers);
    forward_passes: every model call (prompt, headers, batched rounds, finisher); rounds: the batched ones;
    kv: `HogwildCache.held` at the end (tokens per block; tokens and bytes per tier, summed over layers)."""

    tokens_per_worker: list[int]
    inserted_per_worker: list[int]
    steps_finished: int = 0
    check_ins: int = 0
    redundant: int = 0
    rounds: int = 0
    forward_passes: int = 0
    prompt_tokens: int = 0
    finisher_tokens: int = 0
    kv: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class HogwildResult:
    """What `generate` returns.

    texts: each worker's whole text (its steps in order). trace: the steps that joined the shared history, in
    the order they did (what every worker read). open_steps: steps still being written at the end. answer:
    the first text matching answer_pattern (a worker's, or the finisher's), else None. final_text: the
    finisher prompt and what was decoded after it (budget runs only). stopped: "answer", "eos" or "budget"."""

    names: list[str]
    texts: list[str]
    trace: list[Step]
    open_steps: list[Step]
    answer: str | None
    final_text: str | None
    stopped: str
    stats: HogwildStats

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        return asdict(self)


def generate(model: torch.nn.Module, tokenizer, problem: str, *, workers: int = 2, max_new_tokens: int = 1024,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             seed: int | None = None, answer_pattern: str | None = BOXED, check_in_every: int | None = 256,
             eos_token_id: int | Sequence[int] | None = None, finisher_tokens: int = 32, finisher_worker: int = 0,
             on_token: TokenCallback | None = None, on_step: Callable[[Step], None] | None = None,
             template: CollaborationTemplate | None = None, step_capacity: int = 64,
             history_options: dict[str, Any] | None = None) -> HogwildResult:
    """`workers` copies of `model` solve `problem` together, each reading the others' text as it is written.

    max_new_tokens: the tokens all workers may generate together (inserted text not counted); a round that
        would pass it is not run: the run stops and the finisher answers.
    do_sample, temperature, top_p, top_k: as in transformers' generate (greedy by default); seed makes
        sampling reproducible (a torch.Generator of its own; None: torch's global one).
    answer_pattern: a regular expression; the first worker text (or finisher text) matching it stops the run
        and is the answer (None: only the budget and EOS stop it). The default matches \\boxed{...}.
    check_in_every: every so many generated tokens a worker is asked the template's check-in question
        (None or 0: never).
    eos_token_id: the tokens that end the run when a worker samples one (default: the model's generation
        config's, else the tokenizer's; [] for none).
    finisher_tokens: most tokens the finisher decodes after its prompt (0: no finisher);
        finisher_worker: who answers when the budget runs out.
    on_token(worker, token_id, text): called for every token written into a worker's step (its own and
        inserted ones) and for the finisher's; `text` is the newly decodable text ("" while a character is split
        across tokens; one still incomplete when the run stops is never streamed).
    on_step(step): called as each step joins the history.
    template: the prompt and inserted texts (`CollaborationTemplate()` by default).
    step_capacity, history_options: as in `HogwildCache.for_model` (history_options: `KVTierConfig` options of
        the shared history, e.g. device_budget, host_budget, mode="sparse"; the history spills past them).

    The model's attention is switched to kvtier (as `HogwildCache.for_model` does); the cache is closed before
    returning. Returns a `HogwildResult`.
    """
    template = CollaborationTemplate() if template is None else template
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"generate(model, tokenizer, problem) takes a transformers model, got {type(model).__name__}")
    if not isinstance(template, CollaborationTemplate):
        raise TypeError(f"template must be a CollaborationTemplate or None, got {type(template).__name__}")
    _check(workers, max_new_tokens, do_sample, temperature, top_p, top_k, check_in_every, finisher_tokens,
           finisher_worker, seed)
    check_tokenizer(tokenizer)
    check_text("problem", problem)
    if not problem.strip():
        raise ValueError("problem is empty: pass the text of the problem to solve")
    for name, fn in (("on_token", on_token), ("on_step", on_step)):
        if fn is not None and not callable(fn):
            raise TypeError(f"{name} must be a function or None, got {type(fn).__name__}")
    if history_options is not None and not isinstance(history_options, dict):
        raise TypeError(f"history_options must be a dict of KVTierConfig options or None, got "
                        f"{type(history_options).__name__}")
    pattern = None
    if answer_pattern is not None and not isinstance(answer_pattern, str):
        raise TypeError(f"answer_pattern must be a regular expression (str) or None, got {brief(answer_pattern)}")
    if answer_pattern is not None:
        try:
            pattern = re.compile(answer_pattern, re.S)
        except re.error as err:
            raise ValueError(f"answer_pattern {brief(answer_pattern)} is not a regular expression ({err})") from None
        if pattern.search("") is not None:
            raise ValueError(f"answer_pattern {brief(answer_pattern)} matches empty text, so every run would stop at its "
                             "first token with an empty answer; it must need at least one character")
    sampling = Sampling.from_options(do_sample, temperature, top_p, top_k, seed, next(model.parameters()).device)
    opts = _Options(max_new_tokens, check_in_every, finisher_tokens, finisher_worker, pattern,
                    eos_ids(model, tokenizer, eos_token_id), sampling, on_token, on_step)
    names = template.worker_names(workers)
    started = time.perf_counter()
    prompt = template.encode(tokenizer, problem, workers)
    with HogwildCache.for_model(model, workers=workers, step_capacity=step_capacity,
                                **(history_options or {})) as cache:
        run = _Run(cache, tokenizer, template, names, opts)
        run.stats.prompt_tokens = len(prompt.history)
        logits = cache.prefill_history(prompt.history)
        headers = cache.set_headers(prompt.others_header, prompt.own_header)
        run.stats.forward_passes += 1 + bool(prompt.others_header) + bool(prompt.own_header)
        logits = headers if headers is not None else logits
        stopped = run.run(logits[None].expand(workers, -1))  # every step is empty: all workers predict alike
        final_text = run.finish() if stopped == "budget" and finisher_tokens and template.finisher else None
        result = run.result(stopped, final_text)
    result.stats.seconds = time.perf_counter() - started
    return result


class _Lane:
    """One worker's state in the loop: its current step and what is queued to be written into it."""

    def __init__(self, worker: int, name: str):
        self.worker, self.name = worker, name
        self.number = 0  # current step's number (from 1)
        self.ids: list[int] = []  # current step's token ids, prefix included
        self.prefix = ""  # current step's prefix text
        self.text = ""  # the current step decoded
        self.shown = ""  # decoded text of the current step handed to on_token so far
        self.queue: deque[int] = deque()  # inserted tokens still to write
        self.ask_after_queue = False  # a check-in question is queued: answer it once the queue is written
        self.abandon = False  # answered yes: end the step once the queue (rest of the answer, blank line) is written
        self.inserted = 0
        self.since_check_in = 0
        self.steps: list[Step] = []  # this worker's steps that ended

    def body(self) -> str:
        """The current step's text after its prefix."""
        return self.text[len(self.prefix):] if self.text.startswith(self.prefix) else self.text

    def open_step(self) -> Step | None:
        """This lane's current step as an open Step (None when empty)."""
        return Step(self.worker, self.name, self.number, self.text, tuple(self.ids), "open") if self.ids else None


@dataclass
class _Options:
    max_new_tokens: int
    check_in_every: int | None
    finisher_tokens: int
    finisher_worker: int
    pattern: re.Pattern | None
    eos: set[int]
    sample: Sampling
    on_token: TokenCallback | None
    on_step: Callable[[Step], None] | None


class _Run:
    """One collaboration: the cache, a lane per worker, and the loop of batched rounds."""

    def __init__(self, cache: HogwildCache, tokenizer, template: CollaborationTemplate, names: list[str],
                 opts: _Options):
        self.cache, self.tok, self.template, self.opts = cache, tokenizer, template, opts
        self.lanes = [_Lane(w, name) for w, name in enumerate(names)]
        self.trace: list[Step] = []
        self.stats = HogwildStats([0] * len(names), [0] * len(names))
        yes, no = encode_text(tokenizer, template.yes), encode_text(tokenizer, template.no)
        for text, ids in ((template.yes, yes), (template.no, no)):
            if not ids:
                raise ValueError(f"the check-in answer {text!r} tokenizes to no tokens; give yes and no texts the "
                                 "tokenizer writes")
        shared = 0
        while shared < min(len(yes), len(no)) and yes[shared] == no[shared]:
            shared += 1
        if shared == min(len(yes), len(no)):
            raise ValueError(f"the check-in answers {brief(template.yes)} and {brief(template.no)} tokenize to {yes} and "
                             f"{no}: one starts with the other, so no single token tells them apart")
        self.yes, self.no, self.shared = yes, no, shared  # the answers differ first at token `shared`
        self.question = encode_text(tokenizer, template.check_in) + yes[:shared]
        self.blank = encode_text(tokenizer, "\n\n")  # after a yes: the step ends at a blank line, as others do
        self.answer: str | None = None

    # ---------------------------------------------------------------------------------- the loop
    def run(self, logits: torch.Tensor) -> str:
        """Rounds until a stop; `logits` [N, V] is every worker's prediction before its first token. Returns why
        it stopped: "answer", "eos" or "budget"."""
        for lane in self.lanes:
            self.open_step(lane)
        while True:
            if all(lane.queue for lane in self.lanes):  # everyone writes inserted text: the common length at once
                q = min(len(lane.queue) for lane in self.lanes)
                rows, own = [[lane.queue.popleft() for _ in range(q)] for lane in self.lanes], []
            else:
                own = [lane for lane in self.lanes if not lane.queue and not lane.ask_after_queue]
                if sum(self.stats.tokens_per_worker) + len(own) > self.opts.max_new_tokens:
                    return "budget"
                sampled = self.opts.sample(logits[[lane.worker for lane in own]]) if own else []
                if any(t in self.opts.eos for t in sampled):
                    return "eos"
                rows = [[token] for token in self.round_tokens(logits, dict(zip(own, sampled)))]
            logits = self.cache.step(rows)
            self.stats.rounds += 1
            self.stats.forward_passes += 1
            for lane in self.lanes:
                for token in rows[lane.worker]:
                    self.write(lane, token)
                if lane in own:
                    self.after_own_token(lane)
                else:
                    lane.inserted += len(rows[lane.worker])
                    if lane.abandon and not lane.queue:
                        lane.abandon = False
                        self.close_step(lane, "redundant")
                        self.open_step(lane)
            if self.answer is not None:
                return "answer"

    def round_tokens(self, logits: torch.Tensor, sampled: dict[_Lane, int]) -> list[int]:
        """One token per worker for a round: its sampled one, its next inserted one, or its check-in answer
        (whichever of yes / no its model ranks higher; the rest of the answer is queued)."""
        tokens = []
        for lane in self.lanes:
            if lane in sampled:
                tokens.append(sampled[lane])
            elif lane.queue:
                tokens.append(lane.queue.popleft())
            else:  # lane.ask_after_queue
                lane.ask_after_queue = False
                yes, no, at = self.yes, self.no, self.shared
                choice = yes if logits[lane.worker, yes[at]] >= logits[lane.worker, no[at]] else no
                lane.abandon = choice is yes
                self.stats.redundant += lane.abandon
                tokens.append(choice[at])
                lane.queue.extend(choice[at + 1:] + (self.blank if lane.abandon else []))
        return tokens

    def after_own_token(self, lane: _Lane) -> None:
        """A worker wrote a token of its own: an answer, the end of its step, or time for a check-in."""
        self.stats.tokens_per_worker[lane.worker] += 1
        lane.since_check_in += 1
        text = lane.body()
        found = _search(self.opts.pattern, text)
        if found is not None:
            self.answer = self.answer or found.group(0)
        elif step_ends(text):
            self.close_step(lane, "boundary")
            self.open_step(lane)
        elif self.opts.check_in_every and lane.since_check_in >= self.opts.check_in_every:
            lane.since_check_in = 0
            lane.queue.extend(self.question)
            lane.ask_after_queue = True
            self.stats.check_ins += 1

    # ------------------------------------------------------------------------------------ steps
    def open_step(self, lane: _Lane) -> None:
        lane.number += 1
        lane.ids, lane.text, lane.shown = [], "", ""
        lane.prefix = self.template.prefix(lane.name, lane.number)
        lane.queue.extend(encode_text(self.tok, lane.prefix))

    def write(self, lane: _Lane, token: int) -> None:
        lane.ids.append(token)
        lane.text = self.tok.decode(lane.ids, skip_special_tokens=True)
        lane.shown = self.stream(lane.worker, token, lane.text, lane.shown)

    def stream(self, worker: int, token: int, text: str, shown: str) -> str:
        """Hand on_token the text new since `shown`; returns what has been shown now."""
        if self.opts.on_token is None:
            return text
        if text.endswith(SPLIT_CHARACTER):  # a character split across tokens: wait for the rest of it
            self.opts.on_token(worker, token, "")
            return shown
        self.opts.on_token(worker, token, text[len(shown):] if text.startswith(shown) else text)
        return text

    def close_step(self, lane: _Lane, ended: str) -> None:
        """The lane's step joins the history (ended as said) and, unless it was empty, goes into the trace."""
        if not self.cache.finish_step(lane.worker):
            return
        step = Step(lane.worker, lane.name, lane.number, lane.text, tuple(lane.ids), ended)
        lane.steps.append(step)
        self.trace.append(step)
        self.stats.steps_finished += ended != "cut"
        if self.opts.on_step is not None:
            self.opts.on_step(step)

    # --------------------------------------------------------------------------------- finisher
    def finish(self) -> str:
        """The budget finisher: every open step joins the history (the finisher's own last, so the prompt
        continues that worker's text), then one worker completes `template.finisher` greedily, token by token,
        in the history. Returns the finisher's text, its prompt included; sets the answer found in it."""
        worker = self.opts.finisher_worker
        for lane in sorted(self.lanes, key=lambda lane: lane.worker == worker):
            lane.queue.clear()
            lane.ask_after_queue = lane.abandon = False
            self.close_step(lane, "cut")
            lane.ids = []
        ids = encode_text(self.tok, self.template.finisher)
        logits = self.cache.prefill_history(ids)
        self.stats.forward_passes += 1
        written: list[int] = []
        shown = text = self.tok.decode(ids, skip_special_tokens=True)
        pattern = self.opts.pattern
        for i in range(self.opts.finisher_tokens):
            token = int(logits.argmax())
            if token in self.opts.eos:
                break
            written.append(token)
            self.stats.finisher_tokens += 1
            text = self.tok.decode(ids + written, skip_special_tokens=True)
            shown = self.stream(worker, token, text, shown)
            if _search(pattern, text) or i == self.opts.finisher_tokens - 1:
                break
            logits = self.cache.prefill_history([token])
            self.stats.forward_passes += 1
        found = _search(pattern, text.rstrip(SPLIT_CHARACTER))  # a character never finished is no answer
        self.answer = found.group(0) if found else None
        return text

    def result(self, stopped: str, final_text: str | None) -> HogwildResult:
        open_steps = [step for step in (lane.open_step() for lane in self.lanes) if step is not None]
        texts = ["".join(s.text for s in lane.steps) + (lane.text if lane.ids else "") for lane in self.lanes]
        self.stats.inserted_per_worker = [lane.inserted for lane in self.lanes]
        self.stats.kv = self.cache.held
        return HogwildResult([lane.name for lane in self.lanes], texts, self.trace, open_steps, self.answer,
                             final_text, stopped, self.stats)


def _search(pattern: re.Pattern | None, text: str) -> re.Match | None:
    """The answer in text, unless it takes in a character still being written: a multi-byte character split
    across tokens decodes to U+FFFD until its last byte comes, and a pattern such as `Answer: \\S+` would take
    that placeholder for the answer (then the search waits for the character)."""
    if pattern is None:
        return None
    found = pattern.search(text)
    if found is not None and found.end() > len(text.rstrip(SPLIT_CHARACTER)):
        return None
    return found


def _check(workers, max_new_tokens, do_sample, temperature, top_p, top_k, check_in_every, finisher_tokens,
           finisher_worker, seed) -> None:
    """ValueError naming the argument and its allowed range, before anything runs."""
    if not is_int(workers) or not 1 <= workers <= MAX_WORKERS:
        raise ValueError(f"workers must be an int in [1, {MAX_WORKERS}], got {brief(workers)}")
    if not is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {brief(max_new_tokens)}")
    if max_new_tokens < workers:  # the first round (every worker's first token) would pass it: nobody writes
        raise ValueError(f"max_new_tokens {max_new_tokens} is fewer than the {workers} workers: it counts all their "
                         "tokens together, and each worker needs at least 1")
    check_sampling(do_sample, temperature, top_p, top_k, seed)
    if check_in_every is not None and (not is_int(check_in_every) or check_in_every < 0):
        raise ValueError(f"check_in_every must be an int >= 1, or 0 / None for no check-in, got {brief(check_in_every)}")
    if not is_int(finisher_tokens) or finisher_tokens < 0:
        raise ValueError(f"finisher_tokens must be an int >= 0, got {brief(finisher_tokens)}")
    if not is_int(finisher_worker) or not 0 <= finisher_worker < workers:
        raise ValueError(f"finisher_worker must be a worker index in 0..{workers - 1}, got {brief(finisher_worker)}")
