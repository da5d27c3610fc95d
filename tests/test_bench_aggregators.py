"""The bench dispatching through real protocols: a real openleadr VTN and the gateway's own
VEN, or the gateway's SunSpec DER server and a Modbus client, all on 127.0.0.1.

Short scenarios (minutes of simulated time, a few seconds of wall time each); the bundled
four-hour ones (summer-peak-openadr, summer-peak-sunspec) run the same code for longer.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from firmware_py.sim import scenario
from firmware_py.sim.aggregators import (
    OpenAdr3Aggregator,
    OpenAdrAggregator,
    ScriptedAggregator,
    SunSpecAggregator,
    for_scenario,
)
from firmware_py.sim.simulation import Outcome, Simulation, SimulationOptions
from openadr3_model import conforms
from pymodbus.client import AsyncModbusTcpClient
from test_bench import scaled

from firmware_py.core.types import Verdict
from firmware_py.inverter.sunspec import ModelDef

TARGET_W = 11_500


def write_scenario(tmp_path: Path, kind: str, *, at_s: float = 60, start_s: float = 120,
                   duration_s: float = 300, run_s: float = 450, extra: str = "",
                   dispatch_id: str = "peak-1") -> scenario.Scenario:
    path = tmp_path / f"short-{kind}.toml"
    path.write_text(f"""
[run]
duration_s = {run_s}
[aggregator]
kind = "{kind}"
[[dispatch]]
at_s = {at_s}
id = "{dispatch_id}"
start_s = {start_s}
duration_s = {duration_s}
target_w = {TARGET_W}
{extra}
""")
    return scenario.load(path)


def run_bench(loaded: scenario.Scenario, aggregator: Any, tmp_path: Path) -> tuple[Outcome, list[dict]]:
    trace_path = tmp_path / "trace.jsonl"
    with trace_path.open("w") as trace:
        options = SimulationOptions(trace=trace, journal_path=tmp_path / "journal.sqlite", aggregator=aggregator)
        outcome = asyncio.run(asyncio.wait_for(Simulation(loaded, options).run(), 120))
    return outcome, [json.loads(line) for line in trace_path.read_text().splitlines()]


def delivered(outcome: Outcome) -> float:
    return sum(outcome.summary["delivered_wh"].values())


def assert_meter_agrees(outcome: Outcome) -> None:
    """Only one event ran, so the gateway's per-event energy is the inverter meter's whole count."""
    meter = outcome.summary["inverter_meter_wh"]
    assert delivered(outcome) > 0
    assert delivered(outcome) == pytest.approx(meter, rel=0.01)


# ---------------------------------------------------------------------- choosing


def test_for_scenario_picks_the_named_aggregator(tmp_path):
    assert isinstance(for_scenario(write_scenario(tmp_path, "scripted")), ScriptedAggregator)
    assert isinstance(for_scenario(write_scenario(tmp_path, "openadr")), OpenAdrAggregator)
    assert isinstance(for_scenario(write_scenario(tmp_path, "openadr3")), OpenAdr3Aggregator)
    assert isinstance(for_scenario(write_scenario(tmp_path, "sunspec")), SunSpecAggregator)


@pytest.mark.parametrize("name", ["summer-peak-openadr.toml", "summer-peak-openadr3.toml", "summer-peak-sunspec.toml"])
def test_bundled_protocol_scenarios_name_their_aggregator(name):
    loaded = scenario.load(scenario.bundled(name))
    assert loaded.aggregator.kind == name.removeprefix("summer-peak-").removesuffix(".toml")
    assert loaded.expect.min_delivered_wh == 40_000
    assert loaded.expect.max_floor_violations == 0


# ---------------------------------------------------------------------- OpenADR


def test_openadr_event_is_opted_in_and_delivered(tmp_path):
    loaded = write_scenario(tmp_path, "openadr")
    aggregator = for_scenario(loaded)
    outcome, records = run_bench(loaded, aggregator, tmp_path)
    assert outcome.passed, outcome.checks
    assert outcome.summary["answers"] == {"peak-1": "accepted"}
    assert aggregator.vtn.opt_for("peak-1") == "optIn"
    assert set(outcome.summary["delivered_wh"]) == {"peak-1"}  # the OpenADR event id is the request id
    assert_meter_agrees(outcome)
    serving = [r["t"] for r in records if r["event_id"] == "peak-1" and r["inverter_w"] > 0]
    assert min(serving) >= 120 and max(serving) <= 120 + 300 + 1  # the VTN's window, mapped onto the bench clock


@pytest.mark.slow  # the fast tier keeps one bench per protocol; this one's logic has unit tests too
def test_openadr_cancel_mid_event_stops_delivery(tmp_path):
    """With an event id holding a '#', which the VEN writes twice in its request id: the bench still finds
    the answer, the cancellation and the delivered energy under the scenario's id."""
    loaded = write_scenario(tmp_path, "openadr", duration_s=300, dispatch_id="peak#1",
                            extra='[[cancel]]\nat_s = 300\nid = "peak#1"\n')
    aggregator = for_scenario(loaded)
    outcome, records = run_bench(loaded, aggregator, tmp_path)
    assert "peak##1" in aggregator.sink.cancelled  # the VEN handed the VTN's cancellation to the core
    assert outcome.summary["answers"] == {"peak#1": "accepted"} and set(outcome.summary["delivered_wh"]) == {"peak#1"}
    after = [r for r in records if r["t"] >= 310]
    assert after and all(r["inverter_w"] <= 0 and r["event_id"] is None for r in after)
    assert 0 < delivered(outcome) < TARGET_W * (310 - 120) / 3600
    assert_meter_agrees(outcome)


