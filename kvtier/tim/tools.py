"""Tools a TIM thread calls in the middle of its generation, and the registry that runs them.

A task's "tooluse" names a tool and its parameters; the runtime calls `ToolRegistry.call`, which never raises:
whatever goes wrong (an unknown tool, parameters that do not match the tool's schema, the tool raising, running past
its timeout, returning something JSON cannot hold, or more than MAX_RESULT_CHARS of it) comes back as a
`ToolOutcome` whose `result_json` is `{"error": "..."}`, so the model reads the failure as the tool's result and
carries on (TIM, arXiv 2507.16784: tool results are written into the reasoning tree in the same generation).

Each call runs in a daemon worker thread so that a timeout can be kept. Python cannot stop a thread: a call that
runs past its timeout is abandoned, not killed. It keeps running (and holding whatever it holds) until its
function returns; its result is dropped, and a daemon thread never holds up interpreter exit. A registry stops
calling a tool while MAX_ABANDONED_CALLS of its calls are still running (a model asking a hung tool again and again
would otherwise pile up one thread per call); the call is an error result until one of them returns. Tools that may
hang should bound their own work (as `calculator` does) or do it in a subprocess.
"""

from __future__ import annotations

import ast
import copy
import inspect
import math
import re
import threading
import time
import types
import typing
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from kvtier.errors import KVTierError, brief
from kvtier.tim.schema import dump_json
from kvtier.tim.tracker import TimFormatError, tool_result_text

DEFAULT_TIMEOUT = 10.0  # seconds
TOOL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")  # written inside a JSON string: no quotes or escapes
MAX_ERROR_CHARS = 500  # an exception message longer than this is cut (the model reads it)
MAX_RESULT_CHARS = 65536  # a result's JSON longer than this is an error result: it would be one huge forward pass
MAX_ABANDONED_CALLS = 4  # calls of one tool still running past their timeout before it is no longer called


class ToolSpecError(KVTierError, ValueError):
    """A tool or a tool registry is defined wrongly (a bad name, a parameters schema that is not an object, ...)."""


@dataclass(frozen=True)
class Tool:
    """One tool: `fn(**parameters)` returns a JSON value; `parameters` is the JSON Schema of its arguments
    (type "object"). `timeout` is in seconds (None: wait for the call however long it takes)."""

    name: str
    description: str
    parameters: dict
    fn: Callable[..., Any]
    timeout: float | None = DEFAULT_TIMEOUT

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not TOOL_NAME.fullmatch(self.name):
            raise ToolSpecError(f"tool name must match {TOOL_NAME.pattern} (letters, digits, _ . -), got {brief(self.name)}")
        if not isinstance(self.description, str):
            raise ToolSpecError(f"tool {self.name!r}: description must be a str, got {type(self.description).__name__}")
        _check_object_schema(self.name, self.parameters)
        if not callable(self.fn):
            raise ToolSpecError(f"tool {self.name!r}: fn must be callable, got {type(self.fn).__name__}")
        if self.timeout is not None and (isinstance(self.timeout, bool) or not isinstance(self.timeout, (int, float))
                                         or not 0 < self.timeout <= threading.TIMEOUT_MAX):
            raise ToolSpecError(f"tool {self.name!r}: timeout must be None or seconds in (0, {threading.TIMEOUT_MAX:g}]"
                                f", got {brief(self.timeout)}")


def tool(fn: Callable[..., Any] | None = None, *, name: str | None = None, description: str | None = None,
         parameters: dict | None = None, timeout: float | None = DEFAULT_TIMEOUT):
    """Make a `Tool` from a function: `tool(f)`, `@tool` or `@tool(name=..., timeout=...)`.

    Without `parameters` the schema comes from the function's signature (`parameters_schema`); without
    `description`, from the first paragraph of its docstring.
    """
    def build(f: Callable[..., Any]) -> Tool:
        if not callable(f):
            raise ToolSpecError(f"tool() needs a callable, got {type(f).__name__}")
        doc = inspect.getdoc(f) or ""
        return Tool(name=name if name is not None else getattr(f, "__name__", ""),
                    description=description if description is not None else doc.split("\n\n")[0].strip(),
                    parameters=parameters if parameters is not None else parameters_schema(f), fn=f, timeout=timeout)

    return build if fn is None else build(fn)


