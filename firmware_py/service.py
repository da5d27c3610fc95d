"""The service: what keeps an assembled gateway running, and stops it safely.

Tasks on the event loop (tick, inverter poll, command writer, journal flush,
the integrations, the systemd watchdog: `watchdog.py`), the CAN intake on python-can's
Notifier thread, signals, and an ordered shutdown. `powershare-gw run` is
`run(config)`; the real-time benchmarks start the same `Service` on their own
assembly, so they measure the production path.

Paths through it:
- a BMS frame is decoded in the Notifier thread; a snapshot the core decides on
  hops to the loop → `Gateway.on_snapshot` → the writer wakes at once (a fault
  frame reaches the inverter without waiting for a tick);
- every `tick_s` → `Gateway.tick`, and the writer at least that often (refreshes);
- once more, sooner, when a step asks for it (`StepResult.step_again_at`: a ramp's first watts);
- every `tick_s` → the CAN link looks at itself and reopens a broken bus (`bms/link.py`);
- every `poll_interval_s` → `Gateway.poll_inverter` (at once after a stall: resync);
- every `journal_flush_s` → queued journal records are written off the loop;
- every `EARNINGS_CHECK_S` → this month's earnings are computed again (off the loop) when an
  event was settled since and a minute has passed (`statements/earnings.py`).

Time: `run` assembles with `Clocks.system()`: the core on the monotonic clock, wall
time only for people (`firmware_py/clocks.py`). The gateway watches its own
steps for stalls (a gap longer than the policy's `stall_gap_s`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from firmware_py import heap
from firmware_py.assembly import Assembly, Integration, assemble, check, in_file, notes, service_user
from firmware_py.clocks import Clocks
from firmware_py.config import Config
from firmware_py.core import Mode, StepResult
from firmware_py.core.types import Tick
from firmware_py.errors import InputError
from firmware_py.gateway import TICK_S, Gateway
from firmware_py.journal.lock import JournalInUse, JournalLock, holder_named, lock_journal
from firmware_py.narration import Narrator, lines_written_aside
from firmware_py.owner.api import OwnerApi
from firmware_py.tasks import cancel_all, every, take_stop_signals, unless_stopped
from firmware_py.watchdog import HUNG_AFTER_S, Watchdog

log = logging.getLogger(__name__)

EARNINGS_CHECK_S = 5.0
"""How often the earnings task asks whether the month must be computed again (`EarningsBook.due`)."""
LOCK_CHECK_S = 1.0
"""How often `run` looks that its journal's lock file is still there (one stat; `JournalLock.keep`)."""
TASKS_END_S = 1.0
"""The most the stop waits for the running tasks to end before the safe stop (they end in milliseconds;
one whose clean-up hangs is named and left cancelled: the core is no longer stepped, so it cannot
command the inverter)."""
SAFE_STOP_S = 7.0
"""The most the stop waits for the inverter's WSet = 0: systemd kills the service 15 s after SIGTERM
(`TimeoutStopSec` in powershare-gw.service), and the journal must close before that."""
FINAL_READ_S = 3.0
"""The most the stop waits for the meter reading that closes open events (after the safe stop)."""
GIL_SWITCH_S = 0.0005
"""How long the CAN thread may hold the interpreter before the loop gets a turn (Python's default
is 5 ms: on a busy bus a fault frame's step could wait that long for the thread decoding the rest)."""


class Systemd:
    """sd_notify without a dependency: READY, WATCHDOG and STOPPING on $NOTIFY_SOCKET."""

    def __init__(self) -> None:
        address = os.environ.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        usec = os.environ.get("WATCHDOG_USEC", "")
        self.watchdog_s = int(usec) / 2e6 if usec.isdigit() else None

    def notify(self, message: str) -> None:
        if not self.address:
            return
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode(), self.address)


@dataclass(frozen=True)
class RunOptions:
    tick_s: float = TICK_S
    journal_flush_s: float = 0.2
    owner_api: bool = True  # the benchmarks measure the control path without it
    integrations: bool = True  # commissioning's test discharge runs with no aggregator connected
    restart_pause_s: float = 5.0  # before an integration that failed is started again
    ready_timeout_s: float = 10.0  # READY waits this long for fresh BMS and inverter data
    hung_after_s: float = HUNG_AFTER_S  # a control task this long past its longest round stops the watchdog's pings


