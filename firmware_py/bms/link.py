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
  stale BMS data and holds 0 W.

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

from firmware_py.bms.bus import shutdown_quietly
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
"""The most closing waits for a reopen still opening the bus, which then closes what it opens itself."""


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
    cannot); the first open happens here, so a wrong interface stops start-up.
    """

    def __init__(self, opener: Callable[[], can.BusABC], reader: BmsReader, clock: Callable[[], float], *,
                 silence_s: float, stall_gap_s: float, link: LinkHandle | None = None,
                 backoff_min_s: float = 0.5, backoff_max_s: float = 30.0, close_wait_s: float = CLOSE_WAIT_S) -> None:
        self._opener = opener
        self.bus: can.BusABC | None = opener()
        self.reader, self.clock, self.link = reader, clock, link
        self.silence_s, self.stall_gap_s = silence_s, stall_gap_s
        self.backoff_min_s, self.backoff_max_s = backoff_min_s, backoff_max_s
        self.close_wait_s = close_wait_s
        self.notifier: can.Notifier | None = None
        self.listener: _Listener | None = None
        self.reopens = 0
        self._on_snapshot: Callable[[BmsSnapshot], None] | None = None
        self._frames_seen = -1
        self._errors_seen = 0
        self._failing = False  # a receive error not yet followed by frames
        self._last_frame_at = self._checked_at = -math.inf
        self._backoff = 0.0
        self._next_attempt = -math.inf
        self._open_error = ""
        self._lock = threading.RLock()  # a reopen in its worker thread and a shutdown never interleave
        self._closed = False

    # --- intake -------------------------------------------------------------------------
    def start(self, on_snapshot: Callable[[BmsSnapshot], None]) -> None:
        """Start receiving (python-can's Notifier thread decodes; `on_snapshot` gets what the core needs).

        No event loop is given to the Notifier on purpose: with one, python-can
        re-raises a receive error and its thread dies, silencing the BMS.
        """
        self._on_snapshot = on_snapshot
        self._listen()
        self._last_frame_at = self._checked_at = self.clock()

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

        A reopen still waiting for its driver to open the bus is waited for at most `close_wait_s`:
        the gateway's exit must not hang on an adapter (or a remote server) that never answers.
        """
        self._closed = True  # first: a reopen that outlasts the wait sees it and closes what it opened
        if not self._lock.acquire(timeout=self.close_wait_s):
            log.warning("the CAN bus is still being reopened after %g s: it will be closed once it opens",
                        self.close_wait_s)
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
        frames = self.reader.accepted + self.reader.dropped.total()
        flowing = frames != self._frames_seen
        if flowing:
            self._frames_seen, self._last_frame_at = frames, now
            self._backoff, self._next_attempt = 0.0, -math.inf
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
        silent = now - self._last_frame_at
        if silent > self.silence_s:
            return f"no BMS frame for {silent:.1f} s"
        return None

    async def _reopen(self) -> None:
        self.reopens += 1
        self._backoff = min(max(2 * self._backoff, self.backoff_min_s), self.backoff_max_s)
        log.debug("reopening the CAN bus (attempt %d, next in %.1f s at the latest)", self.reopens, self._backoff)
        try:
            await _in_a_thread_of_its_own(self._swap)
        except InputError as err:
            self._open_error = f"cannot reopen the bus: {err}"
            if self.link is not None:
                self.link.lost(self._open_error)
        else:
            self._open_error = ""
        now = self.clock()
        self._last_frame_at = now  # a reopened bus gets a whole timeout to bring frames
        self._next_attempt = now + self._backoff

    def _swap(self) -> None:
        """Close the bus and open it again (in a worker thread: python-can blocks)."""
        with self._lock:
            if self._closed:
                return
            self._close_bus()
            bus = self._opener()
            if self._closed:  # closed meanwhile, `close` having given up waiting: the bus is nobody's
                shutdown_quietly(bus, log)
                return
            self.bus = bus
            if self._on_snapshot is not None:
                self._listen()


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
