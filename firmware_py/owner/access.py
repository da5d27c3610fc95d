"""How the owner CLI and the owner API find and trust each other: address and token.

Shared by the server (`api`) and the client (`commands`) so both read the
config the same way; kept apart from the server so the CLI starts without
importing an HTTP framework.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from firmware_py.addresses import parse_host_port
from firmware_py.errors import InputError
from firmware_py.files import create_atomically, user_name, user_text

UNIX_PREFIX = "unix:"


@dataclass(frozen=True)
class Listen:
    """Where the API listens: a loopback host and port, or a Unix socket path."""

    host: str = ""
    port: int = 0
    unix_path: str = ""

    def describe(self) -> str:
        if self.unix_path:
            return f"{UNIX_PREFIX}{self.unix_path}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_listen(value: str) -> Listen:
    """Accept 127.0.0.1:8765, [::1]:8765, localhost:8765 or unix:/abs/path; refuse anything public."""
    where = f"owner.api_listen: {value!r}"
    if value.startswith(UNIX_PREFIX):
        path = value[len(UNIX_PREFIX):]
        if not os.path.isabs(path):
            raise InputError(f"{where}: a Unix socket path must be absolute")
        return Listen(unix_path=path)
    try:
        host, port = parse_host_port(value, "owner.api_listen")
    except InputError:
        raise InputError(f"{where}: expected HOST:PORT on loopback (e.g. 127.0.0.1:8765) or unix:/path") from None
    if host != "localhost":
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            raise InputError(f"{where}: {host!r} is not an IP address (use 127.0.0.1)") from None
        if not loopback:
            raise InputError(f"{where}: the owner API only listens on loopback (127.0.0.1 or ::1) "
                             "or a Unix socket; it must not be reachable from the network")
    return Listen(host=host, port=port)


MAX_TOKEN_FILE_BYTES = 4096  # a token is 64 hex digits; anything much larger is not one
_TOKEN_KEYS = {"owner API token": "owner.token_file", "installer token": "web.installer_token_file"}
"""The configuration key naming each token's file, for messages about a wrong path."""


def ensure_token(path: str | Path, *, owner_uid: int | None = None, what: str = "owner API token") -> str:
    """The API's token: created 0600 on first start; refused when it is not private to this user.

    `owner_uid` is the user the file must belong to (default: the effective user the
    gateway runs as); tests inject it, since they cannot always chown. `what` names the token in
    messages (the web app's installer token shares these rules).
    """
    path = Path(path)
    token = secrets.token_hex(32)
    try:
        # Whole or not at all: an empty file left by a full disk or a power cut would refuse every later start.
        create_atomically(path, token + "\n", new_mode=0o600)
    except FileExistsError:  # made by an earlier start (or a symlink, which reading refuses)
        return read_token(path, check_private=True, owner_uid=owner_uid, what=what)
    except OSError as err:
        raise InputError(f"{path}: cannot create the {what} file: {err.strerror or err}") from None
    return token


def read_token(path: str | Path, check_private: bool = False, *, owner_uid: int | None = None,
               what: str = "owner API token") -> str:
    """The token in `path`; with `check_private`, refuse a file that is not private to its reader.

    Private means: a regular file (not a symlink, FIFO or device), owned by `owner_uid`
    (default: the effective user), with no access for group or others. The mode alone is
    not enough: a 0600 file planted by another user would hand them the owner's API.
    The checks are made on the open descriptor, so the file cannot be swapped between
    the check and the read.

    FileNotFoundError passes through: the CLI reads it as "the gateway has never started".
    """
    path = Path(path)
    raw = _read_small(path, what, check_private=check_private, owner_uid=owner_uid, made_by_gateway=True)
    try:
        text = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise InputError(f"{path}: the {what} is not ASCII text") from None
    if len(raw) > MAX_TOKEN_FILE_BYTES or len(text) < 32 or not all(c in "0123456789abcdef" for c in text):
        raise InputError(f"{path}: not an {what} (expected 64 hex digits); "
                         "delete it and the gateway will create a new one")
    return text


def _read_small(path: Path, what: str, *, check_private: bool, owner_uid: int | None,
                made_by_gateway: bool = False) -> bytes:
    """Up to MAX_TOKEN_FILE_BYTES + 1 bytes of `path` (none of a non-regular file); with
    `check_private`, only from a private regular file, checked on the open descriptor so the
    file cannot be swapped between the check and the read. FileNotFoundError passes through."""
    flags = os.O_RDONLY | os.O_NONBLOCK | (os.O_NOFOLLOW if check_private else 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as err:
        if check_private and os.path.islink(path):
            raise InputError(f"{path}: the {what} file is a symbolic link; point the configuration at "
                             "the file itself") from None
        raise InputError(f"{path}: cannot read the {what}: {err.strerror or err}") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):  # "delete it and the gateway makes a new one" is no advice for a folder
            raise InputError(f"{path}: a folder, not the {what} file: {_TOKEN_KEYS.get(what, 'the configuration')} "
                             "must name a file (the gateway creates it at its first start)")
        if check_private:
            _check_private(path, info, os.geteuid() if owner_uid is None else owner_uid, what, made_by_gateway)
        return os.read(fd, MAX_TOKEN_FILE_BYTES + 1) if stat.S_ISREG(info.st_mode) else b""
    except OSError as err:
        raise InputError(f"{path}: cannot read the {what}: {err.strerror or err}") from None
    finally:
        os.close(fd)


def read_secret(path: str | Path, what: str, *, owner_uid: int | None = None) -> str:
    """The first line of a private file holding a secret (an OAuth2 client secret, say).

    The same privacy rules as `read_token` with `check_private` (a regular file of the
    gateway's user, no access for group or others), checked on the open descriptor; the
    secret itself never appears in a message. FileNotFoundError passes through.
    """
    path = Path(path)
    raw = _read_small(path, what, check_private=True, owner_uid=owner_uid)
    if len(raw) > MAX_TOKEN_FILE_BYTES:
        raise InputError(f"{path}: the {what} file is larger than {MAX_TOKEN_FILE_BYTES} bytes: not a secret")
    try:
        lines = raw.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise InputError(f"{path}: the {what} file is not UTF-8 text") from None
    secret = lines[0].strip() if lines else ""
    if not secret:
        raise InputError(f"{path}: the {what} file is empty (the secret goes on its first line)")
    return secret


def _check_private(path: Path, info: os.stat_result, owner_uid: int, what: str, made_by_gateway: bool) -> None:
    """InputError unless `info` is a regular file owned by `owner_uid` that only its owner can access.

    Deleting a planted file is advice only for one the gateway makes again (a token); a secret the
    aggregator issued would be lost, so then only handing it to the right user is suggested."""
    if not stat.S_ISREG(info.st_mode):
        raise InputError(f"{path}: the {what} file is not a regular file")
    if info.st_uid != owner_uid:
        raise InputError(f"{path}: the {what} file belongs to {user_text(info.st_uid)}, not to "
                         f"{user_text(owner_uid)} that the gateway runs as; someone else may have planted it. "
                         + ("Delete it (the gateway creates a new one) or " if made_by_gateway else "Run ")
                         + f"`chown {user_name(owner_uid)} {path}` if you made it yourself")
    mode = info.st_mode
    if mode & 0o077:
        raise InputError(f"{path}: the {what} file is accessible by group or others "
                         f"(mode {stat.S_IMODE(mode):04o}); run `chmod 600 {path}` and start again")
