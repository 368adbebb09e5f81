"""Sessions published on a Redis/Valkey server and reopened elsewhere, against real servers only: the shared
one (`redis_url`, a fresh key prefix per test) and private ones a test starts to stop, pause, restart, fill up
or lock down (`private_redis`).

What is checked: logits equal to the local session's (exact and sparse, chunks saved from every tier); records
read on demand and cached locally; credentials never shown or stored; keys under the prefix; TLS; hostile data
on the server (each damage a one-line StoreError, never wrong logits); faults (server gone, timeout, half-
published, evicted, two publishers, unpublish).
"""

from __future__ import annotations

import os
import signal
import threading
import time
import urllib.parse
from pathlib import Path

import pytest
import torch
from conftest import build_model
from redis_server import client_for, make_tls_files, with_name

from kvtier import KVTierCache
from kvtier.errors import (
    CacheInputError,
    RemoteStoreError,
    SessionExistsError,
    StoreCorruptError,
    StoreError,
    StoreMismatchError,
    StoreMissingRecordError,
    StoreNotFoundError,
)
from kvtier.store import remote
from kvtier.store.disk import DiskStore, seal, unseal
from kvtier.store.remote import RemoteURL, list_sessions, publish, unpublish

pytestmark = pytest.mark.redis
CHUNKING = dict(chunk_size=16, sink_tokens=4, recent_window=16, device_budget=40, host_budget=32)
BUDGETS = dict(device_budget=40, host_budget=32)  # runtime options at open (chunking comes from the store)
SPARSE = dict(mode="sparse", sparse_budget=32)
STEPS = [7, 9, 11, 13, 17]
DOC = 230


@pytest.fixture(scope="module")
def model():
    return build_model("llama")


def prefill(model, path: Path | None, *, seed: int = 5, tokens: int = DOC) -> KVTierCache:
    """A cache holding a random document, built with small budgets so chunks sit on device, host and disk."""
    doc = torch.randint(3, 128, (1, tokens), generator=torch.Generator().manual_seed(seed))
    cache = KVTierCache.for_model(model, store_path=path, **CHUNKING)
    with torch.no_grad():
        model(doc, past_key_values=cache, use_cache=True)
    return cache


def saved(model, path: Path, url: str | None = None, **kw) -> Path:
    """Prefill, save locally (and publish to `url`), close."""
    cache = prefill(model, path, **kw)
    cache.save(remote=url)
    cache.close()
    return path


def decode(model, cache: KVTierCache, tokens: list[int]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(torch.tensor([[t]]), past_key_values=cache, use_cache=True).logits for t in tokens]


def opened(target, model, tokens=STEPS, **options) -> list[torch.Tensor]:
    """Logits of `tokens` decoded one by one from the session at `target` (a store path or a URL)."""
    with KVTierCache.open(target, model, **BUDGETS, **options) as cache:
        return decode(model, cache, tokens)


def same(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def refused(cls: type[Exception], fn, *args, **kwargs) -> Exception:
    """Call fn, which must raise `cls` (any other exception fails the test) with a one-line message."""
    with pytest.raises(cls) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert message and "\n" not in message, message
    return info.value


def raw(url: str):
    """A plain client of the server `url` names (its prefix is kvtier's, not the client's)."""
    return client_for(url.split("?")[0])


def prefix_of(url: str) -> str:
    return urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)["prefix"][0]


def layout(client, prefix: str, name: str) -> dict:
    """The session's keys on the server, found by scanning (not by kvtier's key functions)."""
    pointer_key = f"{prefix}:{{{name}}}:session"
    ns = unseal(client.get(pointer_key), "pointer")["ns"]
    data = f"{prefix}:{{{name}}}:{ns}:"
    keys = sorted(k.decode() for k in client.scan_iter(match=data + "*", count=1000))
    return {"pointer": pointer_key, "ns": ns, "store": data + "meta:store", "session": data + "meta:session",
            "index": data + "index", "records": [k for k in keys if k.startswith(data + "r:")], "all": keys}


def record_bytes(client, keys: dict) -> int:
    return sum(client.strlen(k) for k in keys["records"])


# ---------------------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("mode", ["exact", "sparse"])
def test_round_trip_equals_the_local_session_and_keeps_generating(model, redis_url, tmp_path, mode):
    """Chunks saved from device, host and disk; the reopened session decodes, crops back and decodes again
    exactly as the local one does, and its local cache serves a second open without reading the server."""
    options = SPARSE if mode == "sparse" else {}
    url = with_name(redis_url, "doc")
    cache = prefill(model, tmp_path / "local")
    stats = cache.tiers.stats()
    assert stats.device.tokens and stats.host.tokens and stats.disk.tokens  # every tier holds chunks at save
    cache.save(remote=url)
    cache.close()

    def run(cache: KVTierCache) -> list[torch.Tensor]:
        first = decode(model, cache, STEPS)
        cache.crop(DOC)  # back to the document: the decoded tokens are gone
        assert cache.get_seq_length() == DOC
        return first + decode(model, cache, STEPS[::-1])

    with KVTierCache.open(tmp_path / "local", model, **BUDGETS, **options) as local:
        want = run(local)
    with KVTierCache.open(url, model, store_path=tmp_path / "cache", **BUDGETS, **options) as far:
        assert far.remote == with_name(redis_url, "doc") and far.store_path == tmp_path / "cache"  # it reopens
        same(run(far), want)
        assert far.tiers.disk.fetched_bytes > 0
    with KVTierCache.open(url, model, store_path=tmp_path / "cache", **BUDGETS, **options) as again:
        same(run(again), want)
        assert again.tiers.disk.fetched_bytes == 0  # every record it needed was cached by the first open