# ---------------------------------------------------------------------- OpenADR 3


@pytest.mark.slow
def test_openadr3_event_is_accepted_delivered_and_reported_back(tmp_path):
    loaded = write_scenario(tmp_path, "openadr3")
    aggregator = for_scenario(loaded)
    assert isinstance(aggregator, OpenAdr3Aggregator)
    outcome, records = run_bench(loaded, aggregator, tmp_path)
    assert outcome.passed, outcome.checks
    assert outcome.summary["answers"] == {"peak-1": "accepted"}
    vtn = aggregator.vtn
    assert vtn.answers_for("peak-1") == ["accepted"]
    assert_meter_agrees(outcome)
    # the energy the VEN reported once the event was over is the gateway's own count for it
    assert vtn.delivered_wh("peak-1") == pytest.approx(outcome.summary["delivered_wh"]["peak-1"], abs=1.0)
    serving = [r["t"] for r in records if r["event_id"] == "peak-1" and r["inverter_w"] > 0]
    assert min(serving) >= 120 and max(serving) <= 120 + 300 + 1  # the VTN's window, mapped onto the bench clock
    for served in vtn.served:
        conforms(served)
    for kind, message in vtn.received:
        conforms(message, kind)


def test_openadr3_event_cancelled_mid_event_stops_delivery_and_still_reports_the_energy(tmp_path):
    """Deleted at the VTN mid-event: the core stops, and the usage report the event asked for comes
    anyway, with what was delivered before the cancellation (the aggregator settles on it)."""
    loaded = write_scenario(tmp_path, "openadr3", duration_s=300,
                            extra='[[cancel]]\nat_s = 300\nid = "peak-1"\n')
    aggregator = for_scenario(loaded)
    outcome, records = run_bench(loaded, aggregator, tmp_path)
    after = [r for r in records if r["t"] >= 310]
    assert after and all(r["inverter_w"] <= 0 and r["event_id"] is None for r in after)
    delivered_wh = outcome.summary["delivered_wh"]["peak-1"]
    assert 0 < delivered_wh < TARGET_W * (310 - 120) / 3600
    assert aggregator.vtn.delivered_wh("peak-1") == pytest.approx(delivered_wh, abs=1.0)
    assert_meter_agrees(outcome)


@pytest.mark.slow
def test_bundled_openadr3_peak_event_shortened_passes_its_checks_and_reports_the_delivered_energy(tmp_path):
    """The bundled default peak event through the OpenADR 3 VTN, scaled to 1/16 (time and capacity together,
    so the energy budget caps it exactly as in the 4-hour run)."""
    loaded = scaled(scenario.load(scenario.bundled("summer-peak-openadr3.toml")), 1 / 16)
    aggregator = for_scenario(loaded)
    outcome, _ = run_bench(loaded, aggregator, tmp_path)
    assert outcome.passed, outcome.checks  # accepted_capped, the delivered energy, the floor
    assert outcome.summary["delivered_wh"]["peak-1"] >= loaded.expect.min_delivered_wh
    assert aggregator.vtn.delivered_wh("peak-1") == pytest.approx(outcome.summary["delivered_wh"]["peak-1"], abs=1.0)


@pytest.mark.slow
def test_openadr3_event_is_capped_by_the_energy_budget(tmp_path):
    loaded = write_scenario(tmp_path, "openadr3", extra="[vehicle]\ninitial_soc_pct = 50\nusable_capacity_wh = 10000\n")
    aggregator = for_scenario(loaded)
    outcome, _ = run_bench(loaded, aggregator, tmp_path)
    assert outcome.summary["answers"] == {"peak-1": "accepted_capped"}
    # the first answer, then one per time the VEN asked again as the budget allowed more (a standing setting)
    answers = aggregator.vtn.answers_for("peak-1")
    assert answers[0] == "capped" and len(answers) == 1 + aggregator.ven.reasks
    assert "energy above the floor" in aggregator.vtn.reasons_for("peak-1")[0][1]
    assert outcome.summary["floor_violations"] == 0


