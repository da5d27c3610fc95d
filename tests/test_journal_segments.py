"""Segments: rotation, retention and the chain across them, on real files.

A rotation archives the live file and starts the next segment with a `SegmentStart`
that names the previous head (so the chain runs on) and carries the accounts of the
events still open (so a start-up reads the live segment only). Pruning deletes old
archives after recording it in the chain; any other missing segment is a problem.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import stat
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from journal_edits import cut_tail, tamper

from firmware_py import cli
from firmware_py.assembly import assemble
from firmware_py.config import Config
from firmware_py.core import types as t
from firmware_py.journal import (
    Chain,
    Journal,
    JournalWriteError,
    RecordKind,
    event_summaries,
    files,
    store,
)
from firmware_py.journal.codec import jsonable
from firmware_py.journal.steps import decode_start

DAY_S = 86_400.0


def open_event_carry(request_id: str = "long") -> list[tuple[str, dict]]:
    request = t.DispatchRequest(request_id, "openadr", t.DispatchKind.DISCHARGE, 4_000, 0, 90_000, 0)
    answer = t.DispatchAnswer.accepted(request_id, 0)
    energy = t.EventEnergy(60, request_id, 66.0, 66.5, meter_total_wh=1_066.0)
    return [(str(RecordKind.of(item)), jsonable(item)) for item in (request, answer, energy)]


def filled(journal: Journal, first_at: float, count: int = 5) -> None:
    for n in range(count):
        journal.append_event(t.FaultRaised(first_at + n, t.FaultKind.BMS_STALE, f"note {n}"))


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "journal.sqlite"


def report(path: Path, capsys, *extra: str) -> tuple[int, str]:
    code = cli.main(["report", "--journal", str(path), *extra])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_a_rotation_continues_the_chain_in_a_new_file_and_carries_open_events(path, capsys):
    with Journal.open(path) as journal:
        journal.append_event(t.DispatchRequest("long", "openadr", t.DispatchKind.DISCHARGE, 4_000, 0, 90_000, 0))
        journal.append_event(t.DispatchAnswer.accepted("long", 0))
        filled(journal, 10)
        head = (journal.last_seq, journal.head_hash)
        archive = journal.rotate(100, open_event_carry())
        assert archive == files.archive_path(path, 1) and archive.name == "journal.000001.sqlite"
        assert journal.segment == 2 and journal.last_seq == head[0] + 1
        (start,) = journal.records()
        assert start.kind == RecordKind.SEGMENT_START and start.prev_hash == head[1]
        assert start.payload["previous"] == {"segment": 1, "file": archive.name, "first_seq": 1,
                                             "last_seq": head[0], "last_hash": head[1]}
        assert [kind for kind, _ in journal.carried()] == ["DispatchRequest", "DispatchAnswer", "EventEnergy"]
        filled(journal, 200)
    assert stat.S_IMODE(archive.stat().st_mode) == 0o444  # archived read-only
    verdict = Chain(path).check()
    assert verdict.problems == [] and verdict.records == 7 + 1 + 5
    assert [s.file for s in verdict.segments] == ["journal.000001.sqlite", "journal.sqlite"]
    assert all(s.newest_anchor is not None for s in verdict.segments)
    code, out = report(path, capsys)
    assert code == 0 and "segments: 2 (journal.000001.sqlite, journal.sqlite)" in out
    assert out.rstrip().endswith("chain: intact (13 records)")
    (event,) = event_summaries(Chain(path))
    assert event.request_id == "long" and event.verdict == "accepted"  # read once, from its own records


def test_a_restart_after_a_rotation_finds_the_open_event_in_the_live_segment_alone(path):
    with Journal.open(path) as journal:
        filled(journal, 1)
        journal.rotate(100, open_event_carry("long"))
    files.archive_path(path, 1).rename(path.with_name("elsewhere.sqlite"))  # not read at all
    clock = [500.0]
    base = Config()
    config = replace(base, can=replace(base.can, interface="virtual", channel=f"segments-{path}"),
                     journal=replace(base.journal, path=str(path)))
    assembly = assemble(config, lambda: clock[0], owner=t.OwnerSettings(40, 0.0))
    try:
        assert assembly.gateway.close_open_events(meter_total_wh=1_086.0) == ["long"]
    finally:
        assembly.close()
    with Journal.open(path, readonly=True) as journal:
        final = journal.records(RecordKind.EVENT_ENERGY)[-1]
    assert final.payload["final"] is True and final.payload["meter_wh"] == 86.0  # 66 + the 20 Wh gap


def test_the_gateway_rotates_past_segment_mb_and_its_report_spans_the_segments(path, capsys):
    clock = [0.0]
    base = Config()
    config = replace(base, can=replace(base.can, interface="virtual", channel=f"rotate-{path}"),
                     journal=replace(base.journal, path=str(path), segment_mb=1))
    assembly = assemble(config, lambda: clock[0], owner=t.OwnerSettings(40, 0.0))
    gateway = assembly.gateway
    pad = "x" * 8_000
    try:
        asyncio.run(gateway.submit(t.DispatchRequest("r", "test", t.DispatchKind.DISCHARGE, 3_000, 0, 60, 0)))
        for n in range(300):  # ~2.4 MB of notes, flushed as the service would: two rotations
            clock[0] = float(n)
            gateway.note(RecordKind.SUNSPEC_WRITE_REFUSED, {"n": n, "pad": pad})
            gateway.flush_journal()
        gateway.flush_journal(final=True)
    finally:
        assembly.close()
    archives = files.archives(path)
    assert [a.number for a in archives] == [1, 2]
    assert all(a.path.stat().st_size < 2e6 for a in archives)
    with Journal.open(path, readonly=True) as live:  # the run as it stands, for when its CoreStart is pruned
        (start,) = live.records(RecordKind.SEGMENT_START)
    policy, owner, at = decode_start(start.payload["run"]["start"])
    assert (policy, owner.reserve_pct, at) == (gateway.policy, 40, start.at)
    assert start.payload["run"]["serving"] == gateway.controller.serving_id
    verdict = Chain(path).check()
    assert verdict.problems == [] and len(verdict.segments) == 3
    code, out = report(path, capsys, "--format", "json")
    assert code == 0 and '"request_id": "r"' in out


def test_a_rotation_a_crash_interrupted_is_finished_or_forgotten_at_the_next_open(path):
    with Journal.open(path) as journal:
        filled(journal, 1)
        journal.rotate(100, [])
        filled(journal, 200)
    # A crash after the old file moved but before the new one (and its anchor file) took its name:
    live, temp = path, files.rotating_path(path)
    live.rename(temp)
    files.anchors_path(live).rename(files.anchors_path(temp))
    with Journal.open(path) as journal:
        assert journal.segment == 2 and not temp.exists() and not files.anchors_path(temp).exists()
    assert Chain(path).check().problems == []
    # A crash after the new segment took its name, before its anchor file did.
    files.anchors_path(live).rename(files.anchors_path(temp))
    with Journal.open(path) as journal:
        assert not files.anchors_path(temp).exists() and files.anchors_path(live).exists()
    assert Chain(path).check().problems == []
    # A crash before the old file moved: the half-made next segment is dropped.
    temp.write_bytes(b"half a segment")
    with Journal.open(path) as journal:
        assert journal.segment == 2 and not temp.exists()
        filled(journal, 300)
    assert Chain(path).check().problems == []


def test_a_rotation_that_cannot_be_done_now_leaves_the_live_segment_as_it_was(path):
    with Journal.open(path, busy_timeout_s=0.05) as journal:
        filled(journal, 1)
        reader = sqlite3.connect(path, isolation_level=None)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM records").fetchone()  # a report reading right now
        with pytest.raises(JournalWriteError, match="rotation postponed"):
            journal.rotate(100, [])
        reader.execute("ROLLBACK")
        reader.close()
        assert journal.segment == 1 and not files.rotating_path(path).exists()
        filled(journal, 10)
        journal.rotate(200, [])
        assert journal.segment == 2
    assert Chain(path).check().problems == []


def test_a_rotation_whose_reopen_fails_is_reopened_whole_by_the_next_write(path, monkeypatch):
    """A reader (a report, the web history) holding the new live file past the busy timeout refuses
    `journal_mode = WAL` after the files were swapped: the journal must not go on half-reopened
    (the old segment's number, head and anchor log on the new file: appends that collide, anchors
    that do not link, every later rotation refused), but reload all of it at the next write."""
    readers: list[sqlite3.Connection] = []

    def swap_then_read(live: Path, archive: Path, temp: Path) -> None:
        swap(live, archive, temp)
        reader = sqlite3.connect(f"file:{live}?mode=ro", uri=True, isolation_level=None)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM records").fetchone()
        readers.append(reader)

    swap = store._swap
    with Journal.open(path, busy_timeout_s=0.05) as journal:
        filled(journal, 1)
        monkeypatch.setattr(store, "_swap", swap_then_read)
        with pytest.raises(JournalWriteError, match="cannot reopen"):
            journal.rotate(50, [])
        monkeypatch.setattr(store, "_swap", swap)
        with pytest.raises(JournalWriteError, match="cannot reopen"):  # still held: the write fails whole, the backlog keeps it
            journal.append_event(t.FaultRaised(60, t.FaultKind.BMS_STALE, "held"))
        readers.pop().close()  # the reader is done
        seq = journal.append_event(t.DispatchAnswer.accepted("r1", 70))  # a billing record: anchored at once
        assert (journal.segment, seq) == (2, 7)  # five records, the SegmentStart, this one
        assert journal._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        filled(journal, 80)
        journal.rotate(100, [])
        assert journal.segment == 3
    verdict = Chain(path).check()
    assert verdict.problems == [] and len(verdict.segments) == 3


def test_pruning_deletes_old_archives_and_records_it_in_the_chain(path, capsys):
    wall = [0.0]
    with Journal.open(path, wall_clock=lambda: wall[0]) as journal:
        for day in range(4):  # four segments, a day apart
            wall[0] = day * DAY_S
            filled(journal, wall[0])
            journal.rotate(wall[0], [])
        wall[0] = 4 * DAY_S + 1
        pruned = journal.prune(wall[0], 1.5 * DAY_S)  # age counts up to the live segment's start (day 3)
        assert [p.name for p in pruned] == ["journal.000001.sqlite", "journal.000002.sqlite"]
        mark = journal.records(RecordKind.SEGMENT_PRUNED)[-1]
        assert mark.payload["segment"] == 2
        journal.rotate(wall[0], [])  # the pruning mark is carried on by the next segment
    assert [a.number for a in files.archives(path)] == [3, 4, 5]
    verdict = Chain(path).check()
    assert verdict.problems == [] and verdict.pruned_through == 2
    code, out = report(path, capsys)
    assert code == 0 and "segments 1..2 pruned by retention" in out


def test_a_wall_clock_read_far_ahead_prunes_nothing_the_journal_does_not_vouch_is_old(path):
    """A bad RTC at boot (before NTP) reads two years ahead, and what is journaled meanwhile carries it:
    the hourly prune must not delete archives written minutes ago (this month's statement data), an
    irreversible loss the chain would then record as retention. Age counts up to the live segment's
    start, so only real time passing, with a rotation on it, ages them."""
    base, retain_s = 1_700_000_000.0, 400 * DAY_S
    wall = [base]
    with Journal.open(path, wall_clock=lambda: wall[0]) as journal:
        for n in range(3):
            wall[0] = base + n * 60
            filled(journal, n * 60.0)
            journal.rotate(n * 60.0 + 30, [])
        wall[0] = base + 2 * 365 * DAY_S  # the clock steps ahead, and a record is made on it
        filled(journal, 200.0, count=1)
        assert journal.prune(200.0, retain_s) == []
        assert journal.records(RecordKind.SEGMENT_PRUNED) == []
        wall[0] = base + retain_s + DAY_S  # real time passes: a rotation then, and the three are old
        journal.rotate(300.0, [])
        pruned = journal.prune(300.0, retain_s)
    assert [p.name for p in pruned] == [f"journal.00000{n}.sqlite" for n in (1, 2, 3)]
    assert [a.number for a in files.archives(path)] == [4]
    assert Chain(path).check().problems == []


def test_a_window_reaching_back_past_a_rotation_reads_on_into_the_archives(path):
    """A day's price energy, the history chart: a rotation earlier that day must not hide the morning."""
    wall = [0.0]
    with Journal.open(path, wall_clock=lambda: wall[0]) as journal:
        for day in range(3):  # three segments, half a day apart
            wall[0] = day * DAY_S / 2
            filled(journal, wall[0], count=2)
            journal.rotate(wall[0] + 10, [])
        wall[0] = 1.5 * DAY_S
        filled(journal, wall[0], count=2)
        kinds = {RecordKind.FAULT_RAISED}
        notes = [r.wall for r in journal.recent(kinds, DAY_S / 2 - 1)]
        assert notes == sorted(notes) and len(notes) == 6  # the live segment's two, and the two archives' before
        assert [r.wall for r in journal.recent(kinds, 1.5 * DAY_S)] == [1.5 * DAY_S] * 2  # the live segment alone
        assert len(journal.recent(kinds, -1.0)) == 8  # back to the first segment


def test_an_archive_deleted_by_hand_is_missing_from_the_chain(path, capsys):
    with Journal.open(path) as journal:
        for n in range(3):
            filled(journal, n * 100)
            journal.rotate(n * 100 + 50, [])
    files.archive_path(path, 2).unlink()
    code, out = report(path, capsys)
    assert code == 1 and "segments 2..2: missing (deleted)" in out
    files.archive_path(path, 1).rename(files.archive_path(path, 7))
    code, out = report(path, capsys)
    assert code == 1 and "segments 1..2: missing, and the chain does not record pruning them" in out
    assert "journal.000007.sqlite: an archive numbered after the live segment (4)" in out


def test_an_archive_cut_back_or_swapped_does_not_continue_into_the_next(path, capsys):
    with Journal.open(path) as journal:
        filled(journal, 1)
        journal.rotate(50, [])
        filled(journal, 100)
    archive = files.archive_path(path, 1)
    archive.chmod(0o644)
    cut_tail(archive, keep=3)
    code, out = report(path, capsys)
    assert code == 1 and "journal.sqlite: does not continue journal.000001.sqlite" in out


def test_an_archive_swapped_for_another_of_the_same_length_does_not_continue_into_the_next(path, tmp_path, capsys):
    """Same records counted, other contents: only the hashes tell, and the next segment names the old one's."""
    other = tmp_path / "other" / "journal.sqlite"
    other.parent.mkdir()
    for journal_path, first_at in ((path, 1), (other, 2)):
        with Journal.open(journal_path) as journal:
            filled(journal, first_at)
            journal.rotate(50, [])
            filled(journal, 100)
    for suffix in ("", files.ANCHORS_SUFFIX):  # the archive with its own anchors: a whole, intact segment
        swapped, original = (Path(f"{files.archive_path(j, 1)}{suffix}") for j in (other, path))
        original.chmod(0o644)
        original.write_bytes(swapped.read_bytes())
    code, out = report(path, capsys)
    assert code == 1 and "journal.sqlite: does not continue journal.000001.sqlite" in out


def test_a_segment_renamed_to_another_number_is_said_to_hold_its_own(path, capsys):
    with Journal.open(path) as journal:
        for n in range(2):
            filled(journal, n * 100)
            journal.rotate(n * 100 + 50, [])
        filled(journal, 300)
    first, second = files.archive_path(path, 1), files.archive_path(path, 2)
    first.rename(first.with_name("swap")), second.rename(first), first.with_name("swap").rename(second)
    code, out = report(path, capsys)
    assert code == 1 and "journal.000001.sqlite: holds segment 2, not 1 (renamed?)" in out


def test_a_live_journal_missing_beside_its_archives_is_refused(path):
    with Journal.open(path) as journal:
        filled(journal, 1)
        journal.rotate(50, [])
    path.unlink()
    with pytest.raises(Exception, match="missing, but archived segments of it are beside it"):
        Journal.open(path)


def _two_segments(path: Path) -> None:
    with Journal.open(path) as journal:
        filled(journal, 1)
        journal.rotate(50, [])
        filled(journal, 100)


def _with_start_edited(path: Path, change: Callable[[dict], object]) -> None:
    """A two-segment journal whose live `SegmentStart` payload was rewritten by `change` (by hand)."""
    _two_segments(path)
    with Journal.open(path, readonly=True) as journal:
        (start,) = journal.records(RecordKind.SEGMENT_START)
    payload = start.payload
    change(payload)
    tamper(path, ("UPDATE records SET payload = ? WHERE seq = ?", (json.dumps(payload), start.seq)))


@pytest.mark.parametrize("change, problem", [
    (lambda p: p["previous"].update(last_seq=float("inf")), "a segment start that does not say where the chain"),
    (lambda p: p["previous"].update(last_seq=True), "a segment start that does not say where the chain"),
    (lambda p: p.update(previous="segment 1"), "a segment start that does not say where the chain"),
    (lambda p: p.update(pruned_through="x"), "a segment start whose pruned_through does not name"),
    (lambda p: p.update(pruned_through={"segment": "1"}), "a segment start whose pruned_through does not name"),
])
@pytest.mark.parametrize("command", ["report", "statement"])
def test_an_edited_value_in_a_segment_start_is_a_problem_of_the_chain_not_a_traceback(path, capsys, change,
                                                                                        problem, command):
    _with_start_edited(path, change)
    code = cli.main([command, "--journal", str(path)])
    captured = capsys.readouterr()
    assert code == 1 and problem in captured.out + captured.err


@pytest.mark.parametrize("segment", ["1", True, None, 1.5])
def test_a_pruning_record_edited_to_name_no_segment_by_number_is_a_problem_of_the_chain(path, capsys, segment):
    """A string beside a number once made the newest-pruning comparison raise inside the check."""
    _two_segments(path)
    with Journal.open(path, readonly=True) as journal:
        first, second = (r.seq for r in journal.records(RecordKind.FAULT_RAISED)[:2])
    sql = "UPDATE records SET kind = 'SegmentPruned', payload = ? WHERE seq = ?"
    tamper(path, (sql, (json.dumps({"segment": segment}), first)), (sql, (json.dumps({"segment": 1}), second)))
    code, out = report(path, capsys)
    assert code == 1 and f"record {first}: a SegmentPruned record that does not name the pruned segment" in out
