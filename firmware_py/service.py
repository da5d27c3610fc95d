"""The service: what keeps an assembled gateway running, and stops it safely.

Tasks on the event loop (tick, inverter poll, command writer, journal flush,
the integrations, the systemd watchdog), the CAN intake on python-can's
Notifier thread, signals, and an ordered shutdown. `powershare-gw run` is
`run(config)`; the real-time benchmarks start the same `Service` on their own
assembly, so they measure the production path.

Paths through it:
- a BMS frame is decoded in the Notifier thread; a snapshot the core decides on
  hops to the loop → `Gateway.on_snapshot` → the writer wakes at once (a fault
  frame reaches the inverter without waiting for a tick);
- every `tick_s` → `Gateway.tick`, and the writer at least that often (refreshes);
- every `poll_interval_s` → `Gateway.poll_inverter`;
- every `journal_flush_s` → queued journal records are written off the loop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import can

from firmware_py.assembly import Assembly, Integration, assemble
from firmware_py.bms.reader import BmsListener
from firmware_py.config import Config
from firmware_py.core import Mode
from firmware_py.core.types import Tick
from firmware_py.gateway import TICK_S, Gateway
from firmware_py.owner.api import OwnerApi

log = logging.getLogger(__name__)

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
    restart_pause_s: float = 5.0  # before an integration that failed is started again
    ready_timeout_s: float = 10.0  # READY waits this long for fresh BMS and inverter data


class Service:
    """Runs one assembled gateway until stopped: `start`, then `until_stopped`, then always `stop`."""

    def __init__(self, assembly: Assembly, options: RunOptions = RunOptions(), systemd: Systemd | None = None):
        self.assembly = assembly
        self.gateway: Gateway = assembly.gateway
        self.options = options
        self.systemd = systemd or Systemd()
        self.owner_api = OwnerApi(assembly.config.owner, self.gateway, store=assembly.store) \
            if options.owner_api else None
        self.tasks: list[asyncio.Task[Any]] = []
        self.notifier: can.Notifier | None = None

    async def start(self) -> None:
        """Bind the owner API (a bad address is input error, before anything runs), read the
        inverter once, end events a crash left open, then start the intake and every task."""
        gateway, config = self.gateway, self.assembly.config
        sys.setswitchinterval(GIL_SWITCH_S)
        if self.owner_api is not None:
            await self.owner_api.start()
        for integration in self.assembly.integrations.values():
            bind = getattr(integration, "start", None)  # those that listen: a bad address is input error now
            if bind is not None:
                await bind(gateway)
        first = await gateway.poll_inverter()
        closed = gateway.close_open_events(first.tot_wh_inj if first.comms_ok else None)
        if closed:
            log.warning("ended events left open by the last run: %s", ", ".join(closed))
        self.notifier = start_can_intake(self.assembly.bus, gateway, asyncio.get_running_loop())
        periodic: list[tuple[str, float, Callable[[], Any]]] = [
            ("tick", self.options.tick_s, gateway.tick),
            ("poll", config.inverter.poll_interval_s, gateway.poll_inverter),
            ("journal", self.options.journal_flush_s, gateway.flush_journal_async),
        ]
        if self.systemd.watchdog_s:
            periodic.append(("watchdog", self.systemd.watchdog_s, lambda: self.systemd.notify("WATCHDOG=1")))
        self.tasks = [asyncio.create_task(every(period, action), name=name) for name, period, action in periodic]
        self.tasks.append(asyncio.create_task(command_writer(gateway, self.options.tick_s), name="writer"))
        if self.owner_api is not None:
            self.tasks.append(asyncio.create_task(self.owner_api.run(), name="owner API"))
        for name, integration in self.assembly.integrations.items():
            self.tasks.append(asyncio.create_task(self._supervised(name, integration), name=name))
        gc.freeze()  # what start-up built lives for the whole run: later collections need not walk it

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
        """Tasks first, then the safe stop, then the journal: each step on its own so one failure skips no other."""
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        gateway = self.gateway
        steps: tuple[tuple[str, Callable[[], Any]], ...] = (
            ("safe stop", gateway.inverter.safe_stop),
            ("CAN", self._stop_intake),
            ("final step", lambda: gateway.feed(Tick(gateway.now()))),
            ("journal", lambda: gateway.flush_journal(final=True)),
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

    def _stop_intake(self) -> None:
        if self.notifier is not None:
            self.notifier.stop()

    def _report_unwritten(self) -> None:
        """Records still queued now are lost with the process: the journal failed to the end. Say how many."""
        if left := self.gateway.unwritten():
            log.error("journal still failing at the stop: %d queued records are lost", left)

    async def _end_open_events(self) -> None:
        last = await self.gateway.inverter.read_status()
        self.gateway.close_open_events(last.tot_wh_inj if last.comms_ok else None, "gateway stopped: event ended")

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


def start_can_intake(bus: can.BusABC, gateway: Gateway, loop: asyncio.AbstractEventLoop) -> can.Notifier:
    """Frames are decoded in python-can's receive thread; each snapshot the core decides on hops to the loop.

    No loop is given to the Notifier on purpose: with one, python-can re-raises a receive
    error and its thread dies, silencing the BMS until a restart.
    """
    hop = lambda snapshot: loop.call_soon_threadsafe(gateway.on_snapshot, snapshot)  # noqa: E731
    return can.Notifier(bus, [BmsListener(gateway.reader, hop)])


async def every(period_s: float, action: Callable[[], Any | Awaitable[Any]]) -> None:
    """Call `action` now and then every `period_s` (after it finishes), until cancelled."""
    while True:
        outcome = action()
        if asyncio.iscoroutine(outcome):
            await outcome
        await asyncio.sleep(period_s)


async def command_writer(gateway: Gateway, refresh_s: float = TICK_S) -> None:
    """Hand the command to the inverter client on every step at once, and at least every `refresh_s`."""
    while True:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(gateway.command_changed.wait(), refresh_s)
        await gateway.write_command()


async def run(config: Config, options: RunOptions = RunOptions()) -> int:
    """`powershare-gw run`: until SIGTERM/SIGINT, then a safe stop. Returns the exit code."""
    assembly = assemble(config, time.time)
    try:
        service = Service(assembly, options)
    except BaseException:  # a bad owner API address: nothing started, release what assembling opened
        assembly.close()
        raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await service.start()
        await service.ready(stop)
        service.systemd.notify("READY=1")
        log.info("gateway running: CAN %s %s, inverter %s, journal %s", config.can.interface, config.can.channel,
                 f"{config.inverter.host}:{config.inverter.port}" if config.inverter.transport == "tcp"
                 else config.inverter.serial_port, config.journal.path)
        code = await service.until_stopped(stop)
    finally:
        service.systemd.notify("STOPPING=1")
        await service.stop()
        log.info("gateway stopped: safe stop written, journal closed")
    return code


def _run_command(args: argparse.Namespace) -> int:
    from firmware_py import config as config_module

    config = config_module.load(args.config)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(run(config))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run the gateway (until SIGTERM or Ctrl-C, then a safe stop)")
    p.add_argument("--config", required=True, help="the TOML configuration file")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(handler=_run_command)
