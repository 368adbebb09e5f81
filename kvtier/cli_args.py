"""Checks of the command-line flags that kvtier's generation commands (`kvtier hogwild`, `kvtier tim`) share,
made before a model is loaded, and the way those commands end: one error line and exit code 2, never a
traceback."""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .cli import error_line
from .config import KVTierConfig
from .errors import KVTierError, not_utf8
from .sizes import parse_budget, split_budget

# the budget flags of `kvtier qa`, `kvtier hogwild` and `kvtier tim`, and the KVTierConfig option each one sets
BUDGET_FLAGS = (("--device-budget", "device_budget"), ("--host-budget", "host_budget"))


class UsageError(Exception):
    """A problem with the command line, worth one line to the user, not a traceback."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, already told to the user in one line (what was kept, how to go on): `run_command` adds nothing."""


def check_device(name: str) -> None:
    """Refuse a device this machine does not have (or that cannot run a model), before anything is loaded."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {name}: not a device name (cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise UsageError(f"--device {name}: CUDA is not available ({why}); pass --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif device.type == "meta":
        raise UsageError(f"--device {name}: the meta device holds no data and cannot run a model; pass --device cpu")
    elif device.type != "cpu":
        backend = getattr(torch, device.type, None)  # torch.mps, torch.xpu, ... each says if this machine has one
        available = getattr(backend, "is_available", None)
        if not callable(available) or not available():
            raise UsageError(f"--device {name}: {device.type} is not available on this machine; pass --device cpu")


def check_text(flag: str, text: str | None, what: str) -> None:
    """Refuse an empty or blank text flag (--model, --doc, --store, ...): an empty path would mean the current
    directory, an empty model id nothing at all."""
    if text is not None and not text.strip():
        raise UsageError(f"{flag} is empty: pass {what}")


def check_utf8(what: str, text: str | None) -> None:
    """Refuse text that is not UTF-8 (`not_utf8`): the tokenizer would fail on it with a traceback."""
    problem = None if text is None else not_utf8(text)
    if problem is not None:
        raise UsageError(f"{what} is not UTF-8 text ({problem}): pass it in UTF-8")


def check_sampling(args: argparse.Namespace) -> None:
    """--temperature, --top-p, --top-k (sampling options, refused when greedy), --seed."""
    from .sampling import check_sampling as check_seed

    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise UsageError(f"--temperature {args.temperature}: must be 0 (greedy) or a finite number above 0")
    if not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p {args.top_p}: must be in (0, 1]")
    if args.top_k < 0:
        raise UsageError(f"--top-k {args.top_k}: must be 0 (all tokens) or above")
    if args.temperature == 0:  # greedy: a sampling option would be silently ignored
        for flag, value, default in (("--top-p", args.top_p, 1.0), ("--top-k", args.top_k, 0)):
            if value != default:
                raise UsageError(f"{flag} {value} applies to sampling only; add --temperature above 0 (the default, "
                                 "0, is greedy)")
    if args.seed is not None:
        try:
            check_seed(False, 1.0, 1.0, 0, seed=args.seed)
        except ValueError as err:
            raise UsageError(f"--seed {args.seed}: {err}") from None


def budget_tokens(args: argparse.Namespace, model: Any = None) -> dict[str, int]:
    """--device-budget and --host-budget as tokens per layer, each checked as `KVTierConfig` checks its option and
    refused naming its flag and value.

    Without `model` (before it is loaded) a size ("8GiB") has its spelling checked and is left out: it becomes
    tokens once the model is known. With `model`, sizes are converted for it (all its full-attention layers, in
    its dtype), as `KVTierCache.for_model` would convert them."""
    from .model_spec import ModelSpec

    out: dict[str, int] = {}
    spec = None
    for flag, name in BUDGET_FLAGS:
        text = getattr(args, name)
        if text is None:
            continue
        try:
            number, unit = split_budget(text)
        except ValueError as err:
            raise UsageError(f"{flag}: {err}") from None
        if unit and model is None:
            continue
        try:
            if unit:
                spec = spec or ModelSpec.from_model(model)
                tokens = parse_budget(text, spec)
            else:
                tokens = int(number)
            KVTierConfig(**{name: tokens})
        except ValueError as err:
            raise UsageError(f"{flag} {text.strip()}: {err}") from None
        out[name] = tokens
    return out


def check_outputs_and_memory(args: argparse.Namespace) -> None:
    """--model (not empty), --device-budget, --host-budget (tokens or a size), --json (a writable file path),
    --device."""
    check_text("--model", args.model, "a local model directory or a hub id")
    budget_tokens(args)
    if args.json is not None:
        check_text("--json", args.json, "the path of the JSON file to write")
        target = Path(args.json).resolve()
        if target.is_dir():
            raise UsageError(f"--json {args.json} is a directory; pass a file path")
        if not target.parent.is_dir() or not os.access(target.parent, os.W_OK | os.X_OK):
            raise UsageError(f"--json {args.json}: cannot write in {target.parent} (not a writable directory)")
    check_device(args.device)


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, `timeout`), taken the way Ctrl-C is: stores closed, temporary ones removed, a prefill's
    progress saved."""


def _stop_once(signum: int, frame: Any) -> None:
    """The first Ctrl-C or SIGTERM interrupts the command; later ones are ignored until it returns, so the
    cleanup the first starts (stores closed, what a prefill saved said) is not cut into a traceback."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def write_file(path: str | Path, text: str) -> None:
    """Write a result file whole or not at all: into a temporary file beside it, then renamed over it (a full
    disk or a file size limit mid-write left the previous result cut short, as invalid JSON)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def run_command(name: str, run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command: a usage problem, a kvtier error, a bad value or an OS error is one line on stderr and exit
    code 2; Ctrl-C is exit code 130 and SIGTERM 143 (one line, unless the command already said what the
    interruption left). Output the terminal cannot encode is escaped, not an error; a reader that goes away
    (`| head`) ends the command quietly, as it ends other Unix tools (exit code 141)."""
    if sys.stdout is None:  # started with stdout closed (`>&-`): nowhere to answer
        if sys.stderr is not None:
            print(f"{name}: error: standard output is closed; redirect it to a file or /dev/null", file=sys.stderr)
        return 2
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    main_thread = threading.current_thread() is threading.main_thread()
    previous = previous_int = None
    if main_thread:
        previous = signal.signal(signal.SIGTERM, _stop_once)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # never a handler the caller installed
            previous_int = signal.signal(signal.SIGINT, _stop_once)
    try:
        code = run(args)
        sys.stdout.flush()  # here, not at exit: a reader gone before the last write is met below
        return code
    except BrokenPipeError:
        # stdout's reader is gone: point stdout at /dev/null so that the interpreter's last flush is quiet too
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (UsageError, KVTierError, ValueError, OSError) as exc:
        print(f"{name}: error: {error_line(exc)}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        return 143 if isinstance(exc.__context__, Terminated) else 130
    except Terminated:
        print(f"\n{name}: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"\n{name}: interrupted", file=sys.stderr)
        return 130
    finally:  # the caller's handlers back (in the main thread only were they changed)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if previous_int is not None:
            signal.signal(signal.SIGINT, previous_int)
