"""`kvtier qa`: load a long document once, then answer questions about it, on your own machine.

The first run prefills the document (in segments, with a progress bar) into a store; later runs with the
same model and document reopen the store and answer at once. Without --question it is an interactive
loop (one question per line; an empty line or EOF ends it).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .cache import KVTierCache, cache_argument
from .cli import error_line, printable
from .config import KVTierConfig
from .errors import (
    CacheInputError,
    IncompleteSessionError,
    KVTierError,
    PromptMismatchError,
    StoreCorruptError,
    StoreMismatchError,
)
from .model_spec import ModelSpec
from .prefill import prefill
from .sizes import parse_budget, parse_sparse_budget, split_budget
from .store.disk import is_store

PLACEHOLDER = "\u2063KVTIER-QUESTION\u2063"  # invisible separator: never in a real document
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# files a saved tokenizer leaves in a model directory (one of them at least)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
# what the hub accepts as a model id ("gpt2", "Qwen/Qwen2.5-7B-Instruct"); anything else can only be a path
HUB_ID = re.compile(r"[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9_])?(?:/[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9_])?)?")


class QAError(Exception):
    """A problem worth one line to the user, not a traceback."""


def default_store_root() -> Path:
    return Path(os.environ.get("KVTIER_HOME", Path.home() / ".cache" / "kvtier")) / "qa"


@dataclass
class Prompt:
    prefix_ids: torch.Tensor  # [1, n]: everything up to the question (the part that is stored)
    suffix_text: str  # what follows the question (chat template end, generation prompt)
    template: str  # "chat" or "plain"


def build_prompt(tokenizer, document: str, use_chat: bool) -> Prompt:
    """Split the model's prompt into a document prefix (prefilled once) and a per-question suffix."""
    if use_chat and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": f"{document}\n\nQuestion: {PLACEHOLDER}"}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prefix, suffix = text.split(PLACEHOLDER)
        ids = tokenizer(prefix, add_special_tokens=False, return_tensors="pt").input_ids
        return Prompt(ids, suffix, "chat")
    ids = tokenizer(f"{document}\n\nQuestion: ", return_tensors="pt").input_ids
    return Prompt(ids, "\nAnswer:", "plain")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load(model_id: str, dtype: str, device: str):
    """Tokenizer and model, each failure named for what it is (no model, no tokenizer, not a causal LM)."""
    import transformers as tf

    tf.logging.set_verbosity_error()
    tf.logging.disable_progress_bar()
    local = Path(model_id)
    if local.is_file():
        raise QAError(f"{model_id} is not a causal language model kvtier can load (a file; pass the directory "
                      "that holds the model's config.json, weights and tokenizer)")
    if not local.exists() and not HUB_ID.fullmatch(model_id):
        raise QAError(f"model not found: there is no directory {model_id}; pass a local model directory or "
                      "a hub id (Qwen/Qwen2.5-7B-Instruct)")
    try:
        tf.AutoConfig.from_pretrained(model_id)
    except Exception as exc:  # noqa: BLE001 - whatever transformers raises, the user needs one line
        if not local.exists():
            raise QAError(f"{model_id}: no local directory of that name, and the hub did not provide it "
                          f"({_first_line(exc)})") from None
        raise QAError(f"{model_id} is not a causal language model kvtier can load ({_first_line(exc)})") from None
    if local.is_dir() and not any((local / name).exists() for name in TOKENIZER_FILES):
        raise QAError(f"{model_id} holds no tokenizer (no {' or '.join(TOKENIZER_FILES[:2])}); save the model's "
                      "tokenizer into that directory: tokenizer.save_pretrained(DIR)")
    try:
        tokenizer = tf.AutoTokenizer.from_pretrained(model_id)
    except Exception as exc:  # noqa: BLE001
        raise QAError(f"could not load the tokenizer of {model_id} ({_first_line(exc)})") from None
    try:
        torch_dtype = "auto" if dtype == "auto" else DTYPES[dtype]
        model = tf.AutoModelForCausalLM.from_pretrained(model_id, dtype=torch_dtype).to(device).eval()
    except Exception as exc:  # noqa: BLE001
        raise QAError(f"{model_id} is not a causal language model kvtier can load ({_first_line(exc)})") from None
    if dtype == "auto" and device == "cpu" and model.dtype in (torch.float16, torch.bfloat16):
        model = model.float()  # half precision matmuls are slow or missing on CPUs
    return tokenizer, model


