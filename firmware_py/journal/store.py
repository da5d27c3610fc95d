"""The journal: an append-only, hash-chained record of what the gateway was told and did.

It is the evidence behind bill credits and the trail after a fault, so:

- A committed record survives a crash. SQLite in WAL mode with
  `synchronous=FULL`: every commit fsyncs the WAL, so it survives `kill -9` and
  power loss. (NORMAL would survive `kill -9` only.) FULL measured ~3,500
  commits/s on the dev VM, far above the runtime's rate; the simulator, which
  appends faster than real time, groups records with `with journal.batch():`.
- Tampering is detectable. Each record's hash covers the previous record's
  hash, its seq, times, kind and payload; a one-row `head` table, written in the
  same transaction as every append, anchors the last seq and hash. Because a
  forger with the file can rewrite the head too, the writer also appends signed
  checkpoints of the head to a file outside the database (`anchors.py`), so a
  tail cut back below the newest checkpoint shows.
- A failed write is never silent: it raises `JournalWriteError`, the record is
  not in the journal, and the runtime must treat that as a fault (stop
  dispatching: energy it cannot account for must not be delivered).
- The live file is the one it was opened as. Every transaction first stats the
  path (`_ensure_live_file`): a file removed under the running writer (its open
  copy would take every later record with it) is restored from the open copy
  (`VACUUM INTO`, same records, same chain, so the anchors still hold); a path
  that names another file is never written over: the write fails.
- Its cost does not grow with its length. Readers page through the records
  (`iter_records`, `check`), never holding more than a page; and the journal is
  kept in segments: `rotate` archives the live file and starts the next one with a
  `SegmentStart` record that carries the chain on (the previous segment's head)
  and the accounts of the events still open, so a start-up reads the live
  segment only. `prune` deletes archives past retention and says so in the chain.
  `chain.py` checks all the segments together.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import json
import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from firmware_py.core.types import is_finite_number, is_whole_number
from firmware_py.errors import InputError
from firmware_py.journal import codec, files
from firmware_py.journal.anchors import ANCHOR_PERIOD_S, AnchorKey, AnchorLog, AnchorWhy
from firmware_py.journal.kinds import RecordKind
from firmware_py.version import software_version

log = logging.getLogger(__name__)

APPLICATION_ID = 0x50534757  # "PSGW": marks the file as ours (PRAGMA application_id)
SCHEMA_VERSION = 3
"""The journal's schema (PRAGMA user_version), what each version added:

1. one file, no anchors;
2. anchored (an anchor file beside each segment), segments may follow each other;
3. each run names its software: a core start carries `software_version`, and a file
   upgraded from an older schema says so in its chain (`SchemaUpgraded`).

The tables and the hash of a record are the same in every version, so a writer upgrades
a file forward without touching a stored row (`Journal._upgrade`): it anchors a version-1
file, then appends one `SchemaUpgraded` record to the chain and sets the version, in one
transaction. Readers read every version; archived segments keep the version they were
closed with. A file newer than this release is refused (an older gateway must not append
records the newer one would misread)."""
ANCHORED_VERSION = 2
GENESIS_HASH = "0" * 64
PAGE_ROWS = 512
"""Rows read per query: readers hold one page, whatever the journal's length."""
WRITER_CACHE_KIB = 512
"""SQLite's page cache for the gateway's own connection (SQLite's default is 2 MiB per connection).
Appends touch only the table's right edge and reads go by index, and the kernel caches the file
anyway: a bigger cache only raises the gateway's resident memory as the journal grows."""
ANCHOR_KINDS = frozenset({RecordKind.DISPATCH_ANSWER, RecordKind.DISPATCH_CANCEL, RecordKind.DISPATCH_ENDED,
                          RecordKind.SEGMENT_PRUNED})
"""Kinds that anchor the head as soon as they commit (with a final EventEnergy): what billing rests on."""

_SCHEMA = f"""
CREATE TABLE records (
    seq       INTEGER PRIMARY KEY,
    at        REAL    NOT NULL,
    wall      REAL    NOT NULL,
    kind      TEXT    NOT NULL,
    payload   TEXT    NOT NULL,
    prev_hash TEXT    NOT NULL,
    hash      TEXT    NOT NULL
);
CREATE INDEX records_kind ON records(kind, seq);
CREATE TABLE head (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    seq  INTEGER NOT NULL,
    hash TEXT    NOT NULL
);
INSERT INTO head (id, seq, hash) VALUES (1, 0, '{GENESIS_HASH}');
CREATE TRIGGER records_no_update BEFORE UPDATE ON records
    BEGIN SELECT RAISE(ABORT, 'journal records are append-only'); END;
CREATE TRIGGER records_no_delete BEFORE DELETE ON records
    BEGIN SELECT RAISE(ABORT, 'journal records are append-only'); END;
"""
_COLUMNS = "seq, at, wall, kind, payload, prev_hash, hash"
RESTORING_SUFFIX = ".restoring"


class JournalWriteError(Exception):
    """A record could not be committed (disk full, I/O error, locked, read-only).

    The record is NOT in the journal. The runtime turns this into a fault: with
    no durable record, energy delivered could not be accounted for.
    """


@dataclass(frozen=True)
class Record:
    """One journal row. `at` is the core's time base (monotonic in `run`, simulated in `sim`), which
    replays need; `wall` is the same instant on the wall clock (UTC epoch seconds in `run`), which
    people read. `wall - at` converts any other core instant of the record (an event's end) for them.

    `kind` is a `RecordKind`, or the stored text of a kind this gateway does not know.
    """

    seq: int
    at: float
    wall: float
    kind: RecordKind | str
    payload: dict[str, Any]
    prev_hash: str
    hash: str

    def event(self) -> Any:
        """The core dataclass this record was made from (ValueError for other kinds)."""
        return codec.decode_event(self.kind, self.payload)

    @property
    def offset(self) -> float:
        """How far the wall clock stood from the core's when the record was made (a wall-clock step moves it)."""
        return self.wall - self.at

    def on_wall(self, core_s: float) -> float:
        """A core instant named in this record, on the wall clock as it was when the record was made."""
        return core_s + self.offset


