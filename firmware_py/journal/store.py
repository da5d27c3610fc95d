"""The journal: an append-only, hash-chained record of what the gateway was told and did.

It is the evidence behind bill credits and the trail after a fault, so:

- A committed record survives a crash. SQLite in WAL mode with
  `synchronous=FULL`: every commit fsyncs the WAL, so it survives `kill -9` and
  power loss. (NORMAL would survive `kill -9` only.) FULL measured ~3,500
  commits/s on the dev VM, far above the runtime's rate; the simulator, which
  appends faster than real time, groups records with `with journal.batch():`.
- Tampering is detectable. Each record's hash covers the previous record's
  hash, its seq, times, kind and payload; a one-row `head` table, written in the
  same transaction as every append, anchors the last seq and hash so that
  deleting the newest rows is detected too. What no local check can catch is a
  forger who rewrites every later hash and the head: that needs an outside anchor
  (e.g. the aggregator's copy of the last hash).
- A failed write is never silent: it raises `JournalWriteError`, the record is
  not in the journal, and the runtime must treat that as a fault (stop
  dispatching: energy it cannot account for must not be delivered).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from firmware_py.core.types import is_finite_number
from firmware_py.errors import InputError
from firmware_py.journal import codec
from firmware_py.journal.kinds import RecordKind

APPLICATION_ID = 0x50534757  # "PSGW": marks the file as ours (PRAGMA application_id)
SCHEMA_VERSION = 1
GENESIS_HASH = "0" * 64

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

    def on_wall(self, core_s: float) -> float:
        """A core instant named in this record, on the wall clock as it was when the record was made."""
        return core_s + (self.wall - self.at)


def _row_types_ok(seq: Any, at: Any, wall: Any, kind: Any, text: Any, prev: Any, digest: Any) -> bool:
    """What the schema promises and SQLite's loose typing does not enforce."""
    return (isinstance(seq, int) and all(isinstance(v, (int, float)) for v in (at, wall))
            and all(isinstance(v, str) for v in (kind, text, prev, digest)))


def record_hash(prev_hash: str, seq: int, at: float, wall: float, kind: str, payload_text: str) -> str:
    """sha256 over the canonical JSON of the chained fields (payload as its stored text)."""
    fields = json.dumps([prev_hash, seq, at, wall, kind, payload_text], separators=(",", ":"))
    return hashlib.sha256(fields.encode()).hexdigest()


