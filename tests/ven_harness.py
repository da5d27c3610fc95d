"""What the OpenADR VENs' tests (2.0b and 3) share: how a stand-in core answers requests (one
answer per request, as the real core gives, without running it), the real pure core behind a VEN
where what it serves matters, a VEN served as a task for the length of a block, and a scenario run
with a bound."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from core_builders import Run, bms, inverter, ready

from firmware_py.core.controller import StepResult
from firmware_py.core.telemetry import telemetry
from firmware_py.core.types import DispatchAnswer, DispatchRequest, ReasonCode, Verdict
from firmware_py.dispatch import Telemetry
from firmware_py.tasks import cancel_all

Policy = Callable[[DispatchRequest], DispatchAnswer]
T = TypeVar("T")


def accept(request: DispatchRequest) -> DispatchAnswer:
    return DispatchAnswer(request.id, time.time(), Verdict.ACCEPTED)


def cap_at(watts: float) -> Policy:
    def policy(request: DispatchRequest) -> DispatchAnswer:
        if request.target_w <= watts:
            return accept(request)
        return DispatchAnswer(request.id, time.time(), Verdict.CAPPED, cap_w=watts,
                              reason=ReasonCode.INSUFFICIENT_ENERGY, detail="capped by energy above the floor")
    return policy


def opted_out(request: DispatchRequest) -> DispatchAnswer:
    return DispatchAnswer(request.id, time.time(), Verdict.REJECTED, reason=ReasonCode.OPTED_OUT,
                          detail="the owner opted out")


def run(scenario: Callable[[], Awaitable[T]], timeout_s: float = 20.0) -> T:
    return asyncio.run(asyncio.wait_for(scenario(), timeout_s))


@contextlib.asynccontextmanager
async def serving(ven: Any, sink: Any) -> AsyncIterator[asyncio.Task[None]]:
    """`ven.run(sink)` as a task while the block runs, cancelled and awaited after it."""
    task = asyncio.create_task(ven.run(sink))
    try:
        yield task
    finally:
        await cancel_all([task])


class CoreSink(Run):
    """The real pure core behind the VEN, stepped with healthy BMS and inverter data at each item the VEN
    hands over and as the test moves its clock on (`run`), never waiting for the wall clock. Its clock
    starts at the wall clock's now, which the VEN places the VTN's times on; `observers` see every step
    as the gateway's do, and `setpoints` is every step's command."""

    def __init__(self) -> None:
        now = time.time()
        super().__init__(ready(now), t=now)
        self.received: list[Any] = []
        self.observers: list[Any] = []
        self.setpoints: list[float] = []

    def feed(self, *inputs: Any) -> StepResult:
        result = super().feed(*inputs)
        self.setpoints.append(result.command.setpoint_w)
        for observe in self.observers:
            observe(result)
        return result

    async def submit(self, item: Any) -> DispatchAnswer | None:
        self.received.append(item)
        result = self.feed(bms(self.t, self.soc), inverter(self.t, measured_w=self.applied_w,
                                                           tot_wh_inj=self.meter_wh), item)
        return result.answer_for(item.id) if isinstance(item, DispatchRequest) else None

    def telemetry(self) -> Telemetry:
        return telemetry(self.c, self.t)

    def now(self) -> float:
        return self.t

    def note(self, kind: Any, payload: dict[str, Any]) -> None:
        pass

    def journal_notes(self, kind: Any, back_s: float) -> list[dict[str, Any]]:
        return []

    def journaled_wh(self, request_id: str) -> float:
        return 0.0  # no journal: a bench run has no run before it
