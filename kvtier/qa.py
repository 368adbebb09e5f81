"""`kvtier qa`: load a long document once, then answer questions about it, on your own machine.

The first run prefills the document (in segments, with a progress bar) into a store; later runs with the
same model and document reopen the store and answer at once. The session is saved after every completed
segment, so an interrupted prefill (Ctrl-C, a crash, a closed laptop) resumes from the last segment when the
same command runs again. Without --question it is an interactive loop (one question per line; an empty line
or EOF ends it).

Answers are exact by default, as with the API (KVTierConfig's mode): the same tokens the model gives with a
full cache. --mode sparse reads only a budget of the document's chunks per step: faster on long documents
whose KV lives on disk, approximate.

With --remote redis://host:6379/0 several machines share one prefill through a Redis/Valkey server: before
prefilling, kvtier qa looks there for the document's session (named from the model, its dtype and the
document's tokens) and, if one is published, answers from it, reading its records on demand into the local
store directory; otherwise it prefills here and publishes the session when the prefill is complete.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import sys
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .cache import KVTierCache, cache_argument
from .cli import error_line
from .cli_args import (Interrupted, UsageError, budget_tokens, check_device, check_text, check_utf8,
                       run_command)
from .chat import apply_chat_template, has_chat_template
from .config import KVTierConfig
from .errors import (
    CacheInputError,
    IncompleteSessionError,
    PromptMismatchError,
    RemoteStoreError,
    SessionExistsError,
    StoreCorruptError,
    StoreError,
    StoreFullError,
    StoreMismatchError,
    printable,
)
from .kernels.native import kvtier_home
from .model_spec import ModelSpec
from .segmented import prefill
from .sizes import parse_sparse_budget
from .store.codec import dtype_name
from .store.disk import DiskStore, is_store
from .store.remote import REMOTE_META, RedisServer, RemoteURL, read_pointer

PLACEHOLDER = "\u2063KVTIER-QUESTION\u2063"  # invisible separator: never in a real document
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# files a saved tokenizer leaves in a model directory (one of them at least)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
# the API's defaults (KVTierConfig), also the command line's: one default mode everywhere
DEFAULT_MODE = next(f.default for f in dataclasses.fields(KVTierConfig) if f.name == "mode")
DEFAULT_SPARSE_BUDGET = next(f.default for f in dataclasses.fields(KVTierConfig) if f.name == "sparse_budget")
# what the hub accepts as a model id ("gpt2", "Qwen/Qwen2.5-7B-Instruct"); anything else can only be a path
HUB_ID = re.compile(r"[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9_])?(?:/[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9_])?)?")


class QAError(UsageError):
    """A problem worth one line to the user, not a traceback."""


def default_store_root() -> Path:
    return kvtier_home() / "qa"


@dataclass
class Prompt:
    prefix_ids: torch.Tensor  # [1, n]: everything up to the question (the part that is stored)
    suffix_text: str  # what follows the question (chat template end, generation prompt)
    template: str  # "chat" or "plain"


def build_prompt(tokenizer, document: str, use_chat: bool) -> Prompt:
    """Split the model's prompt into a document prefix (prefilled once) and a per-question suffix."""
    if use_chat and has_chat_template(tokenizer):
        text = apply_chat_template(tokenizer, f"{document}\n\nQuestion: {PLACEHOLDER}", tokenize=False,
                                   way_around="--no-chat-template writes the prompt as plain text")
        if text.count(PLACEHOLDER) != 1:  # the question must go where the template put the message, once
            raise ValueError("the tokenizer's chat template does not write the message as given (it must hold the "
                             "question's place once); --no-chat-template writes the prompt as plain text")
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

    check_text("--model", model_id, "a local model directory or a hub id (Qwen/Qwen2.5-7B-Instruct)")
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
    if dtype == "auto" and torch.device(device).type == "cpu" and model.dtype in (torch.float16, torch.bfloat16):
        model = model.float()  # half precision matmuls are slow or missing on CPUs
    return tokenizer, model


