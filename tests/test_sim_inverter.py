"""The simulated inverter's behaviour: the pure model advanced by hand, and its revert timer over Modbus."""

from __future__ import annotations

import asyncio
import math

import pytest

from firmware_py.config import InverterConfig
from firmware_py.core.types import InverterCommand, InverterState
from firmware_py.inverter.client import InverterClient
from firmware_py.sim.faults import InverterFault as Fault
from firmware_py.sim.inverter import InverterModel, Ratings, SimInverterServer

BIG = 50_000.0  # pack limits that never bind


def _enable(m: InverterModel, wset: float, *, revert_s: int = 0) -> None:
    m.write("WSetMod", 1)
    m.write("WSet", wset)
    m.write("WSetEna", 1)
    if revert_s:
        m.write("WSetRvrt", 0.0)
        m.write("WSetRvrtTms", revert_s)
        m.write("WSetEnaRvrt", 1)


def test_idle_until_enabled():
    m = InverterModel()
    m.write("WSet", 5_000.0)
    m.advance(1.0, 1.0, BIG, BIG)
    assert m.ac_power_w == 0.0 and m.inv_state() == InverterState.STANDBY


def test_ramps_up_at_its_rate_and_stops_at_once():
    m = InverterModel(Ratings(ramp_w_per_s=2_000.0))
    _enable(m, 5_000.0)
    m.advance(1.0, 1.0, BIG, BIG)
    assert m.ac_power_w == pytest.approx(2_000.0)
    m.advance(1.0, 2.0, BIG, BIG)
    m.advance(1.0, 3.0, BIG, BIG)
    assert m.ac_power_w == pytest.approx(5_000.0) and m.inv_state() == InverterState.RUNNING
    m.write("WSet", 0.0)
    m.advance(0.1, 3.1, BIG, BIG)
    assert m.ac_power_w == 0.0


def test_direction_change_passes_through_zero():
    m = InverterModel(Ratings(ramp_w_per_s=1_000.0))
    _enable(m, 3_000.0)
    for t in range(1, 5):
        m.advance(1.0, t, BIG, BIG)
    m.write("WSet", -3_000.0)
    m.advance(1.0, 5.0, BIG, BIG)
    assert m.ac_power_w == pytest.approx(-1_000.0)


def test_discharge_draws_more_dc_and_charge_stores_less():
    m = InverterModel(Ratings(efficiency=0.96))
    _enable(m, 9_600.0)
    assert m.advance(1.0, 1.0, BIG, BIG) == pytest.approx(10_000.0)
    m.write("WSet", -10_000.0)
    m.advance(1.0, 2.0, BIG, BIG)
    assert m.advance(1.0, 3.0, BIG, BIG) == pytest.approx(-9_600.0)


def test_energy_meters_integrate_each_direction():
    m = InverterModel()
    _enable(m, 3_600.0)
    m.advance(0.0, 0.0, BIG, BIG)
    for t in range(1, 3601):
        m.advance(1.0, float(t), BIG, BIG)
    assert m.tot_wh_inj == pytest.approx(3_600.0) and m.tot_wh_abs == 0.0
    m.write("WSet", -1_800.0)
    for t in range(3601, 5401):
        m.advance(1.0, float(t), BIG, BIG)
    assert m.tot_wh_abs == pytest.approx(900.0)


def test_limits_from_rating_wmaxlimpct_and_pack():
    m = InverterModel()
    _enable(m, 20_000.0)
    m.advance(10.0, 10.0, BIG, BIG)
    assert m.ac_power_w == pytest.approx(11_500.0)
    m.write("WMaxLimPct", 50)
    m.write("WMaxLimPctEna", 1)
    m.advance(1.0, 11.0, BIG, BIG)
    assert m.ac_power_w == pytest.approx(5_750.0) and m.inv_state() == InverterState.THROTTLED
    m.advance(1.0, 12.0, 2_000.0, BIG)
    assert m.ac_power_w == pytest.approx(2_000.0 * 0.96)
    m.write("WSet", -20_000.0)
    m.advance(10.0, 22.0, BIG, 1_000.0)
    assert m.ac_power_w == pytest.approx(-1_000.0 / 0.96)


def test_revert_timer_falls_to_wsetrvrt_unless_refreshed():
    m = InverterModel()
    _enable(m, 5_000.0, revert_s=10)
    m.advance(1.0, 1.0, BIG, BIG)
    m.advance(5.0, 6.0, BIG, BIG)
    m.write("WSet", 5_000.0)  # a refresh restarts the timer
    m.advance(8.0, 14.0, BIG, BIG)
    assert m.ac_power_w == pytest.approx(5_000.0) and m.revert_remaining_s() == pytest.approx(2.0)
    m.advance(2.0, 16.0, BIG, BIG)
    assert m.ac_power_w == 0.0 and m.wset_w == 0.0 and m.reverted