def parameters_schema(fn: Callable[..., Any]) -> dict:
    """The JSON Schema of `fn`'s keyword arguments, from its type hints: str, int, float, bool, list[...],
    dict[str, ...], Literal[...], Optional[...] / `X | None` and Any (or no hint: any JSON value). A parameter with
    a default is not required. *args, **kwargs, positional-only parameters and other types raise ToolSpecError."""
    where = getattr(fn, "__name__", repr(fn))
    try:
        hints = typing.get_type_hints(fn)
    except Exception as e:  # a hint naming something undefined
        raise ToolSpecError(f"tool {where!r}: cannot read its type hints ({type(e).__name__}: {e})") from None
    props: dict[str, Any] = {}
    required: list[str] = []
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY):
            raise ToolSpecError(f"tool {where!r}: parameter {p.name!r} is {p.kind.description}; tools take named "
                                "parameters only (or pass parameters= explicitly)")
        props[p.name] = _hint_schema(hints.get(p.name, Any), f"{where}({p.name})")
        if p.default is p.empty:
            required.append(p.name)
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


_SCALARS: dict[Any, str] = {str: "string", int: "integer", float: "number", bool: "boolean", type(None): "null"}


def _hint_schema(hint: Any, where: str) -> dict:
    if hint is Any:
        return {}
    if hint in _SCALARS:
        return {"type": _SCALARS[hint]}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is list or origin is list:
        return {"type": "array", "items": _hint_schema(args[0], where)} if args else {"type": "array"}
    if hint is dict or origin is dict:
        if args and args[0] is not str:
            raise ToolSpecError(f"tool parameter {where}: JSON object keys are strings, got {brief(hint)}")
        return {"type": "object", "additionalProperties": _hint_schema(args[1], where)} if args else {"type": "object"}
    if origin is typing.Literal:
        if not all(isinstance(a, (str, int, float, bool)) or a is None for a in args):
            raise ToolSpecError(f"tool parameter {where}: Literal values must be JSON scalars, got {brief(hint)}")
        return {"enum": list(args)}
    if origin is typing.Union or origin is types.UnionType:
        return {"anyOf": [_hint_schema(a, where) for a in args]}
    raise ToolSpecError(f"tool parameter {where}: cannot derive a JSON Schema from {hint!r}; use str, int, float, "
                        "bool, list, dict, Literal or Optional, or pass parameters= explicitly")


def _check_object_schema(name: str, schema: Any) -> None:
    if not isinstance(schema, dict) or schema.get("type") != "object":
        raise ToolSpecError(f"tool {name!r}: parameters must be a JSON Schema of type 'object', got {brief(schema)}")
    props = schema.get("properties", {})
    if not isinstance(props, dict) or not all(isinstance(k, str) and isinstance(v, dict) for k, v in props.items()):
        raise ToolSpecError(f"tool {name!r}: parameters.properties must map names to schemas, got {brief(props)}")
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) and r in props for r in required):
        raise ToolSpecError(f"tool {name!r}: parameters.required must list names from properties, got {brief(required)}")
    try:
        dump_json(schema)
    except (TypeError, ValueError, RecursionError) as e:  # RecursionError: nested past what json can write
        raise ToolSpecError(f"tool {name!r}: parameters schema is not JSON ({type(e).__name__}: {e})") from None


# ---- validation of call parameters: the JSON Schema keywords a tool's parameters commonly use ----

_JSON_TYPES: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def _json_type(v: Any) -> str:
    for name in ("null", "boolean", "integer", "number", "string", "array", "object"):
        if _JSON_TYPES[name](v):
            return name
    return type(v).__name__


