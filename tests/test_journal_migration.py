"""The journal's schema moves forward without touching a stored record.

The fixture `fixtures/journal-v2/` is a journal written by the release before schema 3
(`fixtures/make_journal_v2.py` made it, with that release's code): a short bench run, rotated
once, so an archived segment and a live one, each with its anchors, and the anchor key.
Every test works on a copy.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from pathlib import Path

import pytest
from test_gateway import gateway_on

from firmware_py.cli import main
from firmware_py.errors import InputError
from firmware_py.journal import Chain, Journal, RecordKind
from firmware_py.journal.store import SCHEMA_VERSION
from firmware_py.version import software_version

FIXTURE = Path(__file__).parent / "fixtures" / "journal-v2"


@pytest.fixture
def old(tmp_path: Path) -> Path:
    """A copy of the schema-2 journal; its live segment's path."""
    folder = tmp_path / "journal"
    shutil.copytree(FIXTURE, folder)
    (folder / "journal.sqlite.anchor-key").chmod(0o600)  # git keeps no mode but the executable bit
    return folder / "journal.sqlite"


def schema(path: Path) -> int:
    with sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True) as conn:
        return conn.execute("PRAGMA user_version").fetchone()[0]


def rows(live: Path) -> list[tuple]:
    """Every stored record of every segment, exactly as stored."""
    return [(r.seq, r.at, r.wall, str(r.kind), r.payload, r.prev_hash, r.hash) for r in Chain(live).iter_records()]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_fixture_is_what_the_previous_schema_wrote(old):
    assert schema(old) == schema(old.with_name("journal.000001.sqlite")) == 2 == SCHEMA_VERSION - 1
    kinds = {str(r.kind) for r in Chain(old).iter_records()}
    assert {"CoreStart", "DispatchRequest", "DispatchAnswer", "EventEnergy", "DispatchEnded",
            "SegmentStart"} <= kinds
    assert "SchemaUpgraded" not in kinds


def test_reading_an_old_journal_verifies_it_and_changes_nothing(old, capsys):
    before = {p.name: digest(p) for p in old.parent.iterdir()}
    assert main(["report", "--journal", str(old)]) == 0
    out = capsys.readouterr().out
    assert "chain: intact (27 records)" in out and "fixture-peak" in out and "verified with the key file" in out
    assert schema(old) == 2
    assert {p.name: digest(p) for p in old.parent.iterdir() if p.name in before} == before


def test_opening_to_write_upgrades_it_with_one_chained_record_and_no_stored_record_changed(old):
    before = rows(old)
    archive = old.with_name("journal.000001.sqlite")
    archived = digest(archive)
    with Journal.open(old) as journal:
        assert journal.last_seq == before[-1][0] + 1
    assert schema(old) == SCHEMA_VERSION
    assert schema(archive) == 2 and digest(archive) == archived  # an archive keeps the schema it was closed with
    after = rows(old)
    assert after[:-1] == before  # every record as it was: same seq, times, payload, links and hash
    upgrade = after[-1]
    assert upgrade[3] == RecordKind.SCHEMA_UPGRADED and upgrade[5] == before[-1][6]  # chained onto the old head
    assert upgrade[4] == {"from_version": 2, "to_version": SCHEMA_VERSION, "software_version": software_version()}
    report = Chain(old).check()
    assert report.problems == [] and report.records == len(before) + 1 and report.key_checked
    assert report.head_seq == upgrade[0] and report.segments[-1].newest_anchor.seq == upgrade[0]
    Journal.open(old).close()  # opened again: nothing more to upgrade
    assert rows(old) == after


def test_the_next_run_on_an_upgraded_journal_names_its_software_and_the_report_still_verifies(old, capsys):
    clock = [1_000.0]
    assembly = gateway_on(old, clock)
    try:
        assembly.gateway.flush_journal(final=True)
    finally:
        assembly.close()
    starts = [r for r in Chain(old).iter_records([RecordKind.CORE_START])]
    assert len(starts) == 2  # the old run's and this one's
    assert "software_version" not in starts[0].payload  # the old run's, as it was written
    assert starts[1].payload["software_version"] == software_version()
    assert main(["report", "--journal", str(old)]) == 0
    out = capsys.readouterr().out
    assert "chain: intact (29 records)" in out and "fixture-peak" in out
    assert (f"software: not named (before journal schema 3) × 1 from record 2, {software_version()} × 1 from "
            f"record 29; journal schema 2 -> 3 at record 28 by {software_version()}") in out
    assert main(["report", "--journal", str(old), "--format", "json"]) == 0
    journal = json.loads(capsys.readouterr().out)["journal"]
    assert [run["software_version"] for run in journal["runs"]] == [None, software_version()]
    assert [(u["seq"], u["from_version"], u["to_version"]) for u in journal["schema_upgrades"]] == [(28, 2, 3)]


def test_a_journal_of_a_newer_schema_is_refused_saying_what_to_do(old):
    with sqlite3.connect(old) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    for readonly in (True, False):
        with pytest.raises(InputError, match=f"journal schema version {SCHEMA_VERSION + 1} is newer than this "
                                             f"gateway understands \\({SCHEMA_VERSION}\\); upgrade powershare-gw"):
            Journal.open(old, readonly=readonly)
