"""Anchors: signed checkpoints of a journal segment's head, kept outside its database.

The hash chain shows an edited or removed record, but not a cut-back tail: whoever
can write the SQLite file can delete the newest rows and set the head row back,
and what is left is a perfectly good, shorter chain. So the journal also appends,
to a separate file beside each segment, a line naming the head it had just
committed (segment, seq, hash) at every event end and billing record, when it
opens, closes and rotates, and at least every `ANCHOR_PERIOD_S` while the head
moves. A record removed or rewritten at or below an anchored seq no longer
matches some line, and `report` says so.

Each line is canonical JSON. It carries `prev`, the SHA-256 of the line before it
(`GENESIS_LINK` for the first), and `sig`, an Ed25519 signature over the line's
other fields by the key kept 0600 beside the journal (`files.key_path`). Because
every line commits to the one before, the newest line's signature vouches for the
whole file: one verification, whatever its length. What no local file can stop
is rolling the journal *and* its anchors back together to an earlier state: for
that, copy the anchor file off the gateway now and then (the gateway also logs
each anchor at debug level, for a system log shipped elsewhere).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from firmware_py import signing
from firmware_py.core.types import is_finite_number
from firmware_py.files import open_regular
from firmware_py.signing import public_hex

GENESIS_LINK = "0" * 64
EMPTY_HEAD = "0" * 64
"""The head an anchor names for a journal with no record yet (seq 0): the chain's genesis hash."""
ANCHOR_PERIOD_S = 600.0
"""While the head moves, at most this long (wall clock) between anchors; billing records anchor at once."""
TAIL_READ_BYTES = 16_384


class AnchorWhy(StrEnum):
    """Why an anchor was written (stored in the line, shown by `report`)."""

    BILLING = "billing record"
    PERIODIC = "periodic"
    OPEN = "opened"
    CLOSE = "closed"
    ROTATE = "rotated out"
    SEGMENT = "segment started"
    MISSING = "opened without its anchors"
    """The writer found an anchored segment with records and no anchor file: whatever was cut
    before this line cannot be shown, so the line itself is the evidence (`check` flags it)."""


@dataclass(frozen=True)
class Anchor:
    """One line of an anchor file."""

    segment: int
    seq: int
    hash: str
    wall: float
    why: str
    prev: str
    key: str
    sig: str = ""

    def body(self) -> dict[str, Any]:
        """What the signature covers: every field but the signature."""
        fields = asdict(self)
        del fields["sig"]
        return fields

    def text(self) -> str:
        return _canonical(asdict(self))


def _canonical(value: dict[str, Any]) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def link_of(line: str) -> str:
    return hashlib.sha256(line.encode()).hexdigest()


# ---------------------------------------------------------------- the key


ANCHOR_KEY = "the journal's anchor key"


class AnchorKey:
    """The Ed25519 key that signs a journal's anchors: created 0600 on first open for writing (`signing`)."""

    def __init__(self, private: Ed25519PrivateKey):
        self._private = private
        self.public_hex = public_hex(private)

    @classmethod
    def load_or_create(cls, path: Path) -> AnchorKey:
        """The key at `path`, or a new one there. Refused when group or others can read it,
        or another user owns it: whoever can read the key can forge anchors."""
        return cls(signing.load_or_create(path, ANCHOR_KEY, fix=" and start again",
                                          replace="; move it away to let the gateway make a new one (anchors "
                                                  "signed by the old key will then show as signed by another key)"))

    def put_back(self, path: Path) -> bool:
        """Write this key to `path` again when no file is there (True if it did): removed under a running
        gateway (`rm journal.sqlite*`), the next start would make a new key and the anchors signed by this
        one would show as another key's. A file already there is never written over. InputError (naming
        the file) when it cannot be written now."""
        return signing.save_new(path, self._private, ANCHOR_KEY)

    def sign(self, anchor: Anchor) -> Anchor:
        signature = self._private.sign(_canonical(anchor.body()).encode()).hex()
        return Anchor(**{**anchor.body(), "sig": signature})


def readable_public_key(path: Path) -> str | None:
    """The public half of the key at `path`, for a reader; None when it is missing or not readable here."""
    return signing.readable_public_key(path, ANCHOR_KEY, private=False)


# ---------------------------------------------------------------- writing


