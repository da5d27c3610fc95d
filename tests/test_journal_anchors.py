"""Anchors: signed checkpoints of the journal's head, in a file beside it, on real files.

The hole they close: whoever can write the SQLite file can delete the newest rows and
set the head row back; the rest is a good, shorter chain. The anchor file still names
the head the journal had, so `report` sees the cut.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from journal_edits import cut_tail

from firmware_py import cli
from firmware_py.core import types as t
from firmware_py.errors import InputError
from firmware_py.journal import Chain, Journal, RecordKind, files
from firmware_py.journal.anchors import ANCHOR_PERIOD_S, AnchorWhy


def billed_event(journal: Journal, energies: int = 20) -> None:
    """A discharge event as the core journals it: request, answer, energy every minute, end, final energy."""
    journal.append_event(t.DispatchRequest("peak", "openadr", t.DispatchKind.DISCHARGE, 4_000, 0, 7_200, 0))
    journal.append_event(t.DispatchAnswer.accepted("peak", 0))
    for minute in range(1, energies + 1):
        journal.append_event(t.EventEnergy(60.0 * minute, "peak", 66.0 * minute, 66.5 * minute))
    journal.append_event(t.DispatchEnded(60.0 * energies + 1, "peak", "window closed"))
    journal.append_event(t.EventEnergy(60.0 * energies + 1, "peak", 66.0 * energies + 40, 66.5 * energies + 40,
                                       final=True))


def report(path: Path, capsys, *extra: str) -> tuple[int, str]:
    code = cli.main(["report", "--journal", str(path), *extra])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def anchor_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in files.anchors_path(path).read_text().splitlines()]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "journal.sqlite"


def test_a_cut_back_tail_with_the_head_rewritten_is_detected(path, capsys):
    with Journal.open(path) as journal:
        billed_event(journal)  # 24 records; the final energy bills 1,360 Wh
    assert report(path, capsys)[0] == 0
    cut_tail(path, keep=24 - 17)  # the finding: the last 17 records of the event gone, the head moved back

    with Journal.open(path, readonly=True) as journal:
        assert journal.verify() == []  # the chain and its head alone cannot tell
    code, out = report(path, capsys)
    assert code == cli.EXIT_CHECK_FAILED
    assert "records 8..24: missing at the end (anchored in journal.sqlite.anchors: the journal was cut back)" in out
    code, out = report(path, capsys, "--format", "json")
    document = json.loads(out[:out.rindex("}") + 1])
    assert code == 1 and document["chain"]["intact"] is False
    assert document["events"][0]["meter_wh"] == 66.0 * 5  # what the damaged journal now claims, shown anyway


def test_the_cut_stays_visible_after_the_gateway_appends_past_it(path, capsys):
    with Journal.open(path) as journal:
        billed_event(journal)
    cut_tail(path, keep=7)
    with Journal.open(path) as journal:  # the gateway starts again on the cut journal and writes on
        for n in range(30):
            journal.append_event(t.FaultRaised(2_000.0 + n, t.FaultKind.BMS_STALE, "after the cut"))
    code, out = report(path, capsys)
    assert code == 1
    assert "does not match its anchor in journal.sqlite.anchors (removed or rewritten after it was anchored)" in out


def test_a_cut_with_the_anchor_file_deleted_too_stays_visible_after_a_restart(path, capsys, caplog):
    """Deleting the anchor file as well: the gateway, opening the journal again, does not start
    a clean new file as if nothing happened; its first line says the anchors were missing."""
    with Journal.open(path) as journal:
        billed_event(journal)
    cut_tail(path, keep=7)
    files.anchors_path(path).unlink()
    with Journal.open(path) as journal:
        journal.append_event(t.DispatchAnswer.accepted("later", 9_999))
    assert "anchor file is missing or empty" in caplog.text
    code, out = report(path, capsys)
    assert code == 1 and "found this segment's anchor file missing when it opened the journal" in out


def test_a_new_journal_is_anchored_before_its_first_record(path, capsys):
    Journal.open(path).close()
    assert [(a["seq"], a["why"]) for a in anchor_lines(path)] == [(0, AnchorWhy.OPEN)]
    assert report(path, capsys)[0] == 0


def test_the_writer_says_so_when_it_opens_a_cut_journal(path, caplog):
    with Journal.open(path) as journal:
        billed_event(journal)
    cut_tail(path, keep=7)
    Journal.open(path).close()
    assert "does not match its newest anchor" in caplog.text


def test_billing_records_anchor_at_once_and_the_rest_at_most_every_period(path):
    wall = [1_000.0]
    with Journal.open(path, wall_clock=lambda: wall[0]) as journal:
        assert [(a["why"], a["seq"]) for a in anchor_lines(path)] == [(AnchorWhy.OPEN, 0)]  # before any record
        for n in range(50):  # ordinary records within the period: no anchor yet
            wall[0] += 1
            journal.append("Note", n, {"n": n})
        assert [a["why"] for a in anchor_lines(path)] == [AnchorWhy.OPEN]
        journal.append_event(t.DispatchAnswer.accepted("e", 50))
        assert anchor_lines(path)[-1]["why"] == AnchorWhy.BILLING and anchor_lines(path)[-1]["seq"] == 51
        wall[0] += ANCHOR_PERIOD_S
        journal.append("Note", 60, {"n": 60})
        assert anchor_lines(path)[-1]["why"] == AnchorWhy.PERIODIC and anchor_lines(path)[-1]["seq"] == 52
        journal.append("Note", 61, {"n": 61})
    assert [a["why"] for a in anchor_lines(path)][-1] == AnchorWhy.CLOSE
    assert anchor_lines(path)[-1]["seq"] == 53


def test_an_edited_anchor_line_is_detected(path, capsys):
    with Journal.open(path) as journal:
        billed_event(journal)
    anchors = files.anchors_path(path)
    lines = anchors.read_text().splitlines()
    forged = json.loads(lines[-1])
    forged["seq"] -= 17  # point the newest anchor at the cut-back head: the signature no longer fits
    lines[-1] = json.dumps(forged, sort_keys=True, separators=(",", ":"))
    anchors.write_text("\n".join(lines) + "\n")
    code, out = report(path, capsys)
    assert code == 1 and "the newest anchor's signature does not verify" in out


def test_removing_anchor_lines_from_the_middle_is_detected(path, capsys):
    with Journal.open(path) as journal:
        billed_event(journal)
    anchors = files.anchors_path(path)
    lines = anchors.read_text().splitlines()
    assert len(lines) >= 3
    anchors.write_text("\n".join([lines[0], *lines[2:]]) + "\n")
    code, out = report(path, capsys)
    assert code == 1 and "line 2 does not follow the line before it" in out


def test_a_deleted_anchor_file_is_detected(path, capsys):
    with Journal.open(path) as journal:
        billed_event(journal)
    files.anchors_path(path).unlink()
    code, out = report(path, capsys)
    assert code == 1 and "journal.sqlite.anchors: missing or empty, though segment 1 holds records" in out


def test_a_deleted_anchor_file_is_detected_though_the_files_version_was_set_back(path, capsys):
    """The version number that says a file is anchored is not signed: setting it back to a release before
    anchors must not excuse the missing anchor file while the anchor key lies beside the journal."""
    with Journal.open(path) as journal:
        billed_event(journal)
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 1")
    files.anchors_path(path).unlink()
    code, out = report(path, capsys)
    assert code == 1 and "journal.sqlite.anchors: missing or empty, though segment 1 holds records" in out


def test_a_journal_whose_records_prove_an_anchoring_release_is_expected_anchored_without_key_or_version(
        path, capsys):
    """Version set back, anchor file and key deleted: the file still holds a run that named its software,
    which only a release that anchors does, so the missing anchor file is a problem all the same."""
    with Journal.open(path) as journal:
        journal.append(RecordKind.CORE_START, 0.0, {"software_version": "0.1.0"})
        billed_event(journal)
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 1")
    files.anchors_path(path).unlink()
    files.key_path(path).unlink()
    code, out = report(path, capsys)
    assert code == 1 and "journal.sqlite.anchors: missing or empty, though segment 1 holds records" in out


@pytest.mark.parametrize("change", [{"seq": -2**70}, {"seq": 2**64}, {"wall": 1e300}, {"wall": -1e300}])
def test_an_anchor_line_edited_past_what_sqlite_or_a_calendar_holds_is_reported_not_a_traceback(path, capsys, change):
    with Journal.open(path) as journal:
        billed_event(journal)
    anchors = files.anchors_path(path)
    lines = anchors.read_text().splitlines()
    lines[-1] = json.dumps({**json.loads(lines[-1]), **change}, sort_keys=True, separators=(",", ":"))
    anchors.write_text("\n".join(lines) + "\n")
    for extra in ((), ("--format", "json")):
        code, out = report(path, capsys, *extra)
        assert code == 1 and "is not an anchor (the file was edited)" in out and "Traceback" not in out
    with Journal.open(path) as journal:  # the gateway starts on it, and appends
        billed_event(journal, energies=1)


@pytest.mark.parametrize("gap", ["before the head is read", "before the anchor file is read"])
def test_a_check_while_the_gateway_appends_reads_an_intact_journal_as_intact(path, monkeypatch, gap):
    """`report` or `statement` on the live journal: the gateway commits (and anchors) between the check's
    reads. The records it saw, the head and the anchors it compared them with must be of one moment."""
    from firmware_py.journal import chain as chain_module
    from firmware_py.journal.store import Journal as Store

    gateway = Journal.open(path)
    try:
        gateway.append_event(t.DispatchRequest("peak", "openadr", t.DispatchKind.DISCHARGE, 4_000, 0, 7_200, 0))
        appended = []

        def meanwhile(read):
            def wrapped(*args, **kwargs):
                if not appended:
                    appended.append(gateway.append_event(t.DispatchAnswer.accepted("peak", 0)))  # anchored at once
                return read(*args, **kwargs)
            return wrapped

        if gap == "before the head is read":
            monkeypatch.setattr(Store, "_head_problems", meanwhile(Store._head_problems))
        else:
            monkeypatch.setattr(chain_module.anchors, "check", meanwhile(chain_module.anchors.check))
        assert Chain(path).check().problems == [] and appended
    finally:
        gateway.close()
    assert Chain(path).check().problems == []


def test_every_record_and_the_anchor_file_deleted_is_detected(path, capsys):
    """Emptied to nothing, the journal is a good empty chain; but the key beside it says it was anchored,
    and the writer anchors seq 0 before anything else, so no anchored journal lacks its anchor file."""
    with Journal.open(path) as journal:
        billed_event(journal)
    cut_tail(path, keep=0)
    files.anchors_path(path).unlink()
    code, out = report(path, capsys)
    assert code == 1 and "journal.sqlite.anchors: missing or empty, though segment 1 was anchored" in out
    assert "chain: intact" not in out


def test_anchors_signed_by_another_key_are_detected(path, tmp_path, capsys):
    with Journal.open(path) as journal:
        billed_event(journal)
    other = tmp_path / "other.sqlite"
    Journal.open(other).close()
    files.key_path(other).replace(files.key_path(path))  # the key beside the journal is not the one that signed
    code, out = report(path, capsys)
    assert code == 1 and "not by this journal's key" in out


def test_a_replaced_key_shows_in_the_anchor_file(path, capsys):
    with Journal.open(path) as journal:
        billed_event(journal)
    files.key_path(path).unlink()
    with Journal.open(path) as journal:  # a new key is made, and signs from here on
        journal.append_event(t.DispatchAnswer.accepted("later", 9_999))
    code, out = report(path, capsys)
    assert code == 1 and "signed by another key than the lines before it" in out


def test_a_torn_last_line_is_cut_by_the_writer_and_ignored_by_the_check(path, capsys):
    with Journal.open(path) as journal:
        billed_event(journal)
    anchors = files.anchors_path(path)
    with open(anchors, "a") as f:
        f.write('{"hash":"ab')  # a crash in the middle of writing a line
    assert report(path, capsys)[0] == 0
    with Journal.open(path) as journal:
        journal.append("Note", 10_000, {})
    assert all(line.startswith("{") and line.endswith("}") for line in anchors.read_text().splitlines())
    assert report(path, capsys)[0] == 0


def test_a_journal_from_before_anchors_is_intact_and_is_anchored_once_written(path, capsys):
    with Journal.open(path) as journal:
        billed_event(journal)
    files.anchors_path(path).unlink()
    files.key_path(path).unlink()  # an older gateway kept no anchor key either
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = 1")  # what an older gateway left
    code, out = report(path, capsys)
    assert code == 0 and "anchor: none" in out
    Journal.open(path).close()  # the new gateway anchors what it found, then upgrades the file
    lines = anchor_lines(path)
    assert lines[0]["seq"] == 24 and lines[-1]["seq"] == 25  # 25: the upgrade, chained on after them
    with Journal.open(path, readonly=True) as journal:
        (upgraded,) = journal.records(RecordKind.SCHEMA_UPGRADED)
    assert upgraded.seq == 25 and upgraded.payload["from_version"] == 1
    code, out = report(path, capsys)
    assert code == 0 and "anchor: newest at record 25 (opened" in out


def test_a_key_others_can_read_is_refused(path):
    Journal.open(path).close()
    files.key_path(path).chmod(0o644)
    with pytest.raises(InputError, match="anchor key must belong to this user and be private"):
        Journal.open(path)


def test_a_key_file_that_is_not_a_key_is_refused(path):
    files.key_path(path).write_text("not a key\n")
    files.key_path(path).chmod(0o600)
    with pytest.raises(InputError, match="not an Ed25519 private key"):
        Journal.open(path)


def test_the_report_checks_against_the_anchors_own_key_where_the_key_file_is_unreadable(path, capsys):
    with Journal.open(path) as journal:
        billed_event(journal)
    files.key_path(path).unlink()
    code, out = report(path, capsys)
    assert code == 0 and "verified with the anchors' own key (key file not readable here)" in out
    assert Chain(path).check().key_checked is False


def test_an_anchor_file_that_cannot_be_opened_is_bad_input_not_a_traceback(path):
    files.anchors_path(path).mkdir()  # whatever stands where the anchor file must be
    with pytest.raises(InputError, match="cannot open the journal's anchor file"):
        Journal.open(path)


DISK_FILLS_MID_ANCHOR = """
import resource, signal, sys
from pathlib import Path
from firmware_py.core import types as t
from firmware_py.journal import Journal, files

