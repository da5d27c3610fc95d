"""The whole bench: every bundled scenario passes its own checks, and the default run's
journal, trace and plot say what the gateway really did.

Every bundled scenario run here runs once (the default event's protocol twins have shorter
benches in test_bench_aggregators.py). Most are shrunk in time and pack size (`scaled`), which
keeps every SoC trajectory, power cap and fault reaction of the full one, in the fast tier. The
slow tier (`-m slow`, run by CI) runs whole those whose times are physical (the grid return's
enter-service delay, the open-ended setpoint emptying the pack), the two whose recovery cannot
be shortened, and the 5-hour default run through the CLI that the journal, trace and report
tests share.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from firmware_py.sim import scenario
from firmware_py.sim.simulation import (
    Outcome,
    Simulation,
    SimulationOptions,
    floor_violation,
    lock_bench_journal,
)
from journal_edits import tamper

from firmware_py.cli import main
from firmware_py.errors import InputError
from firmware_py.core import Controller
from firmware_py.core.replay import replay
from firmware_py.journal import Journal, codec, event_summaries
from firmware_py.journal.files import lock_path
from firmware_py.journal.steps import decode_start, journaled_steps

# The 4-hour peak events (the default and its OpenADR and SunSpec twins) run elsewhere:
# the default once below, the protocol ones shortened in test_bench_aggregators.py.
QUICK = [name for name in scenario.bundled_names() if not name.startswith("summer-peak")]

# How much shorter the fast tier's copy of each bundled scenario is (`scaled`). The fault
# scenarios keep their fault and a resumed event well inside the run; the Modbus exception one
# less shortened, as its recovery (reconnect, hold-off) takes a fixed time.
# The 4-hour energy scenarios shrink most: what they show depends on energy over capacity.
SCALE = {"grid-outage.toml": 1 / 32, "budget-limited.toml": 1 / 32, "owner-opt-out.toml": 1 / 8,
         "fault-modbus-exception.toml": 1 / 4}
DEFAULT_SCALE = 1 / 8
# These two have their own shortened tests below, with the bundled checks and what the run is for.
# They are not run again at full length: what they show is energy over capacity, which `scaled`
# keeps exactly (their 4-hour runs were a third of the whole suite's scenario time).
OWN_TESTS = {"grid-outage.toml", "budget-limited.toml"}
# Run whole by their own tests below, in the slow tier (their times are physical: a 300 s
# enter-service delay and ramp, a pack emptied to its floor); the enter-service rules and the
# open-ended requests have unit tests of their own in the fast tier.
WHOLE_BY_OWN_TESTS = {"grid-return.toml", "open-ended-sunspec.toml"}
# Their recovery (Modbus timeouts, reconnect, hold-off) takes a fixed 40-50 s, so a shortened copy is
# nearly the whole run: the slow tier's whole run is their only one.
WHOLE_IN_SLOW_TIER_ONLY = {"fault-modbus-disconnect.toml", "fault-modbus-timeout.toml"}


def shortened(name: str) -> scenario.Scenario:
    return scaled(scenario.load(scenario.bundled(name)), SCALE.get(name, DEFAULT_SCALE))


def scaled(full: scenario.Scenario, k: float) -> scenario.Scenario:
    """`full` with every scheduled time, the pack's capacity and the energy bounds times `k`.

    Time and capacity shrink together, so at a given power the SoC moves k-times faster
    for k-times as long: every SoC trajectory, the energy budget's power cap and the
    floors are those of the full run. What is physical stays as it is: powers, fault
    durations (detection, the 30 s hold-off and the inverter's revert time are absolute),
    the step, the seed and the SoC bounds. The run ends on the next whole second.
    """
    e = full.expect
    return replace(
        full,
        run=replace(full.run, duration_s=math.ceil(full.run.duration_s * k)),  # the trace ends on a whole second
        vehicle=replace(full.vehicle, usable_capacity_wh=full.vehicle.usable_capacity_wh * k),
        dispatch=tuple(replace(d, at_s=d.at_s * k, start_s=d.start_s * k, duration_s=d.duration_s * k)
                       for d in full.dispatch),
        cancel=tuple(replace(c, at_s=c.at_s * k) for c in full.cancel),
        owner_change=tuple(replace(o, at_s=o.at_s * k) for o in full.owner_change),
        fault=tuple(replace(f, at_s=f.at_s * k) for f in full.fault),
        expect=replace(e, min_delivered_wh=e.min_delivered_wh * k if e.min_delivered_wh >= 0 else -1,
                       max_delivered_wh=e.max_delivered_wh * k if e.max_delivered_wh >= 0 else -1),
    )


def run_and_check(loaded: scenario.Scenario, tmp_path: Path) -> tuple[Outcome, list[dict]]:
    """Run `loaded` with a trace and a journal; assert its own checks, the floor, the full length
    and the journal's chain. Returns the outcome and the trace records."""
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
    return outcome, records


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(WHOLE_IN_SLOW_TIER_ONLY))
def test_bundled_scenario_passes_its_checks(name, tmp_path):
    run_and_check(scenario.load(scenario.bundled(name)), tmp_path)


@pytest.mark.parametrize("name", [name for name in QUICK
                                  if name not in OWN_TESTS | WHOLE_BY_OWN_TESTS | WHOLE_IN_SLOW_TIER_ONLY])