def check_arguments(args: argparse.Namespace) -> None:
    """Everything about the arguments that can be checked before a model is loaded or a store touched."""
    check_text("--model", args.model, "a local model directory or a hub id (Qwen/Qwen2.5-7B-Instruct)")
    check_text("--doc", args.doc, "the text file that holds the document")
    check_text("--store", args.store, "a store directory, or leave --store out for one under $KVTIER_HOME/qa")
    check_utf8("--store", args.store)  # the path goes into the session's UTF-8 records
    check_device(args.device)
    if args.max_new_tokens < 1:
        raise QAError(f"--max-new-tokens {args.max_new_tokens}: an answer needs at least 1 new token")
    if args.segment_tokens < 1:
        raise QAError(f"--segment-tokens {args.segment_tokens}: a prefill segment needs at least 1 token")
    if args.question is not None and not args.question.strip():
        raise QAError("--question is empty: ask something, or leave --question out to type questions one per line")
    check_utf8("--question", args.question)
    if args.mode != "sparse":  # a sparse option in exact mode would be silently ignored
        for flag, given in (("--sparse-budget", args.sparse_budget is not None),
                            ("--shared-selection", args.shared_selection)):
            if given:
                raise QAError(f"{flag} applies to sparse mode only; add --mode sparse (the default mode, "
                              f"{DEFAULT_MODE}, attends to every chunk)")
    try:
        sparse_budget = DEFAULT_SPARSE_BUDGET if args.sparse_budget is None else parse_sparse_budget(args.sparse_budget)
    except ValueError as exc:
        raise QAError(f"--sparse-budget: {exc}") from None
    tokens = budget_tokens(args)  # sizes become tokens once the model is known
    try:
        KVTierConfig(mode=args.mode, sparse_budget=sparse_budget, **tokens)
    except ValueError as exc:
        raise QAError(str(exc)) from None
    if args.remote is not None:
        try:
            url = RemoteURL.parse(args.remote)
        except CacheInputError as exc:  # names no credential: the URL parser's messages never quote it
            raise QAError(f"--remote: {exc}") from None
        if url.name is not None:
            raise QAError(f"--remote {url.shown}: name the server alone (redis://host:6379/0, ?prefix=P for a key "
                          "prefix); kvtier qa names each document's session itself")


def check_server(args: argparse.Namespace) -> None:
    """Reach the --remote server and pass its authentication before the model is loaded: a wrong host or
    password is one line in a second, not after minutes of loading."""
    if args.remote is None:
        return
    server = RedisServer(RemoteURL.parse(args.remote))
    try:
        with server.errors("connect"):
            server.client.ping()
    finally:
        server.close()


def session_url(server: str, name: str) -> str:
    """The --remote URL (credentials and query kept) with the session's name appended: redis://h:6379/0/NAME."""
    parts = urllib.parse.urlsplit(server)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{parts.path.strip('/') or '0'}/{name}"))


def cached_session(path: Path) -> dict[str, Any] | None:
    """Which server session the store at `path` is a local cache of (`kvtier qa --remote` keeps one there
    when it answers from a server), or None: a store of its own, or one that cannot be read here."""
    try:
        disk = DiskStore(path, create=False, readonly=True)
    except (StoreError, OSError):
        return None
    try:
        held = disk.get_meta(REMOTE_META)
    except StoreError:
        held = None
    finally:
        disk.close()
    return held if isinstance(held, dict) else None


