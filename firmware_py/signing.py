"""The gateway's Ed25519 signing keys: one PEM file each, private to the gateway's user.

Two keys sign for the gateway, each in its own file beside the journal: the anchor
key vouches for the journal (`journal/anchors.py`), the statement key for the
bill-credit statements made from it (`statements/evidence.py`). They are kept apart
so that whoever may print statements need not hold the key that vouches for the
journal, but they are made, kept and read the one way written here:

- made on first use with `O_CREAT | O_EXCL` and mode 0600 (two starts racing never
  make two keys), written and fsynced before it signs anything;
- refused when group or others may read the file, or another user owns it: whoever
  can read a key can sign in the gateway's name;
- refused, with a message naming the file and what it should hold, when it is not a
  regular file or not an Ed25519 private key in PEM.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from firmware_py.errors import InputError


def load_or_create(path: Path, what: str, *, fix: str = "", replace: str = "") -> Ed25519PrivateKey:
    """The key at `path`, or a new one made there 0600. `what` names it in messages ("the journal's
    anchor key"); `fix` follows the chmod advice, `replace` the advice for a file that holds no key."""
    key = Ed25519PrivateKey.generate()
    if save_new(path, key, what):
        return key
    return load(path, what, fix=fix, replace=replace)


def save_new(path: Path, key: Ed25519PrivateKey, what: str) -> bool:
    """Write `key` to a new file at `path`, 0600, fsynced; False when a file is already there (never
    written over: it may be another key, which the caller's next load names). `load_or_create` makes
    keys with it, and the journal puts back its key from memory when the file was removed under it."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    except OSError as err:
        raise InputError(f"{path}: cannot create {what}: {err.strerror or err}") from None
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()))
            out.flush()
            os.fsync(out.fileno())
    except OSError as err:  # a full disk: leave no empty key behind for the next start to refuse
        path.unlink(missing_ok=True)
        raise InputError(f"{path}: cannot write {what}: {err.strerror or err}") from None
    return True


def load(path: Path, what: str, *, private: bool = True, fix: str = "", replace: str = "") -> Ed25519PrivateKey:
    """The key at `path`; with `private`, only when this user owns it and nobody else may read it."""
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise InputError(f"{path}: {what} is not a regular file")
        if private and (info.st_mode & 0o077 or info.st_uid != os.geteuid()):
            raise InputError(f"{path}: {what} must belong to this user and be private "
                             f"(mode {stat.S_IMODE(info.st_mode):04o}, owner uid {info.st_uid}); "
                             f"run `chown $(id -u) {path} && chmod 600 {path}`{fix}")
        data = path.read_bytes()
    except OSError as err:
        raise InputError(f"{path}: cannot read {what}: {err.strerror or err}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        key = None
    if not isinstance(key, Ed25519PrivateKey):
        raise InputError(f"{path}: not an Ed25519 private key in PEM{replace}")
    return key


def public_hex(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """The raw public key as hex: how anchors and statements name the key that signed them."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def readable_public_key(path: Path, what: str, *, private: bool = True) -> str | None:
    """The public half of the key at `path` when this user can read it (for a checker), else None."""
    try:
        return public_hex(load(path, what, private=private))
    except InputError:
        return None