class Service:
    """Runs one assembled gateway until stopped: `start`, then `until_stopped`, then always `stop`."""

    def __init__(self, assembly: Assembly, options: RunOptions = RunOptions(), systemd: Systemd | None = None,
                 journal_lock: JournalLock | None = None):
        self.assembly = assembly
        self.journal_lock = journal_lock
        self.gateway: Gateway = assembly.gateway
        self.options = options
        self.systemd = systemd or Systemd()
        self.owner_api = OwnerApi(assembly.config.owner, self.gateway, store=assembly.store,
                                  clocks=self.gateway.clocks) if options.owner_api else None
        self.tasks: list[asyncio.Task[Any]] = []
        self.gateway.observers.append(Narrator(self.gateway.clocks))
        self._step_wanted = asyncio.Event()  # wakes the tick task for a step the core asked for
        self._step_again_handle: asyncio.TimerHandle | None = None
        self._inverter_silent = False  # the safe stop waited all of `SAFE_STOP_S` for the inverter
        self.watchdog = Watchdog(self.gateway.clocks.monotonic, self.systemd.notify, options.hung_after_s)

    async def start(self) -> None:
        """Bind the owner API (a bad address is input error, before anything runs), read the
        inverter once, end events a crash left open, then start the intake and every task."""
        gateway, config = self.gateway, self.assembly.config
        sys.setswitchinterval(GIL_SWITCH_S)
        if self.owner_api is not None:
            await self.owner_api.start()
        integrations = self.assembly.integrations if self.options.integrations else {}
        for integration in integrations.values():
            bind = getattr(integration, "start", None)  # those that listen: a bad address is input error now
            if bind is not None:
                await bind(gateway)
        first = await gateway.poll_inverter()
        closed = gateway.close_open_events(first.tot_wh_inj if first.comms_ok else None)
        if closed:
            log.warning("ended events left open by the last run: %s", ", ".join(closed))
        loop = asyncio.get_running_loop()
        gateway.observers.append(self._stepping_again)
        self.assembly.can_link.start(lambda snapshot: loop.call_soon_threadsafe(gateway.on_snapshot, snapshot))
        gateway.feed(Tick(gateway.now()))  # start-up's slow parts (the journal read) are behind this step:
        gateway.watch_stalls = True  # from here on, a long gap between steps is the gateway's own stall
        tick_s, exchange_s, link = self.options.tick_s, config.inverter.timeout_s + 1.0, self.assembly.can_link
        watched = self.watchdog.expect  # each watched task with its longest healthy round (`watchdog.py`)
        periodic: list[tuple[str, float, Callable[[], Any], Callable[[], None] | None]] = [
            ("CAN link", tick_s, link.supervise, watched("CAN link", tick_s + link.close_wait_s + link.open_timeout_s)),
            ("journal", self.options.journal_flush_s, gateway.flush_journal_async,
             watched("journal", self.options.journal_flush_s + config.journal.busy_timeout_s)),
            ("history sample", config.journal.sample_interval_s, gateway.sample, None),
            ("earnings", EARNINGS_CHECK_S, gateway.earnings.refresh, None),  # reads the journal only when due
        ]
        if self.journal_lock is not None:
            periodic.append(("journal lock", LOCK_CHECK_S, self.journal_lock.keep, None))
        if self.systemd.watchdog_s:
            periodic.append(("watchdog", self.systemd.watchdog_s, self.watchdog.ping, None))
        ticking = every(tick_s, gateway.tick, wake=self._step_wanted, finished=watched("tick", tick_s))
        self.tasks = [asyncio.create_task(ticking, name="tick")]
        self.tasks += [asyncio.create_task(every(period, action, finished=finished), name=name)
                       for name, period, action, finished in periodic]
        self.tasks.append(asyncio.create_task(
            every(config.inverter.poll_interval_s, gateway.poll_inverter, wake=gateway.resync_wanted,
                  finished=watched("poll", config.inverter.poll_interval_s + exchange_s)), name="poll"))
        self.tasks.append(asyncio.create_task(
            command_writer(gateway, tick_s, finished=watched("writer", tick_s + exchange_s)), name="writer"))
        if self.owner_api is not None:
            self.tasks.append(asyncio.create_task(self.owner_api.run(), name="owner API"))
        for name, integration in integrations.items():
            self.tasks.append(asyncio.create_task(self._supervised(name, integration), name=name))
        gc.freeze()  # what start-up built lives for the whole run: later collections need not walk it

    def _stepping_again(self, result: StepResult) -> None:
        """Wake the tick task when the core asks for a step before the next tick (`StepResult.step_again_at`);
        the step runs in that task, so a failing one stops the service as any failing tick does."""
        if result.step_again_at is None:
            return
        if self._step_again_handle is not None:
            self._step_again_handle.cancel()
        delay = max(0.0, result.step_again_at - self.gateway.now())
        self._step_again_handle = asyncio.get_running_loop().call_later(delay, self._step_wanted.set)

    async def ready(self, stop: asyncio.Event | None = None) -> bool:
        """Wait until the core has fresh BMS and inverter data (it left STARTUP), at most `ready_timeout_s`
        (or until `stop` is set: a stop asked for while starting is not held up).

        systemd's READY then means "controlling", not merely "started". A link that
        stays down must not hold READY back for ever (systemd would restart a
        healthy process in a loop), so after the bound READY is sent anyway and the
        missing data is logged; the core keeps the inverter at 0 W meanwhile.
        """
        gateway = self.gateway
        if gateway.controller.mode is not Mode.STARTUP:
            return True
        left = asyncio.Event()
        observe = lambda result: left.set() if result.controller.mode is not Mode.STARTUP else None  # noqa: E731
        gateway.observers.append(observe)
        waits = [asyncio.create_task(event.wait()) for event in (left, stop) if event is not None]
        try:
            await asyncio.wait(waits, timeout=self.options.ready_timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
            gateway.observers.remove(observe)
        if not left.is_set() and not (stop is not None and stop.is_set()):
            log.warning("ready without fresh data after %.0f s: %s", self.options.ready_timeout_s,
                        gateway.controller.reason)
        return left.is_set()

    async def until_stopped(self, stop: asyncio.Event) -> int:
        """Wait for `stop` (exit 0). A task that ends is a bug worth stopping for, loudly (exit 1):
        systemd restarts the gateway, and the inverter's revert timer covers the gap."""
        waiter = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([waiter, *self.tasks], return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        failed = [task for task in done if task is not waiter]
        for task in failed:
            error = None if task.cancelled() else task.exception()
            log.critical("%s stopped unexpectedly: %s", task.get_name(), error or "it returned")
        return 1 if failed else 0

    async def stop(self) -> None:
        """Tasks first, then the safe stop, then the journal: each step on its own so one failure skips no other.

        No step of the core after the inputs end (`Gateway.begin_stop`): it would judge stopped inputs stale.
        After a journal write fails during the stop no other is attempted, so a locked journal costs its
        busy timeout once, not once per write, within systemd's stop timeout."""
        self.gateway.watch_stalls = False  # stopping takes its time; it is no stall
        self.gateway.begin_stop()  # the core is stepped no more: its inputs end here (no false faults)
        with contextlib.suppress(ValueError):
            self.gateway.observers.remove(self._stepping_again)
        if self._step_again_handle is not None:
            self._step_again_handle.cancel()
        # What could command or step the gateway ends first, then the inverter is told 0 W; only then does
        # the journal task end, which waits for a write already handed to its thread (a slow or locked disk).
        journal = [task for task in self.tasks if task.get_name() == "journal"]
        if hung := await cancel_all([task for task in self.tasks if task not in journal], within_s=TASKS_END_S):
            log.error("stop: %s did not end within %g s of being cancelled; going on to the safe stop",
                      ", ".join(sorted(task.get_name() for task in hung)), TASKS_END_S)
        gateway = self.gateway
        steps: tuple[tuple[str, Callable[[], Any]], ...] = (
            ("safe stop", self._safe_stop),
            ("journal task", lambda: cancel_all(journal)),
            ("CAN", self.assembly.can_link.stop),
            ("journal", lambda: gateway.flush_journal(final=True)),  # with the unfinished batch of steps
            ("open events", self._end_open_events),
            ("journal queue", self._report_unwritten),
            ("inverter link", gateway.inverter.close),
            ("owner API", self.owner_api.stop if self.owner_api is not None else _nothing),
            ("assembly", self.assembly.close),
        )
        for what, action in steps:
            try:
                outcome = action()
                if asyncio.iscoroutine(outcome):
                    await outcome
            except Exception:  # noqa: BLE001 - shutting down: report and go on to the next step
                log.exception("shutdown: %s failed", what)

    async def _safe_stop(self) -> None:
        """WSet = 0, given at most `SAFE_STOP_S`: an inverter that does not answer must not keep the
        journal from closing before systemd's stop timeout (its revert timer stops it anyway)."""
        try:
            async with asyncio.timeout(SAFE_STOP_S):
                told = await self.gateway.inverter.safe_stop()
                why = self.gateway.inverter.last_error or "not connected"
        except TimeoutError:
            told, why, self._inverter_silent = False, f"no answer within {SAFE_STOP_S:g} s", True
        if told:
            log.info("safe stop: WSet = 0 written to the inverter and read back")
        else:
            log.warning("safe stop: the inverter could not be told (%s); its revert timer takes it to 0 W "
                        "within %.0f s", why, self.assembly.config.inverter.revert_timeout_s)

    def _report_unwritten(self) -> None:
        """Records still queued now are lost with the process: the journal failed to the end. Say how many."""
        if left := self.gateway.unwritten():
            log.error("journal still failing at the stop: %d queued records are lost", left)

    async def _end_open_events(self) -> None:
        """The meter read once more for the events' final energy, within `FINAL_READ_S`, unless the safe
        stop just waited its whole time on a silent inverter (no meter: no gap billed)."""
        meter = None
        if not self._inverter_silent:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(FINAL_READ_S):
                    last = await self.gateway.inverter.read_status()
                    meter = last.tot_wh_inj if last.comms_ok else None
        self.gateway.close_open_events(meter, "gateway stopped: event ended")

    async def _supervised(self, name: str, integration: Integration) -> None:
        """Run an integration; a peer that makes it fail costs that integration a restart, not the gateway."""
        pause = self.options.restart_pause_s
        while True:
            try:
                await integration.run(self.gateway)
                log.error("%s ended; restarting it in %.0f s", name, pause)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - whatever a remote peer provokes, the gateway stays up
                log.exception("%s failed; restarting it in %.0f s", name, pause)
            await asyncio.sleep(pause)


def _nothing() -> None:
    return None


async def command_writer(gateway: Gateway, refresh_s: float = TICK_S,
                         finished: Callable[[], None] = lambda: None) -> None:
    """Hand the command to the inverter client on every step at once, and at least every `refresh_s`;
    `finished` is told after each hand-over (the watchdog's proof of progress).

    Woken straight from the step's event (no `wait_for`, whose inner task costs the fault's
    0 W two more turns of the loop)."""
    while True:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(refresh_s):
                await gateway.command_changed.wait()
        await gateway.write_command()
        finished()


async def run(config: Config, options: RunOptions = RunOptions()) -> int:
    """`powershare-gw run`: until SIGTERM, SIGINT or SIGHUP, then a safe stop. Returns the exit code.

    One gateway per journal: its lock is taken before anything is opened, and held until the end;
    another gateway holding it is an input error that touches nothing (no inverter write, no record)."""
    lock = lock_configured_journal(config, lambda pid: _journal_in_use(config, pid))
    try:
        return await _run_locked(config, options, lock)
    finally:
        lock.close()


def lock_configured_journal(config: Config, in_use: Callable[[int | None], str]) -> JournalLock:
    """The lock on `journal.path` (`journal/lock.py`) for a command that writes it (`run`, `commission`), each
    wording `in_use` for its own user. A lock file that cannot be made (a missing folder) is said as
    `check-config` says it, else under `journal.path`."""
    try:
        return lock_journal(Path(config.journal.path), in_use)
    except JournalInUse:
        raise
    except InputError as err:
        check(config)
        raise InputError([f"{config.source}: journal.path: {p}" for p in err.problems]) from None


def _journal_in_use(config: Config, pid: int | None) -> str:
    return (f"{config.source}: journal.path: journal {config.journal.path} is in use by another gateway"
            f"{holder_named(pid)}; one gateway per journal: stop the other (`sudo systemctl stop powershare-gw`) "
            "or give this one its own journal.path")


async def _run_locked(config: Config, options: RunOptions, lock: JournalLock) -> int:
    with heap.collection_paused():  # the integrations' modules are imported here
        assembly = assemble(config, Clocks.system())
    try:
        service = Service(assembly, options, journal_lock=lock)
    except BaseException:  # a bad owner API address: nothing started, release what assembling opened
        assembly.close()
        raise
    stop = asyncio.Event()
    take_stop_signals(stop.set)  # one that came while importing or assembling stops it before anything is commanded
    try:
        if not await _started(service, stop):
            return 0  # stopped while starting: straight to the safe stop (`finally`)
        await service.ready(stop)
        service.systemd.notify("READY=1")
        heap.release_free_pages()  # what start-up freed (DBC parsing, the journal's read-back, imports' garbage)
        log.info("gateway running: CAN %s %s, inverter %s, journal %s", config.can.interface, config.can.channel,
                 f"{config.inverter.host}:{config.inverter.port}" if config.inverter.transport == "tcp"
                 else config.inverter.serial_port, config.journal.path)
        for note in notes(config):
            log.warning("%s: %s", config.source, note)
        code = await service.until_stopped(stop)
    finally:
        service.systemd.notify("STOPPING=1")
        await service.stop()
        log.info("gateway stopped: journal closed")
    return code


async def _started(service: Service, stop: asyncio.Event) -> bool:
    """`service.start()`, unless `stop` is set first: then start-up is cancelled and False returned.

    Start-up waits on the inverter (its first reading: up to `[inverter] timeout_s`, 30 s at most);
    a SIGTERM meanwhile must not wait for it, or the safe stop after it would run past systemd's
    `TimeoutStopSec` (SIGKILL before the journal is closed). `Service.stop` copes with a half start."""
    starting = await unless_stopped(service.start(), stop)
    if starting.cancelled():
        log.info("stop asked for while starting: start-up abandoned for the safe stop")
        return False
    try:
        starting.result()  # start-up's own error (an address taken: input error) is raised as before
    except InputError as err:
        raise in_file(service.assembly.config, err.problems) from None
    return True  # started (perhaps in the stop's own turn: `until_stopped` then returns at once)


def _run_command(args: argparse.Namespace) -> int:
    from firmware_py import config as config_module

    config = config_module.load(args.config)
    with lines_written_aside(args.verbose):
        return asyncio.run(run(config))


def _check_config_command(args: argparse.Namespace) -> int:
    """What `run` would check before opening a link, and the configuration it would run with."""
    from firmware_py import config as config_module
    from firmware_py.web.installer import redacted

    config = config_module.load(args.file)
    assumed = service_user(config)  # as root: the user `run` will run as (see `service_user`)
    check(config, owner_uid=assumed[0] if assumed else None)
    for note in notes(config) + ([assumed[1]] if assumed else []):
        print(f"{config.source}: note: {note}", file=sys.stderr)
    print(f"# {config.source}: valid; effective configuration:")
    print(json.dumps(redacted(config_module.as_dict(config)), indent=2))  # as the installer page shows it
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("check-config", help="validate a config file as `run` would, and print the effective "
                                            "configuration")
    c.add_argument("file", help="the TOML configuration file")
    c.set_defaults(handler=_check_config_command)
    p = sub.add_parser("run", help="run the gateway (until SIGTERM or Ctrl-C, then a safe stop)")
    p.add_argument("--config", required=True, help="the TOML configuration file")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(handler=_run_command)