def read_document(path: str) -> str:
    doc = Path(path)
    if doc.is_dir():
        raise QAError(f"--doc {doc} is a directory; pass the text file that holds the document")
    if doc.exists() and not doc.is_file():  # a FIFO would block the read, a device never end it
        raise QAError(f"--doc {doc} is not a regular file (a pipe, socket or device); pass the text file that holds "
                      "the document")
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
            if place.is_symlink():  # a link whose target is missing: nothing could be created through it
                return f"{place} is a symbolic link to {os.readlink(place)}, which does not exist"
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
    """A document held in a kvtier store, and the questions asked about it.

    The store is prefilled in segments and saved after each one (a checkpoint: `KVTierCache.save` commits
    atomically, so an interruption leaves the last checkpoint readable). A later run reopens the session, and
    its token ids (checked with `check_prompt`) prove it holds the start of this document's prompt: the
    prefill goes on from where it stopped, or, once complete, questions are answered at once.
    """

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
        # --remote: the document's session on the server, named as the local store is (model, dtype, tokens).
        # _remote_url is the user's URL, credentials included: it connects and is never printed.
        self.remote: RemoteURL | None = None
        self._remote_url: str | None = None
        self._said_unusable = False  # the server's session for this document was found damaged (said once)
        if args.remote is not None:
            name = f"qa-{dtype_name(self.spec.dtype)}-{self.spec.signature[:16]}-{digest[:32]}"
            self._remote_url = session_url(args.remote, name)
            self.remote = RemoteURL.parse(self._remote_url)
        self.options = self._options()
        self.cache: KVTierCache | None = None
        self.source: str | None = None  # where the open session came from: "prefill", "store" or "server"
        self.prefill_s: float | None = None  # this run's prefill, reported with the first answer
        self.resumed_at: int | None = None  # the token a resumed prefill started from
        self.reopen_s: float | None = None  # reopening the stored session for the next question

    def _options(self) -> dict[str, Any]:
        """The cache options, checked in full (budgets as sizes need the model) before any store is touched."""
        a = self.args
        opts: dict[str, Any] = {"mode": a.mode, **budget_tokens(a, self.model)}
        if a.mode == "sparse":
            if a.sparse_budget is not None:
                opts["sparse_budget"] = parse_sparse_budget(a.sparse_budget)
            if a.shared_selection:
                opts["shared_selection"] = True
        KVTierConfig(**opts)  # ValueError (one line) names the option and its allowed range
        return opts

    def open(self) -> KVTierCache:
        """Reopen the stored document, resume its interrupted prefill, or prefill it (first run, --rebuild)."""
        try:
            return self._open()
        except (StoreMismatchError, StoreCorruptError) as exc:  # another model or version, a damaged store
            raise QAError(f"{exc}; pass --rebuild to prefill the document again, or another --store") from None
        except OSError as exc:
            raise QAError(f"cannot use the store {self.store}: {error_line(exc)}; pass --store DIR in a "
                          "writable place") from None

    def _open(self) -> KVTierCache:
        """A session of this store first, then (--remote) the server's, else a prefill here."""
        if self.args.rebuild:
            return self._prefill(None)
        if is_store(self.store):
            cached = cached_session(self.store)
            if cached is None:
                cache = self._reopen()
                if cache is not None:
                    return cache
            elif self.remote is None:
                raise QAError(f"store {self.store} is the local cache of a session read from a server "
                              f"({printable(cached.get('name'))}); pass the same --remote URL to answer from it, "
                              "or --rebuild to prefill here")
        if self.remote is not None:
            cache = self._from_server()
            if cache is not None:
                return cache
        return self._prefill(None)

    @property
    def address(self) -> str | None:
        """The document's session on the server, as messages and --json name it (no credentials)."""
        return None if self.remote is None else self.remote.shown

    def _published(self) -> bool | None:
        """Whether the server holds this document's session. None where its pointer is damaged or of another
        kvtier version (said once): this run neither reads it nor publishes over it, and answers from a session
        of its own; --rebuild could not help, only unpublishing the name."""
        server = RedisServer(self.remote)
        try:
            return read_pointer(server, self.remote.name) is not None
        except (StoreCorruptError, StoreMismatchError) as exc:
            if not self._said_unusable:
                self._said_unusable = True
                print(f"kvtier: {error_line(exc)}; answering from this machine's own session, not published "
                      "over it (remove it with kvtier.unpublish(URL), or choose another ?prefix=)", file=sys.stderr)
            return None
        finally:
            server.close()

    def _from_server(self) -> KVTierCache | None:
        """The document's session published on the server, its records read on demand into the store directory
        (kept there: a later question or run reads nothing twice); None when none is published.

        A session opened from a server is never saved back (`KVTierCache.save` refuses): it is only read, and a
        rewind between questions drops what the answer added, here as for a local store."""
        published = self._published()
        if not published:
            if published is False:
                print(f"kvtier: no session of this document on {printable(self.address)} yet", file=sys.stderr)
            return None
        if is_store(self.store) and cached_session(self.store) is None:
            # a prefill of this store that this run does not use (unfinished, or replaced by the published
            # session): the directory becomes the published session's local cache
            DiskStore(self.store, create=True, wipe=True).close()
        started = time.perf_counter()
        cache = KVTierCache.open(self._remote_url, self.model, store_path=self.store, **self.options)
        try:
            try:
                cache.check_prompt(self.prompt.prefix_ids)
            except PromptMismatchError as exc:
                raise QAError(f"the session {self.address} holds another document ({exc}); pass --rebuild to "
                              "prefill here") from None
            if cache.get_seq_length() < self.info["prefix_tokens"]:
                raise QAError(f"the session {self.address} holds only the first {cache.get_seq_length()} of "
                              f"{self.info['prefix_tokens']} tokens of this document; pass --rebuild to prefill here")
            cache.warm()  # reads the records the tiers hold from the server: a missing or damaged one shows here
        except BaseException:
            cache.close()
            raise
        self.reopen_s = time.perf_counter() - started
        self.source = "server"
        print(f"kvtier: answering from the session published on {printable(self.address)} (no prefill; records "
              f"are cached in {printable(self.store)})", file=sys.stderr)
        return cache

    def _publish_if_missing(self, cache: KVTierCache) -> None:
        """A finished local session that the server lacks (prefilled without --remote, or its publish failed)
        is published now; a server that fails here is said, and the local session answers."""
        try:
            published = self._published()
        except RemoteStoreError as exc:
            print(f"kvtier: answering from {printable(self.store)}; cannot look up {printable(self.address)} "
                  f"({error_line(exc)})", file=sys.stderr)
            return
        if published is False:
            self._publish(cache, None)

    def _publish(self, cache: KVTierCache, info: dict[str, Any] | None) -> None:
        """Save the session and publish it on the server. A name another machine took meanwhile, or a server
        that fails, is said and the answer goes on from this machine's session (saved locally either way)."""
        print(f"kvtier: publishing the session as {printable(self.address)}", file=sys.stderr)
        try:
            cache.save(info, remote=self._remote_url)
        except SessionExistsError:
            if self._published() is not None:  # else the damaged name was just said
                print(f"kvtier: {printable(self.address)} is already published (another machine published it "
                      "first); it stays, and this machine answers from its own prefill", file=sys.stderr)
        except RemoteStoreError as exc:  # the local save stands: only the publish failed
            print(f"kvtier: the session is saved in {printable(self.store)} but not published "
                  f"({error_line(exc)}); the next kvtier qa --remote publishes it", file=sys.stderr)

    def _reopen(self) -> KVTierCache | None:
        """The stored session, ready to answer, or resumed and completed; None: start over (said why)."""
        started = time.perf_counter()
        try:
            cache = KVTierCache.open(self.store, self.model, **self.options)
        except IncompleteSessionError:
            print(f"kvtier: the prefill stored in {printable(self.store)} stopped before its first segment was "
                  "saved; starting over", file=sys.stderr)
            return None
        try:
            try:
                # The session must hold the start of exactly this document's prompt: its token ids prove it.
                cache.check_prompt(self.prompt.prefix_ids)
            except PromptMismatchError as exc:
                if cache.info.get("prefill") != "partial":  # a finished store of something else: not ours to wipe
                    raise QAError(f"store {self.store} holds another document ({exc}); pass another --store or "
                                  "--rebuild") from None
                print(f"kvtier: the unfinished prefill in {printable(self.store)} is not this document's ({exc}); "
                      "starting over", file=sys.stderr)
                cache.close()
                return None
            if cache.get_seq_length() < self.info["prefix_tokens"]:
                if self.remote is not None and self._published():
                    print(f"kvtier: {printable(self.address)} is published; reading it from there instead of "
                          f"resuming the prefill at token {cache.get_seq_length()}", file=sys.stderr)
                    cache.close()
                    return None
                return self._prefill(cache)
            cache.warm()  # reads records: a damaged one is found here
            self.reopen_s = time.perf_counter() - started
            self.source = "store"
            if self.remote is not None:
                self._publish_if_missing(cache)
        except BaseException:
            cache.close()
            raise
        return cache

    def _prefill(self, cache: KVTierCache | None) -> KVTierCache:
        """Prefill the document (or, given a reopened partial session, the rest of it), saving each segment.

        The prefill runs in sparse mode whatever the answering mode: it is exact either way, and sparse mode
        sizes the chunks by the attention skew it measures, a layout that serves both modes (exact attention
        reads every chunk, whatever its size), so one store answers in either."""
        n = self.info["prefix_tokens"]
        if cache is None:
            cache = KVTierCache.for_model(self.model, store_path=self.store, overwrite=True,
                                          **{**self.options, "mode": "sparse"})
        done = saved = cache.get_seq_length()
        what = printable(self.args.doc)
        if done:
            self.resumed_at = done
            print(f"kvtier: resuming the prefill of {what} at token {done} of {n} in {printable(self.store)}",
                  file=sys.stderr)
        else:
            print(f"kvtier: prefilling {n} tokens of {what} into {printable(self.store)}", file=sys.stderr)
        seg, ids = self.args.segment_tokens, self.prompt.prefix_ids
        bar = tqdm(total=n, initial=done, unit="tok", unit_scale=True, desc="prefill", disable=self.args.quiet,
                   leave=False)
        started = time.perf_counter()
        try:
            for start in range(done, n, seg):
                end = min(n, start + seg)
                cache.set_mode("sparse")  # chunks planned from the measured skew; the prefill itself is exact
                prefill(self.model, cache, ids[:, start:end].to(self.model.device), segment_tokens=seg, progress=False)
                if end < n:  # a checkpoint: a rerun resumes here (the last segment's save is the final one)
                    cache.save(info={**self.info, "prefill": "partial"})
                    saved = end
                bar.update(end - start)
                bar.set_postfix_str(_progress_note(cache, end - done, time.perf_counter() - started))
            bar.close()  # before the lines the final save or publish prints, which would run onto the bar
            cache.set_mode(self.options["mode"])
            if self.remote is None:
                cache.save(info={**self.info, "prefill": "complete"})
            else:
                self._publish(cache, {**self.info, "prefill": "complete"})
        except KeyboardInterrupt:
            bar.close()
            complete = cache.info.get("prefill") == "complete"  # the final save ran: only a publish was cut short
            cache.close()
            if complete:
                more = "; the next kvtier qa --remote publishes it" if self.remote is not None else ""
                print(f"\nkvtier: interrupted after the prefill was saved: {printable(self.store)} holds all {n} "
                      f"tokens{more}", file=sys.stderr)
                raise Interrupted from None
            kept = f"its first {saved} of {n} tokens are saved" if saved else "no segment was saved yet"
            print(f"\nkvtier: prefill interrupted; {kept}: run the same command again to "
                  f"{'resume' if saved else 'start over'}", file=sys.stderr)
            raise Interrupted from None
        except StoreFullError as exc:  # the store holds the last checkpoint: say that room is all a rerun needs
            bar.close()
            cache.close()
            kept = (f"its first {saved} of {n} tokens are saved, and the same command resumes from there" if saved
                    else "no segment was saved yet; the same command starts over")
            raise QAError(f"prefill stopped: {error_line(exc)}; {kept} once there is room") from None
        except BaseException:
            bar.close()
            cache.close()
            raise
        bar.close()
        self.prefill_s = time.perf_counter() - started
        self.source = "prefill"
        return cache

    def ask(self, question: str) -> dict[str, Any]:
        """Answer `question`; returns the answer with its timings and where the KV was (see `_record`)."""
        if self.cache is None:
            self.cache = self.open()
        cache, tok, model = self.cache, self.tokenizer, self.model
        q_ids = tok(question + self.prompt.suffix_text, add_special_tokens=False, return_tensors="pt").input_ids
        ids = torch.cat([self.prompt.prefix_ids, q_ids], dim=1).to(model.device)
        streamer = _TimedStreamer(tok, quiet=self.args.quiet or self.args.json)
        t0 = time.perf_counter()
        try:
            if q_ids.shape[1] > self.args.segment_tokens:  # a long question goes in in segments, as the document
                # did: memory bounded by a segment, and Ctrl-C or SIGTERM heard between them. generate then feeds
                # its last token.
                prefill(model, cache, ids[:, cache.get_seq_length():-1], segment_tokens=self.args.segment_tokens,
                        progress=False)
            out = model.generate(input_ids=ids, max_new_tokens=self.args.max_new_tokens, do_sample=False,
                                 streamer=streamer, pad_token_id=tok.pad_token_id or tok.eos_token_id,
                                 **{cache_argument(model): cache})
        except (StoreMismatchError, StoreCorruptError) as exc:  # a record read while answering
            raise QAError(f"{exc}; pass --rebuild to prefill the document again, or another --store") from None
        elapsed = time.perf_counter() - t0
        answer_ids = out[0, ids.shape[1]:]
        answer = tok.decode(answer_ids, skip_special_tokens=True)
        record = self._record(question, answer, ids.shape[1], len(answer_ids), streamer.first_token_s(t0), elapsed)
        print(f"\n[{self._summary(record)}]", file=sys.stderr)
        self._rewind()
        return record

    def _rewind(self) -> None:
        """Back to the stored document for the next question (reopen if a sliding layer cannot crop)."""
        try:
            self.cache.crop(self.info["prefix_tokens"] - self.cache.get_seq_length())
        except CacheInputError:
            self.cache.close()
            self.cache = None

    def _record(self, question: str, answer: str, context: int, new: int, first: float | None,
                elapsed: float) -> dict[str, Any]:
        """What `--json` prints for one question. first_token_s is the time to first token as the user waits
        for it: from the question to the first answer token, the reopening of the store included when this
        question reopened it (reopen_s); a prefill is reported apart (prefill_s). source: where the session
        came from (this run's prefill, the local store, or the server), remote: its name on the server."""
        s = self.cache.stats()
        decode_s = elapsed - (first or 0.0)
        reopen_s, self.reopen_s = self.reopen_s, None
        prefill_s, self.prefill_s = self.prefill_s, None
        resumed_at, self.resumed_at = self.resumed_at, None
        return {
            "question": question, "answer": answer, "mode": self.options["mode"], "store": str(self.store),
            "context_tokens": context, "new_tokens": new, "prefill_s": prefill_s, "resumed_at": resumed_at,
            "reopen_s": reopen_s, "first_token_s": None if first is None else first + (reopen_s or 0.0),
            "tokens_per_s": (new - 1) / decode_s if new > 1 and decode_s > 0 else 0.0,
            "tiers": {"device": s.device.tokens, "host": s.host.tokens, "disk": s.disk.tokens},
            "source": self.source, "remote": self.address,
        }

    @staticmethod
    def _summary(r: dict[str, Any]) -> str:
        """The stderr line a person reads after each answer."""
        parts = [f"context {r['context_tokens']} tokens"]
        if r["prefill_s"] is not None:
            resumed = f" (resumed at token {r['resumed_at']})" if r["resumed_at"] else ""
            parts.append(f"prefill {r['prefill_s']:.1f} s{resumed}")
        if r["first_token_s"] is None:
            parts.append("no tokens")
        elif r["reopen_s"] is not None:
            where = " from the server" if r["source"] == "server" else ""
            parts.append(f"first token {r['first_token_s']:.2f} s (reopen{where} {r['reopen_s']:.2f} s + "
                         f"{r['first_token_s'] - r['reopen_s']:.2f} s)")
        else:
            parts.append(f"first token {r['first_token_s']:.2f} s")
        parts.append(f"{r['tokens_per_s']:.1f} tok/s")
        t = r["tiers"]
        parts.append(f"tiers device {t['device']} / host {t['host']} / disk {t['disk']} tokens")
        return " | ".join(parts)

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()


