"""How the gateway's concurrent work is repeated and ended: a stop must be a stop.

Every task that is cancelled and then waited for is ended through `cancel_all`, in the
service, the integrations, the bench and the tests alike. On Python 3.11 a cancellation
can be lost (below), and a single `task.cancel(); await task` then waits for ever: a
gateway that ignores SIGTERM, a bench or a test run that never ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

CANCEL_AGAIN_S = 0.5
"""How long a cancelled task has to end before it is cancelled again."""


async def cancel_all(tasks: Iterable[asyncio.Future[Any]], *,
                     within_s: float | None = None) -> set[asyncio.Future[Any]]:
    """Cancel `tasks` and wait until every one has ended, cancelling again any that swallowed it.

    On Python 3.11 `asyncio.wait_for` returns the inner result, and drops the
    cancellation, when both land in the same loop turn (a refused connect under
    load, inside the inverter poll; an acknowledgement inside the MQTT client): the
    task then runs on as if nothing was asked (seen: `run` on a busy board ignoring
    SIGTERM). `asyncio.wait` never loses one. A cancellation of the caller itself while
    it waits (a stop cancelling again a task that is ending its parts) is held until
    every one has ended, then raised: called from a `finally`, this must not leave a
    part running, nor skip the clean-up after it.

    With `within_s` the wait ends then, and the tasks still running are returned (they stay
    cancelled): for the service's stop, whose safe stop must come within systemd's stop timeout
    even when a task's clean-up hangs. Without it the wait has no end and nothing is returned.
    """
    pending = {task for task in tasks if not task.done()}
    deadline = None if within_s is None else asyncio.get_running_loop().time() + within_s
    interrupted: asyncio.CancelledError | None = None
    while pending:
        wait_s = CANCEL_AGAIN_S
        if deadline is not None:
            wait_s = min(wait_s, deadline - asyncio.get_running_loop().time())
            if wait_s <= 0:
                break
        for task in pending:
            task.cancel()
        try:
            _, pending = await asyncio.wait(pending, timeout=wait_s)
        except asyncio.CancelledError as err:
            interrupted = err
            pending = {task for task in pending if not task.done()}
    if interrupted is not None:
        raise interrupted
    return pending


async def unless_stopped(work: Awaitable[T], stop: asyncio.Event) -> asyncio.Future[T]:
    """Run `work` until it ends or `stop` is set, whichever comes first; its task, ended either way:
    cancelled when the stop came first (ended through `cancel_all`, which loses no cancellation).

    For a wait a stop must not sit out: start-up's first inverter reading, a commissioning probe."""
    task = asyncio.ensure_future(work)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        await cancel_all([stopping, task])
    return task


async def seen_through(work: Awaitable[T]) -> T:
    """Await `work` to its end even when the caller is cancelled meanwhile, then raise that cancellation.

    For a clean-up that must not be cut short by `cancel_all` cancelling again: aiohttp's
    runner clean-up, cancelled in its graceful wait, skips ending the requests still in
    hand, and a handler then runs on (and answers) after the gateway has stopped.
    """
    task = asyncio.ensure_future(work)
    interrupted: asyncio.CancelledError | None = None
    while not task.done():
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError as err:
            interrupted = err
    if interrupted is not None:
        if not task.cancelled() and task.exception() is not None:
            raise interrupted from task.exception()
        raise interrupted
    return task.result()


async def every(period_s: float, action: Callable[[], Any | Awaitable[Any]], *,
                wake: asyncio.Event | None = None, finished: Callable[[], None] | None = None) -> None:
    """Call `action` now and then every `period_s` (after it finishes), or sooner when `wake` is set,
    until cancelled. `finished` is told after each call (the watchdog's proof of progress)."""
    while True:
        outcome = action()
        if asyncio.iscoroutine(outcome):
            await outcome
        if finished is not None:
            finished()
        if wake is None:
            await asyncio.sleep(period_s)
            continue
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(wake.wait(), period_s)
        wake.clear()


def stop_signals() -> tuple[signal.Signals, ...]:
    """The signals that stop `run` and `bms record`: SIGTERM and SIGINT; SIGHUP too (a closed terminal or
    SSH session stops them as safely as `systemctl stop`), unless started to outlive the terminal
    (`nohup`: SIGHUP ignored)."""
    hang_up = () if signal.getsignal(signal.SIGHUP) is signal.SIG_IGN else (signal.SIGHUP,)
    return (signal.SIGTERM, signal.SIGINT, *hang_up)


