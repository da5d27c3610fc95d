"""The request book: every answered request worth remembering, and which one is in force.

Bookkeeping only. How a request is answered is `answers.py`; how its energy is
counted is `energy.py`. The book remembers ended requests too (up to
`ENDED_MEMORY`), so a late duplicate still gets its original answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import cached_property

from firmware_py.core.types import DispatchAnswer, DispatchKind, DispatchRequest, PriceInterval, Verdict

# How many ended requests are remembered, so a late duplicate still gets its answer: those whose window has
# closed (a late copy of one is refused as expired anyway) are forgotten first; one whose window is still open
# (stopped, cancelled, refused) is kept, so an unchanged copy is never served again, up to a hard bound.
ENDED_MEMORY = 128
ENDED_MEMORY_MAX = 4 * ENDED_MEMORY


@dataclass(frozen=True)
class Booked:
    """An answered request and its energy so far."""

    request: DispatchRequest
    answer: DispatchAnswer
    ended: bool = False
    withdrawn: bool = False  # a refusal its source cancelled, or a STOP ended before it ran: never asked again for
    stopped_by_owner: bool = False  # ended by the owner's opt-out: asked again for once it is revoked
    cancelled: bool = False  # ended by its source's cancel: served again if asked for again, unchanged, in its window
    meter_wh: float = 0.0
    integrated_wh: float = 0.0
    commanded_integral_wh: float = 0.0  # the integral, each interval no more than the commands allowed
    last_report_at: float = -math.inf
    price: PriceInterval | None = None  # a price-driven event: the published price it discharges for
    arrived_at: float | None = None  # when what it asks first came (`RequestBook.add`); None: its request's own time
    counted: DispatchKind | None = None  # the kind its energy was counted as; None: its request's kind

    @property
    def account_kind(self) -> DispatchKind:
        """The kind of energy its account holds. A refused revision is booked under the request it asked, but
        the energy it keeps was counted for the kind served before: a later revision continues the account only
        as that kind, never a charge on a discharge's Wh (billed twice) nor a discharge cut from its own."""
        return self.request.kind if self.counted is None else self.counted

    @property
    def arrival(self) -> float:
        """When what this request asks first came: what `in_force` ranks by. A revision asking the same
        (a re-ask after a cap, a fault, an outage or an opt-out cleared) keeps it, so the gateway asking
        again for a standing setting never takes the place of another source's request that came after."""
        return self.request.received_at if self.arrived_at is None else self.arrived_at

    @property
    def price_driven(self) -> bool:
        return self.price is not None

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


@dataclass(frozen=True)
class RequestBook:
    """Every answered request still worth remembering, oldest first."""

    entries: tuple[Booked, ...] = ()

    def find(self, request_id: str) -> Booked | None:
        for entry in reversed(self.entries):
            if entry.request.id == request_id:
                return entry
        return None

    def add(self, entry: Booked, now: float) -> "RequestBook":
        """Book `entry` in place of any entry of its id; a revision asking the same keeps that one's arrival."""
        entry = arrived(entry, self.find(entry.request.id), now)
        kept = [e for e in self.entries if e.request.id != entry.request.id]
        ended = [e for e in kept if e.ended]
        if len(ended) > ENDED_MEMORY:
            closed = [e for e in ended if e.request.end <= now]  # oldest first, as booked
            drop = {id(e) for e in closed[: len(ended) - ENDED_MEMORY]}
            still = [e for e in ended if id(e) not in drop]
            drop |= {id(e) for e in still[: max(0, len(still) - ENDED_MEMORY_MAX)]}
            kept = [e for e in kept if id(e) not in drop]
        return RequestBook((*kept, entry))

    def replace(self, entry: Booked) -> "RequestBook":
        return RequestBook(tuple(entry if e.request.id == entry.request.id else e for e in self.entries))

    @cached_property
    def live(self) -> tuple[Booked, ...]:
        """The accepted requests not ended. Worked out once per book: a book never changes, and most
        steps keep the one they were given, while each step asks for these several times."""
        return tuple(e for e in self.entries if e.accepted and not e.ended)

    def in_force(self, now: float) -> Booked | None:
        """The request that applies now: of those in their window, each source's first by its
        own priority (the newest of equals), then the newest of those. The newest is the one whose ask
        came last (`Booked.arrival`): a gateway's re-ask of a standing setting is no new instruction from
        its source, while a source's modification (another target, end or priority) is.

        A priority is a source's ranking of its own requests (OpenADR's event priority), so it
        never compares requests of two sources: an aggregator's and a site controller's are
        taken in the order they came. An aggregator's request takes precedence over
        price-driven discharge: a price event applies only while no request is in its window
        (docs/dispatch.md)."""
        current = [e for e in self.live if e.in_window(now)]
        asked = [e for e in current if e.price is None] or current
        first: dict[str, Booked] = {}
        for entry in asked:
            held = first.get(entry.request.source)
            if held is None or _rank(entry) < _rank(held):
                first[entry.request.source] = entry
        return max(first.values(), key=lambda e: e.arrival, default=None)

    def end(self, request_id: str) -> "RequestBook":
        entry = self.find(request_id)
        return self if entry is None else self.replace(replace(entry, ended=True))


def arrived(entry: Booked, earlier: Booked | None, now: float) -> Booked:
    """`entry` (its `arrived_at` unset) stamped with when what it asks first came: the earlier entry's arrival
    when it asks the same from `now` on, else its own (a new id, or a source's new instruction under its id:
    another target, end, priority or a start still ahead)."""
    same = earlier is not None and _asks(entry.request, now) == _asks(earlier.request, now)
    return replace(entry, arrived_at=earlier.arrival if same and earlier is not None else entry.arrival)


def _asks(request: DispatchRequest, now: float) -> tuple[object, ...]:
    """What a request asks of the truck from `now` on: a start already past is now (a re-ask of a standing
    setpoint starts now, and asks what it did), a start ahead is a time the source chose."""
    return request.kind, request.target_w, max(request.start, now), request.end, request.ramp_w_per_s, \
        request.priority


def _rank(entry: Booked) -> tuple[float, float]:
    """Sorts first what matters most: the lowest priority number (none after every number), then the newest
    to arrive."""
    return _priority_rank(entry.request), -entry.arrival


def _priority_rank(request: DispatchRequest) -> float:
    """A request's priority as a number to sort by: the lower the more it matters, none after every number."""
    return math.inf if request.priority is None else request.priority


def outranks(request: DispatchRequest, other: DispatchRequest) -> bool:
    """Whether `request` has a better priority than `other`, as `in_force` ranks one source's requests:
    a STOP of lower priority does not end it (an OpenADR event's 0 kW interval ends its own event's
    intervals and the source's events that matter no more than it, not an event ranked above it)."""
    return _priority_rank(request) < _priority_rank(other)
