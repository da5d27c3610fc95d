"""Fault conditions, their latches, and escalation to lockout.

A condition is what the inputs show right now; a fault is its latched memory.
A fault raises the moment its condition appears and clears only after the
condition has stayed gone for the hold-off, so a flickering fault cannot
flicker the inverter. Too many faults in the window escalate to lockout, which
only an installer reset clears: a pack that keeps faulting needs a person.

Only faults in what the data says count toward the lockout (a BMS fault state, a
welded contactor, a temperature, an inverter fault). Stale data (`FRESHNESS_FAULTS`)
is a link that is down: it holds 0 W while it lasts, like any fault, but links heal
by themselves and a locked-out gateway would not serve again when they do, nor
back the home up in an outage.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from firmware_py.core.policy import Policy
from firmware_py.core.types import (
    CRITICAL_BMS_FIELDS,
    FAULT_BMS_STATES,
    BmsSnapshot,
    BmsState,
    ContactorState,
    Event,
    FaultCleared,
    FaultKind,
    FaultRaised,
    InverterStatus,
    PackContactor,
)

# Every BMS field the core decides on. A snapshot that changes none of them (only pack
# voltage and current noise, say) cannot change a decision: the BMS reader hands one out
# only when one of these (or their staleness) changed, and replays keep only these.
DECISION_BMS_FIELDS = CRITICAL_BMS_FIELDS + ("soc_max_pct",)


# Data that got old: a link down (or the gateway's own pause). Never counted toward the lockout.
FRESHNESS_FAULTS = frozenset({FaultKind.BMS_STALE, FaultKind.INVERTER_COMMS})


def forgive_stall(present: dict[FaultKind, str], latched: tuple[FaultKind, ...]) -> dict[FaultKind, str]:
    """While resyncing after the gateway's own stall, stale data raises no new fault.

    Such a fault would be the gateway's, not the vehicle's or the inverter's, and
    would count toward the lockout that only an installer can clear. A fault
    already latched before the stall stays latched: the stall proves nothing about it.
    """
    return {kind: detail for kind, detail in present.items() if kind not in FRESHNESS_FAULTS or kind in latched}


def bms_usable(bms: BmsSnapshot | None, now: float, policy: Policy) -> bool:
    """Fresh enough to act on: recent, and every critical field present and not stale. Data stamped after
    `now` (the clock went back since) is not recent: its age is unknown, and it would stay "fresh" for as
    long as the step back."""
    return (bms is not None and 0.0 <= now - bms.received_at <= policy.bms_timeout_s
            and not bms.missing_critical)


def inverter_usable(inv: InverterStatus | None, now: float, policy: Policy) -> bool:
    return inv is not None and inv.comms_ok and 0.0 <= now - inv.received_at <= policy.inverter_timeout_s


def conditions(bms: BmsSnapshot | None, inv: InverterStatus | None, now: float, policy: Policy,
               bms_seen: bool, inverter_seen: bool) -> dict[FaultKind, str]:
    """The fault conditions present now, kind -> detail.

    Data that has never arrived is start-up, not a fault; data that arrived and
    then stopped is one.
    """
    found: dict[FaultKind, str] = {}
    if bms_seen and not bms_usable(bms, now, policy):
        found[FaultKind.BMS_STALE] = _bms_stale_detail(bms, now)
    if bms is not None:
        if bms.fresh("bms_state") and bms.bms_state in FAULT_BMS_STATES:
            found[FaultKind.BMS_FAULT] = f"BMS state {BmsState(bms.bms_state).name}"
        if ContactorState.WELDED in (bms.contactor_state,) or PackContactor.WELDED in (
                bms.pack_contactor_neg, bms.pack_contactor_pos):
            found[FaultKind.CONTACTOR_WELDED] = "a contactor reports WELDED"
        # Written so that a temperature that is no number (NaN) is a fault, never taken for a cool pack.
        if bms.fresh("max_temp_c") and not bms.max_temp_c <= policy.max_temp_c:
            found[FaultKind.OVER_TEMP] = f"pack {bms.max_temp_c:.1f} °C > {policy.max_temp_c:.0f} °C"
        if bms.fresh("min_temp_c") and not bms.min_temp_c > policy.min_temp_c:
            found[FaultKind.UNDER_TEMP] = f"pack {bms.min_temp_c:.1f} °C, at or below {policy.min_temp_c:.0f} °C"
    if inverter_seen and not inverter_usable(inv, now, policy):
        found[FaultKind.INVERTER_COMMS] = (inv.error if inv is not None and inv.error else "inverter data too old")
    if inv is not None and inv.comms_ok and inv.faulted:
        found[FaultKind.INVERTER_FAULT] = f"InvSt FAULT, alarms 0x{inv.alarms:08x}"
    return found


def _bms_stale_detail(bms: BmsSnapshot | None, now: float) -> str:
    if bms is None:
        return "no BMS data"
    if bms.missing_critical:
        return "stale: " + ", ".join(bms.missing_critical)
    return f"no BMS data for {now - bms.received_at:.2f} s"


@dataclass(frozen=True)
class Latch:
    kind: FaultKind
    raised_at: float
    detail: str
    gone_since: float | None = None


@dataclass(frozen=True)
class FaultBook:
    latches: tuple[Latch, ...] = ()
    raised_times: tuple[float, ...] = ()
    locked_out: bool = False

    @property
    def kinds(self) -> tuple[FaultKind, ...]:
        return tuple(latch.kind for latch in self.latches)

    def update(self, present: dict[FaultKind, str], now: float, policy: Policy) -> tuple["FaultBook", list[Event]]:
        if not present and not self.latches and not self.raised_times:
            return self, []  # nothing latched, nothing present, nothing to forget: most steps
        events: list[Event] = []
        kept: list[Latch] = []
        for latch in self.latches:
            if latch.kind in present:
                kept.append(replace(latch, gone_since=None))
                continue
            gone_since = now if latch.gone_since is None else latch.gone_since
            if now - gone_since >= policy.fault_holdoff_s:
                events.append(FaultCleared(now, latch.kind))
            else:
                kept.append(replace(latch, gone_since=gone_since))
        latched = {latch.kind for latch in self.latches}
        raised = list(self.raised_times)
        for kind, detail in present.items():
            if kind not in latched:
                kept.append(Latch(kind, now, detail))
                if kind not in FRESHNESS_FAULTS:
                    raised.append(now)
                events.append(FaultRaised(now, kind, detail))
        recent = tuple(t for t in raised if now - t < policy.lockout_window_s)
        locked = self.locked_out
        if not locked and len(recent) >= policy.lockout_faults:
            locked = True
            events.append(FaultRaised(now, FaultKind.LOCKOUT, f"{len(recent)} faults within {policy.lockout_window_s:.0f} s"))
        return FaultBook(tuple(kept), recent, locked), events

    def reset_lockout(self, now: float) -> tuple["FaultBook", list[Event]]:
        """Installer reset: clears lockout and the fault history that caused it."""
        if not self.locked_out:
            return self, []
        return FaultBook(self.latches, (), False), [FaultCleared(now, FaultKind.LOCKOUT)]
