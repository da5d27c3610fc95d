"""`powershare-gw report` on real journal files: numbers, formats, chain verdict and exit codes."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from journal_edits import tamper, unguarded

from firmware_py.cli import main
from firmware_py.core import types as t
from firmware_py.journal import Journal, codec
from firmware_py.journal.files import anchors_path
from firmware_py.journal.kinds import RecordKind
from firmware_py.journal.owner_log import settings_text


@pytest.fixture
def journal_path(tmp_path: Path) -> Path:
    """Two events: one delivered with a fault inside, one rejected."""
    path = tmp_path / "journal.sqlite"
    with Journal.open(path) as journal, journal.batch():
        for item in (
            t.DispatchRequest("peak-1", "scenario", t.DispatchKind.DISCHARGE, 11500, 120, 14520, 60),
            t.DispatchAnswer("peak-1", 60, t.Verdict.ACCEPTED),
            t.Transition(120, "IDLE", "DISCHARGING", "dispatch: peak-1"),
            t.FaultRaised(3600, "bms_fault", "BMS state FAULT"),
            t.FaultCleared(3605, "bms_fault"),
            t.EventEnergy(7200, "peak-1", 22000, 22050),
            t.DispatchEnded(14520, "peak-1", "window closed"),
            t.EventEnergy(14520, "peak-1", 45210.5, 45000.0, final=True),
            t.DispatchRequest("peak-2", "openadr", t.DispatchKind.DISCHARGE, 8000, 20000, 23600, 15000),
            t.DispatchAnswer("peak-2", 15000, t.Verdict.REJECTED, reason=t.ReasonCode.INSUFFICIENT_ENERGY),
        ):
            journal.append_event(item, wall=codec.event_time(item))  # a bench's: one simulated clock
    return path


def test_text_report_shows_energy_timeline_and_an_intact_chain(journal_path, capsys):
    assert main(["report", "--journal", str(journal_path)]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith("chain: intact (10 records)")
    peak_row = next(line for line in out.splitlines() if "peak-1" in line and "scenario" in line)
    for value in ("11500", "accepted", "45210.5", "45000.0", "0.47", "yes"):
        assert value in peak_row
    assert "rejected INSUFFICIENT_ENERGY" in out
    assert "fault raised: bms_fault (BMS state FAULT)" in out
    assert "IDLE -> DISCHARGING: dispatch: peak-1" in out


def test_json_report_carries_the_numbers(journal_path, capsys):
    assert main(["report", "--journal", str(journal_path), "--format", "json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["chain"] == {"intact": True, "records": 10, "problems": []}
    peak, rejected = document["events"]
    assert (peak["request_id"], peak["meter_wh"], peak["integrated_wh"], peak["final"]) == (
        "peak-1", 45210.5, 45000.0, True)
    assert peak["discrepancy_pct"] == pytest.approx((45210.5 - 45000) / 45210.5 * 100)
    assert (peak["start"], peak["end"], peak["ended_at"]) == (120, 14520, 14520)
    assert [e["kind"] for e in peak["timeline"]].count("FaultRaised") == 1
    assert (rejected["verdict"], rejected["reason"], rejected["meter_wh"]) == (
        "rejected", "INSUFFICIENT_ENERGY", 0.0)


def test_csv_report_has_one_row_per_event_and_the_chain_on_stderr(journal_path, capsys):
    assert main(["report", "--journal", str(journal_path), "--format", "csv"]) == 0
    captured = capsys.readouterr()
    rows = list(csv.DictReader(io.StringIO(captured.out)))
    assert [r["request_id"] for r in rows] == ["peak-1", "peak-2"]
    assert (rows[0]["meter_wh"], rows[0]["integrated_wh"], rows[0]["final"]) == ("45210.5", "45000.0", "true")
    assert (rows[1]["verdict"], rows[1]["reason"], rows[1]["cap_w"]) == ("rejected", "INSUFFICIENT_ENERGY", "")
    assert "chain: intact (10 records)" in captured.err


def test_event_option_selects_one_event(journal_path, capsys):
    assert main(["report", "--journal", str(journal_path), "--event", "peak-2", "--format", "json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert [e["request_id"] for e in document["events"]] == ["peak-2"]


def test_unknown_event_is_bad_input(journal_path, capsys):
    assert main(["report", "--journal", str(journal_path), "--event", "nope"]) == 2
    err = capsys.readouterr().err
    assert "no dispatch event with id 'nope'" in err and str(journal_path) in err


def test_broken_chain_prints_the_problems_and_fails(journal_path, capsys):
    tamper(journal_path, ("UPDATE records SET payload = replace(payload, '45210.5', '95210.5') WHERE seq = 8", ()))
    assert main(["report", "--journal", str(journal_path)]) == 1
    out = capsys.readouterr().out
    assert "chain: BROKEN (10 records, 1 problem)" in out
    assert "record 8: contents do not match its hash (edited)" in out
    assert main(["report", "--journal", str(journal_path), "--format", "json"]) == 1
    chain = json.loads(capsys.readouterr().out)["chain"]
    assert chain["intact"] is False and chain["problems"] == ["record 8: contents do not match its hash (edited)"]


def test_report_does_not_create_or_change_the_file(tmp_path, capsys):
    missing = tmp_path / "missing.sqlite"
    assert main(["report", "--journal", str(missing)]) == 2
    assert "no such journal file" in capsys.readouterr().err
    assert not missing.exists()


@pytest.mark.parametrize("content, message", [
    (b"timestamp,kind\n1,foo\n" * 100, "not an SQLite database"),
    (b"", "empty database"),
])
def test_files_that_are_not_journals_are_bad_input(tmp_path, capsys, content, message):
    path = tmp_path / "journal.sqlite"
    path.write_bytes(content)
    assert main(["report", "--journal", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err and "Traceback" not in err


@pytest.mark.parametrize("make, kind", [(os.mkdir, "a directory"), (os.mkfifo, "a FIFO")])
def test_an_anchor_file_that_is_not_a_file_is_named_never_a_traceback_or_a_hang(journal_path, capsys, make, kind):
    """A FIFO blocked `report` for ever; a folder gave IsADirectoryError with exit 1 (read as a broken chain)."""
    anchors_path(journal_path).unlink()
    make(anchors_path(journal_path))
    assert main(["report", "--journal", str(journal_path)]) == 2
    err = capsys.readouterr().err
    assert f"anchors: the anchor file must be a regular file, not {kind}" in err and "Traceback" not in err


def test_a_journal_path_that_is_a_folder_is_said_so(tmp_path, capsys):
    assert main(["report", "--journal", str(tmp_path)]) == 2
    assert "the journal must be a regular file, not a directory" in capsys.readouterr().err


def test_foreign_sqlite_is_bad_input(tmp_path, capsys):
    path = tmp_path / "other.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE records (id INTEGER)")
    conn.commit()
    conn.close()
    assert main(["report", "--journal", str(path)]) == 2
    assert "foreign SQLite schema" in capsys.readouterr().err


def test_empty_journal_reports_no_events_and_an_intact_chain(tmp_path, capsys):
    path = tmp_path / "journal.sqlite"
    Journal.open(path).close()
    assert main(["report", "--journal", str(path)]) == 0
    assert "chain: intact (0 records)" in capsys.readouterr().out


def test_a_payload_that_is_no_longer_json_is_a_broken_chain_not_a_crash(journal_path, capsys):
    tamper(journal_path, ("UPDATE records SET payload = 'garbage' WHERE seq = 3", ()))
    assert main(["report", "--journal", str(journal_path), "--format", "json"]) == 1
    chain = json.loads(capsys.readouterr().out)["chain"]
    assert "record 3: payload is not valid JSON" in chain["problems"]


def test_an_event_a_damaged_record_hides_is_a_broken_chain_not_an_event_that_does_not_exist(journal_path, capsys):
    tamper(journal_path, ("UPDATE records SET payload = '{broken' WHERE kind = 'EventEnergy'", ()))
    assert main(["report", "--journal", str(journal_path), "--event", "peak-1"]) == 1
    out, err = capsys.readouterr()
    assert "chain: BROKEN" in out and "payload is not valid JSON" in out and "no dispatch event" not in out + err


@pytest.mark.parametrize("field, value", [("meter_wh", None), ("meter_wh", "x"), ("integrated_wh", [])])
@pytest.mark.parametrize("form", ["text", "json", "csv"])
def test_a_value_no_record_of_its_kind_holds_is_a_problem_of_the_journal_not_a_crash(journal_path, capsys, field,
                                                                                  value, form):
    with unguarded(journal_path) as conn:
        seq, payload = conn.execute("SELECT seq, payload FROM records WHERE kind = 'EventEnergy'").fetchone()
        conn.execute("UPDATE records SET payload = ? WHERE seq = ?",
                     (json.dumps({**json.loads(payload), field: value}), seq))
    assert main(["report", "--journal", str(journal_path), "--format", form]) == 1
    out, err = capsys.readouterr()
    assert "a record holds a value it cannot hold" in out + err and "Traceback" not in out + err


@pytest.mark.parametrize("event_id", ["ev[/]1", "ev[bold]2[/bold]", "ev\x1b[31m3\x07"])
def test_ids_from_an_aggregator_reach_the_terminal_inert(tmp_path, capsys, event_id):
    """A VTN chose these ids: no markup error (exit 1 would say "chain broken"), no escape sequence."""
    path = tmp_path / "journal.sqlite"
    with Journal.open(path) as journal, journal.batch():
        journal.append_event(t.DispatchRequest(event_id, "openadr", t.DispatchKind.DISCHARGE, 8000, 20, 80, 10))
        journal.append_event(t.DispatchAnswer(event_id, 10, t.Verdict.ACCEPTED))
    assert main(["report", "--journal", str(path)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "chain: intact" in out
    assert event_id.replace("\x1b", "\\x1b").replace("\x07", "\\x07")[:6] in out


def test_a_journal_on_read_only_media_is_reported(journal_path):
    """A copy on a read-only mount: no WAL index can be created beside it, the report reads it all the same.

    The folder is made read-only for the user who reads it; root ignores folder modes, so as root
    the report runs as `nobody`, which is what a person plugging in a backup stick is.
    """
    media = Path(tempfile.mkdtemp(prefix="powershare-ro-"))
    try:
        for leftover in journal_path.parent.glob(journal_path.name + "*"):
            (media / leftover.name).write_bytes(leftover.read_bytes())
            (media / leftover.name).chmod(0o644)
        media.chmod(0o555)
        command = [sys.executable, "-m", "firmware_py", "report", "--journal", str(media / journal_path.name)]
        if os.geteuid() == 0:
            command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
        run = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=media, env={
            **os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    finally:
        media.chmod(0o755)
        shutil.rmtree(media)
    assert run.returncode == 0, run.stderr
    assert "peak-1" in run.stdout and "chain: intact" in run.stdout


@pytest.mark.slow  # waits out the journal's busy timeout (5 s) before saying so
def test_a_journal_locked_by_another_process_says_so(journal_path, capsys):
    holder = sqlite3.connect(journal_path, isolation_level=None)
    holder.execute("PRAGMA locking_mode = EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    holder.execute("INSERT INTO head (id, seq, hash) SELECT id, seq, hash FROM head WHERE 0")
    try:
        code = main(["report", "--journal", str(journal_path)])
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    err = capsys.readouterr().err
    assert code == 2 and "locked by another process" in err and "not a powershare-gw journal" not in err


def test_a_revision_refused_after_the_event_was_served_keeps_it_served_and_billed(tmp_path):
    """A price lowered below the threshold mid-interval (or any later revision refused) ends the event;
    the energy already delivered was served, so the summary (and the statement built on it) keeps the
    served answer and the meter's energy, and says why it ended."""
    from firmware_py.core.types import (
        DispatchAnswer,
        DispatchEnded,
        EventEnergy,
        PriceInterval,
        PriceKind,
        ReasonCode,
    )
    from firmware_py.journal import Journal, event_summaries

    price = PriceInterval("tou#0:EXPORT_PRICE", "openadr3", "tou", PriceKind.EXPORT_PRICE, 0.55, 10.0, 3600.0, 5.0)
    with Journal.open(tmp_path / "j.sqlite") as journal:
        journal.append_event(price, wall=5.0)
        journal.append_event(DispatchAnswer.accepted(price.id, 5.0), wall=5.0)
        journal.append_event(EventEnergy(600.0, price.id, 800.0, 805.0, False), wall=600.0)
        lowered = PriceInterval(price.id, "openadr3", "tou", PriceKind.EXPORT_PRICE, 0.10, 10.0, 3600.0, 600.0, 1)
        journal.append_event(lowered, wall=600.0)
        journal.append_event(DispatchAnswer.refused(price.id, 600.0, ReasonCode.BELOW_THRESHOLD, "0.1 < 0.3"),
                             wall=600.0)
        journal.append_event(DispatchEnded(600.0, price.id, "price below the owner's threshold"), wall=600.0)
        journal.append_event(EventEnergy(600.0, price.id, 800.0, 805.0, True), wall=600.0)
        (summary,) = event_summaries(journal)
    assert summary.verdict == "accepted" and summary.meter_wh == 800.0
    assert summary.ended_reason == "price below the owner's threshold"


