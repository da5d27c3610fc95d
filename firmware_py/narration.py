"""What the running gateway tells people: one log line per thing worth knowing.

Someone reading `journalctl -u powershare-gw` after a night in the garage should
find, each on one line, every mode transition (from, to, why), every fault raised
and cleared, every dispatch request with its answer, every event's end and
energy, every owner change, the end of a resync after a stall; links lost and
recovered are told by the link book (`firmware_py/links.py`), the safe stop by
the service. Expected conditions never print a traceback, and no secret (tokens,
keys) is ever part of a line: only what the core decided and why.

`Narrator` watches the gateway's steps (an observer); `configure_logging` sets up
stderr so that journald files each line at its priority. `run` logs through
`lines_written_aside`: a line is queued where it is said and written by a thread
of its own, so the warning a BMS fault raises never delays the 0 W it decides.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import queue
import sys
import traceback
from collections.abc import Iterator
from datetime import UTC, datetime
from logging.handlers import QueueHandler, QueueListener
from typing import TextIO

from firmware_py.clocks import Clocks
from firmware_py.core import StepResult
from firmware_py.core.controller import Controller
from firmware_py.core.types import (
    DispatchAnswer,
    DispatchEnded,
    DispatchKind,
    Event,
    EventEnergy,
    FaultCleared,
    FaultKind,
    FaultRaised,
    OwnerSettings,
    Resynced,
    Transition,
    Verdict,
    describe,
)
from firmware_py.quoting import printable

log = logging.getLogger("firmware_py.gateway.narration")


class Narrator:
    """An observer of the gateway's steps that logs what changed, one line each."""

    def __init__(self, clocks: Clocks) -> None:
        self.clocks = clocks
        self._owner: OwnerSettings | None = None

    def __call__(self, result: StepResult) -> None:
        c = result.controller
        if c.owner is not self._owner:
            if self._owner is not None and _changed(self._owner, c.owner):
                log.info("owner settings changed: %s", self._settings(c.owner))
            self._owner = c.owner
        for event in result.events:
            self._tell(event, c)

    def _tell(self, event: Event, c: Controller) -> None:
        if isinstance(event, Transition):
            log.info("mode %s -> %s: %s", event.from_state.value, event.to_state.value, event.reason)
        elif isinstance(event, FaultRaised):
            if event.kind is FaultKind.LOCKOUT:
                log.error("LOCKOUT: %s; 0 W until an installer reset", event.detail)
            else:
                log.warning("fault raised: %s (%s)", event.kind, event.detail)
        elif isinstance(event, FaultCleared):
            if event.kind is FaultKind.LOCKOUT:
                log.warning("lockout cleared by an installer reset: the gateway starts again")
            else:
                log.info("fault cleared: %s", event.kind)
        elif isinstance(event, DispatchAnswer) and (price := self._price(event.request_id, c)) is not None:
            log.info("price %s: %s", price, describe(event))  # a price under the threshold is no trouble
        elif isinstance(event, DispatchAnswer):
            level = logging.WARNING if event.verdict is Verdict.REJECTED else logging.INFO
            log.log(level, "dispatch %s: %s", self._request(event.request_id, c), describe(event))
        elif isinstance(event, DispatchEnded):
            log.info("dispatch %s ended: %s", event.request_id, event.reason)
        elif isinstance(event, EventEnergy) and event.final:
            log.info("dispatch %s energy: %.1f Wh by the inverter meter (%.1f Wh integrated)",
                     event.request_id, event.meter_wh, event.integrated_wh)
        elif isinstance(event, Resynced):
            if event.fresh:
                log.info("resynced after the %.2f s stall: fresh BMS and inverter data after %.2f s",
                         event.gap_s, event.waited_s)
            else:
                log.warning("no fresh data %.0f s after the %.2f s stall: stale data faults as usual now",
                            event.waited_s, event.gap_s)

    def _price(self, request_id: str, c: Controller) -> str | None:
        """A published price in words, when `request_id` names one (None for a request)."""
        entry = c.book.find(request_id)
        if entry is None or entry.price is None:
            return None
        p = entry.price
        return (f"{p.id} from {p.source} ({p.kind.value} {p.price_per_kwh:g} per kWh, {self._when(p.start)} to "
                f"{self._when(p.end)}, rev {p.revision})")

    def _request(self, request_id: str, c: Controller) -> str:
        entry = c.book.find(request_id)
        if entry is None:
            return request_id
        r = entry.request
        target = "" if r.kind is DispatchKind.STOP else f" {r.target_w:.0f} W"
        return (f"{r.id} from {r.source} ({r.kind.value}{target}, {self._when(r.start)} to {self._when(r.end)}, "
                f"rev {r.revision})")

    def _settings(self, s: OwnerSettings) -> str:
        parts = [f"reserve {percent(s.reserve_pct)}"]
        if s.opt_out_until is not None:
            parts.append("opted out until " + ("revoked" if s.opt_out_until == math.inf else self._when(s.opt_out_until)))
        if s.opt_out_events:
            parts.append("opted out of " + ", ".join(sorted(s.opt_out_events)))
        if s.departure_at is not None:
            parts.append(f"departure {self._when(s.departure_at)} at {percent(s.departure_soc_pct)}")
        if s.storm_watch_until is not None and s.storm_watch_floor_pct is not None:
            parts.append(f"storm watch {percent(s.storm_watch_floor_pct)} until {self._when(s.storm_watch_until)}")
        if s.price_mode:
            parts.append(f"price mode {s.price_kind.value} >= {s.price_threshold_per_kwh:g} per kWh, "
                         f"up to {s.price_max_wh_per_day:g} Wh a day")
        return ", ".join(parts)

    def _when(self, core_s: float) -> str:
        """A core instant as a person reads it: UTC (a simulation's seconds when it has no wall clock)."""
        if not math.isfinite(core_s):
            return "open"
        wall = self.clocks.to_wall(core_s)
        if wall < 1e8:  # a simulated clock: seconds since its start
            return f"{wall:.1f} s"
        return datetime.fromtimestamp(wall, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


LAST_READING = " (last reading: no fresh data)"
"""After a figure whose source has no fresh data, wherever it is shown to people (`status`, `owner status`)."""


def percent(value: float | None) -> str:
    """A percentage as people read it: to a tenth, no more than a SoC means ("63.2 %", "42 %")."""
    return "unknown" if value is None else f"{round(value, 1):g} %"


def _changed(before: OwnerSettings, after: OwnerSettings) -> bool:
    """A new wish, not merely the same settings received again."""
    keys = ("reserve_pct", "opt_out_until", "opt_out_events", "departure_at", "departure_soc_pct",
            "storm_watch_floor_pct", "storm_watch_until", "price_threshold_per_kwh", "price_max_wh_per_day",
            "price_kind", "price_power_w")
    return any(getattr(before, k) != getattr(after, k) for k in keys)


# ---------------------------------------------------------------------- log output

_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


_TRACEBACK_OWN = ("Traceback (", "  File ", "  [Previous line", "\nThe above exception", "\nDuring handling")
"""How the parts of a traceback that Python writes itself begin; any other part is what an exception says."""


class OneLineFormatter(logging.Formatter):
    """Each message one line, control characters escaped: an event id from a VTN holding a newline
    and `<3>` would otherwise forge a line of its own in the journal, and an escape rewrite a terminal."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        record.message = printable(record.message)
        return super().formatMessage(record)

    def formatException(self, ei) -> str:  # noqa: N802 (logging's name)
        """A traceback keeps its lines; what an exception says (its message may repeat a peer's text)
        is one line, escaped, like every message."""
        chunks = traceback.format_exception(*ei)
        return "".join(chunk if chunk.startswith(_TRACEBACK_OWN) else printable(chunk.removesuffix("\n")) + "\n"
                       for chunk in chunks).removesuffix("\n")


class JournaldFormatter(OneLineFormatter):
    """`<priority>logger: message`: journald files the line at that priority and stamps it itself (each
    line of a traceback too, so the whole of it is filed where its first line is)."""

    def format(self, record: logging.LogRecord) -> str:
        priority = _PRIORITY.get(record.levelno, 6 if record.levelno < logging.WARNING else 3)
        first, *rest = super().format(record).split("\n")
        return "\n".join([f"<{priority}>{record.name}: {first}", *(f"<{priority}>{line}" for line in rest)])


_TRACEBACKS = OneLineFormatter()


class _AsideHandler(QueueHandler):
    """Queues a record with its message made and its traceback as text, kept apart: the stock
    QueueHandler joins them into one message, which the one-line formatter would then flatten."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record = copy.copy(record)
        if record.exc_info and not record.exc_text:
            record.exc_text = _TRACEBACKS.formatException(record.exc_info)
        record.msg, record.args, record.exc_info = record.getMessage(), None, None
        return record


QUIETED = {"pymodbus": logging.CRITICAL, "openleadr": logging.CRITICAL, "apscheduler": logging.WARNING,
           "can_remote": logging.WARNING, "aiohttp": logging.WARNING, "mqtt": logging.WARNING}
"""Libraries that log every failed retry of a link (pymodbus an ERROR per timed-out poll) or their
chatter: the gateway tells each outage once itself (`links.py`). `-v` lets them all speak. aiomqtt's
warnings stay: the MQTT bridge counts a flood's discards from them (`mqtt.bridge.Discards`), which never
came at ERROR, so a flood in service was neither said nor counted."""


def configure_logging(verbose: bool = False, stream: TextIO | None = None) -> None:
    """Log to stderr (or `stream`): journald's format when systemd connected stderr to the journal,
    else timestamped."""
    handler = logging.StreamHandler(stream or sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(JournaldFormatter("%(message)s"))
    else:
        handler.setFormatter(OneLineFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    if not verbose:
        handler.addFilter(_quiet)  # on the handler too: openleadr sets its own level again when imported
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for name, level in QUIETED.items():
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else level)


def configure_command_logging() -> None:
    """What a command that sets up no logging of its own shows on stderr: warnings and errors, the
    libraries' retry chatter left out (pymodbus logs an ERROR and a dump of the last frames for each
    request that times out, where the command says what failed in one line). `run` and `commission`
    replace it with their own; where the process already logs somewhere (a test runner) it is not added."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_quiet)
    logging.basicConfig(level=logging.WARNING, handlers=[handler])


@contextlib.contextmanager
def lines_written_aside(verbose: bool = False, stream: TextIO | None = None) -> Iterator[None]:
    """`configure_logging`, with each line written to stderr by a thread of its own.

    On the gateway's loop, saying a line costs only its queueing: the formatting and the
    write to the journal's pipe (hundreds of microseconds on a small machine) happen in
    the writer thread. Every line queued is written before this returns (a process killed outright
    loses at most the lines still queued, a few milliseconds' worth; the journal keeps every record).
    Then the root logger is as it was before: `stream` may be closed once this returns.
    """
    root = logging.getLogger()
    before, level = root.handlers[:], root.level
    configure_logging(verbose, stream)
    handlers = root.handlers[:]
    lines: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    writer = QueueListener(lines, *handlers, respect_handler_level=True)
    root.handlers[:] = [_AsideHandler(lines)]
    writer.start()
    try:
        yield
    finally:
        root.handlers[:] = before  # first: a line said meanwhile goes straight out, not to a queue nobody reads
        root.setLevel(level)
        writer.stop()


def _quiet(record: logging.LogRecord) -> bool:
    """Below its `QUIETED` level, a chatty library's record does not reach the log."""
    return record.levelno >= QUIETED.get(_speaker(record), logging.NOTSET)


def _speaker(record: logging.LogRecord) -> str:
    """The library a record speaks for: its logger's, except asyncio's report of an exception raised in a
    library's own protocol callback, which is that library's. A peer that sends bytes pymodbus cannot decode
    (a device that is not Modbus, an echo service) had asyncio print pymodbus's traceback on every connection;
    the link's own outage line (`links.py`) says what failed, once."""
    top = record.name.partition(".")[0]
    if top != "asyncio" or not record.exc_info or (tb := record.exc_info[2]) is None:
        return top
    while tb.tb_next is not None:
        tb = tb.tb_next
    return str(tb.tb_frame.f_globals.get("__name__", "")).partition(".")[0] or top