def schema_errors(value: Any, schema: dict, path: str = "parameters") -> str | None:
    """Why `value` does not match `schema`, or None when it does. Checks type, enum, const, properties, required,
    additionalProperties, items, anyOf/oneOf, min/maxLength, min/maxItems, minimum/maximum; other keywords are not
    checked (the constrained decoder enforces the whole schema on what the model writes)."""
    if not isinstance(schema, dict):
        return None
    expected = schema.get("type")
    if expected is not None:
        names = expected if isinstance(expected, list) else [expected]
        if not any(_JSON_TYPES.get(t, lambda v: True)(value) for t in names):
            return f"{path}: expected {' or '.join(names)}, got {_json_type(value)}"
    if "enum" in schema and not any(_same_json(value, e) for e in schema["enum"]):
        return f"{path}: {brief(value)} is not one of {schema['enum']!r}"
    if "const" in schema and not _same_json(value, schema["const"]):
        return f"{path}: expected {schema['const']!r}, got {brief(value)}"
    for key in ("anyOf", "oneOf"):
        if key in schema and all(schema_errors(value, s, path) is not None for s in schema[key]):
            return f"{path}: matches none of the allowed forms ({schema_errors(value, schema[key][0], path)})"
    if isinstance(value, str):
        if len(value) > schema.get("maxLength", math.inf) or len(value) < schema.get("minLength", 0):
            return f"{path}: a string of {len(value)} characters is outside the allowed length"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value > schema.get("maximum", math.inf) or value < schema.get("minimum", -math.inf):
            return f"{path}: {brief(value)} is outside [{schema.get('minimum', '-inf')}, {schema.get('maximum', 'inf')}]"
    if isinstance(value, list):
        if len(value) > schema.get("maxItems", math.inf) or len(value) < schema.get("minItems", 0):
            return f"{path}: a list of {len(value)} items is outside the allowed length"
        for i, item in enumerate(value):
            if (err := schema_errors(item, schema.get("items", {}), f"{path}[{i}]")) is not None:
                return err
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in value:
                return f"{path}: missing required key {key!r}"
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            if key in props:
                err = schema_errors(item, props[key], f"{path}.{key}")
            elif extra is False:
                err = f"{path}: unexpected key {key!r} (allowed: {', '.join(props) or 'none'})"
            else:
                err = schema_errors(item, extra, f"{path}.{key}")
            if err is not None:
                return err
    return None


def _same_json(a: Any, b: Any) -> bool:
    """Equal as JSON values: 1 == 1.0, but True != 1 and 0 != False (Python says otherwise)."""
    numbers = ("integer", "number")
    ta, tb = _json_type(a), _json_type(b)
    return a == b and (ta == tb or (ta in numbers and tb in numbers))


# ---- the registry ----

@dataclass(frozen=True, slots=True)
class ToolOutcome:
    """What one call gave. `result_json` is one line of JSON in the thread's form (`schema.dump_json`), ready to
    write after `"tool_result": `; on failure it is `{"error": "..."}` and `ok` is False."""

    name: str
    ok: bool
    result_json: str
    seconds: float


