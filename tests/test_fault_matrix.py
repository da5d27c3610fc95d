"""Rows of the README's fault matrix that no scenario file or process test covers on its own.

Each row: a fault, what the gateway must do, and by when. The bundled fault scenarios
(`tests/test_bench.py`), the process bench (`tests/test_bench_processes.py`), the clock and
link tests cover the others; the README's table names the test for every row.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path

import pytest
from pymodbus.constants import ExcCodes

from firmware_py.config import InverterConfig
from firmware_py.core.types import CRITICAL_BMS_FIELDS
from firmware_py.core.types import InverterCommand
from firmware_py.inverter.client import InverterClient
from firmware_py.sim import scenario
from firmware_py.sim.faults import InverterFault
from firmware_py.sim.inverter import InverterModel, SimInverterServer
from firmware_py.sim.simulation import Simulation, SimulationOptions

SILENCE_AT_S, SILENCE_S = 20.0, 10.0
TICK_S = 0.1


def silence_run(message: str, tmp_path: Path) -> tuple[dict, list[dict]]:
    """A small pack serving a 2 kW event; one BMS message stops for 10 s in the middle of it."""
    base = scenario.load(scenario.bundled("fault-bms-fault.toml"))
    run = replace(
        base, run=replace(base.run, duration_s=SILENCE_AT_S + SILENCE_S + 50),  # the 30 s hold-off, then served again
        vehicle=replace(base.vehicle, usable_capacity_wh=20_000, initial_soc_pct=80),
        dispatch=(scenario.Dispatch(at_s=5, id="ev", start_s=10, duration_s=600, target_w=2_000),),
        fault=(scenario.Fault(at_s=SILENCE_AT_S, kind="message_silence", duration_s=SILENCE_S, message=message),),
        expect=scenario.Expect())
    trace_path = tmp_path / "trace.jsonl"
    with trace_path.open("w") as trace:
        outcome = asyncio.run(Simulation(run, SimulationOptions(trace=trace, journal_path=tmp_path / "j.sqlite")).run())
    return outcome.summary, [json.loads(line) for line in trace_path.read_text().splitlines()]


def frame_of(message: str):
    """How the gateway's reader judges `message`: its fields and its timeout."""
    from firmware_py.bms.reader import reader_from_config
    from firmware_py.config import Config

    frames = reader_from_config(Config(), lambda: 0.0)._frames.values()
    (frame,) = [f for f in frames if f.message.name == message]
    return frame


@pytest.mark.parametrize("message", scenario.bundled_dbc_messages())
def test_one_bms_message_going_silent_alone(message, tmp_path):
    """Critical message: 0 W within its timeout plus a tick, then served again once it is back and
    the hold-off has passed. Any other message: the event goes on, its fields simply age."""
    frame = frame_of(message)
    summary, records = silence_run(message, tmp_path)
    (fault,) = summary["faults"]
    during = [r for r in records if SILENCE_AT_S + frame.timeout_s + 2 * TICK_S <= r["t"] < SILENCE_AT_S + SILENCE_S]
    assert during
    if any(b.field in CRITICAL_BMS_FIELDS for b in frame.bindings):
        assert fault["safe_after_s"] is not None and fault["safe_after_s"] <= frame.timeout_s + 2 * TICK_S
        assert all(r["inverter_w"] <= 0 for r in during), message
    else:
        assert fault["safe_after_s"] is None
        assert all(r["inverter_w"] > 1_500 for r in during), message
    assert records[-1]["inverter_w"] > 1_500  # served again by the end: no lockout, no restart
    assert summary["floor_violations"] == 0


def run_inverter(scenario_fn):
    async def main():
        model = InverterModel()
        async with SimInverterServer(model) as server:
            now = [0.0]
            client = InverterClient(InverterConfig(port=server.port, timeout_s=0.2, revert_timeout_s=9),
                                    lambda: now[0], backoff_min_s=1.0)
            await client.connect()
            try:
                await scenario_fn(model, client, now)
            finally:
                await client.close()

    asyncio.run(main())


@pytest.mark.parametrize("code", [c for c in ExcCodes if c is not ExcCodes.ACKNOWLEDGE])
def test_each_modbus_exception_code_is_lost_comms_at_zero_watts_then_recovers(code):
    """The inverter answering any exception: no data believed (the core holds 0 W on it), the
    code named, nothing raised; the first good reply after it serves again."""
    async def scenario_fn(model, client, now):
        await client.apply(InverterCommand(5_000.0, "dispatch"))
        model.exception_code = int(code)
        model.inject(InverterFault.MODBUS_EXCEPTION, until=5.0)
        status = await client.read_status()
        assert not status.comms_ok and status.measured_w == 0.0
        assert f"Modbus exception {int(code)}" in status.error
        await client.apply(InverterCommand(6_000.0, "dispatch"))  # refused by the inverter: no exception here
        model.advance(6.0, 6.0, 50_000, 50_000)
        now[0] = 8.0  # past the reconnect back-off
        assert (await client.read_status()).comms_ok
        await client.apply(InverterCommand(6_000.0, "dispatch"))
        assert model.wset_w == pytest.approx(6_000.0)

    run_inverter(scenario_fn)
