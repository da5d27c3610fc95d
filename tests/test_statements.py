"""Bill-credit statements (docs/command-line.md, statement): figures from real journals, signed, and checked again.

Fast tier: one shortened bench run (the default 4-hour peak event at 1/100 of its time and
pack, ~1.5 s), a journal a crash left open and a restart closed, and the pure figures under
hypothesis. Slow: the grid-outage scenario, whose backup energy must never be credited.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from firmware_py.sim import scenario
from firmware_py.sim.simulation import Simulation, SimulationOptions
from hypothesis import given
from hypothesis import strategies as st
from journal_edits import unguarded
from test_bench import scaled
from test_gateway import gateway_on

from firmware_py.cli import main
from firmware_py.clocks import Clocks
from firmware_py.core.types import (
    DispatchAnswer,
    DispatchEnded,
    DispatchKind,
    DispatchRequest,
    EventEnergy,
    Mode,
    ReasonCode,
)
from firmware_py.journal import Chain, Journal, event_summaries
from firmware_py.journal.files import statement_key_path
from firmware_py.journal.summary import EventSummary
from firmware_py.statements import evidence
from firmware_py.statements.commands import render_csv
from firmware_py.statements.document import range_period
from firmware_py.statements.earnings import EarningsBook, month_earnings
from firmware_py.statements.figures import (
    RESTART_REASON,
    EnergyRecords,
    Ledger,
    Period,
    ProgramTerms,
    Sample,
    Tally,
    event_figures,
    iso,
    totals,
)
from firmware_py.statements.make import Basis


def make(journal: Path, out: Path, *extra: str, config: Path | None = None) -> dict:
    args = ["statement", "--journal", str(journal), "--format", "json", "--out", str(out), *extra]
    if config is not None:
        args += ["--config", str(config)]
    assert main(args) == 0
    return json.loads(out.read_text())


def verify(statement: Path, journal: Path | None = None) -> int:
    return main(["statement", "verify", str(statement), *(["--journal", str(journal)] if journal else [])])


def program_config(tmp_path: Path, journal: Path) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(f'[journal]\npath = "{journal}"\n[program]\nname = "Peak Rewards"\ncurrency = "USD"\n'
                    'credit_per_kwh = 1.0\nwear_cost_per_kwh = 0.05\n')
    return path


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """A short bench run of the bundled peak event: (journal, the run's summary)."""
    folder = tmp_path_factory.mktemp("bench")
    loaded = scaled(scenario.load(scenario.bundled("summer-peak.toml")), 0.01)
    journal = folder / "bench-journal.sqlite"
    outcome = asyncio.run(Simulation(loaded, SimulationOptions(journal_path=journal)).run())
    return journal, outcome.summary


def open_peak(path: Path) -> None:
    """A journal of one event accepted and under way (150 Wh so far), with no core start: a run that died."""
    with Journal.open(path) as journal:
        journal.append_event(DispatchRequest("peak", "openadr", DispatchKind.DISCHARGE, 3_000, 5.0, 3_600.0,
                                             received_at=5.0))
        journal.append_event(DispatchAnswer.accepted("peak", 10.0))
        journal.append_event(EventEnergy(70.0, "peak", 150.0, 149.0, False, meter_total_wh=1_150.0))


@pytest.fixture
def crashed(tmp_path):
    """A journal a run that died mid-event left open, closed by the next start with a 30 Wh meter gap."""
    path = tmp_path / "journal.sqlite"
    open_peak(path)
    clock = [500.0]
    assembly = gateway_on(path, clock)
    try:
        assert assembly.gateway.close_open_events(meter_total_wh=1_180.0) == ["peak"]
    finally:
        assembly.close()
    return path


# ---------------------------------------------------------------- figures from real journals


def test_a_bench_statement_bills_the_summary_and_the_inverter_meter_and_verifies(bench, tmp_path):
    journal, summary = bench
    statement = make(journal, tmp_path / "s.json", config=program_config(tmp_path, journal))
    (event,) = statement["events"]
    (summed,) = event_summaries(Chain(journal))
    assert event["delivered_wh"] == pytest.approx(summed.meter_wh, rel=0.005)
    assert event["delivered_wh"] == pytest.approx(summary["delivered_wh"]["peak-1"], rel=0.005)
    assert event["delivered_wh"] == pytest.approx(summary["inverter_meter_wh"], rel=0.005)
    assert event["integrated_wh"] == pytest.approx(event["delivered_wh"], rel=0.01)
    assert event["credited_wh"] == event["delivered_wh"]
    assert event["credit"] == round(event["delivered_wh"] / 1000 * 1.0, 2)
    assert event["net"] == round(event["credit"] - event["wear_cost"], 2)
    assert event["soc_start_pct"] > event["soc_end_pct"] >= event["floor_pct"] - 0.5
    assert event["soc_min_pct"] <= event["soc_end_pct"]
    assert 0 < event["peak_w"] <= 11_500 and 0 < event["avg_w"] <= event["peak_w"]
    assert event["throughput_wh"] >= event["delivered_wh"]  # the inverter's losses come out of the pack too
    assert event["equivalent_cycles"] == pytest.approx(event["throughput_wh"] / statement["gateway"]["usable_capacity_wh"], abs=1e-6)
    assert statement["totals"]["credit"] == event["credit"] and statement["outage_backup_wh"] == 0
    assert statement["journal_head"] == Chain(journal).check().head_hash
    assert verify(tmp_path / "s.json", journal) == 0


def test_text_and_csv_render_the_event_with_its_credit(bench, tmp_path, capsys):
    journal, _ = bench
    config = program_config(tmp_path, journal)
    assert main(["statement", "--config", str(config)]) == 0
    text = capsys.readouterr().out
    assert "event peak-1" in text and "credit" in text and "OUTAGE BACKUP" in text and "Peak Rewards" in text
    assert main(["statement", "--journal", str(journal), "--format", "csv", "--event", "peak-1"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].startswith("id,source") and rows[1].startswith("peak-1,") and rows[-1].startswith("OUTAGE_BACKUP")


def test_a_crash_and_restart_bills_the_meter_gap_the_journal_records(crashed, tmp_path):
    statement = make(crashed, tmp_path / "s.json", "--event", "peak")
    (event,) = statement["events"]
    assert event["status"] == "closed_after_restart"
    assert event["delivered_wh"] == 180.0  # 150 Wh reported + the 30 Wh gap the restart billed
    assert any("meter gap of 30.0 Wh" in note for note in event["notes"])
    assert verify(tmp_path / "s.json", crashed) == 0


def test_a_restarted_discharge_revised_into_a_charge_keeps_its_own_meter_gap(crashed, tmp_path):
    """The energy records were read by request id alone: the discharge's restart gap was measured against
    the charge's final record (negative, so "no meter gap billed" of the 30 Wh gap that was billed)."""
    with Journal.open(crashed) as journal:
        for item in (
            DispatchRequest("peak", "openadr", DispatchKind.CHARGE, 3_000, 600.0, 3_600.0, received_at=600.0,
                            revision=1),
            DispatchAnswer.accepted("peak", 600.0),
            EventEnergy(660.0, "peak", 40.0, 40.0, False),
            DispatchEnded(900.0, "peak", "window closed"),
            EventEnergy(900.0, "peak", 100.0, 101.0, True),
        ):
            journal.append_event(item)
    statement = make(crashed, tmp_path / "s.json", "--event", "peak")
    discharge, charge = statement["events"]
    assert (discharge["kind"], discharge["status"], discharge["delivered_wh"]) == \
        ("discharge", "closed_after_restart", 180.0)
    assert any("meter gap of 30.0 Wh" in note for note in discharge["notes"]), discharge["notes"]
    assert (charge["kind"], charge["delivered_wh"]) == ("charge", 100.0)
    assert verify(tmp_path / "s.json", crashed) == 0


def test_an_open_event_says_so(tmp_path):
    path = tmp_path / "journal.sqlite"
    with Journal.open(path) as journal:
        journal.append_event(DispatchAnswer.accepted("peak", 10.0))
        journal.append_event(EventEnergy(70.0, "peak", 150.0, 149.0, False, meter_total_wh=1_150.0))
    (event,) = make(path, tmp_path / "s.json", "--event", "peak")["events"]
    assert event["status"] == "open" and any("still open" in note for note in event["notes"])


def test_a_request_refused_for_a_target_that_is_not_a_number_is_listed_without_it(tmp_path):
    path = tmp_path / "journal.sqlite"
    with Journal.open(path) as journal:
        journal.append_event(DispatchRequest("odd", "openadr", DispatchKind.DISCHARGE, math.nan, 5.0, 3_600.0,
                                             received_at=5.0))
        journal.append_event(DispatchAnswer.refused("odd", 5.0, ReasonCode.INVALID, "target_w is not a finite number"))
    (event,) = make(path, tmp_path / "s.json", "--event", "odd")["events"]
    assert event["target_w"] is None and event["reason"] == "INVALID" and event["status"] == "refused"
    assert verify(tmp_path / "s.json", path) == 0


# ---------------------------------------------------------------- evidence


def test_a_changed_figure_a_wrong_key_or_a_changed_journal_fail_verification(crashed, tmp_path, capsys):
    good = tmp_path / "s.json"
    statement = make(crashed, good, "--event", "peak")
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps({**statement, "totals": {**statement["totals"], "credit": 99.0}}))
    assert verify(changed) == 1
    assert "changed after it was signed" in capsys.readouterr().err

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    forged = tmp_path / "forged.json"
    body = {k: v for k, v in statement.items() if k not in ("signature", "public_key")}
    body["events"][0]["delivered_wh"] = 999.0
    forged.write_text(json.dumps(evidence.sign(body, Ed25519PrivateKey.generate())))
    assert verify(forged) == 0  # a good signature by some key: only the journal's side knows whose
    assert verify(forged, crashed) == 1
    err = capsys.readouterr().err
    assert "not by this gateway's statement key" in err and "delivered_wh" in err

    with unguarded(crashed) as db:  # the meter figure rewritten in the journal itself, guards dropped
        row = db.execute("SELECT seq, payload FROM records WHERE kind = 'EventEnergy' ORDER BY seq DESC").fetchone()
        db.execute("UPDATE records SET payload = ? WHERE seq = ?", (row[1].replace("180.0", "280.0"), row[0]))
    assert verify(good, crashed) == 1
    err = capsys.readouterr().err
    assert f"journal: record {row[0]}: contents do not match its hash (edited)" in err


@pytest.mark.parametrize("field, value, said", [
    ("journal_seq", "abc", "journal_seq is 'abc' (str), not a whole number"),
    ("journal_seq", -1, "journal_seq is -1: a record number is 0 or more"),
    ("events", "x", "events is 'x' (str), not a list"),
    ("credit", "1.0", "events[0].credit is '1.0' (str), not a number"),
    ("credit", True, "events[0].credit is True (bool), not a number"),
])
def test_a_statement_with_a_malformed_field_is_bad_input_named_not_a_changed_figure(
        crashed, tmp_path, capsys, field, value, said):
    """A field of the wrong type exited 1 as a changed figure, and a journal_seq of "abc" was said to be a
    record the journal lacks ("cut back, or another journal"): it is bad input (exit 2), named."""
    statement = make(crashed, tmp_path / "s.json", "--event", "peak")
    if field == "credit":
        statement["events"][0]["credit"] = value
    else:
        statement[field] = value
    malformed = tmp_path / "malformed.json"
    malformed.write_text(json.dumps(statement))
    for journal in ((), (crashed,)):
        assert verify(malformed, *journal) == 2
        err = capsys.readouterr().err
        assert f"{malformed}: a malformed statement: {said}" in err and "cut back" not in err


def test_a_statement_resigned_by_another_key_fails_wherever_the_key_is_checked_and_says_when_it_cannot_be(
        crashed, tmp_path, capsys):
    """Figures that follow from the journal prove nothing about the rate unless the gateway signed them: a
    forger with the journal alone re-signs a statement at ten times the rate."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    good = tmp_path / "s.json"
    statement = make(crashed, good, "--event", "peak", config=program_config(tmp_path, crashed))
    genuine_key = statement["public_key"]
    body = {k: v for k, v in statement.items() if k not in ("signature", "public_key")}
    body["program"] = {**body["program"], "credit_per_kwh": 10.0}
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps(evidence.sign(body, Ed25519PrivateKey.generate())))
    capsys.readouterr()

    key = statement_key_path(crashed)
    key.chmod(0o640)  # the key file readable here though not private: its public half is all a checker needs
    assert verify(forged, crashed) == 1
    assert "not by this gateway's statement key" in capsys.readouterr().err
    key.rename(tmp_path / "elsewhere")  # the aggregator's copy: the journal and its anchors, not the private key
    assert verify(forged, crashed) == 1
    assert "the signing key was not checked" in capsys.readouterr().err
    pinned = ["--public-key", genuine_key]
    assert main(["statement", "verify", str(forged), "--journal", str(crashed), *pinned]) == 1
    assert "not by the pinned key" in capsys.readouterr().err
    assert main(["statement", "verify", str(forged), *pinned]) == 1
    assert main(["statement", "verify", str(good), "--journal", str(crashed), *pinned]) == 0
    assert "(the pinned key)" in capsys.readouterr().out
    assert verify(forged) == 0  # the signature alone asked for: good, and the output says whose key it is not
    assert "give --public-key HEX to check it is the gateway's" in capsys.readouterr().out
    assert main(["statement", "verify", str(good), "--public-key", "abc"]) == 2
    assert "--public-key: expected the 64 hex digits" in capsys.readouterr().err


def test_an_edit_no_figure_reads_still_fails_verification_by_the_chain_alone(crashed, tmp_path, capsys):
    good = tmp_path / "s.json"
    make(crashed, good, "--event", "peak")
    with unguarded(crashed) as db:
        db.execute("UPDATE records SET payload = replace(payload, '\"detail\":\"\"', '\"detail\":\"edited\"') "
                   "WHERE kind = 'DispatchAnswer'")
        assert db.total_changes == 1
    assert verify(good, crashed) == 1
    err = capsys.readouterr().err
    assert "contents do not match its hash (edited)" in err and "the journal gives" not in err


def test_a_value_no_record_of_its_kind_holds_fails_verification_with_a_message_not_a_traceback(
        crashed, tmp_path, capsys):
    good = tmp_path / "s.json"
    make(crashed, good, "--event", "peak")
    with unguarded(crashed) as db:  # an edit: the end's reason a number, guards dropped
        row = db.execute("SELECT seq, payload FROM records WHERE kind = 'DispatchEnded'").fetchone()
        db.execute("UPDATE records SET payload = ? WHERE seq = ?",
                   (json.dumps({**json.loads(row[1]), "reason": 1e300}), row[0]))
    assert verify(good, crashed) == 1
    assert "a record holds a value it cannot hold" in capsys.readouterr().err


def test_a_record_that_is_no_longer_json_fails_verification_not_bad_input(crashed, tmp_path, capsys):
    good = tmp_path / "s.json"
    make(crashed, good, "--event", "peak")
    with unguarded(crashed) as db:
        db.execute("UPDATE records SET payload = '{broken' WHERE kind = 'DispatchAnswer'")
        assert db.total_changes == 1
    assert verify(good, crashed) == 1
    err = capsys.readouterr().err
    assert "payload is not valid JSON" in err and "its figures cannot be recomputed" in err


def test_an_outage_a_run_died_in_ends_with_that_run_and_the_next_runs_event_is_credited(tmp_path):
    """Run 1 enters BACKUP and dies in it (no transition out is ever journaled); run 2, grid back, serves an
    event. The core's clock starts again with each run, so outages are placed on the wall clock and one a
    run left open ends where the next run starts: run 2's energy is not outage energy."""
    from core_builders import bms, inverter

    path, clock = tmp_path / "journal.sqlite", [0.0]
    first = gateway_on(path, clock)
    for i in range(60):
        clock[0] = t = i * 0.5
        first.gateway.feed(bms(t), inverter(t, grid_outage=t > 5, grid_connected=t <= 5, tot_wh_inj=1_000.0))
    assert first.gateway.controller.mode is Mode.BACKUP
    first.gateway.flush_journal(final=True)
    first.gateway.journal.close()  # the power goes: nothing more is written
    first.can_link.close()

    clock[0], meter = 1_000.0, 1_000.0
    second = gateway_on(path, clock)
    request = DispatchRequest("peak", "openadr", DispatchKind.DISCHARGE, 3_000, 1_001.0, 5_000.0, received_at=1_001.0)
    for i in range(1, 1_200):
        clock[0] = t = 1_000.0 + i * 0.5
        watts = max(0.0, second.gateway.command.setpoint_w)
        meter += watts / 3600 * 0.5
        second.gateway.feed(bms(t), inverter(t, measured_w=watts, tot_wh_inj=meter), *([request] if i == 2 else []))
    assert second.gateway.controller.mode is Mode.DISCHARGE
    clock[0] += 1
    second.gateway.close_open_events(meter, "gateway stopped: event ended")
    second.gateway.flush_journal(final=True)
    second.close()

    statement = make(path, tmp_path / "s.json", "--event", "peak")
    (event,) = statement["events"]
    assert event["delivered_wh"] > 400 and event["outage_wh"] == 0
    assert event["credited_wh"] == event["delivered_wh"] and statement["outage_backup_wh"] == 0


def test_a_discharge_revised_into_a_charge_is_two_lines_and_the_discharge_is_credited(tmp_path):
    path = tmp_path / "journal.sqlite"
    with Journal.open(path) as journal:
        for item in (
            DispatchRequest("ev", "openadr3", DispatchKind.DISCHARGE, 5_000, 10.0, 3_600.0, received_at=5.0),
            DispatchAnswer.accepted("ev", 5.0),
            DispatchRequest("ev", "openadr3", DispatchKind.CHARGE, 3_000, 900.0, 3_600.0, received_at=900.0,
                            revision=1),
            DispatchEnded(900.0, "ev", "revision 1 changed it to charge"),
            EventEnergy(900.0, "ev", 1_200.0, 1_204.0, True),
            DispatchAnswer.accepted("ev", 900.0),
            DispatchEnded(1_500.0, "ev", "window closed"),
            EventEnergy(1_500.0, "ev", 500.0, 498.0, True),
        ):
            journal.append_event(item)
    statement = make(path, tmp_path / "s.json", "--event", "ev")
    assert [(e["id"], e["kind"], e["delivered_wh"], e["credited_wh"]) for e in statement["events"]] == \
        [("ev", "discharge", 1_200.0, 1_200.0), ("ev", "charge", 500.0, 0)]
    assert verify(tmp_path / "s.json", path) == 0


def test_bad_input_is_exit_2_with_a_message(tmp_path, capsys):
    (tmp_path / "x.json").write_text("{not json")
    assert verify(tmp_path / "x.json") == 2
    assert verify(tmp_path / "missing.json") == 2
    assert main(["statement", "--journal", str(tmp_path / "nope.sqlite")]) == 2
    assert main(["statement", "--journal", str(tmp_path / "nope.sqlite"), "--from", "2025-01-01"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    with Journal.open(tmp_path / "journal.sqlite"):
        pass
    for option in (["--month", "9999-12"], ["--from", "9999-12-31", "--to", "9999-12-31"]):
        assert main(["statement", "--journal", str(tmp_path / "journal.sqlite"), *option]) == 2
        assert "past the last" in capsys.readouterr().err  # not a damaged journal (1)
    for month in ("2025-7", " 2025-07", "2025-13", "25-07"):  # strptime alone took the first two
        assert main(["statement", "--journal", str(tmp_path / "journal.sqlite"), "--month", month]) == 2
        assert f"--month: {month!r} is not YYYY-MM" in capsys.readouterr().err


def test_a_period_still_to_come_is_refused_not_signed_as_empty(tmp_path, capsys):
    """`--month 2027-05` typed for 2026-05 made a signed statement saying nothing happened in a month to come."""
    with Journal.open(tmp_path / "journal.sqlite"):
        pass
    now = datetime.now(UTC)
    ahead = f"{now.year + 1:04d}-{now.month:02d}"
    for option in (["--month", ahead], ["--from", f"{ahead}-01", "--to", f"{ahead}-02"]):
        assert main(["statement", "--journal", str(tmp_path / "journal.sqlite"), *option]) == 2
        err = capsys.readouterr().err
        assert f"statement: {option[0]} {option[1]}: begins {ahead}-01T00:00:00Z, after now (" in err, err
        assert "nothing has happened in it yet" in err
    this_month = f"{now.year:04d}-{now.month:02d}"
    assert main(["statement", "--journal", str(tmp_path / "journal.sqlite"), "--month", this_month,
                 "--out", str(tmp_path / "s.json")]) == 0


def test_a_period_the_retention_policy_pruned_is_refused_and_its_old_statement_says_why_it_cannot_be_checked(
        tmp_path, capsys):
    """An October credited 3 USD; its segment pruned 500 days later, the October statement was made again,
    signed and verified as "no dispatch events in this period", and the one made before failed verification
    as if the journal had been edited."""
    from firmware_py.core.policy import Policy
    from firmware_py.core.types import OwnerSettings
    from firmware_py.journal.steps import START_KIND, start_payload

    path, october = tmp_path / "journal.sqlite", datetime(2025, 10, 10, tzinfo=UTC).timestamp()
    with Journal.open(path, wall_clock=lambda: october) as j:
        j.append(START_KIND, 0.0, start_payload(Policy(), OwnerSettings(20, 0.0), 0.0), wall=october)
        j.append_event(DispatchRequest("peak", "openadr", DispatchKind.DISCHARGE, 3_000.0, 10.0, 3_610.0,
                                       received_at=0.0), wall=october)
        j.append_event(DispatchAnswer.accepted("peak", 0.0), wall=october)
        j.append_event(EventEnergy(3_610.0, "peak", 3_000.0, 3_000.0, True, meter_total_wh=4_000.0),
                       wall=october + 3_610.0)
    config = program_config(tmp_path, path)
    before = make(path, tmp_path / "before.json", "--month", "2025-10", config=config)
    assert [e["id"] for e in before["events"]] == ["peak"]
    later = october + 500 * 86_400.0
    with Journal.open(path, wall_clock=lambda: later) as j:
        j.rotate(later - october, [])
        assert [p.name for p in j.prune(later - october, 400 * 86_400.0)] == ["journal.000001.sqlite"]
    capsys.readouterr()
    assert main(["statement", "--config", str(config), "--month", "2025-10"]) == 2
    err = capsys.readouterr().err
    assert "statement: the period begins 2025-10-01T00:00:00Z, before the oldest record the journal still holds " \
           "(2027-02-22T00:00:00Z): the records before it were pruned by the journal's retention policy" in err, err
    assert verify(tmp_path / "before.json", path) == 1
    err = capsys.readouterr().err
    assert "journal_seq 4: the last record the statement was made from was pruned by the journal's retention " \
           "policy (the oldest held is record 5)" in err, err
    assert "the journal was changed" not in err and "the statement says" not in err
    assert verify(tmp_path / "before.json") == 0  # its signature still holds


def test_a_date_written_any_iso_way_is_a_whole_day_included_as_to():
    whole = range_period("2025-01-01", "2025-01-31")
    assert whole.end == datetime(2025, 2, 1, tzinfo=UTC).timestamp()
    for compact in ("20250131", "2025-W05-5", "2025W055"):  # 31 January, as a date alone
        assert range_period("2025-01-01", compact) == whole
    assert range_period("20250131", "20250131").end - range_period("20250131", "20250131").start == 86_400
    at_midnight = range_period("2025-01-01", "2025-01-31T00:00:00")  # a time: --to excluded
    assert at_midnight.end == datetime(2025, 1, 31, tzinfo=UTC).timestamp()


def test_a_week_written_alone_is_the_whole_week_and_included_as_to():
    """`--to 2025-W05` covered its Monday alone (Python reads a week as its Monday)."""
    monday, next_monday = datetime(2025, 1, 27, tzinfo=UTC).timestamp(), datetime(2025, 2, 3, tzinfo=UTC).timestamp()
    for week in ("2025-W05", "2025W05"):
        assert range_period(week, week) == range_period("2025-01-27", "2025-02-02")
        assert (range_period(week, week).start, range_period(week, week).end) == (monday, next_monday)
    assert range_period("2025-W05-1", "2025-W05-1").end == datetime(2025, 1, 28, tzinfo=UTC).timestamp()


def test_dates_a_time_zone_moves_out_of_the_calendar_are_bad_input_not_a_damaged_journal(tmp_path, capsys):
    with Journal.open(tmp_path / "journal.sqlite"):
        pass
    for option in (["--from", "0001-01-01T00:00:00+01:00", "--to", "2026-01-01"],
                   ["--from", "2026-01-01", "--to", "9999-12-31T23:59:59-01:00"]):
        assert main(["statement", "--journal", str(tmp_path / "journal.sqlite"), *option]) == 2
        assert "is outside the years 1 to 9999 in UTC" in capsys.readouterr().err


def test_a_statement_file_with_a_key_given_twice_or_nested_past_any_statement_is_refused(crashed, tmp_path, capsys):
    make(crashed, tmp_path / "s.json")
    text = (tmp_path / "s.json").read_text()
    assert '"totals": {' in text
    (tmp_path / "twice.json").write_text(text.replace('"totals": {', '"totals": {"credit": 999.0, ', 1))
    assert verify(tmp_path / "twice.json", crashed) == 2
    assert "the key 'credit' is given twice in one object" in capsys.readouterr().err
    for deep in ("[" * 100_000 + "]" * 100_000,  # past what the parser takes
                 '{"signature": "00", "public_key": "00", "x": ' + "[" * 600 + "]" * 600 + "}"):  # past what is signed
        (tmp_path / "deep.json").write_text(deep)
        assert verify(tmp_path / "deep.json") == 2
        err = capsys.readouterr().err
        assert "nested deeper than any statement is" in err and "Traceback" not in err


def _as_other_tools_write_it(value):
    """What jq or a browser's JSON.stringify makes of a statement: integral numbers without their
    `.0`, every non-ASCII letter escaped or not as the tool likes, keys in another order."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _as_other_tools_write_it(value[k]) for k in reversed(list(value))}
    if isinstance(value, list):
        return [_as_other_tools_write_it(v) for v in value]
    return value


def test_a_statement_rewritten_by_another_json_tool_still_verifies_and_one_signed_before_rfc_8785_too(
        crashed, tmp_path):
    document = make(crashed, tmp_path / "s.json", "--event", "peak")
    document["events"][0]["notes"].append("Zürich ☃ 1e-07")  # a document of any text, re-signed below
    key = evidence.load_or_create_key(statement_key_path(crashed))
    signed = evidence.sign({k: v for k, v in document.items() if k not in ("signature", "public_key")}, key)
    assert evidence.signature_problem(signed) is None
    rewritten = json.loads(json.dumps(_as_other_tools_write_it(signed), ensure_ascii=True, indent=4))
    assert rewritten != signed or json.dumps(rewritten) != json.dumps(signed)
    assert evidence.signature_problem(rewritten) is None
    assert evidence.signature_problem({**rewritten, "journal_seq": rewritten["journal_seq"] + 1}) is not None
    old_style = {k: v for k, v in signed.items() if k != "signature"}
    old_style["signature"] = key.sign(json.dumps(old_style, sort_keys=True, separators=(",", ":")).encode()).hex()
    assert evidence.signature_problem(old_style) is None


def test_text_no_valid_unicode_holds_and_a_price_that_is_no_number_neither_crash_a_statement(crashed):
    """Only an edited journal holds either (ids are checked at the door, the core refuses such a price)."""
    key = evidence.load_or_create_key(statement_key_path(crashed))
    assert evidence.signature_problem(evidence.sign({"id": "peak\ud800"}, key)) is None
    summary = EventSummary("p", "openadr3", "discharge", 3_000, 0, 0.0, 0.0, 10.0, "rejected", ended_at=10.0,
                           ended_reason="refused", price_per_kwh=float("inf"))
    line = event_figures(summary, Tally(0.0, 10.0), ProgramTerms("p", "USD", 0.5, 0.0), 10_000, EnergyRecords())
    assert (line["credit"], line["net"]) == (0.0, 0.0)


@pytest.mark.parametrize(("value", "text"), [
    (830.0, "830"), (1e-07, "1e-7"), (0.000001, "0.000001"), (1e21, "1e+21"), (1e20, "100000000000000000000"),
    (-0.0, "0"), (0.1, "0.1"), (5e-324, "5e-324"), (1.5e-7, "1.5e-7"), (123.456, "123.456"), (-2.5, "-2.5"),
])
def test_numbers_are_signed_as_ecmascript_writes_them(value, text):
    assert evidence.canonical({"n": value}) == f'{{"n":{text}}}'.encode()


def test_a_charge_has_no_outage_energy_and_money_rounds_half_up_on_the_printed_figures():
    from firmware_py.statements.commands import _event_text

    terms = ProgramTerms("p", "USD", 0.5, 0.0)

    def line(kind: str, meter_wh: float) -> dict:
        summary = EventSummary("e", "openadr3", kind, 3_000, 0, 0.0, 0.0, 10.0, "accepted", ended_at=10.0,
                               ended_reason="window closed", meter_wh=meter_wh, integrated_wh=meter_wh)
        return event_figures(summary, Tally(0.0, 10.0), terms, 10_000, EnergyRecords())

    charge = line("charge", -830.0)
    assert charge["outage_wh"] == 0 and not any("outage" in text for text in _event_text(charge, "USD"))
    assert line("discharge", 830.0)["credit"] == 0.42  # 0.83 kWh at 0.50: 0.415, which binary floats hold as 0.41499…


def test_an_outage_longer_than_the_events_own_delivery_shows_all_its_backup_energy_and_credits_none():
    """30 s delivering 50 Wh a step with the grid up, then 70 s of backup at 100 Wh a step in the window:
    the line shows the outage's 700 Wh (it once showed no more than the event delivered, 150 Wh)."""
    samples, meter = [], 1_000.0
    for i in range(11):
        backup = i > 3
        meter += 0.0 if i == 0 else (100.0 if backup else 50.0)
        samples.append(Sample(float(i), 80.0 - i, 5_000.0, meter, 42.0, backup))
    ledger = Ledger(Period(0, 1e9), {"peak": Tally(0.0, 10.0)})
    for sample in samples:
        ledger.feed(sample)
    summary = EventSummary("peak", "openadr3", "discharge", 5_000, 0, 0.0, 0.0, 10.0, "accepted", ended_at=10.0,
                           ended_reason="window closed", meter_wh=150.0, integrated_wh=150.0)
    line = event_figures(summary, ledger.tallies["peak"], ProgramTerms("p", "USD", 1.0, 0.0), 10_000,
                         EnergyRecords())
    assert (line["delivered_wh"], line["outage_wh"], line["credited_wh"]) == (150.0, 700.0, 150.0)
    assert any("700.0 Wh flowed during a grid outage" in note for note in line["notes"])


def test_csv_cells_a_spreadsheet_would_run_as_formulas_are_written_as_text(tmp_path, capsys):
    import csv
    import io

    path = tmp_path / "journal.sqlite"
    ids = ("=HYPERLINK(\"http://evil.example\")", "+1", "-2", "@SUM(A1)", "plain")
    with Journal.open(path) as journal:
        for i, request_id in enumerate(ids):
            journal.append_event(DispatchRequest(request_id, "openadr3", DispatchKind.DISCHARGE, 1_000, 100.0 * i,
                                                 100.0 * i + 50, received_at=100.0 * i))
            journal.append_event(DispatchAnswer.accepted(request_id, 100.0 * i))
    assert main(["statement", "--journal", str(path), "--format", "csv"]) == 0
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert [row[0] for row in rows[1:-2]] == ["'=HYPERLINK(\"http://evil.example\")", "'+1", "'-2", "'@SUM(A1)", "plain"]


def test_the_statement_key_is_made_private_and_refused_when_others_can_read_it(crashed, tmp_path):
    make(crashed, tmp_path / "s.json")
    key = statement_key_path(crashed)
    assert key.stat().st_mode & 0o777 == 0o600
    os.chmod(key, 0o644)
    assert main(["statement", "--journal", str(crashed)]) == 2


# ---------------------------------------------------------------- the figures' promises


@st.composite
def runs(draw):
    """A run of samples (meter forward, some in BACKUP) and events over windows of it."""
    n = draw(st.integers(2, 40))
    steps = draw(st.lists(st.tuples(st.floats(0, 50), st.booleans()), min_size=n, max_size=n))
    samples, meter = [], 1_000.0
    for i, (delta, backup) in enumerate(steps):
        meter += delta
        samples.append(Sample(float(i), 80.0 - i * 0.1, delta * 3600, meter, 42.0, backup))
    events = []
    for k in range(draw(st.integers(1, 4))):
        lo = draw(st.integers(0, n - 1))
        hi = draw(st.integers(lo, n - 1))
        verdict = draw(st.sampled_from(["accepted", "accepted_capped", "rejected"]))
        kind = draw(st.sampled_from(["discharge", "charge"]))
        meter_wh = sum(d for d, backup in steps[lo + 1:hi + 1] if not backup)  # the core bills grid-up intervals
        events.append((EventSummary(f"e{k}", "test", kind, 3_000, 0, float(lo), float(lo), float(hi), verdict,
                                    ended_at=float(hi), ended_reason="window closed", meter_wh=meter_wh,
                                    integrated_wh=meter_wh), lo, hi))
    return samples, events


@given(runs(), st.floats(0, 2), st.floats(0, 1))
def test_credited_energy_never_exceeds_the_meter_and_outage_energy_is_never_credited(run, rate, wear):
    samples, events = run
    ledger = Ledger(Period(0, 1e9), {e.request_id: Tally(float(lo), float(hi)) for e, lo, hi in events})
    for sample in samples:
        ledger.feed(sample)
    lines = [event_figures(e, ledger.tallies[e.request_id], ProgramTerms("p", "USD", rate, wear), 10_000,
                           EnergyRecords()) for e, _, _ in events]
    for (summary, lo, hi), line in zip(events, lines):
        outage = sum(max(0.0, b.meter_wh - a.meter_wh) for a, b in zip(samples, samples[1:])
                     if b.backup and lo <= b.wall <= hi)
        in_window = sum(max(0.0, b.meter_wh - a.meter_wh) for a, b in zip(samples, samples[1:]) if lo <= b.wall <= hi)
        assert line["credited_wh"] <= line["delivered_wh"] <= summary.meter_wh + 5e-4  # Wh rounded to 3 places
        assert line["credited_wh"] <= max(0.0, in_window - outage) + 1e-3  # what the meter counted, less backup
        if summary.verdict == "rejected" or summary.kind == "charge":
            assert line["credited_wh"] == 0 and line["credit"] == 0
    total = totals(lines, ledger.outage_backup_wh)
    assert total["credited_wh"] <= total["delivered_wh"] + 1e-6
    assert total["credit"] == pytest.approx(sum(line["credit"] for line in lines))


def test_a_restarts_meter_gap_across_an_outage_loses_the_outage_energy_and_nothing_else():
    """The one meter figure that can hold backup energy: the gap since the last report, read after a restart."""
    samples = [Sample(float(i), 80.0, 5_000.0, 1_000.0 + 10 * i, 42.0, 4 <= i <= 6) for i in range(11)]

    def credited(gap_wh: float, restarted: bool, last_report_at: float = 3.0) -> float:
        ledger = Ledger(Period(0, 1e9), {"peak": Tally(0.0, 10.0, gap_from=last_report_at)})
        for sample in samples:
            ledger.feed(sample)
        assert ledger.tallies["peak"].outage_wh == 30.0
        summary = EventSummary("peak", "openadr", "discharge", 5_000, 0, 0.0, 0.0, 10.0, "accepted", ended_at=10.0,
                               ended_reason=(RESTART_REASON + ": event ended") if restarted else "window closed",
                               meter_wh=70.0 + gap_wh, integrated_wh=70.0)
        energy = EnergyRecords(70.0, last_report_at)
        return event_figures(summary, ledger.tallies["peak"], ProgramTerms("p", "USD", 1.0, 0.0), 10_000,
                             energy)["credited_wh"]

    assert credited(0.0, restarted=False) == 70.0  # the core billed grid-up intervals only
    assert credited(0.0, restarted=True) == 70.0  # no gap billed: nothing to take off
    assert credited(20.0, restarted=True) == 70.0  # a gap smaller than the outage after the report: may all be backup
    assert credited(45.0, restarted=True) == 85.0  # a larger one: the outage's 30 Wh off, the rest the event's
    assert credited(45.0, restarted=True, last_report_at=7.0) == 115.0  # the outage was before the report: none


def test_a_second_accounts_restart_gap_is_measured_within_that_account_not_against_the_first(tmp_path):
    """An event delivered again after a restart closed it is a second account, counted from 0 Wh; when a
    second restart closes that one (no meter reading since its last report: no gap), none of the first
    account's 180 Wh is a "gap", so the outage after the last report takes nothing off the credit."""
    from firmware_py.core.policy import Policy
    from firmware_py.core.types import BmsSnapshot, InverterStatus, OwnerSettings, Transition
    from firmware_py.journal.steps import START_KIND, STEPS_KIND, encode_batch, start_payload

    path = tmp_path / "journal.sqlite"

    def request(at: float) -> DispatchRequest:
        return DispatchRequest("peak", "openadr", DispatchKind.DISCHARGE, 3_000, 5.0, 20_000.0, received_at=at)

    def restart(at: float, meter_total: float) -> None:
        assembly = gateway_on(path, [at])
        try:
            assert assembly.gateway.close_open_events(meter_total_wh=meter_total) == ["peak"]
        finally:
            assembly.close()

    with Journal.open(path) as j:
        j.append(START_KIND, 0.0, start_payload(Policy(), OwnerSettings(40, 0.0), 0.0), wall=0.0)
        j.append_event(request(5.0), wall=5.0)
        j.append_event(DispatchAnswer.accepted("peak", 10.0), wall=10.0)
        j.append_event(EventEnergy(70.0, "peak", 150.0, 149.0, False, meter_total_wh=1_150.0), wall=70.0)
    restart(500.0, 1_180.0)  # bills a 30 Wh gap: the first account closes at 180 Wh
    with Journal.open(path) as j:
        j.append_event(request(510.0), wall=510.0)
        j.append_event(DispatchAnswer.accepted("peak", 510.0), wall=510.0)
        j.append_event(EventEnergy(600.0, "peak", 100.0, 99.0, False, meter_total_wh=2_000.0), wall=600.0)
        j.append_event(Transition(610.0, Mode.DISCHARGE, Mode.BACKUP, "grid outage"), wall=610.0)
        j.append_event(EventEnergy(610.0, "peak", 100.0, 99.0, False, meter_total_wh=None), wall=610.0)
        steps = [(600.0 + i * 10, (BmsSnapshot(600.0 + i * 10, soc_min_pct=70.0),
                                   InverterStatus(600.0 + i * 10, measured_w=2_000.0, grid_outage=i >= 1,
                                                  grid_connected=i < 1, tot_wh_inj=2_000.0 + 50 * i)))
                 for i in range(9)]
        j.append(STEPS_KIND, 690.0, encode_batch(steps), wall=690.0)
    restart(900.0, 2_400.0)  # the last record had no meter reading: no gap billed

    (event,) = make(path, tmp_path / "s.json", "--event", "peak")["events"]
    assert event["status"] == "closed_after_restart" and event["delivered_wh"] == 280.0
    assert event["credited_wh"] == 280.0
    assert not any("meter gap of" in note for note in event["notes"]), event["notes"]


def pruned_while_open(path: Path, *, also_open: bool = False, policy: Any = None, noted: bool = False) -> None:
    """A journal rotated while "peak" (and, `also_open`, an "early" event reported before it) ran, its archive
    pruned: only the new segment's start holds the events' requests, answers and last reports (the carry).
    The grid then fails after peak's last report (40 Wh flows in BACKUP), the run dies, and the next start
    closes the open events with the meter 60 Wh on from peak's last report: a gap that holds the outage.
    `noted`: the rotation notes the run in progress (its policy, owner settings and the request served),
    as the gateway's does; `policy`: the run's (default: Policy())."""
    from firmware_py.core.policy import Policy
    from firmware_py.core.types import BmsSnapshot, InverterStatus, OwnerSettings, Transition
    from firmware_py.journal import codec
    from firmware_py.journal.kinds import RecordKind
    from firmware_py.journal.steps import START_KIND, STEPS_KIND, encode_batch, start_payload

    wall = [0.0]
    events = [(DispatchRequest("peak", "openadr", DispatchKind.DISCHARGE, 3_000, 5.0, 20_000.0, received_at=5.0),
               DispatchAnswer.accepted("peak", 10.0), EventEnergy(70.0, "peak", 150.0, 149.0, False,
                                                                  meter_total_wh=1_150.0))]
    if also_open:  # carried after peak's records, though reported before them: each keeps its own
        events.append((DispatchRequest("early", "openadr", DispatchKind.DISCHARGE, 1_000, 2.0, 20_000.0,
                                       received_at=2.0),
                       DispatchAnswer.accepted("early", 3.0), EventEnergy(40.0, "early", 20.0, 20.0, False,
                                                                          meter_total_wh=1_100.0)))
    with Journal.open(path, wall_clock=lambda: wall[0]) as j:
        policy, owner = policy or Policy(), OwnerSettings(40, 0.0)
        j.append(START_KIND, 0.0, start_payload(policy, owner, 0.0), wall=0.0)
        for records in events:
            for record in records:
                j.append_event(record, wall=getattr(record, "at", getattr(record, "received_at", 0.0)))
        wall[0] = 1_000.0
        run = {"start": start_payload(policy, owner, 1_000.0), "serving": "peak"} if noted else None
        j.rotate(1_000.0, [(str(RecordKind.of(r)), codec.jsonable(r)) for records in events for r in records], run)
        j.append_event(Transition(1_020.0, Mode.DISCHARGE, Mode.BACKUP, "grid outage"), wall=1_020.0)
        steps = [(1_000.0 + i * 10, (BmsSnapshot(1_000.0 + i * 10, soc_min_pct=70.0),
                                     InverterStatus(1_000.0 + i * 10, measured_w=2_000.0, grid_outage=i >= 2,
                                                    grid_connected=i < 2, tot_wh_inj=1_150.0 + 10 * i)))
                 for i in range(7)]  # the meter 1_150 -> 1_210: 1_170 -> 1_210 in BACKUP (40 Wh)
        j.append(STEPS_KIND, 1_060.0, encode_batch(steps), wall=1_060.0)
        wall[0] = 10_000_000.0
        assert [p.name for p in j.prune(1_070.0, 60.0)] == ["journal.000001.sqlite"]
    assembly = gateway_on(path, [2_000.0])
    try:
        assert sorted(assembly.gateway.close_open_events(meter_total_wh=1_210.0)) == \
            sorted(records[2].request_id for records in events)
    finally:
        assembly.close()


def test_a_restart_gap_after_a_pruned_rotation_is_measured_from_the_carried_last_report(tmp_path):
    """A rotation carries an open event's records into the new segment's start, where they stand at its seq;
    the statement looked its energy records up again in the journal by seq, found none of the carried last
    report once the archive was pruned, and so billed no restart gap: the outage energy in the 60 Wh gap
    was credited (210 Wh, "no meter gap billed"). Unpruned, the same journal credits 160 Wh."""
    path = tmp_path / "journal.sqlite"
    pruned_while_open(path)
    (event,) = make(path, tmp_path / "s.json", "--event", "peak", config=program_config(tmp_path, path))["events"]
    assert (event["status"], event["delivered_wh"]) == ("closed_after_restart", 210.0)
    assert any("meter gap of 60.0 Wh" in note for note in event["notes"]), event["notes"]
    assert event["credited_wh"] == 160.0  # the gap's 40 Wh outage (and 10 Wh reported in it) never credited
    assert verify(tmp_path / "s.json", path) == 0


def test_a_run_that_outlived_its_pruned_start_keeps_its_floor_and_the_request_it_served(tmp_path):
    """A gateway that runs for longer than `retain_days` outlives its `CoreStart`: the statement of a month after
    the pruning read the run's steps with no policy and no owner settings, so every event showed no floor ("—"),
    and with no `ServingChanged` left, nothing served until the next change. The rotation notes the run as it
    stands (its policy, owner settings and the request served) in the next segment's start."""
    from firmware_py.core.policy import Policy
    from firmware_py.journal.chain import Chain
    from firmware_py.statements.reading import HeadBound, ServedRequests

    path = tmp_path / "journal.sqlite"
    pruned_while_open(path, policy=Policy(usable_capacity_wh=60_000.0, soc_margin_pct=3.0), noted=True)
    (event,) = make(path, tmp_path / "s.json", "--event", "peak", config=program_config(tmp_path, path))["events"]
    assert event["floor_pct"] == 43.0  # the owner's 40 % reserve and the run's own 3 % margin
    chain = Chain(path)
    served = ServedRequests(HeadBound(chain, chain.check().head_seq))
    assert served.at(1_050.0) == "peak" and served.journaled
    assert verify(tmp_path / "s.json", path) == 0


def test_events_carried_together_past_a_pruned_rotation_each_bill_their_own_restart_gap(tmp_path):
    """Records carried by one rotation share the segment start's seq: each event's energy records are its own
    summary's, so the gap goes to the event reported last and the other closes at its own last report."""
    path = tmp_path / "journal.sqlite"
    pruned_while_open(path, also_open=True)
    statement = make(path, tmp_path / "s.json", config=program_config(tmp_path, path))
    lines = {e["id"]: e for e in statement["events"]}
    assert lines["peak"]["delivered_wh"] == 210.0 and lines["early"]["delivered_wh"] == 20.0
    assert any("meter gap of 60.0 Wh" in note for note in lines["peak"]["notes"]), lines["peak"]["notes"]
    assert any("no meter gap billed" in note for note in lines["early"]["notes"]), lines["early"]["notes"]
    assert (lines["peak"]["credited_wh"], lines["early"]["credited_wh"]) == (160.0, 20.0)
    assert verify(tmp_path / "s.json", path) == 0


def test_an_events_throughput_is_priced_with_its_own_runs_capacity_not_a_later_runs(tmp_path):
    """The installer re-rates the pack (a later core start with another usable capacity): an earlier
    event's throughput, cycles and wear must not change with it, or the same month's statement made
    before and after disagree although the event's records are the same."""
    from firmware_py.core.policy import Policy
    from firmware_py.core.types import BmsSnapshot, InverterStatus, OwnerSettings
    from firmware_py.journal.steps import START_KIND, STEPS_KIND, encode_batch, start_payload

    path, day = tmp_path / "journal.sqlite", 86_400.0

    def start(capacity_wh: float, at: float) -> None:
        with Journal.open(path) as j:
            j.append(START_KIND, at, start_payload(Policy(usable_capacity_wh=capacity_wh), OwnerSettings(40, 0.0),
                                                   at), wall=at)

    start(100_000.0, 0.0)
    with Journal.open(path) as j:  # the event takes the 100 kWh pack from 80 % to 70 %
        j.append_event(DispatchRequest("A", "openadr", DispatchKind.DISCHARGE, 10_000, 0.0, 3_600.0,
                                       received_at=0.0), wall=0.0)
        j.append_event(DispatchAnswer.accepted("A", 0.0), wall=0.0)
        steps = [(float(t), (BmsSnapshot(float(t), soc_min_pct=80.0 - 10.0 * t / 3_600),
                             InverterStatus(float(t), measured_w=10_000.0, tot_wh_inj=10_000.0 * t / 3_600)))
                 for t in range(0, 3_601, 60)]
        j.append(STEPS_KIND, 3_600.0, encode_batch(steps), wall=3_600.0)
        j.append_event(DispatchEnded(3_600.0, "A", "window over"), wall=3_600.0)
        j.append_event(EventEnergy(3_600.0, "A", 10_000.0, 10_000.0, True), wall=3_600.0)
    (before,) = make(path, tmp_path / "before.json", "--month", "1970-01")["events"]
    start(60_000.0, 5 * day)
    after = make(path, tmp_path / "after.json", "--month", "1970-01")
    assert before["throughput_wh"] == 10_000.0 and before["equivalent_cycles"] == 0.1
    assert after["events"][0] == before
    assert after["gateway"]["usable_capacity_wh"] == 60_000.0  # the header still names the newest


def test_a_commissioning_test_discharge_is_listed_with_its_energy_and_never_credited():
    from firmware_py.commissioning.probes import SOURCE

    samples = [Sample(float(i), 80.0 - i * 0.01, 500.0, 1_000.0 + i, 42.0, False) for i in range(11)]
    ledger = Ledger(Period(0, 1e9), {"commission-1": Tally(0.0, 10.0), "peak-1": Tally(0.0, 10.0)})
    for sample in samples:
        ledger.feed(sample)
    terms = ProgramTerms("p", "USD", 0.5, 0.0)

    def line(request_id: str, source: str) -> dict:
        summary = EventSummary(request_id, source, "discharge", 500, 0, 0.0, 0.0, 10.0, "accepted", ended_at=10.0,
                               ended_reason="window closed", meter_wh=10.0, integrated_wh=10.0)
        return event_figures(summary, ledger.tallies[request_id], terms, 10_000, EnergyRecords())

    test, grid = line("commission-1", SOURCE), line("peak-1", "openadr3")
    assert test["delivered_wh"] == grid["delivered_wh"] == 10.0
    assert (test["credited_wh"], test["credit"]) == (0, 0) and grid["credit"] == 0.01
    assert any("commissioning test" in note for note in test["notes"])


@pytest.mark.slow
def test_energy_served_in_a_grid_outage_is_on_its_own_line_and_never_credited(tmp_path):
    loaded = scaled(scenario.load(scenario.bundled("grid-outage.toml")), 1 / 16)
    journal = tmp_path / "j.sqlite"
    outcome = asyncio.run(Simulation(loaded, SimulationOptions(journal_path=journal)).run())
    statement = make(journal, tmp_path / "s.json")
    assert statement["outage_backup_wh"] == pytest.approx(outcome.summary["inverter_meter_wh"], rel=0.02)
    assert statement["totals"]["credited_wh"] == 0 and statement["totals"]["credit"] == 0
    assert all(e["credited_wh"] == 0 for e in statement["events"])
    assert verify(tmp_path / "s.json", journal) == 0


def test_an_event_running_into_an_outage_is_credited_only_what_it_delivered_with_the_grid_up(tmp_path):
    """The outage's backup energy is the house's, never the aggregator's: an accepted event that runs
    into an outage and on after it is credited what it delivered with the grid up, all of it (the core
    never bills it the outage's intervals, so nothing is taken off twice)."""
    path = tmp_path / "into-outage.toml"
    path.write_text("""
[run]
duration_s = 130
[inverter]
enter_service_delay_s = 0
enter_service_ramp_s = 0
[[dispatch]]
at_s = 5
id = "peak"
start_s = 10
duration_s = 110
target_w = 5000
[[fault]]
at_s = 50
kind = "grid_outage"
duration_s = 30
[expect]
answers = { "peak" = "accepted" }
""")
    journal = tmp_path / "j.sqlite"
    outcome = asyncio.run(Simulation(scenario.load(path), SimulationOptions(journal_path=journal)).run())
    assert all(ok for _, ok, _ in outcome.checks), outcome.checks
    (event,) = make(journal, tmp_path / "s.json")["events"]
    assert event["answer"] == "accepted" and event["outage_wh"] > 10 and event["delivered_wh"] > event["outage_wh"]
    grid_up_s = (50 - 10) + (120 - 80)  # 5 kW but for the ramps and at most a poll either side of the outage
    assert 5_000 * (grid_up_s - 8) / 3600 < event["delivered_wh"] <= 5_000 * grid_up_s / 3600
    assert event["credited_wh"] == event["delivered_wh"]
    assert any("grid outage (backup)" in note for note in event["notes"])
    assert verify(tmp_path / "s.json", journal) == 0


def overlapping_events(tmp_path: Path, *, short_s: int, short_w: int, also: str = "") -> Path:
    """A bench scenario on a 2 kWh pack: a 4 kW event from 10 s to 130 s and a `short_w` one from 50 s for
    `short_s` inside it (accepted after it, so served while in force), with `also` (faults, checks) added."""
    path = tmp_path / "overlap.toml"
    path.write_text(f"""
[run]
duration_s = 140
[vehicle]
usable_capacity_wh = 2000
[inverter]
enter_service_delay_s = 0
enter_service_ramp_s = 0
[[dispatch]]
at_s = 5
id = "long"
start_s = 10
duration_s = 120
target_w = 4000
[[dispatch]]
at_s = 20
id = "short"
start_s = 50
duration_s = {short_s}
target_w = {short_w}
{also}""")
    return path


def test_overlapping_events_are_each_charged_only_the_wear_and_peak_of_the_time_they_were_served(tmp_path):
    """A newer event in force inside an older one's window: the battery worked for one at a time, so the
    older is charged no throughput, wear or peak power for the newer one's minutes, and the two lines'
    throughput adds up to the pack's drop, not more (each was once charged the whole drop of its window)."""
    path = overlapping_events(tmp_path, short_s=30, short_w=9000, also="""
[expect]
answers = { "long" = "accepted", "short" = "accepted" }
""")
    journal = tmp_path / "j.sqlite"
    outcome = asyncio.run(Simulation(scenario.load(path), SimulationOptions(journal_path=journal)).run())
    assert all(ok for _, ok, _ in outcome.checks), outcome.checks
    lines = {e["id"]: e for e in make(journal, tmp_path / "s.json", config=program_config(tmp_path, journal))["events"]}
    long, short = lines["long"], lines["short"]
    assert 3_800 < long["peak_w"] <= 4_100 and short["peak_w"] > 8_500  # the long one never ran at 9 kW
    pack_drop_wh = (long["soc_start_pct"] - long["soc_end_pct"]) / 100 * 2000  # the long window holds both
    assert long["throughput_wh"] + short["throughput_wh"] == pytest.approx(pack_drop_wh, abs=6)
    for line in (long, short):  # each event's wear follows its own energy: the pack's losses, nothing more
        assert line["delivered_wh"] < line["throughput_wh"] < 1.15 * line["delivered_wh"] + 5, line
        assert line["wear_cost"] == pytest.approx(line["throughput_wh"] / 1000 * 0.05, abs=0.006)
    assert verify(tmp_path / "s.json", journal) == 0


# ---------------------------------------------------------------- earnings while the gateway runs

JUNE_30 = datetime(2025, 6, 30, 20, 0, tzinfo=UTC).timestamp()


def june_event(path: Path) -> None:
    """A journal with one served event on the evening of 30 June 2025 (150 Wh on the meter)."""
    with Journal.open(path) as journal:
        journal.append_event(DispatchRequest("june", "openadr", DispatchKind.DISCHARGE, 3_000, 5.0, 65.0,
                                             received_at=5.0), wall=JUNE_30 + 5)
        journal.append_event(DispatchAnswer.accepted("june", 5.0), wall=JUNE_30 + 5)
        journal.append_event(EventEnergy(65.0, "june", 150.0, 149.0, True, meter_total_wh=1_150.0), wall=JUNE_30 + 65)
        journal.append_event(DispatchEnded(65.0, "june", "window closed"), wall=JUNE_30 + 65)


def test_the_earnings_book_reads_the_journal_only_when_event_records_came_and_at_most_every_refresh(tmp_path,
                                                                                                  caplog):
    path = tmp_path / "journal.sqlite"
    june_event(path)
    mono, wall = [0.0], [JUNE_30 + 3_600]
    reads: list[str] = []

    def counted(journal: Path, basis: Basis, period: Period, at: float):
        reads.append(datetime.fromtimestamp(period.start, UTC).strftime("%Y-%m"))
        return month_earnings(journal, basis, period, at)

    book = EarningsBook(path, Basis(ProgramTerms("Peak Rewards", "USD", 1.0, 0.0), {"name": "truck-1"}),
                        Clocks(lambda: mono[0], lambda: wall[0]), refresh_s=60.0, compute=counted)

    async def main() -> None:
        assert book.latest() is None and book.due()
        await book.refresh()
        latest = book.latest()
        assert latest["month"] == "2025-06" and latest["credit"] == 0.15 and latest["events_served"] == 1
        await book.refresh()
        book.journaled(0, steps=True)  # steps alone, long after the last event record: nothing to read again
        mono[0] += 600
        await book.refresh()
        assert reads == ["2025-06"]
        book.journaled(2)  # an event settled (its end, its final energy): read again
        await book.refresh()
        book.journaled(0, steps=True)  # the steps' batch after them (its SoC and power): once more, but
        assert not book.due()  # not before `refresh_s` has passed since the last read
        mono[0] += 60
        await book.refresh()
        book.journaled(0, steps=True)
        mono[0] += 60
        await book.refresh()
        assert reads == ["2025-06"] * 3

        wall[0] = JUNE_30 + 8 * 3_600  # 1 July, 04:00 UTC: a new month, whose history still shows 30 June
        await book.refresh(since_wall=wall[0] - 24 * 3_600)
        assert reads[3:] == ["2025-06", "2025-07"]
        assert book.latest()["month"] == "2025-07" and book.latest()["events"] == 0
        currency, figures = book.figures(wall[0] - 24 * 3_600)
        assert currency == "USD" and figures["june"]["credit"] == 0.15 and figures["june"]["status"] == "ended"
        assert book.figures(wall[0] - 3_600)[1] == {}  # the last hour: July only

        path.unlink()  # a journal that cannot be read: said once, the last figures kept
        book.journaled(1)
        for _ in range(2):
            mono[0] += 60
            await book.refresh()
        assert book.latest()["month"] == "2025-07"

    with caplog.at_level(logging.WARNING):
        asyncio.run(main())
    assert len([r for r in caplog.records if "earnings" in r.getMessage()]) == 1


# ---------------------------------------------------------------- time no request was served: not the event's own


OUTAGE_IN_WINDOW = """
[run]
duration_s = 200
start_hour = 19.0
[vehicle]
usable_capacity_wh = 2000
[inverter]
enter_service_delay_s = 0
enter_service_ramp_s = 0
[[dispatch]]
at_s = 5
id = "peak"
start_s = 10
duration_s = 180
target_w = 1500
[[fault]]
at_s = 60
kind = "grid_outage"
duration_s = 60
"""


def test_a_grid_outage_inside_an_events_window_is_not_charged_to_its_throughput_wear_or_peak(tmp_path):
    """A 1.5 kW event with a minute's grid outage in its window (the house draws ~3 kW and more at 19:00): the
    backup energy is the house's. It was once charged to the event's throughput and wear (108 Wh for 48 Wh
    delivered) and its peak_w showed the house's load (5.5 kW), because time no request was served counted
    as the event's own."""
    path = tmp_path / "outage.toml"
    path.write_text(OUTAGE_IN_WINDOW)
    journal = tmp_path / "j.sqlite"
    asyncio.run(Simulation(scenario.load(path), SimulationOptions(journal_path=journal)).run())
    (event,) = make(journal, tmp_path / "s.json", config=program_config(tmp_path, journal))["events"]
    assert event["outage_wh"] > 20 and event["credited_wh"] == event["delivered_wh"] > 20
    assert event["peak_w"] <= 1.05 * event["target_w"], event
    assert event["throughput_wh"] < 1.15 * event["delivered_wh"] + 5, event
    assert verify(tmp_path / "s.json", journal) == 0


def test_overlapping_events_with_an_outage_in_both_windows_are_charged_no_more_than_they_delivered(tmp_path):
    """The outage's drop went to neither event: once it went to both, and the lines' throughput summed past
    the pack's whole drop over the windows."""
    path = overlapping_events(tmp_path, short_s=50, short_w=4000, also="""
[[fault]]
at_s = 60
kind = "grid_outage"
duration_s = 30
""")
    journal = tmp_path / "j.sqlite"
    asyncio.run(Simulation(scenario.load(path), SimulationOptions(journal_path=journal)).run())
    statement = make(journal, tmp_path / "s.json", config=program_config(tmp_path, journal))
    lines = {e["id"]: e for e in statement["events"]}
    long, short = lines["long"], lines["short"]
    pack_drop_wh = (long["soc_start_pct"] - long["soc_end_pct"]) / 100 * 2000
    assert long["throughput_wh"] + short["throughput_wh"] < pack_drop_wh - 0.5 * statement["outage_backup_wh"]
    for line in (long, short):
        assert line["throughput_wh"] < 1.15 * line["delivered_wh"] + 5, line
    assert verify(tmp_path / "s.json", journal) == 0


class _Plant:
    """A real Gateway with a SQLite journal, a pack that follows its setpoint and a meter that counts it."""

    def __init__(self, path: Path, capacity_wh: float = 10_000.0, soc: float = 80.0):
        from dataclasses import replace

        from firmware_py.assembly import assemble
        from firmware_py.config import Config
        from firmware_py.core.types import OwnerSettings

        base = Config()
        config = replace(base, can=replace(base.can, interface="virtual", channel=f"plant-{path}"),
                         journal=replace(base.journal, path=str(path), busy_timeout_s=0.05),
                         vehicle=replace(base.vehicle, usable_capacity_wh=capacity_wh))
        self.t, self.capacity_wh, self.soc, self.meter, self.absorbed = 0.0, capacity_wh, soc, 1_000.0, 500.0
        self.grid_outage = False
        self.assembly = assemble(config, lambda: self.t, owner=OwnerSettings(20, 0.0))
        self.gateway = self.assembly.gateway

    def step(self, *extra, dt: float = 0.5) -> None:
        from core_builders import bms, inverter

        self.t += dt
        watts = self.gateway.command.setpoint_w
        if watts > 0:
            self.meter += watts * dt / 3600
        else:
            self.absorbed -= watts * dt / 3600
        self.soc -= watts * dt / 3600 / self.capacity_wh * 100
        self.gateway.feed(bms(self.t, soc=self.soc),
                          inverter(self.t, measured_w=watts, tot_wh_inj=self.meter, tot_wh_abs=self.absorbed,
                                   grid_outage=self.grid_outage), *extra)

    def run_until(self, t: float) -> None:
        while self.t < t:
            self.step()

    def stop(self) -> None:
        self.gateway.flush_journal(final=True)
        self.gateway.close_open_events(self.meter, "gateway stopped: event ended")
        self.assembly.close()


def test_a_killed_runs_event_is_not_given_the_next_runs_first_step_as_its_own(tmp_path):
    """`kill -9` mid-event before the run journaled its batch of steps: the restarted run's first step comes
    just before it closes the event, so it fell in the window and counted as the event's. The line showed
    that run's SoC as start and end, 0 Wh of throughput and wear as if measured, and no note."""
    from firmware_py.journal.steps import StepRecorder

    path = tmp_path / "journal.sqlite"
    killed = _Plant(path)
    killed.run_until(2)
    killed.step(DispatchRequest("ev", "test", DispatchKind.DISCHARGE, 5_000, 3.0, 7_200.0, received_at=killed.t))
    killed.run_until(60)
    killed.gateway.flush_journal()  # its records, not its batch of steps, which dies with the process
    killed.gateway.steps = StepRecorder()
    killed.assembly.close()
    restarted = _Plant(path, soc=killed.soc)
    restarted.t, restarted.meter = killed.t + 5, killed.meter + 20
    restarted.step()
    restarted.gateway.flush_journal(final=True)
    assert restarted.gateway.close_open_events(restarted.meter, "gateway restarted: event ended") == ["ev"]
    restarted.stop()
    (event,) = make(path, tmp_path / "s.json")["events"]
    assert event["status"] == "closed_after_restart" and event["delivered_wh"] > 20
    assert (event["peak_w"], event["soc_start_pct"], event["soc_end_pct"], event["soc_min_pct"]) == (None,) * 4
    assert event["throughput_wh"] == 0.0 and any("no core step of this window" in n for n in event["notes"])
    assert verify(tmp_path / "s.json", path) == 0


def test_a_storm_watch_charge_inside_an_events_window_leaves_the_events_wear_its_own(tmp_path):
    """An event discharges, the owner sets a storm watch (floor 90 %) inside its window: the gateway charges
    the truck serving no request, then the event resumes. The charge is nobody's event: it was once netted
    against the event's SoC drop, and the event was charged no throughput or wear (0 Wh for 1.6 kWh out)."""
    from firmware_py.core.types import OwnerSettings

    path = tmp_path / "journal.sqlite"
    plant = _Plant(path)
    plant.run_until(2)
    plant.step(DispatchRequest("ev", "test", DispatchKind.DISCHARGE, 5_000, 10.0, 2_400.0, received_at=plant.t))
    plant.run_until(600)
    plant.step(OwnerSettings(20, plant.t, storm_watch_floor_pct=90.0, storm_watch_until=plant.t + 1_200))
    modes = set()
    while plant.t < 1_800:
        plant.step()
        modes.add(plant.gateway.controller.mode)
    assert {Mode.CHARGE, Mode.DISCHARGE} <= modes and plant.soc > 85  # it charged, then discharged again
    plant.run_until(2_400)
    plant.stop()
    (event,) = make(path, tmp_path / "s.json", config=program_config(tmp_path, path))["events"]
    assert event["soc_end_pct"] > event["soc_start_pct"]  # the window's own figures: the charge is in them
    assert event["delivered_wh"] > 1_000
    assert event["delivered_wh"] * 0.98 < event["throughput_wh"] < 1.15 * event["delivered_wh"] + 5, event
    assert event["wear_cost"] > 0
    assert event["wear_cost"] == pytest.approx(event["throughput_wh"] / 1000 * 0.05, abs=0.006)
    assert verify(tmp_path / "s.json", path) == 0


def test_a_journal_without_serving_records_keeps_the_whole_window_rule():
    """An older release journaled no `ServingChanged`: its time served by none stays the event's, so a
    statement made from its journal keeps the figures it was signed with."""
    def drop(journaled: bool) -> tuple[float, float | None]:
        tally = Tally(0.0, 10.0, request_id="peak")
        previous = None
        for i in range(11):
            serving = "peak" if i < 5 else None  # served, then nothing (an outage, a storm watch)
            sample = Sample(float(i), 80.0 - i, 1_000.0 * (1 + (i > 5)), None, None, False, None, serving, journaled)
            tally.add(sample, previous)
            previous = sample
        return tally.drop_pct, tally.peak_w

    assert drop(False) == (10.0, 2_000.0)  # today's rule for an old journal: the whole window
    assert drop(True) == (5.0, 1_000.0)  # a journal that says what was served: only the event's own time


def test_a_revision_that_moves_a_served_events_start_to_now_keeps_its_window_from_when_it_began(tmp_path):
    """The aggregator extends a running event as a new interval (revision 2: start now, end later). The event
    was served from its first start: its window, SoC start, throughput and average power count from there.
    The revision's start once became the window's start: 667 of 1491 Wh of throughput and an average of
    6.7 kW for a 3 kW event."""
    path = tmp_path / "journal.sqlite"
    plant = _Plant(path)
    plant.run_until(2)
    plant.step(DispatchRequest("ev", "test", DispatchKind.DISCHARGE, 3_000, 10.0, 1_210.0, received_at=plant.t))
    plant.run_until(1_000)
    plant.step(DispatchRequest("ev", "test", DispatchKind.DISCHARGE, 3_000, 1_000.0, 1_800.0, received_at=plant.t,
                               revision=2))
    plant.run_until(1_900)
    plant.stop()
    (event,) = make(path, tmp_path / "s.json", config=program_config(tmp_path, path))["events"]
    (summary,) = event_summaries(Chain(path))  # what `report` shows too, and the records its timeline holds
    assert summary.start == 10.0 and summary.end == 1_800.0 and summary.revision == 2
    assert summary.timeline[0].at < 1_000.0
    assert event["window"]["from"] == "1970-01-01T00:00:10Z", event["window"]
    assert event["soc_start_pct"] == 80.0
    pack_drop_wh = (80.0 - plant.soc) / 100 * plant.capacity_wh
    assert event["throughput_wh"] == pytest.approx(pack_drop_wh, abs=5)
    assert 2_900 < event["avg_w"] <= 3_050
    assert verify(tmp_path / "s.json", path) == 0


def test_an_event_ended_by_an_opt_out_and_served_again_keeps_its_window_from_when_it_began(tmp_path):
    """The owner opts out mid-event (its account closes, final energy) and back in; the aggregator's standing
    setting is asked again as the next revision and served. Within one run the account carries its energy on,
    so its window does too: the statement once credited the whole energy over the second stretch alone, an
    average of 5.4 kW for a 3 kW event, the first stretch's SoC drop and wear outside it."""
    from firmware_py.core.types import OwnerSettings

    path = tmp_path / "journal.sqlite"
    plant = _Plant(path)
    plant.run_until(2)
    plant.step(DispatchRequest("ev", "test", DispatchKind.DISCHARGE, 3_000, 10.0, 1_210.0, received_at=plant.t))
    plant.run_until(600)
    plant.step(OwnerSettings(20, plant.t, opt_out_until=math.inf))
    plant.run_until(700)
    plant.step(OwnerSettings(20, plant.t))
    plant.step(DispatchRequest("ev", "test", DispatchKind.DISCHARGE, 3_000, plant.t, 1_210.0, received_at=plant.t,
                               revision=1))  # as the DER server asks a standing setting again: from now
    plant.run_until(1_300)
    plant.stop()
    (event,) = make(path, tmp_path / "s.json", config=program_config(tmp_path, path))["events"]
    assert event["window"]["from"] == "1970-01-01T00:00:10Z", event["window"]
    assert event["soc_start_pct"] == 80.0
    assert 1_000 * 0.9 * 3 * (1_100 / 3_600) < event["delivered_wh"]  # both stretches: about 1,000 s at 3 kW
    pack_drop_wh = (80.0 - plant.soc) / 100 * plant.capacity_wh
    assert event["throughput_wh"] == pytest.approx(pack_drop_wh, abs=5)
    assert event["avg_w"] <= 3_050
    assert verify(tmp_path / "s.json", path) == 0


# ---------------------------------------------------------------- malformed figures and journals


def resigned(statement: dict, path: Path, **changes) -> tuple[Path, list[str]]:
    """`statement` with `changes` (dotted names), signed by a key of the test's own: the file and the
    option that pins that key, so verification checks the figures, not whose key it is."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from firmware_py import signing

    body = json.loads(json.dumps({k: v for k, v in statement.items() if k not in ("signature", "public_key")}))
    for name, value in changes.items():
        *parents, last = name.split("__")
        target = body
        for parent in parents:
            target = target[parent]
        target[last] = value
    key = Ed25519PrivateKey.generate()
    path.write_text(json.dumps(evidence.sign(body, key)))
    return path, ["--public-key", signing.public_hex(key)]


def test_a_price_no_amount_can_hold_is_bad_input_naming_the_event_and_live_earnings_carry_on(tmp_path, capsys,
                                                                                              caplog):
    """A journal holding a price of 1e27 per kWh as accepted (an older release took any finite price): its
    credit cannot be stated to the cent. Once a decimal.InvalidOperation traceback, and the live earnings
    (status, web, MQTT) broke with it."""
    from firmware_py.core.types import PriceInterval, PriceKind

    path = tmp_path / "journal.sqlite"
    price = PriceInterval("evt/1/EXPORT_PRICE", "openadr3", "prog", PriceKind.EXPORT_PRICE, 1e27, 10.0, 3_610.0,
                          5.0)
    with Journal.open(path) as journal:
        journal.append_event(price, wall=JUNE_30 + 5)
        journal.append_event(DispatchAnswer.accepted(price.id, 10.0), wall=JUNE_30 + 10)
        journal.append_event(EventEnergy(3_610.0, price.id, 1_000.0, 1_000.0, True), wall=JUNE_30 + 3_610)
        journal.append_event(DispatchEnded(3_610.0, price.id, "window over"), wall=JUNE_30 + 3_610)
    assert main(["statement", "--journal", str(path)]) == 2
    err = capsys.readouterr().err
    assert "event 'evt/1/EXPORT_PRICE': its credit at 1e+27 per kWh" in err and "Traceback" not in err

    book = EarningsBook(path, Basis(ProgramTerms(), {"name": None}), Clocks(lambda: 0.0, lambda: JUNE_30 + 7_200))
    with caplog.at_level(logging.WARNING):
        asyncio.run(book.refresh())
    assert book.latest() is None and "evt/1/EXPORT_PRICE" in caplog.text


def test_a_statement_at_a_rate_no_amount_can_hold_fails_with_a_message_not_a_traceback(crashed, tmp_path, capsys):
    statement = make(crashed, tmp_path / "s.json", "--event", "peak")
    path, pinned = resigned(statement, tmp_path / "absurd.json", program__credit_per_kwh=1e308)
    assert main(["statement", "verify", str(path), "--journal", str(crashed), *pinned]) == 2
    err = capsys.readouterr().err
    assert "event 'peak': its credit at 1e+308 per kWh" in err and "Traceback" not in err


def test_an_event_statement_checked_against_another_journal_names_the_journal_not_an_option(
        bench, crashed, tmp_path, capsys):
    """The other journal holds more records and not the event: a failed check (exit 1) naming the changed head
    and the missing event. It was once bad input (exit 2) about an --event option nobody gave."""
    statement = make(crashed, tmp_path / "s.json", "--event", "peak")
    other, _ = bench
    pinned = ["--public-key", statement["public_key"]]
    assert main(["statement", "verify", str(tmp_path / "s.json"), "--journal", str(other), *pinned]) == 1
    err = capsys.readouterr().err
    assert "journal_head: record" in err and "events: the journal holds no event 'peak'" in err
    assert "--event" not in err


def test_a_statement_period_a_time_zone_moves_out_of_the_calendar_is_bad_input_not_a_damaged_journal(
        crashed, tmp_path, capsys):
    statement = make(crashed, tmp_path / "s.json")
    path, pinned = resigned(statement, tmp_path / "period.json", period__to="0001-01-01T00:00:00+14:00")
    assert main(["statement", "verify", str(path), "--journal", str(crashed), *pinned]) == 2
    err = capsys.readouterr().err
    assert "period.to: '0001-01-01T00:00:00+14:00' is outside the years 1 to 9999 in UTC" in err
    assert "journal:" not in err


def test_no_meter_change_is_read_across_a_journal_gap_and_the_event_and_period_say_there_is_one(tmp_path):
    """The journal failed for long while an event ran: past their bound, core steps were dropped and a
    JournalGap counts them. The meter moved 5 kWh over the hole, and the grid failed just as the journal
    worked again: the statement once read the whole 5 kWh as the outage's (the first step after the gap
    was in BACKUP). Over a gap nobody knows when the meter moved or whether the grid was up."""
    from test_gateway import another_writer

    from firmware_py.journal import RecordKind
    from firmware_py.journal.steps import StepRecorder

    path = tmp_path / "journal.sqlite"
    plant = _Plant(path)
    plant.gateway.steps = StepRecorder(batch_steps=5)
    plant.gateway.backlog.bounds = {RecordKind.CORE_STEPS: 3, RecordKind.SAMPLE: 2}
    plant.run_until(2)
    plant.step(DispatchRequest("ev", "test", DispatchKind.DISCHARGE, 5_000, 10.0, 7_200.0, received_at=plant.t))
    while plant.t < 600:
        plant.step()
        plant.gateway.flush_journal()
    with another_writer(path):
        for n in range(200):
            plant.meter += 5_000 / 170 if 20 <= n < 190 else 0.0  # 5 kWh, grid up, in steps not kept
            plant.grid_outage = n >= 190  # the grid fails as the journal is about to work again
            plant.step()
            if n % 10 == 0:
                plant.gateway.flush_journal()
    while plant.t < 710:
        plant.step()
        plant.gateway.flush_journal()
    plant.stop()
    with Journal.open(path, readonly=True) as journal:
        assert [r for r in journal.records() if r.kind == RecordKind.JOURNAL_GAP]
    statement = make(path, tmp_path / "s.json")
    (event,) = statement["events"]
    assert event["delivered_wh"] > 100 and event["credited_wh"] == event["delivered_wh"]
    assert 0 < event["outage_wh"] == statement["outage_backup_wh"] < 100, statement  # the kept BACKUP steps' own
    assert any("JournalGap" in note for note in event["notes"]) and "JournalGap" in statement["notes"][0]
    assert verify(tmp_path / "s.json", path) == 0


def test_an_event_statement_whose_end_is_printed_rounded_counts_a_backup_sample_at_that_end_alike_made_and_checked(
        tmp_path):
    """--event makes the event's exact window the period; the statement prints it to the microsecond and
    verify reads that back. With a wall offset that rounds the end up, a backup sample at the event's end
    was left out when made (at < end) and counted when checked (at < end as printed): an intact pair failed
    (outage_backup_wh 150.0 against 180.0). Both now compute with the period as printed."""
    from firmware_py.core.policy import Policy
    from firmware_py.core.types import BmsSnapshot, InverterStatus, OwnerSettings, Transition
    from firmware_py.journal.steps import START_KIND, STEPS_KIND, encode_batch, start_payload
    from firmware_py.statements.document import parse_iso
    from firmware_py.statements.figures import iso

    base = datetime(2025, 12, 5, 2, 0, tzinfo=UTC).timestamp()
    offsets = (base + k * 1.37e-7 + 0.1234 for k in range(1, 2_000))
    off = next(o for o in offsets if 100 + o <= 100 + ((120 + o) - 120) < parse_iso(iso(100 + o), "x"))
    path = tmp_path / "journal.sqlite"
    with Journal.open(path) as j:
        j.append(START_KIND, 0.0, start_payload(Policy(), OwnerSettings(20, 0.0), 0.0), wall=off)
        j.append_event(DispatchRequest("peak", "openadr", DispatchKind.DISCHARGE, 3_000, 10.0, 100.0, received_at=5.0),
                       wall=5 + off)
        j.append_event(DispatchAnswer.accepted("peak", 5.0), wall=5 + off)
        j.append_event(Transition(10.0, Mode.STANDBY, Mode.DISCHARGE, "dispatch peak"), wall=10 + off)
        j.append_event(Transition(50.0, Mode.DISCHARGE, Mode.BACKUP, "grid outage"), wall=50 + off)
        j.append_event(DispatchEnded(100.0, "peak", "ended: window over"), wall=100 + off)
        j.append_event(EventEnergy(100.0, "peak", 120.0, 120.0, True, meter_total_wh=1_120.0), wall=100 + off)
        steps = [(float(t), (BmsSnapshot(float(t), soc_min_pct=80.0 - t / 100),
                             InverterStatus(float(t), measured_w=3_000.0, grid_outage=t >= 50, grid_connected=t < 50,
                                            tot_wh_inj=1_000.0 + 30 * (t // 10))))
                 for t in range(0, 130, 10)]
        j.append(STEPS_KIND, 120.0, encode_batch(steps), wall=120 + off)
    statement = make(path, tmp_path / "s.json", "--event", "peak")
    assert parse_iso(statement["period"]["to"], "to") > 100 + off  # the offset does round the end up
    assert statement["outage_backup_wh"] == statement["totals"]["outage_backup_wh"] == 180.0
    assert verify(tmp_path / "s.json", path) == 0


@pytest.mark.parametrize("capacity", [0, 0.0, -1_000.0, math.nan, math.inf, -math.inf, "abc", "0", 10 ** 400, True,
                                      None, [], "missing"])
def test_a_statement_edited_to_a_capacity_that_is_none_is_bad_input_naming_it_not_a_traceback(
        capacity, tmp_path, capsys):
    """Against a journal without a core start, the statement's gateway.usable_capacity_wh is what throughput
    and cycles are of: edited to 0 it was a ZeroDivisionError traceback (10**400: OverflowError; -1000
    verified). Like any field the check cannot use (a rate no amount can hold, a period out of the
    calendar), it is bad input (exit 2) naming the field."""
    path = tmp_path / "journal.sqlite"
    open_peak(path)
    statement = make(path, tmp_path / "s.json")
    edited = json.loads(json.dumps(statement))  # the file as signed, its signature kept: edited in place
    if capacity == "missing":
        del edited["gateway"]["usable_capacity_wh"]
    else:
        edited["gateway"]["usable_capacity_wh"] = capacity
    (tmp_path / "edited.json").write_text(json.dumps(edited))  # NaN and Infinity as Python's json writes them
    pinned = ["--public-key", statement["public_key"]]
    assert main(["statement", "verify", str(tmp_path / "edited.json"), "--journal", str(path), *pinned]) == 2
    err = capsys.readouterr().err
    assert "usable_capacity_wh" in err and "Traceback" not in err
    fine, pinned = resigned(statement | {"gateway": {**statement["gateway"], "usable_capacity_wh": 50_000}},
                            tmp_path / "fine.json")
    assert main(["statement", "verify", str(fine), "--journal", str(path), *pinned]) == 0


def test_a_period_in_the_years_1_to_999_is_printed_with_a_four_digit_year_and_accepted(crashed, tmp_path):
    """`--month 0999-12` was refused naming `period.from`, a field the user never gave: the year printed unpadded."""
    assert iso(datetime(999, 12, 1, tzinfo=UTC).timestamp()) == "0999-12-01T00:00:00Z"
    assert iso(datetime(1, 1, 1, 0, 0, 1, tzinfo=UTC).timestamp()) == "0001-01-01T00:00:01Z"
    for option, start in ((["--month", "0999-12"], "0999-12-01T00:00:00Z"),
                          (["--from", "0500-01-01", "--to", "0500-01-02"], "0500-01-01T00:00:00Z")):
        out = tmp_path / "s.json"
        statement = make(crashed, out, *option)
        assert statement["period"]["from"] == start and statement["events"] == []
        assert verify(out, crashed) == 0


def test_a_statement_of_an_empty_journal_verifies(tmp_path):
    """A gateway's first month with no record yet: its statement named the genesis head, and verify said the
    journal was changed (record 0 "has hash None")."""
    journal = tmp_path / "journal.sqlite"
    Journal.open(journal).close()
    out = tmp_path / "s.json"
    statement = make(journal, out, "--month", "2026-11")
    assert statement["events"] == [] and statement["journal_seq"] == 0
    assert verify(out, journal) == 0
    # its sums are figures like any month's: the CSV's TOTAL row said 0 where event rows say 0.0
    assert all(isinstance(v, float) for k, v in statement["totals"].items() if k not in ("events", "events_served"))
    assert all(cell in ("", "0.0") for cell in render_csv(statement).splitlines()[1].split(",")[5:-1])


def test_a_duplicate_the_gateway_turned_away_changes_nothing_in_the_statement_the_report_or_the_summary(tmp_path, capsys):
    """docs/dispatch.md: a request answered DUPLICATE "changes nothing". A served grid event (3 kW, 200-260 s)
    is sent again by another source with other content (9 kW from 150 s to 600 s), and a served price
    (revision 2: 0.70) again at its stale revision 1 with another price and end; the core refuses both and
    runs on as before. The summary once took the duplicates' target, window, source and offered price as
    they were read, before their answers: the statement billed a 9 kW event from 150 s, and the report and
    the owner's earnings said so too."""
    from dataclasses import replace

    from firmware_py.core.types import PriceInterval, PriceKind
    from firmware_py.journal.kinds import RecordKind

    path = tmp_path / "journal.sqlite"
    plant = _Plant(path)
    plant.run_until(2)
    plant.step(replace(plant.gateway.owner_settings(), received_at=plant.t, price_threshold_per_kwh=0.3,
                       price_max_wh_per_day=100_000.0))
    price = PriceInterval("tou/high", "oadr3", "tou", PriceKind.EXPORT_PRICE, 0.55, 30.0, 120.0, received_at=0.0)
    grid = DispatchRequest("grid-1", "scenario", DispatchKind.DISCHARGE, 3_000, 200.0, 260.0, received_at=0.0)
    for at, item in ((20, price), (40, replace(price, price_per_kwh=0.70, revision=2)),
                     (60, replace(price, price_per_kwh=0.95, end=400.0, revision=1)),  # stale: DUPLICATE
                     (180, grid),
                     (190, replace(grid, source="other", target_w=9_000, start=150.0, end=600.0))):  # DUPLICATE
        plant.run_until(at)
        plant.step(replace(item, received_at=plant.t))
    plant.run_until(300)
    plant.stop()

    answers = [(r.payload["request_id"], r.payload["verdict"], r.payload.get("reason"))
               for r in Chain(path).iter_records({RecordKind.DISPATCH_ANSWER})]
    assert answers == [("tou/high", "accepted", None), ("tou/high", "accepted", None),
                       ("tou/high", "rejected", "DUPLICATE"), ("grid-1", "accepted", None),
                       ("grid-1", "rejected", "DUPLICATE")], answers
    summaries = {s.request_id: s for s in event_summaries(Chain(path))}
    g, p = summaries["grid-1"], summaries["tou/high"]
    assert (g.source, g.target_w, g.start, g.end, g.revision, g.verdict) == \
        ("scenario", 3_000, 200.0, 260.0, 0, "accepted")
    assert (p.source, p.start, p.end, p.revision, p.price_per_kwh, p.verdict) == \
        ("oadr3", 30.0, 120.0, 2, 0.70, "accepted")
    assert sum(e.kind == RecordKind.DISPATCH_REQUEST for e in g.timeline) == 2  # the duplicate is still told
    assert sum(e.kind == RecordKind.PRICE_INTERVAL for e in p.timeline) == 3

    events = {e["id"]: e for e in make(path, tmp_path / "s.json", config=program_config(tmp_path, path))["events"]}
    line = events["grid-1"]
    assert line["target_w"] == 3_000 and line["source"] == "scenario", line
    assert line["window"]["from"] == "1970-01-01T00:03:20Z" and line["window"]["to"] == "1970-01-01T00:04:20Z"
    assert 2_900 < line["avg_w"] <= 3_050
    priced = events["tou/high"]
    assert priced["source"] == "oadr3" and priced["window"]["to"] == "1970-01-01T00:02:00Z", priced
    assert priced["credit"] == round(priced["credited_wh"] / 1000 * 0.70, 2) > 0
    assert any("0.7 per kWh" in note for note in priced["notes"]), priced["notes"]
    assert verify(tmp_path / "s.json", path) == 0

    capsys.readouterr()
    assert main(["report", "--journal", str(path), "--format", "json"]) == 0
    reported = {e["request_id"]: e for e in json.loads(capsys.readouterr().out)["events"]}
    assert {k: reported["grid-1"][k] for k in ("source", "target_w", "start", "end", "revision")} == \
        {"source": "scenario", "target_w": 3_000, "start": 200.0, "end": 260.0, "revision": 0}
    assert {k: reported["tou/high"][k] for k in ("source", "end", "revision", "price_per_kwh")} == \
        {"source": "oadr3", "end": 120.0, "revision": 2, "price_per_kwh": 0.70}


def test_an_event_whose_core_steps_a_killed_run_never_journaled_has_no_peak_below_its_average(tmp_path, capsys):
    """`kill -9` mid-event: the run's batch of core steps dies with it, and its window holds none, while its
    energy reports stand. Its peak is not known (not 0 W beside a 4 kW average), and a note says why."""
    path = tmp_path / "journal.sqlite"
    with Journal.open(path) as journal:
        for item in (DispatchRequest("ev", "openadr3", DispatchKind.DISCHARGE, 5_000, 10.0, 22.0, received_at=8.0),
                     DispatchAnswer.accepted("ev", 8.0), EventEnergy(10.0, "ev", 0.0, 0.0, False),
                     DispatchEnded(22.0, "ev", "window closed"), EventEnergy(22.0, "ev", 14.0, 14.2, True)):
            journal.append_event(item)
    (event,) = make(path, tmp_path / "s.json", "--event", "ev")["events"]
    assert event["avg_w"] > 4_000 and event["peak_w"] is None and event["soc_start_pct"] is None
    assert any("no core step of this window" in note for note in event["notes"])
    assert verify(tmp_path / "s.json", path) == 0
    assert main(["statement", "--journal", str(path), "--event", "ev"]) == 0
    assert any(line.endswith(", peak -") for line in capsys.readouterr().out.splitlines())


@pytest.mark.parametrize("target", ["journal", "statement key", "anchors", "config"])
def test_out_naming_a_file_the_gateway_keeps_is_refused_and_the_file_kept(crashed, tmp_path, capsys, target):
    """`--out j.sqlite` (a tab too few) replaced the journal the statement proves with a CSV, exit 0;
    `--out j.sqlite.statement-key` replaced the key, so no later statement could be signed by it."""
    config = program_config(tmp_path, crashed)
    kept = {"journal": crashed, "statement key": statement_key_path(crashed),
            "anchors": crashed.with_name(crashed.name + ".anchors"), "config": config}[target]
    make(crashed, tmp_path / "first.json")  # the statement key made
    before = kept.read_bytes()
    capsys.readouterr()
    assert main(["statement", "--journal", str(crashed), "--config", str(config), "--format", "csv",
                 "--out", str(kept)]) == 2
    assert f"--out {kept}: is " in capsys.readouterr().err
    assert kept.read_bytes() == before


def test_a_request_that_came_after_its_window_began_counts_from_when_it_came(tmp_path):
    """A 5 kW request a late poll brought 6 minutes into its window, served 3: the statement's window began
    before the gateway heard of it, its average power a third of what was delivered, and an
    event coming just after midnight on the 1st fell in the month before (signed there after it was made)."""
    path = tmp_path / "late.toml"
    path.write_text('[run]\nduration_s = 540\n[vehicle]\ninitial_soc_pct = 80\n[owner]\nreserve_pct = 40\n'
                    '[[dispatch]]\nat_s = 360\nid = "late"\nstart_s = 0\nduration_s = 540\ntarget_w = 5000\n')
    journal = tmp_path / "j.sqlite"
    asyncio.run(Simulation(scenario.load(path), SimulationOptions(journal_path=journal)).run())
    (event,) = make(journal, tmp_path / "s.json")["events"]
    assert event["window"]["from"].startswith("1970-01-01T00:06:0")  # when it came, not 00:00
    assert event["avg_w"] == pytest.approx(5_000, rel=0.05)
    assert verify(tmp_path / "s.json", journal) == 0


def test_an_event_sent_again_after_a_killed_run_keeps_its_window_from_the_first_runs_start(tmp_path):
    """Run 1 serves 3 kW from 17:10 and is killed at 17:30; run 2 closes the event and the aggregator sends it
    again, served to 19:10. The credit adds both runs' energy, but the window, SoC start and throughput were
    run 2's alone (its core clock starts again at 0: its start compared below run 1's): an average above
    the peak, and the pack's wear of run 1's time left out while its energy was credited."""
    from firmware_py.core.energy import close_after_restart
    from firmware_py.core.policy import Policy
    from firmware_py.core.types import BmsSnapshot, InverterStatus, OwnerSettings, Transition
    from firmware_py.journal.steps import START_KIND, STEPS_KIND, encode_batch, start_payload

    path, t0, policy = tmp_path / "journal.sqlite", 1_762_794_000.0, Policy(usable_capacity_wh=50_000)

    def steps(first: float, n: int, soc: float, total_wh: float) -> bytes:
        return encode_batch([(first + 60 * i, (BmsSnapshot(first + 60 * i, soc_min_pct=soc - i * 0.1),
                                                InverterStatus(first + 60 * i, measured_w=3_000.0,
                                                               tot_wh_inj=total_wh + 50 * i))) for i in range(n)])

    def served(j: Journal, start: float, end: float, at: float, wall: float) -> None:
        j.append_event(DispatchRequest("peak", "openadr", DispatchKind.DISCHARGE, 3_000, start, end, received_at=at),
                       wall=wall)
        j.append_event(DispatchAnswer.accepted("peak", at), wall=wall)
        j.append_event(Transition(start, Mode.STANDBY, Mode.DISCHARGE, "dispatch peak"), wall=wall)

    with Journal.open(path, wall_clock=lambda: t0) as j:  # run 1: window 17:10 .. 19:10 on its core clock
        j.append(START_KIND, 0.0, start_payload(policy, OwnerSettings(20, 0.0), 0.0), wall=t0)
        served(j, 600.0, 7_800.0, 300.0, t0 + 300)
        j.append(STEPS_KIND, 1_800.0, steps(600.0, 21, 80.0, 10_000.0), wall=t0 + 1_800)
        j.append_event(EventEnergy(1_800.0, "peak", 1_000.0, 1_000.0, False, meter_total_wh=11_000.0), wall=t0 + 1_800)
    run2 = t0 + 2_400  # killed at 17:30; run 2 from 17:40, its core clock from 0
    with Journal.open(path, wall_clock=lambda: run2) as j:
        j.append(START_KIND, 0.0, start_payload(policy, OwnerSettings(20, 0.0), 0.0), wall=run2)
        for event in close_after_restart({"peak": EventEnergy(1_800.0, "peak", 1_000.0, 1_000.0, False,
                                                              meter_total_wh=11_000.0)}, 11_050.0, policy, 1.0,
                                         "gateway restarted"):
            j.append_event(event, wall=run2 + 1)
        served(j, 60.0, 5_400.0, 60.0, run2 + 60)  # sent again from now (17:41) to 19:10
        j.append(STEPS_KIND, 5_400.0, steps(60.0, 90, 77.5, 11_050.0), wall=run2 + 5_400)
        j.append_event(DispatchEnded(5_400.0, "peak", "window closed"), wall=run2 + 5_400)
        j.append_event(EventEnergy(5_400.0, "peak", 4_450.0, 4_450.0, True, meter_total_wh=15_500.0), wall=run2 + 5_400)

    (event,) = make(path, tmp_path / "s.json", "--event", "peak")["events"]
    assert event["delivered_wh"] == 5_500.0
    assert event["window"]["from"] == "2025-11-10T17:10:00Z" and event["soc_start_pct"] == 80.0
    assert event["avg_w"] <= event["peak_w"] and event["throughput_wh"] > 5_500.0
