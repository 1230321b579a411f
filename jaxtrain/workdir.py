"""One run per workdir: the workdir checks and its lock.

    check_workdir(workdir, checkpoint_bytes)    # writable, room for two checkpoints
    with WorkdirLock(workdir):                  # refuses a second run in the same workdir
        ...

The lock is `<workdir>/jaxtrain.lock`, a JSON of who holds it (host, pid, start time, command).
It is held two ways at once:

- an ``fcntl.flock`` on the file, which the kernel drops when the process dies (kill -9
  included), so on one host a lock left behind is recognised as stale at once;
- a heartbeat: the holder touches the file every ``HEARTBEAT_SECONDS``. A lock naming another
  host (whose flock this host may not see, e.g. on NFS) is live while its heartbeat is younger
  than ``STALE_SECONDS``, and taken over after that.

On multi-host runs only process 0 takes the lock (the other processes write no workdir files
of their own); every process learns whether it got it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import sys
import threading
import time

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from jaxtrain.errors import ConfigError

LOCK_NAME = "jaxtrain.lock"
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 300.0  # a lock of another host without a heartbeat for this long is stale


class WorkdirLockedError(ConfigError):
    """Another run holds the workdir's lock."""


def check_workdir(workdir: str, checkpoint_bytes: int) -> None:
    """Fail before training if the workdir cannot be written or cannot hold two checkpoints."""
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write-test-{jax.process_index()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(
            f"The workdir {workdir!r} is not writable ({e.strerror}). Choose another --workdir."
        ) from e
    free = shutil.disk_usage(workdir).free
    if free < 2 * checkpoint_bytes:
        raise ConfigError(
            f"The workdir {workdir!r} has {free / 2**20:.1f} MiB free, less than two checkpoints "
            f"of this run ({2 * checkpoint_bytes / 2**20:.1f} MiB). Free space or choose "
            "another --workdir."
        )


def _describe(holder: dict, age: float | None) -> str:
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "?"
    beat = f", last heartbeat {age:.0f} s ago" if age is not None else ""
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')!r}, started {when}"
            f"{beat}: {holder.get('command', '?')}")


class WorkdirLock:
    """The lock of one workdir (see the module docstring); a context manager."""

    def __init__(self, workdir: str, *, stale_seconds: float = STALE_SECONDS,
                 heartbeat_seconds: float = HEARTBEAT_SECONDS):
        self.workdir = os.path.abspath(workdir)
        self.path = os.path.join(self.workdir, LOCK_NAME)
        self.stale_seconds = stale_seconds
        self.heartbeat_seconds = heartbeat_seconds
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ one process

    def _open_locked(self) -> int | None:
        """An fd of the lock file with our flock on it, or None if a live process here holds
        it. Retries when the file was replaced between open and flock."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)  # the holder released (unlinked) it meanwhile: lock the new file

    def _read(self, fd: int) -> tuple[dict, float | None]:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = b""
        while chunk := os.read(fd, 65536):
            raw += chunk
        try:
            holder = json.loads(raw.decode()) if raw.strip() else {}
        except (ValueError, UnicodeDecodeError):
            holder = {"command": f"(unreadable lock file: {raw[:80]!r})"}
        age = time.time() - os.fstat(fd).st_mtime if raw.strip() else None
        return holder, age

    def _refuse(self, holder: dict, age: float | None) -> WorkdirLockedError:
        return WorkdirLockedError(
            f"The workdir {self.workdir} is in use by another jaxtrain run ("
            f"{_describe(holder, age)}). Two runs in one workdir would mix their metrics and "
            f"replace each other's checkpoints. Use another --workdir, or wait for that run to "
            f"end. If it is gone, its lock is stale: locks of this host are recovered at once, "
            f"locks of another host after {self.stale_seconds:.0f} s without a heartbeat, or "
            f"delete {self.path} yourself."
        )

    def _acquire_here(self) -> None:
        fd = self._open_locked()
        if fd is None:  # a live process on this host holds the flock
            with open(self.path, "rb") as f:
                raw = f.read()
            try:
                holder = json.loads(raw.decode())
            except (ValueError, UnicodeDecodeError):
                holder = {}
            raise self._refuse(holder, time.time() - os.stat(self.path).st_mtime)
        holder, age = self._read(fd)
        if holder:
            here = holder.get("host") == socket.gethostname()
            if not here and age is not None and age < self.stale_seconds:
                os.close(fd)  # another host's run, heartbeat fresh: its flock is not ours to see
                raise self._refuse(holder, age)
            logging.warning("Recovered a stale lock on %s (%s).", self.workdir,
                            _describe(holder, age))
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
              "command": " ".join(sys.argv) or sys.executable}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        self._thread = threading.Thread(target=self._beat, name="jaxtrain-lock-heartbeat",
                                        daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            with contextlib.suppress(OSError):  # a full disk must not kill the heartbeat
                os.utime(self.path)

    # ------------------------------------------------------------------ every process

    def acquire(self) -> WorkdirLock:
        """Take the lock (process 0), or raise WorkdirLockedError on every process."""
        error: Exception | None = None
        if jax.process_index() == 0:
            try:
                os.makedirs(self.workdir, exist_ok=True)
                self._acquire_here()
            except WorkdirLockedError as e:
                error = e
        if jax.process_count() > 1:
            ok = multihost_utils.broadcast_one_to_all(np.int32(error is None))
            if not ok and error is None:
                error = WorkdirLockedError(
                    f"Process 0 could not lock the workdir {self.workdir}: another run uses it "
                    "(process 0's log says which).")
        if error is not None:
            raise error
        return self

    def release(self) -> None:
        """Drop the lock (remove the file, then the flock). Idempotent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.remove(self.path)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