def test_shortened_scenario_passes_the_bundled_checks(name, tmp_path):
    full, short = scenario.load(scenario.bundled(name)), shortened(name)
    assert short.run.duration_s < full.run.duration_s and short.expect.answers == full.expect.answers
    run_and_check(short, tmp_path)


@pytest.mark.slow  # a 2.7 s bench run
def test_shortened_grid_outage_reaches_the_backup_floor_and_holds_it(tmp_path):
    """What the 4-hour grid-outage run is for: below the owner's 40 % reserve down to the backup
    floor, then the islanded inverter capped there to the end of the run; dispatch refused."""
    short = shortened("grid-outage.toml")
    _, records = run_and_check(short, tmp_path)  # includes: rejected, final BACKUP, min SoC >= 22 %
    backup_floor = short.expect.min_soc_pct  # 20 % backup reserve + 2 % margin
    reached = [r for r in records if r["soc_pct"] <= backup_floor + 0.5]
    assert reached, f"the floor was never reached: min SoC {min(r['soc_pct'] for r in records)}"
    held = [r for r in records if r["t"] >= reached[0]["t"]]
    assert held[-1]["t"] - held[0]["t"] >= short.run.duration_s / 4  # held for a good part of the run
    for r in held:  # capped well below the ~2.4 kW home load, at the backup floor
        assert r["state"] == "BACKUP" and r["floor_pct"] == backup_floor and r["setpoint_w"] < 1_000, r
        assert backup_floor <= r["soc_pct"] <= backup_floor + 0.5, r


def test_shortened_budget_limited_event_is_capped_and_stops_above_the_floor(tmp_path):
    """What the 15,000 s budget-limited run is for: a capped answer below the target, delivery
    within the bundled bounds (scaled), and the pack never below the floor."""
    short = shortened("budget-limited.toml")
    outcome, records = run_and_check(short, tmp_path)  # includes: accepted_capped, energy bounds, min SoC
    (event,) = short.dispatch
    cap_w = outcome.summary["answer_details"][event.id]["cap_w"]
    assert 0 < cap_w < event.target_w
    serving = [r for r in records if r["event_id"] == event.id and r["inverter_w"] > 0]
    assert serving and max(r["inverter_w"] for r in serving) <= cap_w + 1
    assert outcome.summary["min_soc_pct"] >= short.expect.min_soc_pct


@pytest.mark.slow
def test_grid_return_waits_the_enter_service_delay_then_ramps_in(tmp_path):
    """IEEE 1547 enter service, end to end: an event runs, a 2-minute outage (BACKUP), then the grid
    returns: 0 W and new dispatch refused (ENTER_SERVICE_DELAY) for the 300 s delay the gateway reads
    from model 703, then the inverter ramps to full power over 300 s and the event is served again."""
    loaded = scenario.load(scenario.bundled("grid-return.toml"))
    outcome, records = run_and_check(loaded, tmp_path)  # includes: the refusal's reason, final DISCHARGE
    (outage,) = loaded.fault
    back = outage.at_s + outage.duration_s
    delay, ramp = loaded.inverter.enter_service_delay_s, loaded.inverter.enter_service_ramp_s

    def at(t: float) -> dict:
        return next(r for r in records if r["t"] >= t)

    assert at(outage.at_s + 10)["state"] == "BACKUP"
    waiting = [r for r in records if back + 2 <= r["t"] < back + delay]
    assert waiting and all(r["inverter_w"] == 0 and r["setpoint_w"] == 0 for r in waiting)
    assert at(back + 50)["reason"].startswith("enter service: grid back: export may resume in")
    assert "export may resume in" in outcome.summary["answer_details"]["during-delay"]["detail"]
    halfway = at(back + delay + ramp / 2)
    assert halfway["inverter_w"] == pytest.approx(11_500 / 2, rel=0.05)  # the ramp, not a step
    assert at(back + delay + ramp + 5)["inverter_w"] == pytest.approx(11_500)


class Watched(Simulation):
    """The bench, noting the gateway's telemetry once, at `at_s`: what the status showed then."""

    def __init__(self, loaded: scenario.Scenario, options: SimulationOptions, at_s: float) -> None:
        super().__init__(loaded, options)
        self.at_s, self.seen = at_s, None

    def _trace_step(self) -> None:
        if self.seen is None and self.t >= self.at_s:
            self.seen = self.gateway.telemetry()
        super()._trace_step()


@pytest.mark.slow
def test_an_open_ended_setpoint_is_served_at_full_power_until_the_envelope_takes_over(tmp_path):
    """Issue 12's bench: WSet = 11500 written once without a revert timer to a 20 kWh pack at 45 %
    (floor 42 %). At least 80 % of the energy the gateway saw above the floor leaves at the requested
    power; the status said, early on, when the floor's envelope would start to reduce it."""
    loaded = scenario.load(scenario.bundled("open-ended-sunspec.toml"))
    (setpoint,) = loaded.dispatch
    trace = (tmp_path / "trace.jsonl").open("w")
    sim = Watched(loaded, SimulationOptions(trace=trace, journal_path=tmp_path / "j.sqlite"), setpoint.start_s + 5)
    outcome = asyncio.run(sim.run())
    trace.close()
    assert [c for c in outcome.checks if not c[1]] == [] and outcome.summary["floor_violations"] == 0
    records = [json.loads(line) for line in (tmp_path / "trace.jsonl").read_text().splitlines()]
    seen = sim.seen
    assert seen.verdict.value == "accepted" and seen.cap_w is None and seen.envelope_in_s > 60
    above_floor_wh = seen.available_wh + seen.meter_wh  # what the gateway saw above the floor at the start
    full = sum(r["inverter_w"] * (b["t"] - r["t"]) / 3600 for r, b in zip(records, records[1:])
               if r["inverter_w"] >= 0.98 * setpoint.target_w)
    assert full >= 0.8 * above_floor_wh, (full, above_floor_wh)
    reached = next(r["t"] for r in records if r["setpoint_w"] >= setpoint.target_w)
    reduced = next(r["t"] for r in records if r["t"] > reached and r["setpoint_w"] < setpoint.target_w)
    assert reduced == pytest.approx(sim.at_s + seen.envelope_in_s, abs=15)  # the status said when