def _short(n: int) -> str:
    return f"{n / 1000:.1f}k" if n >= 1000 else str(n)


def _progress_note(cache: KVTierCache, tokens: int, seconds: float) -> str:
    """The progress bar's note: this run's prefill speed and where the KV sits."""
    s = cache.stats()
    rate = tokens / seconds if seconds > 0 else 0.0
    return (f"{rate:.0f} tok/s | device {_short(s.device.tokens)} host {_short(s.host.tokens)} "
            f"disk {_short(s.disk.tokens)}")


def shown(text: str) -> str:
    """A model's text as printed: its lines kept, every other control character (an escape sequence that would drive
    the terminal) escaped, as kvtier hogwild and kvtier tim print theirs."""
    return "\n".join(printable(line) for line in text.split("\n"))


class _TimedStreamer:
    """Prints tokens as they come (unless quiet), through `shown`, and remembers when the first one arrived."""

    def __init__(self, tokenizer, quiet: bool):
        from transformers import TextStreamer

        class Shown(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                super().on_finalized_text(shown(text), stream_end)

        self._inner = Shown(tokenizer, skip_prompt=True, skip_special_tokens=True)
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
    p.add_argument("--mode", choices=["exact", "sparse"], default=DEFAULT_MODE,
                   help=f"attention while answering (default {DEFAULT_MODE}, as in the API: the model's own answer, "
                        "equal to a full cache's; sparse reads a budget of chunks per step, faster on long documents "
                        "and approximate). The prefill is always exact, and one store serves both modes")
    p.add_argument("--sparse-budget",
                   help=f"sparse mode: tokens per step (256), a share of the context (0.05) or a percentage (5%%); "
                        f"default {DEFAULT_SPARSE_BUDGET}")
    p.add_argument("--shared-selection", action="store_true",
                   help="sparse mode: every KV head of a layer attends to the same chunks, so a step reads at most "
                        "the budget per layer (fewer reads when the KV lives on disk)")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="model dtype (auto: the checkpoint's, float32 on a CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the model runs (default: cuda when available)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest answer")
    p.add_argument("--segment-tokens", type=int, default=2048,
                   help="prefill segment length; the session is saved after each segment, and an interrupted "
                        "prefill resumes from the last one")
    p.add_argument("--no-chat-template", action="store_true", help="plain text prompt even if a template exists")
    p.add_argument("--remote", metavar="URL",
                   help="share prefills through a Redis/Valkey server: redis://[user:password@]host:6379/0"
                        "[?prefix=P] (rediss:// for TLS, valkey:// too). Before prefilling, look there for this "
                        "document's session (same model, dtype and document) and answer from it, its records "
                        "read on demand into --store as a cache; if none is published, prefill here and publish "
                        "it. Credentials are used to connect and never printed; KVTIER_REDIS_PASSWORD gives the "
                        "password to a URL without one")
    p.add_argument("--rebuild", action="store_true",
                   help="prefill again even if the store (or, with --remote, the server) has the document")
    p.add_argument("--quiet", action="store_true", help="no progress bar, answers printed whole")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per question on stdout (answer, prefill/reopen/first-token times, "
                        "tokens per tier) instead of the streamed answer")


def run(args: argparse.Namespace) -> int:
    check_arguments(args)  # cheap checks first: nothing is loaded or written before they pass
    document = read_document(args.doc)
    check_store_place(args)
    check_server(args)
    tokenizer, model = load(args.model, args.dtype, args.device)
    session = Session(args, tokenizer, model, document)

    def answer(question: str) -> None:
        record = session.ask(question)
        if args.json:
            print(json.dumps(record), flush=True)
        elif args.quiet:
            print(shown(record["answer"]), flush=True)

    try:
        if args.question is not None:
            answer(args.question)
            return 0
        interactive = sys.stdin.isatty()
        while True:
            if interactive:
                print("question> ", end="", flush=True, file=sys.stderr)
            line = sys.stdin.readline()
            if not line or not line.strip():
                return 0
            check_utf8("the question read from stdin", line)
            answer(line.strip())
    finally:
        session.close()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvtier qa", description=__doc__)
    add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    return run_command("kvtier qa", run, build_parser().parse_args(argv))
