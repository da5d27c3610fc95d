"""Edits to a journal file past its own guards: what someone with the file and the sqlite3 shell
could do (or a bad sector), for the tests that check the chain, `report` and `statement verify`
catch them."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from firmware_py.journal.store import GENESIS_HASH

GUARDS = ("records_no_update", "records_no_delete")  # the journal's triggers refusing edits and deletions


@contextmanager
def unguarded(path: Path) -> Iterator[sqlite3.Connection]:
    """A connection to `path` with the guards dropped; what is done in it is committed on leaving."""
    conn = sqlite3.connect(path)
    try:
        for guard in GUARDS:
            conn.execute(f"DROP TRIGGER {guard}")
        yield conn
        conn.commit()
    finally:
        conn.close()


def tamper(path: Path, *statements: tuple[str, tuple]) -> None:
    """Drop the guards, run each (sql, params), commit."""
    with unguarded(path) as conn:
        for sql, params in statements:
            conn.execute(sql, params)


def cut_tail(path: Path, keep: int) -> None:
    """What an attacker would do to hide the newest records: delete them and move the head back to match."""
    tamper(path, ("DELETE FROM records WHERE seq > ?", (keep,)),
           ("UPDATE head SET seq = ?, hash = COALESCE((SELECT hash FROM records WHERE seq = ?), ?)",
            (keep, keep, GENESIS_HASH)))
