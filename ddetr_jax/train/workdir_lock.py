"""One training run per workdir: an exclusive lock on WORKDIR/train.lock.

Two runs writing the same checkpoints and metrics destroy each other's work,
so a second train.py on a workdir in use stops at once, naming the process
that holds it. The lock is an flock on the file (the operating system frees
it when its process ends, however it ends: a run killed with SIGKILL leaves
no lock behind); the file holds the holder's host, pid and start time for the
message. Where the filesystem has no flock, the file alone is the lock: one
left by a process no longer alive on this host is taken over.

    with WorkdirLock(workdir):   # raises WorkdirBusy if another run holds it
        ...
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import pathlib
import socket
import time

LOCK_FILE = "train.lock"


class WorkdirBusy(RuntimeError):
    """Another training run holds the workdir."""


def _alive(pid: int) -> bool:
    """Whether process `pid` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _holder(text: str) -> dict:
    """The JSON a lock file holds ({} when empty or unreadable: a released lock)."""
    try:
        holder = json.loads(text)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _held_elsewhere(holder: dict) -> bool:
    """Without flock: whether `holder` may still be running (another host, or a live
    process on this one that is not this process)."""
    if not holder:
        return False
    if holder.get("host") != socket.gethostname():
        return True
    pid = int(holder.get("pid", 0))
    return pid != os.getpid() and _alive(pid)


class WorkdirLock:
    """The exclusive lock of a workdir (a context manager; see the module doc)."""

    def __init__(self, workdir):
        self.path = pathlib.Path(workdir).expanduser().absolute() / LOCK_FILE
        self._fd = None
        self._flocked = False

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

    def acquire(self) -> None:
        """Takes the lock, or raises WorkdirBusy naming its holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._flocked = True
        except OSError as error:
            holder = _holder(os.pread(fd, 65536, 0).decode(errors="replace"))
            no_flock = error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)
            if not no_flock or _held_elsewhere(holder):
                os.close(fd)
                raise WorkdirBusy(self._busy_message(holder)) from None
        record = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def _busy_message(self, holder: dict) -> str:
        who = (f"train.py (pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, "
               f"started {holder.get('started', '?')})" if holder else "another process")
        return (f"{self.path.parent} is in use by {who}: two runs on one workdir would "
                f"overwrite each other's checkpoints. Wait for it to finish (or stop it), or "
                f"use another --workdir. The lock is {self.path}; it is freed when that "
                "process ends.")

    def release(self) -> None:
        """Frees the lock (empties the file: a released lock names no holder)."""
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        if self._flocked:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None