@contextlib.contextmanager
def stop_signals_interrupt() -> Iterator[None]:
    """For its length, every stop signal ends the command as Ctrl-C does, clean-up included.

    A batch command (`sim`, `bench`) relies on `with` and `async with` to remove its temporary
    files and stop the processes it started; SIGTERM's default action skipped all of that
    (orphaned peers, a partial hidden trace). So each stop signal is handed to whatever handles
    SIGINT when it arrives: Python's KeyboardInterrupt, or inside `asyncio.run` the runner's
    handler, which cancels the main task so its `async with` blocks unwind before it raises
    KeyboardInterrupt. SIGINT itself gets Python's handler even when it was ignored at start (a
    background job of a script), as `asyncio.run` only takes over that one."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = stop_signals()
    previous = {s: signal.getsignal(s) for s in signals}

    def as_ctrl_c(signum: int, frame: Any) -> None:
        handler = signal.getsignal(signal.SIGINT)
        (handler if callable(handler) else signal.default_int_handler)(signum, frame)

    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in signals:
        if sig != signal.SIGINT:
            signal.signal(sig, as_ctrl_c)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            if handler is not None:  # None: set outside Python, cannot be put back from here
                signal.signal(sig, handler)


def run_stoppable(work: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(work)` for a batch command (`sim`, `bench`): a stop signal ends it as Ctrl-C does
    (KeyboardInterrupt once its `with` and `async with` blocks have unwound), and always ends it.

    asyncio's own Ctrl-C handling cancels the main task once; a cancellation lost as described above
    let a real-time `sim` run on for its hours after SIGTERM. Here the loop takes the stop signals and
    ends the work through `cancel_all`, which cancels again until it has ended. A signal before the
    loop takes them is handled by `stop_signals_interrupt`, which also puts back, afterwards, the
    handlers the closing loop resets."""
    if threading.current_thread() is not threading.main_thread():
        return asyncio.run(work)

    async def until_stopped() -> tuple[bool, asyncio.Future[T]]:
        stop = asyncio.Event()
        take_stop_signals(stop.set)
        ended = await unless_stopped(work, stop)
        return stop.is_set(), ended

    try:
        with stop_signals_interrupt():
            stopped, ended = asyncio.run(until_stopped())
    finally:
        work.close()  # not started when a signal came first: no "never awaited" warning
    if stopped:
        raise KeyboardInterrupt
    return ended.result()


_noted = threading.Event()


@contextlib.contextmanager
def stop_signals_noted() -> Iterator[None]:
    """Until the command's loop takes the stop signals over (`loop.add_signal_handler`), one is noted
    (`stop_noted`) instead of ending the process at once.

    `run` (and `commission`) take them over only once imported, configured and assembled (0.3-0.5 s on
    a gateway); a `systemctl stop` in that time killed the process by the signal's default action (exit
    143 or 129, SIGINT a traceback), outside the 0/1/2 the command line promises. Noted, the loop's first
    look stops the service before anything is commanded. Afterwards, the handlers before are put back
    where these are still installed (the loop puts its own back when it closes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _noted.clear()
    signals = stop_signals()
    previous = {s: signal.getsignal(s) for s in signals}

    def note(signum: int, frame: Any) -> None:
        _noted.set()

    for sig in signals:
        signal.signal(sig, note)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            if signal.getsignal(sig) is note and handler is not None:
                signal.signal(sig, handler)
        _noted.clear()  # the command that noted it has ended: a later one in this process starts afresh


def stop_noted() -> bool:
    """Whether a stop signal came while `stop_signals_noted` held them (before the loop took them over)."""
    return _noted.is_set()


def take_stop_signals(on_stop: Callable[[], None]) -> None:
    """The running loop calls `on_stop` at each stop signal from now on, and at once for one noted
    before (`stop_signals_noted`): taken over after it, the signal would otherwise be lost."""
    loop = asyncio.get_running_loop()
    for sig in stop_signals():
        loop.add_signal_handler(sig, on_stop)
    if stop_noted():
        on_stop()
