"""The one table from DBC signals to `BmsSnapshot` fields, and what a plausible value is.

An installer fitting another vehicle swaps the DBC and overrides entries of
`DEFAULT_SIGNALS` from the config (`[vehicle] signals`), so nothing else in the
reader may name a DBC message or signal. Plausibility lives here too because
it is about the snapshot's units, not about any one vehicle's encoding.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields

from firmware_py.core.types import BmsSnapshot

DEFAULT_SIGNALS: dict[str, str] = {
    "pack_voltage_v": "HvBattAmpVolt.PackVoltage",
    "pack_current_a": "HvBattAmpVolt.SmoothedCurrent",
    "soc_min_pct": "BmsSoc.SocMin",
    "soc_ui_pct": "BmsSoc.SocUi",
    "soc_max_pct": "BmsSoc.SocMax",
    "soc_avg_pct": "BmsSoc.SocAvg",
    "max_charge_w": "BmsPowerAvailable.MaxRegenPower",
    "max_discharge_w": "BmsPowerAvailable.MaxDischargePower",
    "nominal_full_wh": "BmsEnergyStatus.NominalFullPack",
    "nominal_remaining_wh": "BmsEnergyStatus.NominalRemaining",
    "energy_buffer_wh": "BmsEnergyStatus.EnergyBuffer",
    "expected_remaining_wh": "BmsEnergyStatus.ExpectedRemaining",
    "min_temp_c": "BmsThermal.MinPackTemp",
    "max_temp_c": "BmsThermal.MaxPackTemp",
    "bms_state": "BmsStatus.BmsState",
    "contactor_state": "BmsStatus.ContactorState",
    "hv_state": "BmsStatus.HvState",
    "isolation_kohm": "BmsStatus.Isolation",
    "pack_contactor_neg": "HvContactorState.PackContactorNeg",
    "pack_contactor_pos": "HvContactorState.PackContactorPos",
    "hvil_ok": "HvContactorState.HvilStatus",
    "brick_v_max": "BrickMinMax.BrickVoltageMax",
    "brick_v_min": "BrickMinMax.BrickVoltageMin",
    "lifetime_discharge_wh": "LifetimeEnergy.TotalDischarge",
    "lifetime_charge_wh": "LifetimeEnergy.TotalCharge",
}
"""BmsSnapshot field -> "MESSAGE.SIGNAL" in the DBC. An empty string unmaps a field."""

SNAPSHOT_FIELDS: tuple[str, ...] = tuple(
    f.name for f in fields(BmsSnapshot) if f.name not in ("received_at", "stale", "as_of"))

INTEGER_FIELDS = frozenset({"bms_state", "contactor_state", "hv_state",
                            "pack_contactor_neg", "pack_contactor_pos"})
"""Enumerations: kept as int, and checked against the DBC's value table when it has one."""

HVIL_OK_VALUE = 1
"""hvil_ok is True exactly when the mapped HVIL status signal reads this value."""

UNIT_FACTORS: dict[str, float] = {"kW": 1e3, "MW": 1e6, "kWh": 1e3, "MWh": 1e6}
"""DBC unit -> factor to the snapshot's W / Wh; any other unit is taken as already right."""

PLAUSIBLE: dict[str, tuple[float, float]] = {
    "pack_voltage_v": (0.0, 1_000.0),
    "pack_current_a": (-2_000.0, 2_000.0),
    "soc_min_pct": (0.0, 100.0),
    "soc_ui_pct": (0.0, 100.0),
    "soc_max_pct": (0.0, 100.0),
    "soc_avg_pct": (0.0, 100.0),
    "max_charge_w": (0.0, 1_000_000.0),
    "max_discharge_w": (0.0, 1_000_000.0),
    "nominal_full_wh": (0.0, 300_000.0),
    "nominal_remaining_wh": (0.0, 300_000.0),
    "energy_buffer_wh": (0.0, 50_000.0),
    "expected_remaining_wh": (0.0, 300_000.0),
    "min_temp_c": (-40.0, 100.0),
    "max_temp_c": (-40.0, 100.0),
    "isolation_kohm": (0.0, 100_000.0),
    "brick_v_min": (1.5, 5.0),
    "brick_v_max": (1.5, 5.0),
    "lifetime_discharge_wh": (0.0, 1e10),
    "lifetime_charge_wh": (0.0, 1e10),
}
"""Inclusive bounds in snapshot units; outside them a frame is dropped as impossible.

The bounds are physical, not operational: 70 degC is alarming but possible and
must reach the core; 102.3 % (a 10-bit "signal not available") is not.
"""

MAX_SOC_RATE_PCT_PER_S = 1.0
"""Fastest believable SoC change: a 350 kW charge on a 60 kWh pack is ~0.16 %/s."""

SOC_JUMP_SLACK_PCT = 0.5
"""Allowed on top of the rate: quantisation (0.1 %) and estimator noise between frames."""

RATE_LIMITED = frozenset({"soc_min_pct", "soc_ui_pct", "soc_max_pct", "soc_avg_pct"})


def merged(overrides: Mapping[str, str] | None) -> dict[str, str]:
    """The default table with `overrides` applied; unmapped ("") fields dropped."""
    table = {**DEFAULT_SIGNALS, **(overrides or {})}
    return {name: ref for name, ref in table.items() if ref}
