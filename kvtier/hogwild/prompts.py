"""The collaboration prompt: what N workers are told, and the text pieces the runtime writes into their steps.

Every worker reads the same prompt (the start of the shared history) and the same two headers; the only
thing that tells a worker which one it is, is the prefix that opens each of its steps (`**Alice [3]:**`).
All the text is configurable through `CollaborationTemplate`; the defaults were written for kvtier and work
for any number of workers.

What each worker's view looks like as text (worker Bob of three)::

    <rules and problem, in the chat template when the tokenizer has one>
    # Shared history ...                      <- the prompt ends here; finished steps follow, in the order
    **Alice [1]:** ... .                         they finished, each ending at a blank line
    **Carol [1]:** ... .
    # Steps the other workers are writing now  <- the others' header
    **Alice [2]:** ...                        <- Alice's and Carol's current steps, unfinished, worker order
    **Carol [2]:** ...
    # Your current step                        <- the own header
    **Bob [2]:** ...                          <- Bob's own step, last: his next token continues it
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..chat import apply_chat_template, has_chat_template
from ..errors import brief

DEFAULT_NAMES = ("Alice", "Bob", "Carol", "Dave", "Eve", "Frank", "Grace", "Heidi")

RULES = """\
Several workers solve the problem below together, all writing at the same time: {names} ({n} in all). \
You are one of them. Everyone's text is visible to everyone the moment it is written.

The work is written in steps. Each step opens with its writer's name and step number, like \
"{example}", holds one idea, and ends with a blank line.

What you see, in this order:
1. The shared history: this problem, then every finished step of every worker, in the order the steps \
were finished.
2. The other workers' current steps: unfinished, still being written.
3. Your own current step, last. It opens with your name; continue it.