def check_device(name: str) -> None:
    """Refuse a device this machine does not have, before anything is loaded onto it."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise QAError(f"--device {name}: not a device name (cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise QAError(f"--device {name}: CUDA is not available ({why}); pass --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise QAError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                          f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise QAError(f"--device {name}: MPS is not available on this machine; pass --device cpu")


def check_arguments(args: argparse.Namespace) -> None:
    """Everything about the arguments that can be checked before a model is loaded or a store touched."""
    check_device(args.device)
    if args.max_new_tokens < 1:
        raise QAError(f"--max-new-tokens {args.max_new_tokens}: an answer needs at least 1 new token")
    if args.segment_tokens < 1:
        raise QAError(f"--segment-tokens {args.segment_tokens}: a prefill segment needs at least 1 token")
    if args.question is not None and not args.question.strip():
        raise QAError("--question is empty: ask something, or leave --question out to type questions one per line")
    try:
        sparse_budget = parse_sparse_budget(args.sparse_budget)
    except ValueError as exc:
        raise QAError(f"--sparse-budget: {exc}") from None
    tokens: dict[str, int | None] = {"device_budget": None, "host_budget": None}
    for flag, text in (("--device-budget", args.device_budget), ("--host-budget", args.host_budget)):
        if text is None:
            continue
        try:
            number, unit = split_budget(text)
        except ValueError as exc:
            raise QAError(f"{flag}: {exc}") from None
        if unit == "":  # sizes become tokens once the model is known
            tokens[flag[2:].replace("-", "_")] = int(number)
    try:
        KVTierConfig(mode=args.mode, sparse_budget=sparse_budget, **tokens)
    except ValueError as exc:
        raise QAError(str(exc)) from None


def read_document(path: str) -> str:
    doc = Path(path)
    if not doc.is_file():
        raise QAError(f"document not found: {doc}")
    try:
        text = doc.read_text(errors="replace")
    except OSError as exc:
        raise QAError(f"cannot read the document: {error_line(exc)}") from None
    if not text.strip():
        raise QAError(f"document {doc} is empty; pass a text file that holds the document")
    return text


def store_problem(path: Path) -> str | None:
    """Why a store cannot be created or written at `path`, or None when nothing says it cannot."""
    place = path
    try:
        while not place.exists() and place.parent != place:
            place = place.parent
    except OSError as exc:  # a parent that cannot be searched
        return error_line(exc)
    if not place.is_dir():
        return f"{place} is not a directory"
    if not os.access(place, os.W_OK | os.X_OK):
        return f"{place} is not writable"
    return None


def check_store_place(args: argparse.Namespace) -> None:
    """Refuse an unwritable --store or $KVTIER_HOME before the model is loaded (and change nothing)."""
    if args.store:
        problem = store_problem(Path(args.store))
        if problem and Path(args.store).is_dir():
            raise QAError(f"cannot open the store {args.store}: {problem} (kvtier writes to a store even to reopen "
                          "it); make it writable or pass another --store")
        if problem:
            raise QAError(f"cannot keep the store in {args.store}: {problem}; pass --store DIR in a writable place")
        return
    root = default_store_root()
    problem = store_problem(root)
    if problem:
        raise QAError(f"cannot keep stores in {root}: {problem}; set KVTIER_HOME to a writable directory "
                      "or pass --store DIR")


class Session:
    """A document held in a kvtier store, and the questions asked about it."""

    def __init__(self, args: argparse.Namespace, tokenizer, model, document: str):
        self.args, self.tokenizer, self.model = args, tokenizer, model
        doc = Path(args.doc)
        self.document = document
        self.prompt = build_prompt(tokenizer, self.document, not args.no_chat_template)
        self.spec = ModelSpec.from_model(model)
        digest = hashlib.sha256(self.prompt.prefix_ids.numpy().tobytes()).hexdigest()
        self.info = {"document": str(doc.resolve()), "model": args.model,
                     "prefix_tokens": int(self.prompt.prefix_ids.shape[1]), "template": self.prompt.template}
        self.store = Path(args.store) if args.store else default_store_root() / f"{self.spec.signature[:12]}-{digest[:16]}"
        self.options = self._options()
        self.cache: KVTierCache | None = None
        self.prefill_s: float | None = None

    def _options(self) -> dict[str, Any]:
        """The cache options, checked in full (budgets as sizes need the model) before any store is touched."""
        a = self.args
        opts: dict[str, Any] = {"mode": a.mode}
        for flag, name, text in (("--device-budget", "device_budget", a.device_budget),
                                 ("--host-budget", "host_budget", a.host_budget)):
            if text is not None:
                try:
                    opts[name] = parse_budget(text, self.spec)
                except ValueError as exc:
                    raise QAError(f"{flag}: {exc}") from None
        if a.mode == "sparse" and a.sparse_budget is not None:
            opts["sparse_budget"] = parse_sparse_budget(a.sparse_budget)
        KVTierConfig(**opts)  # ValueError (one line) names the option and its allowed range
        return opts

    def open(self) -> KVTierCache:
        """Reopen the stored document, or prefill it (first run, --rebuild, or an interrupted prefill)."""
        try:
            return self._open()
        except (StoreMismatchError, StoreCorruptError) as exc:  # another model or version, a damaged store
            raise QAError(f"{exc}; pass --rebuild to prefill the document again, or another --store") from None
        except OSError as exc:
            raise QAError(f"cannot use the store {self.store}: {error_line(exc)}; pass --store DIR in a "
                          "writable place") from None

    def _open(self) -> KVTierCache:
        if is_store(self.store) and not self.args.rebuild:
            try:
                # The session must hold exactly this document's tokens: the check names where they diverge.
                cache = KVTierCache.open(self.store, self.model, prompt_ids=self.prompt.prefix_ids, **self.options)
            except IncompleteSessionError:
                print(f"kvtier: the prefill stored in {printable(self.store)} never finished; starting over",
                      file=sys.stderr)
            except PromptMismatchError as exc:
                raise QAError(f"store {self.store} holds another document ({exc}); pass another --store or "
                              "--rebuild") from None
            else:
                try:
                    cache.warm()  # reads records: a damaged one is found here
                except BaseException:
                    cache.close()
                    raise
                return cache
        return self._prefill()

    def _prefill(self) -> KVTierCache:
        cache = KVTierCache.for_model(self.model, store_path=self.store, overwrite=True, **self.options)
        n = self.prompt.prefix_ids.shape[1]
        print(f"kvtier: prefilling {n} tokens of {printable(self.args.doc)} into {printable(self.store)}",
              file=sys.stderr)
        t = time.perf_counter()
        prefill(self.model, cache, self.prompt.prefix_ids.to(self.model.device), segment_tokens=self.args.segment_tokens,
                progress=not self.args.quiet)
        self.prefill_s = time.perf_counter() - t
        cache.save(info=self.info)
        return cache

    def ask(self, question: str) -> str:
        if self.cache is None:
            self.cache = self.open()
        cache, tok, model = self.cache, self.tokenizer, self.model
        q_ids = tok(question + self.prompt.suffix_text, add_special_tokens=False, return_tensors="pt").input_ids
        ids = torch.cat([self.prompt.prefix_ids, q_ids], dim=1).to(model.device)
        streamer = _TimedStreamer(tok, quiet=self.args.quiet)
        t0 = time.perf_counter()
        try:
            out = model.generate(input_ids=ids, max_new_tokens=self.args.max_new_tokens, do_sample=False,
                                 streamer=streamer, pad_token_id=tok.pad_token_id or tok.eos_token_id,
                                 **{cache_argument(model): cache})
        except (StoreMismatchError, StoreCorruptError) as exc:  # a record read while answering
            raise QAError(f"{exc}; pass --rebuild to prefill the document again, or another --store") from None
        elapsed = time.perf_counter() - t0
        answer_ids = out[0, ids.shape[1]:]
        answer = tok.decode(answer_ids, skip_special_tokens=True)
        self._summary(ids.shape[1], len(answer_ids), streamer.first_token_s(t0), elapsed)
        self._rewind(len(q_ids[0]) + len(answer_ids))
        return answer

    def _rewind(self, n_added: int) -> None:
        """Back to the stored document for the next question (reopen if a sliding layer cannot crop)."""
        try:
            self.cache.crop(self.info["prefix_tokens"] - self.cache.get_seq_length())
        except CacheInputError:
            self.cache.close()
            self.cache = None

    def _summary(self, context: int, new: int, ttft: float | None, elapsed: float) -> None:
        s = self.cache.stats()
        decode_s = elapsed - (ttft or 0.0)
        rate = (new - 1) / decode_s if new > 1 and decode_s > 0 else 0.0
        parts = [f"context {context} tokens"]
        if self.prefill_s is not None:
            parts.append(f"prefill {self.prefill_s:.1f} s")
            self.prefill_s = None
        parts.append(f"first token {ttft:.2f} s" if ttft is not None else "no tokens")
        parts.append(f"{rate:.1f} tok/s")
        parts.append(f"tiers device {s.device.tokens} / host {s.host.tokens} / disk {s.disk.tokens} tokens")
        print(f"\n[{' | '.join(parts)}]", file=sys.stderr)

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()


class _TimedStreamer:
    """Prints tokens as they come (unless quiet) and remembers when the first one arrived."""

    def __init__(self, tokenizer, quiet: bool):
        from transformers import TextStreamer

        self._inner = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self._quiet = quiet
        self._prompt_seen = False
        self.first_at: float | None = None

    def put(self, value) -> None:
        if not self._prompt_seen:  # generate first sends the prompt
            self._prompt_seen = True
        elif self.first_at is None:
            self.first_at = time.perf_counter()
        if not self._quiet:
            self._inner.put(value)

    def end(self) -> None:
        if not self._quiet:
            self._inner.end()

    def first_token_s(self, t0: float) -> float | None:
        return None if self.first_at is None else self.first_at - t0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="local directory or hub id of a causal LM")
    p.add_argument("--doc", required=True, help="text file holding the document")
    p.add_argument("--question", help="ask this and exit (default: read questions from stdin)")
    p.add_argument("--store", help="store directory (default: one per model and document under "
                                   "$KVTIER_HOME/qa, ~/.cache/kvtier/qa)")
    p.add_argument("--device-budget", help="KV kept on the device: tokens per layer (8192) or a size (8GiB)")
    p.add_argument("--host-budget", help="KV kept in CPU memory: tokens per layer or a size")
    p.add_argument("--mode", choices=["exact", "sparse"], default="sparse",
                   help="attention while answering (the prefill is always exact)")
    p.add_argument("--sparse-budget", default="0.05",
                   help="sparse mode: tokens per step (256), a share of the context (0.05) or a percentage (5%%)")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="model dtype (auto: the checkpoint's, float32 on a CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the model runs (default: cuda when available)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest answer")
    p.add_argument("--segment-tokens", type=int, default=2048, help="prefill segment length")
    p.add_argument("--no-chat-template", action="store_true", help="plain text prompt even if a template exists")
    p.add_argument("--rebuild", action="store_true", help="prefill again even if the store exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar, answers printed whole")


def run(args: argparse.Namespace) -> int:
    check_arguments(args)  # cheap checks first: nothing is loaded or written before they pass
    document = read_document(args.doc)
    check_store_place(args)
    tokenizer, model = load(args.model, args.dtype, args.device)
    session = Session(args, tokenizer, model, document)
    try:
        if args.question is not None:
            answer = session.ask(args.question)
            if args.quiet:
                print(answer)
            return 0
        interactive = sys.stdin.isatty()
        while True:
            if interactive:
                print("question> ", end="", flush=True, file=sys.stderr)
            line = sys.stdin.readline()
            if not line or not line.strip():
                return 0
            answer = session.ask(line.strip())
            if args.quiet:
                print(answer, flush=True)
    finally:
        session.close()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvtier qa", description=__doc__)
    add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (QAError, KVTierError, ValueError, OSError) as exc:
        print(f"kvtier qa: error: {error_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nkvtier qa: interrupted", file=sys.stderr)
        return 130
