"""Checks of the command-line flags that kvtier's generation commands (`kvtier hogwild`, `kvtier tim`) share,
made before a model is loaded, and the way those commands end: one error line and exit code 2, never a
traceback."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from .cli import error_line
from .errors import KVTierError
from .sizes import split_budget


class UsageError(Exception):
    """A problem with the command line, worth one line to the user, not a traceback."""


def check_sampling(args: argparse.Namespace) -> None:
    """--temperature, --top-p, --top-k."""
    if args.temperature < 0:
        raise UsageError(f"--temperature {args.temperature}: must be 0 (greedy) or above")
    if not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p {args.top_p}: must be in (0, 1]")
    if args.top_k < 0:
        raise UsageError(f"--top-k {args.top_k}: must be 0 (all tokens) or above")


def check_outputs_and_memory(args: argparse.Namespace) -> None:
    """--device-budget, --host-budget (tokens or a size), --json (a writable file path), --device."""
    from .qa import QAError, check_device

    for flag, text in (("--device-budget", args.device_budget), ("--host-budget", args.host_budget)):
        if text is not None:
            try:
                split_budget(text)
            except ValueError as err:
                raise UsageError(f"{flag}: {err}") from None
    if args.json is not None:
        target = Path(args.json).resolve()
        if target.is_dir():
            raise UsageError(f"--json {args.json} is a directory; pass a file path")
        if not target.parent.is_dir() or not os.access(target.parent, os.W_OK | os.X_OK):
            raise UsageError(f"--json {args.json}: cannot write in {target.parent} (not a writable directory)")
    try:
        check_device(args.device)
    except QAError as err:
        raise UsageError(str(err)) from None


def run_command(name: str, run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command: a usage problem, a kvtier error, a bad value or an OS error is one line on stderr and exit
    code 2; Ctrl-C is exit code 130."""
    try:
        return run(args)
    except (UsageError, KVTierError, ValueError, OSError) as exc:
        print(f"{name}: error: {error_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{name}: interrupted", file=sys.stderr)
        return 130
