"""The whole bench: every bundled scenario passes its own checks, and the default run's
journal, trace and plot say what the gateway really did."""

from __future__ import annotations

import asyncio
import json
import sqlite3

import pytest

from firmware_py.cli import main
from firmware_py.core import Controller
from firmware_py.core.replay import replay
from firmware_py.journal import Journal, codec, event_summaries
from firmware_py.journal.steps import decode_start, journaled_steps
from firmware_py.sim import scenario
from firmware_py.sim.simulation import Simulation, SimulationOptions

# The 4-hour peak events (the default and its OpenADR and SunSpec twins) run elsewhere:
# the default once below, the protocol ones shortened in test_bench_aggregators.py.
QUICK = [name for name in scenario.bundled_names() if not name.startswith("summer-peak")]


@pytest.mark.parametrize("name", QUICK)
def test_bundled_scenario_passes_its_checks(name, tmp_path):
    loaded = scenario.load(scenario.bundled(name))
    trace = (tmp_path / "trace.jsonl").open("w")
    outcome = asyncio.run(Simulation(loaded, SimulationOptions(trace=trace, journal_path=tmp_path / "j.sqlite")).run())
    trace.close()
    failed = [(check, detail) for check, ok, detail in outcome.checks if not ok]
    assert failed == [], outcome.summary
    records = [json.loads(line) for line in (tmp_path / "trace.jsonl").read_text().splitlines()]
    assert [r for r in records if r["soc_pct"] < r["floor_pct"]] == []
    assert records[-1]["t"] == pytest.approx(loaded.run.duration_s)
    with Journal.open(tmp_path / "j.sqlite", readonly=True) as journal:
        assert journal.verify() == []


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """`powershare-gw sim --trace trace.jsonl` in an empty folder: the default scenario."""
    folder = tmp_path_factory.mktemp("default")
    here = pytest.MonkeyPatch()
    here.chdir(folder)
    try:
        code = main(["sim", "--trace", "trace.jsonl", "--quiet"])
    finally:
        here.undo()
    return code, folder


def test_default_run_exits_0_with_summary_and_plot(default_run):
    code, folder = default_run
    assert code == 0
    summary = json.loads((folder / "summary.json").read_text())
    assert set(summary) >= {"delivered_wh", "min_soc_pct", "floor_violations", "faults", "final_state",
                            "wall_s", "sim_s"}
    assert summary["floor_violations"] == 0
    assert summary["delivered_wh"]["peak-1"] > 40_000
    assert all(check["ok"] for check in summary["checks"])
    assert (folder / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_default_trace_has_a_record_every_second_and_none_below_the_floor(default_run):
    _, folder = default_run
    records = [json.loads(line) for line in (folder / "trace.jsonl").read_text().splitlines()]
    assert {"t", "state", "soc_pct", "floor_pct", "setpoint_w", "inverter_w", "bms_max_discharge_w",
            "event_id", "reason"} <= set(records[0])
    times = [r["t"] for r in records]
    assert max(b - a for a, b in zip(times, times[1:])) <= 1.0 + 1e-6
    assert [r for r in records if r["soc_pct"] < r["floor_pct"]] == []
    assert any(r["state"] == "DISCHARGE" and r["inverter_w"] > 10_000 for r in records)


def test_default_journal_energy_matches_the_inverter_meter(default_run):
    _, folder = default_run
    summary = json.loads((folder / "summary.json").read_text())
    with Journal.open(folder / "bench-journal.sqlite", readonly=True) as journal:
        (event,) = event_summaries(journal)
    assert event.final
    meter = summary["inverter_meter_wh"]  # the simulated inverter's own TotWhInj over the run
    assert event.meter_wh == pytest.approx(meter, rel=0.005)
    assert event.integrated_wh == pytest.approx(meter, rel=0.005)


DECISIONS = {"DispatchAnswer", "Transition", "FaultRaised", "FaultCleared", "DispatchEnded", "EventEnergy"}


def test_replaying_the_default_journal_through_the_core_reproduces_every_decision(default_run):
    """The journal alone (its recorded start and steps) gives back every journaled decision, exactly."""
    _, folder = default_run
    with Journal.open(folder / "bench-journal.sqlite", readonly=True) as journal:
        records = journal.records()
    decided = [(r.kind, r.payload) for r in records if r.kind in DECISIONS]
    found = list(journaled_steps(records))
    (start,) = [payload for what, payload in found if what == "start"]
    steps = [one for what, one in found if what == "step"]
    policy, owner, now = decode_start(start)
    replayed = [(type(e).__name__, codec.jsonable(e))
                for result in replay(Controller.start(policy, owner, now), steps) for e in result.events]
    assert len(steps) >= 18_000 * 10  # every tick of the 5-hour run, and the frame and poll steps between
    assert {kind for kind, _ in decided} >= {"DispatchAnswer", "Transition", "DispatchEnded", "EventEnergy"}
    assert replayed == decided


def test_report_verifies_the_default_journal(default_run, capsys):
    _, folder = default_run
    assert main(["report", "--journal", str(folder / "bench-journal.sqlite"), "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["chain"]["intact"] is True
    assert [e["request_id"] for e in out["events"]] == ["peak-1"]


def test_report_detects_an_edited_journal(default_run, tmp_path):
    _, folder = default_run
    copy = tmp_path / "edited.sqlite"
    copy.write_bytes((folder / "bench-journal.sqlite").read_bytes())
    with sqlite3.connect(copy) as db:
        db.execute("DROP TRIGGER records_no_update")
        db.execute("UPDATE records SET payload = replace(payload, '11500', '99999') WHERE kind = 'DispatchRequest'")
    assert main(["report", "--journal", str(copy)]) == 1


def test_bad_scenario_exits_2_naming_file_and_keys(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[run]\nduration_s = -5\n[[fault]]\nat_s = 1\nkind = "meteor"\n[vehicel]\nx = 1\n')
    assert main(["sim", "--scenario", str(bad), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "run.duration_s" in err and "fault[0].kind" in err and "vehicel" in err and str(bad) in err


def test_missing_scenario_exits_2(tmp_path, capsys):
    assert main(["sim", "--scenario", str(tmp_path / "nope.toml"), "--quiet"]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_failed_expectation_exits_1(tmp_path):
    text = scenario.bundled("fault-bms-fault.toml").read_text().replace("min_delivered_wh = 2000",
                                                                       "min_delivered_wh = 999999")
    (tmp_path / "strict.toml").write_text(text)
    assert main(["sim", "--scenario", str(tmp_path / "strict.toml"), "--quiet",
                 "--journal", str(tmp_path / "j.sqlite")]) == 1


def test_the_bench_refuses_to_overwrite_a_journal_that_is_not_its_own(tmp_path, capsys):
    precious = tmp_path / "gateway-journal.sqlite"
    with Journal.open(precious) as journal:
        journal.append("Note", 0.0, {"what": "a real gateway's record"})
    assert main(["sim", "--scenario", "fault-bms-fault", "--quiet", "--journal", str(precious)]) == 2
    assert "not a bench journal" in capsys.readouterr().err
    with Journal.open(precious, readonly=True) as journal:
        assert len(journal) == 1
