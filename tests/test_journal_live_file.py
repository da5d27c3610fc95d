"""The live journal file removed or replaced under a running writer (`rm journal.sqlite*` with the gateway up).

Real SQLite files; the journal must neither write on into a file nobody can open again nor over another file.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pytest
from test_gateway import discharging, request

from firmware_py.cli import main
from firmware_py.core.machine import JOURNAL_HOLD
from firmware_py.core.types import ReasonCode
from firmware_py.journal import Journal, JournalWriteError, RecordKind
from firmware_py.journal.chain import Chain
from firmware_py.journal.files import anchors_path, key_path, sqlite_side_files


def remove_live(path: Path, side_files: bool = True) -> None:
    for doomed in (path, *(sqlite_side_files(path) if side_files else ())):
        doomed.unlink(missing_ok=True)


@pytest.mark.parametrize("side_files", [True, False], ids=["with-wal-and-shm", "main-file-only"])
def test_a_removed_live_file_is_restored_from_the_open_copy_and_the_chain_and_anchors_hold(tmp_path, caplog,
                                                                                           side_files):
    """Only the main file removed leaves the old database's -wal beside it: never replayed into the copy."""
    path = tmp_path / "journal.sqlite"
    journal = Journal.open(path)
    try:
        with journal.batch():
            for n in range(5):
                journal.append("Note", float(n), {"n": n})
        remove_live(path, side_files)
        assert not path.exists()
        with caplog.at_level(logging.WARNING, logger="firmware_py.journal.store"), journal.batch():
            for n in range(5, 8):
                journal.append("Note", float(n), {"n": n})
        journal.append("Note", 8.0, {"n": 8})
    finally:
        journal.close()
    restored = [r.getMessage() for r in caplog.records if "was removed while the gateway ran" in r.getMessage()]
    assert len(restored) == 1 and "restored from the open copy, 5 records" in restored[0]
    assert path.exists() and not path.with_name(path.name + ".restoring").exists()
    with Journal.open(path, readonly=True) as again:
        assert again.verify() == []
        assert [r.payload["n"] for r in again.records("Note")] == list(range(9))
    assert Chain(path).check().problems == []
    assert main(["report", "--journal", str(path)]) == 0


def test_a_replaced_live_file_is_never_written_over_and_no_anchor_is_signed_for_it(tmp_path):
    path = tmp_path / "journal.sqlite"
    journal = Journal.open(path)
    try:
        journal.append("Note", 0.0, {"n": 0})
        remove_live(path)
        path.write_bytes(b"someone else's file")
        anchors_before = anchors_path(path).read_bytes()
        with pytest.raises(JournalWriteError, match="replaced by another file while the gateway ran"):
            journal.append("Note", 1.0, {"n": 1})
        with pytest.raises(JournalWriteError, match="replaced by another file"), journal.batch():
            journal.append("Note", 2.0, {"n": 2})
        assert journal.last_seq == 1  # nothing taken
    finally:
        journal.close()
    assert path.read_bytes() == b"someone else's file"  # untouched
    assert anchors_path(path).read_bytes() == anchors_before  # not even the closing anchor


def test_a_running_discharge_goes_on_into_the_restored_file_when_the_journal_is_removed(tmp_path):
    path = tmp_path / "journal.sqlite"
    with discharging(path) as (gateway, at):
        remove_live(path)
        for t in range(3, 80):
            at(float(t))
        assert gateway.flush_journal() > 0
        assert not gateway.controller.journal_failing()
        assert gateway.command.setpoint_w > 0
        gateway.flush_journal(final=True)
    assert Chain(path).check().problems == []
    with Journal.open(path, readonly=True) as journal:
        assert [r.payload["id"] for r in journal.records(RecordKind.DISPATCH_REQUEST)] == ["r1"]
        assert {r.payload["request_id"] for r in journal.records(RecordKind.EVENT_ENERGY)} == {"r1"}


def test_a_replaced_journal_holds_a_running_discharge_at_zero_and_refuses_dispatch(tmp_path):
    path = tmp_path / "journal.sqlite"
    other = tmp_path / "other.sqlite"
    with discharging(path) as (gateway, at):
        with Journal.open(other) as another:  # another journal, put where the gateway's was
            another.append("Note", 0.0, {"mine": True})
        remove_live(path)
        other.rename(path)
        before = path.read_bytes()
        at(3.0)
        gateway.sample()  # something to write
        assert gateway.flush_journal() == 0
        assert gateway.controller.journal_failing()
        assert "replaced by another file while the gateway ran" in gateway.controller.journal.detail
        held = (0.0, f"{JOURNAL_HOLD}: {gateway.controller.journal.detail}")
        assert (gateway.command.setpoint_w, gateway.command.reason) == held
        assert at(4.0, replace(request(2, 4.0), target_w=5_000)).answer_for("r2").reason is ReasonCode.JOURNAL
        assert at(5.0).command.setpoint_w == 0
        assert gateway.flush_journal() == 0
        assert path.read_bytes() == before  # never written over
    assert path.read_bytes() == before


def test_rm_journal_star_under_the_writer_puts_back_its_anchor_key_so_the_next_start_signs_with_the_same(
        tmp_path, caplog):
    """`rm journal.sqlite*` takes the anchor key too: written back from memory before the next anchor, the next
    start keeps that key instead of making one whose anchors read as another key's."""
    path = tmp_path / "journal.sqlite"
    journal = Journal.open(path)
    try:
        journal.append("Note", 0.0, {"n": 0})
        key_before = key_path(path).read_bytes()
        for doomed in tmp_path.glob("journal.sqlite*"):
            doomed.unlink()
        with caplog.at_level(logging.WARNING, logger="firmware_py.journal.store"):
            journal.append("Note", 1.0, {"n": 1})
    finally:
        journal.close()
    assert key_path(path).read_bytes() == key_before
    assert oct(key_path(path).stat().st_mode & 0o777) == "0o600"
    assert sum("anchor key" in r.getMessage() and "written again" in r.getMessage() for r in caplog.records) == 1
    with Journal.open(path) as again:  # a writer's start: it would make a new key were the file still missing
        again.append("Note", 2.0, {"n": 2})
    assert key_path(path).read_bytes() == key_before
    assert Chain(path).check().problems == []
    assert main(["report", "--journal", str(path)]) == 0