class Journal:
    """An open journal file. Not for sharing between processes as writers: one gateway, one writer."""

    def __init__(self, path: Path, conn: sqlite3.Connection, wall_clock: Callable[[], float]):
        self.path = path
        self._conn = conn
        self._wall_clock = wall_clock
        self._lock = threading.RLock()
        self._batch_depth = 0
        self._seq, self._hash = self._read_tail()

    # -- opening -----------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path, *, readonly: bool = False, busy_timeout_s: float = 5.0,
             wall_clock: Callable[[], float] = time.time) -> Journal:
        """Open (creating it unless `readonly`) the journal at `path`.

        InputError when the file is missing (readonly), is not SQLite, or holds
        some other schema, because those are the operator's mistakes to fix.
        """
        path = Path(path)
        if readonly and not path.is_file():
            raise InputError(f"{path}: no such journal file")
        try:
            if readonly:
                conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True,
                                       isolation_level=None, check_same_thread=False,
                                       timeout=busy_timeout_s)
            else:
                conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                       timeout=busy_timeout_s)
        except sqlite3.Error as err:
            raise InputError(f"{path}: cannot open journal: {err}") from err
        try:
            _prepare(conn, path, readonly)
        except BaseException:
            conn.close()
            raise
        return cls(path, conn, wall_clock)

    # -- writing -----------------------------------------------------------------------------

    def append(self, kind: RecordKind | str, at: float, payload: dict[str, Any], *, wall: float | None = None) -> int:
        """Add one record and return its seq; committed on return unless inside `batch()`.

        `wall` is `at` on the wall clock (the gateway converts it, see `firmware_py/clocks.py`);
        without it the journal's wall clock is read at the write.
        """
        kind = str(kind)  # the stored text: a member's value, exactly as older journals hold it
        at = float(at)
        if not is_finite_number(at):
            raise ValueError(f"journal record {kind!r}: time must be finite, got {at!r}")
        text = codec.canonical(payload)
        with self._lock:
            wall = float(self._wall_clock() if wall is None else wall)
            seq = self._seq + 1
            digest = record_hash(self._hash, seq, at, wall, kind, text)
            with self._transaction():
                self._write(
                    "INSERT INTO records (seq, at, wall, kind, payload, prev_hash, hash) VALUES (?,?,?,?,?,?,?)",
                    (seq, at, wall, kind, text, self._hash, digest))
                self._write("UPDATE head SET seq = ?, hash = ? WHERE id = 1", (seq, digest))
                self._seq, self._hash = seq, digest
            return seq

    def append_event(self, event: Any, *, wall: float | None = None) -> int:
        """Journal a core event or input (see codec.JOURNALED); kind = its class name."""
        if not isinstance(event, codec.JOURNALED):
            raise TypeError(f"the journal does not record {type(event).__name__} values")
        return self.append(RecordKind.of(event), codec.event_time(event), codec.jsonable(event), wall=wall)

    @contextlib.contextmanager
    def batch(self) -> Iterator[Journal]:
        """Commit every append inside as one transaction: fast, and all-or-nothing.

        Nested batches join the outer one. If the block raises, or the commit
        fails, none of its records are kept (JournalWriteError for the latter).
        """
        with self._lock, self._transaction():
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
        self._write("BEGIN IMMEDIATE")
        self._batch_depth = 1
        try:
            yield
            self._write("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")
            self._seq, self._hash = self._read_tail()
            raise
        finally:
            self._batch_depth = 0

    def _write(self, sql: str, params: tuple = ()) -> None:
        try:
            self._conn.execute(sql, params)
        except sqlite3.Error as err:
            raise JournalWriteError(f"{self.path}: journal write failed: {err}") from err

    # -- reading -----------------------------------------------------------------------------

    def records(self, kind: RecordKind | str | None = None, since_seq: int = 0) -> list[Record]:
        """Records with seq > since_seq, oldest first, optionally of one kind."""
        sql = "SELECT seq, at, wall, kind, payload, prev_hash, hash FROM records WHERE seq > ?"
        params: tuple = (since_seq,)
        if kind is not None:
            sql += " AND kind = ?"
            params += (str(kind),)
        with self._lock:
            rows = self._read(sql + " ORDER BY seq", params)
        return [Record(seq, at, wall, RecordKind.read(k), _load_payload(self.path, seq, text), prev, h)
                for seq, at, wall, k, text, prev, h in rows]

    def recent(self, kinds: Collection[RecordKind | str], since_wall: float, page: int = 512) -> list[Record]:
        """Records of `kinds` made at or after `since_wall` (wall time), oldest first.

        Read newest first through the (kind, seq) index, a page at a time, stopping at
        the first older record: what it costs is the window's size, never the journal's
        (the history chart asks for a day of a journal that may hold years).
        """
        wanted = sorted(str(kind) for kind in kinds)
        marks = ",".join("?" * len(wanted))
        sql = (f"SELECT seq, at, wall, kind, payload, prev_hash, hash FROM records "
               f"WHERE kind IN ({marks}) AND seq < ? ORDER BY seq DESC LIMIT ?")
        found: list[Record] = []
        before = self.last_seq + 1
        while True:
            with self._lock:
                rows = self._read(sql, (*wanted, before, page))
            for seq, at, wall, k, text, prev, h in rows:
                if wall < since_wall:
                    return found[::-1]
                found.append(Record(seq, at, wall, RecordKind.read(k), _load_payload(self.path, seq, text), prev, h))
            if len(rows) < page:
                return found[::-1]
            before = rows[-1][0]

    def __len__(self) -> int:
        with self._lock:
            return int(self._read("SELECT count(*) FROM records")[0][0])

    @property
    def last_seq(self) -> int:
        return self._seq

    def verify(self) -> list[str]:
        """Every way the stored chain differs from what was appended; empty when intact."""
        problems: list[str] = []
        expected_seq, prev_hash = 1, GENESIS_HASH
        with self._lock:
            rows = self._read("SELECT seq, at, wall, kind, payload, prev_hash, hash FROM records ORDER BY seq")
            head = self._read("SELECT seq, hash FROM head WHERE id = 1")
        for seq, at, wall, kind, text, stored_prev, stored_hash in rows:
            if not _row_types_ok(seq, at, wall, kind, text, stored_prev, stored_hash):
                problems.append(f"record {seq}: a column holds the wrong type (edited outside the journal)")
                expected_seq, prev_hash = (seq + 1 if isinstance(seq, int) else expected_seq), stored_hash
                continue
            if seq != expected_seq:
                problems.append(_gap(expected_seq, seq))
            if stored_prev != prev_hash:
                problems.append(f"record {seq}: does not chain to the record before it "
                                "(a record was inserted, deleted or edited)")
            if record_hash(stored_prev, seq, at, wall, kind, text) != stored_hash:
                problems.append(f"record {seq}: contents do not match its hash (edited)")
            try:
                json.loads(text)
            except ValueError:
                problems.append(f"record {seq}: payload is not valid JSON")
            expected_seq, prev_hash = seq + 1, stored_hash
        last_seq = expected_seq - 1
        if not head:
            problems.append("head: the chain anchor row is missing")
        else:
            head_seq, head_hash = head[0]
            if head_seq > last_seq:
                problems.append(f"records {last_seq + 1}..{head_seq}: missing at the end (deleted)")
            elif head_seq < last_seq:
                problems.append(f"records {head_seq + 1}..{last_seq}: added after the chain head (inserted)")
            elif head_hash != prev_hash:
                problems.append(f"record {last_seq}: does not match the chain head (edited or replaced)")
        return problems

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

    # -- closing -----------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _prepare(conn: sqlite3.Connection, path: Path, readonly: bool) -> None:
    """Check the file is our journal (creating the schema in a new file) and set durability."""
    try:
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as err:
        raise InputError(f"{path}: not a powershare-gw journal (not an SQLite database: {err})") from err
    if not tables and app_id == 0:
        if readonly:
            raise InputError(f"{path}: not a powershare-gw journal (empty database)")
        _create(conn, path)
    elif app_id != APPLICATION_ID or not {"records", "head"} <= tables:
        names = ", ".join(sorted(tables)) or "none"
        raise InputError(f"{path}: not a powershare-gw journal (foreign SQLite schema; tables: {names})")
    elif version > SCHEMA_VERSION:
        raise InputError(f"{path}: journal schema version {version} is newer than this gateway "
                         f"understands ({SCHEMA_VERSION}); upgrade powershare-gw")
    if not readonly:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
        except sqlite3.Error as err:
            raise InputError(f"{path}: cannot open journal for writing: {err}") from err


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


def _load_payload(path: Path, seq: int, text: str) -> dict[str, Any]:
    try:
        payload = json.loads(text)
    except ValueError as err:
        raise InputError(f"{path}: record {seq}: payload is not valid JSON ({err})") from err
    if not isinstance(payload, dict):
        raise InputError(f"{path}: record {seq}: payload is not a JSON object")
    return payload


def _gap(expected: int, seq: int) -> str:
    if seq > expected:
        return f"records {expected}..{seq - 1}: missing (deleted)"
    return f"record {seq}: out of sequence (expected {expected})"
