"""Follow a TIM thread token by token (TIM / TIMRUN, arXiv 2507.16784).

A TIM model writes its reasoning as one JSON object, a tree of tasks::

    {"reasoning": Task, "answer": <JSON value>}
    Task = {"thought": str,
            "tooluse": {"tool_name": str, "parameters": {...}, "tool_result": <JSON value>},   (optional)
            "subtasks": [Task, ...],                            (optional; never at the max depth)
            "conclusion": str}

The runtime must know, the moment a token is decoded, whether it closed a tool call (so the tool runs and
its result is injected) or a subtask list (so the list can be pruned from the KV cache). `TaskTracker` is
a streaming parser for exactly that: every character is looked at once, the grammar lives in a stack of
small frames, and a value is decoded once, when its last character arrives. It also records which tokens
each field occupies, because pruning removes tokens, not characters.

Token indices count every token of the stream after the prompt, generated and injected alike: the n-th
call to `feed` is token n (from 0). Spans are half-open token ranges (`TokenSpan(start, end)`)::

    token  text
      0    {"reasoning": {"th
      1    ought": "a", "sub                   the key "subtasks" starts here
      2    tasks": [{"tho                      "[" (and the first subtask's "{")
      3    ught": "b", "conclusion": "c"
      4    }, {"thought": "d", "conclusion": "e"}
      5    ], "conclusion": "f"}               "]"
    spans["subtasks"]      == TokenSpan(1, 6)  the key's opening quote .. "]"
    spans["subtasks_body"] == TokenSpan(3, 5)  the tokens wholly inside "[" .. "]"

A field's span runs from the token holding the first character of its key (the opening quote) to the
token holding the last character of its value, inclusive (so `end` is that token + 1). The body of a
subtask list starts at the token after the one holding "[" and ends before the one holding "]": a token
that holds a bracket is never in the body, even when it also holds part of a subtask, so removing the body
never removes a bracket. An empty body is `TokenSpan(t, t)` with t the token holding "]" (so `body.end` is
always that token).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from kvtier.errors import CacheInputError, KVTierError, brief

__all__ = ["Event", "FieldDone", "ListClosed", "TaskClosed", "TaskNode", "TaskTracker", "ThreadDone", "TimFormatError",
           "TokenSpan", "ToolCallReady", "tool_result_text"]

_WS = " \t\n\r"


@dataclass(frozen=True, slots=True)
class TokenSpan:
    """Tokens `start` .. `end - 1` of the stream (half-open; `start == end` is empty)."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if not (type(self.start) is int and type(self.end) is int and 0 <= self.start <= self.end):
            raise CacheInputError(f"a TokenSpan needs ints 0 <= start <= end, got ({self.start!r}, {self.end!r})")

    @property
    def length(self) -> int:
        return self.end - self.start

    def __contains__(self, index: object) -> bool:
        return isinstance(index, int) and self.start <= index < self.end


class TimFormatError(KVTierError, ValueError):
    """The model's output stopped being a TIM thread. `token` and `char` locate the first character that
    cannot continue one (None for text handed to `tool_result_text`); `expected` and `got` say why."""

    def __init__(self, position: tuple[int, int] | None, expected: str, got: str):
        self.position = position
        self.token, self.char = position if position is not None else (None, None)
        self.expected, self.got = expected, got
        where = f"token {self.token} (char {self.char} of it): " if position is not None else ""
        super().__init__(f"{where}expected {expected}, got {got}")


@dataclass(eq=False, slots=True)
class TaskNode:
    """One task of the tree. `spans` maps each field whose value is complete ("thought", "tooluse",
    "tool_name", "parameters", "tool_result", "subtasks", "subtasks_body", "conclusion") to its tokens;
    the decoded fields stay None until then ("tool_result" in `spans` tells a null result from none)."""

    path: tuple[int, ...]
    depth: int
    start: int  # the token holding the task's "{"
    end: int | None = None  # one past the token holding its "}", once closed
    spans: dict[str, TokenSpan] = field(default_factory=dict)
    thought: str | None = None
    tool_name: str | None = None
    parameters: dict[str, Any] | None = None
    tool_result: Any = None
    conclusion: str | None = None
    children: list[TaskNode] = field(default_factory=list)

    @property
    def closed(self) -> bool:
        return self.end is not None

    @property
    def span(self) -> TokenSpan | None:
        """The whole task object, "{" .. "}", once it is closed."""
        return TokenSpan(self.start, self.end) if self.end is not None else None

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data: the fields written so far, each field's token span, the subtasks."""
        return {"path": list(self.path), "depth": self.depth, "thought": self.thought, "tool_name": self.tool_name,
                "parameters": self.parameters, "tool_result": self.tool_result, "conclusion": self.conclusion,
                "spans": {name: [s.start, s.end] for name, s in self.spans.items()},
                "children": [child.as_dict() for child in self.children]}


