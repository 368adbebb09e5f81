"""`kvtier.tim.generate`: one generation that writes a TIM task tree, runs tools inside it, and prunes finished
sub-task lists from the KV cache as it goes (TIM / TIMRUN, arXiv 2507.16784).

The loop, one model forward per token (plus the injected tool results)::

    prompt                                          (prefilled once into a KVTierCache)
    each step
        logits -> (schema mask) -> token            (greedy by default; counts against max_new_tokens)
        its text -> the task tracker, which says what closed:
            a sub-task list  -> the prune buffer; the lists it pushes out leave the cache (`remove_span`: the
                                tokens after move left, positions and slots are reused) or, with
                                reencode=True, the cache is cut back and the kept suffix encoded again
            a tool's parameters -> the tool runs (errors and timeouts become an error result); its result is
                                written after the token as input tokens, `, "tool_result": <json>`
            the thread       -> the run stops ("answer")
        the token (and any injected tokens) -> one forward, at the next position of the compacted cache
    EOS sampled -> "eos"; max_new_tokens generated -> "budget"

Token indices in the tracker and the prune log count every token after the prompt (generated and injected),
never renumbered; `RemovedSpans` maps them to the cache positions they hold now.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..cache import KVTierCache, cache_argument
from ..errors import brief
from ..rope import Rope
from ..sampling import Sampling, check_text, check_token, check_tokenizer, eos_ids, is_int, vocab_size
from .prompts import encode_prompt
from .prune import PruneBuffer, RemovedSpans
from .schema import check_limits, thread_schema
from .stream import Detokenizer
from .tools import Tool, ToolOutcome, ToolRegistry
from .tracker import (
    ListClosed,
    TaskNode,
    TaskTracker,
    ThreadDone,
    ToolCallReady,
    tool_result_text,
)

EventCallback = Callable[[Any], None]


@dataclass(frozen=True)
class ToolCall:
    """A tool run inside the generation: where (task path, token index after which its result was written)."""

    path: tuple[int, ...]
    name: str
    parameters: Any
    ok: bool
    result_json: str
    seconds: float
    at_token: int


@dataclass(frozen=True)
class Pruned:
    """A sub-task list that left the cache: its task, its token span (indices as above), the cache positions it
    held when it left, and the token index at which it left."""

    path: tuple[int, ...]
    tokens: tuple[int, int]
    positions: tuple[int, int]
    at_token: int


@dataclass
class TimStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0  # sampled from the model
    injected_tokens: int = 0  # tool results written into the generation
    peak_kv_tokens: int = 0  # most tokens the cache held at once (prompt included)
    final_kv_tokens: int = 0
    pruned_tokens: int = 0  # tokens that left the cache
    positions_reused: int = 0  # positions freed by pruning and written again by later tokens
    tool_calls: int = 0
    forward_passes: int = 0
    reencoded_tokens: int = 0  # tokens encoded again (reencode=True)
    seconds: float = 0.0

    @property
    def share_pruned(self) -> float:
        """Pruned tokens over all tokens after the prompt."""
        written = self.generated_tokens + self.injected_tokens
        return self.pruned_tokens / written if written else 0.0


@dataclass
class TimResult:
    answer: Any  # the thread's "answer" value, None unless it finished
    text: str  # everything after the prompt, pruned parts included
    tree: TaskNode | None  # the reasoning task, its subtasks below it
    pruned: list[Pruned]
    tool_calls: list[ToolCall]
    stats: TimStats
    stopped: str  # "answer", "eos" or "budget"
    kept_ids: list[int] = field(default_factory=list)  # token ids the cache held at the end, prompt included

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (the tree as nested dicts)."""
        out = {k: v for k, v in asdict(self).items() if k != "tree"}
        out["tree"] = None if self.tree is None else self.tree.as_dict()
        out["stats"]["share_pruned"] = self.stats.share_pruned
        return out