class ToolRegistry:
    """The tools a thread may call, by name. Plain functions are wrapped with `tool()`."""

    def __init__(self, tools: Iterable[Tool | Callable[..., Any]] = ()) -> None:
        if isinstance(tools, (str, bytes, Tool)) or callable(tools) or not isinstance(tools, Iterable):
            raise ToolSpecError(f"tools must be a list of Tools or functions, got {brief(tools)}")
        self._tools: dict[str, Tool] = {}
        for t in tools:
            t = t if isinstance(t, Tool) else tool(t)
            if t.name in self._tools:
                raise ToolSpecError(f"two tools are named {t.name!r}; tool names must be unique")
            self._tools[t.name] = t
        self._running: dict[str, int] = {}  # per tool: calls whose thread has not returned (abandoned ones)
        self._running_lock = threading.Lock()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._tools)

    def __len__(self) -> int:
        return len(self._tools)

    def __iter__(self) -> Iterator[Tool]:
        return iter(self._tools.values())

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __getitem__(self, name: str) -> Tool:
        return self._tools[name]

    def schema_for_tooluse(self) -> dict:
        """The JSON Schema of a task's "tooluse": one object per tool, {"tool_name": <its name>, "parameters":
        <its schema>, "tool_result": <any JSON>} in that order (anyOf when there are several)."""
        if not self._tools:
            raise ToolSpecError("the registry has no tools, so a task cannot use one")
        forms = [{"type": "object",
                  "properties": {"tool_name": {"type": "string", "const": t.name},
                                 "parameters": t.parameters, "tool_result": {}},
                  "required": ["tool_name", "parameters", "tool_result"], "additionalProperties": False}
                 for t in self._tools.values()]
        return forms[0] if len(forms) == 1 else {"anyOf": forms}

    def call(self, name: str, parameters: Any) -> ToolOutcome:
        """Run tool `name` with `parameters` (a dict). Never raises: every failure is an error outcome."""
        start = time.perf_counter()

        def fail(message: str) -> ToolOutcome:
            return ToolOutcome(str(name), False, dump_json({"error": message}), time.perf_counter() - start)

        t = self._tools.get(name) if isinstance(name, str) else None
        if t is None:
            return fail(f"unknown tool {name!r}; known tools: {', '.join(self._tools) or 'none'}")
        try:
            err = schema_errors(parameters, t.parameters)
        except Exception as e:  # a schema whose keywords hold odd values ("maxLength": "ten")
            return fail(f"cannot check the parameters of {t.name!r} against its schema: {_describe(e)}")
        if err is not None:
            return fail(f"bad parameters for {t.name!r}: {err}")
        # the tool gets its own copy: the parameters are also the task tree's record of the call, and a tool (or one
        # abandoned at its timeout, still running) that changes its arguments must not rewrite what the model wrote
        try:
            own = copy.deepcopy(parameters)
        except Exception as e:  # not JSON data (a caller's own object)
            return fail(f"bad parameters for {t.name!r}: cannot copy them ({_describe(e)})")
        with self._running_lock:
            stuck = self._running.get(t.name, 0)
        if stuck >= MAX_ABANDONED_CALLS:
            return fail(f"tool {t.name!r} was not called: {stuck} of its earlier calls are still running past their "
                        "timeout")
        finished, value, error = self._run_in_thread(t, own)
        if not finished:
            return fail(f"tool {t.name!r} timed out after {t.timeout:g} s")
        if error is not None:
            return fail(f"tool {t.name!r} failed: {_describe(error)}")
        try:
            text = dump_json(value)
        except Exception as e:  # TypeError, ValueError; RecursionError for a value nested too deep
            return fail(f"tool {t.name!r} returned a value JSON cannot hold: {_describe(e)}")
        if len(text) > MAX_RESULT_CHARS:
            return fail(f"tool {t.name!r} returned {len(text)} characters of JSON; at most {MAX_RESULT_CHARS} are "
                        "written into the generation")
        try:
            tool_result_text("", text)  # what the tracker reads back (the nesting it allows)
        except TimFormatError as e:
            return fail(f"tool {t.name!r} returned a value the thread cannot hold: {e}")
        return ToolOutcome(t.name, True, text, time.perf_counter() - start)

    def _run_in_thread(self, t: Tool, parameters: dict) -> tuple[bool, Any, BaseException | None]:
        """(finished, value, error). A daemon thread, not a ThreadPoolExecutor: the executor's workers are joined
        at interpreter exit, so one hung tool would hang the exit too. The thread counts itself in `_running`
        until its function returns."""
        box: dict[str, Any] = {}
        done = threading.Event()

        def work() -> None:
            try:
                box["value"] = t.fn(**parameters)
            except BaseException as e:  # noqa: BLE001 - reported to the model as the tool's error
                box["error"] = e
            finally:
                with self._running_lock:
                    self._running[t.name] -= 1
                done.set()

        with self._running_lock:
            self._running[t.name] = self._running.get(t.name, 0) + 1
        try:
            threading.Thread(target=work, name=f"kvtier-tool-{t.name}", daemon=True).start()
        except BaseException:  # no thread (the process is out of them): nothing runs, nothing to count
            with self._running_lock:
                self._running[t.name] -= 1
            raise
        if not done.wait(t.timeout):
            return False, None, None  # abandoned: see the module docstring
        return True, box.get("value"), box.get("error")


def _describe(error: BaseException) -> str:
    """An error as one line for the model to read; a message that itself fails (its __str__ raises or returns no
    str) leaves the type's name: a tool's error never ends the run."""
    try:
        message = str(error)
    except Exception:  # noqa: BLE001 - any failure of the tool's own __str__
        message = ""
    name = type(error).__name__
    text = f"{name}: {message}" if message else name
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS - 3] + "..."


# ---- calculator ----

MAX_EXPRESSION_LENGTH = 200  # characters
MAX_INT_BITS = 4096  # integers past this (about 1233 digits) are refused: 9**9**9**9 never gets computed
_BINARY = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
           ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: a // b, ast.Mod: lambda a, b: a % b}