@dataclass(frozen=True, slots=True)
class ListClosed:
    """The "]" of the subtask list of task `node_path` was seen; `body` is its contents (see the module)."""

    node_path: tuple[int, ...]
    body: TokenSpan


@dataclass(frozen=True, slots=True)
class ToolCallReady:
    """The "}" closing the parameters of task `node_path`'s tool call was seen. `after` is the rest of that
    token's text, already fed; the runtime injects `tool_result_text(after, result)` as the next tokens."""

    node_path: tuple[int, ...]
    tool_name: str
    parameters: dict[str, Any]
    after: str


@dataclass(frozen=True, slots=True)
class TaskClosed:
    """The "}" of task `node_path` was seen."""

    node_path: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class FieldDone:
    """The "thought" or "conclusion" of task `node_path` was completed (its closing quote was seen); `value` is
    the decoded string. Tool calls are reported by `ToolCallReady` instead."""

    node_path: tuple[int, ...]
    field: str
    value: str


@dataclass(frozen=True, slots=True)
class ThreadDone:
    """The thread's outer "}" was seen; only whitespace may follow."""

    answer: Any


Event = FieldDone | ListClosed | ToolCallReady | TaskClosed | ThreadDone


class _Bad(Exception):
    """Raised inside the frames with the char index in the current text; feed() adds the token."""

    def __init__(self, i: int, expected: str, got: str):
        super().__init__(i, expected, got)
        self.i, self.expected, self.got = i, expected, got


def _show(c: str) -> str:
    return json.dumps(c, ensure_ascii=False)


# ---------------------------------------------------------------------------------------------------------
# Any JSON value (RFC 8259), one character at a time. Validating here (rather than by json.loads at the end)
# is what lets an error name the token that broke the value, and find where a number ends.

MAX_NESTING = 200  # arrays and objects inside one another in one value: json.loads recurses once per level
_STR_RUN = re.compile(r'[^"\\\x00-\x1f]*')
_HEX = frozenset("0123456789abcdefABCDEF")
_DIGITS = frozenset("0123456789")
_ESCAPES = frozenset('"\\/bfnrt')
_LITERALS = {"t": "rue", "f": "alse", "n": "ull"}
(_VALUE, _STRING, _ESCAPE, _UNICODE, _AFTER, _OBJ_FIRST, _OBJ_KEY, _COLON, _ARR_FIRST, _LITERAL,
 _N_MINUS, _N_ZERO, _N_INT, _N_FRAC0, _N_FRAC, _N_EXP_SIGN, _N_EXP0, _N_EXP) = range(18)
_NUMBER_STATES = frozenset(range(_N_MINUS, _N_EXP + 1))


def _finite_float(text: str) -> float:
    """A JSON number with a fraction or exponent, refused when a float would make it infinite (1e999): JSON cannot
    write infinity back, so the thread's answer or a tool's parameters could not be recorded."""
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"the number {text[:40]} is past the range of a float")
    return value


