"""`kvtier bench remote`: a session reopened from a Redis/Valkey server on a second machine, against
prefilling the document again there and against the same session reopened from a local store.

On a server (`--url`, default redis://127.0.0.1:6379/0; the keys go under a prefix of their own, all removed at
the end), a random-weight Llama (`--shape`, default "qwen2.5-0.5b": 4 layers, 14 query and 2 KV heads of 64,
fp32, `--threads` torch threads, default 1) prefills `--tokens` random tokens (default 32768) with
`kvtier.prefill` in `--segment`-token segments into a local store, saves it and publishes it
(`cache.save(remote=URL)`). Then the "second machine": a new process of this module, the model built again and
an empty local store, answers one question (`--question` random tokens, then `--steps` greedy decode steps):

  reprefill   no session: `kvtier.prefill` of the document into a new cache (exact mode, everything on the
              device), then the question. The time to first token of a machine without the server.
  remote      `KVTierCache.open(URL, model)`, records read on demand into a temporary local cache, then the
              question. Time to first token = open + the question's forward + its first token.
  local       the same session opened from the local store the prefill wrote, in the same process after the
              remote one: the decode step to compare with.

in two modes: exact (no budgets: every chunk on the device once read) and sparse (`--sparse-budget` of the
context per step, one selection per layer, the device holding `--device-fraction` of the context and no host
tier, so the selected chunks come from the store tier: the server, then the local cache). Steady decode: after
the first answer both caches crop back to the document and answer the same question again (greedy: the same
tokens, so the same chunks selected), one step of each in turn; every chunk the remote session selects is then
in its local cache. The two answers' tokens and logits are compared too (they must be equal).

Targets, sparse mode the headline (its steps keep reading chunks from the store tier), exact reported beside:
time to first token remote / reprefill at most 0.1; steady decode step remote / local at most 1.2. Reported
as well: the bytes read from the server by the open, by the first token, in each answer, against the bytes
published, and the time the reads from the server took (summed over the threads that made them).
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

import torch

from ..cache import KVTierCache, cache_argument
from ..errors import KVTierError
from ..segmented import prefill
from .common import add_out_argument, median_ms, positive_int, print_targets, share, write_result
from .speed import add_shape_arguments, shape_from_args, speed_model

DEFAULT_URL = "redis://127.0.0.1:6379/0"
TTFT_TARGET = 0.1
STEADY_TARGET = 1.2
MODES = ("exact", "sparse")
HEADLINE = "sparse"


def session_url(text: str, name: str, prefix: str) -> str:
    """`text` (a server and database) naming session `name` under key prefix `prefix`; other query options
    and credentials kept as given."""
    parts = urllib.parse.urlsplit(text)
    db = next((s for s in parts.path.split("/") if s), "0")
    query = [(k, v) for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True) if k != "prefix"]
    query.append(("prefix", prefix))
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, f"/{db}/{name}", urllib.parse.urlencode(query), ""))


def mode_options(mode: str, tokens: int, sparse_budget: float, device_fraction: float) -> dict[str, Any]:
    """Cache options of one mode: exact with no budgets; sparse with a device tier of `device_fraction` of
    the context (at least what the config needs), no host tier and one selection per layer."""
    if mode == "exact":
        return {"mode": "exact"}
    from ..config import KVTierConfig

    device = max(int(device_fraction * tokens), KVTierConfig().min_device_budget)
    return {"mode": "sparse", "sparse_budget": sparse_budget, "device_budget": device, "host_budget": 0,
            "shared_selection": True}


# ------------------------------------------------------------------------------------- the second machine
def _ids(vocab: int, n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def _model(job: dict[str, Any]):
    """The benchmark's model, the same weights in every process, with kvtier's attention run once so that no
    process times torch's first calls."""
    torch.set_num_threads(job["threads"])
    model = speed_model(job["shape"], job["max_len"])
    with torch.inference_mode(), KVTierCache.for_model(model) as cache:
        model(input_ids=_ids(job["shape"]["vocab"], 8, 1), use_cache=True, **{cache_argument(model): cache})
    return model


def _forward(model, cache, ids: torch.Tensor) -> torch.Tensor:
    """Last position's logits of one forward pass through `cache`."""
    return model(input_ids=ids, use_cache=True, logits_to_keep=1, **{cache_argument(model): cache}).logits[:, -1]


