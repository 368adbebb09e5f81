"""`kvtier hogwild`: several workers of one model solve a problem together over one shared cache, shown live.

On a terminal, one lane per worker shows the step it is writing; each step that joins the shared history is
printed above the lanes. Otherwise (a pipe, a file) each finished step is printed as lines prefixed with its
writer's name. Then the answer and the run's counts. The workers generate greedily unless --temperature is
above 0.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import torch

from ..cli_args import (UsageError, budget_tokens, check_outputs_and_memory, check_sampling, check_utf8,
                        run_command, write_file)
from ..errors import printable
from .layout import MAX_WORKERS
from .prompts import CollaborationTemplate
from .runtime import HogwildResult, Step, generate

DEFAULTS = {"workers": 2, "max_new_tokens": 1024, "check_in_every": 256}


class HogwildCLIError(UsageError):
    """A problem worth one line to the user, not a traceback."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvtier hogwild", description=__doc__)
    p.add_argument("--model", required=True, help="local directory or hub id of a causal LM, with its tokenizer")
    p.add_argument("--problem", required=True, help="the problem to solve (text)")
    p.add_argument("--workers", type=int, default=DEFAULTS["workers"], help="how many workers (1 to 1024; default 2)")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULTS["max_new_tokens"],
                   help="tokens all workers may generate together (default 1024); then one worker gives the final "
                        "answer")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling share, in (0, 1] (with --temperature)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k best tokens (0: all; with --temperature)")
    p.add_argument("--seed", type=int, help="seed for sampling (reproducible runs)")
    p.add_argument("--check-in-every", type=int, default=DEFAULTS["check_in_every"],
                   help="ask each worker whether its work is redundant every N of its tokens (default 256; 0: never)")
    p.add_argument("--device-budget", help="the shared history's KV kept on the device: tokens per layer (8192) or "
                                          "a size (8GiB); beyond it the history spills to CPU memory and disk")
    p.add_argument("--host-budget", help="the shared history's KV kept in CPU memory: tokens per layer or a size")
    p.add_argument("--names", help="comma-separated worker names (default: Alice, Bob, Carol, ...)")
    p.add_argument("--no-chat-template", action="store_true", help="plain text prompt even if a template exists")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="model dtype (auto: the checkpoint's, float32 on a CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the model runs (default: cuda when available)")
    p.add_argument("--json", metavar="PATH", help="also write the result (texts, trace, answer, stats) as JSON")
    return p


def check_arguments(args: argparse.Namespace) -> CollaborationTemplate:
    """Everything that can be checked before a model is loaded; returns the template the flags describe."""
    if not 1 <= args.workers <= MAX_WORKERS:
        raise HogwildCLIError(f"--workers {args.workers}: between 1 and {MAX_WORKERS} workers")
    if args.max_new_tokens < 1:
        raise HogwildCLIError(f"--max-new-tokens {args.max_new_tokens}: the workers need at least 1 token")
    if args.workers > args.max_new_tokens:
        raise HogwildCLIError(f"--workers {args.workers}: more workers than --max-new-tokens {args.max_new_tokens} "
                              "(the tokens of all workers together); each worker needs at least 1 token")
    check_sampling(args)
    if args.check_in_every < 0:
        raise HogwildCLIError(f"--check-in-every {args.check_in_every}: must be 0 (never) or above")
    if not args.problem.strip():
        raise HogwildCLIError("--problem is empty: pass the text of the problem to solve")
    check_utf8("--problem", args.problem)
    check_utf8("--names", args.names)
    names = None
    if args.names is not None:
        names = [n.strip() for n in args.names.split(",")]
        if len(names) < args.workers or not all(names):
            raise HogwildCLIError(f"--names {args.names!r}: give {args.workers} non-empty names, one per worker")
    check_outputs_and_memory(args)
    try:
        return CollaborationTemplate(names=names, use_chat_template=not args.no_chat_template)
    except ValueError as err:
        raise HogwildCLIError(f"--names: {err}") from None


def one_line(text: str) -> str:
    """A step's text on one line, for a lane: newlines shown as a return sign, control characters escaped."""
    return printable(text.replace("\r", "").replace("\n", "\u21b5"))