class _Json:
    """A frame holding one JSON value: "any", "string" or "object" at its top level. The raw text is kept
    in chunks (one slice per token) and decoded by json.loads once, when the value ends."""

    __slots__ = (
        "chunks",
        "done",
        "hex",
        "in_key",
        "kind",
        "last_token",
        "lit",
        "stack",
        "started",
        "state",
        "value",
        "what",
    )

    def __init__(self, kind: str, what: str):
        self.kind, self.what = kind, what
        self.state = _VALUE
        self.stack: list[str] = []  # open containers, "{" or "["
        self.lit = ""
        self.hex = 0
        self.chunks: list[str] = []
        self.started = self.in_key = self.done = False
        self.value: Any = None
        self.last_token = -1

    def step(self, tr: TaskTracker, text: str, i: int) -> int:
        i = self.scan(text, i, tr.tokens)
        if self.done:
            tr._finish(self.value, self.last_token, i)
        return i

    def scan(self, text: str, i: int, token: int) -> int:
        """Consume text[i:] up to the value's end; returns the index after the last character consumed."""
        n = len(text)
        cap = i if self.started else -1
        while i < n:
            s = self.state
            c = text[i]
            if s == _STRING:
                j = _STR_RUN.match(text, i).end()
                if j == n:
                    i = n
                    break
                c, i = text[j], j + 1
                if c == '"':
                    if self.in_key:
                        self.in_key, self.state = False, _COLON
                    elif not self.stack:
                        return self._complete(text, cap, i, token)
                    else:
                        self.state = _AFTER
                elif c == "\\":
                    self.state = _ESCAPE
                else:
                    raise _Bad(j, f"a character of a string in {self.what} (control characters are escaped)",
                               _show(c))
                continue
            if s == _ESCAPE:
                if c == "u":
                    self.state, self.hex = _UNICODE, 4
                elif c in _ESCAPES:
                    self.state = _STRING
                else:
                    raise _Bad(i, f'an escape (one of \\" \\\\ \\/ \\b \\f \\n \\r \\t \\uXXXX) in {self.what}',
                               _show("\\" + c))
                i += 1
                continue
            if s == _UNICODE:
                if c not in _HEX:
                    raise _Bad(i, f"a hex digit of a \\u escape in {self.what}", _show(c))
                self.hex -= 1
                if not self.hex:
                    self.state = _STRING
                i += 1
                continue
            if s in _NUMBER_STATES:
                nxt = self._number(s, c, i)
                if nxt is not None:
                    self.state = nxt
                    self.last_token = token
                    i += 1
                    continue
                # c ends the number and belongs to what follows it
                if not self.stack:
                    return self._complete(text, cap, i, self.last_token)
                self.state = _AFTER
                continue
            if s == _LITERAL:
                if c != self.lit[0]:
                    raise _Bad(i, f"{_show(self.lit[0])} (of true, false or null) in {self.what}", _show(c))
                self.lit = self.lit[1:]
                i += 1
                if not self.lit:
                    if not self.stack:
                        return self._complete(text, cap, i, token)
                    self.state = _AFTER
                continue
            if c in _WS:
                i += 1
                continue
            if s == _VALUE or s == _ARR_FIRST:
                if s == _ARR_FIRST and c == "]":
                    i = self._pop(i)
                    if self.done:
                        return self._complete(text, cap, i, token)
                    continue
                if not self.started:
                    if self.kind == "string" and c != '"':
                        raise _Bad(i, f"a string ({self.what})", _show(c))
                    if self.kind == "object" and c != "{":
                        raise _Bad(i, f'"{{" to open {self.what} (a JSON object)', _show(c))
                    self.started, cap = True, i
                if c in "{[" and len(self.stack) >= MAX_NESTING:
                    raise _Bad(i, f"at most {MAX_NESTING} arrays and objects nested in {self.what}", _show(c))
                if c == '"':
                    self.state = _STRING
                elif c == "{":
                    self.stack.append("{")
                    self.state = _OBJ_FIRST
                elif c == "[":
                    self.stack.append("[")
                    self.state = _ARR_FIRST
                elif c in _LITERALS:
                    self.lit, self.state = _LITERALS[c], _LITERAL
                elif c == "-" or c in _DIGITS:
                    self.state = _N_MINUS if c == "-" else _N_ZERO if c == "0" else _N_INT
                    self.last_token = token
                else:
                    raise _Bad(i, f"a JSON value in {self.what}", _show(c))
                i += 1
                continue
            if s == _AFTER:
                top = self.stack[-1]
                if c == ",":
                    self.state = _OBJ_KEY if top == "{" else _VALUE
                    i += 1
                    continue
                if c == ("}" if top == "{" else "]"):
                    i = self._pop(i)
                    if self.done:
                        return self._complete(text, cap, i, token)
                    continue
                raise _Bad(i, f'"," or "{"}" if top == "{" else "]"}" in {self.what}', _show(c))
            if s == _OBJ_FIRST or s == _OBJ_KEY:
                if c == '"':
                    self.state, self.in_key = _STRING, True
                elif c == "}" and s == _OBJ_FIRST:
                    i = self._pop(i)
                    if self.done:
                        return self._complete(text, cap, i, token)
                    continue
                else:
                    what = 'a key (a string) or "}"' if s == _OBJ_FIRST else "a key (a string)"
                    raise _Bad(i, f"{what} in {self.what}", _show(c))
                i += 1
                continue
            if s == _COLON:
                if c != ":":
                    raise _Bad(i, f'":" after a key in {self.what}', _show(c))
                self.state = _VALUE
                i += 1
                continue
            raise AssertionError(f"unreachable JSON state {s}")  # pragma: no cover
        if cap >= 0:
            self.chunks.append(text[cap:i])
        return i

    def _pop(self, i: int) -> int:
        self.stack.pop()
        if not self.stack:
            self.done = True  # the caller completes the value
        else:
            self.state = _AFTER
        return i + 1

    def _number(self, s: int, c: str, i: int) -> int | None:
        """The state after number character `c`, or None when `c` ends the number."""
        if s == _N_MINUS:
            if c in _DIGITS:
                return _N_ZERO if c == "0" else _N_INT
            raise _Bad(i, f'a digit after "-" in {self.what}', _show(c))
        if s == _N_FRAC0 or s == _N_EXP0:
            if c in _DIGITS:
                return _N_FRAC if s == _N_FRAC0 else _N_EXP
            raise _Bad(i, f"a digit of a number in {self.what}", _show(c))
        if s == _N_EXP_SIGN:
            if c in _DIGITS:
                return _N_EXP
            if c in "+-":
                return _N_EXP0
            raise _Bad(i, f'a digit, "+" or "-" of an exponent in {self.what}', _show(c))
        if c in _DIGITS:
            if s == _N_ZERO:
                raise _Bad(i, f"no digit after a leading 0 in {self.what}", _show(c))
            return s
        if c == "." and (s == _N_ZERO or s == _N_INT):
            return _N_FRAC0
        if c in "eE" and s != _N_EXP:
            return _N_EXP_SIGN
        return None

    def _complete(self, text: str, cap: int, end: int, last_token: int) -> int:
        self.chunks.append(text[cap:end])
        try:
            self.value = json.loads("".join(self.chunks), parse_float=_finite_float)
        except (ValueError, RecursionError) as e:  # valid JSON Python will not hold: an int past its digit limit
            raise _Bad(end - 1, f"a value Python can decode in {self.what}", f"{type(e).__name__}: {str(e).split(';')[0]}") from None
        self.chunks = []
        self.done, self.last_token = True, last_token
        return end