def _summary_of(tmp_path: Path, records: list) -> "object":
    """The one event summary of a journal holding `records` (core events, or ("start", at) for a new run)."""
    from firmware_py.journal import event_summaries
    from firmware_py.journal.kinds import RecordKind

    with Journal.open(tmp_path / "j.sqlite") as journal:
        for item in records:
            if isinstance(item, tuple):
                journal.append(RecordKind.CORE_START, item[1], {"software_version": "test"}, wall=item[1])
            else:
                journal.append_event(item, wall=codec.event_time(item))
        (summary,) = event_summaries(journal)
    return summary


def test_a_revision_to_stop_ends_the_event_and_keeps_what_it_delivered(tmp_path):
    """OpenADR 2.0b's payload 0 under the event's own id is a STOP revision: the event ends, and it is
    still the discharge it served, billed for its energy."""
    summary = _summary_of(tmp_path, [
        ("start", 0.0),
        t.DispatchRequest("ev", "openadr", t.DispatchKind.DISCHARGE, 5_000, 10, 3_600, 5),
        t.DispatchAnswer.accepted("ev", 5),
        t.EventEnergy(600, "ev", 800.0, 805.0),
        t.DispatchEnded(900, "ev", "revision 1 changed it to stop"),
        t.EventEnergy(900, "ev", 1_200.0, 1_204.0, final=True),
        t.DispatchRequest("ev", "openadr", t.DispatchKind.STOP, 0, 900, 3_600, 900, revision=1),
        t.DispatchAnswer.accepted("ev", 900),
    ])
    assert (summary.kind, summary.target_w, summary.revision) == ("discharge", 5_000, 1)
    assert summary.verdict == "accepted" and summary.meter_wh == 1_200.0 and summary.final


