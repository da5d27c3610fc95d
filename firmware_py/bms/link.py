"""The CAN bus to the BMS as a link that heals itself.

A bus can break under a running gateway in ways python-can does not repair: a
USB-CAN adapter re-plugged, `can0` taken down and up, the python-can-remote
server restarted (its client then fails every receive with "Socket closed
unexpectedly" for ever). Whatever the interface, the cure is the same: close
the bus and open it again. The service asks `supervise()` every tick:

- frames arriving (accepted or refused: the bus works) → healthy;
- receive errors and no frame since the last look, or no frame for longer than
  the BMS timeout → the link is lost: close the bus and reopen it, at once the
  first time, then with back-off doubling to `backoff_max_s`, until frames flow
  again (then the back-off starts over);
- a bus that cannot be reopened is retried the same way; the core meanwhile sees
  stale BMS data and holds 0 W. So is a reopen that takes longer than
  `OPEN_TIMEOUT_S` (a remote server that accepts the connection and never
  answers): it is abandoned, and its thread closes the bus should it open later;
- a bus that cannot be opened at start for want of the device (`BusUnavailable`:
  a USB-CAN adapter enumerated late, `can0` not up yet) starts the link down, and
  it heals when the bus opens. A bus the configuration cannot name (an unknown
  interface) still stops start-up.

A long gap between two looks is the gateway's own stall, not the bus's: the
silence is then measured afresh. The blocking python-can calls (stopping the
receive thread, closing and opening the bus) run in a worker thread so the event
loop keeps stepping the core. Nothing here is on the frame path: liveness is read
from the reader's own counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable

import can

from firmware_py.bms.bus import BusUnavailable, shutdown_quietly
from firmware_py.bms.reader import ERROR_PAUSE_S, BmsListener, BmsReader
from firmware_py.core.types import BmsSnapshot
from firmware_py.errors import InputError
from firmware_py.links import LinkHandle

log = logging.getLogger(__name__)

RECV_TIMEOUT_S = 0.1
"""How often python-can's receive thread wakes on a quiet bus: what closing the bus may wait for it."""
NOTIFIER_STOP_S = 2.0
"""The most closing waits for that thread (a bus blocked in its driver is left to finish alone)."""
CLOSE_WAIT_S = 2.0
"""The most closing waits for a reopen still closing the old bus (the open itself is never waited for:
a reopen closes what it opens once the link is closed)."""
OPEN_TIMEOUT_S = 5.0
"""The most one reopen is waited for. python-can opens a bus in well under a second (a local adapter,
a python-can-remote server that answers); a driver that never returns (can_remote's connection has no
timeout) must not stop the link from trying again once the far end recovers. A few seconds, not less:
an open cut short by a slow but healthy server would be abandoned every time."""


class _Listener(BmsListener):
    """The reader's listener, remembering its last receive error for the link instead of logging it."""

    def __init__(self, reader: BmsReader, on_snapshot: Callable[[BmsSnapshot], None]) -> None:
        super().__init__(reader, on_snapshot)
        self.last_error = ""
        self.failed = threading.Event()  # set at the first receive error (the link acts on the next look)

    def on_error(self, exc: Exception) -> None:
        self.errors += 1
        self.last_error = str(exc) or type(exc).__name__
        self.failed.set()
        log.debug("CAN receive error: %s", self.last_error)
        time.sleep(ERROR_PAUSE_S)  # a bus failing every call must not spin a core


