"""Files a person names (configs, scenarios, DBCs, settings, journals): regular and bounded,
and written whole or not at all.

A path typed by an installer may point anywhere: `/dev/zero` would be read
until memory runs out, a FIFO would block a read forever, `/dev/null` would
swallow a journal. Everything the gateway reads or keeps at a configured path
goes through here first, so each of those ends in one clear refusal instead.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import secrets
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, BinaryIO

from firmware_py.errors import InputError

MAX_TEXT_BYTES = 4 << 20
"""Larger than any config, scenario, DBC or settings file the gateway needs, small enough to read on a board."""


def read_text(path: str | Path, what: str, *, max_bytes: int = MAX_TEXT_BYTES) -> str:
    """The UTF-8 text of a regular file of at most `max_bytes`; InputError naming `what` otherwise.

    FileNotFoundError passes through for callers to whom a missing file means something (no settings yet).
    """
    path = Path(path)
    fd, info = _open_regular(path, what)
    try:
        if info.st_size > max_bytes:
            raise InputError(f"{path}: the {what} is {info.st_size:,} bytes; at most {max_bytes:,} are read")
        data = _read_at_most(fd, max_bytes + 1)
    except OSError as err:
        raise InputError(f"{path}: cannot read the {what}: {err.strerror or err}") from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:  # grew while being read
        raise InputError(f"{path}: the {what} is larger than {max_bytes:,} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path}: the {what} is not UTF-8 text") from None


def open_regular(path: str | Path, what: str) -> BinaryIO | None:
    """A regular file opened for reading, None when there is none; InputError naming `what` when it
    cannot be read or is not a regular file."""
    try:
        fd, _ = _open_regular(path, what)
    except FileNotFoundError:
        return None
    return os.fdopen(fd, "rb")


def _open_regular(path: str | Path, what: str) -> tuple[int, os.stat_result]:
    """A descriptor of a regular file and its status. Opened non-blocking, so a FIFO is refused rather
    than waited on for ever (and a folder or a device refused too); FileNotFoundError passes through."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError:
        raise
    except OSError as err:
        raise InputError(f"{path}: cannot read the {what}: {err.strerror or err}") from None
    try:
        info = os.fstat(fd)
    except OSError as err:
        os.close(fd)
        raise InputError(f"{path}: cannot read the {what}: {err.strerror or err}") from None
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise InputError(f"{path}: the {what} must be a regular file, not {_kind(info.st_mode)}")
    return fd, info


