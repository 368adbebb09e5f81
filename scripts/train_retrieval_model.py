"""Train (or evaluate) the small Llama used by kvtier's retrieval-quality benchmarks.

The model learns the tasks of ``kvtier.bench.tasks`` (passkey, multi-key needles in generated and in
natural text, 2-hop variable tracking) from dense synthetic sequences: many needles and many questions
per sequence, loss on the answer tokens only, a curriculum from 64- to 4096-token sequences.

Recipe, and why. The vocabulary is bytes plus one token per key word and per value word (as a BPE
vocabulary holds common words whole), so every answer is "what followed this key word". A 4-layer model
trained from a random start learns passkey quickly, but on multi-key retrieval it sits on a long plateau
where it copies *a* needle's value, not the asked one (0.78 per answer token with two needles; in short
pilots the same plateau held with 3-letter keys and 5-digit values, with an induction warm-up, with a 4x
larger query/key init, with the value before the key). So two things are laid out at initialisation and
then trained like every other weight: fixed-offset heads in layer 0 (``init_offset_heads``) and two
stacked induction heads in a few reserved residual dimensions (``init_induction_circuit``). From there
multi-key accuracy passes 0.98 within 100 steps at 64 tokens. The learning rate stays at 6e-4: at 2e-3
the circuit is trained away and the plateau returns.

What it took for 2-hop variable tracking, measured at 4096 tokens with the full cache:

- 23%: a circuit that looked the second hop up from the question (question -> the variable assigned to
  it -> that variable's value). The second lookup also hits the ``</needle>`` that follows the same
  variable where it is a right-hand side, and the match codes (random, of unequal length) confused keys.
- Equal-length codes, and the second induction head resolving each assignment where it is written
  (``init_induction_circuit``): at initialisation, before any training, the value code in the residual
  after layer 2 names the right value for 80% of variable-tracking and 100% of multi-key prompts at 1024
  tokens (40 prompts each).
- Training sequences with a single chain let a model answer without matching the variable (any question's
  answer is the one value), and the first stages, all single-chain, undid the circuit (0.77 per answer
  token once sequences held several chains). Now 75% of variable-tracking sequences hold two chains or more.
- Passkey, which joined the curriculum at 128 tokens, was then not learned (0.5 per answer token for 300
  steps: EOS right, value wrong), neither with every variable-tracking sequence multi-chain nor with 25%
  single-chain. Training it from the first stage on (its prompt fits 64 tokens) worked: 1.00 by step
  100. The 25% single-chain sequences stayed in; whether the model needs them was not tested.

Result (checkpoints/retrieval-llama, its training.json has the log): 14.3 minutes on 2 threads of a
2-core Intel Xeon, 1700 steps, 7.0M tokens. Greedy full-cache accuracy at 4096 tokens, 100 prompts per
task: passkey 99, multi-key on generated text 100, multi-key on natural text 100, 2-hop variable tracking 99.

Train::

    nice -n 15 python scripts/train_retrieval_model.py --out checkpoints/retrieval-llama

Evaluate a checkpoint (greedy decoding, transformers' default DynamicCache)::

    python scripts/train_retrieval_model.py --eval-only checkpoints/retrieval-llama --eval-lengths 4096 8192

Tokenizer. Training writes a transformers tokenizer beside the weights (``save_tokenizer``), so
``AutoTokenizer`` and ``kvtier qa --model checkpoints/retrieval-llama`` load the checkpoint like any other.
It encodes text exactly as the model was trained on it: byte by byte (``kvtier.bench.tasks.encode_text``,
never a word token, even for "apple" in a text), with ``<bos>``, ``<eos>``, ``<pad>``, ``<needle>``,
``</needle>`` and ``<query>`` as special tokens, and the word tokens written ``<key:apple>`` and
``<value:amber>`` so that decoding and encoding again give back the same ids. Its chat template builds
the task prompt from one user message, ``<bos>`` document ``<query>`` question, the question being what
follows the message's last "\n\nQuestion: ". Write it into an existing checkpoint::

    python scripts/train_retrieval_model.py --tokenizer-only checkpoints/retrieval-llama
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import random
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _import_tasks():
    """`kvtier.bench.tasks`; loaded from its file (without kvtier's own imports) if the package fails."""
    try:
        from kvtier.bench import tasks

        return tasks
    except ImportError:
        import importlib.util
        import types

        for name in ("kvtier", "kvtier.bench"):
            if name not in sys.modules or not hasattr(sys.modules[name], "__path__"):
                mod = types.ModuleType(name)
                mod.__path__ = [str(ROOT / name.replace(".", "/"))]
                sys.modules[name] = mod
        for name in ("kvtier.bench.common", "kvtier.bench.tasks"):
            spec = importlib.util.spec_from_file_location(name, ROOT / (name.replace(".", "/") + ".py"))
            mod = importlib.util.module_from_spec(spec)
            sys.modules[name] = mod
            spec.loader.exec_module(mod)
        return sys.modules["kvtier.bench.tasks"]


T = _import_tasks()
from kvtier.bench.common import HAYSTACK_ENV, machine_info  # noqa: E402  (loaded by _import_tasks either way)

# The benchmark data lives beside the repository, in ../shared/data/ (its README says what is there).
DEFAULT_DATA_DIR = ROOT.parent / "shared" / "data" / "paul_graham_essays"


def haystack_dir(data_dir: str) -> str | None:
    """The directory of essays for the natural-text haystack, or None for generated text (no essays here).

    `kvtier.bench.tasks` reads it (through `haystack_text`); this only refuses a directory that was asked
    for and is not there, and says so when the default one is missing.
    """
    if Path(data_dir).is_dir():
        return data_dir
    if Path(data_dir) != DEFAULT_DATA_DIR:
        print(f"train_retrieval_model.py: error: haystack directory {data_dir} (--data-dir or ${HAYSTACK_ENV}) "
              "does not exist; pass --data-dir DIR, a directory of .txt essays", file=sys.stderr)
        raise SystemExit(2)
    print(f"no essays in {DEFAULT_DATA_DIR}: the natural-text haystack is generated text "
          f"(pass --data-dir or set ${HAYSTACK_ENV} for essays)", file=sys.stderr, flush=True)
    return None


# One user message: the document, then "\n\nQuestion: " and the question (what `kvtier qa` sends) becomes
# the task prompt `<bos> document <query> question`, which the model answers with a value word.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set parts = message['content'].rsplit('\\n\\nQuestion: ', 1) %}"
    "{{ parts[0] }}{% if parts | length > 1 %}<query>{{ parts[1] }}{% endif %}{% endfor %}"
)


