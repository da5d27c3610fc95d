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


def ensure_token(path: str | Path) -> str:
    """The API's token: created 0600 on first start, refused when others can read it."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return read_token(path, check_private=True)
    except OSError as err:
        raise InputError(f"{path}: cannot create the owner API token file: {err.strerror or err}") from None
    token = secrets.token_hex(32)
    with os.fdopen(fd, "w", encoding="ascii") as out:
        out.write(token + "\n")
    return token


def read_token(path: str | Path, check_private: bool = False) -> str:
    """The token in `path`; with `check_private`, refuse a file group or others can access.

    FileNotFoundError passes through: the CLI reads it as "the gateway has never started".
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise
    except OSError as err:
        raise InputError(f"{path}: cannot read the owner API token: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: the owner API token is not ASCII text") from None
    if check_private and mode & 0o077:
        raise InputError(f"{path}: the owner API token file is accessible by group or others "
                         f"(mode {stat.S_IMODE(mode):04o}); run `chmod 600 {path}` and start again")
    if len(text) < 32 or not all(c in "0123456789abcdef" for c in text):
        raise InputError(f"{path}: not an owner API token (expected 64 hex digits); "
                         "delete it and the gateway will create a new one")
    return text
