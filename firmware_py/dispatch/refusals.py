"""What the DER server refused, counted exactly and journaled at a bounded rate.

Anyone who can reach the DER server's port can make it refuse things (writes from
outside the allow-list, other unit ids, unsupported functions, bad frames, one
connection too many), and can do so thousands of times a second. Journaling and
logging each refusal let such a peer fill the journal's disk and the log, after
which every dispatch is refused. So refusals are counted per (client, cause):

- the first refusal of a (client, cause) is journaled (`SunSpecWriteRefused`,
  with the request's details) and logged at once, so a misconfigured site
  controller shows up immediately with the reason;
- later ones of the same (client, cause) are only counted; once per interval
  (60 s) each count above zero becomes one `SunSpecRefusals` record and one log
  line; a (client, cause) with nothing counted since its last record is
  forgotten at the interval's end (its next refusal is journaled at once again);
- at most `max_clients` (client, cause) pairs are tracked; refusals from further
  clients are counted under the client `OTHER_CLIENTS`, per cause.

Nothing is lost: every refusal is in the journal exactly once, either as its own
record or inside a summary's `count`. The journal's cost is bounded whatever the
packet rate: per interval at most (max_clients + number of causes) records of
each kind. The clock is injected (a monotonic one in the server, a number in tests).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from firmware_py.journal.kinds import RecordKind

log = logging.getLogger("firmware_py.dispatch.sunspec_server")

FIRST_KIND = RecordKind.SUNSPEC_WRITE_REFUSED  # historical name: it holds any first refusal, not only writes
SUMMARY_KIND = RecordKind.SUNSPEC_REFUSALS
SUMMARY_INTERVAL_S = 60.0
MAX_CLIENTS = 64
OTHER_CLIENTS = "other clients"


class Cause(StrEnum):
    """Why a request or connection was refused; the journal stores the value."""

    NOT_ALLOWED = "not_allowed"  # a write from a client outside allow_write_from
    OTHER_UNIT = "other_unit"  # a unit id that is not this DER's
    UNSUPPORTED_FUNCTION = "unsupported_function"  # a Modbus function the DER does not serve
    MALFORMED = "malformed"  # a frame or request that does not parse (bad count, length, header)
    BAD_ADDRESS = "bad_address"  # outside the map, read-only, unsupported point, partial point
    BAD_VALUE = "bad_value"  # out of range, undefined enumeration, "not implemented"
    CORE_ERROR = "core_error"  # the gateway could not hand the write to its core (a bug)
    TOO_MANY_CONNECTIONS = "too_many_connections"  # over a connection cap: closed at once
    STALLED_REQUEST = "stalled_request"  # a request left half-sent (or unread replies) too long: closed


@dataclass(frozen=True)
class Refusal:
    """One refused request or connection: who, why, and what it asked for (None when not a request)."""

    client: str
    cause: Cause
    reason: str
    function: int | None = None
    register: int | None = None
    count: int | None = None
    exception: str | None = None  # the Modbus exception's name, when one was sent
    trace: str | None = None  # a traceback worth logging once (CORE_ERROR); never journaled

    def payload(self) -> dict[str, Any]:
        """The journal record of a first refusal (the fields `SunSpecWriteRefused` always had, and the cause)."""
        return {"client": self.client, "cause": self.cause.value, "function": self.function,
                "register": self.register, "count": self.count, "exception": self.exception,
                "reason": self.reason}


@dataclass
class _Tracked:
    """A (client, cause) seen this interval: refusals counted since its last record, and the newest."""

    counted: int
    last: Refusal


Journal = Callable[[RecordKind, dict[str, Any]], None]


class RefusalLedger:
    """Counts refusals and journals/logs them at a bounded rate (see the module docstring)."""

    def __init__(self, journal: Journal, clock: Callable[[], float], *, interval_s: float = SUMMARY_INTERVAL_S,
                 max_clients: int = MAX_CLIENTS) -> None:
        self._journal, self._clock = journal, clock
        self.interval_s, self.max_clients = interval_s, max_clients
        self._tracked: dict[tuple[str, Cause], _Tracked] = {}
        self._next_summary = clock() + interval_s
        self.totals: Counter[Cause] = Counter()  # every refusal since start, by cause (exact)

    def record(self, refusal: Refusal) -> bool:
        """Count `refusal`; True when it was journaled and logged on its own (the first of its kind)."""
        self.tick()
        self.totals[refusal.cause] += 1
        key = self._key(refusal)
        tracked = self._tracked.get(key)
        if tracked is not None:
            tracked.counted += 1
            tracked.last = refusal
            return False
        self._tracked[key] = _Tracked(0, refusal)
        self._write(FIRST_KIND, refusal.payload())
        log.warning("SunSpec DER server refused %s from %s: %s%s (more of these from this client are counted "
                    "and summarised every %.0f s)", _what(refusal), refusal.client, refusal.reason,
                    f" [{refusal.exception}]" if refusal.exception else "", self.interval_s)
        if refusal.trace:
            log.warning("%s", refusal.trace)
        return True

    def tick(self) -> int:
        """Write the interval's summaries once it has ended; the number of summaries written."""
        now = self._clock()
        if now < self._next_summary:
            return 0
        self._next_summary = now + self.interval_s
        return self._summarise(final=False)

    def flush(self) -> int:
        """Write every count not yet journaled (at a stop): nothing counted is lost."""
        return self._summarise(final=True)

    def _key(self, refusal: Refusal) -> tuple[str, Cause]:
        key = (refusal.client, refusal.cause)
        if key in self._tracked or len(self._tracked) < self.max_clients:
            return key
        return OTHER_CLIENTS, refusal.cause

    def _summarise(self, *, final: bool) -> int:
        written = 0
        for key, tracked in list(self._tracked.items()):
            if tracked.counted:
                self._write(SUMMARY_KIND, self._summary(key, tracked))
                log.warning("SunSpec DER server: %d more refused (%s) from %s since the last record (last: %s)",
                            tracked.counted, key[1].value.replace("_", " "), key[0], tracked.last.reason)
                written += 1
                tracked.counted = 0
                if not final:
                    continue
            del self._tracked[key]  # quiet since its last record (or stopping): its next refusal is a first again
        return written

    def _summary(self, key: tuple[str, Cause], tracked: _Tracked) -> dict[str, Any]:
        last = tracked.last
        return {"client": key[0], "cause": key[1].value, "count": tracked.counted, "interval_s": self.interval_s,
                "function": last.function, "exception": last.exception, "reason": last.reason}

    def _write(self, kind: RecordKind, payload: dict[str, Any]) -> None:
        try:
            self._journal(kind, payload)
        except Exception:
            log.exception("could not journal a SunSpec refusal")


def _what(refusal: Refusal) -> str:
    if refusal.function is None:
        return "a connection"
    at = f" at {refusal.register}" if refusal.register is not None else ""
    return f"function {refusal.function}{at}"
