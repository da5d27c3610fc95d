"""What makes a statement evidence: canonical JSON, signed with the gateway's own Ed25519 key.

The key is the gateway's, kept 0600 beside the journal (`<journal>.statement-key`),
made on first use and refused when anyone else could read it: whoever can read
it can sign a statement in the gateway's name. It is not the journal's anchor
key, so the people who may print statements need not hold the key that vouches
for the journal itself. The public half travels in the statement
(`public_key`); the signature covers the canonical JSON of every other field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from firmware_py import signing

KEY_SUFFIX = ".statement-key"
SIGNED_FIELDS_EXCLUDE = ("signature",)


def key_path(journal: Path) -> Path:
    return journal.with_name(journal.name + KEY_SUFFIX)


def canonical(document: dict[str, Any]) -> bytes:
    """The one byte form that is signed: sorted keys, no spaces, no NaN; the signature left out."""
    body = {k: v for k, v in document.items() if k not in SIGNED_FIELDS_EXCLUDE}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


STATEMENT_KEY = "the gateway's statement key"


def load_or_create_key(path: Path) -> Ed25519PrivateKey:
    """The gateway's statement key at `path`, or a new one made there 0600 (`signing`)."""
    return signing.load_or_create(path, STATEMENT_KEY)


def readable_public_key(path: Path) -> str | None:
    """The public half of the key at `path` when this user can read it (for `verify`), else None:
    however open its mode, a checker only derives the public half from it."""
    return signing.readable_public_key(path, STATEMENT_KEY, private=False)


def sign(document: dict[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    """`document` with `public_key` and `signature` (hex) added."""
    signed = {**document, "public_key": signing.public_hex(key)}
    signed["signature"] = key.sign(canonical(signed)).hex()
    return signed


def signature_problem(document: dict[str, Any]) -> str | None:
    """None when the signature is good for the document's own public key; else why not."""
    try:
        public = Ed25519PublicKey.from_public_bytes(bytes.fromhex(str(document.get("public_key", ""))))
        public.verify(bytes.fromhex(str(document.get("signature", ""))), canonical(document))
    except (ValueError, TypeError):
        return "the statement's public_key or signature is not a valid Ed25519 hex value"
    except InvalidSignature:
        return "the signature does not match: the statement was changed after it was signed"
    return None
