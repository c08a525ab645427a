"""One writer per store: the lock a featurization holds, and the shared lock scoring holds while it reads.

The lock is ``fcntl.flock`` on ``<store>/.trak.lock``, which records its owner (host, process, command, since
when). The operating system releases it when its process ends, killed or not, so a lock left by a dead
process is taken over by the next run (its record is then stale, and replaced). A featurization holds the
exclusive lock from before it checks the store until it has written everything; scoring holds a shared lock
while it reads the store, so it sees the finished store or waits for it (``lock_timeout``), never a mix.
A store in a folder that cannot be written (a read-only Hub download) has no writer and is read unlocked.
"""

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from typing import Iterator, Optional

from hf_trak.errors import StoreLockedError

logger = logging.getLogger(__name__)

LOCK_NAME = ".trak.lock"
POLL_SECONDS = 0.2


def _owner() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "command": " ".join(sys.argv)[:200],
        "since": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def _describe(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as file:
            owner = json.loads(file.read() or "{}")
    except (OSError, ValueError):
        owner = {}
    if not owner:
        return "another process"
    return f"process {owner.get('pid')} on {owner.get('host')} since {owner.get('since')} ({owner.get('command')})"


def _acquire(descriptor: int, mode: int, path: str, timeout: Optional[float], what: str) -> None:
    """flock ``mode`` on ``descriptor``, waiting up to ``timeout`` seconds (None: as long as it takes)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    waited = False
    while True:
        try:
            fcntl.flock(descriptor, mode | fcntl.LOCK_NB)
            return
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                raise
        if deadline is not None and time.monotonic() >= deadline:
            raise StoreLockedError(
                f"{os.path.dirname(path)} is being featurized by {_describe(path)}: {what} waited {timeout:g} s "
                "for it. Wait for it to finish (or pass a larger lock_timeout), or use another save_dir."
            )
        if not waited:
            logger.warning("%s is being featurized by %s: waiting for it.", os.path.dirname(path), _describe(path))
            waited = True
        time.sleep(POLL_SECONDS)


@contextlib.contextmanager
def writing(root: str, timeout: Optional[float] = None) -> Iterator[None]:
    """Hold the store's exclusive lock (creating ``root``), recording this process as its owner."""
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, LOCK_NAME)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        _acquire(descriptor, fcntl.LOCK_EX, path, timeout, "featurize")
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, json.dumps(_owner()).encode(), 0)
        yield
    finally:
        os.close(descriptor)  # releases the lock


@contextlib.contextmanager
def reading(root: str, timeout: Optional[float] = None) -> Iterator[None]:
    """Hold the store's shared lock while reading it; unlocked where no writer can be (a read-only folder)."""
    path = os.path.join(root, LOCK_NAME)
    try:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        try:
            descriptor = os.open(path, os.O_RDONLY)
        except OSError:  # no lock file and none can be made: nobody writes here
            yield
            return
    try:
        _acquire(descriptor, fcntl.LOCK_SH, path, timeout, "scoring")
        yield
    finally:
        os.close(descriptor)