class Lanes:
    """The live view. On a TTY: one line per worker, rewritten in place (ANSI), finished steps printed above
    them. Otherwise: finished steps as plain lines prefixed with their writer's name."""

    def __init__(self, names: list[str], out, live: bool):
        self.names = [printable(n) for n in names]  # names come from users: shown, never driving the terminal
        self.out, self.live = out, live
        self.text = [""] * len(names)
        self.width = max(len(n) for n in self.names)
        self.drawn = False
        self.last = 0.0

    def token(self, worker: int, token_id: int, text: str) -> None:
        self.text[worker] += text
        if self.live and time.monotonic() - self.last > 0.05:
            self.draw()

    def step(self, step: Step) -> None:
        self.text[step.worker] = ""
        self.print_step(step, "")

    def print_step(self, step: Step, note: str) -> None:
        self.clear()
        lines = [printable(line) for line in step.text.splitlines() if line.strip()] or [""]
        lines[-1] += note
        for line in lines:
            print(f"{self.names[step.worker]:>{self.width}} | {line}", file=self.out)
        if self.live:
            self.draw()
        self.out.flush()

    def clear(self) -> None:
        if self.live and self.drawn:
            self.out.write(f"\x1b[{len(self.names)}F\x1b[J")  # to the first lane's line, erase to the end
            self.drawn = False

    def draw(self) -> None:
        self.clear()
        cols = shutil.get_terminal_size((100, 20)).columns
        room = max(10, cols - self.width - 4)
        for name, text in zip(self.names, self.text):
            shown = one_line(text)
            if len(shown) > room:
                shown = "\u2026" + shown[-(room - 1):]
            self.out.write(f"{name:>{self.width}} \u2502 {shown}\n")
        self.out.flush()
        self.drawn, self.last = True, time.monotonic()

    def close(self) -> None:
        self.clear()
        self.out.flush()


def summary(result: HogwildResult) -> list[str]:
    """The answer and the counts, as printed after the run."""
    s = result.stats
    lines = []
    if result.answer is not None:
        lines.append(f"answer: {printable(result.answer)}")
    else:
        lines.append(f"answer: none found (stopped: {result.stopped})")
    if result.final_text is not None:
        lines.append(f"finisher: {one_line(result.final_text.strip())}")
    per = "/".join(str(n) for n in s.tokens_per_worker)
    kv = s.kv
    lines.append(f"stopped: {result.stopped} | {len(result.names)} workers | {sum(s.tokens_per_worker)} tokens "
                 f"({per}) | {s.steps_finished} steps finished | {s.check_ins} check-ins ({s.redundant} yes) | "
                 f"{s.rounds} rounds, {s.forward_passes} forward passes | {s.seconds:.1f} s")
    if kv:
        tiers, size = kv["tiers"], kv["bytes"]
        lines.append(f"KV: history {kv['history']} + headers {kv['headers']} + steps {sum(kv['steps'])} tokens, "
                     f"each stored once | all layers: device {tiers['device']} / host {tiers['host']} / disk "
                     f"{tiers['disk']} tokens, {sum(size.values()) / 2**20:.1f} MiB")
    return lines


def run(args: argparse.Namespace) -> int:
    from ..qa import QAError, load

    template = check_arguments(args)
    try:
        tokenizer, model = load(args.model, args.dtype, args.device)
    except QAError as err:
        raise HogwildCLIError(str(err)) from None
    names = template.worker_names(args.workers)
    out = sys.stdout
    lanes = Lanes(names, out, live=out.isatty() and os.environ.get("TERM") != "dumb")
    sample = args.temperature > 0
    try:
        result = generate(model, tokenizer, args.problem, workers=args.workers, max_new_tokens=args.max_new_tokens,
                          do_sample=sample, temperature=args.temperature if sample else 1.0, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed, check_in_every=args.check_in_every or None,
                          on_token=lanes.token, on_step=lanes.step, template=template,
                          history_options=budget_tokens(args, model))
    finally:
        lanes.close()
    for step in result.open_steps:
        lanes.print_step(step, " (unfinished)")
    lanes.close()
    for line in summary(result):
        print(line, file=out)
    if args.json is not None:
        record = {"model": args.model, "problem": args.problem, **result.as_dict()}
        write_file(args.json, json.dumps(record, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command("kvtier hogwild", run, build_parser().parse_args(argv))
