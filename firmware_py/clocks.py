"""The gateway's two clocks, and the one place an instant crosses from one to the other.

A gateway board often has no real-time clock: it boots with a wrong date that NTP
later steps by hours or years. A step backwards would make stale data look fresh
for as long as the step; a step forwards would fault everything at once. So:

- the core runs on ONE time base, the monotonic clock: every `received_at`, every
  `now`, freshness, timeouts, ramps, hold-offs, refreshes and back-offs;
- wall time (UTC epoch seconds) exists only where a person or an aggregator reads
  or writes an instant: an event's window as received, a departure or opt-out time,
  a journal record's timestamp, a report.

Adapters convert a wall instant to the core's base when it is received
(`to_core`) and back when it is shown (`to_wall`). From then on the instant is
a point on the monotonic line: a later step of the wall clock neither moves an
event's end nor hides stale data. (The price: an instant received while the wall
clock was wrong stays as wrong as the clock was then.)

`Clocks.system()` is what `run` uses. A simulation has one clock for both
(`Clocks.simulated`): nothing can step it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from datetime import date as dt_date
from datetime import time as day_time

Clock = Callable[[], float]

WALL_DECIMALS = 3
"""Wall instants shown or saved from the core's base are whole milliseconds (`Clocks.to_wall`)."""


@dataclass(frozen=True)
class Clocks:
    """A monotonic clock (the core's base) and a wall clock (UTC epoch seconds), read together."""

    monotonic: Clock
    wall: Clock

    @classmethod
    def system(cls) -> Clocks:
        """The real gateway: `time.monotonic` for the core, `time.time` for people."""
        return cls(time.monotonic, time.time)

    @classmethod
    def simulated(cls, clock: Clock) -> Clocks:
        """One clock serving as both (the bench's simulated time, a test's number)."""
        return cls(clock, clock)

    def now(self) -> float:
        """The core's now."""
        return self.monotonic()

    def offset(self) -> float:
        """Wall minus monotonic, right now: what converts an instant between the two."""
        return self.wall() - self.monotonic()

    def to_core(self, wall_s: float) -> float:
        """A wall instant (UTC epoch s) on the core's base, as of now; ±inf and nan pass unchanged."""
        return wall_s - self.offset() if math.isfinite(wall_s) else wall_s

    def to_wall(self, core_s: float) -> float:
        """A core instant as wall time (UTC epoch s), as of now, to the millisecond; ±inf and nan pass
        unchanged.

        To the millisecond because the way there and back is not exact: the offset is read anew each time
        (microseconds apart) and the sums round at 1e-7 s for today's epoch. A departure the owner set for
        23:00 came back as 22:59:59.9999998, shown as "10:59 PM", and every later save of the settings moved
        it again. No one sets or reads an instant finer than a millisecond."""
        return round(core_s + self.offset(), WALL_DECIMALS) if math.isfinite(core_s) else core_s

    def from_datetime(self, moment: datetime) -> float:
        """An aware datetime (an OpenADR event's start, say) on the core's base."""
        return self.to_core(moment.timestamp())


def utc_text(wall_s: float) -> str:
    """A wall instant as ISO-8601 UTC to the nearest second, for people and aggregators. Rounded, not cut:
    a time the owner set on the wall clock comes back through the core's monotonic clock a few ms either
    side of it, and cut, a storm watch set until 01:46 read 01:45:59 (the page, dropping the seconds, said
    1:45) on one read in two."""
    return datetime.fromtimestamp(round(wall_s), UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def as_clocks(clock: Clocks | Clock) -> Clocks:
    """`Clocks` as given, or one clock serving as both (a simulation's or a test's)."""
    return clock if isinstance(clock, Clocks) else Clocks.simulated(clock)


def calendar_day(wall_s: float, tz: tzinfo | None = None) -> tuple[str, float, float]:
    """The date (ISO `YYYY-MM-DD`) at wall instant `wall_s` in `tz` (None: the gateway's local
    time zone), and the wall instants it began and the next one begins: what a daily budget counts by.
    Each midnight is placed with its own UTC offset, so the day of a daylight-saving change is
    23 or 25 h long (one offset for both would start that day an hour early or late)."""
    date = datetime.fromtimestamp(wall_s, tz).date()
    return date.isoformat(), local_midnight(date, tz), local_midnight(date + timedelta(days=1), tz)


def local_midnight(date: dt_date, tz: tzinfo | None = None) -> float:
    """The wall instant `date` begins in `tz`; None: the gateway's local time zone, whose offset at
    that midnight the C library applies to a naive time (a fixed `astimezone()` offset would be now's)."""
    midnight = datetime.combine(date, day_time(0))
    return (midnight if tz is None else midnight.replace(tzinfo=tz)).timestamp()