def word_surfaces() -> dict[str, int]:
    """How the tokenizer writes each word token: ``<key:apple>``, ``<value:amber>`` (text never holds them by
    accident, unlike " apple", so they encode back to the same id)."""
    return {**{f"<key:{w}>": i for w, i in T.KEY_TOKENS.items()},
            **{f"<value:{w}>": i for w, i in T.VALUE_TOKENS.items()}}


def build_tokenizer():
    """A transformers tokenizer with exactly the training vocabulary (`kvtier.bench.tasks`): ids 0-255 the
    bytes of UTF-8 text, then the special tokens, then one token per key and value word (`word_surfaces`).

    A BPE model over the byte alphabet with no merges: every byte of a text is its own token, as
    `encode_text` gives it. Special and word tokens are added tokens that keep their training ids."""
    import transformers as tf
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_chars = bytes_to_unicode()  # the byte-level alphabet: byte b is written as one printable character
    words = word_surfaces()
    vocab = {byte_chars[b]: b for b in range(256)}
    vocab.update({name: i for i, name in T.SPECIAL_TOKENS.items()})
    vocab.update(words)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in T.SPECIAL_TOKENS.values()])
    tok.add_tokens([AddedToken(name, special=False, normalized=False) for name in words])
    bos = T.SPECIAL_TOKENS[T.BOS]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                       special_tokens=[(bos, T.BOS)])
    fast = tf.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=T.SPECIAL_TOKENS[T.EOS], pad_token=T.SPECIAL_TOKENS[T.PAD],
        clean_up_tokenization_spaces=False, model_max_length=16384,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tokenizer(out: Path) -> None:
    """Write the tokenizer into a checkpoint directory (tokenizer.json, tokenizer_config.json, the template)."""
    build_tokenizer().save_pretrained(out)