@dataclass
class SegmentCheck:
    """What walking one segment's stored chain found (`Journal.check`)."""

    problems: list[str] = field(default_factory=list)
    records: int = 0
    first_seq: int | None = None
    last_seq: int = 0
    last_hash: str = GENESIS_HASH
    start: dict[str, Any] | None = None  # the SegmentStart payload, when the segment begins with one


def _row_types_ok(seq: Any, at: Any, wall: Any, kind: Any, text: Any, prev: Any, digest: Any) -> bool:
    """What the schema promises and SQLite's loose typing does not enforce."""
    return (isinstance(seq, int) and all(isinstance(v, (int, float)) for v in (at, wall))
            and all(isinstance(v, str) for v in (kind, text, prev, digest)))


_CHAINED = json.JSONEncoder(separators=(",", ":"))
"""Built once: `json.dumps` with options builds an encoder at every call, a share of a record hash's cost."""


def record_hash(prev_hash: str, seq: int, at: float, wall: float, kind: str, payload_text: str) -> str:
    """sha256 over the canonical JSON of the chained fields (payload as its stored text)."""
    fields = _CHAINED.encode([prev_hash, seq, at, wall, kind, payload_text])
    return hashlib.sha256(fields.encode()).hexdigest()


class Journal:
    """One open segment file: the live one (to append) or any one (to read).

    Not for sharing between processes as writers: one gateway, one writer.
    """

    def __init__(self, path: Path, conn: sqlite3.Connection, wall_clock: Callable[[], float],
                 key: AnchorKey | None = None, busy_timeout_s: float = 5.0, was_anchored: bool = False):
        self.path = path
        self._conn = conn
        self._identity = _identity_of(path)  # the file opened: a write checks the path still names it
        self._busy_timeout_s = busy_timeout_s
        self._wall_clock = wall_clock
        self._lock = threading.RLock()
        self._batch_depth = 0
        self._key = key
        self._reopen_due = False
        self._load_segment()
        self._anchors = _anchor_log(path, key, self.segment) if key is not None else None
        self._anchor_due: AnchorWhy | None = None
        self._uncommitted_due: AnchorWhy | None = None
        self._anchor_failing = self._key_failing = False
        if self._anchors is not None:
            self._check_against_anchor(was_anchored)
            self._anchor(AnchorWhy.OPEN)

    # -- opening -----------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path, *, readonly: bool = False, busy_timeout_s: float = 5.0,
             wall_clock: Callable[[], float] = time.time) -> Journal:
        """Open (creating it unless `readonly`) the journal at `path`.

        InputError when the file is missing (readonly), is not SQLite, or holds
        some other schema, because those are the operator's mistakes to fix.
        Opening to write finishes a rotation a crash interrupted, makes the anchor
        key if there is none, anchors the head it finds, and upgrades a file of an
        older schema (`_upgrade`); opening to read changes nothing.
        """
        path = Path(path)
        if readonly and not path.is_file():
            raise InputError(f"{path}: no such journal file")
        if not readonly:
            try:
                _finish_rotation(path)
            except OSError as err:
                raise InputError(f"{path}: cannot finish the rotation a crash interrupted: {err}") from err
            if not path.exists() and files.archives(path):
                raise InputError(f"{path}: missing, but archived segments of it are beside it "
                                 f"({files.archives(path)[-1].path.name}, ...); restore it, or move the "
                                 "archives away to start a new journal")
        conn = _connect(path, readonly, busy_timeout_s)
        try:
            version = _prepare(conn, path, readonly)
            key = None if readonly else AnchorKey.load_or_create(files.key_path(path))
            journal = cls(path, conn, wall_clock, key, busy_timeout_s, was_anchored=version >= ANCHORED_VERSION)
        except BaseException:
            conn.close()
            raise
        if not readonly and version < SCHEMA_VERSION:
            try:
                journal._upgrade(version)
            except BaseException:
                journal.close()
                raise
        return journal

    @staticmethod
    def check_openable(path: str | Path, busy_timeout_s: float = 1.0) -> None:
        """InputError if the file at `path` is one `open` would refuse: not SQLite, another program's
        schema, a newer release's. Read only, nothing changed (an empty file passes: `open` makes the
        journal in it), so `check-config` can judge the journal a running gateway writes."""
        path = Path(path)
        conn = _connect(path, True, busy_timeout_s)
        try:
            _identify(conn, path)
        finally:
            conn.close()

    def _load_segment(self) -> None:
        """Which segment this file is, and where its chain continues from."""
        self._seq, self._hash = self._read_tail()
        self.anchored = self._read("PRAGMA user_version")[0][0] >= ANCHORED_VERSION
        first = self._read("SELECT kind, payload FROM records ORDER BY seq LIMIT 1")
        self.start: dict[str, Any] | None = None
        if first and first[0][0] == RecordKind.SEGMENT_START:
            with contextlib.suppress(ValueError, TypeError):
                payload = json.loads(first[0][1])
                if isinstance(payload, dict) and isinstance(payload.get("segment"), int):
                    self.start = payload
        self.segment: int = self.start["segment"] if self.start else 1
        self.anchored = self.anchored or self._written_by_an_anchoring_release(first)

    def _written_by_an_anchoring_release(self, first: list[tuple[Any, ...]]) -> bool:
        """Whether the records prove a release that anchors wrote this file, whatever its version number
        says (nothing signs that number: a file set back to version 1 must not excuse a missing anchor file).
        Only such a release starts a segment with `SegmentStart`, upgrades a file, or names its software
        in `CoreStart`; each is read through the kind index (the newest run's start only)."""
        if first and first[0][0] == RecordKind.SEGMENT_START:
            return True
        if self._read("SELECT 1 FROM records WHERE kind = ? LIMIT 1", (str(RecordKind.SCHEMA_UPGRADED),)):
            return True
        newest = self._read("SELECT payload FROM records WHERE kind = ? ORDER BY seq DESC LIMIT 1",
                            (str(RecordKind.CORE_START),))
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            return bool(newest) and json.loads(newest[0][0]).get("software_version") is not None
        return False

    # -- writing -----------------------------------------------------------------------------

    def append(self, kind: RecordKind | str, at: float, payload: dict[str, Any], *, wall: float | None = None) -> int:
        """Add one record and return its seq; committed on return unless inside `batch()`.

        `wall` is `at` on the wall clock (the gateway converts it, see `firmware_py/clocks.py`);
        without it the journal's wall clock is read at the write.
        """
        return self._append(str(kind), at, payload, codec.canonical(payload), wall)

    def _append(self, kind: str, at: float, payload: dict[str, Any], text: str, wall: float | None) -> int:
        """`append` with the payload's canonical text made already (`kind` as stored: a member's
        value, exactly as older journals hold it)."""
        at = float(at)
        if not is_finite_number(at):
            raise ValueError(f"journal record {kind!r}: time must be finite, got {at!r}")
        with self._lock:
            self._reopen_if_due()
            wall = float(self._wall_clock() if wall is None else wall)
            seq = self._seq + 1
            digest = record_hash(self._hash, seq, at, wall, kind, text)
            with self._transaction():
                self._write(f"INSERT INTO records ({_COLUMNS}) VALUES (?,?,?,?,?,?,?)",
                            (seq, at, wall, kind, text, self._hash, digest))
                self._write("UPDATE head SET seq = ?, hash = ? WHERE id = 1", (seq, digest))
                self._seq, self._hash = seq, digest
                if kind in ANCHOR_KINDS or (kind == RecordKind.EVENT_ENERGY and payload.get("final")):
                    self._uncommitted_due = AnchorWhy.BILLING
            return seq

    def append_event(self, event: Any, *, wall: float | None = None) -> int:
        """Journal a core event or input (see codec.JOURNALED); kind = its class name."""
        if not isinstance(event, codec.JOURNALED):
            raise TypeError(f"the journal does not record {type(event).__name__} values")
        payload = codec.jsonable(event)
        return self._append(str(RecordKind.of(event)), codec.event_time(event), payload, codec.text_of(payload), wall)

    @contextlib.contextmanager
    def batch(self) -> Iterator[Journal]:
        """Commit every append inside as one transaction: fast, and all-or-nothing.

        Nested batches join the outer one. If the block raises, or the commit
        fails, none of its records are kept (JournalWriteError for the latter).
        """
        with self._lock:
            self._reopen_if_due()
            with self._transaction():
                yield self

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT at the outermost level; rollback and resync on failure."""
        if self._batch_depth:
            self._batch_depth += 1
            try:
                yield
            finally:
                self._batch_depth -= 1
            return
        self._ensure_live_file()
        self._write("BEGIN IMMEDIATE")
        self._batch_depth = 1
        try:
            yield
            self._write("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")
            self._seq, self._hash = self._read_tail()
            self._uncommitted_due = None
            raise
        finally:
            self._batch_depth = 0
        self._after_commit()

    def _write(self, sql: str, params: tuple = ()) -> None:
        try:
            self._conn.execute(sql, params)
        except sqlite3.Error as err:
            raise JournalWriteError(f"{self.path}: journal write failed: {err}") from err

    # -- the live file -----------------------------------------------------------------------

    def _live_file_state(self) -> str:
        """One stat: "same" while the path names the file this journal has open, else "gone" or "replaced"."""
        if self._identity is None:
            return "same"  # not a file we could identify at open (nothing to compare)
        try:
            found = os.stat(self.path)
        except FileNotFoundError:
            return "gone"
        except OSError as err:
            raise JournalWriteError(f"{self.path}: cannot check the journal file before writing: {err}") from err
        return "same" if (found.st_dev, found.st_ino) == self._identity else "replaced"

    def _ensure_live_file(self) -> None:
        """Before a write: the path must still name the open file. Removed (`rm journal.sqlite*` under the
        running gateway): every record would go into a file nobody can open again, so it is restored from
        the open copy first. Replaced by another file: nothing is written (over it or into the unlinked
        copy), JournalWriteError; the gateway holds dispatch until it is put back."""
        if self._anchors is None and self._key is None:
            return  # read-only: never writes
        state = self._live_file_state()
        if state == "gone":
            self._restore()
        elif state == "replaced":
            raise JournalWriteError(f"{self.path}: the journal file was replaced by another file while the gateway "
                                    "ran; nothing is written over it (the records since are not journaled and "
                                    "dispatch is held): move that file away and put the journal back, or restart "
                                    "the gateway")

    def _restore(self) -> None:
        """The live file was removed while open: copy the open database (every committed record, the head,
        the chain) to a new file at the path, then continue there. The copy is whole under a temporary name
        before it takes the path, and the open copy is let go only once it has; the chain and its anchors
        (they name record hashes) hold unchanged. JournalWriteError when it cannot be done now (retried
        with the next write; meanwhile the records are only in the open copy)."""
        path, temp = self.path, self.path.with_name(self.path.name + RESTORING_SUFFIX)
        head = (self._seq, self._hash)
        try:
            count = len(self)
            for leftover in (temp, *files.sqlite_side_files(temp)):
                leftover.unlink(missing_ok=True)
            self._conn.execute("VACUUM INTO ?", (str(temp),))
            os.link(temp, path)  # never over a file that appeared at the path meanwhile
            temp.unlink(missing_ok=True)
            _sync_folder(path.parent)
        except (InputError, sqlite3.Error, OSError) as err:
            with contextlib.suppress(OSError):
                temp.unlink(missing_ok=True)
            raise JournalWriteError(f"{path}: the journal file was removed while the gateway ran and cannot be "
                                    f"restored from the open copy now ({err}); dispatch is held and the restore "
                                    "is retried with every write: free space beside it (a stop now loses the "
                                    "records since the gateway started writing it)") from err
        # The old database's side files are the removed one's: not the copy's (its WAL would be replayed into it).
        with contextlib.suppress(sqlite3.Error):
            self._conn.close()
        for stale in files.sqlite_side_files(path):
            with contextlib.suppress(OSError):
                stale.unlink(missing_ok=True)
        self._reopen(AnchorWhy.OPEN, "restoring the removed file")
        if (self._seq, self._hash) != head:
            raise JournalWriteError(f"{path}: the journal restored from the open copy does not end where the open "
                                    f"one did (record {self._seq}, not {head[0]}); restart the gateway")
        log.warning("journal file %s was removed while the gateway ran: restored from the open copy, %d records",
                    path, count)

    # -- anchoring ---------------------------------------------------------------------------

    def _after_commit(self) -> None:
        """Anchor the head now if a billing record just committed, or the period has passed."""
        if self._anchors is None:
            return
        self._anchor_due = self._anchor_due or self._uncommitted_due
        self._uncommitted_due = None
        newest = self._anchors.newest
        if self._anchor_due is None and newest is not None and self._wall_clock() - newest.wall < ANCHOR_PERIOD_S:
            return
        self._anchor(self._anchor_due or AnchorWhy.PERIODIC)

    def _anchor(self, why: AnchorWhy) -> None:
        """One signed line for the head, unless the newest line already names it. Never raises:
        the records are committed whatever happens to their checkpoint (it is retried next commit)."""
        anchors = self._anchors
        if anchors is None:
            return
        try:
            state = self._live_file_state()
        except JournalWriteError:
            state = "unknown"
        if state != "same":  # no anchor for a file that is gone or is another one now (or cannot be told)
            self._anchor_due = why
            return
        newest = anchors.newest
        if newest is not None and (newest.seq, newest.hash) == (self._seq, self._hash):
            self._anchor_due = None
            return
        self._keep_key(anchors.key)
        try:
            anchor = anchors.append(self._seq, self._hash, float(self._wall_clock()), why)
        except OSError as err:
            if not self._anchor_failing:
                log.error("%s: cannot write the journal's anchor (retried with the next commit): %s",
                          anchors.path, err)
            self._anchor_failing, self._anchor_due = True, why
            return
        self._anchor_failing, self._anchor_due = False, None
        log.debug("journal anchor: segment %d seq %d hash %s (%s)", anchor.segment, anchor.seq, anchor.hash, why)

    def _keep_key(self, key: AnchorKey) -> None:
        """Before an anchor is signed: the key's file must still be beside the journal, or the next start
        makes a new key and every anchor signed so far reads as another key's. Removed: written back from
        memory (never over a file put there meanwhile). Never raises: the anchor is written all the same."""
        path = files.key_path(self.path)
        try:
            if key.put_back(path):
                log.warning("journal anchor key %s was removed while the gateway ran: written again from memory",
                            path)
        except InputError as err:
            if not self._key_failing:
                log.error("%s (retried with the next anchor; a start before then makes a new anchor key)", err)
            self._key_failing = True
            return
        self._key_failing = False

    def _upgrade(self, found: int) -> None:
        """Bring a file of an older schema to this one, never rewriting or re-chaining a stored record:
        the rows stay as they are; one `SchemaUpgraded` record, chained onto the head found, says
        from which version, when and by which software, and commits with the new version number.

        A version-1 file has been anchored by now (in `__init__`), so no anchored file is ever
        without an anchor. The record's core time is the newest record's (the next run's clock
        is not known here); its wall time is now.
        """
        payload = {"from_version": found, "to_version": SCHEMA_VERSION, "software_version": software_version()}
        try:
            with self.batch():
                self.append(RecordKind.SCHEMA_UPGRADED, self.newest_at() or 0.0, payload)
                self._write(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except JournalWriteError as err:
            raise InputError(f"{self.path}: cannot upgrade the journal from schema {found} to {SCHEMA_VERSION}: "
                             f"{err}") from err
        self.anchored = True
        self._anchor(AnchorWhy.OPEN)
        log.info("%s: journal upgraded from schema %d to %d (record %d); no stored record changed",
                 self.path, found, SCHEMA_VERSION, self._seq)

    def _check_against_anchor(self, was_anchored: bool) -> None:
        """At open: a head behind or beside the newest anchor means records were removed; say so
        loudly (`report` flags it whatever is appended later: every anchor line is checked).
        An anchored segment with records and no anchors at all lost its anchor file: the first
        new line says so, so that the loss stays in the file for `report`."""
        newest = self._anchors.newest if self._anchors is not None else None
        if newest is None:
            if was_anchored and self._seq > 0 and self._key is not None:
                log.error("%s: the journal's anchor file is missing or empty (or its last line is no anchor): "
                          "records cut before now cannot be shown; `powershare-gw report` flags it",
                          files.anchors_path(self.path))
                self._anchor(AnchorWhy.MISSING)
            return
        if newest.seq > self._seq or (self.hash_at(newest.seq) if newest.seq else GENESIS_HASH) != newest.hash:
            log.error("%s: the journal does not match its newest anchor (record %d, hash %s): records were "
                      "removed or rewritten while the gateway was stopped; `powershare-gw report` shows what",
                      self.path, newest.seq, newest.hash)

    # -- reading -----------------------------------------------------------------------------

    def iter_records(self, kinds: Collection[RecordKind | str] | None = None, since_seq: int = 0, *,
                     damaged: Callable[[int], None] | None = None) -> Iterator[Record]:
        """Records with seq > since_seq, oldest first, optionally of some kinds only: a page at a time.

        Each kind is read through the (kind, seq) index and the kinds merged by seq,
        so asking for the rare kinds of a long journal reads those rows only.
        A record whose payload cannot be read raises InputError (`report` and `check` flag it), unless
        `damaged` is given: then it is told the record's seq and the record is skipped (the gateway's
        start-up must not fail for ever on one damaged row).
        """
        if kinds is None:
            yield from self._records_where("", (), since_seq, damaged)
            return
        streams = [self._records_where(" AND kind = ?", (str(kind),), since_seq, damaged)
                   for kind in sorted(set(map(str, kinds)))]
        yield from heapq.merge(*streams, key=lambda record: record.seq)

    def records(self, kind: RecordKind | str | None = None, since_seq: int = 0) -> list[Record]:
        """Records with seq > since_seq, oldest first, optionally of one kind: all in memory at once,
        so for small journals and tests; anything that may meet a long journal uses `iter_records`."""
        return list(self.iter_records(None if kind is None else [kind], since_seq))

    def _records_where(self, where: str, params: tuple, since_seq: int,
                       damaged: Callable[[int], None] | None = None) -> Iterator[Record]:
        for rows in self._pages(where, params, since_seq):
            yield from filter(None, (self._record(row, damaged) for row in rows))

    def _record(self, row: tuple, damaged: Callable[[int], None] | None) -> Record | None:
        """The row as a Record; None when its payload cannot be read and `damaged` (told its seq) skips it."""
        seq, at, wall, kind, text, prev, h = row
        try:
            payload = _load_payload(self.path, seq, text)
        except InputError:
            if damaged is None:
                raise
            damaged(seq)
            return None
        return Record(seq, at, wall, RecordKind.read(kind), payload, prev, h)

    def _pages(self, where: str, params: tuple, since_seq: int) -> Iterator[list[tuple]]:
        """Raw rows, PAGE_ROWS at a time (keyset paging: each page its own short query)."""
        sql = f"SELECT {_COLUMNS} FROM records WHERE seq > ?{where} ORDER BY seq LIMIT {PAGE_ROWS}"
        after = since_seq
        while True:
            with self._lock:
                rows = self._read(sql, (after, *params))
            if not rows:
                return
            yield rows
            if not isinstance(rows[-1][0], int):
                return  # a seq rewritten as another type: paging cannot go on past it (check() says so)
            after = rows[-1][0]

    def recent(self, kinds: Collection[RecordKind | str], since_wall: float, page: int = 512, *,
               damaged: Callable[[int], None] | None = None) -> list[Record]:
        """Records of `kinds` made at or after `since_wall` (wall time), oldest first: `newest_first`'s, kept.

        Read newest first through the (kind, seq) index, a page at a time, stopping at
        the first older record: what it costs is the window's size, never the journal's
        (the history chart asks for a day of a journal that may hold years).
        """
        return list(self.newest_first(kinds, since_wall, page, damaged=damaged))[::-1]

    def newest_first(self, kinds: Collection[RecordKind | str], since_wall: float, page: int = 512, *,
                     damaged: Callable[[int], None] | None = None) -> Iterator[Record]:
        """Records of `kinds` made at or after `since_wall`, newest first, one at a time: a caller that thins
        them (the history chart: a day at a sample a second is 86,400) holds only what it keeps.

        A window reaching back past this segment's first record goes on into the archived ones,
        newest first: a rotation earlier that day must not hide what the day spent.
        A record whose payload cannot be read raises InputError, unless `damaged` is given: as in
        `iter_records`, it is told the seq and the record is skipped (one torn row must not blank a day).
        """
        whole = yield from self._recent_here(kinds, since_wall, page, damaged)
        if not whole:
            return
        for segment in reversed(files.archives(self.path)):
            try:
                with Journal.open(segment.path, readonly=True) as older:
                    whole = yield from older._recent_here(kinds, since_wall, page, damaged)
            except InputError as err:
                log.warning("journal: the archived segment %s could not be read (%s); the window starts after it",
                            segment.path.name, err)
                return
            if not whole:
                return

    def _recent_here(self, kinds: Collection[RecordKind | str], since_wall: float, page: int,
                     damaged: Callable[[int], None] | None = None) -> Generator[Record, None, bool]:
        """`newest_first` within this segment; returns whether the window reached back past its first record."""
        wanted = sorted(str(kind) for kind in kinds)
        marks = ",".join("?" * len(wanted))
        sql = f"SELECT {_COLUMNS} FROM records WHERE kind IN ({marks}) AND seq < ? ORDER BY seq DESC LIMIT ?"
        before = self.last_seq + 1
        while True:
            with self._lock:
                rows = self._read(sql, (*wanted, before, page))
            for row in rows:
                if row[2] < since_wall:  # its wall time
                    return False
                if (record := self._record(row, damaged)) is not None:
                    yield record
            if len(rows) < page:
                return self._first_wall() >= since_wall
            before = rows[-1][0]

    def _first_wall(self) -> float:
        """When this segment's first record was made (+inf when it has none)."""
        with self._lock:
            rows = self._read("SELECT wall FROM records ORDER BY seq LIMIT 1", ())
        return rows[0][0] if rows else math.inf

    def __len__(self) -> int:
        with self._lock:
            return int(self._read("SELECT count(*) FROM records")[0][0])

    @property
    def last_seq(self) -> int:
        return self._seq

    @property
    def head_hash(self) -> str:
        return self._hash

    def newest_at(self) -> float | None:
        """The gateway time of the newest record (None when there is none)."""
        with self._lock:
            rows = self._read("SELECT at FROM records ORDER BY seq DESC LIMIT 1")
        return rows[0][0] if rows else None

    def hash_at(self, seq: int) -> str | None:
        with self._lock:
            rows = self._read("SELECT hash FROM records WHERE seq = ?", (seq,))
        return rows[0][0] if rows else None

    def carried(self) -> list[tuple[str, dict[str, Any]]]:
        """The records a rotation carried into this segment (kind, payload): the open events' accounts."""
        carry = (self.start or {}).get("carry") or []
        return [(str(item.get("kind")), item.get("payload") or {}) for item in carry if isinstance(item, dict)]

    def size_bytes(self) -> int:
        """The segment's size as a database (what it will take as an archive), committed pages included
        whether or not they have reached the main file yet (the write-ahead log is reused, not a measure)."""
        with self._lock:
            (pages,), = self._read("PRAGMA page_count")
            (page_size,), = self._read("PRAGMA page_size")
        return int(pages) * int(page_size)

    def verify(self) -> list[str]:
        """Every way the stored chain differs from what was appended; empty when intact."""
        return self.check().problems

    def check(self) -> SegmentCheck:
        """Walk the stored chain, a page at a time: every problem, and where the segment begins and ends.

        A segment after a rotation begins where its `SegmentStart` says the one before ended.
        """
        with self._lock, self._snapshot():
            return self._check()

    @contextlib.contextmanager
    def _snapshot(self) -> Iterator[None]:
        """One read transaction: every page and the head as of one moment, though the gateway appends
        meanwhile (a live segment is in WAL mode, so the writer is not held up)."""
        if self._conn.in_transaction:
            yield
            return
        self._read("BEGIN")
        try:
            yield
        finally:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("COMMIT")

    def _check(self) -> SegmentCheck:
        result = SegmentCheck()
        expected_seq, prev_hash = None, None
        for rows in self._pages("", (), -(2**63)):
            for seq, at, wall, kind, text, stored_prev, stored_hash in rows:
                if expected_seq is None:
                    expected_seq, prev_hash = self._base(result, seq, kind, text)
                result.records += 1
                if not _row_types_ok(seq, at, wall, kind, text, stored_prev, stored_hash):
                    result.problems.append(f"record {seq}: a column holds the wrong type (edited outside the journal)")
                    expected_seq, prev_hash = (seq + 1 if isinstance(seq, int) else expected_seq), stored_hash
                    continue
                if seq != expected_seq:
                    result.problems.append(_gap(expected_seq, seq))
                if stored_prev != prev_hash:
                    result.problems.append(f"record {seq}: does not chain to the record before it "
                                           "(a record was inserted, deleted or edited)")
                if record_hash(stored_prev, seq, at, wall, kind, text) != stored_hash:
                    result.problems.append(f"record {seq}: contents do not match its hash (edited)")
                try:
                    payload = json.loads(text)
                except ValueError:
                    result.problems.append(f"record {seq}: payload is not valid JSON")
                else:
                    if kind == RecordKind.SEGMENT_PRUNED and pruning_mark(payload) is None:
                        result.problems.append(f"record {seq}: a SegmentPruned record that does not name the "
                                               "pruned segment by number (edited)")
                expected_seq, prev_hash = seq + 1, stored_hash
        if expected_seq is None:
            expected_seq, prev_hash = 1, GENESIS_HASH
        result.last_seq, result.last_hash = expected_seq - 1, prev_hash
        result.problems += self._head_problems(result.last_seq, prev_hash)
        return result

    def _base(self, result: SegmentCheck, seq: Any, kind: Any, text: Any) -> tuple[int, str]:
        """Where the chain of this segment starts: genesis, or the previous segment's head."""
        result.first_seq = seq if isinstance(seq, int) else None
        if kind != RecordKind.SEGMENT_START:
            return 1, GENESIS_HASH
        try:
            payload = json.loads(text)
        except (ValueError, TypeError):
            payload = None
        previous = payload.get("previous") if isinstance(payload, dict) else None
        if not (isinstance(previous, dict) and is_whole_number(previous.get("last_seq"))
                and isinstance(previous.get("last_hash"), str)):
            result.problems.append(f"record {seq}: a segment start that does not say where the chain came from")
            return (seq if isinstance(seq, int) else 1), GENESIS_HASH
        if payload.get("pruned_through") is not None and pruning_mark(payload["pruned_through"]) is None:
            result.problems.append(f"record {seq}: a segment start whose pruned_through does not name a "
                                   "pruned segment by number (edited)")
        result.start = payload
        return previous["last_seq"] + 1, previous["last_hash"]

    def _head_problems(self, last_seq: int, last_hash: str) -> list[str]:
        with self._lock:
            head = self._read("SELECT seq, hash FROM head WHERE id = 1")
        if not head:
            return ["head: the chain anchor row is missing"]
        head_seq, head_hash = head[0]
        if head_seq > last_seq:
            return [f"records {last_seq + 1}..{head_seq}: missing at the end (deleted)"]
        if head_seq < last_seq:
            return [f"records {head_seq + 1}..{last_seq}: added after the chain head (inserted)"]
        if head_hash != last_hash:
            return [f"record {last_seq}: does not match the chain head (edited or replaced)"]
        return []

    def _read(self, sql: str, params: tuple = ()) -> list[tuple]:
        try:
            return self._conn.execute(sql, params).fetchall()
        except sqlite3.Error as err:
            raise InputError(f"{self.path}: cannot read journal: {err}") from err

    def _read_tail(self) -> tuple[int, str]:
        """Where the next append continues: after the head, or after a later stray row."""
        (head_seq, head_hash), = self._read("SELECT seq, hash FROM head WHERE id = 1") or [(0, GENESIS_HASH)]
        last = self._read("SELECT seq, hash FROM records ORDER BY seq DESC LIMIT 1")
        if last and last[0][0] > head_seq:
            return last[0][0], last[0][1]
        return head_seq, head_hash

    # -- segments ----------------------------------------------------------------------------

    def rotate(self, at: float, carry: list[tuple[str, dict[str, Any]]], run: dict[str, Any] | None = None) -> Path:
        """Archive this segment and continue the chain in a new live file; returns the archive's path.

        `carry` is what the next segment must hold for the events still open (the
        runtime asks the core which those are); `run`, the run in progress as it stands now (its
        policy, owner settings and the request served), for a reader whose run began in a segment
        the retention policy pruned. Crash-safe in every step: the new
        segment is complete under a temporary name before the old one moves, and
        `open` finishes a rotation that a crash interrupted. JournalWriteError when
        it cannot be done now (the old segment then stays live and nothing is lost).
        """
        with self._lock:
            if not self._batch_depth:
                self._reopen_if_due()
            if self._batch_depth or self._anchors is None:
                raise JournalWriteError(f"{self.path}: cannot rotate inside a batch or a read-only journal")
            self._ensure_live_file()  # never archive another file, nor rename what is not there
            archive, temp = files.archive_path(self.path, self.segment), files.rotating_path(self.path)
            if archive.exists():
                raise JournalWriteError(f"{self.path}: cannot rotate: {archive.name} already exists")
            for leftover in (temp, files.anchors_path(temp), *files.sqlite_side_files(temp)):
                leftover.unlink(missing_ok=True)
            start = self._next_start(archive, carry, run)
            try:
                first = _write_segment(temp, at, float(self._wall_clock()), start, self._seq, self._hash)
                AnchorLog(files.anchors_path(temp), self._key, self.segment + 1).append(
                    self._seq + 1, first, float(self._wall_clock()), AnchorWhy.SEGMENT)
                self._anchor(AnchorWhy.ROTATE)
                self._write("PRAGMA wal_checkpoint(TRUNCATE)")
                self._write("PRAGMA journal_mode = DELETE")  # the archive: one self-contained file
            except (JournalWriteError, sqlite3.Error, OSError) as err:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("PRAGMA journal_mode = WAL")
                for leftover in (temp, files.anchors_path(temp)):
                    leftover.unlink(missing_ok=True)
                raise JournalWriteError(f"{self.path}: rotation postponed: {err}") from err
            self._conn.close()
            try:
                _swap(self.path, archive, temp)
                failure = None
            except OSError as err:
                failure = err
            self._reopen()
            if failure is not None:
                raise JournalWriteError(f"{self.path}: rotation failed half-way, finished at the next open: "
                                        f"{failure}") from failure
            return archive

    def _next_start(self, archive: Path, carry: list[tuple[str, dict[str, Any]]],
                    run: dict[str, Any] | None) -> dict[str, Any]:
        first = self._read("SELECT seq FROM records ORDER BY seq LIMIT 1")
        previous = {"segment": self.segment, "file": archive.name, "first_seq": first[0][0] if first else None,
                    "last_seq": self._seq, "last_hash": self._hash}
        start = {"segment": self.segment + 1, "previous": previous, "pruned_through": self.pruned_through(),
                 "carry": [{"kind": kind, "payload": payload} for kind, payload in carry]}
        return start if run is None else {**start, "run": run}

    def _reopen(self, why: AnchorWhy = AnchorWhy.SEGMENT, after: str = "rotating") -> None:
        """After a rotation (or one that failed half-way): finish it and open whatever is live now
        (after `_restore` too: `why` and `after` say so in the anchor and the error).

        All or nothing: the connection, the segment's number, start and head, and its anchor log are
        reloaded together. Any step failing (a reader holding the new file past the busy timeout refuses
        `journal_mode = WAL`) leaves the journal marked for a reopen, with no anchor log: a half-reopened
        journal would chain onto the old segment's head and sign the old segment's number into the new
        anchor file, false tamper evidence. The next append or rotation redoes the whole reload first."""
        assert self._key is not None
        self._reopen_due, self._anchors = True, None
        with contextlib.suppress(sqlite3.Error):
            self._conn.close()
        try:
            _finish_rotation(self.path)
            self._conn = _connect(self.path, False, self._busy_timeout_s)
            _prepare(self._conn, self.path, False)
            self._load_segment()
            anchors = _anchor_log(self.path, self._key, self.segment)
            self._identity = _identity_of(self.path)
        except (InputError, sqlite3.Error, OSError) as err:
            raise JournalWriteError(f"{self.path}: cannot reopen the journal after {after} (retried at the "
                                    f"next write): {err}") from err
        self._anchors, self._reopen_due = anchors, False
        self._anchor_due = self._uncommitted_due = None
        self._anchor(why)

    def _reopen_if_due(self) -> None:
        """Before a write: finish the reopen a rotation could not (JournalWriteError, nothing written, if it
        still cannot: the caller keeps its records for later)."""
        if self._reopen_due:
            self._reopen()

    def pruned_through(self) -> dict[str, Any] | None:
        """The newest archive this segment knows was pruned (carried in, or pruned since)."""
        newest = pruning_mark((self.start or {}).get("pruned_through"))
        # A mark an edit left malformed (or a record that is not JSON) counts for nothing here: `check` names it.
        for record in self.iter_records([RecordKind.SEGMENT_PRUNED], damaged=lambda _seq: None):
            mark = pruning_mark(record.payload)
            if mark is not None and (newest is None or mark["segment"] > newest["segment"]):
                newest = {k: mark.get(k) for k in ("segment", "file", "last_seq", "last_hash")}
        return newest

    def prune(self, at: float, retain_s: float) -> list[Path]:
        """Delete archived segments whose newest record is more than `retain_s` old, oldest first, each
        after a `SegmentPruned` record (its head) is committed: pruning is in the chain, deleting is not.

        Age is measured up to `_prune_now`, not the bare wall clock: deleting is irreversible, and a wall
        clock read far ahead (a bad RTC at boot, before NTP) must not make archives written minutes ago
        look old, with the chain then vouching for their loss."""
        with self._lock:
            self._reopen_if_due()
        older_than_wall = self._prune_now() - retain_s
        pruned: list[Path] = []
        for archive in files.archives(self.path):
            tail = _segment_tail(archive.path)
            if tail is None or tail["newest_wall"] >= older_than_wall or archive.number >= self.segment:
                break
            self.append(RecordKind.SEGMENT_PRUNED, at, {"segment": archive.number, "file": archive.path.name, **tail})
            for doomed in (archive.path, files.anchors_path(archive.path), *files.sqlite_side_files(archive.path)):
                doomed.unlink(missing_ok=True)
            pruned.append(archive.path)
        return pruned

    def _prune_now(self) -> float:
        """"Now" for retention: the earlier of the wall clock and the live segment's first record (its
        `SegmentStart`, written when the newest archive was closed). A clock stepped ahead after that
        rotation (every record since may carry it) cannot age an archive; the cost is that pruning lags
        by up to one segment's lifetime, keeping more, never less."""
        return min(float(self._wall_clock()), self._first_wall())

    # -- closing -----------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            if self._anchors is not None and not self._reopen_due:
                try:
                    self._ensure_live_file()  # removed: restored now, or its records go with the open copy
                except JournalWriteError as err:
                    log.error("closing the journal without its closing anchor: %s", err)
            self._anchor(AnchorWhy.CLOSE)
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _identity_of(path: Path) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the file at `path`, None when there is none to stat."""
    try:
        found = os.stat(path)
    except OSError:
        return None
    return found.st_dev, found.st_ino


def _anchor_log(path: Path, key: AnchorKey, segment: int) -> AnchorLog:
    anchors = files.anchors_path(path)
    try:
        return AnchorLog(anchors, key, segment)
    except OSError as err:
        raise InputError(f"{anchors}: cannot open the journal's anchor file: {err.strerror or err}") from None


def _connect(path: Path, readonly: bool, busy_timeout_s: float) -> sqlite3.Connection:
    try:
        if readonly:
            return sqlite3.connect(f"{path.resolve().as_uri()}?{_read_only_mode(path)}", uri=True,
                                   isolation_level=None, check_same_thread=False, timeout=busy_timeout_s)
        return sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=busy_timeout_s)
    except sqlite3.Error as err:
        raise InputError(f"{path}: cannot open journal: {err}") from err


def _read_only_mode(path: Path) -> str:
    """How to open for reading: on read-only media (a copy on a USB stick, a mounted backup) SQLite
    cannot create the WAL index beside the file; nothing can change such a file, so it is opened
    immutable, unless a WAL file beside it still holds records that only the index can find."""
    folder_writable = os.access(path.resolve().parent, os.W_OK)
    wal = Path(f"{path}-wal")
    if folder_writable or (wal.exists() and wal.stat().st_size > 0):
        return "mode=ro"
    return "mode=ro&immutable=1"


def _prepare(conn: sqlite3.Connection, path: Path, readonly: bool) -> int:
    """Check the file is our journal (creating the schema in a new file) and set durability;
    returns the schema version the file had (a new file: the current one)."""
    version = _identify(conn, path)
    if version is None:
        if readonly:
            raise InputError(f"{path}: not a powershare-gw journal (empty database)")
        _create(conn, path)
        version = SCHEMA_VERSION
    if not readonly:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute(f"PRAGMA cache_size = -{WRITER_CACHE_KIB}")
        except sqlite3.Error as err:
            raise InputError(f"{path}: cannot open journal for writing: {err}") from err
    return version


def _identify(conn: sqlite3.Connection, path: Path) -> int | None:
    """The schema version of the journal in the file, None for an empty database (a new journal's);
    InputError for anything else: not SQLite, another program's schema, a newer release's."""
    try:
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.OperationalError as err:
        if "locked" in str(err):
            raise InputError(f"{path}: the journal is locked by another process (waited "
                             f"{conn.execute('PRAGMA busy_timeout').fetchone()[0] / 1000:g} s); try again") from err
        raise InputError(f"{path}: cannot read the journal: {err}") from err
    except sqlite3.DatabaseError as err:
        raise InputError(f"{path}: not a powershare-gw journal (not an SQLite database: {err})") from err
    if not tables and app_id == 0:
        return None
    if app_id != APPLICATION_ID or not {"records", "head"} <= tables:
        names = ", ".join(sorted(tables)) or "none"
        raise InputError(f"{path}: not a powershare-gw journal (foreign SQLite schema; tables: {names})")
    if version > SCHEMA_VERSION:
        raise InputError(f"{path}: journal schema version {version} is newer than this gateway "
                         f"understands ({SCHEMA_VERSION}); upgrade powershare-gw")
    return int(version)


def _create(conn: sqlite3.Connection, path: Path) -> None:
    """Schema and markers in one transaction, so a crash never leaves half a journal."""
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.executescript(f"""BEGIN IMMEDIATE;
            {_SCHEMA}
            PRAGMA application_id = {APPLICATION_ID};
            PRAGMA user_version = {SCHEMA_VERSION};
            COMMIT;""")
    except sqlite3.Error as err:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise InputError(f"{path}: cannot create journal: {err}") from err


def _write_segment(path: Path, at: float, wall: float, start: dict[str, Any], prev_seq: int, prev_hash: str) -> str:
    """A new segment file holding only its `SegmentStart`, committed and synced, in rollback mode
    (no write-ahead log beside it, so renaming the file moves all of it); returns that record's hash."""
    text, at, wall = codec.canonical(start), float(at), float(wall)
    seq = prev_seq + 1
    digest = record_hash(prev_hash, seq, at, wall, str(RecordKind.SEGMENT_START), text)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = DELETE")
        conn.execute("PRAGMA synchronous = FULL")
        conn.executescript(f"""BEGIN IMMEDIATE;
            {_SCHEMA}
            PRAGMA application_id = {APPLICATION_ID};
            PRAGMA user_version = {SCHEMA_VERSION};""")
        conn.execute(f"INSERT INTO records ({_COLUMNS}) VALUES (?,?,?,?,?,?,?)",
                     (seq, at, wall, str(RecordKind.SEGMENT_START), text, prev_hash, digest))
        conn.execute("UPDATE head SET seq = ?, hash = ? WHERE id = 1", (seq, digest))
        conn.execute("COMMIT")
    finally:
        conn.close()
    return digest


def _swap(live: Path, archive: Path, temp: Path) -> None:
    """The old live file (and its anchors) become the archive; the new segment becomes live."""
    os.rename(live, archive)
    with contextlib.suppress(FileNotFoundError):
        os.rename(files.anchors_path(live), files.anchors_path(archive))
    with contextlib.suppress(OSError):
        os.chmod(archive, 0o444)
    os.rename(temp, live)
    os.rename(files.anchors_path(temp), files.anchors_path(live))
    _sync_folder(live.parent)


def _finish_rotation(live: Path) -> None:
    """A rotation a crash interrupted: before the old file moved, forget the new one; after, finish."""
    temp = files.rotating_path(live)
    if not temp.exists():
        orphan = files.anchors_path(temp)
        if orphan.exists() and live.exists() and not files.anchors_path(live).exists():
            os.rename(orphan, files.anchors_path(live))  # the crash came between `_swap`'s last two renames
            _sync_folder(live.parent)
        return
    if live.exists():
        for leftover in (temp, files.anchors_path(temp), *files.sqlite_side_files(temp)):
            leftover.unlink(missing_ok=True)
        return
    newest = files.archives(live)
    if newest and not files.anchors_path(newest[-1].path).exists() and files.anchors_path(live).exists():
        os.rename(files.anchors_path(live), files.anchors_path(newest[-1].path))
    os.rename(temp, live)
    if files.anchors_path(temp).exists():
        os.rename(files.anchors_path(temp), files.anchors_path(live))
    _sync_folder(live.parent)


def _sync_folder(folder: Path) -> None:
    """Make renames in `folder` durable (a directory entry is data too)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder if str(folder) else ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _segment_tail(path: Path) -> dict[str, Any] | None:
    """An archive's first seq, last seq and hash and newest wall time; None when it cannot be read."""
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            first = conn.execute("SELECT seq FROM records ORDER BY seq LIMIT 1").fetchone()
            last = conn.execute("SELECT seq, hash, wall FROM records ORDER BY seq DESC LIMIT 1").fetchone()
        finally:
            conn.close()
    except sqlite3.Error:
        return None
    if first is None or last is None:
        return None
    return {"first_seq": first[0], "last_seq": last[0], "last_hash": last[1], "newest_wall": last[2]}


def _load_payload(path: Path, seq: int, text: str) -> dict[str, Any]:
    try:
        payload = json.loads(text)
    except (ValueError, TypeError) as err:
        raise InputError(f"{path}: record {seq}: payload is not valid JSON ({err})") from err
    if not isinstance(payload, dict):
        raise InputError(f"{path}: record {seq}: payload is not a JSON object")
    return payload


def pruning_mark(value: Any) -> dict[str, Any] | None:
    """`value` if it can be a pruning mark (an object naming the pruned segment by number), else None:
    an edited mark must be a problem the check reports, never a comparison that raises."""
    if isinstance(value, dict) and is_whole_number(value.get("segment")):
        return value
    return None


def _gap(expected: int, seq: int) -> str:
    if seq > expected:
        return f"records {expected}..{seq - 1}: missing (deleted)"
    return f"record {seq}: out of sequence (expected {expected})"
