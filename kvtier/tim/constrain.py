"""Schema-constrained decoding: at every step only the tokens that keep the text a prefix of a JSON document valid
under a schema (a TIM thread, `kvtier.tim.schema.thread_schema`) may be sampled.

Why xgrammar (0.2.9, `pip install xgrammar==0.2.9`). It is the structured-output engine that vLLM, SGLang and
TensorRT-LLM use, released often; its Linux x86-64 CPU wheel is 1.3 MB and, next to what kvtier already needs
(torch, transformers, numpy, pydantic, triton), adds only `apache-tvm-ffi`; torch is left as it is. It builds its
vocabulary view straight from a transformers tokenizer (byte-level BPE, SentencePiece byte fallback, tiktoken),
compiles a JSON Schema once (cached per compiler) into a pushdown automaton whose token masks are filled in C++,
and its matcher has exactly the verbs a runtime that injects text needs: a token bitmask, `accept_token` that
returns False instead of corrupting state, a jump-forward string (what the schema forces next) and rollback.
Whitespace is under control: `any_whitespace=False` with explicit separators gives one deterministic form.
The alternatives: llguidance (Rust, also behind vLLM and llama.cpp; 3 MB wheel, no dependencies) would do as
well, but its whitespace and separators are set through grammar options rather than json.dumps-style separators;
outlines 1.x compiles schemas to regular expressions via outlines-core and brings jinja2, cloudpickle, diskcache,
jsonschema, pillow and genson with it; lm-format-enforcer walks each candidate token's characters in Python, a
cost per step that grows with the vocabulary.

The text form the grammar accepts (and nothing else): one line, no whitespace between tokens of JSON except the
separators `", "` between items (array elements and object members) and `": "` between a key and its value,
exactly `json.dumps(value)`'s default form and `kvtier.tim.schema.JSON_SEPARATORS`. A runtime that injects a
tool result writes `, "tool_result": ` (or whatever part of it the model has not written yet: `forced_text()`)
followed by `ToolOutcome.result_json`, which uses the same separators.

Strings: one without maxLength may hold any character JSON allows, raw or escaped. One with maxLength (thoughts
and conclusions under `thread_schema(max_string_length=...)`) holds raw characters only, no escapes: xgrammar
0.2.9 spells it as a quote, at most n characters other than quote, backslash, CR and LF, and a quote.

Tokens never allowed: the tokenizer's special tokens (`<s>`, `<pad>`, chat markers), which xgrammar would
otherwise read as their literal text; tokens holding a control character (U+0000..U+001F), which are not JSON
raw and which that bounded-string rule would let in; and UTF-16 surrogates encoded as UTF-8 (ED A0..BF), which
xgrammar 0.2.9 lets into strings and a strict decoder turns into U+FFFD. Once the document is complete only the
stop tokens (the tokenizer's eos unless `stop_token_ids` says otherwise) are allowed.
"""

from __future__ import annotations

import math
import re
import threading
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from kvtier.errors import KVTierError, brief
from kvtier.tim.schema import JSON_SEPARATORS, dump_json

try:
    import xgrammar as xgr
except ImportError:  # an optional dependency: SchemaConstraint says how to install it
    xgr = None

INSTALL_HINT = "pip install xgrammar==0.2.9"


class ConstraintError(KVTierError, ValueError):
    """A token the schema does not allow was fed to a SchemaConstraint, or logits of the wrong shape."""


_XGRAMMAR_WHERE = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*")  # "[09:20:16] /project/cpp/x.cc:94: " before a message
_SURROGATE_LEAD = 0xED  # UTF-8 ED A0..BF encodes a UTF-16 surrogate (U+D800..U+DFFF): not text
_VOCABS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {(vocab size, stops): _Vocab}
_VOCABS_LOCK = threading.Lock()


@dataclass(frozen=True)
class _Vocab:
    """What every constraint over one tokenizer shares: xgrammar's compiler (which caches the grammars it compiled,
    so a schema is compiled once per tokenizer), the bytes of each token, and the tokens that would complete a
    surrogate after an ED byte."""

    compiler: Any  # xgr.GrammarCompiler
    pieces: list[bytes]  # [vocab]: the bytes each token stands for (b"" for tokens that never match)
    surrogate_tail: torch.Tensor  # bool [vocab]: the token starts with a byte in A0..BF