def generate(model: torch.nn.Module, tokenizer: Any, prompt: str, *,
             tools: ToolRegistry | Iterable[Tool | Callable[..., Any]] | None = None, prune_buffer: int = 2,
             max_depth: int = 3, max_new_tokens: int = 2048, constrain: bool | None = None,
             max_string_length: int | None = None, reencode: bool = False, do_sample: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
             eos_token_id: int | Sequence[int] | None = None, on_event: EventCallback | None = None,
             choose: Callable[[torch.Tensor], int] | None = None, prompt_ids: Sequence[int] | None = None,
             cache: KVTierCache | None = None, **cache_options: Any) -> TimResult:
    """Generate a TIM thread for `prompt`, calling `tools` inside the generation and pruning finished sub-task
    lists from the cache.

    tools: a ToolRegistry, or Tools / plain functions (see `kvtier.tim.tool`).
    prune_buffer: finished sub-task lists kept in the cache (0: each leaves as it closes; default 2).
    max_depth: deepest task (the reasoning task is depth 1).
    constrain: sample under the thread's JSON schema (xgrammar); None: when xgrammar is installed.
    max_string_length: most characters of a thought or conclusion under the constraint (None: unbounded).
    reencode: after a removal, encode the kept suffix again at its new positions instead of moving its keys
        (TIM's paper formulation; slower, for comparison).
    do_sample, temperature, top_p, top_k, seed: as in transformers' generate (greedy by default).
    on_event(event): called with each tracker event (`FieldDone`, `ListClosed`, `ToolCallReady`, `TaskClosed`,
        `ThreadDone`), each `ToolCall` and each `Pruned`, as they happen.
    choose(logits [V]) -> token id: replaces sampling (a scripted stream; the constraint, when on, masks first).
    prompt_ids: the prompt's token ids as given (instead of kvtier's instructions around `prompt`).
    cache: a KVTierCache to generate in (it must be empty); else one is made with `cache_options`
        (`KVTierConfig` options: budgets, store, mode) and closed before returning.

    A malformed thread (possible only unconstrained) raises `TimFormatError` with the token and what was
    expected. Returns a `TimResult`.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"generate(model, tokenizer, prompt) takes a transformers model, got {type(model).__name__}")
    registry = tools if isinstance(tools, ToolRegistry) else ToolRegistry(tools or ())
    _check(prune_buffer, max_depth, max_new_tokens, reencode, constrain, max_string_length)
    check_tokenizer(tokenizer)
    if prompt_ids is None:
        check_text("prompt", prompt)
    for name, fn in (("on_event", on_event), ("choose", choose)):
        if fn is not None and not callable(fn):
            raise TypeError(f"{name} must be a function or None, got {type(fn).__name__}")
    if cache is not None:
        if not isinstance(cache, KVTierCache):
            raise TypeError(f"cache must be a KVTierCache or None, got {type(cache).__name__}")
        if cache_options:
            raise TypeError(f"options {sorted(cache_options)} build the cache generate makes; with cache= given, "
                            "build that cache with them instead")
    vocab = vocab_size(model)
    if prompt_ids is not None:
        if isinstance(prompt_ids, torch.Tensor):
            if prompt_ids.dim() != 1 and not (prompt_ids.dim() == 2 and prompt_ids.shape[0] == 1):
                raise ValueError(f"prompt_ids must be one sequence of token ids ([L] or [1, L]), got shape "
                                 f"{tuple(prompt_ids.shape)}")
            prompt_ids = prompt_ids.flatten().tolist()
        if isinstance(prompt_ids, (str, bytes)) or not isinstance(prompt_ids, Sequence):
            raise ValueError(f"prompt_ids must be a list of token ids, got {type(prompt_ids).__name__}")
        prompt_ids = [check_token(t, vocab, "each of prompt_ids") for t in prompt_ids]
    if not reencode:
        Rope.for_layers(model)  # a model whose keys cannot be moved is refused now, not at the first pruning
    sampling = Sampling.from_options(do_sample, temperature, top_p, top_k, seed, _device(model))
    if constrain is None:
        constrain = _xgrammar_available()
    constraint = None
    if constrain:
        from .constrain import SchemaConstraint

        constraint = SchemaConstraint(tokenizer, thread_schema(registry, max_depth, max_string_length),
                                      vocab_size=model.config.get_text_config().vocab_size)
    ids = list(prompt_ids) if prompt_ids is not None else encode_prompt(tokenizer, prompt, registry, max_depth)
    if not ids:
        raise ValueError("the prompt has no tokens")
    eos = eos_ids(model, tokenizer, eos_token_id)
    own = cache is None
    if own:
        cache = KVTierCache.for_model(model, **cache_options)
    elif cache.get_seq_length():
        raise ValueError("cache must be empty: generate prefills the prompt into it")
    run = _Run(model, tokenizer, cache, registry, PruneBuffer(prune_buffer), TaskTracker(max_depth), constraint,
               reencode, on_event, eos)
    started = time.perf_counter()
    try:
        pick = (lambda logits: sampling(logits[None])[0]) if choose is None else _checked(choose, vocab)
        result = run.loop(ids, max_new_tokens, pick)
    finally:
        if own:
            cache.close()
    result.stats.seconds = time.perf_counter() - started
    return result


class _Run:
    """One generation's state: the cache, the tracker and prune buffer, and the ids the cache holds."""

    def __init__(self, model, tokenizer, cache: KVTierCache, tools: ToolRegistry, buffer: PruneBuffer,
                 tracker: TaskTracker, constraint, reencode: bool, on_event: EventCallback | None, eos: set[int]):
        self.model, self.tokenizer, self.cache, self.tools = model, tokenizer, cache, tools
        self.buffer, self.tracker, self.constraint = buffer, tracker, constraint
        self.reencode, self.on_event, self.eos = reencode, on_event, eos
        self.kw = cache_argument(model)
        self.device = _device(model)
        self.removed = RemovedSpans()
        self.detok = Detokenizer(tokenizer)
        self.stats = TimStats()
        self.held: list[int] = []  # token ids in the cache, in position order
        self.prompt_len = 0
        self.stream = 0  # tokens after the prompt so far (generated and injected)
        self.text: list[str] = []
        self.pruned: list[Pruned] = []
        self.calls: list[ToolCall] = []
        self.answer: Any = None
        self.done = False
        self.freed = 0  # positions freed by pruning and not yet written again

    def loop(self, prompt_ids: list[int], max_new_tokens: int, choose: Callable[[torch.Tensor], int]) -> TimResult:
        self.prompt_len = self.stats.prompt_tokens = len(prompt_ids)
        logits = self.forward(prompt_ids)
        stopped = "budget"
        while self.stats.generated_tokens < max_new_tokens:
            if self.constraint is not None:
                logits = self.constraint.mask_logits(logits.float())
                if bool(torch.isneginf(logits).all()):
                    self.no_token_allowed(logits.shape[-1])
            token = int(choose(logits))
            if token in self.eos:
                stopped = "eos"
                break
            self.stats.generated_tokens += 1
            if self.constraint is not None:
                self.constraint.accept(token)
            feed = [token]
            feed += self.take(token)
            logits = self.forward(feed)
            if self.done:
                stopped = "answer"
                break
        self.stats.final_kv_tokens = self.cache.get_seq_length()
        return TimResult(self.answer, "".join(self.text), self.tracker.root, self.pruned, self.calls, self.stats,
                         stopped, list(self.held))

    def no_token_allowed(self, vocab: int) -> None:
        """Every token is masked: sampling would fail on NaN probabilities, greedy pick a token the schema refuses."""
        from .constrain import ConstraintError

        raise ConstraintError(f"the thread's schema allows none of the model's {vocab} tokens next (after "
                              f"{self.stats.generated_tokens} generated tokens): the tokens it needs lie outside the "
                              "model's vocabulary (is the model's vocabulary smaller than its tokenizer's?)")

    def take(self, token: int) -> list[int]:
        """Give the tracker the token's text and act on what closed; returns tokens to write after it."""
        piece = self.detok.add(token)
        self.text.append(piece)
        index = self.stream
        self.stream += 1
        injected: list[int] = []
        for event in self.tracker.feed(piece):
            self.emit(event)
            if isinstance(event, ListClosed):
                logged = len(self.buffer.pruned)
                self.buffer.on_list_closed(event.node_path, event.body, index)
                for gone in self.buffer.pruned[logged:]:  # the lists pushed out: the oldest, not this one
                    self.prune(gone.path, gone.body, index)
            elif isinstance(event, ToolCallReady):
                injected += self.call_tool(event, index)
            elif isinstance(event, ThreadDone):
                self.answer, self.done = event.answer, True
        return injected

    def call_tool(self, event: ToolCallReady, index: int) -> list[int]:
        outcome: ToolOutcome = self.tools.call(event.tool_name, event.parameters)
        call = ToolCall(tuple(event.node_path), event.tool_name, event.parameters, outcome.ok, outcome.result_json,
                        outcome.seconds, index)
        self.calls.append(call)
        self.stats.tool_calls += 1
        self.emit(call)
        # The result is text from outside the model: a special token's spelling in it ("</s>", "<|im_end|>") is
        # written as its characters, never as that token (which would end the thread or leave the schema).
        ids = list(self.tokenizer.encode(tool_result_text(event.after, outcome.result_json), add_special_tokens=False,
                                         split_special_tokens=True))
        for tid in ids:  # through the constraint and the tracker like generated tokens
            if self.constraint is not None:
                self.constraint.accept(tid)
            for inner in self.tracker_feed_injected(tid):
                self.emit(inner)
        self.stats.injected_tokens += len(ids)
        return ids

    def tracker_feed_injected(self, tid: int) -> list:
        piece = self.detok.add(tid)
        self.text.append(piece)
        self.stream += 1
        return self.tracker.feed(piece)

    def prune(self, path, span, index: int) -> None:
        """Take a list's tokens out of the cache (what of them is still there), at their current positions."""
        current = self.removed.remove(span)
        if current is None:
            return
        start, end = self.prompt_len + current.start, self.prompt_len + current.end
        if self.reencode:
            suffix = self.held[end:]
            self.cache.crop(start)
            self.held = self.held[:start]
            if suffix:
                self.forward(suffix, count=False)
                self.stats.reencoded_tokens += len(suffix)
        else:
            self.cache.remove_span(start, end)
            del self.held[start:end]
        self.stats.pruned_tokens += end - start
        self.freed += end - start
        pruned = Pruned(tuple(path), (span.start, span.end), (start, end), index)
        self.pruned.append(pruned)
        self.emit(pruned)

    def forward(self, ids: list[int], count: bool = True) -> torch.Tensor:
        """Write `ids` at the next positions of the cache; the logits after the last one ([V], float32)."""
        past = self.cache.get_seq_length()
        x = torch.tensor([ids], device=self.device)
        pos = torch.arange(past, past + len(ids), device=self.device)[None]
        with torch.no_grad():
            out = self.model(input_ids=x, position_ids=pos, use_cache=True, **{self.kw: self.cache})
        self.held += ids
        self.stats.forward_passes += 1
        if count:
            reused = min(self.freed, len(ids))
            self.stats.positions_reused += reused
            self.freed -= reused
        self.stats.peak_kv_tokens = max(self.stats.peak_kv_tokens, self.cache.get_seq_length())
        return out.logits[0, -1].float()

    def emit(self, event: Any) -> None:
        if self.on_event is not None:
            self.on_event(event)


