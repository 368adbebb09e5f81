"""Sessions on a Redis/Valkey server: publish a saved session under a name, reopen it on another machine.

The server is an existing one (Redis, or its fork Valkey: the same protocol), reached with the maintained
`redis` client: one connection pool per store, pipelined batches, socket timeouts and bounded retries with
backoff. Keys live under a prefix (default "kvtier") and a session's keys share the hash tag `{name}`, so on a
cluster one session lives in one slot:

    PREFIX:{NAME}:session              the pointer, sealed JSON: the namespace and a summary. Commit point.
    PREFIX:{NAME}:NS:meta:store        the store header (sealed JSON, as in a local store)
    PREFIX:{NAME}:NS:meta:session      the session manifest (sealed JSON)
    PREFIX:{NAME}:NS:index             every record's key and size (sealed JSON)
    PREFIX:{NAME}:NS:r:KEYHEX          one record, byte for byte as the local store holds it

NS is random per publish. Records and metadata are written first, with a time to live, under a namespace
no pointer names; one server-side script then checks that the name is free and that every key is still there,
makes them permanent and writes the pointer. So a session appears complete or not at all, two machines
publishing one name leave exactly one session (the other gets `SessionExistsError` and its records are
deleted), and an interrupted publish leaves keys that expire.

Reading: `RemoteSessionStore` implements `RecordStore` over the published session and a local `DiskStore`
that caches each record the first time it is read, so a session is never downloaded up front and a second
run on the same machine reads nothing twice. What the server returns is untrusted data: every read is
bounded in size before it is made (a record by its size in the index, metadata by a fixed cap), a reply of
the wrong type or size (which no Redis server sends, a hostile one may) is refused before it is used, every entry
is sealed or checksummed, and the session goes through the same checks as a local one.

Credentials (a password or ACL user in the URL) are used to connect and never written into a store, a
message, a repr or a log: `RemoteURL.shown` is the URL without them. A URL without a password takes
`KVTIER_REDIS_PASSWORD` from the environment, which keeps it off command lines. The URL's query takes a few client
options (`socket_timeout=`, `socket_connect_timeout=`, and for rediss:// `ssl_ca_certs=` and the other ssl_
options); any other is refused when the URL is read.

Faults, and what a caller sees (each a one-line `StoreError` subclass, never wrong logits):
- the server unreachable or not answering: `RemoteStoreError` after bounded retries (one command waits at most
  4 socket timeouts plus 1.4 s of backoff; a server trickling its reply is cut off after REPLY_TIMEOUTS socket
  timeouts per try, so at most 16 plus the backoff), at the first read that needs a record not cached locally (steps
  that need none go on). The cache can be closed; its local directory stays a valid cache of the session, and
  reopening the URL with it once the server is back reads only the records it does not hold yet.
- a key evicted (a server under maxmemory with an eviction policy) or the session unpublished while read:
  `StoreMissingRecordError` saying so, at open (every record is checked there) or at the read;
- an interrupted publish: never visible; its keys expire after `PUBLISH_TTL_S`;
- two publishers of one name: one session; the other gets `SessionExistsError` and its keys are deleted;
- damaged or hostile data: `StoreCorruptError` / `StoreMismatchError`, reads bounded before they are made.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import (
    CacheInputError,
    RemoteStoreError,
    SessionExistsError,
    StoreCorruptError,
    StoreError,
    StoreFullError,
    StoreMismatchError,
    StoreMissingRecordError,
    StoreNotFoundError,
)
from .backend import RecordStore
from .chunk import key_name
from .disk import META_MAX_BYTES, DiskStore, seal, unseal
from .manifest import SESSION_META, STORE_META

SCHEMES = {"redis": "redis", "rediss": "rediss", "valkey": "redis", "valkeys": "rediss"}
DEFAULT_PREFIX = "kvtier"
PASSWORD_ENV = "KVTIER_REDIS_PASSWORD"  # the password for a URL that carries none
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_PREFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_NS = re.compile(r"[0-9a-f]{32}")
POINTER_FORMAT = "kvtier-remote-session"
POINTER_VERSION = 1
# Largest entries read from a server: a pointer, and any metadata (a manifest lists every chunk and token).
POINTER_MAX_BYTES = 1 << 20
RECORD_MAX_BYTES = 512 << 20  # the protocol's own limit on one value
BATCH_BYTES = 32 << 20  # bytes per pipelined round trip
PUBLISH_TTL_S = 24 * 3600  # an interrupted publish's keys expire after this
REMOTE_META = "remote"  # marker in a local cache store: which published session it caches

# Commit point of a publish: KEYS[1] the pointer, KEYS[2..] every key of the namespace. Atomic on the server.
_COMMIT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
for i = 2, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 0 then return -1 end
end
for i = 2, #KEYS do redis.call('PERSIST', KEYS[i]) end
redis.call('SET', KEYS[1], ARGV[1])
return 1
"""
# Unpublish's delete: the pointer (KEYS[1]) only while it is still the one read (ARGV[1]); a session published
# again under the name since then is another session, not this unpublish's to delete.
_DELETE_IF_SAME = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _shown(server: str, name: str | None, prefix: str) -> str:
    """The URL as messages and `cache.remote` show it: no credentials, but all that names the session (a prefix
    other than the default included), so that it reopens the same session."""
    return server + (f"/{name}" if name else "") + (f"?prefix={prefix}" if prefix != DEFAULT_PREFIX else "")