Rules:
- Split the work. Read what the others are doing and take a part nobody has: another case, another method, \
checking a result that was just found.
- Do not repeat what the others have done or are doing; use their results instead.
- Keep steps short, so the others can build on them soon.
- When asked whether you are doing redundant work, answer yes or no honestly. After a yes, stop that line of \
work and start a step on something else.
- When the answer is known, write it once as \\boxed{{answer}}."""


# The format strings of a template and the fields each is formatted with.
FORMAT_KEYS = {"rules": ("names", "n", "example"), "problem_format": ("problem",), "step_prefix": ("name", "step")}
_SAMPLE = {"names": "A and B", "n": 2, "example": "**A [1]:**", "problem": "P", "name": "A", "step": 1}


def _check_format(name: str, text: str, keys: tuple[str, ...]) -> None:
    """ValueError unless `text` is a format string whose fields are plain names from `keys` (no attribute or index
    lookups, no positional fields, no fields nested in a format spec) and formats with sample values."""
    allowed = ", ".join("{" + k + "}" for k in keys)
    try:
        fields = [(key, spec) for _, key, spec, _ in string.Formatter().parse(text) if key is not None]
    except ValueError as err:
        raise ValueError(f"{name} is not a valid format string ({err}); it may use {allowed} "
                         "(write {{ and }} for braces)") from None
    for key, spec in fields:
        if key not in keys or "{" in spec:
            raise ValueError(f"{name} has the field {{{key}{':' + spec if spec else ''}}}; it may use only "
                             f"{allowed} (write {{{{ and }}}} for braces)")
    try:
        text.format(**{k: _SAMPLE[k] for k in keys})
    except ValueError as err:
        raise ValueError(f"{name} is not a valid format string ({err}); it may use {allowed}") from None


@dataclass(frozen=True)
class EncodedPrompt:
    """The token ids a run starts from: `history` (prefilled into the shared history), and the two headers."""

    history: list[int]
    others_header: list[int]
    own_header: list[int]


@dataclass
class CollaborationTemplate:
    """The text of a collaboration.

    names: one per worker (default: the first N of Alice, Bob, Carol, ..., then "Worker 9", ...).
    rules: format string with {names}, {n} and {example} (a step prefix); followed by the problem.
    problem_format: how the problem is shown after the rules ({problem}).
    history_intro: written after the prompt, before the first finished step.
    others_header / own_header: the two headers every view holds (the others' one is left out for one worker).
    step_prefix: opens every step ({name}, {step}: the worker's step number from 1). No trailing space: BPE
        tokenizers attach a space to the word after it, so the model writes " Let" itself.
    check_in: inserted into a worker's step every `check_in_every` tokens; the worker answers with `yes` or
        `no` (whichever its model ranks higher), and after a yes starts a new step.
    finisher: written after everyone's steps when the token budget runs out; one worker completes it.
    use_chat_template: put the rules and problem in the tokenizer's chat template (as the user's message,
        with the generation prompt after it) when the tokenizer has one.
    """

    names: Sequence[str] | None = None
    rules: str = RULES
    problem_format: str = "Problem:\n{problem}"
    history_intro: str = "# Shared history: finished steps, in the order they were finished\n\n"
    others_header: str = "\n\n# Steps the other workers are writing now (unfinished)\n\n"
    own_header: str = "\n\n# Your current step\n\n"
    step_prefix: str = "**{name} [{step}]:**"
    check_in: str = "\n\nQuick check: am I doing redundant work? (yes/no):"
    yes: str = " yes"
    no: str = " no"
    finisher: str = "\n\nTime is up. Final answer: \\boxed{"
    use_chat_template: bool = True
    _names: tuple[str, ...] = field(default=(), init=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("rules", "problem_format", "history_intro", "others_header", "own_header", "step_prefix",
                     "check_in", "yes", "no", "finisher"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a str, got {brief(getattr(self, name))}")
        if not isinstance(self.use_chat_template, bool):
            raise ValueError(f"use_chat_template must be True or False, got {brief(self.use_chat_template)}")
        if self.names is not None:
            if isinstance(self.names, str) or not isinstance(self.names, Sequence):
                raise ValueError(f"names must be a list of names, one per worker, got {brief(self.names)}")
            names = tuple(self.names)
            if not names or any(not isinstance(n, str) or not n.strip() for n in names):
                raise ValueError(f"names must be non-empty strings, got {brief(list(self.names))}")
            if len(set(names)) != len(names):
                raise ValueError(f"names must differ from one another, got {brief(list(names))}")
            self._names = names
        for name, keys in FORMAT_KEYS.items():
            _check_format(name, getattr(self, name), keys)
        if not self.yes or not self.no or self.yes == self.no:
            raise ValueError(f"yes and no must be two different non-empty strings, got {brief(self.yes)}, {self.no!r}")

    def worker_names(self, workers: int) -> list[str]:
        """One name per worker."""
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be an int >= 1, got {brief(workers)}")
        if self._names:
            if len(self._names) < workers:
                raise ValueError(f"names has {len(self._names)} names for {workers} workers")
            return list(self._names[:workers])
        return [DEFAULT_NAMES[w] if w < len(DEFAULT_NAMES) else f"Worker {w + 1}" for w in range(workers)]

    def prefix(self, name: str, step: int) -> str:
        """The text opening a worker's `step`-th step (from 1)."""
        return self.step_prefix.format(name=name, step=step)

    def user_text(self, problem: str, workers: int) -> str:
        """The rules and the problem: the user's message."""
        names = self.worker_names(workers)
        listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        rules = self.rules.format(names=listed, n=workers, example=self.prefix(names[0], 1))
        return f"{rules}\n\n{self.problem_format.format(problem=problem)}"

    def prompt_text(self, tokenizer, problem: str, workers: int) -> tuple[str, bool]:
        """The history's opening text, and whether it already holds the tokenizer's special tokens (a chat
        template writes them itself)."""
        user = self.user_text(problem, workers)
        if self.use_chat_template and has_chat_template(tokenizer):
            chat = apply_chat_template(tokenizer, user, tokenize=False, way_around="use_chat_template=False "
                                       "(--no-chat-template) writes it as plain text")
            return chat + self.history_intro, True
        return f"{user}\n\n{self.history_intro}", False

    def encode(self, tokenizer, problem: str, workers: int) -> EncodedPrompt:
        """The prompt's token ids: what `generate` prefills into the history and the headers."""
        text, templated = self.prompt_text(tokenizer, problem, workers)
        history = tokenizer(text, add_special_tokens=not templated).input_ids
        others = encode_text(tokenizer, self.others_header) if workers > 1 else []
        return EncodedPrompt(list(history), others, encode_text(tokenizer, self.own_header))


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of a piece of text written into the middle of a sequence (no special tokens added)."""
    return list(tokenizer(text, add_special_tokens=False).input_ids) if text else []


# A step ends at a blank line after the end of a sentence or of a display formula / code block.
_BLANK_END = re.compile(r"[ \t]*\n[ \t]*\n\s*\Z")
_SENTENCE_END = re.compile(r"(?:[.!?]|\\\]|\$\$|```)[\"')\]*_]*\Z")


def step_ends(text: str) -> bool:
    """True when `text` (a step so far) ends at a step boundary: a blank line right after sentence punctuation
    (".", "!" or "?", optionally followed by a closing quote, bracket or markdown emphasis), or after the close
    of a display formula (\\] or $$) or of a code block (```). A `$$` or ``` closes only when it is the second
    of a pair: after an opening one the blank line is inside the formula or code."""
    blank = _BLANK_END.search(text)
    if blank is None:
        return False
    before = text[: blank.start()]
    end = _SENTENCE_END.search(before)
    if end is None:
        return False
    if before.endswith("```"):
        return before.count("```") % 2 == 0
    if before.endswith("$$"):
        return before.count("$$") % 2 == 0
    if "```" in before and before.count("```") % 2 == 1:  # a blank line inside a code block ends nothing
        return False
    return not ("$$" in before and before.count("$$") % 2 == 1)
