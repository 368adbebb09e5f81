"""The `kvtier` command line."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="kvtier", description="Tiered KV cache for transformers.")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="run a benchmark and write JSON to docs/benchmarks/")
    bench.add_argument("name", choices=["exact", "codec"])
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        if args.name == "exact":
            from .bench.exact import main as run
        else:
            from .bench.codec import main as run
        run(rest)


if __name__ == "__main__":
    main()