def test_reopen_reads_records_on_demand(model, redis_url, tmp_path):
    """Sparse decoding with a small budget reads a fraction of the session from the server."""
    url = with_name(redis_url, "long")
    saved(model, tmp_path / "local", url, tokens=800)
    total = record_bytes(raw(redis_url), layout(raw(redis_url), prefix_of(redis_url), "long"))
    want = opened(tmp_path / "local", model, STEPS[:1], **SPARSE)
    with KVTierCache.open(url, model, **BUDGETS, **SPARSE) as far:
        at_open = far.tiers.disk.fetched_bytes
        same(decode(model, far, STEPS[:1]), want)
        assert at_open < far.tiers.disk.fetched_bytes < total / 3, (at_open, far.tiers.disk.fetched_bytes, total)


# ------------------------------------------------------------------------------------------ security
def test_url_credentials_are_decoded_once_and_never_shown():
    password = "p@ss:w/rd %?#&=x"
    url = RemoteURL.parse(f"redis://kv:{urllib.parse.quote(password, safe='')}@127.0.0.1:6379/0/doc?prefix=t")
    from redis.connection import parse_url  # what the client will connect with

    assert parse_url(url.connect)["password"] == password and parse_url(url.connect)["username"] == "kv"
    assert url.shown == "redis://127.0.0.1:6379/0/doc?prefix=t"  # all that names the session, no credential
    for text in (repr(url), str(url), url.shown, repr(url.with_name("other"))):
        assert "p@ss" not in text and "p%40ss" not in text
    assert url.scrub(f"said {password} and {urllib.parse.quote(password, safe='')}") == "said *** and ***"
    tls = RemoteURL.parse("rediss://h/0/doc?ssl_password=s3cret-key&ssl_ca_certs=/ca.pem")
    assert "s3cret-key" not in repr(tls) and tls.scrub("s3cret-key") == "***"


@pytest.mark.parametrize("url", [
    "redis://kv:S3CRETpart/tail@127.0.0.1:6379/0",  # the part before '/' was read as a port, and quoted
    "redis://kv:12/S3CRETtail@127.0.0.1:6379/0/doc",  # a valid port: the rest became the path, quoted as the db
    "redis://kv:S3CRET#tail@127.0.0.1:6379/0",
    "redis://kv:S3CRET?tail@127.0.0.1/0",
])
def test_a_password_left_unencoded_is_never_quoted(url):
    err = refused(CacheInputError, RemoteURL.parse, url)
    assert "S3CRET" not in str(err) and "percent-encode" in str(err), str(err)


@pytest.mark.parametrize("query, says", [
    ("bogus=1", "unknown remote URL option 'bogus'"),
    ("socket_timeout=soon", "'socket_timeout' must be a positive number"),
    ("socket_timeout=-1", "'socket_timeout' must be a positive number"),
    ("socket_timeout=1e300", "at most 86400"),  # past the clock's range: a traceback from the socket
    ("socket_connect_timeout=inf", "at most 86400"),
    ("max_connections=1e30", "a whole one, at most"),
    ("ssl_ca_certs=/ca.pem", "needs TLS: use rediss://"),
    ("password=hunter2", "not in its query"),
    ("socket_keepalive=maybe", "true or false"),
])
def test_bad_url_options_are_one_line_errors(query, says):
    err = refused(CacheInputError, RemoteURL.parse, f"redis://127.0.0.1:6379/0/doc?{query}")
    assert says in str(err) and "hunter2" not in str(err)


@pytest.mark.parametrize("url, kwargs, says", [
    ("redis://127.0.0.1:0/0/doc", {}, "the remote URL's port must be 1-65535, not 0"),
    ("localhost:6379", {}, "'localhost:6379' is not one"),
    ("redis:/kv:hunter2@h", {}, "got something else"),  # may hold a password: not shown
    (5, {}, "got int"),
    ("redis://127.0.0.1:6379/0", {"name": 5}, "a session name is a str, got int"),
])
def test_bad_urls_and_names_are_named(url, kwargs, says):
    err = refused(CacheInputError, RemoteURL.parse, url, **kwargs)
    assert says in str(err) and "hunter2" not in str(err)