def is_remote(target: object) -> bool:
    """Whether `target` names a server session (redis://, rediss://, valkey://, valkeys://) and not a path."""
    return isinstance(target, str) and target.split("://", 1)[0].lower() in SCHEMES and "://" in target


@dataclass(frozen=True)
class RemoteURL:
    """A server URL split into what connects (credentials included, never shown) and what names a session.

    Form: `redis://[user:password@]host[:port][/db[/name]][?prefix=P&...]`; `rediss://` for TLS; `valkey://`
    and `valkeys://` are the same. A few more query options go to the client (see `_check_options`)."""

    connect: str = field(repr=False)  # holds the credentials: never shown
    shown: str
    name: str | None
    prefix: str
    secrets: tuple[str, ...] = field(repr=False)

    @classmethod
    def parse(cls, text: str, *, name: str | None = None, prefix: str | None = None) -> "RemoteURL":
        if not isinstance(text, str) or not is_remote(text):
            # the text is named unless it may hold credentials (user:password@host)
            given = (f"{text[:80]!r} is not one" if isinstance(text, str) and "@" not in text else
                     f"got {type(text).__name__}" if not isinstance(text, str) else "got something else")
            raise CacheInputError(f"a remote must be a URL such as redis://host:6379/0/NAME (rediss:// for TLS; "
                                  f"valkey:// and valkeys:// also work); {given}")
        if name is not None and not isinstance(name, str):
            raise CacheInputError(f"a session name is a str, got {type(name).__name__}")
        # A '/', '?' or '#' left unencoded in a password ends the host part early: the rest of the password is
        # then read as a port or a path, and an error that quoted it would show part of the password.
        encode = ("percent-encode '/', '?', '#' and '@' in a user name or password (%2F, %3F, %23, %40), or give "
                  f"the password in ${PASSWORD_ENV}")
        try:
            parts = urllib.parse.urlsplit(text)
            host, port = parts.hostname, parts.port
        except ValueError as exc:  # urllib's message may quote what it took for a port: part of a password
            raise CacheInputError("cannot read the remote URL's host and port"
                                  + (f": {encode}" if "@" in text else f" ({exc})")) from None
        if "@" in parts.path + parts.query + parts.fragment:
            raise CacheInputError(f"the remote URL has an '@' after its host: {encode}")
        if port == 0:  # a client would take port 0 as "not given" and connect to 6379
            raise CacheInputError("the remote URL's port must be 1-65535, not 0")
        # user and password are percent-encoded in a URL ('@' as %40): decode them once, encode them once below
        username = None if parts.username is None else urllib.parse.unquote(parts.username)
        password = None if parts.password is None else urllib.parse.unquote(parts.password)
        if password is None and os.environ.get(PASSWORD_ENV):  # keeps it off command lines and shell history
            password = os.environ[PASSWORD_ENV]
        scheme = SCHEMES[parts.scheme.lower()]
        if not host:
            raise CacheInputError("the remote URL names no host (redis://host:6379/0/NAME)")
        segments = [s for s in parts.path.split("/") if s]
        if len(segments) > 2:
            raise CacheInputError("the remote URL's path is /DB/NAME: a database number and a session name")
        db = segments[0] if segments else "0"
        if not db.isdigit() or int(db) > 1 << 16:
            raise CacheInputError("the remote URL's database must be a number"
                                  + (f", not {db[:40]!r}" if "@" not in text else f" ({encode})"))
        url_name = urllib.parse.unquote(segments[1]) if len(segments) == 2 else None
        if name is not None and url_name is not None and name != url_name:
            raise CacheInputError(f"two session names: {url_name!r} in the URL and {name!r}")
        name = name if name is not None else url_name
        if name is not None and not _NAME.fullmatch(name):
            raise CacheInputError("a session name is 1-128 letters, digits, '.', '_' or '-', starting with a letter "
                                  "or digit")
        query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        url_prefix = [v for k, v in query if k == "prefix"]
        query = [(k, v) for k, v in query if k != "prefix"]
        _check_options(query, tls=scheme == "rediss")
        prefix = prefix if prefix is not None else (url_prefix[-1] if url_prefix else DEFAULT_PREFIX)
        if not _PREFIX.fullmatch(prefix):
            raise CacheInputError("a key prefix is 1-64 letters, digits, '.', '_' or '-'")
        netloc = f"[{host}]" if ":" in host else host
        netloc += f":{port}" if port else ""
        shown = _shown(f"{parts.scheme.lower()}://{netloc}/{db}", name, prefix)
        cred = ""
        if username or password:
            cred = urllib.parse.quote(username or "", safe="") + (
                ":" + urllib.parse.quote(password, safe="") if password is not None else "") + "@"
        connect = urllib.parse.urlunsplit((scheme, cred + netloc, f"/{db}", urllib.parse.urlencode(query), ""))
        secret = [password] + [v for k, v in query if k in _SECRET_OPTIONS]
        hidden = tuple(dict.fromkeys(form for s in secret if s for form in (
            s, urllib.parse.quote(s, safe=""), urllib.parse.quote_plus(s, safe=""))))
        return cls(connect, shown, name, prefix, hidden)

    def __str__(self) -> str:
        return self.shown

    def need_name(self) -> str:
        if self.name is None:
            raise CacheInputError(f"{self.shown}: name the session (redis://host:6379/0/NAME, or name=...)")
        return self.name

    @property
    def server(self) -> str:
        """scheme://host:port/db: the server and database, without credentials, session name or prefix."""
        base = self.shown.split("?", 1)[0]
        return base.rsplit("/", 1)[0] if self.name else base

    def with_name(self, name: str) -> "RemoteURL":
        return RemoteURL(self.connect, _shown(self.server, name, self.prefix), name, self.prefix, self.secrets)

    def scrub(self, text: str) -> str:
        """`text` with any credential of this URL replaced by ***."""
        for s in self.secrets:
            text = text.replace(s, "***")
        return text