def test_a_truck_below_its_floor_left_idle_counts_no_floor_violation(tmp_path):
    """A floor violation is energy leaving the pack below the floor, not a low SoC."""
    below = replace(scenario.Scenario(), run=scenario.RunSection(duration_s=20),
                    vehicle=scenario.VehicleSection(initial_soc_pct=38, usable_capacity_wh=20_000),
                    name="below-floor")
    trace = (tmp_path / "trace.jsonl").open("w")
    outcome = asyncio.run(Simulation(below, SimulationOptions(trace=trace, journal_path=tmp_path / "j.sqlite")).run())
    trace.close()
    records = [json.loads(line) for line in (tmp_path / "trace.jsonl").read_text().splitlines()]
    assert records and all(r["soc_pct"] < r["floor_pct"] for r in records)  # below the floor throughout
    assert outcome.summary["floor_violations"] == 0 and outcome.passed


@pytest.mark.parametrize("soc, floor, inverter_w, counted", [
    (38.0, 42.0, 0.0, False), (38.0, 42.0, -3_000.0, False), (38.0, 42.0, 5.0, True), (43.0, 42.0, 5_000.0, False),
])
def test_a_trace_record_is_a_floor_violation_only_when_energy_leaves_below_the_floor(soc, floor, inverter_w,
                                                                                    counted):
    assert floor_violation(soc, floor, inverter_w) is counted


def test_expectations_are_judged_on_the_runs_own_figures_not_the_summarys_rounded_ones(tmp_path):
    """A lowest SoC of 79.9258 % passed `min_soc_pct = 79.926`: the check read the summary's three decimals."""
    loaded = shortened("fault-bms-fault.toml")
    run = Simulation(loaded, SimulationOptions(journal_path=tmp_path / "a.sqlite"))
    asyncio.run(run.run())
    shown = round(run.min_soc, 3)
    assert shown > run.min_soc  # the summary shows it rounded up: a threshold at the shown value is not met
    at_shown = replace(loaded, expect=replace(loaded.expect, min_soc_pct=shown))
    outcome = asyncio.run(Simulation(at_shown, SimulationOptions(journal_path=tmp_path / "b.sqlite")).run())
    assert outcome.summary["min_soc_pct"] == shown  # the same run again (seeded)
    (check,) = [(ok, detail) for name, ok, detail in outcome.checks if name == "min SoC"]
    assert check == (False, f"{run.min_soc!r} % >= {shown!r}")  # not "77.635 % >= 77.635"