def test_an_event_answered_again_after_a_restart_adds_its_second_account_to_the_first(tmp_path):
    """A restart closes the open event (its meter's gap billed); the aggregator then delivers it again and
    the new run's core, which remembers no account, starts it from 0 Wh: the event is billed both."""
    request = t.DispatchRequest("ev", "openadr3", t.DispatchKind.DISCHARGE, 5_000, 10, 7_200, 5)
    summary = _summary_of(tmp_path, [
        ("start", 0.0), request, t.DispatchAnswer.accepted("ev", 5), t.EventEnergy(600, "ev", 500.0, 502.0),
        ("start", 1_000.0),
        t.DispatchEnded(1_000, "ev", "gateway restarted"), t.EventEnergy(1_000, "ev", 520.0, 502.0, final=True),
        request, t.DispatchAnswer.accepted("ev", 1_001), t.EventEnergy(1_600, "ev", 300.0, 301.0),
        t.DispatchEnded(2_000, "ev", "window closed"), t.EventEnergy(2_000, "ev", 480.0, 482.0, final=True),
    ])
    assert summary.meter_wh == 1_000.0 and summary.integrated_wh == 984.0 and summary.final


def test_an_event_weighed_again_in_the_same_run_carries_its_energy_and_is_not_counted_twice(tmp_path):
    price = t.PriceInterval("p", "oadr3", "tou", t.PriceKind.EXPORT_PRICE, 0.5, 10, 3_600, 5)
    summary = _summary_of(tmp_path, [
        ("start", 0.0), price, t.DispatchAnswer.accepted("p", 5), t.EventEnergy(600, "p", 500.0, 500.0),
        t.DispatchEnded(700, "p", "the owner's settings no longer want it"),
        t.EventEnergy(700, "p", 550.0, 550.0, final=True),
        t.PriceInterval("p", "oadr3", "tou", t.PriceKind.EXPORT_PRICE, 0.5, 10, 3_600, 800),
        t.DispatchAnswer.accepted("p", 800), t.EventEnergy(1_400, "p", 900.0, 900.0),  # 550 carried on
    ])
    assert summary.meter_wh == 900.0 and not summary.final


