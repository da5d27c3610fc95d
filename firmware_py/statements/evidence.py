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
import math
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from firmware_py import signing

SIGNED_FIELDS_EXCLUDE = ("signature",)


def canonical(document: dict[str, Any]) -> bytes:
    """The one byte form that is signed, the signature left out: the JSON Canonicalization Scheme
    (RFC 8785), so a statement passed through any JSON tool (jq, a browser, a spreadsheet's
    import) that keeps its values still verifies: 830.0 and 830 are one number there."""
    body = {k: v for k, v in document.items() if k not in SIGNED_FIELDS_EXCLUDE}
    return _jcs(body).encode(errors="surrogatepass")  # a lone surrogate (an edited journal) still has one form


def _legacy_canonical(document: dict[str, Any]) -> bytes:
    """The form statements were signed in before RFC 8785 (Python's own spelling of numbers)."""
    body = {k: v for k, v in document.items() if k not in SIGNED_FIELDS_EXCLUDE}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _jcs(value: Any) -> str:
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (int, float)):
        return _number(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_jcs(v) for v in value) + "]"
    if isinstance(value, dict):
        keys = sorted(value, key=lambda k: str(k).encode("utf-16-be"))  # RFC 8785: by UTF-16 code units
        return "{" + ",".join(json.dumps(str(k), ensure_ascii=False) + ":" + _jcs(value[k]) for k in keys) + "}"
    raise TypeError(f"a statement holds only JSON values, not {type(value).__name__}")


def _number(value: float) -> str:
    """A number as ECMAScript writes it (RFC 8785 §3.2.2.3): the shortest digits that read back as
    the same double, an exponent only below 1e-6 or from 1e21 on."""
    if isinstance(value, int) and abs(value) < 2**53:
        return str(value)
    try:
        value = float(value)
    except OverflowError:  # an integer past a double's range (Python's json reads one; no signer writes one)
        raise ValueError("an integer past a double's range has no JSON form") from None
    if not math.isfinite(value):
        raise ValueError(f"{value} has no JSON form")
    if value == 0:
        return "0"
    mantissa, _, exponent = repr(abs(value)).partition("e")
    whole, _, fraction = mantissa.partition(".")
    digits = (whole + fraction).lstrip("0")
    point = len(whole) + int(exponent or 0) - (len(whole + fraction) - len((whole + fraction).lstrip("0")))
    digits = digits.rstrip("0")
    sign, k, n = "-" if value < 0 else "", len(digits), point
    if k <= n <= 21:
        text = digits + "0" * (n - k)
    elif 0 < n <= 21:
        text = digits[:n] + "." + digits[n:]
    elif -6 < n <= 0:
        text = "0." + "0" * -n + digits
    else:
        mant = digits if k == 1 else digits[0] + "." + digits[1:]
        text = f"{mant}e{'+' if n - 1 >= 0 else '-'}{abs(n - 1)}"
    return sign + text


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
        signature = bytes.fromhex(str(document.get("signature", "")))
    except (ValueError, TypeError):
        return "the statement's public_key or signature is not a valid Ed25519 hex value"
    try:
        signed = canonical(document)
    except (ValueError, TypeError) as err:  # NaN, Infinity, 1e400: Python's json reads them, no signer writes them
        return f"the statement holds a value no signed statement can ({err}): it was changed after it was signed"
    try:
        try:
            public.verify(signature, signed)
        except InvalidSignature:
            public.verify(signature, _legacy_canonical(document))  # a statement made before RFC 8785
    except (ValueError, TypeError):
        return "the statement's public_key or signature is not a valid Ed25519 hex value"
    except InvalidSignature:
        return "the signature does not match: the statement was changed after it was signed"
    return None
