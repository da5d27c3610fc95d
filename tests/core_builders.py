"""Builders for the pure core's inputs: fakes are allowed only here, for the core."""

from __future__ import annotations

from dataclasses import replace

from firmware_py.core import Controller, Policy, step
from firmware_py.core.types import (
    BmsSnapshot,
    BmsState,
    ContactorState,
    DispatchEnded,
    DispatchKind,
    DispatchRequest,
    EventEnergy,
    InverterState,
    InverterStatus,
    PackContactor,
    PriceInterval,
)

POLICY = Policy(usable_capacity_wh=123_000, reserve_pct=40, fault_holdoff_s=5, lockout_faults=3,
                lockout_window_s=600, energy_report_interval_s=60)


_HEALTHY_BMS = dict(
    pack_voltage_v=820.0, pack_current_a=0.0, max_discharge_w=250_000, max_charge_w=150_000,
    min_temp_c=24.0, max_temp_c=27.0, bms_state=BmsState.SUPPORT, contactor_state=ContactorState.CLOSED,
    pack_contactor_neg=PackContactor.ECONOMIZED, pack_contactor_pos=PackContactor.ECONOMIZED, hvil_ok=True)
_RUNNING_INVERTER = dict(inv_state=InverterState.RUNNING, w_max_rtg=11_500, w_discha_max_rtg=11_500,
                         w_cha_max_rtg=11_500)


def bms(t: float, soc: float = 80.0, **changes) -> BmsSnapshot:
    """A healthy BMS in SUPPORT with contactors closed, as of time t (built once: the state machine
    makes millions)."""
    return BmsSnapshot(**{"received_at": t, "soc_min_pct": soc, "soc_ui_pct": soc + 0.3, "soc_max_pct": soc + 0.5,
                          "soc_avg_pct": soc + 0.2, **_HEALTHY_BMS, **changes})


def inverter(t: float, **changes) -> InverterStatus:
    return InverterStatus(**{"received_at": t, **_RUNNING_INVERTER, **changes})


def discharge(id: str, t: float, start: float, end: float, target: float = 11_500, **changes) -> DispatchRequest:
    return replace(DispatchRequest(id, "test", DispatchKind.DISCHARGE, target, start, end, received_at=t), **changes)


def ready(t: float = 0.0, soc: float = 80.0, policy: Policy = POLICY) -> Controller:
    """A controller that has seen healthy data and settled in STANDBY."""
    return step(Controller.start(policy, now=t), [bms(t, soc), inverter(t)], t).controller


class Run:
    """Steps the core the way a healthy gateway does, with an inverter that follows its setpoint
    exactly and a meter (TotWhInj) that counts what it delivers. `records` is what the gateway
    journals of it (requests, prices and every event): what a stop or a restart reads back."""

    def __init__(self, c: Controller, t: float = 0.0, soc: float = 80.0):
        self.c, self.t, self.soc = c, t, soc
        self.meter_wh, self.applied_w = 0.0, 0.0
        self.events: list = []
        self.records: list = []

    def feed(self, *inputs) -> object:
        result = step(self.c, list(inputs), self.t)
        self.c, self.applied_w = result.controller, result.command.setpoint_w
        self.events += result.events
        self.records += [i for i in inputs if isinstance(i, (DispatchRequest, PriceInterval))] + list(result.events)
        return result

    def run(self, seconds: float, dt: float = 1.0) -> None:
        for _ in range(round(seconds / dt)):
            self.meter_wh += max(0.0, self.applied_w) * dt / 3600
            self.t += dt
            self.feed(bms(self.t, self.soc), inverter(self.t, measured_w=self.applied_w, tot_wh_inj=self.meter_wh))

    def ended(self, id: str) -> DispatchEnded | None:
        return next((e for e in self.events if isinstance(e, DispatchEnded) and e.request_id == id), None)

    def final(self, id: str) -> EventEnergy | None:
        return next((e for e in self.events if isinstance(e, EventEnergy) and e.request_id == id and e.final), None)