# Options a URL's query may pass to the client (redis-py reads them from the URL); anything else is refused
# here, as a one-line error, rather than by the client at the first command.
_NUMBER_OPTIONS = {"socket_timeout", "socket_connect_timeout", "max_connections"}
_MOST_TIMEOUT_S = 86400  # a day: longer waits on one socket operation are a typo
_FLAG_OPTIONS = {"socket_keepalive", "ssl_check_hostname"}
_TLS_OPTIONS = {"ssl_ca_certs", "ssl_ca_path", "ssl_certfile", "ssl_keyfile", "ssl_password", "ssl_cert_reqs",
                "ssl_check_hostname", "ssl_min_version"}
_SECRET_OPTIONS = {"ssl_password"}


def _check_options(query: list[tuple[str, str]], *, tls: bool) -> None:
    """Refuse query options the client would reject at the first command (names only in messages: a value
    may be a secret)."""
    known = sorted(_NUMBER_OPTIONS | _FLAG_OPTIONS | _TLS_OPTIONS)
    for key, value in query:
        if key in ("password", "username", "user"):
            raise CacheInputError("put credentials in the URL as redis://USER:PASSWORD@host..., not in its query")
        if key in _TLS_OPTIONS and not tls:
            raise CacheInputError(f"the remote URL option {key[:40]!r} needs TLS: use rediss://")
        if key not in _NUMBER_OPTIONS | _FLAG_OPTIONS | _TLS_OPTIONS:
            raise CacheInputError(f"unknown remote URL option {key[:40]!r} (known: prefix, {', '.join(known)})")
        if key in _NUMBER_OPTIONS | {"ssl_min_version"}:
            timeout = key in ("socket_timeout", "socket_connect_timeout")
            most = _MOST_TIMEOUT_S if timeout else 2**31 - 1  # a socket's deadline must fit the clock (1e300 did not)
            try:
                ok = 0 < float(value) <= most and (timeout or float(value).is_integer())
            except ValueError:
                ok = False
            if not ok or len(value) > 20:
                raise CacheInputError(f"the remote URL option {key!r} must be a positive number"
                                      + (f" of seconds, at most {_MOST_TIMEOUT_S}" if timeout else
                                         f" (a whole one, at most {most})"))
        if key in _FLAG_OPTIONS and value.lower() not in ("0", "1", "true", "false", "yes", "no", "y", "n"):
            raise CacheInputError(f"the remote URL option {key!r} is true or false")
        if key == "ssl_cert_reqs" and value.lower() not in ("none", "optional", "required"):
            raise CacheInputError("the remote URL option 'ssl_cert_reqs' is none, optional or required")