class _ReadTimer:
    """Reads from the server (round trips, each a pipelined batch) and the time they took, summed over the
    threads that made them: wrapped around one remote store's server."""

    def __init__(self, server):
        self.seconds, self.calls, self._get, self._lock = 0.0, 0, server.get_bounded, threading.Lock()

        def get_bounded(*args, **kwargs):
            t = time.perf_counter()
            try:
                return self._get(*args, **kwargs)
            finally:
                with self._lock:
                    self.seconds += time.perf_counter() - t
                    self.calls += 1

        server.get_bounded = get_bounded


@torch.inference_mode()
def reprefill(job: dict[str, Any]) -> dict[str, Any]:
    """No session: prefill the document into a new cache, then the question (the path a machine without the
    server takes)."""
    model = _model(job)
    vocab = job["shape"]["vocab"]
    doc, question = _ids(vocab, job["tokens"], 0), _ids(vocab, job["question"], 2)
    start = time.perf_counter()
    with KVTierCache.for_model(model, mode="exact") as cache:
        prefill(model, cache, doc, segment_tokens=job["segment"], progress=False)
        prefill_s = time.perf_counter() - start
        _forward(model, cache, question).argmax(-1)
        ttft = time.perf_counter() - start
    return {"prefill_s": round(prefill_s, 3), "ttft_ms": round(ttft * 1e3, 1)}


@torch.inference_mode()
def answer(job: dict[str, Any]) -> dict[str, Any]:
    """One question answered from the server (timed to its first token), then from the local store, then both
    again, step by step in turn, once every chunk the remote session selects is in its local cache."""
    model = _model(job)
    vocab, steps, options = job["shape"]["vocab"], job["steps"], job["options"]
    question = _ids(vocab, job["question"], 2)
    out: dict[str, Any] = {"options": options}

    caches: dict[str, KVTierCache] = {}
    try:
        start = time.perf_counter()
        remote = caches["remote"] = KVTierCache.open(job["url"], model, **options)
        open_s = time.perf_counter() - start
        store = remote.tiers.disk
        timer = _ReadTimer(store.server)
        at_open = store.fetched_bytes
        token = _forward(model, remote, question).argmax(-1, keepdim=True)
        ttft = time.perf_counter() - start
        out["remote"] = {"open_ms": round(open_s * 1e3, 1), "question_ms": round((ttft - open_s) * 1e3, 1),
                         "ttft_ms": round(ttft * 1e3, 1), "server_bytes_by_open": at_open,
                         "server_bytes_by_first_token": store.fetched_bytes,
                         "server_read_ms_for_question": round(timer.seconds * 1e3, 1),
                         "server_round_trips_for_question": timer.calls}
        first = {}
        first["remote"], tokens_remote = _decode(model, remote, token, steps)
        out["remote"]["server_bytes_first_answer"] = store.fetched_bytes - out["remote"]["server_bytes_by_first_token"]

        start = time.perf_counter()
        local = caches["local"] = KVTierCache.open(job["store"], model, **options)
        open_s = time.perf_counter() - start
        token_local = _forward(model, local, question).argmax(-1, keepdim=True)
        out["local"] = {"open_ms": round(open_s * 1e3, 1), "ttft_ms": round((time.perf_counter() - start) * 1e3, 1)}
        first["local"], tokens_local = _decode(model, local, token_local, steps)
        out["same_tokens_first_answer"] = tokens_remote == tokens_local
        for name in caches:
            out[name]["first_answer_step_ms"] = median_ms(first[name])

        before = store.fetched_bytes
        read_before = timer.seconds
        steady, diff, same = _decode_together(model, caches, question, job["tokens"], steps)
        for name in caches:
            out[name]["steady_step_ms"] = median_ms(steady[name])
        out["remote"]["server_bytes_second_answer"] = store.fetched_bytes - before
        out["remote"]["server_read_ms_second_answer"] = round((timer.seconds - read_before) * 1e3, 1)
        out["remote"]["server_bytes_total"] = store.fetched_bytes
        out["remote"]["server_read_ms_total"] = round(timer.seconds * 1e3, 1)
        out["same_tokens_second_answer"], out["max_abs_logit_diff"] = same, diff
    finally:
        for cache in caches.values():
            cache.close()
    return out


def _decode(model, cache, token: torch.Tensor, steps: int) -> tuple[list[float], list[int]]:
    """`steps` greedy steps from `token`: their times and the tokens fed."""
    times, fed = [], []
    for _ in range(steps):
        fed.append(int(token))
        t = time.perf_counter()
        token = _forward(model, cache, token).argmax(-1, keepdim=True)
        times.append(time.perf_counter() - t)
    return times, fed