class CanLink:
    """One CAN bus, reopened when it breaks; see the module docstring.

    `opener` opens the bus as the configuration says (an `InputError` when it
    cannot); the first open happens here, so a wrong interface stops start-up, while
    a device that is not there yet (`BusUnavailable`) leaves the link down and retried.
    """

    def __init__(self, opener: Callable[[], can.BusABC], reader: BmsReader, clock: Callable[[], float], *,
                 silence_s: float, stall_gap_s: float, link: LinkHandle | None = None,
                 backoff_min_s: float = 0.5, backoff_max_s: float = 30.0, close_wait_s: float = CLOSE_WAIT_S,
                 open_timeout_s: float = OPEN_TIMEOUT_S) -> None:
        self._opener = opener
        self.reader, self.clock, self.link = reader, clock, link
        self.silence_s, self.stall_gap_s = silence_s, stall_gap_s
        self.backoff_min_s, self.backoff_max_s = backoff_min_s, backoff_max_s
        self.close_wait_s, self.open_timeout_s = close_wait_s, open_timeout_s
        self.notifier: can.Notifier | None = None
        self.listener: _Listener | None = None
        self.reopens = 0
        self._on_snapshot: Callable[[BmsSnapshot], None] | None = None
        self._frames_seen = 0  # the reader's counts at start: only a frame counted after it is a BMS frame
        self._errors_seen = 0
        self._failing = False  # a receive error not yet followed by frames
        self._last_frame_at = self._checked_at = -math.inf
        # When the last frame really came (or listening began): what the silence cause counts from.
        # `_last_frame_at` is moved on at every reopen and pause, to time the next reopen, so a cause
        # counted from it said "no BMS frame for 0.8 s" of a bus silent for minutes.
        self._heard_at = -math.inf
        self._backoff = 0.0
        self._next_attempt = -math.inf
        self._open_error = ""
        self._hang_told = False  # a reopen timed out in this outage and was logged: once is enough
        self._lock = threading.RLock()  # a reopen in its worker thread and a shutdown never interleave
        self._closed = False
        self.bus: can.BusABC | None = self._first_open()

    def _first_open(self) -> can.BusABC | None:
        """The bus, or None when its device is not there yet: with systemd's start limit, failing
        here would leave the gateway down until a reboot for an adapter that shows up a minute late."""
        try:
            return self._opener()
        except BusUnavailable as err:
            self._open_error = f"cannot open the bus: {err}"
            log.warning("%s; the gateway starts without BMS data (0 W) and retries with back-off", self._open_error)
            return None  # the first look (`supervise`) tells the link book: the outage is logged once

    @property
    def open_error(self) -> str:
        """Why the bus is not open (empty while it is, or before any open failed)."""
        return self._open_error

    # --- intake -------------------------------------------------------------------------
    def start(self, on_snapshot: Callable[[BmsSnapshot], None]) -> None:
        """Start receiving (python-can's Notifier thread decodes; `on_snapshot` gets what the core needs).

        No event loop is given to the Notifier on purpose: with one, python-can
        re-raises a receive error and its thread dies, silencing the BMS.
        """
        self._on_snapshot = on_snapshot
        if self.bus is not None:  # else the first reopen that succeeds starts listening
            self._listen()
        self._last_frame_at = self._checked_at = self._heard_at = self.clock()

    def _listen(self) -> None:
        assert self.bus is not None and self._on_snapshot is not None
        self.listener = _Listener(self.reader, self._on_snapshot)
        self._errors_seen, self._failing = 0, False
        self.notifier = can.Notifier(self.bus, [self.listener], timeout=RECV_TIMEOUT_S)

    def stop(self) -> None:
        """Stop receiving (the bus stays open until `close`)."""
        notifier, self.notifier = self.notifier, None
        if notifier is not None:
            notifier.stop(timeout=NOTIFIER_STOP_S)

    def close(self) -> None:
        """Stop receiving and close the bus for good, quietly if it is already broken.

        A reopen still closing the old bus is waited for at most `close_wait_s`, one opening the new
        one not at all (it shuts that bus down itself): the gateway's exit must not hang on an adapter
        (or a remote server) that never answers.
        """
        self._closed = True  # first: a reopen that outlasts the wait sees it and closes what it opened
        if not self._lock.acquire(timeout=self.close_wait_s):
            log.warning("the CAN bus is still being closed by a reopen after %g s: "
                        "that reopen closes whatever it opens", self.close_wait_s)
            return
        try:
            self._close_bus()
        finally:
            self._lock.release()

    def _close_bus(self) -> None:
        self.stop()
        bus, self.bus = self.bus, None
        if bus is not None:
            shutdown_quietly(bus, log)

    # --- healing ------------------------------------------------------------------------
    async def supervise(self) -> None:
        """One look at the link; reopens the bus when it is lost and the back-off allows."""
        now = self.clock()
        stalled, self._checked_at = now - self._checked_at > self.stall_gap_s, now
        # The BMS's frames, taken or refused; not another node's 29-bit ones that share a BMS id's number: with
        # those on the bus a BMS gone silent was never found (no reopen, the link said good)
        frames = self.reader.accepted + self.reader.dropped.total() - self.reader.dropped["extended_id"]
        flowing = frames != self._frames_seen
        if flowing:
            self._frames_seen, self._last_frame_at, self._heard_at = frames, now, now
            self._backoff, self._next_attempt = 0.0, -math.inf
            self._hang_told = False
            if self.link is not None:
                self.link.good(now)
        elif stalled:
            self._last_frame_at = now  # the gateway itself paused: the bus is judged afresh
        problem = self._problem(now, flowing)
        if problem is None:
            return
        if self.link is not None:
            self.link.lost(problem)
        if now >= self._next_attempt:
            await self._reopen()

    def _problem(self, now: float, flowing: bool) -> str | None:
        """What is wrong with the link now, or None. A receive error counts until frames follow it."""
        if self.bus is None:
            return self._open_error or "the bus is closed"
        listener = self.listener
        if listener is not None and listener.errors != self._errors_seen:
            self._errors_seen, self._failing = listener.errors, True
        elif flowing:
            self._failing = False
        if self._failing and not flowing:
            return f"CAN receive error: {listener.last_error if listener is not None else 'unknown'}"
        if now - self._last_frame_at > self.silence_s:
            return f"no BMS frame for {now - self._heard_at:.1f} s"
        return None

    async def _reopen(self) -> None:
        self.reopens += 1
        self._backoff = min(max(2 * self._backoff, self.backoff_min_s), self.backoff_max_s)
        log.debug("reopening the CAN bus (attempt %d, next in %.1f s at the latest)", self.reopens, self._backoff)
        attempt = _Attempt()
        try:
            opened = await self._swapped_in_time(attempt)
        except InputError as err:
            self._open_error = f"cannot reopen the bus: {err}"
            if self.link is not None:
                self.link.lost(self._open_error)
        else:
            self._open_error = "" if opened else f"cannot reopen the bus: no answer within {self.open_timeout_s:g} s"
            if not opened:
                self._told_hung()
        now = self.clock()
        self._last_frame_at = now  # a reopened bus gets a whole timeout to bring frames
        self._next_attempt = now + self._backoff

    def _told_hung(self) -> None:
        """A reopen timed out: the cause for `status`, and one warning per outage (the link book tells
        only an outage's first cause, and a driver that hangs is worth knowing about)."""
        if self.link is not None:
            self.link.lost(self._open_error)
        if not self._hang_told:
            self._hang_told = True
            log.warning("the CAN bus did not open within %g s: abandoned, retried with back-off "
                        "(the bus is closed should that open ever return)", self.open_timeout_s)

    async def _swapped_in_time(self, attempt: _Attempt) -> bool:
        """`_swap` in its thread, waited for at most `open_timeout_s`: False when it was abandoned.

        Whoever claims the attempt first decides: the thread (its bus is then installed, and
        waited for) or the waiter giving up (the thread then closes what it opens).
        """
        swapping = asyncio.ensure_future(_in_a_thread_of_its_own(lambda: self._swap(attempt)))
        try:
            await asyncio.wait_for(asyncio.shield(swapping), self.open_timeout_s)
        except asyncio.CancelledError:
            swapping.add_done_callback(_retrieved)  # the service stops: the thread finishes alone
            raise
        except TimeoutError:
            if not attempt.claim():  # the bus opened just now: it is being installed
                await swapping
                return True
            swapping.add_done_callback(_retrieved)
            return False
        return True

    def _swap(self, attempt: _Attempt) -> None:
        """Close the bus and open it again (in a worker thread: python-can blocks).

        The open is not under the lock: one that never returns must hold up neither the next
        attempt nor `close`. A bus opened for an attempt abandoned or a link closed meanwhile is
        nobody's, and is shut down here.
        """
        with self._lock:
            if self._closed or attempt.abandoned():
                return
            self._close_bus()
        bus = self._opener()
        with self._lock:
            if self._closed or not attempt.claim():
                shutdown_quietly(bus, log)
                return
            self.bus = bus
            if self._on_snapshot is not None:
                self._listen()