# ---------------------------------------------------------------------------------------------------------
# The TIM structure: three kinds of object (thread, task, tool use), each a fixed key order, and the list.

_SCHEMAS: dict[str, tuple[tuple[str, bool], ...]] = {  # (key, required), in the order they must appear
    "thread": (("reasoning", True), ("answer", True)),
    "task": (("thought", True), ("tooluse", False), ("subtasks", False), ("conclusion", True)),
    "tooluse": (("tool_name", True), ("parameters", True), ("tool_result", True)),
}
_HOME = {key: kind for kind, schema in _SCHEMAS.items() for key, _ in schema}
_HOME_NAME = {"thread": "the thread object", "task": "a task", "tooluse": '"tooluse"'}
_OPEN_NAME = {"thread": "the thread", "task": "a task", "tooluse": "the tool use"}
_LABEL = {"reasoning": "reasoning", "answer": "answer", "thought": "thought", "tooluse": "tool use",
          "subtasks": "subtasks", "conclusion": "conclusion", "tool_name": "tool name", "parameters": "parameters",
          "tool_result": "tool result"}
_DECODED = frozenset({"thought", "conclusion", "tool_name", "parameters", "tool_result"})
_REPORTED = frozenset({"thought", "conclusion"})  # fields that emit FieldDone
_VALUE_KIND = {"answer": "any", "thought": "string", "conclusion": "string", "tool_name": "string",
               "parameters": "object", "tool_result": "any"}
(_O_OPEN, _O_FIRST, _O_KEY, _O_COLON, _O_VALUE, _O_AFTER, _O_NEXT) = range(7)


def _either(keys: list[str]) -> str:
    quoted = [f'"{k}"' for k in keys]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]