def parse_schedule(text: str, tokens_per_step: int) -> list[tuple[int, int, float, int]]:
    """'64:500:0.33:4096,256:1000' -> [(64, 500, 0.33, 4096), (256, 1000, 0.33, tokens_per_step)].

    Each stage is sequence length, steps, the largest density (fraction of the tokens that are needles
    and questions; each sequence draws its density uniformly from [density/2, density]; default 0.33)
    and the tokens per optimiser step (default --tokens-per-step).
    """
    out = []
    for part in text.split(","):
        f = part.split(":")
        out.append(
            (
                int(f[0]),
                int(f[1]),
                float(f[2]) if len(f) > 2 and f[2] else 0.33,
                int(f[3]) if len(f) > 3 and f[3] else tokens_per_step,
            )
        )
    return out


def parse_mix(text: str) -> dict[str, float]:
    """'passkey:1,niah_multikey:2' -> task weights."""
    mix = {}
    for part in text.split(","):
        name, w = part.split(":")
        if name not in T.TASKS:
            raise SystemExit(f"unknown task {name!r} in --task-mix")
        mix[name] = float(w)
    return mix


def build_model(args: argparse.Namespace):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=T.VOCAB_SIZE,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads or args.heads,
        head_dim=args.head_dim,
        max_position_embeddings=args.max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": args.rope_theta},
        tie_word_embeddings=True,
        bos_token_id=T.BOS,
        eos_token_id=T.EOS,
        pad_token_id=T.PAD,
        initializer_range=args.init_std,
        attention_bias=args.prev_heads > 0,
    )
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg)
    if args.prev_heads > 0:
        init_offset_heads(model, args.prev_heads, args.prev_scale)
    if args.induction_init:
        init_induction_circuit(model, args.match_dims, args.induction_scale)
    return model


@torch.no_grad()
def init_offset_heads(model, n_heads: int, scale: float) -> None:
    """Start heads 0..n-1 of layer 0 as fixed-offset heads: head h attends to the token h+1 back.

    Only the query/key biases are set (the weights keep their random init and everything stays trainable):
    with k = scale and q = scale * exp(-i * (h+1) * theta_f) per rotary pair f, the rotary score
    sum_f scale^2 cos(theta_f * (m - n - h - 1)) peaks at distance h+1. This removes the long plateau a
    small model spends before it finds previous-token heads, which multi-token key matching needs.
    """
    attn = model.model.layers[0].self_attn
    hd = attn.head_dim
    half = hd // 2
    inv = model.model.rotary_emb.inv_freq.float()[:half]
    for h in range(n_heads):
        delta = float(h + 1)
        sl = slice(h * hd, (h + 1) * hd)
        bq = torch.zeros(hd)
        bk = torch.zeros(hd)
        bk[:half] = scale
        bq[:half] = scale * torch.cos(inv * delta)
        bq[half:] = -scale * torch.sin(inv * delta)
        attn.q_proj.bias[sl] = bq
        kv = h // (attn.config.num_attention_heads // attn.config.num_key_value_heads)
        attn.k_proj.bias[kv * hd : (kv + 1) * hd] = bk


