"""How a stand-in core answers requests in the aggregator protocols' tests (OpenADR 2.0b and 3):
one answer per request, as the real core gives, without running it."""

from __future__ import annotations

import time
from collections.abc import Callable

from firmware_py.core.types import DispatchAnswer, DispatchRequest, ReasonCode, Verdict

Policy = Callable[[DispatchRequest], DispatchAnswer]


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
