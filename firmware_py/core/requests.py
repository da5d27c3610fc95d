"""Dispatch requests: the one answer each gets, and which one is in force.

Answers depend on a `Judgement` of the gateway at that moment (faults,
outage, opt-out, energy above the floor), computed by the machine, so this
module holds only bookkeeping and the arithmetic of the energy budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from firmware_py.core.floor import stopping_energy_wh
from firmware_py.core.types import (
    DispatchAnswer,
    DispatchKind,
    DispatchRequest,
    ReasonCode,
    Verdict,
)

# Below this a "capped" discharge is not worth running: refuse it instead.
MIN_USEFUL_W = 100.0
# How many ended requests are remembered, so a late duplicate still gets its answer.
ENDED_MEMORY = 128


@dataclass(frozen=True)
class Judgement:
    """What the gateway can promise now, as seen by the machine."""

    now: float
    refusal: ReasonCode | None  # LOCKOUT, FAULT, OUTAGE, NO_DATA: the gateway cannot serve at all
    refusal_detail: str
    opted_out: bool
    energy_above_floor_wh: float  # above the highest floor in the request's window
    discharge_limit_w: float
    charge_limit_w: float
    charge_headroom_wh: float
    ramp_w_per_s: float


@dataclass(frozen=True)
class Booked:
    """An answered request and its energy so far."""

    request: DispatchRequest
    answer: DispatchAnswer
    ended: bool = False
    meter_wh: float = 0.0
    integrated_wh: float = 0.0
    last_report_at: float = -math.inf

    @property
    def accepted(self) -> bool:
        return self.answer.verdict is not Verdict.REJECTED

    @property
    def target_w(self) -> float:
        """The power this request runs at: its cap when it was capped."""
        if self.answer.cap_w is not None:
            return self.answer.cap_w
        return self.request.target_w

    def in_window(self, now: float) -> bool:
        return self.request.start <= now < self.request.end


def invalid_reason(req: DispatchRequest) -> str | None:
    """Why a request cannot mean anything, or None when it is well formed."""
    if not isinstance(req.id, str) or not req.id.strip():
        return "empty id"
    numbers = {"target_w": req.target_w, "start": req.start, "end": req.end}
    for name, value in numbers.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"{name} is not a finite number: {value!r}"
    if not isinstance(req.kind, DispatchKind):
        return f"unknown kind {req.kind!r}"
    if req.kind is not DispatchKind.STOP and req.target_w <= 0:
        return f"target_w must be > 0 for {req.kind.value}, got {req.target_w}"
    if req.end <= req.start:
        return f"end {req.end} is not after start {req.start}"
    if req.ramp_w_per_s is not None and not (math.isfinite(req.ramp_w_per_s) and req.ramp_w_per_s > 0):
        return f"ramp_w_per_s must be > 0, got {req.ramp_w_per_s!r}"
    return None


def judge(req: DispatchRequest, j: Judgement) -> DispatchAnswer:
    """The answer for a new, well-formed, not yet seen request."""
    now = j.now

    def reject(code: ReasonCode, detail: str) -> DispatchAnswer:
        return DispatchAnswer(req.id, now, Verdict.REJECTED, reason=code, detail=detail)

    if req.end <= now:
        return reject(ReasonCode.EXPIRED, f"ended at {req.end}, now {now}")
    if req.kind is DispatchKind.STOP:
        return DispatchAnswer(req.id, now, Verdict.ACCEPTED, detail="stop")
    if j.refusal is not None:
        return reject(j.refusal, j.refusal_detail)
    if j.opted_out and req.kind is DispatchKind.DISCHARGE:
        return reject(ReasonCode.OPTED_OUT, "the owner has opted out")
    if req.kind is DispatchKind.CHARGE:
        return _capped(req, now, min(req.target_w, j.charge_limit_w), "charge limit",
                       j.charge_headroom_wh > 0)
    duration_h = (req.end - max(req.start, now)) / 3600
    ramp = req.ramp_w_per_s or j.ramp_w_per_s
    power = min(req.target_w, j.discharge_limit_w)
    budget = j.energy_above_floor_wh - stopping_energy_wh(power, ramp)
    if budget < power * duration_h:
        power = max(0.0, budget / duration_h)
        return _capped(req, now, power, f"energy above the floor {j.energy_above_floor_wh:.0f} Wh", True)
    return _capped(req, now, power, "power limit", True)


def _capped(req: DispatchRequest, now: float, power: float, why: str, possible: bool) -> DispatchAnswer:
    if not possible or power < MIN_USEFUL_W:
        return DispatchAnswer(req.id, now, Verdict.REJECTED, reason=ReasonCode.INSUFFICIENT_ENERGY,
                              detail=f"at most {power:.0f} W can be served ({why})")
    if power < req.target_w:
        return DispatchAnswer(req.id, now, Verdict.CAPPED, cap_w=round(power, 1), detail=f"capped by {why}")
    return DispatchAnswer(req.id, now, Verdict.ACCEPTED)


@dataclass(frozen=True)
class RequestBook:
    """Every answered request still worth remembering, oldest first."""

    entries: tuple[Booked, ...] = ()

    def find(self, request_id: str) -> Booked | None:
        for entry in reversed(self.entries):
            if entry.request.id == request_id:
                return entry
        return None

    def add(self, entry: Booked) -> "RequestBook":
        kept = [e for e in self.entries if e.request.id != entry.request.id]
        ended = [e for e in kept if e.ended]
        if len(ended) > ENDED_MEMORY:
            drop = {id(e) for e in ended[: len(ended) - ENDED_MEMORY]}
            kept = [e for e in kept if id(e) not in drop]
        return RequestBook((*kept, entry))

    def replace(self, entry: Booked) -> "RequestBook":
        return RequestBook(tuple(entry if e.request.id == entry.request.id else e for e in self.entries))

    def live(self) -> tuple[Booked, ...]:
        return tuple(e for e in self.entries if e.accepted and not e.ended)

    def in_force(self, now: float) -> Booked | None:
        """The request that applies now: of those in their window, the newest received."""
        current = [e for e in self.live() if e.in_window(now)]
        return max(current, key=lambda e: e.request.received_at, default=None)

    def end(self, request_id: str) -> "RequestBook":
        entry = self.find(request_id)
        return self if entry is None else self.replace(replace(entry, ended=True))