def _vocab(tokenizer: Any, vocab_size: int | None, stop_token_ids: tuple[int, ...] | None) -> _Vocab:
    key = (vocab_size, stop_token_ids)
    with _VOCABS_LOCK:
        per_tokenizer = _VOCABS.setdefault(tokenizer, {})
        if key not in per_tokenizer:
            info = _tokenizer_info(tokenizer, vocab_size, stop_token_ids)
            pieces = list(info.decoded_vocab)
            tail = torch.tensor([bool(p) and 0xA0 <= p[0] <= 0xBF for p in pieces], dtype=torch.bool)
            per_tokenizer[key] = _Vocab(xgr.GrammarCompiler(info), pieces, tail)
        return per_tokenizer[key]


def _tokenizer_info(tokenizer: Any, vocab_size: int | None, stop_token_ids: tuple[int, ...] | None):
    """xgrammar's view of the vocabulary with the tokens that may never appear emptied (xgrammar treats an empty token
    as one that never matches text): the tokenizer's special tokens, which xgrammar would otherwise match as their
    literal text (`<s>` as three characters), tokens holding a control character and tokens holding a surrogate."""
    base = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                              stop_token_ids=list(stop_token_ids) if stop_token_ids else None)
    vocab = [""] * base.vocab_size
    for piece, i in tokenizer.get_vocab().items():
        if i < base.vocab_size:
            vocab[i] = piece
    never = set(getattr(tokenizer, "all_special_ids", []))
    never |= {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
    # Control characters (U+0000..U+001F) never stand raw in JSON text of this form, but xgrammar 0.2.9's rule for a
    # string with maxLength (`[^"\\\r\n]{0,n}`) lets them into strings: json.loads would then refuse the thread.
    # Its UTF-8 check lets surrogates (ED A0..BF ..) through: a strict decoder turns them into U+FFFD, one a byte.
    never |= {i for i, piece in enumerate(base.decoded_vocab)
              if any(b < 0x20 for b in piece) or _has_surrogate(piece)}
    for i in never:
        if 0 <= i < base.vocab_size:
            vocab[i] = ""
    return xgr.TokenizerInfo(vocab, base.vocab_type, vocab_size=base.vocab_size, stop_token_ids=base.stop_token_ids,
                             add_prefix_space=base.add_prefix_space)


def _has_surrogate(piece: bytes) -> bool:
    return any(a == _SURROGATE_LEAD and 0xA0 <= b <= 0xBF for a, b in zip(piece, piece[1:]))


class SchemaConstraint:
    """Constrains one generation to JSON valid under `schema`, in the form described in the module docstring.

    vocab_size: the model's vocabulary (its lm_head width) when it differs from the tokenizer's; ids at or past the
        tokenizer's vocabulary are never allowed.
    stop_token_ids: the tokens allowed once the document is complete (default: the tokenizer's eos).

    Per step: `mask_logits(logits)`, sample, `accept(token)`; tokens the runtime forces (an injected tool result)
    go through `accept` too. `is_done()` turns True when the document is complete. Not thread-safe: one
    generation, one thread.
    """

    def __init__(self, tokenizer: Any, schema: dict, *, vocab_size: int | None = None,
                 stop_token_ids: list[int] | None = None) -> None:
        if xgr is None:
            raise ImportError(f"SchemaConstraint needs the xgrammar package: {INSTALL_HINT}")
        if not isinstance(schema, dict):
            raise ValueError(f"schema must be a JSON Schema dict, got {type(schema).__name__}")
        if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int)
                                       or vocab_size < 1):
            raise ValueError(f"vocab_size must be None or an int >= 1, got {brief(vocab_size)}")
        stops = tuple(int(i) for i in stop_token_ids) if stop_token_ids else None
        self._vocab = _vocab(tokenizer, vocab_size, stops)
        self.tokenizer = tokenizer
        self.schema = schema
        try:
            self.compiled = self._vocab.compiler.compile_json_schema(dump_json(schema), any_whitespace=False,
                                                                     separators=JSON_SEPARATORS, strict_mode=True)
        except RuntimeError as e:  # xgrammar refuses the schema: "[time] file.cc:94: <why>"
            why = _XGRAMMAR_WHERE.sub("", (str(e).strip().splitlines() or [type(e).__name__])[0])
            raise ConstraintError(f"xgrammar cannot compile the schema: {why} (see the tools' parameters)") from None
        self.vocab_size: int = self.compiled.tokenizer_info.vocab_size
        self.stop_token_ids: tuple[int, ...] = tuple(self.compiled.tokenizer_info.stop_token_ids)
        self._matcher = xgr.GrammarMatcher(self.compiled)
        self._bitmask = xgr.allocate_token_bitmask(1, self.vocab_size)  # int32 [1, ceil(vocab / 32)], on the CPU
        self._ids: list[int] = []
        self._last_byte = 0  # the last byte of the accepted text

    def mask_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Set the logits of every token the schema does not allow next to -inf, in place, and return `logits`.
        logits: [vocab] or [1, vocab] (any shape with one row), on any device, vocab >= self.vocab_size."""
        if logits.dim() == 0 or math.prod(logits.shape[:-1]) != 1:
            raise ConstraintError(f"mask_logits takes one row of logits ([vocab] or [1, vocab]), got "
                                  f"{tuple(logits.shape)}")
        width = logits.shape[-1]
        if width < self.vocab_size:
            raise ConstraintError(f"logits have {width} entries but the vocabulary has {self.vocab_size}; pass "
                                  "vocab_size=model.config.vocab_size to SchemaConstraint")
        if self._matcher.is_terminated():
            raise ConstraintError("the constrained document is complete and its stop token accepted; nothing may "
                                  "follow")
        self._matcher.fill_next_token_bitmask(self._bitmask)
        contiguous = logits.is_contiguous()  # xgrammar's CPU kernel reads rows as contiguous memory
        row = (logits if contiguous else logits.contiguous()).view(1, width)  # [1, vocab]
        if width > self.vocab_size:
            row[:, self.vocab_size:] = -math.inf  # padding of the model's vocabulary: no token lives there
        xgr.apply_token_bitmask_inplace(row, self._bitmask.to(row.device, non_blocking=True),
                                        vocab_size=self.vocab_size)
        if self._last_byte == _SURROGATE_LEAD:  # xgrammar would let a surrogate be completed
            row[0, :self.vocab_size].masked_fill_(self._vocab.surrogate_tail.to(row.device), -math.inf)
        if not contiguous:
            logits.copy_(row.view(logits.shape))
        return logits

    def accept(self, token_id: int) -> None:
        """Advance past `token_id` (sampled or forced). Raises ConstraintError, leaving the state as it was, when
        the schema does not allow the token here."""
        tid = int(token_id)
        if self._matcher.is_terminated():
            raise ConstraintError(f"token {tid} came after the constrained document was complete and its stop "
                                  "token accepted")
        if not 0 <= tid < self.vocab_size:
            raise ConstraintError(f"token {tid} is outside the vocabulary of {self.vocab_size} tokens")
        surrogate = self._last_byte == _SURROGATE_LEAD and bool(self._vocab.surrogate_tail[tid])
        if surrogate or not self._matcher.accept_token(tid):
            why = "would complete a UTF-16 surrogate, which is not text" if surrogate else "is not allowed by the schema"
            raise ConstraintError(f"token {tid} ({self._piece(tid)!r}) {why} after {len(self._ids)} tokens ending in "
                                  f"{self._tail()!r}")
        self._ids.append(tid)
        if piece := self._vocab.pieces[tid]:
            self._last_byte = piece[-1]

    def is_done(self) -> bool:
        """True once the JSON document is complete (then only stop tokens are allowed; the runtime may stop)."""
        return self._matcher.is_terminated() or self._matcher.is_completed()

    def forced_text(self) -> str:
        """The text the schema forces next, as far as it is forced (empty where the model has a choice). After a
        tool's parameters close it ends with `"tool_result": `: the point to run the tool and inject its result."""
        if self._matcher.is_terminated():
            return ""
        return self._matcher.find_jump_forward_string()

    def reset(self) -> None:
        """Back to the start of a new document (the compiled grammar is kept)."""
        self._matcher.reset()
        self._ids.clear()
        self._last_byte = 0

    @property
    def num_accepted(self) -> int:
        return len(self._ids)

    def _piece(self, tid: int) -> str:
        try:
            return self.tokenizer.decode([tid])
        except Exception:  # a padding id past the tokenizer's vocabulary
            return "?"

    def _tail(self, n: int = 24) -> str:
        text = self.tokenizer.decode(self._ids[-n:]) if self._ids else ""
        return text[-40:]