@pytest.mark.slow
def test_openadr3_event_is_refused_while_the_owner_is_opted_out(tmp_path):
    loaded = write_scenario(tmp_path, "openadr3", run_s=300,
                            extra="[[owner_change]]\nat_s = 30\nopt_out = true\n")
    aggregator = for_scenario(loaded)
    outcome, records = run_bench(loaded, aggregator, tmp_path)
    assert outcome.summary["answers"] == {"peak-1": "rejected"}
    assert aggregator.vtn.answers_for("peak-1") == ["refused"]
    assert aggregator.vtn.reasons_for("peak-1")[0][0] == "OPTED_OUT"
    assert all(r["inverter_w"] <= 0 for r in records)


# ---------------------------------------------------------------------- SunSpec


class ReadingSunSpec(SunSpecAggregator):
    """The site controller, also reading models 701 and 713 back once while the event runs."""

    def __init__(self, read_at_s: float) -> None:
        super().__init__()
        self.read_at_s = read_at_s
        self.seen: dict[int, dict[str, Any]] = {}
        self.gateway_soc: float | None = None

    async def step(self, t: float) -> None:
        await super().step(t)
        if not self.seen and t >= self.read_at_s:
            self.seen = {m: await self._read(self.client, m) for m in (701, 713)}
            self.gateway_soc = self.gateway.telemetry().soc_pct

    async def _read(self, client: AsyncModbusTcpClient, model_id: int) -> dict[str, Any]:
        mdef, regs = ModelDef.load(model_id), []
        for at in range(0, mdef.size, 100):
            reply = await client.read_holding_registers(self.server.addresses[model_id] + at,
                                                        count=min(100, mdef.size - at), device_id=1)
            assert not reply.isError(), reply
            regs += reply.registers
        return mdef.decode(regs)


def test_sunspec_setpoint_is_accepted_and_delivered(tmp_path):
    loaded = write_scenario(tmp_path, "sunspec", at_s=120)
    aggregator = ReadingSunSpec(read_at_s=300)
    outcome, records = run_bench(loaded, aggregator, tmp_path)
    assert outcome.passed, outcome.checks
    assert outcome.summary["answers"] == {"peak-1": "accepted"}
    assert_meter_agrees(outcome)
    assert list(outcome.summary["delivered_wh"]) == ["peak-1"]  # reported by the scenario's id
    assert list(aggregator.request_ids.values()) == ["peak-1"]  # one session for the whole event
    assert {r["event_id"] for r in records} == {None, "peak-1"}  # the trace names it as the summary does
    assert aggregator.seen[713]["SoC"] == pytest.approx(aggregator.gateway_soc, abs=0.1)
    assert aggregator.seen[701]["W"] > 0
    serving = [r["t"] for r in records if r["inverter_w"] > 0]
    assert min(serving) >= 120 and max(serving) <= 120 + 300 + 1  # WSetEna = 0 at the end stops it


@pytest.mark.slow  # the fast tier keeps one bench per protocol; this one's logic has unit tests too
def test_sunspec_setpoint_announced_early_is_written_at_its_start(tmp_path):
    loaded = write_scenario(tmp_path, "sunspec", at_s=30)
    aggregator = for_scenario(loaded)
    outcome, records = run_bench(loaded, aggregator, tmp_path)
    # Nothing was written at at_s; the answer to the write at the start is the one reported.
    assert aggregator.answers["peak-1"].verdict is Verdict.ACCEPTED
    assert outcome.summary["answers"] == {"peak-1": "accepted"}
    assert min(r["t"] for r in records if r["inverter_w"] > 0) >= 120
    assert_meter_agrees(outcome)


# ---------------------------------------------------------------------- standing settings after an outage


def test_every_protocol_asks_again_when_the_enter_service_delay_ends(tmp_path):
    """A 5 kW dispatch sent during a grid outage is refused (OUTAGE) by every protocol; the outage ends at
    25 s and the enter-service delay at 35 s. The standing setting is asked again right then, at the same
    simulated time and for the same energy whichever protocol carries it (OpenADR used to wait for the
    VEN's own wall-clock tick: a re-ask at a random simulated time, or none)."""
    runs = {}
    for kind in ("openadr", "openadr3", "sunspec"):
        path = tmp_path / kind / "reask.toml"
        path.parent.mkdir()
        path.write_text(f"""
[run]
duration_s = 60
start_hour = 18.0
[vehicle]
initial_soc_pct = 80
[owner]
reserve_pct = 40
[inverter]
enter_service_delay_s = 10
enter_service_ramp_s = 10
[aggregator]
kind = "{kind}"
[[fault]]
at_s = 5
kind = "grid_outage"
duration_s = 20
[[dispatch]]
at_s = 10
id = "d"
start_s = 15
duration_s = 100
target_w = 5000
""")
        loaded = scenario.load(path)
        outcome, records = run_bench(loaded, for_scenario(loaded), path.parent)
        assert outcome.summary["answers"] == {"d": "rejected"}, kind  # the answer sent during the outage
        started = next((r["t"] for r in records if r["state"] == "DISCHARGE"), None)
        assert started is not None and 35.0 <= started <= 35.5, (kind, started)
        runs[kind] = (started, outcome.summary["delivered_wh"]["d"])
    assert runs["openadr"] == runs["openadr3"] == runs["sunspec"], runs