class AnchorLog:
    """The writer's end of one segment's anchor file: appends signed, linked lines, each fsynced."""

    def __init__(self, path: Path, key: AnchorKey, segment: int):
        self.path, self.key, self.segment = path, key, segment
        self.newest, self._link = _repair_tail(path)

    def append(self, seq: int, digest: str, wall: float, why: AnchorWhy) -> Anchor:
        """Write one anchor line, or raise OSError and leave the file as it was.

        A full disk may take part of a line without an error (a short write); the next line,
        appended after the fragment once space returns, would make one line that is no anchor,
        and an untouched journal would read as edited for good. So a line not written whole is
        cut back off before saying so."""
        anchor = self.key.sign(Anchor(self.segment, seq, digest, wall, str(why), self._link, self.key.public_hex))
        line = anchor.text()
        data = (line + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            before = os.fstat(fd).st_size
            try:
                if os.write(fd, data) != len(data):
                    raise OSError(errno.ENOSPC, f"only part of an anchor line was written to {self.path}")
                os.fsync(fd)
            except OSError:
                _cut_back(fd, before)
                raise
        finally:
            os.close(fd)
        self.newest, self._link = anchor, link_of(line)
        return anchor


def _cut_back(fd: int, size: int) -> None:
    """Best effort: the file back to `size`; what cannot be cut is a torn tail the next open cuts."""
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    except OSError:
        pass


def _repair_tail(path: Path) -> tuple[Anchor | None, str]:
    """The newest complete line and its link; a torn last line (a crash mid-write) is cut off."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return None, GENESIS_LINK
    with open(path, "rb+") as f:
        f.seek(max(0, size - TAIL_READ_BYTES))
        tail = f.read()
        cut = tail.rfind(b"\n") + 1
        if cut < len(tail):
            f.truncate(size - (len(tail) - cut))
            f.flush()
            os.fsync(f.fileno())
    lines = tail[:cut].decode(errors="replace").splitlines()
    if not lines:
        return None, GENESIS_LINK
    return _parse(lines[-1]), link_of(lines[-1])


SQLITE_INT_MAX = 2**63 - 1
MAX_WALL_S = 253_402_300_799.0  # 9999-12-31T23:59:59Z, the last second a date can be told in


def _parse(line: str) -> Anchor | None:
    """An anchor line as an Anchor; None when it is not one."""
    try:
        fields = json.loads(line)
        anchor = Anchor(**fields)
    except (ValueError, TypeError):
        return None
    types_ok = (isinstance(anchor.segment, int) and isinstance(anchor.seq, int)
                and isinstance(anchor.wall, (int, float))
                and all(isinstance(v, str) for v in (anchor.hash, anchor.why, anchor.prev, anchor.key, anchor.sig)))
    # Numbers SQLite and the calendar can hold: an edited line's 2**70 or 1e300 is no anchor, not a traceback.
    in_range = types_ok and all(-SQLITE_INT_MAX <= n <= SQLITE_INT_MAX for n in (anchor.segment, anchor.seq)) \
        and is_finite_number(anchor.wall) and abs(anchor.wall) <= MAX_WALL_S
    return anchor if in_range else None


# ---------------------------------------------------------------- checking


@dataclass
class AnchorCheck:
    """What one segment's anchor file says about the segment's records."""

    lines: int = 0
    newest: Anchor | None = None
    key_checked: bool = False  # the signing key was read here and matches the lines' key
    problems: list[str] = field(default_factory=list)


def check(path: Path, segment: int, hash_at: Callable[[int], str | None], last_seq: int,
          expected_key: str | None, upto: int | None = None) -> AnchorCheck:
    """Every line linked to the one before, naming this segment and a record the segment holds
    with the same hash; the newest line's signature good (by `expected_key` when known).

    `upto`: the file's length (`size`) taken before the records were read, while the gateway may
    append: a line written after that names a record newer than `last_seq`, and is no cut.
    Streams the file: memory does not grow with its length.
    """
    result = AnchorCheck()
    name = path.name
    link, truncated_to, mismatched, first_key = GENESIS_LINK, None, [], None
    for number, line in _lines(path, upto):
        result.lines = number
        anchor = _parse(line)
        if anchor is None:
            result.problems.append(f"{name}: line {number} is not an anchor (the file was edited)")
            link = link_of(line)
            continue
        if anchor.prev != link:
            result.problems.append(f"{name}: line {number} does not follow the line before it "
                                   "(anchor lines were removed, inserted or edited)")
        first_key = first_key or anchor.key
        if anchor.key != first_key:
            result.problems.append(f"{name}: line {number} is signed by another key than the lines before it "
                                   "(the anchor key was replaced)")
            first_key = anchor.key
        if anchor.segment != segment:
            result.problems.append(f"{name}: line {number} names segment {anchor.segment}, not {segment}")
        if anchor.seq > last_seq:
            truncated_to = max(truncated_to or 0, anchor.seq)
        elif (hash_at(anchor.seq) if anchor.seq else EMPTY_HEAD) != anchor.hash:
            mismatched.append(anchor.seq)
        if anchor.why == AnchorWhy.MISSING:
            result.problems.append(f"{name}: line {number}: the gateway found this segment's anchor file missing "
                                   f"when it opened the journal (records up to {anchor.seq} had no anchors left "
                                   "to check them against)")
        link, result.newest = link_of(line), anchor
    if truncated_to is not None:
        result.problems.append(f"records {last_seq + 1}..{truncated_to}: missing at the end "
                               f"(anchored in {name}: the journal was cut back)")
    if mismatched:
        more = f"; {len(set(mismatched)) - 1} more anchored records differ" if len(set(mismatched)) > 1 else ""
        result.problems.append(f"record {min(mismatched)}: does not match its anchor in {name} "
                               f"(removed or rewritten after it was anchored){more}")
    if result.newest is not None:
        result.problems += _signature_problems(name, result, expected_key)
    return result


def _signature_problems(name: str, result: AnchorCheck, expected_key: str | None) -> list[str]:
    newest = result.newest
    assert newest is not None
    try:
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(newest.key))
        key.verify(bytes.fromhex(newest.sig), _canonical(newest.body()).encode())
    except (ValueError, InvalidSignature):
        return [f"{name}: the newest anchor's signature does not verify (the file was edited or forged)"]
    if expected_key is None:
        return []
    if expected_key != newest.key:
        return [f"{name}: signed by key {newest.key[:16]}…, not by this journal's key {expected_key[:16]}…"]
    result.key_checked = True
    return []


def _lines(path: Path, upto: int | None = None) -> Iterator[tuple[int, str]]:
    """Complete lines, numbered from 1 (a torn last line, left by a crash mid-write, is not one),
    within the first `upto` bytes when given."""
    f = open_regular(path, "anchor file")
    if f is None:
        return
    with f:
        read = 0
        for number, raw in enumerate(f, 1):
            read += len(raw)
            if not raw.endswith(b"\n") or (upto is not None and read > upto):
                return  # only the last line can lack its newline
            yield number, raw[:-1].decode(errors="replace")


def size(path: Path) -> int:
    """The anchor file's length now (0 when there is none): `check` reads no line written after it."""
    try:
        return path.stat().st_size
    except OSError:
        return 0