class _Obj:
    """A frame for one object of the format. It checks its keys against its schema as they are written and
    pushes a frame for each value; `child_done` takes the value back and records the field's span."""

    __slots__ = (
        "depth",
        "key",
        "key_start",
        "kind",
        "last",
        "node",
        "parent",
        "schema",
        "spans",
        "start",
        "state",
    )

    def __init__(self, kind: str, *, depth: int = 0, max_depth: int = 0, node: TaskNode | None = None,
                 parent: TaskNode | None = None):
        self.kind = kind
        schema = _SCHEMAS[kind]
        if kind == "task" and depth >= max_depth:
            schema = tuple(entry for entry in schema if entry[0] != "subtasks")
        self.schema = schema
        self.node, self.parent, self.depth = node, parent, depth  # a task's node exists once "{" is seen
        self.spans: dict[str, TokenSpan] = {} if node is None else node.spans
        self.state, self.last, self.key, self.key_start, self.start = _O_OPEN, -1, "", -1, -1

    def _allowed(self) -> list[str]:
        out = []
        for key, required in self.schema[self.last + 1:]:
            out.append(key)
            if required:
                break
        return out

    def _where(self) -> str:
        return f"at the start of {_OPEN_NAME[self.kind]}" if self.last < 0 else \
            f"after the {_LABEL[self.schema[self.last][0]]}"

    def _why(self, key: str) -> str:
        """Why a complete key of the format is not allowed here."""
        if _HOME[key] != self.kind:
            return f"it belongs in {_HOME_NAME[_HOME[key]]}"
        names = [k for k, _ in self.schema]
        if key not in names:
            return f"a task at depth {self.depth}, the max depth, has no subtasks"
        at = names.index(key)
        if at <= self.last:
            return "keys come in the order " + ", ".join(f'"{k}"' for k in names)
        missing = next(k for k, req in self.schema[self.last + 1:at] if req)
        return f'"{missing}" must come before it'

    def step(self, tr: TaskTracker, text: str, i: int) -> int:
        n = len(text)
        while i < n:
            c = text[i]
            s = self.state
            if s == _O_KEY:
                # A key is written literally; it is judged when it closes, or as soon as no key begins so.
                if c == '"':
                    if self.key in _HOME and self.key in self._allowed():
                        self.last = next(j for j, (k, _) in enumerate(self.schema) if k == self.key)
                        self.state = _O_COLON
                    else:
                        why = self._why(self.key) if self.key in _HOME else "no key of the format"
                        raise _Bad(i, f"{_either(self._allowed())} {self._where()}", f'"{self.key}" ({why})')
                elif c == "\\" or c < " ":
                    raise _Bad(i, f"a key of the format, written without escapes, {self._where()}", _show(c))
                else:
                    self.key += c
                    if not any(k.startswith(self.key) for k in _HOME):
                        raise _Bad(i, f"{_either(self._allowed())} {self._where()}",
                                   f'"{self.key}..." (no key of the format begins so)')
                i += 1
                continue
            if c in _WS:
                i += 1
                continue
            if s == _O_OPEN:
                if c != "{":
                    what = "the reasoning task" if self.parent is None and self.kind == "task" else _OPEN_NAME[self.kind]
                    raise _Bad(i, f'"{{" to open {what}', _show(c))
                self._open(tr)
                self.state = _O_FIRST
            elif s == _O_FIRST or s == _O_NEXT:
                if c != '"':
                    raise _Bad(i, f"{_either(self._allowed())} {self._where()}", _show(c))
                self.key, self.key_start, self.state = "", tr.tokens, _O_KEY
            elif s == _O_COLON:
                if c != ":":
                    raise _Bad(i, f'":" after "{self.schema[self.last][0]}"', _show(c))
                self.state = _O_VALUE
                tr._stack.append(self._child(tr))
                return i + 1
            elif s == _O_AFTER:
                more = bool(self._allowed())
                missing = next((k for k, req in self.schema[self.last + 1:] if req), None)
                if c == "," and more:
                    self.state = _O_NEXT
                elif c == "}" and missing is None:
                    self._close(tr)
                    tr._finish(self.node, tr.tokens, i + 1)
                    return i + 1
                else:
                    where = self._where()
                    expected = f'"," {where} ("{missing}" is missing)' if missing else \
                        f'"," or "}}" {where}' if more else f'"}}" {where}'
                    raise _Bad(i, expected, _show(c))
            else:  # pragma: no cover
                raise AssertionError(f"unreachable object state {s}")
            i += 1
        return i

    def _open(self, tr: TaskTracker) -> None:
        self.start = tr.tokens
        if self.kind != "task":
            return
        path = () if self.parent is None else self.parent.path + (len(self.parent.children),)
        self.node = TaskNode(path, self.depth, tr.tokens)
        self.spans = self.node.spans
        if self.parent is None:
            tr.root = self.node
        else:
            self.parent.children.append(self.node)
        tr.nodes[path] = self.node

    def _child(self, tr: TaskTracker) -> _Json | _Obj | _List:
        key = self.schema[self.last][0]
        if key == "reasoning":
            return _Obj("task", depth=1, max_depth=tr.max_depth)
        if key == "tooluse":
            return _Obj("tooluse", node=self.node)
        if key == "subtasks":
            return _List(self.node, tr.max_depth)
        return _Json(_VALUE_KIND[key], f"the {_LABEL[key]}")

    def child_done(self, tr: TaskTracker, value: Any, last_token: int, end: int) -> None:
        key = self.schema[self.last][0]
        self.spans[key] = TokenSpan(self.key_start, last_token + 1)
        self.state = _O_AFTER
        if key in _DECODED:
            setattr(self.node, key, value)
            if key in _REPORTED:
                tr._events.append(FieldDone(self.node.path, key, value))
        elif key == "answer":
            tr.answer = value
        elif key == "subtasks":
            self.spans["subtasks_body"] = value
        if key == "parameters":
            node = self.node
            tr._events.append(ToolCallReady(node.path, node.tool_name, value, tr._text[end:]))

    def _close(self, tr: TaskTracker) -> None:
        if self.kind == "task":
            self.node.end = tr.tokens + 1
            tr._events.append(TaskClosed(self.node.path))
        elif self.kind == "thread":
            self.spans["thread"] = TokenSpan(self.start, tr.tokens + 1)
            tr.done = True
            tr._events.append(ThreadDone(tr.answer))


