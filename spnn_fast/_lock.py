"""A lock file that one process at a time holds: how a run folder is owned.

Where ``fcntl`` exists (Linux, macOS, the BSDs) the lock is an advisory ``flock`` on the file:
the kernel releases it when the holding process ends, however it ends, so a run killed with
SIGKILL or lost with its machine's power leaves no stale lock behind (on a network file system
``flock`` is as good as the server's locking). Elsewhere (Windows) the lock is the file itself,
created exclusively and removed on release: a process that dies without releasing it leaves it
behind, and the message then says to delete the file once its holder is gone.

The file holds, while locked, who holds it (pid, host, start time, command), so that a process
turned away can name the holder.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
from typing import Optional

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

__all__ = ["FolderBusyError", "LockFile", "describe_holder"]


class FolderBusyError(RuntimeError):
    """The lock is held by another process (the message names it)."""


def _holder_info() -> dict:
    program = os.path.basename(sys.argv[0] or "python")
    if program == "__main__.py":  # python -m PACKAGE (and torchrun -m PACKAGE)
        program = f"python -m {os.path.basename(os.path.dirname(sys.argv[0]))}"
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([program, *sys.argv[1:]])[:300],
    }


def describe_holder(holder: Optional[dict]) -> str:
    """``process 123 on host h since 2024-05-01T12:00:00 (command)``, or what is known of it."""
    if not holder:
        return "another process (it has not yet written who it is)"
    text = f"process {holder.get('pid', '?')} on host {holder.get('host', '?')}"
    if holder.get("started"):
        text += f" since {holder['started']}"
    if holder.get("command"):
        text += f" ({holder['command']})"
    return text


class LockFile:
    """An exclusive lock on the file ``path`` (created if missing)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_acquire(self) -> Optional[dict]:
        """Take the lock if it is free: None when taken, else what the file says of its holder
        (``{}`` when it says nothing yet). OSError when the file cannot be created or opened."""
        if self._fd is not None:
            return None
        return self._try_flock() if fcntl is not None else self._try_exclusive()

    def _try_flock(self) -> Optional[dict]:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                return holder
            except BaseException:
                os.close(fd)
                raise
            # A holder that removed the file (its folder was given up) before we locked it has
            # left us a lock on a file nobody else opens: take the one now at the path instead.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                self._write_holder()
                return None
            os.close(fd)
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)

    def _try_exclusive(self) -> Optional[dict]:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                fd = os.open(self.path, os.O_RDONLY)
            except FileNotFoundError:  # released meanwhile: the next try takes it
                return {}
            holder = _read_holder(fd)
            os.close(fd)
            holder["stale_hint"] = (
                f"if that process is gone, delete {self.path} (this system has no lock that "
                "ends with its process)"
            )
            return holder
        self._fd = fd
        self._write_holder()
        return None

    def _write_holder(self) -> None:
        data = json.dumps(_holder_info()).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0) if hasattr(os, "pwrite") else os.write(self._fd, data)

    def release(self, remove: bool = False) -> None:
        """Give the lock up; with ``remove``, delete the file first (while still holding it)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if remove or fcntl is None:
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
            else:
                os.ftruncate(fd, 0)  # the next reader finds no stale holder
        finally:
            os.close(fd)  # closing the last descriptor releases a flock


def _read_holder(fd: int) -> dict:
    try:
        data = os.pread(fd, 4096, 0) if hasattr(os, "pread") else os.read(fd, 4096)
        holder = json.loads(data.decode()) if data else {}
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}
