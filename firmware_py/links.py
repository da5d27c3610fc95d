"""The health of every link the gateway depends on, told once per outage and once on recovery.

A gateway in a garage loses its links for ordinary reasons (a USB-CAN adapter
re-plugged, the inverter rebooting, the aggregator's VTN down for maintenance)
and must heal by itself. Each link's adapter retries on its own with bounded
back-off; this book is where they all say how it goes, so that every link is
told the same way:

- one log line when a link is lost (with the cause), one when it is back (with
  how long it was gone), never one per failed retry;
- the same two moments journaled (`LinkLost`, `LinkRecovered`);
- for `status`, whether each link is up and the age of its last good data.

No decision is taken here: whether data is fresh enough to command power on is
the core's to judge. Times are on the core's (monotonic) clock.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from firmware_py.journal.kinds import RecordKind

log = logging.getLogger(__name__)


class Link(StrEnum):
    """The links, named as `status` shows them."""

    BMS = "bms"  # the CAN bus to the vehicle's BMS
    INVERTER = "inverter"  # Modbus to the inverter
    OPENADR = "openadr"  # the aggregator's OpenADR 2.0b VTN
    OPENADR3 = "openadr3"  # the aggregator's OpenADR 3 VTN
    SUNSPEC_SERVER = "sunspec_server"  # the gateway's own SunSpec DER server (its clients come and go)
    MQTT = "mqtt"  # the MQTT broker (Home Assistant, a fleet's broker): state out, owner commands in


@dataclass
class LinkState:
    """One link as last reported. `ok` None: not reported yet."""

    ok: bool | None = None
    last_good_at: float | None = None
    lost_at: float | None = None
    cause: str = ""


Note = Callable[[RecordKind, dict[str, Any]], None]


class LinkBook:
    """Every link's state; `good` and `lost` are what adapters call (cheap when nothing changes)."""

    def __init__(self, clock: Callable[[], float], note: Note | None = None) -> None:
        self.clock = clock
        self.note = note
        self.states: dict[Link, LinkState] = {}

    def handle(self, link: Link) -> LinkHandle:
        """What one adapter holds to report on its own link."""
        self.states.setdefault(link, LinkState())
        return LinkHandle(self, link)

    def good(self, link: Link, at: float | None = None) -> None:
        """The link delivered (data received, a request served, a poll answered)."""
        now = self.clock() if at is None else at
        self.states.setdefault(link, LinkState()).last_good_at = now
        self.up(link, now)

    def up(self, link: Link, at: float | None = None) -> None:
        """The link works but has delivered nothing (a server listening, no client served yet): up, with
        no last good data to date (`good` is for data)."""
        state = self.states.setdefault(link, LinkState())
        now = self.clock() if at is None else at
        if state.ok:
            return
        was_lost, state.ok = state.lost_at is not None, True
        if was_lost:
            gone_s = max(0.0, now - state.lost_at)
            log.info("link recovered: %s, after %.1f s", link, gone_s)
            self._note(RecordKind.LINK_RECOVERED, {"link": link.value, "after_s": round(gone_s, 3)})
        state.lost_at, state.cause = None, ""

    def lost(self, link: Link, cause: str) -> None:
        """The link failed; told once per outage (a later cause only updates what `status` shows)."""
        state = self.states.setdefault(link, LinkState())
        state.cause = cause
        if state.ok is False:
            log.debug("link %s still down: %s", link, cause)
            return
        state.ok, state.lost_at = False, self.clock()
        log.warning("link lost: %s: %s (retrying with back-off; the gateway holds what is safe meanwhile)",
                    link, cause)
        self._note(RecordKind.LINK_LOST, {"link": link.value, "cause": cause})

    def view(self, now: float) -> dict[str, dict[str, Any]]:
        """Each link as `status` shows it: `ok`, `age_s` of its last good data (None: never), the cause."""
        shown: dict[str, dict[str, Any]] = {}
        for link, state in self.states.items():
            age = None if state.last_good_at is None else round(max(0.0, now - state.last_good_at), 3)
            entry: dict[str, Any] = {"ok": bool(state.ok), "age_s": age}
            if state.ok is False:
                entry["cause"] = state.cause
            shown[link.value] = entry
        return shown

    def _note(self, kind: RecordKind, payload: dict[str, Any]) -> None:
        if self.note is None:
            return
        try:
            self.note(kind, payload)
        except Exception as err:  # noqa: BLE001 - a journal problem must not break a link's recovery
            log.error("could not journal %s: %s", kind, err)


@dataclass(frozen=True)
class LinkHandle:
    """One link's reporter, handed to its adapter."""

    book: LinkBook
    link: Link

    def good(self, at: float | None = None) -> None:
        self.book.good(self.link, at)

    def up(self, at: float | None = None) -> None:
        self.book.up(self.link, at)

    def lost(self, cause: str) -> None:
        self.book.lost(self.link, cause)


def next_poll_in(began: float, ended: float, interval_s: float) -> float:
    """Seconds until the next poll: one interval after the last one began (a steady beat, so the
    poll's own time does not stretch it), but never less than half an interval after it ended, so
    a peer slower than the interval is not asked again the moment it answers. Times on one clock."""
    return max(began + interval_s - ended, interval_s / 2)


class Backoff:
    """Retry delays for a lost link: the normal interval, doubling per failure, up to a ceiling.

    A peer that is down is asked again soon, then less and less often, so a long outage
    costs neither side anything, and one success (`reset`) returns to the normal pace."""

    def __init__(self, ceiling_s: float) -> None:
        self.ceiling_s = ceiling_s
        self.failures = 0

    def next(self, base_s: float) -> float:
        self.failures += 1
        return min(base_s * 2 ** min(self.failures - 1, 16), max(self.ceiling_s, base_s))

    def reset(self) -> None:
        self.failures = 0
