"""Real Redis/Valkey servers for the remote-tier tests: the shared one CI starts, and private ones a test
starts itself (to stop it, pause it or fill it up). No mocks: what the tests claim about a server, a server did.

`KVTIER_TEST_REDIS` names the shared server (default redis://127.0.0.1:6379/0). Without a reachable server,
or without the `redis-server` binary for private ones, the tests skip saying why; with
`KVTIER_REQUIRE_REDIS=1` (set by .ci/run) they fail instead.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

DEFAULT_URL = "redis://127.0.0.1:6379/0"


def _unavailable(why: str):
    if os.environ.get("KVTIER_REQUIRE_REDIS") == "1":
        pytest.fail(f"KVTIER_REQUIRE_REDIS=1 but {why}")
    pytest.skip(why)


def client_for(url: str):
    import redis

    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2)


@pytest.fixture(scope="session")
def redis_base():
    """The shared server's URL; every test's keys go under a prefix of their own (removed afterwards)."""
    try:
        import redis  # noqa: F401
    except ImportError:
        _unavailable("the redis client is not installed (pip install -e '.[dev]')")
    url = os.environ.get("KVTIER_TEST_REDIS", DEFAULT_URL)
    try:
        client_for(url).ping()
    except Exception as exc:  # noqa: BLE001 - any failure means no server to test against
        _unavailable(f"no Redis/Valkey server at {url} ({type(exc).__name__}); set KVTIER_TEST_REDIS")
    return url


@pytest.fixture
def redis_url(redis_base):
    """`redis_base` with a fresh key prefix (`?prefix=`); the prefix's keys are deleted after the test."""
    prefix = f"kvtier-test-{secrets.token_hex(4)}"
    yield f"{redis_base}?prefix={prefix}"
    client = client_for(redis_base)
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    for i in range(0, len(keys), 1000):
        client.unlink(*keys[i:i + 1000])


def with_name(url: str, name: str) -> str:
    """`redis://h:p/0/NAME?prefix=...` from `redis://h:p/0?prefix=...`."""
    base, _, query = url.partition("?")
    return f"{base}/{name}" + (f"?{query}" if query else "")


class PrivateServer:
    """A redis-server process of one test's own, on a free loopback port, in a directory of its own (where
    `stop(save=True)` leaves its data for the next `start()`). tls: a `TLSFiles` to serve TLS only."""

    def __init__(self, workdir: Path, *args: str, tls: "TLSFiles | None" = None):
        self.port = _free_port()
        self.workdir = workdir / f"redis-{self.port}"
        self.workdir.mkdir()
        self.args = args
        self.tls = tls
        if tls is None:
            self.url = f"redis://127.0.0.1:{self.port}/0"
            self.listen = ["--port", str(self.port)]
        else:
            self.url = f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={tls.ca}"
            self.listen = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(tls.cert),
                           "--tls-key-file", str(tls.key), "--tls-ca-cert-file", str(tls.ca),
                           "--tls-auth-clients", "no"]
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        log = self.workdir / "server.log"
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                ["redis-server", *self.listen, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", str(self.workdir), *self.args], stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                client_for(self.url).ping()
                return
            except Exception:  # noqa: BLE001 - not up yet
                if self.proc.poll() is not None:
                    break
                time.sleep(0.05)
        self.stop()
        said = log.read_text(errors="replace")
        if self.tls is not None and "tls" in said.lower() and ("bad directive" in said.lower()
                                                               or "not supported" in said.lower()):
            _unavailable("this redis-server was built without TLS support (--tls-port refused)")
        raise RuntimeError(f"redis-server on port {self.port} did not start: {said.strip()[-300:]}")

    def client(self, url: str | None = None):
        return client_for(url or self.url)

    def stop(self, *, save: bool = False) -> None:
        """Kill the server (as a crash would); save=True first writes its data to disk for `start()`."""
        if save:
            self.client().save()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


@dataclass(frozen=True)
class TLSFiles:
    """A self-signed CA and a server certificate for 127.0.0.1 it signed."""

    ca: Path
    cert: Path
    key: Path


def make_tls_files(directory: Path) -> TLSFiles:
    """Certificates for a private TLS server (openssl). Skips (fails under KVTIER_REQUIRE_REDIS=1) without
    openssl."""
    if shutil.which("openssl") is None:
        _unavailable("no openssl binary to make certificates for a TLS server with")
    directory.mkdir(parents=True, exist_ok=True)
    files = TLSFiles(directory / "ca.crt", directory / "server.crt", directory / "server.key")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(directory / "ca.key"), "-out",
            str(files.ca), "-days", "2", "-subj", "/CN=kvtier test CA")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(files.key), "-out", str(directory / "server.csr"),
            "-subj", "/CN=127.0.0.1")
    (directory / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("x509", "-req", "-in", str(directory / "server.csr"), "-CA", str(files.ca), "-CAkey",
            str(directory / "ca.key"), "-CAcreateserial", "-out", str(files.cert), "-days", "2", "-extfile",
            str(directory / "ext.cnf"))
    return files


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def private_redis(tmp_path):
    """A factory of private servers: `private_redis(*extra redis-server args, tls=None)`; all stopped after the
    test."""
    try:
        import redis  # noqa: F401
    except ImportError:
        _unavailable("the redis client is not installed (pip install -e '.[dev]')")
    if shutil.which("redis-server") is None:
        _unavailable("no redis-server binary to start a private server with (apt-get install redis-server)")
    servers: list[PrivateServer] = []

    def start(*args: str, tls: TLSFiles | None = None) -> PrivateServer:
        server = PrivateServer(tmp_path, *args, tls=tls)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()

