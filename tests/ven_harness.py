"""What the OpenADR VENs' tests (2.0b and 3) share: how a stand-in core answers requests (one
answer per request, as the real core gives, without running it), a VEN served as a task for the
length of a block, and a scenario run with a bound."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from firmware_py.core.types import DispatchAnswer, DispatchRequest, ReasonCode, Verdict
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