@torch.no_grad()
def init_induction_circuit(model, match_dims: int, scale: float) -> None:
    """Start layers 0-2 as two stacked induction heads over the key and value words.

    Retrieval here is "what followed this key word": a previous-token head and a head that matches the
    current token against it. Small models find that pair slowly from a random start (the long plateau
    of the training logs: copying *a* value, not the asked one), so it is laid out at initialisation in
    a few reserved residual dimensions and then trained like every other weight. With m = `match_dims`:

      [0, m)      key-word code    (only key-word embeddings are non-zero there)
      [m, 2m)     value-word code  (only value-word embeddings; the output reads it, embeddings are tied)
      [H-m, H)    the previous token's key code

    Codes are random directions of equal length, so a code matches itself better than any other.

    - layer 0 head 0 (attending one token back, see init_offset_heads) copies the key code one position on;
    - layers 1 and 2 head 0 each match the current token's key code against the previous-token codes and
      add the value code found there to the value-code dimensions.

    One such head answers a multi-key question. Two stacked answer variable tracking by resolving each
    assignment where it is written: in ``VAR b a``, layer 1 at ``a`` finds ``VAR a amber`` (written
    earlier) and stores amber's code at ``a``; at the question ``VAR b``, layer 2 finds that ``a`` (it
    follows ``b``) and copies amber. A lookup from the question for ``a`` itself would also hit the
    ``</needle>`` after the ``a`` of ``VAR b a``; resolving forward never does. Matching uses each head's
    slowest rotary pairs, so it barely depends on distance; nothing else writes the reserved dimensions
    at the start. Only head 0 of layers 0-2 and the embeddings are touched.
    """
    cfg = model.config
    hidden, hd = cfg.hidden_size, cfg.head_dim
    m = match_dims
    if 2 * m > hd or m % 2 or 3 * m > hidden:
        raise SystemExit("--match-dims must be even, at most half the head dim and a third of the hidden size")
    dims = torch.arange(m)
    key_code, value_code, prev = dims, m + dims, hidden - m + dims
    half = hd // 2
    slow = torch.cat([torch.arange(half - m // 2, half), torch.arange(hd - m // 2, hd)])  # slowest rotary pairs
    reserved = torch.cat([key_code, value_code, prev])
    emb = model.model.embed_tokens.weight
    size = 3 * cfg.initializer_range * m**0.5  # length of every code vector

    def codes(n: int) -> torch.Tensor:
        c = torch.randn(n, m)
        return c / c.norm(dim=1, keepdim=True) * size

    emb[:, reserved] = 0.0
    keys = torch.tensor(sorted(T.KEY_TOKENS.values()))
    values = torch.tensor(sorted(T.VALUE_TOKENS.values()))
    emb[keys[:, None], key_code[None, :]] = codes(len(keys))
    emb[values[:, None], value_code[None, :]] = codes(len(values))
    layers = model.model.layers

    def head0_copies(layer, src: torch.Tensor, dst: torch.Tensor, w: float, keep_clean: torch.Tensor) -> None:
        """Head 0's value/output copy residual dims src -> dst (weight w) through its own dims; no other
        writer of `layer` touches `keep_clean` at the start."""
        v, o = layer.self_attn.v_proj, layer.self_attn.o_proj
        v.weight[:hd] = 0.0
        o.weight[keep_clean] = 0.0
        o.weight[:, :hd] = 0.0
        if v.bias is not None:
            v.bias[:hd] = 0.0
        if o.bias is not None:
            o.bias[keep_clean] = 0.0
        rows = torch.arange(len(src))
        v.weight[rows, src] = 1.0
        o.weight[dst, rows] = w
        layer.mlp.down_proj.weight[keep_clean] = 0.0

    def head0_matches(layer, query_dims: torch.Tensor, key_dims: torch.Tensor) -> None:
        q, k = layer.self_attn.q_proj, layer.self_attn.k_proj
        q.weight[:hd] = 0.0
        k.weight[:hd] = 0.0
        q.weight[slow, query_dims] = scale
        k.weight[slow, key_dims] = scale
        for b in (q.bias, k.bias):
            if b is not None:
                b[:hd] = 0.0

    head0_copies(layers[0], key_code, prev, 0.04, reserved)
    head0_matches(layers[1], key_code, prev)
    head0_copies(layers[1], value_code, value_code, 1.0, torch.cat([key_code, prev]))
    head0_matches(layers[2], key_code, prev)
    head0_copies(layers[2], value_code, value_code, 1.0, torch.empty(0, dtype=torch.long))


def make_batch(seq_len: int, batch: int, rng: random.Random, mix: dict[str, float], data_dir: str | None,
               density: float):
    names = list(mix)
    # a passkey prompt (needle, question and answer) alone is 59 tokens: leave it out of shorter sequences
    weights = [0.0 if (n == "passkey" and seq_len < 64) else mix[n] for n in names]
    ids, ws, kinds = [], [], []
    for _ in range(batch):
        task = rng.choices(names, weights)[0]
        d = density * (0.5 + 0.5 * rng.random())
        i, w = T.make_training_sequence(task, seq_len, rng, data_dir, density=d)
        ids.append(i)
        ws.append(w)
        kinds.append(task)
    return torch.tensor(ids), torch.tensor(ws), kinds


def lr_at(step: int, total: int, args: argparse.Namespace) -> float:
    """Linear warmup, constant, then cosine decay to min_lr_frac over the last decay_frac of steps."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    decay_start = int(total * (1 - args.decay_frac))
    if step < decay_start:
        return args.lr
    p = (step - decay_start) / max(1, total - decay_start)
    return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * p)))


def loss_on_batch(model, ids: torch.Tensor, w: torch.Tensor, lm_weight: float, bf16: bool):
    """Weighted next-token loss: answer tokens weigh 1, other tokens `lm_weight`."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        h = model.model(input_ids=ids).last_hidden_state[:, :-1]
        tgt = ids[:, 1:]
        wt = w[:, 1:]
        if lm_weight > 0:
            wt = torch.where(wt > 0, wt, torch.full_like(wt, lm_weight))
        sel = wt > 0
        logits = model.lm_head(h[sel]).float()
    ce = F.cross_entropy(logits, tgt[sel], reduction="none")
    wsel = wt[sel]
    loss = (ce * wsel).sum() / wsel.sum()
    ans = w[:, 1:][sel] > 0
    correct = (logits.argmax(-1) == tgt[sel]) & ans
    return loss, ce[ans].detach(), correct[ans].detach(), sel


# ----------------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def evaluate(
    model,
    task_names,
    lengths,
    n: int,
    seed: int,
    data_dir: str | None,
    batch_size: int = 8,
    use_generate: bool = True,
) -> dict:
    """Exact-match greedy accuracy per (task, length) with the full (default DynamicCache) KV cache."""
    model.eval()
    results: dict = {}
    for length in lengths:
        for task in task_names:
            rng = random.Random(f"{seed}-{task}-{length}")
            examples = [T.make_example(task, length, rng, data_dir) for _ in range(n)]
            hits = 0
            t0 = time.time()
            for b in range(0, n, batch_size):
                chunk = examples[b : b + batch_size]
                prompt = torch.tensor([e.prompt_ids for e in chunk])
                n_new = max(len(e.answer_ids) for e in chunk)
                if use_generate:
                    out = model.generate(
                        input_ids=prompt,
                        attention_mask=torch.ones_like(prompt),
                        max_new_tokens=n_new,
                        do_sample=False,
                        eos_token_id=T.EOS,
                        pad_token_id=T.PAD,
                    )[:, prompt.shape[1] :]
                else:
                    out = greedy(model, prompt, n_new)
                for e, o in zip(chunk, out.tolist()):
                    hits += o[: len(e.answer_ids)] == e.answer_ids
            acc = hits / n
            results.setdefault(task, {})[str(length)] = {"accuracy": acc, "correct": hits, "n": n}
            print(
                f"  eval {task:<20} len {length:>6}: {hits}/{n} = {acc:.3f} ({time.time() - t0:.0f}s)",
                flush=True,
            )
    model.train()
    return results


@torch.no_grad()
def greedy(model, prompt: torch.Tensor, n_new: int) -> torch.Tensor:
    """Plain greedy loop with a DynamicCache (used for quick in-training evaluation)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    out = model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
    toks = []
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(n_new):
        toks.append(nxt)
        out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    return torch.cat(toks, 1)


def load_checkpoint(path: str, dtype: str):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    model.eval()
    return model


# ----------------------------------------------------------------------------------------------------
# training


def train(args: argparse.Namespace) -> None:
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    data_dir = haystack_dir(args.data_dir)
    mix = parse_mix(args.task_mix)
    schedule = parse_schedule(args.schedule, args.tokens_per_step)
    total = sum(stage[1] for stage in schedule)

    model = build_model(args)
    n_params = sum(p.numel() for p in model.parameters())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(args.beta1, args.beta2),
        eps=1e-8,
    )
    step0 = 0
    state_path = Path(args.state) if args.state else None
    tokens_seen = 0
    train_seconds = 0.0
    if state_path and state_path.exists():
        st = torch.load(state_path, weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        rng.setstate(pickle.loads(st["rng"]))
        torch.set_rng_state(st["torch_rng"])
        step0, tokens_seen, train_seconds = st["step"], st["tokens"], st["train_seconds"]
        print(f"resumed from {state_path} at step {step0}", flush=True)

    print(f"model: {n_params / 1e6:.2f}M parameters; {total} steps; schedule {schedule}", flush=True)
    print(f"haystack text: {T.haystack('text', 10, random.Random(0), data_dir)[1]}", flush=True)
    model.train()
    names = list(mix)
    step = 0
    t_log = time.time()
    log_tokens = 0
    acc_loss, acc_tok, acc_n, acc_ans, acc_ans_n = 0.0, 0, 0, 0, 0
    per_task = {n: [0, 0] for n in names}
    history = []
    for length, steps, density, tokens_per_step in schedule:
        batch = max(1, tokens_per_step // length)
        for _ in range(steps):
            if step < step0:
                step += 1
                continue
            t_step = time.time()
            lr = lr_at(step, total, args)
            for g in opt.param_groups:
                g["lr"] = lr
            ids, w, kinds = make_batch(length, batch, rng, mix, data_dir, density)
            loss, ce, correct, sel = loss_on_batch(model, ids, w, args.lm_weight, args.bf16)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            opt.step()
            step += 1
            train_seconds += time.time() - t_step
            tokens_seen += ids.numel()
            log_tokens += ids.numel()
            # statistics: token accuracy, and whole-answer accuracy under teacher forcing
            acc_loss += ce.sum().item()
            acc_tok += correct.sum().item()
            acc_n += correct.numel()
            ans_w = w[:, 1:]
            row = torch.arange(ids.shape[0]).unsqueeze(1).expand_as(ans_w)[sel][w[:, 1:][sel] > 0]
            by_row: dict[int, list[bool]] = {}
            for r, c in zip(row.tolist(), correct.tolist()):
                by_row.setdefault(r, []).append(c)
            for r, cs in by_row.items():
                name = kinds[r]
                per_task[name][0] += sum(cs)
                per_task[name][1] += len(cs)
                for j in range(0, len(cs) - 1, 2):  # an answer is a value word and EOS
                    acc_ans += all(cs[j : j + 2])
                    acc_ans_n += 1
            if step % args.log_every == 0 or step == total:
                dt = time.time() - t_log
                pt = " ".join(f"{n[:8]}={c / max(1, m):.2f}" for n, (c, m) in per_task.items())
                rec = {
                    "step": step,
                    "len": length,
                    "lr": lr,
                    "loss": acc_loss / max(1, acc_n),
                    "tok_acc": acc_tok / max(1, acc_n),
                    "ans_acc": acc_ans / max(1, acc_ans_n),
                    "tok_per_s": log_tokens / dt,
                    "elapsed_s": train_seconds,
                }
                history.append(rec)
                print(
                    f"step {step:>6} len {length:>5} lr {lr:.2e} loss {rec['loss']:.3f} tok_acc {rec['tok_acc']:.3f} "
                    f"ans_acc {rec['ans_acc']:.3f} [{pt}] {rec['tok_per_s']:.0f} tok/s {train_seconds / 60:.1f} min",
                    flush=True,
                )
                t_log = time.time()
                log_tokens = 0
                acc_loss, acc_tok, acc_n, acc_ans, acc_ans_n = 0.0, 0, 0, 0, 0
                per_task = {n: [0, 0] for n in names}
            if args.eval_every and step % args.eval_every == 0:
                evaluate(model, T.TASKS, [max(256, length)], args.quick_eval_n, 12345 + step, data_dir, use_generate=False)
            if state_path and args.state_every and step % args.state_every == 0:
                st = {
                    "model": model.state_dict(),
                    "opt": opt.state_dict(),
                    "rng": pickle.dumps(rng.getstate()),
                    "torch_rng": torch.get_rng_state(),
                    "step": step,
                    "tokens": tokens_seen,
                    "train_seconds": train_seconds,
                }
                torch.save(st, str(state_path) + ".tmp")
                os.replace(str(state_path) + ".tmp", state_path)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    save_dtype = getattr(torch, args.save_dtype)
    model.to(save_dtype)
    model.generation_config.pad_token_id = T.PAD
    model.generation_config.eos_token_id = T.EOS
    model.generation_config.bos_token_id = T.BOS
    model.save_pretrained(out, safe_serialization=True)
    save_tokenizer(out)
    print(f"saved {out} ({args.save_dtype}) with its tokenizer", flush=True)
    info = {
        "command": shlex.join([sys.executable.split("/")[-1], *sys.argv]),
        "args": vars(args),
        "model_config": json.loads((out / "config.json").read_text()),
        "parameters": n_params,
        "vocab": {"size": T.VOCAB_SIZE, **{v: k for k, v in T.SPECIAL_TOKENS.items()}, "first_word": T.WORD_BASE,
                  "key_words": len(T.KEY_WORDS), "value_words": len(T.VALUE_WORDS)},
        "haystack_text_source": T.haystack("text", 10, random.Random(0), data_dir)[1],
        "steps": total,
        "tokens_seen": tokens_seen,
        "train_wall_s": round(train_seconds, 1),
        "tokens_per_s": round(tokens_seen / max(1e-9, train_seconds), 1),
        "hardware": machine_info(),
        "history": history,
    }
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    if args.eval_lengths and args.eval_n > 0:
        run_eval_into(out, args)


def run_eval_into(ckpt: Path, args: argparse.Namespace) -> None:
    """Evaluate the saved checkpoint and record the result in its training.json."""
    data_dir = haystack_dir(args.data_dir)
    model = load_checkpoint(str(ckpt), args.eval_dtype)
    t0 = time.time()
    res = evaluate(model, args.eval_tasks, args.eval_lengths, args.eval_n, args.eval_seed, data_dir, args.eval_batch)
    record = {
        "command": shlex.join([sys.executable.split("/")[-1], *sys.argv]),
        "checkpoint_dtype": json.loads((ckpt / "config.json").read_text()).get("dtype"),
        "eval_dtype": args.eval_dtype,
        "decoding": "greedy, model.generate, default DynamicCache (full KV cache)",
        "seed": args.eval_seed,
        "haystack_text_source": T.haystack("text", 10, random.Random(0), data_dir)[1],
        "wall_s": round(time.time() - t0, 1),
        "hardware": machine_info(),
        "results": res,
    }
    path = ckpt / "training.json"
    info = json.loads(path.read_text()) if path.exists() else {}
    evals = info.setdefault("evaluations", [])
    evals.append(record)
    info["final_accuracy"] = res if args.eval_dtype == "float32" or "final_accuracy" not in info else info["final_accuracy"]
    path.write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(res, indent=2), flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="checkpoints/retrieval-llama")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=os.environ.get(HAYSTACK_ENV, str(DEFAULT_DATA_DIR)),
                   help=f"directory of .txt essays for the natural-text haystack (default: ${HAYSTACK_ENV}, "
                        "else ../shared/data/paul_graham_essays beside the repository)")
    # model
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=0, help="0: as many as --heads")
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--rope-theta", type=float, default=1e6)
    p.add_argument("--max-positions", type=int, default=16384)
    p.add_argument("--init-std", type=float, default=0.02)
    p.add_argument("--prev-heads", type=int, default=4, help="layer-0 heads started as offset-1..n heads")
    p.add_argument("--no-induction-init", dest="induction_init", action="store_false",
                   help="start from a plain random init (see init_induction_circuit)")
    p.add_argument("--match-dims", type=int, default=8, help="code dimensions of the induction circuit")
    p.add_argument("--induction-scale", type=float, default=3.0, help="query/key weight of the matching head")
    p.add_argument("--prev-scale", type=float, default=8.0, help="query/key bias size of those heads")
    # optimisation
    p.add_argument("--schedule", default="64:200,128:300,256:300,512:300,1024:250,2048:200,4096:150",
                   help="curriculum: seq_len:steps,...")
    p.add_argument("--tokens-per-step", type=int, default=4096)
    p.add_argument("--task-mix", default="passkey:1,niah_multikey:2,niah_multikey_text:2,variable_tracking:3")
    p.add_argument("--lr", type=float, default=6e-4, help="higher rates (2e-3) wreck the initial circuit")
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--decay-frac", type=float, default=0.3)
    p.add_argument("--min-lr-frac", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--beta1", type=float, default=0.9)
    p.add_argument("--beta2", type=float, default=0.98)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--lm-weight", type=float, default=0.0, help="loss weight of non-answer tokens")
    p.add_argument("--no-bf16", dest="bf16", action="store_false", help="train in fp32 (default: bf16 autocast)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--quick-eval-n", type=int, default=16)
    p.add_argument("--state", default="", help="file for resumable training state")
    p.add_argument("--state-every", type=int, default=250)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.add_argument("--save-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    # evaluation
    p.add_argument("--eval-only", default="", metavar="CHECKPOINT", help="evaluate this checkpoint and exit")
    p.add_argument("--tokenizer-only", default="", metavar="CHECKPOINT",
                   help="write the tokenizer into this checkpoint directory and exit")
    p.add_argument("--eval-lengths", type=int, nargs="*", default=[4096])
    p.add_argument("--eval-n", type=int, default=100)
    p.add_argument("--eval-tasks", nargs="*", default=list(T.TASKS))
    p.add_argument("--eval-seed", type=int, default=2024)
    p.add_argument("--eval-batch", type=int, default=8)
    p.add_argument("--eval-dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tokenizer_only:
        save_tokenizer(Path(args.tokenizer_only))
        print(f"wrote the tokenizer into {args.tokenizer_only}", flush=True)
        return
    if args.eval_only:
        run_eval_into(Path(args.eval_only), args)
        return
    train(args)


if __name__ == "__main__":
    main()
