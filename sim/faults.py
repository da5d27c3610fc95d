"""The bench's fault vocabulary: what a scenario can inject, and which part injects it.

One list, so the scenario loader, the BMS node, the simulated inverter and the
simulation agree by construction: a kind is valid in a scenario exactly when a
part of the bench knows how to make it happen.
"""

from __future__ import annotations

from enum import Enum


class BmsFault(str, Enum):
    """What the simulated BMS node can do wrong on the wire."""

    CAN_SILENCE = "can_silence"
    BMS_FAULT = "bms_fault"
    DCL_ZERO = "dcl_zero"
    CONTACTOR_OPEN = "contactor_open"
    OVER_TEMP = "over_temp"
    SOC_JUMP = "soc_jump"
    GARBLED = "garbled"
    WRONG_LENGTH = "wrong_length"
    MESSAGE_SILENCE = "message_silence"
    """One message of the DBC (the scenario's `message`) stops while the others go on."""


class InverterFault(str, Enum):
    """What `InverterModel.inject` can make go wrong, each until a given time."""

    INVERTER_FAULT = "inverter_fault"
    MODBUS_EXCEPTION = "modbus_exception"
    SLOW_REPLY = "slow_reply"
    DROP_CONNECTION = "drop_connection"
    GRID_OUTAGE = "grid_outage"


# A scenario names inverter-side faults by what the gateway sees, not by how the model makes them.
SCENARIO_INVERTER_FAULTS: dict[str, InverterFault] = {
    "inverter_fault": InverterFault.INVERTER_FAULT,
    "modbus_timeout": InverterFault.SLOW_REPLY,
    "modbus_exception": InverterFault.MODBUS_EXCEPTION,
    "modbus_disconnect": InverterFault.DROP_CONNECTION,
    "grid_outage": InverterFault.GRID_OUTAGE,
}
BMS_FAULT_KINDS: tuple[str, ...] = tuple(kind.value for kind in BmsFault)
SCENARIO_FAULT_KINDS: tuple[str, ...] = BMS_FAULT_KINDS + tuple(SCENARIO_INVERTER_FAULTS)


def _raisable() -> dict[str, frozenset[str]]:
    """Which of the gateway's fault codes (`FaultKind` values) each scenario fault can make it raise.

    A `FaultRaised` is credited only to an injected fault that can cause it, so a later fault's
    reaction is never taken for an earlier one's. Any fault may end in LOCKOUT (repeated faults);
    `garbled` frames can decode to anything a BMS reports.
    """
    stale, lockout = {"bms_stale"}, {"lockout"}
    bms_any = stale | {"bms_fault", "contactor_welded", "over_temp", "under_temp"}
    comms = {"inverter_comms"}
    table: dict[str, set[str]] = {
        BmsFault.CAN_SILENCE: stale, BmsFault.BMS_FAULT: {"bms_fault"}, BmsFault.DCL_ZERO: set(),
        BmsFault.CONTACTOR_OPEN: stale | {"contactor_welded"}, BmsFault.OVER_TEMP: {"over_temp"},
        BmsFault.SOC_JUMP: stale, BmsFault.GARBLED: bms_any, BmsFault.WRONG_LENGTH: stale,
        BmsFault.MESSAGE_SILENCE: stale,
        "inverter_fault": {"inverter_fault"} | comms, "modbus_timeout": comms, "modbus_exception": comms,
        "modbus_disconnect": comms, "grid_outage": comms,
    }
    return {str(getattr(kind, "value", kind)): frozenset(codes | lockout) for kind, codes in table.items()}


RAISABLE: dict[str, frozenset[str]] = _raisable()
"""Scenario fault kind → the gateway fault codes it can raise (see `_raisable`)."""
assert set(RAISABLE) == set(SCENARIO_FAULT_KINDS), "every scenario fault kind says what it can raise"