def test_a_discharge_revised_into_a_charge_is_billed_as_two_accounts_each_of_its_kind(tmp_path):
    """The revision ends the discharge (its energy final) and begins a charge under the same id: the
    discharge stays a discharge with its energy, and the charge gets a summary of its own."""
    from firmware_py.journal import event_summaries

    with Journal.open(tmp_path / "j.sqlite") as journal:
        for item in (
            t.DispatchRequest("ev", "openadr3", t.DispatchKind.DISCHARGE, 5_000, 10, 3_600, 5),
            t.DispatchAnswer.accepted("ev", 5),
            t.EventEnergy(600, "ev", 800.0, 805.0),
            t.DispatchRequest("ev", "openadr3", t.DispatchKind.CHARGE, 3_000, 900, 3_600, 900, revision=1),
            t.DispatchEnded(900, "ev", "revision 1 changed it to charge"),
            t.EventEnergy(900, "ev", 1_200.0, 1_204.0, final=True),
            t.DispatchAnswer.accepted("ev", 900),
            t.DispatchEnded(1_500, "ev", "window closed"),
            t.EventEnergy(1_500, "ev", 500.0, 498.0, final=True),
        ):
            journal.append_event(item, wall=codec.event_time(item))
        discharge, charge = event_summaries(journal)
    assert (discharge.request_id, discharge.kind, discharge.meter_wh, discharge.verdict) == \
        ("ev", "discharge", 1_200.0, "accepted")
    assert discharge.ended_reason == "revision 1 changed it to charge"
    assert (charge.request_id, charge.kind, charge.target_w, charge.revision, charge.meter_wh) == \
        ("ev", "charge", 3_000, 1, 500.0)