def regular_or_absent(path: str | Path, what: str, *, folder_made: bool = False) -> str | None:
    """Why `path` cannot hold a file the gateway writes (a device, a directory, a folder that is not
    there, unless its writer makes it: `folder_made`), or None if it can."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        folder = Path(path).parent
        if folder_made or folder.is_dir():
            return None
        return f"{path}: the {what}'s folder {folder} does not exist"
    except OSError as err:
        if err.errno == errno.ENOTDIR:
            return f"{path}: the {what}'s folder is not a directory"
        return f"{path}: cannot use the {what}: {err.strerror or err}"
    if not stat.S_ISREG(mode):
        return f"{path}: the {what} must be a regular file, not {_kind(mode)}"
    return None


def unwritable(path: str | Path, key: str, *, kept_writing: bool) -> str | None:
    """Why this user (the service's, when it runs check-config) cannot write `path`, or None.

    Found here, not at the first write: a journal beside a root-owned 0750 config was called
    valid, then failed at its open with SQLite's "unable to open database file", naming neither
    the key nor the cause. A file yet to be made needs its folder writable. `kept_writing`: an
    existing file is written again (a journal, with SQLite's files beside it; settings replaced
    through a temporary file beside them), so it and its folder must be writable too; otherwise
    (a token made once) an existing file is only read. A file yet to be made is also tried for real
    (`cannot_make_beside`): os.access says yes to root in /sys or on a read-only mount.
    """
    target, folder = Path(path), Path(path).parent
    exists = target.exists()
    if exists and not kept_writing:
        return None
    if exists and not _may(target, os.W_OK):
        where = ""
    elif folder.is_dir() and not _may(folder, os.W_OK | os.X_OK):
        where = f": its folder {folder} is not writable for it"
    elif not exists and folder.is_dir() and (refused := cannot_make_beside(target)) is not None:
        return f"{key}: {path}: cannot be made in its folder {folder}: {refused}"
    else:
        return None
    return f"{key}: {path}: cannot be written by this user ({user_name(os.geteuid())}){where}"


def cannot_make_beside(path: str | Path) -> str | None:
    """Why no file can be made in `path`'s folder (None: one can), tried with a file removed at once:
    outputs are written beside their target and renamed into place, and `os.access` answers yes to
    root on a read-only mount or /proc, where making one still fails."""
    target = Path(path)
    try:
        fd, probe = tempfile.mkstemp(dir=target.resolve().parent, prefix=f".{target.name}.", suffix=".probe")
    except OSError as err:
        return err.strerror or str(err)
    os.close(fd)
    os.unlink(probe)
    return None


def _may(path: Path, mode: int) -> bool:
    """os.access for the user that will write (effective ids where the platform tells them apart)."""
    if os.access in os.supports_effective_ids:
        return os.access(path, mode, effective_ids=True)
    return os.access(path, mode)


def user_name(uid: int) -> str:
    """The user's name, or the number when the system has no name for it."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def user_text(uid: int) -> str:
    """A user as a message names it: "user NAME (uid N)", or "uid N" without a name."""
    name = user_name(uid)
    return f"uid {uid}" if name == str(uid) else f"user {name} (uid {uid})"


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks, size = [], 0
    while size < limit:
        chunk = os.read(fd, min(1 << 16, limit - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a special file"


def write_atomically(path: str | Path, text: str, *, new_mode: int = 0o666) -> None:
    """Replace `path` with `text` durably, or leave what was there: a full disk, a quota or a power
    cut part-way never leaves a truncated report, statement or settings file. The file keeps the
    mode and owner it had; a new one gets `new_mode` less the umask, as any write would make it.
    A target that is not a regular file (`/dev/stdout`) is written to as it is. OSError reaches
    the caller."""
    with replacing(path, new_mode=new_mode) as out:
        out.write(text)


@contextlib.contextmanager
def replacing(path: str | Path, *, binary: bool = False, new_mode: int = 0o666) -> Iterator[IO[Any]]:
    """A file to write `path`'s new content into, put in place only when the block ends without an
    exception, as `write_atomically` does: for content written over a long run (a bench trace), so
    a run that fails part-way leaves the file that was there, not an empty or half-written one.
    Text (UTF-8) unless `binary`. A target that is not a regular file is written to as it is."""
    given = Path(path)
    if given.exists() and not given.is_file():
        with open(given, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as out:
            yield out
        return
    target = Path(os.path.realpath(given))  # through a symlink, as writing in place would
    try:
        before: os.stat_result | None = target.stat()
    except FileNotFoundError:
        before = None
    tmp, out = _open_beside(target, new_mode, before, binary=binary)
    try:
        with out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(target.parent)


def create_atomically(path: str | Path, text: str, *, new_mode: int = 0o666) -> None:
    """Make `path` holding `text`, whole and durable, or make nothing: never an empty or half-written
    file that a later start would take for a broken one. An existing `path` (even a dangling symlink)
    is left alone and FileExistsError raised, as O_EXCL would: the file is linked into place, not
    renamed over. OSError reaches the caller."""
    target = Path(path)
    tmp = _written_beside(target, text, new_mode, None)
    try:
        os.link(tmp, target)  # fails with FileExistsError rather than replace what is there
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    _fsync_dir(target.parent)


def _written_beside(target: Path, text: str, new_mode: int, before: os.stat_result | None) -> Path:
    """A temporary file beside `target` holding `text`, fsynced, with the mode and owner of `before` when
    given; removed again if writing it fails."""
    tmp, out = _open_beside(target, new_mode, before)
    try:
        with out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


def _open_beside(target: Path, new_mode: int, before: os.stat_result | None, *,
                 binary: bool = False) -> tuple[Path, IO[Any]]:
    """A new temporary file beside `target` (so a rename puts it in place), open for writing, with the
    mode and owner of `before` when given."""
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, new_mode)  # the kernel applies the umask
    try:
        if before is not None:
            os.fchmod(fd, stat.S_IMODE(before.st_mode))
            with contextlib.suppress(PermissionError):  # only root may give a file away
                os.fchown(fd, before.st_uid, before.st_gid)
        out = os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8")
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp, out


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable; some filesystems refuse, which is harmless."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