def _decode_together(model, caches: dict[str, KVTierCache], question: torch.Tensor, length: int,
                     steps: int) -> tuple[dict[str, list[float]], float, bool]:
    """Crop every cache back to the document, ask the question again and decode, one step of each cache in
    turn, in alternating order (a change in the machine's speed touches all alike, and none always runs
    first): step times, the largest logit difference between the caches and whether the tokens agree."""
    tokens, times = {}, {name: [] for name in caches}
    diff, same = 0.0, True
    for name, cache in caches.items():
        cache.crop(length)
        tokens[name] = _forward(model, cache, question).argmax(-1, keepdim=True)
    order = list(caches)
    for _ in range(steps):
        logits = {}
        for name in order:
            cache = caches[name]
            t = time.perf_counter()
            logits[name] = _forward(model, cache, tokens[name])
            times[name].append(time.perf_counter() - t)
            tokens[name] = logits[name].argmax(-1, keepdim=True)
        ref = next(iter(logits.values()))
        diff = max(diff, *(float((v - ref).abs().max()) for v in logits.values()))
        same = same and all(torch.equal(t, next(iter(tokens.values()))) for t in tokens.values())
        order.reverse()
    return times, diff, same


WORKERS = {"reprefill": reprefill, "answer": answer}


def worker_main() -> None:
    """A second machine: read the job (JSON, on stdin: the URL may hold credentials, never put on a command
    line), run it, print the result as one JSON line."""
    job = json.loads(sys.stdin.read())
    try:
        result = WORKERS[job["kind"]](job)
    except KVTierError as exc:
        print(" ".join(str(exc).split()), file=sys.stderr)
        sys.exit(2)
    print(json.dumps(result))