def test_a_revision_into_a_charge_that_is_refused_leaves_the_served_discharge_as_it_was(tmp_path):
    from firmware_py.journal import event_summaries

    with Journal.open(tmp_path / "j.sqlite") as journal:
        for item in (
            t.DispatchRequest("ev", "openadr3", t.DispatchKind.DISCHARGE, 5_000, 10, 3_600, 5),
            t.DispatchAnswer.accepted("ev", 5),
            t.DispatchRequest("ev", "openadr3", t.DispatchKind.CHARGE, 3_000, 900, 3_600, 900, revision=1),
            t.DispatchEnded(900, "ev", "revision 1 refused"),
            t.EventEnergy(900, "ev", 1_200.0, 1_204.0, final=True),
            t.DispatchAnswer.refused("ev", 900, t.ReasonCode.INSUFFICIENT_ENERGY, "full"),
        ):
            journal.append_event(item, wall=codec.event_time(item))
        (summary,) = event_summaries(journal)
    assert (summary.kind, summary.verdict, summary.meter_wh) == ("discharge", "accepted", 1_200.0)


def _timeline(summary) -> list[str]:
    return [entry.text for entry in summary.timeline]


def test_a_later_boots_records_stay_out_of_an_event_that_ended_before_it(tmp_path, capsys):
    """The core's clock starts again near 0 at every boot: a fault a later boot journals at the same core
    time as an old event's window did not happen during it, in the summary nor in `report --event`."""
    summary = _summary_of(tmp_path, [
        ("start", 0.0),
        t.DispatchRequest("ev", "openadr", t.DispatchKind.DISCHARGE, 5_000, 5_000, 6_000, 4_900),
        t.DispatchAnswer.accepted("ev", 4_900), t.FaultRaised(5_200, "over_temp", "pack 61 C"),
        t.DispatchEnded(6_000, "ev", "window closed"), t.EventEnergy(6_000, "ev", 1_389.0, 1_388.0, final=True),
        ("start", 2.0),
        t.FaultRaised(5_500, "bms_fault", "BMS state FAULT"), t.Transition(5_500, "IDLE", "FAULT", "bms_fault"),
    ])
    assert "fault raised: over_temp (pack 61 C)" in _timeline(summary)
    assert not {"fault raised: bms_fault (BMS state FAULT)", "IDLE -> FAULT: bms_fault"} & set(_timeline(summary))
    assert main(["report", "--journal", str(tmp_path / "j.sqlite"), "--event", "ev", "--format", "json"]) == 0
    (event,) = json.loads(capsys.readouterr().out)["events"]
    assert [entry["kind"] for entry in event["timeline"]].count("FaultRaised") == 1