_FUNCTIONS: dict[str, tuple[Callable[..., Any], int, int]] = {  # name: (function, fewest args, most args)
    "sqrt": (math.sqrt, 1, 1), "abs": (abs, 1, 1), "round": (round, 1, 2), "floor": (math.floor, 1, 1),
    "ceil": (math.ceil, 1, 1), "log": (math.log, 1, 2), "log10": (math.log10, 1, 1), "log2": (math.log2, 1, 1),
    "exp": (math.exp, 1, 1), "sin": (math.sin, 1, 1), "cos": (math.cos, 1, 1), "tan": (math.tan, 1, 1),
    "min": (min, 1, 16), "max": (max, 1, 16),
}
_CONSTANTS = {"pi": math.pi, "e": math.e}


def calculate(expression: str) -> int | float:
    """Evaluate an arithmetic expression: numbers, + - * / // % **, unary + -, parentheses, the functions
    sqrt abs round floor ceil log log10 log2 exp sin cos tan min max and the constants pi and e. The expression is
    parsed with `ast` and walked node by node (never eval); it is at most MAX_EXPRESSION_LENGTH characters, and an
    integer larger than MAX_INT_BITS bits is refused before it is computed, so no expression can hang or exhaust
    memory. Raises ValueError (or ZeroDivisionError) with a one-line reason."""
    if not isinstance(expression, str):
        raise ValueError(f"expression must be a string, got {type(expression).__name__}")
    if len(expression) > MAX_EXPRESSION_LENGTH:
        raise ValueError(f"expression is {len(expression)} characters; at most {MAX_EXPRESSION_LENGTH} are allowed")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError) as e:
        raise ValueError(f"not an arithmetic expression: {getattr(e, 'msg', None) or e}") from None
    try:
        return _evaluate(tree.body)
    except OverflowError:
        raise ValueError("result out of range (a float overflowed)") from None


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _bounded(node.value)
    if isinstance(node, ast.Name) and node.id in _CONSTANTS:
        return _CONSTANTS[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _evaluate(node.operand)
        return value if isinstance(node.op, ast.UAdd) else -value
    if isinstance(node, ast.BinOp) and (type(node.op) in _BINARY or isinstance(node.op, ast.Pow)):
        a, b = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow):
            return _power(a, b)
        return _bounded(_BINARY[type(node.op)](a, b))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS:
        fn, fewest, most = _FUNCTIONS[node.func.id]
        if node.keywords or not fewest <= len(node.args) <= most:
            raise ValueError(f"{node.func.id}() takes {fewest}..{most} positional arguments")
        args = [_evaluate(a) for a in node.args]
        if node.func.id == "round" and len(args) == 2 and (not isinstance(args[1], int) or abs(args[1]) > 100):
            raise ValueError("round()'s digits must be an integer in [-100, 100]")
        return _bounded(fn(*args))
    if isinstance(node, ast.Call):
        what = f"function {node.func.id!r}" if isinstance(node.func, ast.Name) else "this call"
    else:
        what = f"name {node.id!r}" if isinstance(node, ast.Name) else f"{type(node).__name__} syntax"
    raise ValueError(f"{what} is not allowed: use numbers, + - * / // % **, parentheses, pi, e and "
                     f"{', '.join(_FUNCTIONS)}")


def _power(a: int | float, b: int | float) -> int | float:
    if isinstance(a, int) and isinstance(b, int) and b > 0 and abs(a) > 1 \
            and b * (abs(a).bit_length() - 1) > MAX_INT_BITS:
        raise ValueError(f"result too large (more than {MAX_INT_BITS} bits)")
    return _bounded(a ** b)  # float powers raise OverflowError themselves


def _bounded(value: Any) -> int | float:
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise ValueError(f"result too large (more than {MAX_INT_BITS} bits)")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("result is not a finite number")
    if not isinstance(value, (int, float)):  # (-8) ** 0.5 is complex
        raise ValueError(f"result is not a real number: {brief(value)}")
    return value


calculator = Tool(
    name="calculator",
    description="Evaluate an arithmetic expression, e.g. '(3 + 4) * sqrt(2) / 7'. Numbers, + - * / // % **, "
                "parentheses, pi, e and the functions " + ", ".join(_FUNCTIONS) + ".",
    parameters={"type": "object",
                "properties": {"expression": {"type": "string", "maxLength": MAX_EXPRESSION_LENGTH}},
                "required": ["expression"], "additionalProperties": False},
    fn=calculate,
    timeout=DEFAULT_TIMEOUT,
)