def test_acl_user_with_password(model, private_redis, tmp_path):
    """An ACL user limited to the prefix's keys: the right password works, a wrong one is a one-line error
    without either password; the password is in no file, repr or message; every key is under the prefix."""
    server = private_redis()
    admin = server.client()
    password = "Kv-" + os.urandom(6).hex() + ":/@ %?#"
    quoted = urllib.parse.quote(password, safe="")
    admin.execute_command("ACL", "SETUSER", "reader", "on", f">{password}", "~team:*", "+@all", "-@dangerous")
    admin.execute_command("ACL", "SETUSER", "root", "on", ">root-pw", "~*", "&*", "+@all")
    admin.execute_command("ACL", "SETUSER", "default", "off")  # no anonymous access from here on
    host = f"127.0.0.1:{server.port}"
    url = f"redis://reader:{quoted}@{host}/0/doc?prefix=team"
    root = client_for(f"redis://root:root-pw@{host}/0")

    saved(model, tmp_path / "local", url)
    want = opened(tmp_path / "local", model)
    with KVTierCache.open(url, model, store_path=tmp_path / "cache", **BUDGETS) as far:
        same(decode(model, far, STEPS), want)
        shown = [far.remote, repr(far), repr(far.tiers.disk.url), str(far.tiers.disk.url), far.tiers.disk.where,
                 repr(far.tiers.disk.server.client), str(far.store_path)]
    assert [s["name"] for s in list_sessions(RemoteURL.parse(url))] == ["doc"]

    errors = [
        refused(RemoteStoreError, KVTierCache.open, url.replace(quoted, "wrong-" + quoted[:5]), model),
        refused(RemoteStoreError, KVTierCache.open, f"redis://reader:{quoted}@{host}/0/doc?prefix=other", model),
        refused(StoreNotFoundError, KVTierCache.open, f"redis://reader:{quoted}@{host}/0/none?prefix=team", model),
        refused(SessionExistsError, saved, model, tmp_path / "second", url),
    ]
    assert "refused the credentials" in str(errors[0]) and "ACL" in str(errors[1])
    for key in root.scan_iter(match="*", count=1000):
        assert key.startswith(b"team:{doc}:"), key
    server.stop()
    errors.append(refused(RemoteStoreError, KVTierCache.open, url, model, store_path=tmp_path / "cache"))
    assert "cannot reach the server" in str(errors[-1])

    forms = {password, quoted, urllib.parse.quote_plus(password), password[3:15]}
    for text in shown + [str(e) for e in errors] + [repr(e) for e in errors]:
        assert not any(f in text for f in forms), text
    files = [p for p in tmp_path.rglob("*") if p.is_file() and "redis-" not in str(p.relative_to(tmp_path))]
    assert any(p.parent.name == "cache" for p in files) and any(p.parent.name == "local" for p in files)
    for path in files:
        data = path.read_bytes()
        assert not any(f.encode() in data for f in forms), path


def test_tls(model, private_redis, tmp_path):
    """rediss:// to a private TLS-only server with a self-signed CA (ssl_ca_certs= in the URL)."""
    tls = make_tls_files(tmp_path / "tls")
    server = private_redis(tls=tls)
    base = f"rediss://127.0.0.1:{server.port}/0"
    url = f"{base}/doc?ssl_ca_certs={tls.ca}&prefix=tls"
    saved(model, tmp_path / "local", url)
    same(opened(url, model), opened(tmp_path / "local", model))
    assert [s["name"] for s in list_sessions(RemoteURL.parse(url))] == ["doc"]
    err = refused(RemoteStoreError, KVTierCache.open, f"{base}/doc?prefix=tls", model)  # the CA is not trusted
    assert "cannot reach the server" in str(err)
    refused(RemoteStoreError, KVTierCache.open, f"redis://127.0.0.1:{server.port}/0/doc?prefix=tls", model)


# -------------------------------------------------------------------------------------- hostile data
def _forged_pointer(**changes):
    def damage(client, keys):
        pointer = unseal(client.get(keys["pointer"]), "pointer")
        client.set(keys["pointer"], seal({**pointer, **changes}))
    return damage


def _flip(key: str, at: int = -7):
    def damage(client, keys):
        value = bytearray(client.get(keys[key] if key in keys else key))
        value[at] ^= 0x10
        client.set(keys[key], bytes(value))
    return damage