def run_worker(job: dict[str, Any]) -> dict[str, Any]:
    """Run `job` in a new process of this module; its result, or SystemExit with the worker's last error line."""
    proc = subprocess.run([sys.executable, "-m", "kvtier.bench.remote", "--worker"], input=json.dumps(job),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        raise SystemExit(f"kvtier bench remote: the {job['kind']} process failed: "
                         f"{lines[-1] if lines else f'exit code {proc.returncode}'}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ driver
def _server(url: str):
    """The server behind `url` (a reachable one, or a one-line error), for the checks and the clean-up."""
    from ..store.remote import RedisServer, RemoteURL

    parsed = RemoteURL.parse(url)
    server = RedisServer(parsed, timeout_s=5.0)
    with server.errors("connect"):
        server.client.ping()
    return server


def _remove_prefix(server, prefix: str) -> int:
    """Delete every key under `prefix` (the session and whatever an interrupted publish left)."""
    removed = 0
    with server.errors("remove the benchmark's keys"):
        keys = list(server.client.scan_iter(match=f"{prefix}:*", count=1000))
        for i in range(0, len(keys), 1000):
            removed += server.client.unlink(*keys[i:i + 1000])
    return removed


def run(shape: dict[str, int], url: str, tokens: int, question: int, steps: int, segment: int, threads: int,
        sparse_budget: float, device_fraction: float, modes: tuple[str, ...] = MODES) -> dict[str, Any]:
    from ..store.remote import RemoteURL, read_pointer

    base = RemoteURL.parse(url)
    if base.name is not None:
        raise SystemExit(f"kvtier bench remote: --url names a server and database ({base.shown.rsplit('/', 1)[0]}), "
                         "not a session")
    prefix = f"{base.prefix}-bench-{secrets.token_hex(4)}"
    target = session_url(url, "doc", prefix)
    shown = RemoteURL.parse(target).shown
    server = _server(target)
    work = Path(tempfile.mkdtemp(prefix="kvtier-bench-remote-"))
    job = {"shape": shape, "tokens": tokens, "question": question, "steps": steps, "segment": segment,
           "threads": threads, "max_len": tokens + question * 2 + steps * 2 + 64}
    out: dict[str, Any] = {"server": shown, "prefix": prefix}
    try:
        torch.set_num_threads(threads)
        model = speed_model(shape, job["max_len"])
        with torch.inference_mode():
            cache = KVTierCache.for_model(model, mode="sparse", store_path=work / "doc")
            try:
                start = time.perf_counter()
                prefill(model, cache, _ids(shape["vocab"], tokens, 0), segment_tokens=segment, progress=False)
                prefill_s = time.perf_counter() - start
                start = time.perf_counter()
                cache.save()
                save_s = time.perf_counter() - start
                start = time.perf_counter()
                cache.save(remote=target)
                publish_s = time.perf_counter() - start
            finally:
                cache.close()
        del model
        pointer = read_pointer(server, "doc")
        out["publish"] = {"prefill_s": round(prefill_s, 2), "save_s": round(save_s, 2),
                          "publish_s": round(publish_s, 2), "records": pointer["records"],
                          "bytes": pointer["bytes"], "bytes_per_token": round(pointer["bytes"] / tokens, 1)}
        out["reprefill"] = run_worker({**job, "kind": "reprefill"})
        for mode in modes:
            options = mode_options(mode, tokens, sparse_budget, device_fraction)
            out[mode] = run_worker({**job, "kind": "answer", "url": target, "store": str(work / "doc"),
                                    "options": options})
            r = out[mode]
            r["ttft_ratio_vs_reprefill"] = round(r["remote"]["ttft_ms"] / out["reprefill"]["ttft_ms"], 4)
            r["steady_ratio_vs_local"] = round(r["remote"]["steady_step_ms"] / r["local"]["steady_step_ms"], 3)
            r["first_answer_ratio_vs_local"] = round(r["remote"]["first_answer_step_ms"]
                                                     / r["local"]["first_answer_step_ms"], 3)
    finally:
        try:
            out["keys_removed"] = _remove_prefix(server, prefix)
        finally:
            server.close()
            shutil.rmtree(work, ignore_errors=True)
    out["headline"] = HEADLINE if HEADLINE in modes else modes[0]
    out["targets"] = {}
    for mode in modes:
        r = out[mode]
        out["targets"][f"ttft_{mode}"] = {"measured": r["ttft_ratio_vs_reprefill"], "target_at_most": TTFT_TARGET,
                                          "met": r["ttft_ratio_vs_reprefill"] <= TTFT_TARGET}
        out["targets"][f"steady_step_{mode}"] = {"measured": r["steady_ratio_vs_local"],
                                                 "target_at_most": STEADY_TARGET,
                                                 "met": r["steady_ratio_vs_local"] <= STEADY_TARGET}
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="kvtier bench remote", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=DEFAULT_URL,
                   help=f"the server and database (default {DEFAULT_URL}); the keys go under a new prefix")
    add_shape_arguments(p, "qwen2.5-0.5b")
    p.add_argument("--tokens", type=positive_int, default=32768, help="document tokens (default 32768)")
    p.add_argument("--question", type=positive_int, default=16, help="question tokens (default 16)")
    p.add_argument("--steps", type=positive_int, default=48, help="greedy decode steps per answer (default 48)")
    p.add_argument("--segment", type=positive_int, default=2048, help="prefill segment tokens (default 2048)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="modes measured (both)")
    p.add_argument("--sparse-budget", type=share, default=0.05,
                   help="sparse mode: share of the context attended per step (default 0.05)")
    p.add_argument("--device-fraction", type=share, default=0.2,
                   help="sparse mode: share of the context on the device; no host tier (default 0.2)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads (default 1)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    add_out_argument(p)
    a = p.parse_args(argv)
    if a.worker:
        worker_main()
        return
    modes = tuple(dict.fromkeys(a.modes))
    try:
        result = run(shape_from_args(a), a.url, a.tokens, a.question, a.steps, a.segment, a.threads,
                     a.sparse_budget, a.device_fraction, modes)
    except KVTierError as exc:
        raise SystemExit(f"kvtier bench remote: {' '.join(str(exc).split())}") from None
    config = {"shape": shape_from_args(a), "tokens": a.tokens, "question_tokens": a.question, "steps": a.steps,
              "segment": a.segment, "threads": a.threads, "dtype": "float32", "modes": list(modes),
              "sparse_budget": a.sparse_budget, "device_fraction": a.device_fraction}
    path = write_result("remote", {"config": config, "result": result}, a.out)
    pub = result["publish"]
    print(f"published {a.tokens} tokens: {pub['records']} records, {pub['bytes']} bytes in {pub['publish_s']} s; "
          f"re-prefill to first token {result['reprefill']['ttft_ms']} ms")
    for mode in modes:
        r = result[mode]
        print(f"{mode}: first token {r['remote']['ttft_ms']} ms from the server "
              f"({r['remote']['server_bytes_by_first_token']} bytes read), {r['ttft_ratio_vs_reprefill']}x "
              f"re-prefill; steady step {r['remote']['steady_step_ms']} ms against {r['local']['steady_step_ms']} "
              f"ms local ({r['steady_ratio_vs_local']}x)")
    print_targets(result["targets"])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
