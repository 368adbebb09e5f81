"""The `kvtier` command line."""

from __future__ import annotations

import argparse
import importlib
import sys

# benchmark name -> module under kvtier.bench with a `main(argv)`
BENCHMARKS = {"exact": "exact", "codec": "codec", "speed": "speed", "quality": "quality"}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="kvtier", description="Tiered KV cache for transformers.")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="run a benchmark and write JSON to docs/benchmarks/",
                           description="Run a benchmark; `kvtier bench NAME --help` lists its options.")
    bench.add_argument("name", choices=sorted(BENCHMARKS))
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        importlib.import_module(f"kvtier.bench.{BENCHMARKS[args.name]}").main(rest)


if __name__ == "__main__":
    main()
