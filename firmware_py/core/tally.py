"""Delivered energy as a meter that only goes up: what an energy dashboard and a counter need.

The controller keeps each dispatch event's billed (meter) energy in its request
book, and forgets ended events after a while; a dashboard wants one number that
only increases. `tallied` reads the book as it is now against what was read
before and adds only growth, so a forgotten event takes nothing away and an
event read twice counts once. Pure: the reader keeps the `Tally` it was given.

The total counts from the moment the reader started (a restart starts it at 0,
which Home Assistant's `total_increasing` and Prometheus counters both take as a
new meter cycle, not as energy given back).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from firmware_py.core.controller import Controller
from firmware_py.core.energy import delivered_wh


@dataclass(frozen=True)
class Tally:
    """Delivered energy since the reader started, and the event seen last."""

    total_wh: float = 0.0
    seen: Mapping[str, float] = field(default_factory=dict)  # event id -> its meter energy when last read
    last_event_id: str | None = None
    last_event_wh: float | None = None


def tallied(before: Tally, c: Controller) -> Tally:
    """`before` brought up to date with the controller's book (every remembered discharge event)."""
    now = delivered_wh(c)
    growth = sum(max(0.0, wh - before.seen.get(event, 0.0)) for event, wh in now.items())
    last = c.serving_id if c.serving_id in now else next(reversed(now), None)
    if last is None:
        last_id, last_wh = before.last_event_id, before.last_event_wh
    else:
        last_id, last_wh = last, round(now[last], 3)
    return Tally(round(before.total_wh + growth, 3), now, last_id, last_wh)