def test_an_event_a_power_cut_left_open_keeps_what_happened_in_it_until_the_next_boot_closes_it(tmp_path):
    """The next boot ends the event at a core time near 0, below its start: its window runs from its
    start in its own run to that end in the next, and no further."""
    summary = _summary_of(tmp_path, [
        ("start", 0.0),
        t.DispatchRequest("ev", "openadr", t.DispatchKind.DISCHARGE, 5_000, 5_000, 9_000, 4_900),
        t.DispatchAnswer.accepted("ev", 4_900), t.FaultRaised(4_950, "bms_fault", "before it"),
        t.Transition(5_000, "IDLE", "DISCHARGING", "dispatch: ev"), t.FaultRaised(5_600, "over_temp", "pack 61 C"),
        t.EventEnergy(5_600, "ev", 800.0, 799.0),
        ("start", 2.0),
        t.Transition(2.5, "STARTUP", "IDLE", "ready"),
        t.EventEnergy(3.0, "ev", 800.0, 799.0, final=True), t.DispatchEnded(3.0, "ev", "gateway restarted"),
        t.FaultRaised(5_300, "bms_fault", "after it"),
    ])
    shown = _timeline(summary)
    assert {"IDLE -> DISCHARGING: dispatch: ev", "fault raised: over_temp (pack 61 C)", "STARTUP -> IDLE: ready"} <= set(
        shown)
    assert not {"fault raised: bms_fault (before it)", "fault raised: bms_fault (after it)"} & set(shown)


def test_an_event_the_journal_never_ended_takes_in_nothing_of_a_later_boot(tmp_path):
    """With no `DispatchEnded` (a journal an older release wrote), an open-ended event's window runs to the
    end of its own run: the next boot's core ran nothing of it."""
    summary = _summary_of(tmp_path, [
        ("start", 0.0),
        t.DispatchRequest("ev", "openadr", t.DispatchKind.DISCHARGE, 5_000, 100, float("inf"), 90),
        t.DispatchAnswer.accepted("ev", 90), t.FaultRaised(700, "over_temp", "in it"),
        ("start", 2.0),
        t.FaultRaised(800, "bms_fault", "a later boot"),
    ])
    assert "fault raised: over_temp (in it)" in _timeline(summary)
    assert "fault raised: bms_fault (a later boot)" not in _timeline(summary)


def test_an_event_a_restart_closed_before_its_window_began_never_ends_before_it_starts(tmp_path, capsys):
    """An accepted event whose window had not begun when the gateway died: the next boot closes it (its
    `DispatchEnded` 25 s before the start the aggregator gave). Its window was empty: the report shows it
    ending at its start, never an end before the start."""
    wall = 1_796_400_000.0  # wall - core of both runs (a monotonic clock that went on across the restart)
    path = tmp_path / "j.sqlite"
    with Journal.open(path) as journal:
        journal.append(RecordKind.CORE_START, 10.0, {"software_version": "test"}, wall=wall + 10.0)
        for item in (t.DispatchRequest("ev", "openadr3", t.DispatchKind.DISCHARGE, 5_000, 60.0, 80.0, 11.0),
                     t.DispatchAnswer.accepted("ev", 11.0)):
            journal.append_event(item, wall=wall + codec.event_time(item))
        journal.append(RecordKind.CORE_START, 35.0, {"software_version": "test"}, wall=wall + 35.0)
        for item in (t.DispatchEnded(35.0, "ev", "gateway restarted: event ended"),
                     t.EventEnergy(35.0, "ev", 0.0, 0.0, final=True)):
            journal.append_event(item, wall=wall + codec.event_time(item))
    assert main(["report", "--journal", str(path)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("│ ev "))
    start, end = [cell.strip() for cell in row.split("│")[6:8]]
    assert start == end == "2026-12-04 16:01:00Z"


def test_an_owner_setting_read_through_a_later_records_clock_shows_the_second_it_was_set_on():
    """A later settings record's wall-to-core offset is a few ms off the one the setting was made
    with: the storm watch set until 18:00:00 must not read 17:59:59."""
    until_core, offset = 1000.0, 1748800800.0 - 1000.0 - 0.002
    text = settings_text({"reserve_pct": 40, "storm_watch_floor_pct": 70, "storm_watch_until": until_core},
                         lambda at: at + offset)
    assert text == "reserve 40 %, storm watch 70 % until 2025-06-01 18:00:00Z"
