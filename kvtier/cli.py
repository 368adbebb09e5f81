"""The `kvtier` command line: `kvtier qa`, `kvtier inspect`, `kvtier sessions`, `kvtier hogwild`, `kvtier tim`,
`kvtier bench`."""

from __future__ import annotations

import argparse
import importlib
import signal
import sys

from . import __version__
from .errors import printable

# benchmark name -> module under kvtier.bench with a `main(argv)`
BENCHMARKS = {"exact": "exact", "codec": "codec", "speed": "speed", "quality": "quality", "kernels": "kernels",
              "hogwild": "hogwild", "tim": "tim", "span": "span", "remote": "remote"}


def error_line(exc: BaseException) -> str:
    """One printable line for an error: an OSError as 'path: reason', any message on one line."""
    if isinstance(exc, OSError) and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}" if exc.filename is not None else exc.strerror
    else:
        text = str(exc) or type(exc).__name__
    return printable(" ".join(part.strip() for part in text.splitlines() if part.strip()))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="kvtier", description="Tiered KV cache for transformers.")
    parser.add_argument("--version", action="version", version=f"kvtier {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("qa", help="answer questions about a long document (prefilled once into a store, shared through "
                              "a Redis/Valkey server with --remote)",
                   add_help=False)
    sub.add_parser("inspect", help="show what a store, or a session published on a Redis/Valkey server, holds",
                   add_help=False)
    sub.add_parser("sessions", help="list the sessions published on a Redis/Valkey server", add_help=False)
    sub.add_parser("hogwild", help="several workers solve a problem together over one shared cache, shown live",
                   add_help=False)
    sub.add_parser("tim", help="reason as a task tree, with tools, pruning finished sub-tasks from the cache (TIM)",
                   add_help=False)
    # add_help=False: `kvtier bench NAME --help` reaches the benchmark's own parser
    bench = sub.add_parser("bench", help="run a benchmark and write its JSON (default: the current directory)",
                           description="Run a benchmark; `kvtier bench NAME --help` lists its options.",
                           add_help=False)
    bench.add_argument("name", nargs="?", choices=sorted(BENCHMARKS))
    if argv and argv[0].startswith("-") and not any(
            known.startswith(argv[0]) for known in ("-h", "--help", "--version")):
        # parse_known_args would set it aside and only say that a command is missing
        parser.error(f"unrecognized argument {printable(argv[0])}: name a command first ({', '.join(sub.choices)}); "
                     "its options follow it (kvtier COMMAND --help)")
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench" and args.name is None:
        if any(a in ("-h", "--help") for a in rest):
            bench.print_help()
            return 0
        bench.error("name a benchmark: " + ", ".join(sorted(BENCHMARKS)))
    if args.command == "qa":
        from .qa import main as qa_main

        return qa_main(rest)
    if args.command == "inspect":
        from .report import main as inspect_main

        return inspect_main(rest)
    if args.command == "sessions":
        from .report import sessions_main

        return sessions_main(rest)
    if args.command == "hogwild":
        from .hogwild.cli import main as hogwild_main

        return hogwild_main(rest)
    if args.command == "tim":
        from .tim.cli import main as tim_main

        return tim_main(rest)
    from .cli_args import run_command

    bench_main = importlib.import_module(f"kvtier.bench.{BENCHMARKS[args.name]}").main
    # a benchmark's own flags are checked by its parser; what fails later (a store directory, a server, a value
    # only the run can check) is one line and exit code 2, Ctrl-C exit code 130, as for the other commands
    return run_command(f"kvtier bench {args.name}", lambda _: bench_main(rest) or 0, args)


def console_main(argv: list[str] | None = None) -> int:
    """The `kvtier` program: `main`, then Ctrl-C and SIGTERM ignored while the interpreter exits, where
    finalizers close stores (a key pressed again there ended the program in a traceback)."""
    code = main(argv)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    return code


if __name__ == "__main__":
    sys.exit(console_main())
