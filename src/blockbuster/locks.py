"""Run locks: one run at a time writes an output, or keeps its state in a work directory.

Advisory ``flock`` locks on small files; the kernel releases them when a process dies, so a run
killed with SIGKILL never blocks the next one.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path
from typing import Any

from .errors import OutputLockedError, writing

__all__ = ["RunLock", "holder_of"]


class RunLock:
    """An exclusive advisory lock (``flock``) held on a file while a run writes something.

    The file is deleted when the lock is released, so a finished run leaves nothing behind. A
    process that opened the file just before it was deleted would lock a deleted file: after
    locking, :meth:`acquire` checks that the path still names the locked file, and retries if
    not. (A run killed with SIGKILL leaves the file; the kernel has released its lock, and the
    next run simply takes it.)
    """

    def __init__(self, path: Path, what: str):
        self.path = Path(path)
        self.what = what
        self._file: Any = None
        self._made_parent = False

    @property
    def held(self) -> bool:
        return self._file is not None

    def acquire(self) -> None:
        if self.held:
            return
        with writing("the lock", self.path):
            self._acquire()

    def _acquire(self) -> None:
        import fcntl

        if not self.path.parent.exists():
            self.path.parent.mkdir(parents=True)
            self._made_parent = True
        while True:
            f = open(self.path, "a+")  # noqa: SIM115 -- held while the lock is, closed in release()
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.seek(0)
                holder = f.read().strip() or "another process"
                f.close()
                raise OutputLockedError(
                    f"another blockbuster run ({holder}) is writing {self.what} right now "
                    f"(lock {self.path}); wait for it to finish or stop it first") from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(f.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            f.close()  # the holder released and deleted it meanwhile: lock the new file
        self._file = f
        try:
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.ctime()}")
            f.flush()
        except OSError:  # no room even for the holder's name: nothing can be written
            self.release()
            raise

    def release(self) -> None:
        if self._file is None:
            return
        self.path.unlink(missing_ok=True)  # while still holding it (see the class docstring)
        f, self._file = self._file, None
        with contextlib.suppress(OSError):  # the holder's name may not fit on a full disk
            f.close()
        if self._made_parent:  # a folder made only for the lock goes with it, if still empty
            with contextlib.suppress(OSError):
                self.path.parent.rmdir()
            self._made_parent = False


def holder_of(lock_path: Path) -> str | None:
    """Who holds the lock on ``lock_path`` right now, or None (no lock, or nobody holds it)."""
    import fcntl

    try:
        f = open(lock_path)  # noqa: SIM115 -- the with below closes it
    except OSError:
        return None
    with f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return f.read().strip() or "another process"
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    return None
