"""The runtime: the only place with clocks, tasks, threads and sockets.

`Gateway` wires the pure core to the world and is the same object in
`powershare-gw run` and in the bench simulator; only who owns time differs.
`run` drives it from asyncio timers and a python-can Notifier on the real
clock; the bench (`sim/bench.py`) drives the same methods on a simulated clock.

Paths through it:
- a BMS frame → `on_frame` → core step → if the command changed, the command
  writer wakes at once (event-driven: a fault frame reaches the inverter
  without waiting for a tick);
- every `TICK_S` → `tick` (timeouts, ramps, windows) and the writer's refresh;
- every `poll_interval_s` → `poll_inverter` (status in, energy accounted);
- dispatch sources and the owner API → `submit` / `set_owner` → core step.
Journal records are queued by each step and written in batches off the hot
path, after the command: a slow disk never delays a safe stop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import can

from firmware_py.bms.reader import BmsListener, BmsReader, reader_from_config
from firmware_py.config import Config
from firmware_py.core import Controller, Policy, StepResult, step
from firmware_py.core.faults import decision_key
from firmware_py.core.types import (
    BmsSnapshot,
    DispatchAnswer,
    DispatchCancel,
    DispatchEnded,
    DispatchRequest,
    EventEnergy,
    Input,
    InverterCommand,
    InverterStatus,
    OwnerSettings,
    ReasonCode,
    Tick,
    Verdict,
)
from firmware_py.dispatch import Telemetry
from firmware_py.inverter.client import InverterClient
from firmware_py.journal import Journal, JournalWriteError

log = logging.getLogger(__name__)

TICK_S = 0.1
JOURNALED_INPUTS = (DispatchRequest, DispatchCancel, OwnerSettings)


class Gateway:
    """One gateway: core state, its inputs and outputs. Implements DispatchSink and OwnerPort."""

    def __init__(self, config: Config, clock: Callable[[], float], reader: BmsReader,
                 inverter: InverterClient, journal: Journal, owner: OwnerSettings | None = None):
        self.config = config
        self.clock = clock
        self.reader = reader
        self.inverter = inverter
        self.journal = journal
        self.policy = Policy.from_config(config)
        now = clock()
        self.controller = Controller.start(self.policy, owner, now)
        self.command = InverterCommand(0.0, self.controller.reason)
        self.command_changed = asyncio.Event()
        self.journal_failed: str | None = None
        self.observers: list[Callable[[StepResult], None]] = []
        self._pending: list[Any] = []
        self._bms_key: tuple | None = None

    # ------------------------------------------------------------------ core

    def feed(self, *inputs: Input) -> StepResult:
        """Step the core with `inputs` now; queue what must be journaled; wake the writer on change."""
        now = self.clock()
        for item in inputs:
            if isinstance(item, BmsSnapshot):
                self._bms_key = decision_key(item)  # what the core now holds
        result = step(self.controller, inputs, now)
        self.controller = result.controller
        if result.command.setpoint_w != self.command.setpoint_w:
            self.command_changed.set()
        self.command = result.command
        self._pending += [i for i in inputs if isinstance(i, JOURNALED_INPUTS)]
        self._pending += result.events
        for observer in self.observers:
            observer(result)
        return result

    def now(self) -> float:
        return self.clock()

    # ------------------------------------------------------------------ inputs

    def on_frame(self, msg: can.Message) -> None:
        """A CAN frame arrived: decode, and step the core only when the BMS said something new."""
        snapshot = self.reader.on_message(msg)  # the reader reads the clock only for a BMS frame
        if snapshot is not None:
            self.on_snapshot(snapshot)

    def on_frames(self, msgs: list[can.Message]) -> StepResult | None:
        """Frames that arrived together: decode them all, then at most one step with the newest snapshot."""
        now, latest = self.clock(), None
        for msg in msgs:
            latest = self.reader.on_message(msg, now) or latest
        return self.on_snapshot(latest) if latest is not None else None

    def on_snapshot(self, snapshot: BmsSnapshot) -> StepResult | None:
        """Step at once when something the core decides on changed; the tick carries the rest."""
        if decision_key(snapshot) == self._bms_key:
            return None
        return self.feed(snapshot)

    def tick(self) -> StepResult:
        """Time passing: freshness as of now (a silent bus turns stale here), ramps, windows."""
        now = self.clock()
        return self.feed(self.reader.snapshot(now), Tick(now))

    async def poll_inverter(self) -> InverterStatus:
        status = await self.inverter.read_status()
        self.feed(status)
        return status

    async def write_command(self) -> None:
        """Send the current command (the client writes only on change or when a refresh is due)."""
        self.command_changed.clear()
        await self.inverter.apply(self.command)

    # ------------------------------------------------------------------ DispatchSink

    async def submit(self, item: DispatchRequest | DispatchCancel) -> DispatchAnswer | None:
        if isinstance(item, DispatchRequest) and self.journal_failed:
            answer = DispatchAnswer(item.id, self.clock(), Verdict.REJECTED, reason=ReasonCode.FAULT,
                                    detail=f"journal unavailable: {self.journal_failed}")
            return answer
        result = self.feed(item)
        await self.write_command()
        return result.answer_for(item.id) if isinstance(item, DispatchRequest) else None

    def telemetry(self) -> Telemetry:
        c, now = self.controller, self.clock()
        serving = c.book.find(c.serving_id) if c.serving_id else None
        soc = c.bms.soc_min_pct if c.bms is not None else None
        power = c.inverter.measured_w if c.inverter is not None and c.inverter.comms_ok else 0.0
        return Telemetry(at=now, state=c.mode.value, soc_pct=soc, floor_pct=c.floor_pct(now), power_w=power,
                         setpoint_w=self.command.setpoint_w, available_wh=c.available_wh(now),
                         active_event_id=serving.request.id if serving else None)

    def note(self, kind: str, payload: dict) -> None:
        self._pending.append((kind, self.clock(), payload))

    # ------------------------------------------------------------------ OwnerPort

    def owner_settings(self) -> OwnerSettings:
        return self.controller.owner

    async def set_owner(self, settings: OwnerSettings) -> None:
        self.feed(settings)
        await self.write_command()

    # ------------------------------------------------------------------ journal

    def flush_journal(self) -> int:
        """Write what the steps queued, in one transaction, here and now (the bench's way)."""
        pending, self._pending = self._pending, []
        return self._settle(pending, self._write(pending))

    async def flush_journal_async(self) -> int:
        """The same off the event loop: the queue is taken here, only the disk work moves to a thread."""
        pending, self._pending = self._pending, []
        return self._settle(pending, await asyncio.to_thread(self._write, pending) if pending else None)

    def _write(self, pending: list[Any]) -> JournalWriteError | None:
        if not pending:
            return None
        try:
            with self.journal.batch():
                for item in pending:
                    if isinstance(item, tuple):
                        self.journal.append(*item)
                    else:
                        self.journal.append_event(item)
        except JournalWriteError as err:
            return err
        return None

    def _settle(self, pending: list[Any], failure: JournalWriteError | None) -> int:
        """After a write: on failure put the records back in front (nothing is lost) and refuse dispatch."""
        if failure is None:
            self.journal_failed = None
            return len(pending)
        self._pending[:0] = pending
        if not self.journal_failed:
            log.error("journal write failed, refusing dispatch until it recovers: %s", failure)
        self.journal_failed = str(failure)
        return 0

    def close_open_events(self, meter_total_wh: float | None,
                          reason: str = "gateway restarted: event ended") -> list[str]:
        """End events the journal shows as running (after a crash, or at a stop), billing the meter's gap.

        The last EventEnergy record carries the inverter meter reading at that
        moment; the meter now tells what flowed between it and the crash (the
        inverter's revert timer stopped it within `revert_timeout_s`).
        """
        open_events = open_journal_events(self.journal)
        now = self.clock()
        # The meter's gap belongs to the event being served last: the one reported most recently.
        newest = max(open_events, key=lambda rid: open_events[rid].at if open_events[rid] else -1.0, default=None)
        for request_id, last in open_events.items():
            meter, integrated = (last.meter_wh, last.integrated_wh) if last else (0.0, 0.0)
            if request_id == newest and last and last.meter_total_wh is not None and meter_total_wh is not None:
                gap = meter_total_wh - last.meter_total_wh
                if 0 <= gap <= self._most_unreported_wh():
                    meter += gap
            self._pending.append(DispatchEnded(now, request_id, reason))
            self._pending.append(EventEnergy(now, request_id, round(meter, 3), round(integrated, 3), True,
                                             meter_total_wh))
        self.flush_journal()
        return list(open_events)


    def _most_unreported_wh(self) -> float:
        """The most a crash can leave unreported: a report interval plus the revert time at full power."""
        p = self.policy
        return p.max_discharge_w * (p.energy_report_interval_s + p.command_horizon_s + p.inverter_timeout_s) / 3600


def open_journal_events(journal: Journal) -> dict[str, EventEnergy | None]:
    """Accepted requests with no end record, and the last energy record of each."""
    accepted: dict[str, EventEnergy | None] = {}
    for record in journal.records():
        if record.kind not in ("DispatchAnswer", "EventEnergy", "DispatchEnded"):
            continue  # notes, inputs, transitions: nothing about which events are open
        try:
            event = record.event()
        except ValueError as err:  # a damaged record is `report`'s to flag; it must not stop a start
            log.error("journal record %d skipped: %s", record.seq, err)
            continue
        if isinstance(event, DispatchAnswer):
            if event.verdict is Verdict.REJECTED:
                if event.reason is not ReasonCode.DUPLICATE:
                    accepted.pop(event.request_id, None)
            else:
                accepted.setdefault(event.request_id, None)
        elif isinstance(event, EventEnergy) and event.request_id in accepted:
            accepted[event.request_id] = event
        elif isinstance(event, DispatchEnded):
            accepted.pop(event.request_id, None)
    return accepted


# ---------------------------------------------------------------------- systemd


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


# ---------------------------------------------------------------------- run


@dataclass
class RunOptions:
    tick_s: float = TICK_S
    journal_flush_s: float = 0.2


async def run(config: Config, options: RunOptions = RunOptions()) -> int:
    """`powershare-gw run`: until SIGTERM/SIGINT, then a safe stop. Returns the exit code."""
    from firmware_py.owner.api import OwnerApi
    from firmware_py.owner.store import OwnerStore

    loop = asyncio.get_running_loop()
    clock = time.time
    store = OwnerStore(config.owner.settings_file, config.owner.reserve_pct)
    owner = store.load(clock())
    journal = Journal.open(config.journal.path)
    reader = reader_from_config(config, clock)
    inverter = InverterClient(config.inverter, clock)
    gateway = Gateway(config, clock, reader, inverter, journal, owner)
    owner_api = OwnerApi(config.owner, gateway, store=store)
    await owner_api.start()
    services = [("owner API", owner_api.run())]
    services += [(type(source).__name__, _supervised(source, gateway)) for source in dispatch_sources(config, gateway)]
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    bus = open_bus(config, reader)
    notifier = start_can_intake(bus, reader, gateway, loop)
    systemd = Systemd()
    try:
        first = await gateway.poll_inverter()
        closed = gateway.close_open_events(first.tot_wh_inj if first.comms_ok else None)
        if closed:
            log.warning("ended events left open by the last run: %s", ", ".join(closed))
        tasks = [
            asyncio.create_task(_every(options.tick_s, gateway.tick), name="tick"),
            asyncio.create_task(_every(config.inverter.poll_interval_s, gateway.poll_inverter), name="poll"),
            asyncio.create_task(_command_writer(gateway), name="writer"),
            asyncio.create_task(_every(options.journal_flush_s, gateway.flush_journal_async), name="journal"),
        ]
        tasks += [asyncio.create_task(service, name=name) for name, service in services]
        if systemd.watchdog_s:
            tasks.append(asyncio.create_task(_every(systemd.watchdog_s, lambda: systemd.notify("WATCHDOG=1"))))
        systemd.notify("READY=1")
        log.info("gateway running: CAN %s %s, inverter %s, journal %s", config.can.interface, config.can.channel,
                 f"{config.inverter.host}:{config.inverter.port}" if config.inverter.transport == "tcp"
                 else config.inverter.serial_port, config.journal.path)
        code = await _until_stopped(stop, tasks)
    finally:
        systemd.notify("STOPPING=1")
        await _shut_down(gateway, notifier, bus)
        journal.close()
        log.info("gateway stopped: safe stop written, journal closed")
    return code


async def _shut_down(gateway: Gateway, notifier: can.Notifier, bus: can.BusABC) -> None:
    """Safe stop first, then the journal; each step on its own so one failure skips no other."""
    steps = (
        ("safe stop", gateway.inverter.safe_stop),
        ("CAN", lambda: (notifier.stop(), bus.shutdown())),
        ("final step", lambda: gateway.feed(Tick(gateway.now()))),
        ("journal", gateway.flush_journal),
        ("open events", lambda: _end_open_events(gateway)),
        ("inverter link", gateway.inverter.close),
    )
    for what, action in steps:
        try:
            outcome = action()
            if asyncio.iscoroutine(outcome):
                await outcome
        except Exception:  # noqa: BLE001 - shutting down: report and go on to the next step
            log.exception("shutdown: %s failed", what)


async def _end_open_events(gateway: Gateway) -> None:
    last = await gateway.inverter.read_status()
    gateway.close_open_events(last.tot_wh_inj if last.comms_ok else None, "gateway stopped: event ended")


async def _until_stopped(stop: asyncio.Event, tasks: list[asyncio.Task]) -> int:
    """Wait for a stop signal (exit 0). A task that ends is a bug worth stopping for, loudly (exit 1):
    systemd restarts the gateway, and the inverter's revert timer covers the gap."""
    waiter = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
    for task in tasks + [waiter]:
        task.cancel()
    await asyncio.gather(*tasks, waiter, return_exceptions=True)
    failed = [task for task in done if task is not waiter]
    for task in failed:
        error = None if task.cancelled() else task.exception()
        log.critical("%s stopped unexpectedly: %s", task.get_name(), error or "it returned")
    return 1 if failed else 0


async def _supervised(source: Any, gateway: Gateway, pause_s: float = 5.0) -> None:
    """Run a dispatch source; a peer that makes it fail costs that source a restart, not the gateway."""
    while True:
        try:
            await source.run(gateway)
            log.error("%s ended; restarting it in %.0f s", type(source).__name__, pause_s)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - whatever a remote peer provokes, the gateway stays up
            log.exception("%s failed; restarting it in %.0f s", type(source).__name__, pause_s)
        await asyncio.sleep(pause_s)


def start_can_intake(bus: can.BusABC, reader: BmsReader, gateway: Gateway,
                     loop: asyncio.AbstractEventLoop) -> can.Notifier:
    """Frames are decoded in python-can's receive thread; each new snapshot hops to the event loop.

    No loop is given to the Notifier on purpose: with one, python-can re-raises a receive
    error and its thread dies, silencing the BMS until a restart.
    """
    hop = lambda snapshot: loop.call_soon_threadsafe(gateway.on_snapshot, snapshot)  # noqa: E731
    return can.Notifier(bus, [BmsListener(reader, hop)])


async def _every(period_s: float, action: Callable[[], Any]) -> None:
    while True:
        outcome = action()
        if asyncio.iscoroutine(outcome):
            await outcome
        await asyncio.sleep(period_s)


async def _command_writer(gateway: Gateway) -> None:
    """Write on every change at once, and at least every tick so refreshes happen."""
    while True:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(gateway.command_changed.wait(), TICK_S)
        await gateway.write_command()


# Buses that are software all the way down: python-can would apply acceptance filters in Python,
# frame by frame, which costs more than the reader's own id lookup. Every other interface gets
# the filters, which its kernel driver or hardware applies before a frame reaches user space.
SOFTWARE_BUSES = frozenset({"virtual", "remote"})


def bus_filters(interface: str, reader: BmsReader) -> list[dict[str, Any]] | None:
    return None if interface in SOFTWARE_BUSES else reader.can_filters()


def open_bus(config: Config, reader: BmsReader) -> can.BusABC:
    from firmware_py.errors import InputError

    try:
        return can.Bus(interface=config.can.interface, channel=config.can.channel, bitrate=config.can.bitrate,
                       can_filters=bus_filters(config.can.interface, reader))
    except (can.CanError, OSError, ValueError, ImportError) as err:
        raise InputError(f"{config.source}: can: cannot open {config.can.interface} bus "
                         f"{config.can.channel!r}: {err}") from None


def dispatch_sources(config: Config, gateway: Gateway) -> list[Any]:
    """The aggregator interfaces the config enables."""
    sources: list[Any] = []
    if config.dispatch.openadr.enabled:
        from firmware_py.dispatch.openadr import OpenAdrVen

        sources.append(OpenAdrVen(config.dispatch.openadr, rating_w=lambda: gateway.policy.max_discharge_w))
    if config.dispatch.sunspec_server.enabled:
        from firmware_py.dispatch.sunspec_server import DerRatings, SunSpecDerServer

        def meter() -> tuple[float, float]:
            inv = gateway.controller.inverter
            return (inv.tot_wh_inj, inv.tot_wh_abs) if inv is not None else (0.0, 0.0)

        sources.append(SunSpecDerServer(
            config.dispatch.sunspec_server, meter=meter,
            ratings=lambda: DerRatings.of(gateway.policy, gateway.controller.inverter)))
    return sources


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
