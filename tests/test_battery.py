"""The simulated pack: energy, limits, heat and an SoC estimate that never flatters."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from firmware_py.sim.battery import Battery, cell_ocv


def test_defaults_are_the_truck():
    b = Battery()
    assert b.capacity_wh == 123_000 and b.true_soc_pct == 80
    assert 600 <= Battery(soc_pct=0).pack_voltage_v < Battery(soc_pct=50).pack_voltage_v < 950
    assert Battery(soc_pct=100).pack_voltage_v > 800  # the 800 V class overflows the Model 3 scaling


def test_ocv_rises_with_soc():
    values = [cell_ocv(s) for s in range(0, 101, 5)]
    assert values == sorted(values) and values[0] == 3.0 and values[-1] == pytest.approx(4.18)


def test_discharge_removes_the_delivered_energy_plus_losses():
    b = Battery(capacity_wh=100_000, soc_pct=80)
    delivered = sum(b.step(1.0, 10_000) for _ in range(3600)) / 3600
    assert delivered == pytest.approx(10_000)
    used_pct = 80 - b.true_soc_pct
    assert 10.0 < used_pct < 10.1  # 10 kWh of 100 kWh, plus a little I^2R
    assert b.lifetime_discharge_wh == pytest.approx(10_000) and b.lifetime_charge_wh == 0


def test_charge_is_negative_power_and_raises_soc():
    b = Battery(soc_pct=50)
    assert b.step(60, -7_000) == -7_000
    assert b.true_soc_pct > 50 and b.pack_current_a < 0
    assert b.pack_voltage_v > b.ocv_v  # charging lifts the terminal voltage
    assert b.lifetime_charge_wh == pytest.approx(7_000 / 60)


def test_voltage_sags_under_load():
    b = Battery(soc_pct=60)
    rest = b.pack_voltage_v
    b.step(0.1, 100_000)
    assert b.pack_current_a > 0 and b.pack_voltage_v < rest


def test_limits_derate_near_empty_and_full():
    assert Battery(soc_pct=50).max_discharge_w > Battery(soc_pct=5).max_discharge_w > Battery(soc_pct=0.5).max_discharge_w
    assert Battery(soc_pct=0.5).max_discharge_w == 0
    assert Battery(soc_pct=50).max_charge_w > Battery(soc_pct=95).max_charge_w > Battery(soc_pct=100).max_charge_w == 0


def test_limits_derate_at_temperature_extremes():
    normal = Battery(temp_c=25)
    cold, hot = Battery(temp_c=-5), Battery(temp_c=55)
    assert cold.max_charge_w == 0 < cold.max_discharge_w < normal.max_discharge_w
    assert 0 < hot.max_discharge_w < normal.max_discharge_w and Battery(temp_c=65).max_discharge_w == 0


def test_step_clamps_to_the_packs_own_limits_and_to_open_contactors():
    b = Battery(soc_pct=5)
    limit = b.max_discharge_w
    assert 0 < limit < 1_000_000 and b.step(1, 1_000_000) == pytest.approx(limit)
    b.contactors_closed = False
    assert b.step(1, 10_000) == 0 and b.pack_current_a == 0


def test_current_heats_the_pack_and_it_cools_to_ambient():
    b = Battery(ambient_c=25)
    for _ in range(600):
        b.step(1, 300_000)
    assert b.temp_c > 25.5 and b.max_temp_c > b.min_temp_c
    hot = b.temp_c
    for _ in range(3600):
        b.step(10, 0)
    assert 25 <= b.temp_c < hot


def test_noise_is_seeded():
    a, b = Battery(seed=7), Battery(seed=7)
    for _ in range(50):
        a.step(0.1, 5_000)
        b.step(0.1, 5_000)
    assert a.soc_avg_pct == b.soc_avg_pct


@given(soc=st.floats(0, 100), seed=st.integers(0, 1000),
       steps=st.lists(st.tuples(st.floats(0, 60), st.floats(-400_000, 400_000)), max_size=30))
def test_conservative_soc_is_never_above_the_truth(soc, seed, steps):
    b = Battery(soc_pct=soc, seed=seed)
    for dt, power in steps:
        lo, hi = -b.max_charge_w, b.max_discharge_w
        delivered = b.step(dt, power)
        assert lo <= delivered <= hi and (delivered == power or delivered in (lo, hi))
        assert 0 <= b.soc_min_pct <= b.true_soc_pct <= 100
        assert b.soc_min_pct <= b.soc_avg_pct <= b.soc_max_pct


def test_limits_and_voltage_follow_every_change_of_state():
    """The battery memoises OCV and limits per state: any change of SoC or temperature is seen at once."""
    b = Battery(soc_pct=50, temp_c=25)
    voltage, limit = b.ocv_v, b.max_discharge_w
    assert (b.ocv_v, b.max_discharge_w) == (voltage, limit)
    b.temp_c = 55.0
    assert b.max_discharge_w < limit and b.max_discharge_w == Battery(soc_pct=50, temp_c=55).max_discharge_w
    b.step(60.0, 100_000)
    assert b.ocv_v < voltage and b.ocv_v == Battery(soc_pct=b.true_soc_pct).ocv_v
    assert b.max_charge_w == Battery(soc_pct=b.true_soc_pct, temp_c=b.temp_c).max_charge_w
