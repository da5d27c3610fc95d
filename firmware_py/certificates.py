"""The PEM files TLS is set up from (a CA bundle, a certificate and its key), checked the way every file
the gateway reads is checked, and loaded so that a wrong file is refused at the start, naming its key,
rather than failing the first connection (or, for a FIFO handed to OpenSSL by name, never returning).

A certificate out of its validity window is not refused (`validity_problem`): the gateway must go on
protecting the pack whatever an integration's certificate says, so it is pointed out instead, at the
start and in the failing link's cause, where a peer's bare "connection reset" would not say why.
"""

from __future__ import annotations

import datetime as dt
import re
import ssl
import stat
from pathlib import Path
from typing import NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from firmware_py.errors import InputError
from firmware_py.files import read_text

CERTIFICATE = re.compile(r"-----BEGIN (TRUSTED )?CERTIFICATE-----")
"""A PEM certificate, as OpenSSL loads a CA file: plain, or with its trust settings (ca-bundle.trust.crt)."""


def check_ca_bundle(path: str, key: str) -> ssl.SSLContext:
    """A client context trusting the CA bundle `path` (configuration key `key`) alone, once it is a regular
    file of at least one certificate OpenSSL loads as a CA file. One with none is refused: loaded as nothing,
    the system's CAs would be trusted instead. It is loaded by name, after the check, as OpenSSL reads every
    form of bundle only from a file."""
    if not CERTIFICATE.search(pem_text(path, key, "CA bundle")):
        raise InputError(f"{key}: {path}: holds no certificate (-----BEGIN CERTIFICATE-----)")
    try:
        return ssl.create_default_context(cafile=path)
    except (ssl.SSLError, OSError) as err:
        raise InputError(f"{key}: {path}: not a usable PEM CA bundle ({_reason(err)})") from None


def pem_text(path: str, key: str, what: str) -> str:
    """A PEM file's text, read as every file is (a regular file of at most 4 MiB); InputError naming `key`."""
    try:
        return read_text(path, what)
    except FileNotFoundError:
        raise InputError(f"{key}: {path}: does not exist") from None
    except InputError as err:
        raise InputError([f"{key}: {problem}" for problem in err.problems]) from None


def load_chain(context: ssl.SSLContext, cert: str, private_key: str, keys: str) -> None:
    """`cert` and its `private_key` into `context`; InputError naming `keys` when they are no PEM
    certificate and unencrypted key of it. An encrypted key is refused, never asked a passphrase for
    (OpenSSL would prompt on the terminal): the gateway has no passphrase to give."""
    for path in (cert, private_key):
        pem_text(path, keys, "PEM file")  # a regular, readable file before OpenSSL opens it by name

    def no_passphrase() -> bytes:
        raise InputError(f"{keys}: {private_key}: the private key is encrypted; give it unencrypted (mode 0600)")

    try:
        context.load_cert_chain(cert, private_key, password=no_passphrase)
    except (ssl.SSLError, OSError) as err:
        if not_a_pair(cert, private_key):  # both load: told apart from a broken file, which needs another fix
            raise InputError(f"{keys}: {private_key}: is not the private key of {cert} (each loads, but they are "
                             "not a pair: give the key made with this certificate)") from None
        raise InputError(f"{keys}: {cert}, {private_key}: not a PEM certificate and its private key "
                         f"({_reason(err)})") from None


def not_a_pair(cert: str, private_key: str) -> bool:
    """Whether `cert` (its first certificate) and `private_key` each load but hold different public keys.
    Asked of the files, not of OpenSSL's reason: a key of another type than the certificate's (an RSA key
    left beside a new EC certificate) is not reported by OpenSSL as a mismatch but as no certificate."""
    try:
        certificate = x509.load_pem_x509_certificate(pem_text(cert, "", "PEM file").encode())
        key = serialization.load_pem_private_key(pem_text(private_key, "", "PEM file").encode(), password=None)
    except (InputError, ValueError, TypeError):
        return False
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return certificate.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki)


def _reason(err: BaseException) -> str:
    return str(getattr(err, "reason", None) or getattr(err, "strerror", None) or err)


def open_to_all(private_key: str) -> str | None:
    """The mode of a private key file every user of the machine may read, or None: private, or shared with
    a group only (Debian's convention for TLS keys, 0640 and group ssl-cert, is kept), or in a folder other
    users cannot enter (Debian's /etc/ssl/private), or not there (the start checks say so). Anyone who can
    read the key can pose as the gateway."""
    path = Path(private_key).resolve()
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        closed = any(not folder.stat().st_mode & stat.S_IXOTH for folder in path.parents)
    except OSError:
        return None
    return f"{mode:04o}" if mode & stat.S_IROTH and not closed else None


class OutOfDate(NamedTuple):
    """A certificate outside its validity window: what is wrong (a phrase whose subject is the certificate)
    and what to do. One not valid yet is seldom renewed: most often the gateway's clock is behind."""

    problem: str
    remedy: str


def validity_problem(path: str, now: dt.datetime) -> OutOfDate | None:
    """What is wrong at `now` with the validity window of the certificate `path` starts with (the gateway's
    own, before any chain), or None: valid, or unreadable (the start checks say what is wrong then)."""
    try:
        certificate = x509.load_pem_x509_certificate(pem_text(path, "", "PEM file").encode())
    except (InputError, ValueError):
        return None
    if now >= certificate.not_valid_after_utc:
        return OutOfDate(f"expired on {certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC", "renew it")
    if now < certificate.not_valid_before_utc:
        return OutOfDate(f"is not valid until {certificate.not_valid_before_utc:%Y-%m-%d %H:%M} UTC",
                         f"check the gateway's clock (it reads {now:%Y-%m-%d %H:%M} UTC), or use a certificate "
                         "valid now")
    return None