path = Path(sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a full file is an error to the writer, not a killed process
with Journal.open(path) as journal:
    for minute in range(1, 301):  # an anchor file far larger than the write-ahead log of two records
        journal.append_event(t.EventEnergy(60.0 * minute, "peak", 66.0, 66.5, final=True))  # each anchored at once
with Journal.open(path) as journal:  # the write-ahead log starts empty: only the anchor file meets the limit
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (files.anchors_path(path).stat().st_size + 100, hard))
    journal.append_event(t.EventEnergy(18_060.0, "peak", 66.0, 66.5, final=True))
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # space is back
    journal.append_event(t.EventEnergy(18_120.0, "peak", 66.0, 66.5, final=True))
"""


def test_an_anchor_line_the_full_disk_took_only_part_of_leaves_an_intact_journal(path, capsys):
    """A full disk takes part of a line without an error; the next line must not be glued onto it."""
    child = subprocess.run([sys.executable, "-c", DISK_FILLS_MID_ANCHOR, str(path)],
                           capture_output=True, text=True, timeout=60)
    assert child.returncode == 0, child.stderr
    code, out = report(path, capsys)
    assert code == 0, out
    assert anchor_lines(path)[-1]["seq"] == 302  # the record after the full disk is anchored
    assert "cannot write the journal's anchor" in child.stderr  # the writer said so, and went on
