"""The gateway's signing keys (`firmware_py/signing.py`): made private, refused when they are not.

Real files in a temporary folder; the anchor key and the statement key are both made here.
"""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from firmware_py import signing
from firmware_py.errors import InputError
from firmware_py.journal.anchors import AnchorKey
from firmware_py.statements import evidence

WHAT = "the test key"


def test_a_key_is_made_0600_on_first_use_and_the_same_key_is_read_back(tmp_path):
    path = tmp_path / "k.pem"
    made = signing.load_or_create(path, WHAT)
    assert path.stat().st_mode & 0o777 == 0o600
    assert signing.public_hex(signing.load_or_create(path, WHAT)) == signing.public_hex(made)
    assert signing.readable_public_key(path, WHAT) == signing.public_hex(made.public_key())


def test_a_key_others_can_read_is_refused_naming_the_file_and_the_fix(tmp_path):
    path = tmp_path / "k.pem"
    signing.load_or_create(path, WHAT)
    os.chmod(path, 0o640)
    with pytest.raises(InputError, match=r"the test key must belong to this user and be private \(mode 0640") as err:
        signing.load_or_create(path, WHAT, fix=" and start again")
    assert f"chmod 600 {path}` and start again" in str(err.value)
    assert signing.readable_public_key(path, WHAT) is None  # a checker does not trust it either
    assert signing.readable_public_key(path, WHAT, private=False) is not None  # unless told to read it anyway


@pytest.mark.parametrize("content", [b"", b"not a key\n", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"])
def test_a_file_that_holds_no_ed25519_key_is_refused(tmp_path, content):
    path = tmp_path / "k.pem"
    path.write_bytes(content)
    os.chmod(path, 0o600)
    with pytest.raises(InputError, match=r"not an Ed25519 private key in PEM; move it away"):
        signing.load(path, WHAT, replace="; move it away")


def test_a_folder_or_a_missing_file_is_refused_for_reading(tmp_path):
    (tmp_path / "dir").mkdir()
    with pytest.raises(InputError, match="the test key is not a regular file"):
        signing.load(tmp_path / "dir", WHAT)
    with pytest.raises(InputError, match="cannot read the test key"):
        signing.load(tmp_path / "missing.pem", WHAT)
    assert signing.readable_public_key(tmp_path / "missing.pem", WHAT) is None
    with pytest.raises(InputError, match="cannot create the test key"):
        signing.load_or_create(tmp_path / "no-such-folder" / "k.pem", WHAT)


def test_the_anchor_key_and_the_statement_key_are_both_made_this_way(tmp_path):
    anchor = AnchorKey.load_or_create(tmp_path / "journal.sqlite.key")
    statement = evidence.load_or_create_key(tmp_path / "journal.sqlite.statement-key")
    assert isinstance(statement, Ed25519PrivateKey) and anchor.public_hex != signing.public_hex(statement)
    for path in (tmp_path / "journal.sqlite.key", tmp_path / "journal.sqlite.statement-key"):
        assert path.stat().st_mode & 0o777 == 0o600
