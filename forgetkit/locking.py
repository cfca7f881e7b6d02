"""One writer per directory: an advisory ``flock`` on ``<dir>/.forgetkit.lock``.

``flock`` locks belong to the open file, so the kernel drops them when the holder exits, even
by SIGKILL: there is never a stale lock to delete by hand. The file's text (pid, host, start
time, command line) is only there to tell the second process who holds it. (NFS: flock is
emulated with POSIX locks on modern Linux; on a file system without locks ``flock`` raises
and the error says so.)
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from forgetkit.config import ConfigError

__all__ = ["LOCK_NAME", "LockHeld", "dir_lock"]

LOCK_NAME = ".forgetkit.lock"


class LockHeld(ConfigError):
    """Another forgetkit process holds the directory (a ConfigError: the faces exit 2)."""


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    pid = info.get("pid", "?")
    host = info.get("host")
    started = info.get("started", "?")
    return f"pid {pid}{f' on {host}' if host and host != socket.gethostname() else ''} " \
           f"(started {started})"


@contextmanager
def dir_lock(directory: Path, what: str) -> Iterator[Path]:
    """Hold ``directory`` exclusively for the ``with`` block; yields the lock file's path.

    Args:
        directory: created (with parents) if missing.
        what: what the directory is, for the message ("training output", "results directory").

    Raises:
        LockHeld: another process holds it: "<what> <dir> is in use by forgetkit pid N
            (started T): wait for it to finish or use another directory".
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise LockHeld(f"{what} {directory} is in use by forgetkit {_holder(path)}: "
                               "wait for it to finish or use another directory") from None
            raise
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        try:
            yield path
        finally:
            # Empty the record before unlocking: a reader never sees a finished holder's pid.
            # The file itself stays (deleting it would race with a process opening it).
            try:
                os.ftruncate(fd, 0)
            except OSError:
                pass
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