@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """`powershare-gw sim --trace trace.jsonl` in an empty folder: the default scenario, 5 hours
    simulated (slow tier; every test using it is marked slow).

    Run once per test session: under xdist a worker may tear this module down and set it up
    again between its tests, so the folder and exit code live in the session's shared temp
    folder, and a lock makes any other setup wait for the first and reuse its run.
    """
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder, shared by the workers
    folder, done = root / "default-run", root / "default-run.exit-code"
    with open(root / "default-run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            folder.mkdir(exist_ok=True)
            here = pytest.MonkeyPatch()
            here.chdir(folder)
            try:
                code = main(["sim", "--trace", "trace.jsonl", "--quiet"])
            finally:
                here.undo()
            done.write_text(str(code))
    return int(done.read_text()), folder


@pytest.mark.slow  # shares the 5-hour default run
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


@pytest.mark.slow  # shares the 5-hour default run
def test_default_trace_has_a_record_every_second_and_none_below_the_floor(default_run):
    _, folder = default_run
    records = [json.loads(line) for line in (folder / "trace.jsonl").read_text().splitlines()]
    assert {"t", "state", "soc_pct", "floor_pct", "setpoint_w", "inverter_w", "bms_max_discharge_w",
            "event_id", "reason"} <= set(records[0])
    times = [r["t"] for r in records]
    assert max(b - a for a, b in zip(times, times[1:])) <= 1.0 + 1e-6
    assert [r for r in records if r["soc_pct"] < r["floor_pct"]] == []
    assert any(r["state"] == "DISCHARGE" and r["inverter_w"] > 10_000 for r in records)


@pytest.mark.slow  # shares the 5-hour default run
def test_default_journal_energy_matches_the_inverter_meter(default_run):
    _, folder = default_run
    summary = json.loads((folder / "summary.json").read_text())
    with Journal.open(folder / "bench-journal.sqlite", readonly=True) as journal:
        (event,) = event_summaries(journal)
    assert event.final
    meter = summary["inverter_meter_wh"]  # the simulated inverter's own TotWhInj over the run
    assert event.meter_wh == pytest.approx(meter, rel=0.005)
    assert event.integrated_wh == pytest.approx(meter, rel=0.005)


DECISIONS = {"DispatchAnswer", "Transition", "FaultRaised", "FaultCleared", "DispatchEnded", "EventEnergy",
             "ServingChanged"}


def replayed_and_journaled(path: Path) -> tuple[int, list, list]:
    """Steps recorded in the journal at `path`, the decisions replaying them gives, and those journaled."""
    with Journal.open(path, readonly=True) as journal:
        records = journal.records()
    decided = [(r.kind, r.payload) for r in records if r.kind in DECISIONS]
    found = list(journaled_steps(records))
    (start,) = [payload for what, payload in found if what == "start"]
    steps = [one for what, one in found if what == "step"]
    policy, owner, now = decode_start(start)
    replayed = [(type(e).__name__, codec.jsonable(e))
                for result in replay(Controller.start(policy, owner, now), steps) for e in result.events]
    return len(steps), replayed, decided


@pytest.mark.slow  # shares the 5-hour default run
def test_replaying_the_default_journal_through_the_core_reproduces_every_decision(default_run):
    """The journal alone (its recorded start and steps) gives back every journaled decision, exactly."""
    _, folder = default_run
    steps, replayed, decided = replayed_and_journaled(folder / "bench-journal.sqlite")
    assert steps >= 18_000 * 10  # every tick of the 5-hour run, and the frame and poll steps between
    assert {kind for kind, _ in decided} >= {"DispatchAnswer", "Transition", "DispatchEnded", "EventEnergy"}
    assert replayed == decided


def test_replaying_a_faulted_run_reproduces_its_faults_and_answers(tmp_path):
    """The fast tier's replay: an event, a BMS fault and its hold-off, the event resumed."""
    loaded = shortened("fault-bms-fault.toml")
    asyncio.run(Simulation(loaded, SimulationOptions(journal_path=tmp_path / "j.sqlite")).run())
    steps, replayed, decided = replayed_and_journaled(tmp_path / "j.sqlite")
    assert steps >= loaded.run.duration_s * 10
    assert {"FaultRaised", "FaultCleared", "DispatchAnswer"} <= {kind for kind, _ in decided}
    assert replayed == decided


@pytest.mark.slow  # shares the 5-hour default run
def test_report_verifies_the_default_journal(default_run, capsys):
    _, folder = default_run
    assert main(["report", "--journal", str(folder / "bench-journal.sqlite"), "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["chain"]["intact"] is True
    assert [e["request_id"] for e in out["events"]] == ["peak-1"]


@pytest.mark.slow  # shares the 5-hour default run
def test_report_detects_an_edited_journal(default_run, tmp_path):
    _, folder = default_run
    copy = tmp_path / "edited.sqlite"
    copy.write_bytes((folder / "bench-journal.sqlite").read_bytes())
    tamper(copy, ("UPDATE records SET payload = replace(payload, '11500', '99999') WHERE kind = 'DispatchRequest'", ()))
    assert main(["report", "--journal", str(copy)]) == 1


def test_bad_scenario_exits_2_naming_file_and_keys(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[run]\nduration_s = -5\n[[fault]]\nat_s = 1\nkind = "meteor"\n[vehicel]\nx = 1\n')
    assert main(["sim", "--scenario", str(bad), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "run.duration_s" in err and "fault[0].kind" in err and "vehicel" in err and str(bad) in err


@pytest.mark.parametrize("text", ["", "# only a comment\n", "\n\n"])
def test_an_empty_scenario_is_refused_not_run_on_defaults(tmp_path, capsys, text):
    """An empty (or truncated to nothing) file ran five hours of defaults and passed, as if it were the scenario meant."""
    empty = tmp_path / "empty.toml"
    empty.write_text(text)
    assert main(["sim", "--scenario", str(empty), "--quiet", "--journal", str(tmp_path / "j.sqlite")]) == 2
    err = capsys.readouterr().err
    assert f"{empty}: the scenario is empty; give at least [run] duration_s" in err
    assert not (tmp_path / "j.sqlite").exists()


def test_missing_scenario_exits_2(tmp_path, capsys):
    assert main(["sim", "--scenario", str(tmp_path / "nope.toml"), "--quiet"]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_failed_expectation_exits_1(tmp_path):
    # Cut to 2 simulated minutes (fault at 60 s): the expectation fails all the same.
    text = (scenario.bundled("fault-bms-fault.toml").read_text()
            .replace("min_delivered_wh = 2000", "min_delivered_wh = 999999")
            .replace("[run]\nduration_s = 1500", "[run]\nduration_s = 120")
            .replace("at_s = 300\nkind", "at_s = 60\nkind"))
    assert "duration_s = 120\n" in text and "at_s = 60\nkind" in text
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


@pytest.mark.parametrize("option, target", [("--summary", "scenario.toml"), ("--trace", "j.sqlite.anchors"),
                                            ("--plot", "j.sqlite-wal")])
def test_an_output_on_the_scenario_or_one_of_the_journals_files_is_refused_and_the_file_kept(
        tmp_path, capsys, option, target):
    """`--summary my.toml` replaced the hand-written scenario with JSON (exit 0); `--trace j.sqlite.anchors`
    overwrote the journal's anchors, and `report` then called the journal edited."""
    scenario_file = tmp_path / "scenario.toml"
    scenario_file.write_text("[run]\nduration_s = 5\n")
    victim = tmp_path / target
    if not victim.exists():
        victim.write_text("kept\n")
    before = victim.read_bytes()
    assert main(["sim", "--scenario", str(scenario_file), "--quiet", option, str(victim),
                 "--journal", str(tmp_path / "j.sqlite")]) == 2
    err = capsys.readouterr().err
    told = "given to both --scenario and --summary" if target == "scenario.toml" else \
        f"given to {option} is a segment's {'anchors' if 'anchors' in target else 'SQLite side file'} of the journal"
    assert told in err, err
    assert victim.read_bytes() == before


def test_outputs_that_are_one_file_or_a_journal_not_the_benchs_are_refused_before_anything_is_written(
        tmp_path, capsys):
    """--trace and --summary on one file left a summary and no trace (exit 0); and the trace was
    emptied before the journal was found not to be the bench's."""
    same = tmp_path / "out.json"
    assert main(["sim", "--scenario", "fault-bms-fault", "--quiet", "--trace", str(same), "--summary", str(same),
                 "--journal", str(tmp_path / "j.sqlite")]) == 2
    assert "given to both --summary and --trace" in capsys.readouterr().err
    precious, foreign = tmp_path / "precious.jsonl", tmp_path / "gateway.sqlite"
    precious.write_text("an earlier trace\n")
    with Journal.open(foreign) as journal:
        journal.append("Note", 0.0, {"what": "a real gateway's record"})
    assert main(["sim", "--scenario", "fault-bms-fault", "--quiet", "--trace", str(precious),
                 "--journal", str(foreign)]) == 2
    assert "not a bench journal" in capsys.readouterr().err
    assert precious.read_text() == "an earlier trace\n" and not same.exists()


def test_a_run_that_fails_to_start_leaves_the_trace_and_summary_as_they_were(tmp_path, capsys):
    """The trace was opened (emptied) before the bench was built: a metrics port in use then failed
    the run and an earlier trace given by mistake was lost. Outputs are put in place only at the end."""
    trace, summary = tmp_path / "precious.jsonl", tmp_path / "summary.json"
    trace.write_text("an earlier trace\n")
    summary.write_text("an earlier summary\n")
    (tmp_path / "short.toml").write_text("[run]\nduration_s = 5\n")
    outputs = ["--quiet", "--trace", str(trace), "--summary", str(summary), "--journal", str(tmp_path / "j.sqlite")]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["sim", "--scenario", str(tmp_path / "short.toml"), *outputs,
                     "--metrics", f"127.0.0.1:{port}"]) == 2
    assert "address already in use" in capsys.readouterr().err
    assert trace.read_text() == "an earlier trace\n" and summary.read_text() == "an earlier summary\n"
    assert main(["sim", "--scenario", str(tmp_path / "short.toml"), *outputs]) == 0  # a run that ends replaces them
    assert json.loads(trace.read_text().splitlines()[-1])["t"] == pytest.approx(5.0)
    assert json.loads(summary.read_text())["sim_s"] == pytest.approx(5.0)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []  # no temporary file left


@pytest.mark.slow  # a 3 s child process
def test_sigterm_part_way_leaves_the_folder_as_it_was(tmp_path):
    """SIGTERM killed the run mid-write and left the hidden partial trace (`.t.jsonl.xxxx.tmp`)
    beside where the trace was to go; it now ends the run as Ctrl-C does, which removes it."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "slow.toml").write_text("[run]\nduration_s = 600\n")
    run = subprocess.Popen([sys.executable, "-m", "firmware_py", "sim", "--scenario", str(tmp_path / "slow.toml"),
                            "--speed", "20", "--quiet", "--trace", str(out / "t.jsonl"), "--summary",
                            str(out / "s.json"), "--journal", str(tmp_path / "j.sqlite")],
                           cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(root)},
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not [p for p in out.iterdir() if p.stat().st_size > 0]:
            assert run.poll() is None, run.stderr.read().decode()
            time.sleep(0.1)
        assert list(out.iterdir()), "the partial trace should be being written"
        run.send_signal(signal.SIGTERM)
        assert run.wait(timeout=20) != 0
        assert list(out.iterdir()) == []
    finally:
        run.kill()
        run.wait(timeout=10)


def test_a_minimum_above_its_maximum_is_refused_at_load(tmp_path, capsys):
    """min_delivered_wh above max_delivered_wh was accepted, so every run failed its checks (exit 1)."""
    bad = tmp_path / "contradict.toml"
    bad.write_text("[run]\nduration_s = 30\n[expect]\nmin_delivered_wh = 100\nmax_delivered_wh = 10\n")
    assert main(["sim", "--scenario", str(bad), "--quiet", "--journal", str(tmp_path / "j.sqlite")]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "min_delivered_wh" in err and "max_delivered_wh" in err
    bad.write_text("[run]\nduration_s = 30\n[expect]\nmin_delivered_wh = 10\nmax_delivered_wh = 10\n")
    scenario.load(bad)  # equal bounds can be met

@pytest.mark.parametrize("option", ["--summary", "--plot", "--trace"])
def test_an_output_folder_that_cannot_be_written_is_said_before_the_run(tmp_path, capsys, option):
    """Only the folder's existence was checked: --summary into /proc was found only after the whole
    run. Writability is tried with a file beside the target (os.access says yes to root for a folder
    it still cannot write in)."""
    name = "plot.png" if option == "--plot" else "out.json"
    (tmp_path / "never.toml").write_text("[run]\nduration_s = 5\n[expect]\nmin_delivered_wh = 1\n")
    assert main(["sim", "--scenario", str(tmp_path / "never.toml"), "--quiet", option, f"/proc/{name}",
                 "--journal", str(tmp_path / "j.sqlite")]) == 2
    out = capsys.readouterr()
    assert f"/proc/{name}: cannot write" in out.err and "check:" not in out.out  # refused, not run
    assert not (tmp_path / "j.sqlite").exists()


@pytest.mark.parametrize("text, message", [
    ('[[dispatch]]\nat_s = 1\nid = "x"\nstart_s = 1e300\nduration_s = 60\ntarget_w = 1000\n',
     "dispatch[0].start_s: 1e+300 is out of range"),
    ('[[dispatch]]\nat_s = 1\nid = "x\\u001b"\nstart_s = 10\nduration_s = 60\ntarget_w = 1000\n',
     "expected 1 to 200 printable characters"),
    ("[run]\nseed = " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
    # Longer than the gateway's stall gap: every step would look like its own process pausing.
    ("[run]\nstep_s = 0.6\n", "run.step_s: 0.6 is out of range"),
    # The second would have cut the first short (its end replaced) while the summary listed both.
    ('[[fault]]\nat_s = 10\nkind = "dcl_zero"\nduration_s = 20\n[[fault]]\nat_s = 12\nkind = "dcl_zero"\n'
     'duration_s = 1\n', "fault[1]: a dcl_zero at 12 s while fault[0] of the same kind lasts to 30 s"),
    # Apart in the file, but both injected with the step ending at 20.25 s: the first cut short the same way.
    ('[run]\nstep_s = 0.25\n[[fault]]\nat_s = 20.01\nkind = "bms_fault"\nduration_s = 0.02\n[[fault]]\n'
     'at_s = 20.05\nkind = "bms_fault"\nduration_s = 0.1\n', "fault[1]: a bms_fault at 20.05 s (injected with the "
     "step ending at 20.25 s) while fault[0] of the same kind lasts to 20.27 s"),
    # Published as an OpenADR 3 event the VEN refuses as no object id: never answered, and the run exited 0.
    ('[aggregator]\nkind = "openadr3"\n[[dispatch]]\nat_s = 1\nid = "ev#1"\nstart_s = 10\nduration_s = 60\n'
     'target_w = 1000\n', "dispatch[0].id: 'ev#1' cannot be an OpenADR 3 event id"),
    # XML markup in the bench's OpenADR 2.0b VTN's message: the event never came, and the gateway was blamed.
    ('[aggregator]\nkind = "openadr"\n[[dispatch]]\nat_s = 1\nid = "a&b"\nstart_s = 10\nduration_s = 60\n'
     'target_w = 1000\n', "dispatch[0].id: 'a&b' holds &, which the bench's OpenADR 2.0b VTN (openleadr) puts "
     "into its XML unescaped"),
    # A mode's name in the wrong case could never pass, and said so only after the run.
    ('[expect]\nfinal_state = "standby"\n', 'expect.final_state: must be one of "", STARTUP, STANDBY'),
    ('name = "x"\n', "name: unknown key"),  # the scenario's name is its file's, never a key
    # Said only once the run had begun, naming neither the file nor the key.
    ('[aggregator]\nkind = "openadr"\n[[dispatch]]\nat_s = 1\nid = "c1"\nstart_s = 10\nduration_s = 60\n'
     'target_w = 1000\nkind = "charge"\n', "bad.toml: dispatch[0].kind: 'charge' cannot be sent by OpenADR 2.0b"),
    # Each was accepted and did nothing (or the wrong thing) without a word:
    # a cancel sent before its dispatch (the event then ran in full),
    ('[[dispatch]]\nat_s = 30\nid = "ev"\nstart_s = 30\nduration_s = 60\ntarget_w = 1000\n'
     '[[cancel]]\nat_s = 10\nid = "ev"\n', "cancel[0].at_s: 10 is before dispatch 'ev' is sent (30 s)"),
    # a cancel or an owner's change after the run ends,
    ('[run]\nduration_s = 60\n[[dispatch]]\nat_s = 1\nid = "ev"\nstart_s = 1\nduration_s = 30\ntarget_w = 1000\n'
     '[[cancel]]\nat_s = 5000\nid = "ev"\n', "cancel[0].at_s: 5000 is after the run ends (60 s)"),
    ('[run]\nduration_s = 60\n[[owner_change]]\nat_s = 9000\nopt_out = true\n',
     "owner_change[0].at_s: 9000 is after the run ends (60 s)"),
    # a window that opens only after the run ends (the scenario passed with 0 Wh delivered),
    ('[run]\nduration_s = 100\n[[dispatch]]\nat_s = 10\nid = "late"\nstart_s = 5000\nduration_s = 3600\n'
     'target_w = 11500\n', "bad.toml: dispatch[0].start_s: 5000 is at or after the run's end (100 s)"),
    # and two SunSpec setpoints at once: the end of the shorter ended the other, and its energy went to it.
    ('[aggregator]\nkind = "sunspec"\n[[dispatch]]\nat_s = 10\nid = "A"\nstart_s = 10\nduration_s = 90\n'
     'target_w = 5000\n[[dispatch]]\nat_s = 30\nid = "B"\nstart_s = 30\nduration_s = 10\ntarget_w = 3000\n',
     "dispatch[1]: its window overlaps dispatch[0]'s; a SunSpec aggregator holds one setpoint at a time"),
])
def test_scenario_values_out_of_any_bound_are_refused_before_the_run(tmp_path, capsys, text, message):
    (tmp_path / "bad.toml").write_text(text)
    assert main(["sim", "--scenario", str(tmp_path / "bad.toml"), "--quiet"]) == 2
    assert message in capsys.readouterr().err


SENTINEL_KEYS = {"owner_change": ("reserve_pct",),
                 "expect": ("min_delivered_wh", "max_delivered_wh", "min_soc_pct", "max_safe_after_s")}


def test_a_mistyped_sign_is_refused_not_taken_for_not_set(tmp_path, capsys):
    """-1 means "unchanged" / "not checked"; any negative used to be accepted as it, so -0.5 for 0.5
    silently dropped the check."""
    bad = tmp_path / "bad.toml"
    bad.write_text("[run]\nduration_s = 5\n[[owner_change]]\nat_s = 1\nreserve_pct = -0.5\n[expect]\n"
                   + "".join(f"{key} = -0.5\n" for key in SENTINEL_KEYS["expect"]))
    assert main(["sim", "--scenario", str(bad), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: owner_change[0].reserve_pct: -0.5 is out of range (0 to 100, or -1 for not set)" in err
    for key in SENTINEL_KEYS["expect"]:
        assert f"{bad}: expect.{key}: -0.5 is out of range" in err


def test_minus_one_still_means_not_set(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text("[run]\nduration_s = 5\n[[owner_change]]\nat_s = 1\nreserve_pct = -1\n[expect]\n"
                    + "".join(f"{key} = -1\n" for key in SENTINEL_KEYS["expect"]))
    loaded = scenario.load(good)
    assert loaded.owner_change[0].reserve_pct == -1 and loaded.expect.min_soc_pct == -1
    outcome = asyncio.run(Simulation(loaded, SimulationOptions(journal_path=tmp_path / "j.sqlite")).run())
    assert outcome.passed
    assert [name for name, _, _ in outcome.checks] == ["floor violations"]  # the -1 checks are not made


def test_a_window_closing_after_a_fault_is_not_the_gateways_reaction_to_it(tmp_path):
    """A silence of a message the gateway only shows as stale, during an event that ends on schedule
    half a second later: the window's close was taken for the fault detected and made safe."""
    path = tmp_path / "coincide.toml"
    path.write_text('[run]\nduration_s = 80\n[[dispatch]]\nat_s = 5\nid = "ev"\nstart_s = 10\nduration_s = 40\n'
                    'target_w = 5000\n[[fault]]\nat_s = 49.5\nkind = "message_silence"\nmessage = "LifetimeEnergy"\n'
                    'duration_s = 20\n')
    outcome = asyncio.run(Simulation(scenario.load(path), SimulationOptions(journal_path=tmp_path / "j.sqlite")).run())
    [fault] = outcome.summary["faults"]
    assert (fault["detected_after_s"], fault["safe_after_s"]) == (None, None)
    assert outcome.summary["delivered_wh"]["ev"] > 0  # the event ran its window


def test_a_faults_time_in_the_summary_is_the_traces_and_the_tables(tmp_path):
    """A fault at 0.7 s, stepped 0.1 s at a time, was 0.7000000000000001 s in the summary, 0.7 in the trace."""
    path = tmp_path / "f07.toml"
    path.write_text('[run]\nduration_s = 5\nstep_s = 0.1\n[[fault]]\nat_s = 0.7\nkind = "over_temp"\n'
                    'duration_s = 1\n')
    outcome = asyncio.run(Simulation(scenario.load(path), SimulationOptions(journal_path=tmp_path / "j.sqlite")).run())
    [fault] = outcome.summary["faults"]
    assert json.dumps(fault["at_s"]) == "0.7"


def test_a_fault_while_charging_is_safe_only_when_the_inverter_stops_charging(tmp_path):
    """Charging power is negative: "at or below 0 W" called a fault during a charge at 11.5 kW safe
    the moment it was detected, so a max_safe_after_s check during charging could never fail."""
    path = tmp_path / "charge-fault.toml"
    path.write_text('[run]\nduration_s = 80\n[vehicle]\ninitial_soc_pct = 50\n[[dispatch]]\nat_s = 5\n'
                    'id = "chg"\nkind = "charge"\nstart_s = 10\nduration_s = 60\ntarget_w = 11500\n'
                    '[[fault]]\nat_s = 40\nkind = "over_temp"\nduration_s = 5\n')
    trace = (tmp_path / "trace.jsonl").open("w")
    outcome = asyncio.run(Simulation(scenario.load(path), SimulationOptions(
        trace=trace, journal_path=tmp_path / "j.sqlite")).run())
    trace.close()
    [fault] = outcome.summary["faults"]
    records = [json.loads(line) for line in (tmp_path / "trace.jsonl").read_text().splitlines()]
    detected_t = 40 + fault["detected_after_s"]
    assert [r for r in records if r["t"] <= detected_t][-1]["inverter_w"] < -1000  # still charging when noticed
    safe_t = 40 + fault["safe_after_s"]
    assert fault["safe_after_s"] > fault["detected_after_s"]
    assert [r for r in records if r["t"] <= safe_t + 1e-9][-1]["inverter_w"] == 0


def test_a_fault_in_the_last_partial_step_is_injected_and_the_run_ends_at_its_duration(tmp_path):
    """10 s in steps of 0.22 s: the run takes a last step of 0.1 s, so the fault at 9.95 s is injected."""
    path = tmp_path / "edge.toml"
    path.write_text('[run]\nduration_s = 10\nstep_s = 0.22\n[[fault]]\nat_s = 9.95\nkind = "bms_fault"\n')
    with (tmp_path / "trace.jsonl").open("w") as trace:
        outcome = asyncio.run(Simulation(scenario.load(path), SimulationOptions(
            trace=trace, journal_path=tmp_path / "j.sqlite")).run())
    assert [f["kind"] for f in outcome.summary["faults"]] == ["bms_fault"]
    assert json.loads((tmp_path / "trace.jsonl").read_text().splitlines()[-1])["t"] == pytest.approx(10.0)


def test_a_scenario_that_is_a_device_is_refused(capsys):
    assert main(["sim", "--scenario", "/dev/zero", "--quiet"]) == 2
    assert "must be a regular file, not a device" in capsys.readouterr().err


@pytest.mark.parametrize("plot, message", [("plot.xyz", "--plot draws .png"), (".", "is a folder")])
def test_a_plot_path_that_cannot_be_drawn_is_refused_before_the_run(tmp_path, capsys, monkeypatch, plot, message):
    monkeypatch.chdir(tmp_path)
    assert main(["sim", "--scenario", "fault-bms-fault", "--quiet", "--plot", plot]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "bench-journal.sqlite").exists()  # refused before anything ran


def test_an_event_id_that_looks_like_markup_is_shown_as_it_is(tmp_path, capsys):
    (tmp_path / "ids.toml").write_text('[run]\nduration_s = 60\n[[dispatch]]\nat_s = 1\nid = "peak[/]1"\n'
                                       'start_s = 2\nduration_s = 30\ntarget_w = 1000\n')
    assert main(["sim", "--scenario", str(tmp_path / "ids.toml"), "--journal", str(tmp_path / "j.sqlite")]) == 0
    assert "event peak[/]1" in capsys.readouterr().out


ATTRIBUTION = ('[run]\nduration_s = 40\n[[dispatch]]\nat_s = 1\nid = "e"\nstart_s = 2\nduration_s = 100\n'
               'target_w = 11500\n[[fault]]\nat_s = 5\nkind = "message_silence"\nmessage = "LifetimeEnergy"\n'
               'duration_s = 5\n{ignored}[[fault]]\nat_s = 30\nkind = "dcl_zero"\nduration_s = 5\n'
               '[expect]\nmax_safe_after_s = 2\n')


def test_a_later_faults_reaction_is_not_credited_to_an_earlier_ignored_fault(tmp_path, capsys):
    """A non-critical message's silence the gateway rightly ignored was credited with the reaction to a
    dcl_zero 15 s after it ended, and its made-safe check failed the run."""
    path = tmp_path / "attr.toml"
    path.write_text(ATTRIBUTION.format(ignored=""))
    outcome = asyncio.run(Simulation(scenario.load(path), SimulationOptions(journal_path=tmp_path / "j.sqlite")).run())
    silence, dcl = outcome.summary["faults"]
    assert (silence["detected_after_s"], silence["safe_after_s"]) == (None, None)
    assert dcl["detected_after_s"] == 0.0 and dcl["safe_after_s"] <= 2
    assert not outcome.passed  # unmarked, a fault never detected fails max_safe_after_s: the gateway missed it
    path.write_text(ATTRIBUTION.format(ignored="ignored = true\n"))
    assert main(["sim", "--scenario", str(path), "--quiet", "--journal", str(tmp_path / "k.sqlite")]) == 0
    out = capsys.readouterr().out
    assert "never detected" in out and "None" not in out
    assert "message_silence ignored" in out


def test_a_journal_in_use_by_another_run_is_refused_with_one_line(tmp_path, capsys):
    """Two runs on one journal replaced each other's files: a traceback, or a summary naming a journal
    another run had replaced."""
    journal = tmp_path / "j.sqlite"
    fd = os.open(lock_path(journal), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        (tmp_path / "s.toml").write_text("[run]\nduration_s = 2\n")
        assert main(["sim", "--scenario", str(tmp_path / "s.toml"), "--quiet", "--journal", str(journal)]) == 2
        err = capsys.readouterr().err
        assert f"journal {journal} is in use by another run" in err and "Traceback" not in err
        with pytest.raises(InputError, match="is in use by another run"):  # the run's own lock, past check_outputs
            lock_bench_journal(journal)
    finally:
        os.close(fd)


def test_a_journal_refused_as_no_bench_journal_gets_no_lock_file_beside_it(tmp_path, capsys):
    """The lock probe made `notes.db.lock` beside a file `sim --journal` then refused to overwrite."""
    (tmp_path / "notes.db").write_text("the owner's notes\n")
    (tmp_path / "s.toml").write_text("[run]\nduration_s = 2\n")
    journal = str(tmp_path / "notes.db")
    assert main(["sim", "--scenario", str(tmp_path / "s.toml"), "--quiet", "--journal", journal]) == 2
    assert "is not a bench journal" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.db", "s.toml"]