# -------------------------------------------------------------------------------------------- server
class RedisServer:
    """One connection pool to a server and the key layout of sessions on it; server errors become
    `RemoteStoreError` naming the URL without credentials."""

    def __init__(self, url: RemoteURL, *, timeout_s: float = 10.0, retries: int = 3):
        try:
            import redis
            from redis.backoff import ExponentialBackoff
            from redis.retry import Retry
        except ImportError:
            raise StoreError("sessions on a server need the redis client: pip install 'kvtier[remote]'") from None
        self.url = url
        self._redis = redis
        # No health_check_interval: its PING runs under the same Retry inside each retried command, which
        # multiplies the attempts, so a stalled server would hold a caller far past the bound below.
        # Bound on one command: (retries + 1) timeouts plus the backoff (0.2 + 0.4 + 0.8 s for 3 retries).
        with self.errors("connect"):
            try:
                self.client = redis.Redis.from_url(
                    url.connect, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                    connection_class=_deadline_connection(redis, url.connect.startswith("rediss:")),
                    retry=Retry(ExponentialBackoff(cap=2.0, base=0.1), retries),
                    retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError],
                    client_name="kvtier")
            except (ValueError, TypeError) as exc:  # an option the client refuses (parse checks most)
                raise CacheInputError(f"{url.shown}: {url.scrub(str(exc))}") from None

    def errors(self, doing: str):
        return _ServerErrors(self, doing)

    # key layout
    def tag(self, name: str) -> str:
        return f"{self.url.prefix}:{{{name}}}"

    def pointer_key(self, name: str) -> str:
        return f"{self.tag(name)}:session"

    def data_key(self, name: str, ns: str, what: str) -> str:
        return f"{self.tag(name)}:{ns}:{what}"

    def record_key(self, name: str, ns: str, key: bytes) -> str:
        return self.data_key(name, ns, "r:" + key.hex())

    def get_bounded(self, keys: list[str], limits: list[int], what: str) -> list[bytes | None]:
        """Values of `keys` (None where absent), reading at most `limits[i]` bytes of each: a longer value is
        refused before it is read. One round trip per `BATCH_BYTES`."""
        out: list[bytes | None] = []
        i = 0
        while i < len(keys):
            j, size = i, 0
            while j < len(keys) and (j == i or size + limits[j] <= BATCH_BYTES):
                size += limits[j]
                j += 1
            part = list(zip(keys[i:j], limits[i:j]))
            replies = self._pipelined(f"read {what}", lambda pipe: [
                (pipe.strlen(key), pipe.getrange(key, 0, max(limit, 1) - 1)) for key, limit in part])
            for (key, limit), length, value in zip(part, replies[0::2], replies[1::2]):
                if isinstance(length, Exception) or isinstance(value, Exception):
                    raise StoreCorruptError(f"{self.url.shown}: {what} {_short(key)} is not a string value (written "
                                            "there by something other than kvtier)")
                # A Redis server answers STRLEN with a number and GETRANGE with bytes; anything else is refused
                # before it is used (bytes() of a number would allocate that many bytes).
                if isinstance(length, bool) or not isinstance(length, int) or not isinstance(value, bytes):
                    raise StoreCorruptError(f"{self.url.shown}: {what} {_short(key)}: the server answered "
                                            f"{type(length).__name__} and {type(value).__name__} for its length and "
                                            "bytes (is it a Redis or Valkey server?)")
                if length <= 0 or not value:  # absent (or deleted between the two commands)
                    out.append(None)
                elif length > limit:
                    raise StoreCorruptError(f"{self.url.shown}: {what} {_short(key)} holds {length} bytes, more than "
                                            f"the {limit} it may")
                elif len(value) != length:
                    raise StoreCorruptError(f"{self.url.shown}: {what} {_short(key)}: the server sent {len(value)} "
                                            f"bytes of a {length}-byte value")
                else:
                    out.append(value)
            i = j
        return out

    def _pipelined(self, doing: str, ask: Callable[[Any], Any]) -> list[Any]:
        """The replies to the commands `ask` queues on a pipeline, in one round trip. A refusal (NOPERM, ...) is
        raised, for `errors` to word; a WRONGTYPE reply stays in the list, for the caller to name its key."""
        with self.errors(doing):
            pipe = self.client.pipeline(transaction=False)
            ask(pipe)
            replies = pipe.execute(raise_on_error=False)
            wrong = next((r for r in replies if isinstance(r, Exception)), None)
            if wrong is not None and "WRONGTYPE" not in str(wrong):
                raise wrong
        return replies

    def lengths(self, keys: list[str], what: str) -> list[int]:
        """Each value's length in bytes (0 where absent), 1000 keys a round trip, nothing of the values read."""
        out: list[int] = []
        for i in range(0, len(keys), 1000):
            part = keys[i:i + 1000]
            replies = self._pipelined(f"check {what}s", lambda pipe: [pipe.strlen(key) for key in part])
            for key, length in zip(part, replies):
                if isinstance(length, Exception):
                    raise StoreCorruptError(f"{self.url.shown}: {what} {_short(key)} is not a string value (written "
                                            "there by something other than kvtier)")
                if isinstance(length, bool) or not isinstance(length, int) or length < 0:
                    raise StoreCorruptError(f"{self.url.shown}: {what} {_short(key)}: the server answered "
                                            f"{type(length).__name__} for its length (is it a Redis or Valkey server?)")
                out.append(length)
        return out

    def get_sealed(self, key: str, limit: int, what: str) -> Any | None:
        raw = self.get_bounded([key], [limit], what)[0]
        return None if raw is None else unseal(raw, f"{self.url.shown}: {what}")

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:  # noqa: BLE001 - closing a pool to a server that went away is not an error
            pass


REPLY_TIMEOUTS = 4  # one round trip (a command, or a pipeline's batch) may take this many socket timeouts