def _flip_record(client, keys):
    rkey = keys["records"][len(keys["records"]) // 2]
    value = bytearray(client.get(rkey))
    value[len(value) // 2] ^= 0x01
    client.set(rkey, bytes(value))


def _index(change):
    def damage(client, keys):
        index = unseal(client.get(keys["index"]), "index")
        client.set(keys["index"], seal(change(index)))
    return damage


def _drop_row(index):
    return {"records": index["records"][1:]}


def _shrink_sizes(index):
    return {"records": [[k, max(1, n // 2)] for k, n in index["records"]]}


def _shift_size(index):
    """One record's size too small, another's larger by as much: the total still covers the manifest."""
    (k0, n0), (k1, n1), *rest = index["records"]
    return {"records": [[k0, n0 // 2], [k1, n1 + n0 - n0 // 2], *rest]}


HOSTILE = {
    "pointer bad seal": (_flip("pointer"), StoreCorruptError, "checksum"),
    "pointer not sealed": (lambda c, k: c.set(k["pointer"], b'{"format": "kvtier-remote-session"}'),
                           StoreCorruptError, "not a sealed"),
    "pointer a hash": (lambda c, k: (c.delete(k["pointer"]), c.hset(k["pointer"], "a", "b")), StoreCorruptError,
                       "not a string value"),
    "pointer too large": (lambda c, k: c.set(k["pointer"], b"x" * (remote.POINTER_MAX_BYTES + 1)),
                          StoreCorruptError, "more than"),
    "pointer wrong format": (_forged_pointer(format="something-else"), StoreCorruptError, "not a kvtier session"),
    "pointer wrong version": (_forged_pointer(version=99), StoreMismatchError, "another kvtier version"),
    "pointer bad ns": (_forged_pointer(ns="../../etc"), StoreCorruptError, "pointer is damaged"),
    "pointer of another name": (_forged_pointer(name="other"), StoreCorruptError, "pointer is damaged"),
    "pointer bad count": (_forged_pointer(records=-1), StoreCorruptError, "not a count"),
    "pointer huge count": (_forged_pointer(bytes=10**400), StoreCorruptError, "not a count"),  # broke the listing
    "pointer names a missing namespace": (_forged_pointer(ns="0" * 32), StoreCorruptError, "lost its metadata"),
    "store header damaged": (_flip("store"), StoreCorruptError, "checksum"),
    "manifest damaged": (_flip("session"), StoreCorruptError, "checksum"),
    "manifest not a dict": (lambda c, k: c.set(k["session"], seal([1, 2])), StoreError, "no complete session"),
    "index damaged": (_flip("index"), StoreCorruptError, "checksum"),
    "index missing": (lambda c, k: c.delete(k["index"]), StoreCorruptError, "index is missing"),
    "index row dropped": (_index(_drop_row), StoreCorruptError, "index is damaged"),
    "index sizes negative": (_index(lambda i: {"records": [[k, -n] for k, n in i["records"]]}), StoreCorruptError,
                             "index is damaged"),
    "index sizes too large": (_index(lambda i: {"records": [[k, 1 << 40] for k, _ in i["records"]]}),
                              StoreCorruptError, "index is damaged"),
    "index sizes too small": (_index(_shrink_sizes), StoreCorruptError, "declare"),
    "index size of one record too small": (_index(_shift_size), StoreCorruptError, "the session's index says"),
    # sizes that bound nothing: a manifest re-sealed to match could size buffers from them before a record is read
    "index sizes larger than the records": (_index(lambda i: {"records": [[k, n + 4096] for k, n in i["records"]]}),
                                            StoreCorruptError, "the session's index says"),
    "index names other keys": (_index(lambda i: {"records": [["ff" + k[2:], n] for k, n in i["records"]]}),
                               StoreMissingRecordError, "missing"),
    "record flipped": (_flip_record, StoreCorruptError, ""),
    "record missing": (lambda c, k: c.delete(k["records"][3]), StoreMissingRecordError, "no longer on the server"),
    "record a list": (lambda c, k: (c.delete(k["records"][3]), c.rpush(k["records"][3], "x")), StoreCorruptError,
                      "not a string value"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_server_data_is_refused(model, redis_url, tmp_path, case):
    """Each damage to what the server holds: a one-line StoreError subclass at open or at the first read,
    never wrong logits and never an exception of another kind."""
    damage, cls, says = HOSTILE[case]
    url = with_name(redis_url, "doc")
    saved(model, tmp_path / "local", url)
    client = raw(redis_url)
    damage(client, layout(client, prefix_of(redis_url), "doc"))
    err = refused(cls, opened, url, model)  # exact mode: every record is read
    assert says in str(err), str(err)


def test_record_larger_than_its_index_says_is_refused_before_it_is_read(model, private_redis, tmp_path):
    server = private_redis()
    url = f"{server.url}/doc?prefix=p"
    saved(model, tmp_path / "local", url)
    client = server.client()
    keys = layout(client, "p", "doc")
    client.append(keys["records"][5], b"\0" * (16 << 20))  # 16 MiB more than the index allows
    sent = client.info("stats")["total_net_output_bytes"]
    err = refused(StoreCorruptError, opened, url, model)
    assert "the session's index says" in str(err)  # its length checked at open, by STRLEN
    assert client.info("stats")["total_net_output_bytes"] - sent < 2 << 20  # the record was never sent


def test_manifests_swapped_between_sessions(model, redis_url, tmp_path):
    """Session a's records with session b's manifest (same model, same length): refused, never b's logits."""
    client = raw(redis_url)
    for name, seed in (("a", 5), ("b", 6)):
        saved(model, tmp_path / name, with_name(redis_url, name), seed=seed)
    a, b = (layout(client, prefix_of(redis_url), n) for n in "ab")
    sa, sb = client.get(a["session"]), client.get(b["session"])
    client.set(a["session"], sb)
    client.set(b["session"], sa)
    for name in "ab":
        err = refused(StoreError, opened, with_name(redis_url, name), model)
        assert isinstance(err, StoreMismatchError | StoreCorruptError), repr(err)


@pytest.mark.parametrize("which", [4, -1])  # a chunk; the last record (a layer's recent window)
def test_records_swapped_between_sessions(model, redis_url, tmp_path, which):
    """Session a's record replaced by session b's under the same key, its index entry made to fit: each
    record is bound to its session, so a refuses it instead of decoding b's tokens."""
    client = raw(redis_url)
    for name, seed in (("a", 5), ("b", 6)):
        saved(model, tmp_path / name, with_name(redis_url, name), seed=seed)
    a, b = (layout(client, prefix_of(redis_url), n) for n in "ab")
    ra = a["records"][which]
    rb = b["records"][[r.rsplit(":", 1)[1] for r in b["records"]].index(ra.rsplit(":", 1)[1])]
    client.set(ra, client.get(rb))
    index = unseal(client.get(a["index"]), "index")
    index["records"] = [[k, client.strlen(ra) if ra.endswith(k) else n] for k, n in index["records"]]
    client.set(a["index"], seal(index))
    err = refused(StoreError, opened, with_name(redis_url, "a"), model)
    assert isinstance(err, StoreMismatchError | StoreCorruptError), repr(err)
    assert "more than" not in str(err)  # refused by the record's own binding, not by its size


# ------------------------------------------------------------------------------------------------ faults
def test_server_going_away_mid_decode(model, private_redis, tmp_path):
    """The server dies between sparse decode steps: a one-line RemoteStoreError at the first step that needs a
    record not cached locally; the cache closes; the local cache directory stays a valid cache of the session:
    reopening it needs the server (a one-line error while it is down) and, once it is back, reads only the
    records not cached yet and decodes exactly as the local session."""
    server = private_redis()
    url = f"{server.url}/doc?prefix=p"
    saved(model, tmp_path / "local", url, tokens=800)
    tokens = list(range(3, 40))
    want = opened(tmp_path / "local", model, tokens, **SPARSE)
    client = server.client()
    keys = layout(client, "p", "doc")
    total = record_bytes(client, keys)
    client.save()  # the data survives the crash below (restored by start())

    far = KVTierCache.open(url, model, store_path=tmp_path / "cache", **BUDGETS, **SPARSE)
    same(decode(model, far, tokens[:1]), want[:1])
    before = far.tiers.disk.fetched_bytes
    server.stop()
    got = []
    with pytest.raises(RemoteStoreError) as info:
        for t in tokens[1:]:
            got += decode(model, far, [t])
    assert "\n" not in str(info.value) and "cannot reach the server" in str(info.value)
    same(got, want[1:1 + len(got)])  # the steps that needed nothing new were right
    assert len(got) < len(tokens) - 1  # a step did need the server
    assert far.tiers.disk.fetched_bytes == before
    far.close()

    refused(RemoteStoreError, KVTierCache.open, url, model, store_path=tmp_path / "cache", **BUDGETS, **SPARSE)
    server.start()
    with KVTierCache.open(url, model, store_path=tmp_path / "cache", **BUDGETS, **SPARSE) as again:
        same(decode(model, again, tokens), want)
        assert again.tiers.disk.fetched_bytes <= total - before


def test_timeout(model, private_redis, tmp_path):
    """A server that stops answering (CLIENT PAUSE, longer than the bounded retries with socket_timeout= from
    the URL): a one-line RemoteStoreError mid-decode and at open; once it answers again, the session reopens
    from the same local cache and decodes exactly."""
    server = private_redis()
    url = f"{server.url}/doc?prefix=p&socket_timeout=0.05&socket_connect_timeout=0.05"
    saved(model, tmp_path / "local", url, tokens=800)
    want = opened(tmp_path / "local", model, STEPS, **SPARSE)
    admin = server.client()

    def paused(fn, *args, **kwargs) -> Exception:
        admin.execute_command("CLIENT", "PAUSE", "3000", "ALL")  # every retry of one command fits in this
        try:
            err = refused(RemoteStoreError, fn, *args, **kwargs)
        finally:
            server.client().ping()  # answered when the pause ends (nothing can end it sooner)
        assert "did not answer in time" in str(err)
        return err

    far = KVTierCache.open(url, model, store_path=tmp_path / "cache", **BUDGETS, **SPARSE)
    paused(decode, model, far, STEPS)
    far.close()
    paused(KVTierCache.open, url, model, **BUDGETS)
    same(opened(url, model, STEPS, store_path=tmp_path / "cache", **SPARSE), want)


class _Failing(DiskStore):
    """A real local store whose reads fail after `good` batches, as a disk failing mid-publish would (publish
    reads 64 records at a time: the second read fails, after the first ones were sent)."""

    good = 1

    def get_many(self, keys):
        self.good -= 1
        if self.good < 0:
            raise StoreCorruptError(f"kvtier store {self.where}: the disk failed")
        return super().get_many(keys)


def test_interrupted_publish_leaves_nothing_visible(model, redis_url, tmp_path, monkeypatch):
    """A publish whose source fails midway: its error, no session, and nothing of it left on the server."""
    monkeypatch.setattr(remote, "BATCH_BYTES", 8 << 10)  # several batches for a tiny session
    saved(model, tmp_path / "local")
    url = RemoteURL.parse(with_name(redis_url, "doc"))
    store = _Failing(tmp_path / "local", create=False)
    try:
        seen = []
        err = refused(StoreCorruptError, publish, store, list(store.keys()), url, progress=seen.append)
        assert "the disk failed" in str(err) and seen  # records had been written
    finally:
        store.close()
    refused(StoreNotFoundError, KVTierCache.open, with_name(redis_url, "doc"), model)
    assert list_sessions(url) == []
    assert list(raw(redis_url).scan_iter(match=prefix_of(redis_url) + ":*")) == []


def test_killed_publish_is_invisible_and_expires(model, redis_url, tmp_path, monkeypatch):
    """A publishing process killed midway: records on the server but no pointer, so open and list do not see
    it; every key it wrote expires; the name stays free."""
    monkeypatch.setattr(remote, "BATCH_BYTES", 8 << 10)
    saved(model, tmp_path / "local")
    url = RemoteURL.parse(with_name(redis_url, "doc"))
    pid = os.fork()
    if pid == 0:  # the publishing machine, killed after its first batch of records
        try:
            with DiskStore(tmp_path / "local", create=False, readonly=True) as store:
                publish(store, list(store.keys()), url, progress=lambda n: os.kill(os.getpid(), signal.SIGKILL))
        finally:
            os._exit(3)
    assert os.waitpid(pid, 0)[1] == signal.SIGKILL
    client = raw(redis_url)
    left = list(client.scan_iter(match=prefix_of(redis_url) + ":*"))
    assert left and not any(k.endswith(b":session") for k in left)
    assert all(0 < client.ttl(k) <= remote.PUBLISH_TTL_S for k in left)
    refused(StoreNotFoundError, KVTierCache.open, with_name(redis_url, "doc"), model)
    assert list_sessions(url) == []
    monkeypatch.undo()
    with DiskStore(tmp_path / "local", create=False) as store:
        publish(store, list(store.keys()), url)  # the name was free
    same(opened(with_name(redis_url, "doc"), model), opened(tmp_path / "local", model))
    assert all(client.ttl(k) > 0 for k in left)  # the leftovers still expire; nothing made them permanent


def test_evicted_keys_are_named_as_evicted(model, private_redis, tmp_path):
    """A server under maxmemory with allkeys-random evicts session keys: opening, or reading from a session
    opened before, fails naming the eviction; never wrong logits."""
    server = private_redis("--maxmemory", "3mb", "--maxmemory-policy", "allkeys-random")
    client = server.client()
    for name in ("early", "late"):
        saved(model, tmp_path / name, f"{server.url}/{name}?prefix=p", seed=len(name))
    records = [k for name in ("early", "late") for k in layout(client, "p", name)["records"]]
    early = KVTierCache.open(f"{server.url}/early?prefix=p", model, **BUDGETS)  # exact: reads all at the 1st step
    junk = os.urandom(64 << 10)
    for i in range(20000):
        client.set(f"junk:{i}", junk)
        if i % 20 == 0 and not sum(client.exists(k) for k in records):
            break
    assert not sum(client.exists(k) for k in records)
    err = refused(StoreMissingRecordError, decode, model, early, STEPS)
    assert "evicted" in str(err)
    early.close()
    err = refused(StoreError, KVTierCache.open, f"{server.url}/late?prefix=p", model)
    assert isinstance(err, StoreNotFoundError | StoreCorruptError) and "evict" in str(err), repr(err)


def test_two_machines_publish_one_name(model, redis_url, tmp_path):
    """Two publishers race to the same name (both have written their records): exactly one session stays,
    the other gets SessionExistsError and none of its keys remain."""
    for name, seed in (("one", 5), ("two", 6)):
        saved(model, tmp_path / name, seed=seed)
    url = RemoteURL.parse(with_name(redis_url, "doc"))
    both_written = threading.Barrier(2, timeout=30)
    results: dict[str, object] = {}

    def machine(name: str) -> None:
        with DiskStore(tmp_path / name, create=False, readonly=True) as store:
            try:
                results[name] = publish(store, list(store.keys()), url, progress=lambda n: both_written.wait())
            except Exception as exc:  # noqa: BLE001 - recorded for the assertions below
                results[name] = exc

    threads = [threading.Thread(target=machine, args=(n,)) for n in ("one", "two")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    winners = [n for n, r in results.items() if isinstance(r, dict)]
    losers = [n for n, r in results.items() if isinstance(r, SessionExistsError)]
    assert len(winners) == 1 and len(losers) == 1, results
    assert "\n" not in str(results[losers[0]]) and "published a session named 'doc' first" in str(results[losers[0]])
    client = raw(redis_url)
    keys = layout(client, prefix_of(redis_url), "doc")
    assert keys["ns"] == results[winners[0]]["ns"]
    everything = sorted(k.decode() for k in client.scan_iter(match=prefix_of(redis_url) + ":*"))
    assert everything == sorted([keys["pointer"], *keys["all"]])  # nothing of the loser's
    assert [s["name"] for s in list_sessions(url)] == ["doc"]
    same(opened(with_name(redis_url, "doc"), model), opened(tmp_path / winners[0], model))


def test_unpublish_removes_every_key(model, redis_url, tmp_path):
    url = with_name(redis_url, "doc")
    saved(model, tmp_path / "local", url)
    client = raw(redis_url)
    far = KVTierCache.open(url, model, **BUDGETS)  # a machine reading it while it is deleted
    assert unpublish(RemoteURL.parse(url)) is True
    assert list(client.scan_iter(match=prefix_of(redis_url) + ":*")) == []
    assert unpublish(RemoteURL.parse(url)) is False
    err = refused(StoreMissingRecordError, decode, model, far, STEPS)
    assert "unpublished" in str(err)
    far.close()
    refused(StoreNotFoundError, KVTierCache.open, url, model)


def test_a_late_unpublish_leaves_the_session_published_again_since(model, redis_url, tmp_path, monkeypatch):
    """Machine U reads the pointer to unpublish; meanwhile machine R replaces the session (unpublish, publish).
    U deleted R's new pointer, and R's records stayed on the server with no pointer and no expiry."""
    url = with_name(redis_url, "doc")
    saved(model, tmp_path / "old", url, seed=5)
    original, replaced = remote._checked_pointer, []

    def replaced_meanwhile(server, name, raw):
        pointer = original(server, name, raw)
        if not replaced:  # U has read the pointer: R goes first
            replaced.append(True)
            assert unpublish(RemoteURL.parse(url)) is True
            saved(model, tmp_path / "new", url, seed=6)
        return pointer

    monkeypatch.setattr(remote, "_checked_pointer", replaced_meanwhile)
    assert unpublish(RemoteURL.parse(url)) is False  # U's session was gone already; R's is not U's to delete
    monkeypatch.undo()
    same(opened(url, model), opened(tmp_path / "new", model))
    assert unpublish(RemoteURL.parse(url)) is True
    assert list(raw(redis_url).scan_iter(match=prefix_of(redis_url) + ":*")) == []


def test_unpublish_removes_a_session_whose_pointer_is_damaged(model, redis_url, tmp_path):
    url = with_name(redis_url, "doc")
    saved(model, tmp_path / "local", url)
    client = raw(redis_url)
    keys = layout(client, prefix_of(redis_url), "doc")
    client.set(keys["pointer"], b"garbage")
    refused(StoreCorruptError, KVTierCache.open, url, model)
    assert unpublish(RemoteURL.parse(url)) is True
    assert list(client.scan_iter(match=prefix_of(redis_url) + ":*")) == []


def test_password_from_the_environment(model, private_redis, tmp_path, monkeypatch):
    """KVTIER_REDIS_PASSWORD gives the password to a URL that carries none (so it stays off command lines); a
    password in the URL wins; without either the server refuses, in one line."""
    server = private_redis()
    server.client().config_set("requirepass", "env-secret-pw")
    url = f"redis://127.0.0.1:{server.port}/0/doc"
    monkeypatch.delenv(remote.PASSWORD_ENV, raising=False)
    error = refused(RemoteStoreError, list_sessions, url)
    assert "refused the credentials" in str(error)
    monkeypatch.setenv(remote.PASSWORD_ENV, "env-secret-pw")
    saved(model, tmp_path / "local", url)
    assert [s["name"] for s in list_sessions(url)] == ["doc"]
    same(opened(url, model), opened(tmp_path / "local", model))
    monkeypatch.setenv(remote.PASSWORD_ENV, "wrong")
    assert [s["name"] for s in list_sessions(f"redis://:env-secret-pw@127.0.0.1:{server.port}/0")] == ["doc"]
    error = refused(RemoteStoreError, list_sessions, url)
    assert "env-secret-pw" not in str(error) and "wrong" not in str(error).replace("went wrong", "")


def test_a_read_only_replica_refuses_a_publish_in_the_servers_words(model, private_redis, tmp_path):
    """A publish to a replica fails as one line that quotes the server, never the pipelined command
    with the record's bytes; nothing is left and the local session stands."""
    primary = private_redis()
    replica = private_redis("--replicaof", "127.0.0.1", str(primary.port))
    url = f"{replica.url}/doc"
    cache = prefill(model, tmp_path / "local")
    error = refused(RemoteStoreError, cache.save, remote=url)
    cache.close()
    assert "read only replica" in str(error) and "Command #" not in str(error) and "\\x" not in str(error), str(error)
    assert list_sessions(primary.url) == [] and list(primary.client().scan_iter(match="*")) == []
    assert len(opened(tmp_path / "local", model)) == len(STEPS)


# ------------------------------------------------------------------------------------ a server that lies
class _LyingServer:
    """A hostile server: a small RESP server of this test's own, on a loopback port, that serves a copy of a
    published session (every key and value, taken from the real server) and answers one command its own way.
    What it proves is what kvtier does with replies no Redis server would send."""

    def __init__(self, data: dict[bytes, bytes], lie=None, trickle=None):
        """trickle(command, args): seconds between the bytes of that command's reply (None: all at once)."""
        import socketserver

        self.data, self.lie = data, lie or (lambda command, args, data: None)
        self.trickle = trickle or (lambda command, args: None)
        outer = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                while True:
                    try:
                        request = outer._read(self.rfile)
                    except (ConnectionError, ValueError):
                        return
                    if request is None:
                        return
                    reply, pause = outer._encode(outer._answer(request)), outer.trickle(request[0].upper(), request[1:])
                    if pause is None:
                        self.wfile.write(reply)
                        continue
                    try:
                        for i in range(len(reply)):  # each byte well within the socket timeout, all far past it
                            self.wfile.write(reply[i:i + 1])
                            self.wfile.flush()
                            time.sleep(pause)
                    except OSError:  # the client gave up and closed the connection
                        return

        socketserver.ThreadingTCPServer.daemon_threads = True
        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @staticmethod
    def _read(rfile) -> list[bytes] | None:
        line = rfile.readline()
        if not line:
            return None
        if not line.startswith(b"*"):
            raise ValueError(line)
        args = []
        for _ in range(int(line[1:])):
            size = int(rfile.readline()[1:])
            args.append(rfile.read(size + 2)[:-2])
        return args

    def _answer(self, request: list[bytes]):
        command, args = request[0].upper(), request[1:]
        lied = self.lie(command, args, self.data)
        if lied is not None:
            return lied
        if command in (b"CLIENT", b"SELECT", b"PING"):
            return "OK"
        if command == b"STRLEN":
            return len(self.data.get(args[0], b""))
        if command == b"GETRANGE":
            return self.data.get(args[0], b"")[int(args[1]):int(args[2]) + 1]
        if command == b"GET":
            return self.data.get(args[0])
        if command == b"EXISTS":
            return sum(a in self.data for a in args)
        return Exception(f"ERR unknown command '{command.decode()}'")

    def _encode(self, value) -> bytes:
        if value is None:
            return b"$-1\r\n"
        if isinstance(value, Exception):
            return b"-" + str(value).encode() + b"\r\n"
        if isinstance(value, str):
            return b"+" + value.encode() + b"\r\n"
        if isinstance(value, bool | int):
            return b":%d\r\n" % value
        if isinstance(value, bytes):
            return b"$%d\r\n%s\r\n" % (len(value), value)
        return b"*%d\r\n" % len(value) + b"".join(self._encode(v) for v in value)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def published(model, redis_base, tmp_path_factory):
    """A session published on the real server, copied key by key (then removed from it), and its local logits."""
    import secrets

    prefix = f"kvtier-test-{secrets.token_hex(4)}"
    root = tmp_path_factory.mktemp("lying")
    saved(model, root / "local", with_name(f"{redis_base}?prefix={prefix}", "doc"))
    client = raw(redis_base)
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    data = {k: client.get(k) for k in keys}
    client.unlink(*keys)
    return prefix, data, opened(root / "local", model)


def _record_keys(data: dict[bytes, bytes]) -> list[bytes]:
    return sorted(k for k in data if b":r:" in k)


LIES = {
    # the length of a value as a string, not a number
    "strlen a string": (lambda c, a, d: b"12" if c == b"STRLEN" else None, StoreCorruptError, "answered"),
    # GETRANGE answered with a number: bytes(n) would make n zero bytes
    "getrange a huge number": (lambda c, a, d: 1 << 40 if c == b"GETRANGE" else None, StoreCorruptError,
                               "answered"),
    "getrange a list": (lambda c, a, d: [b"x"] * 3 if c == b"GETRANGE" else None, StoreCorruptError, "answered"),
    # more bytes than the length it gave, or than were asked for
    "getrange longer than strlen": (
        lambda c, a, d: d.get(a[0], b"") + b"\0" * 100 if c == b"GETRANGE" and a[0] in d else None,
        StoreCorruptError, "bytes of a"),
    # a record's length within its bound, then fewer bytes
    "getrange shorter than strlen": (
        lambda c, a, d: d[a[0]][:-3] if c == b"GETRANGE" and a[0] in _record_keys(d)[2:3] else None,
        StoreCorruptError, "bytes of a"),
    # every record missing although the index lists it
    "records gone": (lambda c, a, d: (0 if c == b"STRLEN" else b"" if c == b"GETRANGE" else 0 if c == b"EXISTS"
                                      else None) if a and b":r:" in a[0] else None,
                     StoreMissingRecordError, "no longer on the server"),
    "every command an error": (lambda c, a, d: Exception("ERR no") if c not in (b"CLIENT",) else None,
                               RemoteStoreError, "failed"),
}


@pytest.mark.parametrize("case", list(LIES))
def test_a_lying_server_is_refused_in_one_line(model, published, tmp_path, case):
    """Replies of the wrong type or size from a server that is not what it seems: a one-line StoreError naming
    the key, before any of it is used, never another exception, never an allocation the reply asks for."""
    prefix, data, _ = published
    lie, cls, says = LIES[case]
    server = _LyingServer(data, lie)
    try:
        url = f"redis://127.0.0.1:{server.port}/0/doc?prefix={prefix}&socket_timeout=2"
        err = refused(cls, opened, url, model)
        assert says in str(err), str(err)
    finally:
        server.close()


def test_a_server_trickling_its_reply_is_cut_off_like_a_silent_one(model, published):
    """A byte every 0.1 s never trips a 0.25 s socket timeout, and the manifest's few kilobytes would take minutes:
    each try of the round trip ends after REPLY_TIMEOUTS socket timeouts, and the bounded retries then give up."""
    prefix, data, _ = published
    server = _LyingServer(data, trickle=lambda command, args: 0.1 if args and b"meta:session" in args[0] else None)
    try:
        url = f"redis://127.0.0.1:{server.port}/0/doc?prefix={prefix}&socket_timeout=0.25"
        start = time.monotonic()
        err = refused(RemoteStoreError, opened, url, model)
        assert "did not answer in time" in str(err), str(err)
        assert time.monotonic() - start < 60  # 4 tries of 1 s and the backoff, not the minutes the reply takes
    finally:
        server.close()


def test_the_lying_server_serves_the_session_exactly_when_it_does_not_lie(model, published, tmp_path):
    prefix, data, want = published
    server = _LyingServer(data)
    try:
        same(opened(f"redis://127.0.0.1:{server.port}/0/doc?prefix={prefix}&socket_timeout=2", model), want)
    finally:
        server.close()