def _device(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _xgrammar_available() -> bool:
    try:
        import xgrammar  # noqa: F401
    except ImportError:
        return False
    return True


def _checked(choose: Callable[[torch.Tensor], int], vocab: int | None) -> Callable[[torch.Tensor], int]:
    """`choose`, its answers checked: an id outside the vocabulary would fail deep inside the model's embedding."""
    def pick(logits: torch.Tensor) -> int:
        return check_token(choose(logits), vocab, "what choose() returned")
    return pick


def _check(prune_buffer, max_depth, max_new_tokens, reencode, constrain, max_string_length) -> None:
    """ValueError naming the argument and its allowed range, before anything runs."""
    if not is_int(prune_buffer) or prune_buffer < 0:
        raise ValueError(f"prune_buffer must be an int >= 0, got {brief(prune_buffer)}")
    if not is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {brief(max_new_tokens)}")
    if not isinstance(reencode, bool):
        raise ValueError(f"reencode must be True or False, got {brief(reencode)}")
    if constrain is not None and not isinstance(constrain, bool):
        raise ValueError(f"constrain must be True, False or None (None: when xgrammar is installed), got {brief(constrain)}")
    check_limits(max_depth, max_string_length)
    if constrain is False and max_string_length is not None:  # it bounds strings through the constraint only
        raise ValueError("max_string_length applies to constrained decoding; it does nothing with constrain=False")


__all__ = ["Pruned", "TimResult", "TimStats", "ToolCall", "generate"]
