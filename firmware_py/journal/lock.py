"""One process per journal: the exclusive lock a writer holds on `<journal>.lock` for its life.

Two processes appending to one journal (SQLite's write-ahead log lets them both open it) end each
other's events, append to one hash chain from two heads, and hold each other's writes. A gateway
(`run`, `commission`) and a bench run (`sim`) take this lock before they open the journal, the bus or
the inverter; readers (`report`, `statement`, `status`) never do: they read a live journal.

The lock is an flock on a file of its own beside the journal (`files.lock_path`), never on a segment:
the bench deletes and recreates its journal under the lock, and a rotation replaces the live segment.
flock belongs to an open file: one process taking it twice is refused by itself, so each command takes
it once, in its own path, not in `assemble` or `Journal.open`.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Callable
from pathlib import Path

from firmware_py.errors import InputError
from firmware_py.journal.files import lock_path

log = logging.getLogger(__name__)

PID_BYTES = 32
"""The most read back of the holder's pid: a number and a newline."""


class JournalInUse(InputError):
    """Another process holds the journal's lock (an InputError: exit 2)."""


class JournalLock:
    """The lock a process holds on one journal, until `close` (or the process ends).

    `keep` puts its file back when it was removed (`rm journal.sqlite*` under a running gateway, which
    the journal itself survives, `Journal._restore`): a second gateway would otherwise find no lock file,
    make one and lock it, and write beside the first."""

    def __init__(self, journal: Path, fd: int):
        self.journal, self._fd = journal, fd
        self._identity = _identity(fd)
        self._said: str | None = None  # the trouble logged last: each said once, not every second

    def keep(self) -> None:
        """One stat: nothing to do while the lock file is the one locked. Removed: made again, locked and
        its pid written (the old descriptor then let go), logged once. Taken meanwhile by another process:
        logged once, naming it (two writers on one journal: one of them must be stopped)."""
        if self._fd < 0:
            return  # closed: nothing held, nothing to keep
        path = lock_path(self.journal)
        try:
            found = os.stat(path)
        except FileNotFoundError:
            found = None
        except OSError:
            return  # cannot tell now; the next look may
        if found is not None and (found.st_dev, found.st_ino) == self._identity:
            return
        try:
            fd = _open(path)
        except OSError as err:
            self._trouble(f"{path}: the journal's lock file was removed and cannot be made again: "
                          f"{err.strerror or err}")
            return
        if not _take(fd):
            holder = _holder(fd)
            os.close(fd)
            self._trouble(f"{path}: the journal's lock file was removed while this gateway ran, and another "
                          f"process{holder_named(holder)} has locked a new one: two gateways may write this "
                          "journal; stop one of them")
            return
        os.close(self._fd)
        self._fd, self._identity, self._said = fd, _identity(fd), None
        log.warning("%s: the journal's lock file was removed while the gateway ran: made again and locked", path)

    def _trouble(self, said: str) -> None:
        if said != self._said:
            log.error("%s", said)
        self._said = said

    def close(self) -> None:
        """Let the lock go (once)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def lock_journal(journal: Path, in_use: Callable[[int | None], str]) -> JournalLock:
    """Take the exclusive lock on the journal at `journal`, without waiting; `close` it (or end the
    process) to release it. The holder's pid is written into the lock file.

    JournalInUse when another process holds it: the one line `in_use(pid)` words (pid None when the
    holder wrote none, or not yet), so each command says what its own user should do. InputError
    when the lock file cannot be opened (its folder missing or not writable)."""
    try:
        fd = _open(lock_path(journal))
    except OSError as err:
        raise InputError(f"{journal}: cannot lock the journal: {err.strerror or err}") from None
    if not _take(fd):
        holder = _holder(fd)
        os.close(fd)
        raise JournalInUse(in_use(holder))
    return JournalLock(journal, fd)


def _take(fd: int) -> bool:
    """flock without waiting; when taken, this process's pid is written into the file."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError:
        pass  # the lock is held all the same; a second process is told no pid
    return True


def _identity(fd: int) -> tuple[int, int]:
    info = os.fstat(fd)
    return info.st_dev, info.st_ino


def _open(path: Path) -> int:
    """The lock file, for writing the pid; else for reading, which is all flock needs: a lock file another
    user made (the service's journal once run by hand as root) must not keep the gateway from starting."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except PermissionError:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


def _holder(fd: int) -> int | None:
    try:
        text = os.pread(fd, PID_BYTES, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def holder_named(pid: int | None) -> str:
    """` (pid N)`, or nothing when the holder is not known: for the messages `in_use` words."""
    return f" (pid {pid})" if pid is not None else ""
