"""One job per workdir: `<workdir>/run.lock`, held by process 0 of a training job while it runs.

The file names its holder ({"host", "pid", "started", "processes"}); the lock itself is an flock on it, which
the system drops when the holder dies. So a lock left by a run killed on this host (kill -9, a crash) is
taken over with a warning, while a live holder makes a second job stop with one line naming the file, host
and pid. A lock left by a job whose process 0 ran on another host cannot be checked from here: the refusal
says to delete the file once that job is gone. The other processes of a multi-host job share process 0's
lock. Bucket workdirs (gs://...) take no lock.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

import jax

from llava_jax.train import distributed

LOCK_FILE = "run.lock"
logger = logging.getLogger(__name__)


class WorkdirLocked(RuntimeError):
    """Another job holds the workdir (the message is one line naming the lock file, host and pid)."""


class WorkdirLock:
    """This job's hold on a workdir; `release` when the run ends (dying releases it too)."""

    def __init__(self, path: Path, fd: int | None):
        self.path, self._fd = path, fd

    def release(self) -> None:
        if self._fd is None:
            return
        if _same_file(self._fd, self.path):
            self.path.unlink()
        os.close(self._fd)
        self._fd = None


def acquire(workdir: str | os.PathLike) -> WorkdirLock:
    """Process 0 takes `<workdir>/run.lock` for this job and the others learn whether it did.
    Raises WorkdirLocked on every process when another job holds it."""
    path = Path(workdir) / LOCK_FILE
    if "://" in os.fspath(workdir):
        return WorkdirLock(path, None)
    lock, refusal = None, ""
    if jax.process_index() == 0:
        try:
            lock = _take(path)
        except WorkdirLocked as error:
            refusal = str(error)
    if not distributed.from_main_process(int(lock is not None)):
        raise WorkdirLocked(refusal or _refusal(path, _holder(path)))
    return lock or WorkdirLock(path, None)


def _take(path: Path, attempts: int = 3) -> WorkdirLock:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise WorkdirLocked(_refusal(path, _holder(path), alive=True)) from None
    if not _same_file(fd, path) and attempts > 1:  # its holder removed it meanwhile: lock the new one
        os.close(fd)
        return _take(path, attempts - 1)
    previous = _holder(path)
    if previous and previous.get("host") != socket.gethostname():
        os.close(fd)
        raise WorkdirLocked(_refusal(path, previous))
    if previous:
        logger.warning("%s: took over the stale lock of pid %s on host %s started %s (that run is gone: killed "
                       "or crashed)", path, previous.get("pid"), previous.get("host"), previous.get("started"))
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "processes": jax.process_count(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
    os.fsync(fd)
    return WorkdirLock(path, fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _holder(path: Path) -> dict:
    """What the lock file says of its holder ({} when empty or unreadable)."""
    try:
        holder = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _refusal(path: Path, holder: dict, alive: bool = False) -> str:
    who = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} (started {holder.get('started', '?')})"
    advice = "wait for it to finish or stop it, or use another --workdir" if alive else \
        f"if that job is gone (killed or crashed there), delete {path} and rerun"
    return f"workdir {path.parent} is in use by another training job: {path} is held by {who}; {advice}"