def test_grid_outage_islands_and_serves_the_home_up_to_an_enabled_wset():
    m = InverterModel(home_load=lambda now: 2_500.0)
    m.inject(Fault.GRID_OUTAGE, until=100.0)
    m.advance(1.0, 1.0, BIG, BIG)
    assert m.ac_power_w == pytest.approx(2_500.0)  # no gateway command: the home is served
    v = m.values(701)
    assert v["ConnSt"] == 0 and v["Alrm"] >> 4 & 1
    _enable(m, -5_000.0)
    m.advance(1.0, 2.0, BIG, BIG)
    assert m.ac_power_w == 0.0  # islanded, nothing to charge from; a negative ceiling serves nothing
    _enable(m, 11_500.0)
    m.advance(1.0, 3.0, 1_000.0, BIG)
    assert m.ac_power_w == pytest.approx(960.0)  # still limited by the pack
    _enable(m, 1_000.0)
    m.advance(1.0, 4.0, BIG, BIG)
    assert m.ac_power_w == pytest.approx(1_000.0)  # the gateway's ceiling holds the backup floor
    _enable(m, -5_000.0)
    m.advance(1.0, 100.0, BIG, BIG)  # the grid is back: IEEE 1547 enter service, 300 s delay, 300 s ramp
    assert m.values(701)["ConnSt"] == 0 and m.ac_power_w == 0.0
    assert m.values(703)["ESDlyRemTms"] == 300 and m.values(701)["InvSt"] == 2  # STARTING
    m.advance(1.0, 1000.0, BIG, BIG)
    assert m.values(701)["ConnSt"] == 1 and m.ac_power_w == pytest.approx(-5_000.0)


def test_after_an_outage_the_inverter_waits_the_enter_service_delay_then_ramps_in():
    m = InverterModel(home_load=lambda now: 2_000.0)
    m.write("ESDlyTms", 60)
    m.write("ESRmpTms", 100)
    m.inject(Fault.GRID_OUTAGE, until=10.0)
    _enable(m, 11_500.0)
    m.advance(1.0, 5.0, BIG, BIG)
    assert m.ac_power_w == pytest.approx(2_000.0)  # islanded: the home
    powers = {}
    for t in range(10, 200):
        m.advance(1.0, float(t), BIG, BIG)
        powers[t] = m.ac_power_w
    assert all(powers[t] == 0.0 for t in range(10, 70))  # the delay: nothing, grid or home
    assert powers[95] == pytest.approx(11_500 * 25 / 100, rel=0.02)  # a quarter into the ramp
    assert powers[170] == pytest.approx(11_500) and m.enter_service_remaining_s() == 0


def test_the_wmaxlimpct_revert_function_returns_the_limit_in_time():
    m = InverterModel()
    _enable(m, 11_500.0)
    for name, value in (("WMaxLimPctRvrt", 100), ("WMaxLimPctEnaRvrt", 1), ("WMaxLimPctRvrtTms", 20),
                        ("WMaxLimPct", 30), ("WMaxLimPctEna", 1)):
        m.write(name, value)
    m.advance(10.0, 10.0, BIG, BIG)
    assert m.ac_power_w == pytest.approx(3_450.0) and m.values(704)["WMaxLimPctRvrtRem"] == 10
    m.advance(10.0, 20.0, BIG, BIG)
    assert m.controls["WMaxLimPct"] == 100 and m.limit_reverted


def test_inverter_fault_stops_at_once_and_raises_an_alarm():
    m = InverterModel()
    _enable(m, 8_000.0)
    m.advance(1.0, 1.0, BIG, BIG)
    m.inject("inverter_fault", until=5.0)
    m.advance(0.1, 1.1, BIG, BIG)
    assert m.ac_power_w == 0.0 and m.inv_state() == InverterState.FAULT and m.alarms() != 0
    m.advance(4.0, 5.1, BIG, BIG)
    assert m.inv_state() != InverterState.FAULT and m.ac_power_w > 0


def test_revert_fires_over_modbus_when_the_client_stops_refreshing():
    """Killing the client mid-discharge leaves the inverter at 0 W within revert_timeout_s."""

    async def scenario():
        m = InverterModel()
        now = [0.0]
        async with SimInverterServer(m) as server:
            client = InverterClient(InverterConfig(port=server.port, revert_timeout_s=3, timeout_s=1), lambda: now[0])
            await client.connect()
            await client.apply(InverterCommand(6_000.0, "dispatch"))
            m.advance(1.0, 1.0, BIG, BIG)
            assert m.ac_power_w == pytest.approx(6_000.0)
            await client.close()  # the gateway dies
            m.advance(1.9, 2.9, BIG, BIG)
            assert m.ac_power_w == pytest.approx(6_000.0)
            m.advance(0.1, 3.0, BIG, BIG)
            assert m.ac_power_w == 0.0 and m.values(704)["WSetRvrtRem"] == 0

    asyncio.run(scenario())


def test_inject_rejects_unknown_kinds():
    with pytest.raises(ValueError):
        InverterModel().inject("meteor", until=math.inf)
