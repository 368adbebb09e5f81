"""One process at a time per store: the second opener's error names the process that holds the store, never the
pid a writer left in kvtier.lock long ago (a read-only opener such as `kvtier inspect` writes none), and a lock
file left by a killed process blocks no one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from kvtier import StoreLockedError
from kvtier.store.disk import DiskStore

HOLD = "import sys, time; from kvtier.store.disk import DiskStore; d = DiskStore(sys.argv[1]); print('HELD', flush=True); time.sleep(60)"
OPEN_READ_ONLY = "import sys; from kvtier.store.disk import DiskStore; DiskStore(sys.argv[1], create=False, readonly=True)"


def _gone_pid() -> int:
    """The pid of a process that has exited."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_a_read_only_holder_is_named_not_the_last_writer(tmp_path):
    DiskStore(tmp_path / "s").close()
    stale = _gone_pid()
    (tmp_path / "s" / "kvtier.lock").write_text(str(stale))  # the writer that saved the store, long gone
    reader = DiskStore(tmp_path / "s", create=False, readonly=True)  # as kvtier inspect holds it
    try:
        out = subprocess.run([sys.executable, "-c", OPEN_READ_ONLY, str(tmp_path / "s")], capture_output=True,
                             text=True, timeout=60)
        assert out.returncode != 0 and "StoreLockedError" in out.stderr
        assert f"holder pid {os.getpid()})" in out.stderr and str(stale) not in out.stderr
        with pytest.raises(StoreLockedError, match="already open in this process"):
            DiskStore(tmp_path / "s")
    finally:
        reader.close()


def test_the_lock_of_a_killed_process_blocks_no_one(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "s")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "HELD"
        with pytest.raises(StoreLockedError, match=f"holder pid {holder.pid}\\)"):
            DiskStore(tmp_path / "s")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        holder.stdout.close()
    assert (tmp_path / "s" / "kvtier.lock").read_text() == str(holder.pid)  # left behind, and harmless:
    DiskStore(tmp_path / "s").close()
    DiskStore(tmp_path / "s", create=False, readonly=True).close()


def _in_child(work) -> str:
    """Run work() in a forked child; what it returns (or raises, as 'Name: message'), back through a pipe."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never back into pytest
        try:
            os.close(read)
            try:
                out = str(work())
            except BaseException as exc:  # noqa: BLE001 - the outcome is the test's to read
                out = f"{type(exc).__name__}: {exc}"
            os.write(write, out.encode()[:60000])
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        text = f.read()
    os.waitpid(pid, 0)
    return text


@pytest.mark.parametrize("temporary", [False, True], ids=["saved-store", "temporary-store"])
def test_a_forked_child_closing_the_store_leaves_the_parents_alone(tmp_path, temporary):
    """A child forked while a store is open runs its finalizers at exit: DiskStore.close there released the
    parent's flock (one open file description: another process then opened the store beside the parent),
    and would have deleted a temporary store under the parent."""
    import fcntl

    disk = DiskStore(tmp_path / "s", remove_on_close=temporary)
    disk.put_meta("probe", "kept")
    try:
        assert _in_child(lambda: disk.close() or "closed") == "closed"
        fd = os.open(tmp_path / "s" / "kvtier.lock", os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):  # still held by the parent's description
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        assert (tmp_path / "s").is_dir() and disk.get_meta("probe") == "kept"
    finally:
        disk.close()


def test_a_cache_refuses_a_forked_process(tmp_path):
    """Two children forked from one open session wrote their chunks under the same ids into the parent's store
    and read each other's KV back with every check passing (logits off by 0.68): a cache is refused in any
    process but the one that made it, in one line that says what to do."""
    import torch
    import transformers as tf

    from kvtier import KVTierCache, cache_argument

    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    cache = KVTierCache.for_model(model, store_path=tmp_path / "s", device_budget=40, host_budget=0,
                                  sink_tokens=4, recent_window=8, chunk_size=8)
    ids = torch.randint(0, 64, (1, 60))

    def feed():
        with torch.no_grad():
            model(input_ids=ids, **{cache_argument(model): cache})
        return "fed"

    try:
        assert feed() == "fed"
        for work in (feed, cache.save, cache.claim, cache.reset):
            said = _in_child(work)
            assert said.startswith("CacheThreadError: ") and "a forked process cannot use it" in said, said
            assert "\n" not in said
        assert feed() == "fed"  # the parent's cache is untouched
    finally:
        cache.close()