class _DeadlineSocket:
    """A connected socket whose reads end REPLY_TIMEOUTS socket timeouts after the request they answer was
    sent. The socket timeout alone bounds each read, so a server that trickles a reply (a byte every few
    seconds) would hold a caller for as long as it likes; this cuts it off as if it had gone silent (the client
    then retries, boundedly). Everything else is the socket's."""

    def __init__(self, sock: Any, timeout: float | None):
        self._sock, self._timeout, self._deadline = sock, timeout, None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    def settimeout(self, timeout: float | None) -> None:
        self._timeout = timeout
        self._sock.settimeout(timeout)

    def gettimeout(self) -> float | None:
        return self._timeout

    def sendall(self, data: Any, *args: Any) -> None:
        if self._timeout is not None:
            self._deadline = time.monotonic() + REPLY_TIMEOUTS * self._timeout
        self._sock.sendall(data, *args)

    def _arm(self) -> None:
        if self._deadline is None or self._timeout is None:
            return
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout(f"the reply took longer than {REPLY_TIMEOUTS} socket timeouts")
        self._sock.settimeout(min(self._timeout, left))

    def recv(self, *args: Any) -> bytes:
        self._arm()
        return self._sock.recv(*args)

    def recv_into(self, *args: Any) -> int:
        self._arm()
        return self._sock.recv_into(*args)


def _deadline_connection(redis: Any, tls: bool) -> type:
    """The client's connection class (TLS or not) with `_DeadlineSocket`s."""
    base = redis.SSLConnection if tls else redis.Connection

    class DeadlineConnection(base):
        def _connect(self):
            sock = super()._connect()
            return _DeadlineSocket(sock, sock.gettimeout())

    return DeadlineConnection


class _ServerErrors:
    """Turn the client's exceptions into one-line `RemoteStoreError`s without credentials."""

    def __init__(self, server: RedisServer, doing: str):
        self.server, self.doing = server, doing

    def __enter__(self):
        return self

    def __exit__(self, typ, exc, tb):
        if exc is None or not isinstance(exc, self.server._redis.exceptions.RedisError):
            return False
        e = self.server._redis.exceptions
        url = self.server.url
        if isinstance(exc, e.AuthenticationError | e.AuthorizationError) or "NOAUTH" in str(exc) or "WRONGPASS" in str(
                exc):
            why = "the server refused the credentials (check the user and password in the URL)"
        elif isinstance(exc, e.NoPermissionError) or str(exc).startswith("NOPERM"):
            why = (f"the server's ACL does not let this user do it (it needs keys {url.prefix}:* and the string, "
                   "scan and script commands)")
        elif isinstance(exc, e.TimeoutError):
            why = "the server did not answer in time"
        elif isinstance(exc, e.ConnectionError):
            why = f"cannot reach the server ({url.scrub(str(exc)).rstrip('.')})"
        elif "OOM" in str(exc):
            why = "the server is out of memory (maxmemory); raise it or free room"
        else:  # a pipeline's error repeats the command, record bytes included: keep the server's words only
            why = url.scrub(str(exc).split(" of pipeline caused error: ", 1)[-1])
        raise RemoteStoreError(f"{url.shown}: {self.doing} failed: {why}") from None


def _short(key: str) -> str:
    return key if len(key) < 90 else key[:87] + "..."


# ------------------------------------------------------------------------------------------- publish
def publish(store: RecordStore, keys: Iterable[bytes], url: RemoteURL, *,
            progress: Callable[[int], None] | None = None, timeout_s: float = 10.0) -> dict[str, Any]:
    """Copy a saved session (its header, manifest and the records `keys`) from `store` to the server under
    `url.name`; returns the pointer's summary. Raises SessionExistsError if the name is taken (nothing of this
    publish stays on the server), RemoteStoreError if the server fails (what was written expires)."""
    name = url.need_name()
    header, manifest = store.get_meta(STORE_META), store.get_meta(SESSION_META)
    if not isinstance(header, dict) or not isinstance(manifest, dict) or manifest.get("state") != "complete":
        raise StoreError(f"kvtier store {store.where} holds no complete session to publish; save it first")
    server = RedisServer(url, timeout_s=timeout_s)
    ns = secrets.token_hex(16)
    written: list[str] = []
    try:
        pointer = server.pointer_key(name)
        with server.errors("look up the session name"):
            taken = server.client.exists(pointer)
        if taken:
            raise SessionExistsError(f"{url.shown}: a session named {name!r} is already published (published "
                                     "sessions never change: choose another name, or unpublish it first)")
        index: list[list[Any]] = []
        keys = list(dict.fromkeys(keys))
        pipe, sent, size = server.client.pipeline(transaction=False), len(index), 0

        def send() -> None:
            """Write what the pipeline holds (up to about BATCH_BYTES of records) in one round trip."""
            nonlocal pipe, sent, size
            with server.errors("publish records"):
                pipe.execute()
            if progress is not None:
                progress(len(index) - sent)
            pipe, sent, size = server.client.pipeline(transaction=False), len(index), 0

        for i in range(0, len(keys), 64):  # each record read once, 64 at a time
            part = keys[i:i + 64]
            for key, blob in zip(part, store.get_many(part)):
                if blob is None:
                    raise StoreError(f"kvtier store {store.where}: record {key.hex()} is missing; cannot publish")
                rkey = server.record_key(name, ns, key)
                pipe.set(rkey, bytes(blob), ex=PUBLISH_TTL_S)
                written.append(rkey)
                index.append([key.hex(), len(blob)])
                size += len(blob)
                if size >= BATCH_BYTES:
                    send()
        if len(index) > sent:
            send()
        total = sum(n for _, n in index)
        meta = {server.data_key(name, ns, "meta:" + STORE_META): seal(header),
                server.data_key(name, ns, "meta:" + SESSION_META): seal(manifest),
                server.data_key(name, ns, "index"): seal({"records": index})}
        with server.errors("publish the manifest"):
            pipe = server.client.pipeline(transaction=False)
            for key, value in meta.items():
                pipe.set(key, value, ex=PUBLISH_TTL_S)
                written.append(key)
            pipe.execute()
        summary = {
            "format": POINTER_FORMAT, "version": POINTER_VERSION, "ns": ns, "name": name,
            "records": len(index), "bytes": total + sum(len(v) for v in meta.values()),
            "published": time.time(), "length": manifest.get("length"), "batch": manifest.get("batch"),
            "dtype": header.get("dtype"), "signature": header.get("signature"),
            "structure": header.get("structure"), "info": _small(manifest.get("info")),
        }
        with server.errors("commit the session"):
            done = server.client.eval(_COMMIT, 1 + len(written), pointer, *written, seal(summary))
        if done == 0:
            raise SessionExistsError(f"{url.shown}: another machine published a session named {name!r} first; "
                                     "that one stays (published sessions never change)")
        if done != 1:
            raise RemoteStoreError(f"{url.shown}: records were evicted while publishing (the server is under "
                                   "maxmemory with an eviction policy); give it room or set maxmemory-policy "
                                   "noeviction, then publish again")
        written = []
        return summary
    finally:
        if written:  # not committed: take back what this publish wrote (it would expire anyway)
            try:
                for part in _batched(written, 1000):
                    server.client.unlink(*part)
            except Exception:  # noqa: BLE001 - the server may be gone: the keys expire after PUBLISH_TTL_S
                pass
        server.close()