class _List:
    """A frame for a subtask list: "[" then tasks separated by "," then "]"."""

    __slots__ = ("max_depth", "node", "open_token", "state")

    def __init__(self, node: TaskNode, max_depth: int):
        self.node, self.max_depth = node, max_depth
        self.state, self.open_token = 0, -1  # 0: "[" expected, 1: a task or "]", 2: "," or "]", 3: a task

    def step(self, tr: TaskTracker, text: str, i: int) -> int:
        n = len(text)
        while i < n:
            c = text[i]
            if c in _WS:
                i += 1
                continue
            s = self.state
            if s == 0:
                if c != "[":
                    raise _Bad(i, '"[" to open the subtasks', _show(c))
                self.open_token, self.state = tr.tokens, 1
            elif c == "]" and s in (1, 2):
                t = tr.tokens
                body = TokenSpan(min(self.open_token + 1, t), t)
                tr._events.append(ListClosed(self.node.path, body))
                tr._finish(body, t, i + 1)
                return i + 1
            elif c == "{" and s in (1, 3):
                self.state = 2
                tr._stack.append(_Obj("task", depth=self.node.depth + 1, max_depth=self.max_depth,
                                      parent=self.node))
                return i  # the task's frame takes its own "{"
            elif c == "," and s == 2:
                self.state = 3
            else:
                expected = {1: '"{" (a subtask) or "]"', 2: '"," or "]" after a subtask', 3: '"{" (a subtask)'}[s]
                raise _Bad(i, f"{expected} in the subtasks of task {self.node.path}", _show(c))
            i += 1
        return i

    def child_done(self, tr: TaskTracker, value: Any, last_token: int, end: int) -> None:
        pass  # the task frame already linked its node into the tree


class _Top:
    """The bottom frame: whitespace, the thread, whitespace."""

    __slots__ = ()

    def step(self, tr: TaskTracker, text: str, i: int) -> int:
        n = len(text)
        while i < n and text[i] in _WS:
            i += 1
        if i < n:
            raise _Bad(i, "only whitespace after the thread closed", _show(text[i]))
        return i

    def child_done(self, tr: TaskTracker, value: Any, last_token: int, end: int) -> None:
        pass


