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