class _Attempt:
    """One reopen, claimed once: by its thread (which installs the bus it opened) or by the waiter
    giving up on it (the thread then shuts that bus down), never both."""

    def __init__(self) -> None:
        self._claim = threading.Lock()

    def claim(self) -> bool:
        """True for the first caller only."""
        return self._claim.acquire(blocking=False)

    def abandoned(self) -> bool:
        """Whether the attempt is already claimed (by the waiter, before the thread could open)."""
        return self._claim.locked()


def _retrieved(future: asyncio.Future[None]) -> None:
    """Read an abandoned attempt's outcome, so asyncio does not log it as never retrieved."""
    if not future.cancelled():
        future.exception()


async def _in_a_thread_of_its_own(work: Callable[[], None]) -> None:
    """`work` in a daemon thread, awaited. Not asyncio's executor: `asyncio.run` waits for its threads
    on the way out, so a driver call that never returns would hold the gateway's exit for ever."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def settle(error: BaseException | None) -> None:
        if done.done():  # the waiting task was cancelled meanwhile
            return
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)

    def run() -> None:
        error: BaseException | None = None
        try:
            work()
        except BaseException as err:  # noqa: BLE001 - handed to the awaiting task, which decides
            error = err
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting any more
            loop.call_soon_threadsafe(settle, error)

    threading.Thread(target=run, name="can-reopen", daemon=True).start()
    await done