class TaskTracker:
    """Parses a TIM thread from its tokens' text as they are generated (see the module for the format and
    the span conventions). Each `feed` looks at its text once: O(len(text)) work, plus decoding a value
    once when it completes (amortised O(1) a character).

    What it has seen so far: `root` (the reasoning task) and `nodes` (every task by path, added at its "{"),
    `spans` ("reasoning", "answer", "thread"), `answer`, `done` (the outer "}" was seen) and `tokens` (how
    many were fed). A "subtasks" list may be empty, which the format's JSON Schema does not allow; keys
    must be written without escapes. A `TimFormatError` kills the tracker: the events of the token that
    raised it are lost and every later `feed` raises it again.
    """

    def __init__(self, max_depth: int = 3):
        if type(max_depth) is not int or max_depth < 1:
            raise CacheInputError(f"`max_depth` must be an int >= 1 (1: the reasoning task only), got {brief(max_depth)}")
        self.max_depth = max_depth
        self.tokens = 0  # tokens fed so far = the index of the next one
        self.root: TaskNode | None = None
        self.nodes: dict[tuple[int, ...], TaskNode] = {}
        self.answer: Any = None
        thread = _Obj("thread")
        self.spans: dict[str, TokenSpan] = thread.spans  # "reasoning", "answer" and "thread" ("{" .. "}")
        self.done = False
        self._stack: list[Any] = [_Top(), thread]
        self._error: TimFormatError | None = None
        self._events: list[Event] = []
        self._text = ""

    def feed(self, text: str) -> list[Event]:
        """Take the decoded text of the next token; returns what it completed or closed (`Event`s), in the order
        of its characters."""
        if not isinstance(text, str):
            raise TypeError(f"feed() takes the decoded text of one token (a str), got {type(text).__name__}")
        if self._error is not None:
            raise self._error
        self._events, self._text = [], text
        try:
            i, n = 0, len(text)
            while i < n:
                i = self._stack[-1].step(self, text, i)
        except _Bad as bad:
            self._error = TimFormatError((self.tokens, bad.i), bad.expected, bad.got)
            raise self._error from None
        self.tokens += 1
        return self._events

    def _finish(self, value: Any, last_token: int, end: int) -> None:
        """The top frame's value ended at token `last_token`, before text index `end`: hand it to its parent."""
        self._stack.pop()
        self._stack[-1].child_done(self, value, last_token, end)


def _word(c: str) -> bool:
    return c.isalnum() or c in ".+-"


def tool_result_text(after: str, result_json: str) -> str:
    """The text to inject after a tool call so that `after + text` reads `, "tool_result": <result_json>`.

    `after` is `ToolCallReady.after`: what the model wrote after the parameters in that same token. It may
    already hold part of the key (", \\"tool_") or differ in whitespace; it must be a prefix of that text up to
    whitespace between JSON tokens. The result is checked with the tracker's own scanner, so the tracker
    accepts whatever this returns."""
    value = result_json.strip(_WS)
    scanner = _Json("any", "the tool result")
    try:
        end = scanner.scan(value + " ", 0, 0)
    except _Bad as bad:
        raise TimFormatError(None, f"{bad.expected} (char {bad.i} of the result)", bad.got) from None
    if not scanner.done or end != len(value):
        got = _show(value[end]) if end < len(value) else "its end"
        raise TimFormatError(None, f"one JSON value as the tool result (char {end} of it)", got)
    target = ', "tool_result": ' + value
    j, in_string, escaped = 0, False, False
    for i, a in enumerate(after):
        if not in_string and a in _WS:
            while j < len(target) and target[j] in _WS:
                j += 1
            if 0 < j < len(target) and _word(target[j - 1]) and _word(target[j]):
                raise TimFormatError(None, f"{_show(target[j:j + 20])}... after the parameters (char {i} of the "
                                     "token's rest; whitespace cannot split a number or literal)", _show(a))
            continue
        if not in_string:
            while j < len(target) and target[j] in _WS:
                j += 1
        if j >= len(target) or target[j] != a:
            raise TimFormatError(None, f"{_show(target[j:j + 20])}... after the parameters (char {i} of the "
                                 "token's rest)", _show(a))
        if in_string:
            if escaped:
                escaped = False
            elif a == "\\":
                escaped = True
            elif a == '"':
                in_string = False
        elif a == '"':
            in_string = True
        j += 1
    return target[j:]