def _small(info: Any) -> dict[str, Any]:
    """The session's user info for listings, with long values cut."""
    if not isinstance(info, dict):
        return {}
    return {str(k)[:64]: (v if isinstance(v, int | float | bool) or v is None else str(v)[:200])
            for k, v in list(info.items())[:16]}


# ---------------------------------------------------------------------------------- list and delete
def read_pointer(server: RedisServer, name: str) -> dict[str, Any] | None:
    """The checked pointer of session `name`, or None if none is published."""
    return _checked_pointer(server, name, _pointer_bytes(server, name))


def _pointer_bytes(server: RedisServer, name: str) -> bytes | None:
    return server.get_bounded([server.pointer_key(name)], [POINTER_MAX_BYTES], f"session {name!r}")[0]


def _checked_pointer(server: RedisServer, name: str, raw: bytes | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    where = f"{server.url.shown}: session {name!r}"
    value = unseal(raw, where)
    if not isinstance(value, dict) or value.get("format") != POINTER_FORMAT:
        raise StoreCorruptError(f"{where} is not a kvtier session")
    if value.get("version") != POINTER_VERSION:
        raise StoreMismatchError(f"{where} was published by another kvtier version (format "
                                 f"{str(value.get('version'))[:20]!r}); publish it again with this one")
    if not isinstance(value.get("ns"), str) or not _NS.fullmatch(value["ns"]) or value.get("name") != name:
        raise StoreCorruptError(f"{where}: its pointer is damaged")
    for count in ("records", "bytes", "length"):  # below 2**63, as any store's are (10**400 broke the listing)
        if not isinstance(value.get(count), int) or isinstance(value.get(count), bool) or not 0 <= value[count] < 2**63:
            raise StoreCorruptError(f"{where}: {count} is not a count")
    return value


def list_sessions(url: str | RemoteURL, *, timeout_s: float = 10.0) -> list[dict[str, Any]]:
    """Every session published under the URL's prefix (their pointers' summaries), by name."""
    url = url if isinstance(url, RemoteURL) else RemoteURL.parse(url)
    server = RedisServer(url, timeout_s=timeout_s)
    try:
        names = []
        pattern = f"{url.prefix}:{{*}}:session"
        with server.errors("list sessions"):
            for key in server.client.scan_iter(match=pattern, count=1000):
                key = key.decode(errors="replace")
                name = key[len(url.prefix) + 2:-len("}:session")]
                if _NAME.fullmatch(name):
                    names.append(name)
        out = []
        for name in sorted(set(names)):
            try:
                pointer = read_pointer(server, name)
            except StoreError as exc:
                out.append({"name": name, "error": str(exc)})
                continue
            if pointer is not None:
                out.append(pointer)
        return out
    finally:
        server.close()


def unpublish(url: str | RemoteURL, *, timeout_s: float = 10.0) -> bool:
    """Delete a published session: its pointer first (it disappears at once), then its records. Machines that
    are reading it fail with a missing-record error, never wrong logits. False if there was none."""
    url = url if isinstance(url, RemoteURL) else RemoteURL.parse(url)
    name = url.need_name()
    server = RedisServer(url, timeout_s=timeout_s)
    try:
        raw = None
        try:
            raw = _pointer_bytes(server, name)
            pointer = _checked_pointer(server, name, raw)
        except RemoteStoreError:
            raise
        except StoreError:  # a damaged pointer names no namespace we can trust
            pointer = {"ns": None}
        with server.errors("delete the session"):
            if pointer is None:
                return False
            # the pointer goes only if it is still the one read: deleted or published again since, it is not ours
            # (one that is not even a string value is deleted as it is)
            key = server.pointer_key(name)
            if not (server.client.eval(_DELETE_IF_SAME, 1, key, raw) if raw is not None else server.client.delete(key)):
                return False
            if pointer["ns"] is not None:
                for keys in _batched(server.client.scan_iter(match=server.data_key(name, pointer["ns"], "*"),
                                                             count=1000), 1000):
                    server.client.unlink(*keys)
            else:  # every permanent key of the name: committed data; a publish under way has a TTL on its keys
                for keys in _batched(server.client.scan_iter(match=f"{server.tag(name)}:*", count=1000), 1000):
                    pipe = server.client.pipeline(transaction=False)
                    for key in keys:
                        pipe.ttl(key)
                    old = [key for key, ttl in zip(keys, pipe.execute()) if ttl == -1]
                    current = read_pointer(server, name)  # a session published since keeps its records
                    if current is not None:
                        mine = server.data_key(name, current["ns"], "").encode()
                        old = [key for key in old if not key.startswith(mine)]
                    if old:
                        server.client.unlink(*old)
        return True
    finally:
        server.close()


def _batched(it: Iterable, n: int) -> Iterator[list]:
    batch = []
    for x in it:
        batch.append(x)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


# --------------------------------------------------------------------------------------------- read
class RemoteSessionStore(RecordStore):
    """A published session as a `RecordStore`: metadata and the record index read once at open, records read
    on demand (in batches where the tier manager says which come next) and kept in a local `DiskStore`.

    local: the local cache's directory; a new one, or one that caches this same publish (its records are
    reused), never another store. None: a temporary directory, removed on close."""

    def __init__(self, url: RemoteURL, *, local: str | Path | None = None, timeout_s: float = 10.0,
                 initial_map_bytes: int = 1 << 28, max_bytes: int | None = None):
        self.url = url
        name = url.need_name()
        self.server = RedisServer(url, timeout_s=timeout_s)
        self.local: DiskStore | None = None
        try:
            pointer = read_pointer(self.server, name)
            if pointer is None:
                raise StoreNotFoundError(f"{url.shown}: no session named {name!r} is published there (an interrupted "
                                         "publish never appears; a server under maxmemory with an eviction policy "
                                         "may also have evicted it)")
            self.pointer = pointer
            ns = pointer["ns"]
            self._meta = {m: self.server.get_sealed(self.server.data_key(name, ns, "meta:" + m), META_MAX_BYTES,
                                                    f"session {name!r} {m} metadata")
                          for m in (STORE_META, SESSION_META)}
            if any(v is None for v in self._meta.values()):
                raise StoreCorruptError(f"{url.shown}: session {name!r} lost its metadata (evicted from the server?)")
            self._index = self._read_index(name, ns)
            self.local = self._open_local(local, ns, initial_map_bytes, max_bytes)
        except BaseException:
            self.close()
            raise
        self._removed: set[bytes] = set()
        self._count = threading.Lock()  # reader threads fetch at once
        self.fetched_bytes = 0  # read from the server by this store (records only)

    def _read_index(self, name: str, ns: str) -> dict[bytes, int]:
        value = self.server.get_sealed(self.server.data_key(name, ns, "index"), META_MAX_BYTES,
                                       f"session {name!r} index")
        where = f"{self.url.shown}: session {name!r} index"
        if value is None:
            raise StoreCorruptError(f"{where} is missing (evicted from the server?)")
        rows = value.get("records") if isinstance(value, dict) else None
        if not isinstance(rows, list) or len(rows) != self.pointer["records"]:
            raise StoreCorruptError(f"{where} is damaged")
        index: dict[bytes, int] = {}
        for row in rows:
            if (not isinstance(row, list) or len(row) != 2 or not isinstance(row[0], str) or len(row[0]) > 64
                    or not isinstance(row[1], int) or isinstance(row[1], bool) or not 0 < row[1] <= RECORD_MAX_BYTES):
                raise StoreCorruptError(f"{where} is damaged")
            try:
                index[bytes.fromhex(row[0])] = row[1]
            except ValueError:
                raise StoreCorruptError(f"{where} is damaged") from None
        return index

    def _open_local(self, path: str | Path | None, ns: str, initial_map_bytes: int,
                    max_bytes: int | None) -> DiskStore:
        marker = {"ns": ns, "name": self.url.name, "prefix": self.url.prefix}
        if path is None:
            disk = DiskStore(tempfile.mkdtemp(prefix="kvtier-remote-"), initial_map_bytes=initial_map_bytes,
                             max_bytes=max_bytes, remove_on_close=True)
        else:
            path = Path(path)
            disk = DiskStore(path, create=True, initial_map_bytes=initial_map_bytes, max_bytes=max_bytes)
            try:
                held = disk.get_meta(REMOTE_META)
                if held is None and (disk.get_meta(STORE_META) is not None or disk.record_count()):
                    raise StoreError(f"kvtier store {path} is not a cache of a server session; choose another "
                                     "local directory for it")
                if held is not None and held != marker:  # another session, or another publish of this name
                    disk.close()
                    disk = DiskStore(path, create=True, wipe=True, initial_map_bytes=initial_map_bytes,
                                     max_bytes=max_bytes)
            except BaseException:
                disk.close()
                raise
        try:
            disk.put_many([], meta={REMOTE_META: marker, STORE_META: self._meta[STORE_META]})
        except BaseException:
            disk.close()
            raise
        return disk

    @property
    def where(self) -> str:
        return self.url.shown

    @property
    def path(self) -> Path | None:
        """The local cache's directory."""
        return None if self.local is None else self.local.path

    # ---------------------------------------------------------------------------------- records
    def get_many(self, keys: Iterable[bytes]) -> list[bytes | None]:
        keys = list(keys)
        out = self.local.get_many(keys)
        missing = [i for i, (k, v) in enumerate(zip(keys, out)) if v is None and k in self._index
                   and k not in self._removed]
        if missing:
            fetched = self._fetch([keys[i] for i in missing])
            for i, blob in zip(missing, fetched):
                out[i] = blob
        return out

    def warm(self, keys: Iterable[bytes]) -> None:
        keys = [k for k in keys if k in self._index and k not in self._removed]
        if keys:
            self._fetch(self.local.missing(keys))

    def _fetch(self, keys: list[bytes]) -> list[bytes | None]:
        """Read records from the server (bounded by their indexed sizes) and keep them in the local store."""
        if not keys:
            return []
        name, ns = self.url.name, self.pointer["ns"]
        blobs = self.server.get_bounded([self.server.record_key(name, ns, k) for k in keys],
                                        [self._index[k] for k in keys], f"session {name!r} record")
        gone = [k for k, b in zip(keys, blobs) if b is None]
        if gone:
            raise self._gone(gone)
        got = list(zip(keys, blobs))
        with self._count:
            self.fetched_bytes += sum(len(b) for _, b in got)
        try:
            self.local.put_many(got)
        except StoreFullError:
            pass  # the local cache is full: the records are still returned, only not kept
        return blobs

    def put_many(self, items: list[tuple[bytes, bytes]], meta: dict[str, Any] | None = None) -> None:
        if meta and set(meta) & {STORE_META, SESSION_META}:
            raise StoreError(f"{self.url.shown}: a session read from a server is not saved into its local cache; "
                             "publish a new one with cache.save(remote=...)")
        self.local.put_many(items, meta)
        self._removed.difference_update(k for k, _ in items)

    def remove_many(self, keys: Iterable[bytes]) -> None:
        keys = list(keys)
        self._removed.update(keys)  # first: gone from this session's view even where the local cache is too full
        self.local.remove_many(keys)  # to delete them (a refused delete leaves them there, unreferenced)

    def keys(self) -> Iterator[bytes]:
        seen = set()
        for key in (*self._index, *self.local.keys()):
            if key not in seen and key not in self._removed:
                seen.add(key)
                yield key

    def record_sizes(self, keys: Iterable[bytes]) -> list[int | None]:
        """Sizes of the records held locally, and of the rest as the server holds them (one STRLEN each, nothing
        read), None for keys neither holds. A listed record the server no longer holds (evicted, or the session
        unpublished) raises StoreMissingRecordError saying so, and one whose size is not the index's
        StoreCorruptError, before either is needed: the index bounds every later read of the record."""
        keys = list(keys)
        out = self.local.record_sizes(keys)
        ask = [i for i, (k, size) in enumerate(zip(keys, out))
               if size is None and k in self._index and k not in self._removed]
        name, ns = self.url.name, self.pointer["ns"]
        lengths = self.server.lengths([self.server.record_key(name, ns, keys[i]) for i in ask],
                                      f"session {name!r} record")
        evicted = [keys[i] for i, n in zip(ask, lengths) if not n]
        if evicted:  # the index lists them: the server lost them (a store without them says less)
            raise self._gone(evicted)
        for i, n in zip(ask, lengths):
            if n != self._index[keys[i]]:
                raise StoreCorruptError(f"{self.url.shown}: session {name!r}: {key_name(keys[i])} holds {n} bytes, "
                                        f"the session's index says {self._index[keys[i]]}")
            out[i] = n
        return out

    def _gone(self, keys: list[bytes]) -> StoreMissingRecordError:
        more = f" ({len(keys) - 1} more)" if len(keys) > 1 else ""
        return StoreMissingRecordError(
            f"{self.url.shown}: session {self.url.name!r}: {key_name(keys[0])}{more} is no longer on the server: "
            "evicted (the server is under maxmemory with an allkeys-* eviction policy; set noeviction, or a "
            "volatile-* policy, which spares published keys) or the session was unpublished. Publish it again")

    def get_meta(self, name: str) -> Any | None:
        if name in self._meta:
            return self._meta[name]
        return self.local.get_meta(name)

    def data_bytes(self) -> int:
        return sum(self._index.values()) + self.local.data_bytes()

    def sync(self) -> None:
        self.local.sync()

    def close(self) -> None:
        try:
            if self.local is not None:
                self.local.close()
        finally:
            self.server.close()
