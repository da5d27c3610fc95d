"""The production path in one process: `assemble` + `Service`, exactly as `powershare-gw run` drives them.

The bench simulator steps the gateway in lock-step; this test instead runs the
service's own CAN intake (python-can Notifier thread hopping snapshots to the
loop), its command writer, tick, poll and journal tasks on the real clock,
against a simulated BMS on a python-can virtual bus and the simulated inverter
over Modbus TCP loopback. Every wait is for an event the parts raise
themselves, bounded by a timeout; nothing sleeps for a fixed time.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import can
import pytest
from firmware_py.sim.battery import Battery
from firmware_py.sim.bms_node import BmsNode
from firmware_py.sim.inverter import InverterModel, SimInverterServer
from firmware_py.sim.ports import free_port

from firmware_py.assembly import assemble
from firmware_py.config import Config, bundled_dbc
from firmware_py.core import Mode, StepResult
from firmware_py.core.types import DispatchKind, DispatchRequest, FaultRaised, Verdict
from firmware_py.gateway import Gateway
from firmware_py.journal import Journal
from firmware_py.service import RunOptions, Service, Systemd, run
from firmware_py.tasks import cancel_all, every

WAIT_S = 10.0
_channels = itertools.count()


class Watch:
    """An asyncio event that fires the first time `condition` holds for a value a part reports."""

    def __init__(self, condition: Callable[[Any], bool]):
        self.condition, self.event = condition, asyncio.Event()

    def see(self, value: Any) -> None:
        if self.condition(value):
            self.event.set()

    async def wait(self, what: str) -> None:
        try:
            await asyncio.wait_for(self.event.wait(), WAIT_S)
        except asyncio.TimeoutError:
            raise AssertionError(f"timed out after {WAIT_S} s waiting for {what}") from None


class LivePack:
    """The truck on the virtual CAN `channel` while the context is open: a pack that follows what the
    inverter `model` draws and its BMS sending on the bus, both stepped every 10 ms on the real clock."""

    def __init__(self, channel: str, model: InverterModel) -> None:
        self.battery, self.model = Battery(soc_pct=80), model
        self.bus = can.Bus(interface="virtual", channel=channel)
        self.node = BmsNode(self.battery, self.bus, bundled_dbc("cybertruck_bms.dbc"))

    def _physics(self) -> None:
        now, b = time.time(), self.battery
        b.step(0.01, self.model.advance(0.01, now, b.max_discharge_w, b.max_charge_w))
        self.node.emit_due(now)

    async def __aenter__(self) -> BmsNode:
        self._task = asyncio.create_task(every(0.01, self._physics))
        return self.node

    async def __aexit__(self, *exc: object) -> None:
        await cancel_all([self._task])
        self.bus.shutdown()


def gateway_config(tmp_path: Path, channel: str, **inverter: Any) -> Config:
    """A gateway on the virtual CAN `channel`, the inverter as `inverter` says, its files in `tmp_path`."""
    base = Config()
    return replace(
        base, can=replace(base.can, interface="virtual", channel=channel),
        inverter=replace(base.inverter, **inverter),
        journal=replace(base.journal, path=str(tmp_path / "journal.sqlite")),
        owner=replace(base.owner, settings_file=str(tmp_path / "owner.json"),
                      token_file=str(tmp_path / "owner.token"), api_listen="127.0.0.1:0"))


async def evening_dispatch_accepted(gateway: Gateway) -> float:
    """An aggregator's 5 kW discharge from now for an hour, submitted and accepted; when it was sent."""
    now = time.time()
    answer = await gateway.submit(DispatchRequest(
        "evening", "test", DispatchKind.DISCHARGE, 5_000, now, now + 3_600, received_at=now))
    assert answer is not None and answer.verdict is Verdict.ACCEPTED
    return now


def test_run_path_reads_the_bms_serves_dispatch_and_a_fault_frame_reaches_the_inverter_as_zero(tmp_path: Path):
    async def main() -> None:
        model = InverterModel(now=time.time())
        wsets: list[float] = []
        discharging, stopped = Watch(lambda w: w > 0), Watch(lambda w: w == 0 and wsets and max(wsets) > 0)

        def noting(watts: float) -> None:
            wsets.append(watts)
            discharging.see(watts)
            stopped.see(watts)

        model.on_wset = noting
        async with SimInverterServer(model) as server:
            channel = f"service-test-{next(_channels)}"
            config = gateway_config(tmp_path, channel, port=server.port, poll_interval_s=0.2)
            service = Service(assemble(config, time.time), RunOptions())
            ready, faulted = Watch(lambda r: r.controller.mode is Mode.STANDBY), \
                Watch(lambda r: any(isinstance(e, FaultRaised) and e.kind == "bms_fault" for e in r.events))

            def observe(result: StepResult) -> None:
                ready.see(result)
                faulted.see(result)

            service.gateway.observers.append(observe)
            async with LivePack(channel, model) as node:
                try:
                    await service.start()
                    await ready.wait("the gateway to have fresh BMS and inverter data")
                    now = await evening_dispatch_accepted(service.gateway)
                    await discharging.wait("a discharge setpoint at the inverter")
                    node.inject("bms_fault", until=now + 3_600)
                    await faulted.wait("the BMS fault to be raised")
                    await stopped.wait("WSet = 0 at the inverter after the fault frame")
                    assert service.gateway.controller.mode is Mode.FAULT
                    assert service.gateway.command.setpoint_w == 0
                    await asyncio.wait_for(service.gateway.earnings.updated.wait(), 10)  # the earnings task, at start
                    month = service.gateway.status()["earnings"]
                    assert month["month"] == time.strftime("%Y-%m", time.gmtime()) and month["events"] == 0
                finally:
                    await service.stop()
        assert wsets[-1] == 0  # the stop's safe write
        journal = Journal.open(tmp_path / "journal.sqlite", readonly=True)
        try:
            kinds = [record.kind for record in journal.records()]
        finally:
            journal.close()
        assert {"DispatchRequest", "DispatchAnswer", "FaultRaised", "DispatchEnded", "EventEnergy"} <= set(kinds)

    asyncio.run(main())


def test_a_dispatch_gets_its_first_watts_from_the_step_the_core_asks_for_not_the_next_tick(tmp_path: Path):
    """The step that enters DISCHARGE holds 0 W and asks to be stepped again soon; the service does.

    Nothing else steps the core here: no tick for an hour, no inverter poll for a minute once the
    start-up's two are done, and a pack that does not change (the reader hands out no snapshot for
    unchanged frames). So the first watts at the inverter can only come from the step the core asked for.
    """
    async def main() -> list[StepResult]:
        model = InverterModel(now=time.time())
        first = Watch(lambda w: w > 0)
        model.on_wset = first.see
        async with SimInverterServer(model) as server:
            channel = f"service-test-{next(_channels)}"
            config = gateway_config(tmp_path, channel, port=server.port, poll_interval_s=50)
            config = replace(config, safety=replace(config.safety, bms_timeout_s=10, inverter_timeout_s=60))
            node_bus = can.Bus(interface="virtual", channel=channel)
            node = BmsNode(Battery(soc_pct=80), node_bus, bundled_dbc("cybertruck_bms.dbc"))
            service = Service(assemble(config, time.time), RunOptions(owner_api=False, tick_s=3_600))
            polls: set[float] = set()
            polled = Watch(lambda r: polls.add(r.controller.inverter.received_at) or len(polls) == 2)
            ready = Watch(lambda r: r.controller.mode is Mode.STANDBY)
            results: list[StepResult] = []
            service.gateway.observers += [polled.see, ready.see, results.append]
            frames = asyncio.create_task(every(0.05, lambda: node.emit_due(time.time())))
            try:
                await service.start()
                await ready.wait("the gateway to have fresh BMS and inverter data")
                await polled.wait("the start-up's inverter reads (the service's own, then its poll task's first)")
                await evening_dispatch_accepted(service.gateway)
                await first.wait("the first discharge watts at the inverter")
                return [r for r in results if r.controller.mode is Mode.DISCHARGE]
            finally:
                await cancel_all([frames])
                await service.stop()
                node_bus.shutdown()

    entering, following = asyncio.run(main())[:2]
    assert entering.command.setpoint_w == 0 and entering.step_again_at is not None
    assert following.controller.last_step_at >= entering.step_again_at and following.command.setpoint_w > 0


def test_ready_waits_for_fresh_data_at_most_its_bound_and_never_holds_up_a_stop(tmp_path: Path, caplog):
    """No BMS and no inverter: READY comes after the bound, saying what is missing; a stop ends the wait."""
    async def main() -> tuple[bool, bool]:
        with socket.socket() as sock:  # a port nobody listens on: the inverter is unreachable
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        config = gateway_config(tmp_path, f"service-test-{next(_channels)}", port=port, timeout_s=0.2)
        service = Service(assemble(config, time.time), RunOptions(owner_api=False, ready_timeout_s=0.3))
        try:
            await service.start()
            timed_out = await service.ready()
            service.options = replace(service.options, ready_timeout_s=600)
            stop = asyncio.Event()
            stop.set()
            stopped = await asyncio.wait_for(service.ready(stop), 30)  # at once, not after the 600 s bound
        finally:
            await service.stop()
        return timed_out, stopped

    with caplog.at_level(logging.WARNING, logger="firmware_py.service"):
        assert asyncio.run(main()) == (False, False)
    assert "ready without fresh data" in caplog.text and "waiting for BMS and inverter data" in caplog.text


async def until(condition: Callable[[], bool], what: str) -> None:
    """Re-check `condition` (bounded by WAIT_S): only for what raises no event (a queue taken, a socket closed)."""
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {WAIT_S} s waiting for {what}")
        await asyncio.sleep(0.01)


@asynccontextmanager
async def discharging_service(tmp_path: Path, channel: str, server: SimInverterServer | None = None,
                              options: RunOptions | None = None, systemd: Systemd | None = None,
                              **inverter: Any) -> AsyncIterator[tuple[Service, list[float]]]:
    """The production service discharging 5 kW for an aggregator; the inverter's WSet writes as they come.
    `server`: an inverter of the test's own (not started), `options` and `systemd` the service's (by default
    no owner API and no systemd),
    `inverter`: more [inverter] settings."""
    server = server or SimInverterServer(InverterModel(now=time.time()))
    model = server.model
    wsets: list[float] = []
    model.on_wset = wsets.append
    async with server:
        service = Service(assemble(gateway_config(tmp_path, channel, port=server.port, poll_interval_s=0.2,
                                                  **inverter), time.time), options or RunOptions(owner_api=False), systemd)
        async with LivePack(channel, model):
            await service.start()
            try:
                await until(lambda: service.gateway.controller.mode is Mode.STANDBY, "fresh BMS and inverter data")
                await evening_dispatch_accepted(service.gateway)
                await until(lambda: model.wset_w > 0, "a discharge setpoint at the inverter")
                yield service, wsets
            finally:
                if not all(task.done() for task in service.tasks):  # the test did not stop it itself
                    await service.stop()


def test_the_safe_stop_is_written_while_the_journal_still_waits_on_a_locked_disk(tmp_path: Path):
    """A journal write held by another process's lock must not hold back the 0 W: the tasks that command
    and step the gateway end, the inverter is told, and only then does the stop wait for the journal."""
    async def main() -> None:
        async with discharging_service(tmp_path, f"service-test-{next(_channels)}") as (service, wsets):
            other = sqlite3.connect(service.assembly.config.journal.path, isolation_level=None, timeout=0.1)
            other.execute("BEGIN EXCLUSIVE")  # a backup, or a second writer
            try:
                service.gateway.sample()
                await until(lambda: service.gateway.unwritten() == 0, "the journal task to take the record")
                journal = next(task for task in service.tasks if task.get_name() == "journal")
                stopping = asyncio.create_task(service.stop())
                await until(lambda: wsets and wsets[-1] == 0, "WSet = 0 while the journal is locked")
                assert not journal.done()  # told before the journal's write, still waiting on the lock, ended
            finally:
                other.execute("ROLLBACK")
                other.close()
            await asyncio.wait_for(stopping, WAIT_S)

    asyncio.run(main())


def test_a_task_whose_clean_up_hangs_is_named_and_the_safe_stop_still_comes(tmp_path: Path, monkeypatch, caplog):
    """The stop cancels the tasks before the safe stop; one that never ends (a clean-up awaiting a peer
    that never answers) held back the 0 W for ever, past systemd's SIGKILL. It gets `TASKS_END_S`."""
    from firmware_py import service as service_module

    monkeypatch.setattr(service_module, "TASKS_END_S", 1.0)  # 0.2 s: a loaded CI machine's tick took longer
    released = asyncio.Event()

    async def clean_up_hangs() -> None:
        while not released.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await released.wait()

    async def main() -> None:
        async with discharging_service(tmp_path, f"service-test-{next(_channels)}") as (service, wsets):
            hanging = asyncio.create_task(clean_up_hangs(), name="stuck integration")
            service.tasks.append(hanging)
            with caplog.at_level(logging.INFO, logger="firmware_py.service"):
                await asyncio.wait_for(service.stop(), WAIT_S)
            assert wsets[-1] == 0 and not hanging.done()
            released.set()
            await asyncio.wait_for(hanging, WAIT_S)
        assert "stop: stuck integration did not end within 1 s of being cancelled" in caplog.text
        assert "safe stop: WSet = 0 written to the inverter and read back" in caplog.text

    asyncio.run(main())


def test_a_silent_inverter_costs_the_stop_one_bounded_safe_stop_and_is_not_asked_again(tmp_path: Path, monkeypatch,
                                                                                        caplog):
    """systemd kills the service 15 s after SIGTERM: an inverter that stops answering (its timeout may be
    set long) must get one try at WSet = 0 within `SAFE_STOP_S`, and no second wait for the final meter
    reading, so the open event is ended and the journal closed in time."""
    from firmware_py import service as service_module
    from firmware_py.sim.faults import InverterFault

    monkeypatch.setattr(service_module, "SAFE_STOP_S", 0.5)
    asked: list[int] = []
    server = SimInverterServer(InverterModel(now=time.time()), slow_reply_s=60.0)
    action = server._action

    async def counted(*args: Any) -> Any:
        asked.append(1)
        return await action(*args)

    server._action = counted

    async def main() -> None:
        async with discharging_service(tmp_path, f"service-test-{next(_channels)}", server, timeout_s=5.0) \
                as (service, _):
            server.model.inject(InverterFault.SLOW_REPLY, until=float("inf"))
            safe_stop = service._safe_stop

            async def safe_stop_then_count() -> None:
                await safe_stop()
                asked_by_the_safe_stop.append(len(asked))

            service._safe_stop = safe_stop_then_count
            with caplog.at_level(logging.WARNING, logger="firmware_py.service"):
                await asyncio.wait_for(service.stop(), WAIT_S)
            assert "the inverter could not be told (no answer within 0.5 s)" in caplog.text

    asked_by_the_safe_stop: list[int] = []
    asyncio.run(main())
    assert asked_by_the_safe_stop == [len(asked)]  # nothing more asked of the silent inverter
    with Journal.open(tmp_path / "journal.sqlite", readonly=True) as journal:
        ended = [r for r in journal.records() if r.kind == "DispatchEnded"]
    assert [r.payload["reason"] for r in ended] == ["gateway stopped: event ended"]


def test_a_sigterm_while_start_up_waits_on_a_silent_inverter_goes_straight_to_the_safe_stop(
        tmp_path: Path, monkeypatch, caplog):
    """Start-up's first inverter reading may wait `[inverter] timeout_s` (30 s at most); a SIGTERM meanwhile
    must not wait for it and then for the safe stop too (past systemd's `TimeoutStopSec`: SIGKILL before the
    journal closes). `run` abandons the start-up, tries WSet = 0 within its own bound, closes the journal."""
    from firmware_py import service as service_module

    monkeypatch.setattr(service_module, "SAFE_STOP_S", 0.5)

    async def main() -> int:
        asked = asyncio.Event()
        held: list[asyncio.StreamWriter] = []

        async def never_answer(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            held.append(writer)
            asked.set()

        server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        config = gateway_config(tmp_path, f"service-test-{next(_channels)}", port=port, timeout_s=30.0)
        running = asyncio.create_task(run(config, RunOptions(owner_api=False)))
        try:
            await asyncio.wait_for(asked.wait(), WAIT_S)  # start-up asks the inverter its first reading
            os.kill(os.getpid(), signal.SIGTERM)
            return await asyncio.wait_for(running, WAIT_S)  # not after the 30 s the first reading may take
        finally:
            await cancel_all([running])
            for writer in held:
                writer.close()
            server.close()

    with caplog.at_level(logging.INFO, logger="firmware_py.service"):
        assert asyncio.run(main()) == 0
    assert "gateway running" not in caplog.text
    assert "safe stop: the inverter could not be told (no answer within 0.5 s)" in caplog.text
    assert "gateway stopped: journal closed" in caplog.text


SIGNALLED_WHILE_ASSEMBLING = """
import os, signal, sys
from firmware_py import cli, service
assemble = service.assemble
def signalled(*args, **kwargs):
    os.kill(os.getpid(), int(sys.argv[2]))  # as `systemctl stop` (or a closed terminal) while assembling
    return assemble(*args, **kwargs)
service.assemble = signalled
sys.exit(cli.main(["run", "--config", sys.argv[1]]))
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=lambda s: s.name)
def test_a_stop_signal_before_the_loop_takes_the_signals_over_is_a_clean_stop_with_exit_0(tmp_path: Path, sig):
    """`run` takes the stop signals over once imported, configured and assembled: a signal before that
    killed the process (exit -15, -1) or became a KeyboardInterrupt (exit 1), outside the 0/1/2 contract."""
    path = tmp_path / "gateway.toml"
    path.write_text(f"""
[can]
interface = "virtual"
channel = "service-early-{sig.name}"
[inverter]
port = {free_port()}
timeout_s = 0.2
[owner]
api_listen = "127.0.0.1:0"
[journal]
path = "journal.sqlite"
""", encoding="utf-8")
    done = subprocess.run([sys.executable, "-c", SIGNALLED_WHILE_ASSEMBLING, str(path), str(int(sig))],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "gateway stopped: journal closed" in done.stderr and "gateway running" not in done.stderr
    assert "Traceback" not in done.stderr


def test_an_inverter_that_refuses_the_safe_stop_but_answers_is_still_read_for_the_final_energy(tmp_path: Path):
    """Only a silent inverter is spared the final meter reading: one that refuses the write (remote
    control disabled) still answers, and the open event's gap since its last report is billed."""
    from firmware_py.inverter.client import LinkError, ModbusErrorCause

    async def main() -> None:
        async with discharging_service(tmp_path, f"service-test-{next(_channels)}") as (service, _):
            async def refused(address: int, values: Any) -> None:
                raise LinkError("Modbus exception 4 (device failure)", what=f"writing {address}", drop=False,
                                kind=ModbusErrorCause.EXCEPTION)

            service.gateway.inverter._write = refused
            await asyncio.wait_for(service.stop(), WAIT_S)

    asyncio.run(main())
    with Journal.open(tmp_path / "journal.sqlite", readonly=True) as journal:
        (final,) = [r.payload for r in journal.records() if r.kind == "EventEnergy" and r.payload["final"]]
    assert final["meter_total_wh"] is not None


def test_a_stop_slower_than_the_data_timeouts_journals_no_fault_the_stop_caused(tmp_path: Path):
    """The stop ends the poll, tick and CAN intake first; a stop that then takes longer than the inverter's
    and the BMS's timeouts (a slow safe stop, a journal write waiting on a lock) must not step the core on
    the data it no longer collects: no fault and no transition to FAULT is journaled, and the open event
    is still ended. The stop's slowness is the gateway's clock moved on by 10 s after the safe stop."""
    async def main() -> None:
        async with discharging_service(tmp_path, f"service-test-{next(_channels)}") as (service, _):
            gateway, safe_stop = service.gateway, service._safe_stop

            async def slow_safe_stop() -> None:
                await safe_stop()
                gateway.clock = lambda: time.time() + 10.0  # past inverter_timeout_s (3 s) and the BMS's

            service._safe_stop = slow_safe_stop
            await asyncio.wait_for(service.stop(), WAIT_S)

    asyncio.run(main())
    with Journal.open(tmp_path / "journal.sqlite", readonly=True) as journal:
        records = journal.records()
    assert [r.payload for r in records if r.kind == "FaultRaised"] == []
    assert [r.payload for r in records if r.kind == "Transition" and r.payload["to_state"] == "FAULT"] == []
    assert [r.payload["reason"] for r in records if r.kind == "DispatchEnded"] == ["gateway stopped: event ended"]


class WatchedSystemd(Systemd):
    """systemd as the service sees it with `WatchdogSec` set: a ping asked for every 20 ms; what it is sent."""

    def __init__(self) -> None:
        super().__init__()
        self.watchdog_s, self.sent = 0.02, list[str]()

    def notify(self, message: str) -> None:
        self.sent.append(message)


def test_the_watchdog_is_fed_only_while_the_control_tasks_finish_their_rounds(tmp_path: Path, caplog):
    """An inverter read that never returns (a hang inside an await leaves the event loop free) stops the
    pings, so systemd restarts the gateway; the read returning after all (slow, not hung) resumes them.
    Each ping decision is watched as it is taken: no wait on the wall clock beyond the bounds."""
    async def main() -> None:
        systemd, options = WatchedSystemd(), RunOptions(owner_api=False, hung_after_s=0.1)
        async with discharging_service(tmp_path, f"service-test-{next(_channels)}", options=options,
                                       systemd=systemd, timeout_s=0.2) as (service, _):
            decisions: list[bool] = []
            withheld, resumed = Watch(lambda d: decisions[-3:] == [False] * 3), Watch(lambda d: d and False in decisions)
            ping = service.watchdog.ping

            def deciding() -> bool:
                decisions.append(ping())
                withheld.see(decisions[-1])
                resumed.see(decisions[-1])
                return decisions[-1]

            watching = asyncio.create_task(every(systemd.watchdog_s, deciding))  # beside the service's own
            inverter, released = service.gateway.inverter, asyncio.Event()
            read_status = inverter.read_status

            async def hung(**kwargs: Any):
                await released.wait()
                return await read_status(**kwargs)

            try:
                inverter.read_status = hung
                await withheld.wait("three pings withheld while the poll hangs")
                pings_before = systemd.sent.count("WATCHDOG=1")
                assert all(decisions[:decisions.index(False)])  # fed until the hang, on every decision
                released.set()
                await resumed.wait("a ping once the poll ends its round")
                assert systemd.sent.count("WATCHDOG=1") >= pings_before + 1
            finally:
                inverter.read_status = read_status
                await cancel_all([watching])

    with caplog.at_level(logging.WARNING, logger="firmware_py.watchdog"):
        asyncio.run(main())
    messages = [r.getMessage() for r in caplog.records if r.name == "firmware_py.watchdog"]
    assert len(messages) == 2 and "no ping while poll has finished no round" in messages[0]
    assert "pings resume" in messages[1]


def test_an_owner_change_arriving_while_the_service_stops_neither_steps_the_core_nor_commands_the_inverter(
        tmp_path: Path):
    """The owner API serves until late in the stop (after the safe stop): a change arriving once the stop
    began is answered 503, and no step and no inverter write but the safe stop's 0 W follow it."""
    async def main() -> None:
        async with discharging_service(tmp_path, f"service-test-{next(_channels)}",
                                       options=RunOptions()) as (service, wsets):
            gateway = service.gateway
            stepped: list[Mode] = []
            gateway.observers.append(lambda result: stepped.append(result.controller.mode) if gateway.stopping else None)
            host, port = service.owner_api.listener.bound[:2]
            token = (tmp_path / "owner.token").read_text().strip()
            reader, writer = await asyncio.open_connection(host, port)
            stopping = asyncio.create_task(service.stop())
            await asyncio.sleep(0)  # the stop has begun: `begin_stop` runs before its first wait
            assert gateway.stopping
            writes_at_stop = len(wsets)
            body = b'{"pct": 20}'
            writer.write(f"PUT /reserve HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {token}\r\n"
                         f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                         f"Connection: close\r\n\r\n".encode() + body)
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(), WAIT_S)
            await asyncio.wait_for(stopping, WAIT_S)
            writer.close()
            assert answer.startswith(b"HTTP/1.1 503"), answer[:200]
            assert b"the gateway is stopping: nothing changed" in answer
            assert stepped == []
            # the safe stop's 0 W last; before it at most the one write the writer had on the wire when the
            # stop began (the inverter records a write as it lands; no step made one since: above)
            after = wsets[writes_at_stop:]
            assert after[-1:] == [0.0] and len(after) <= 2, after

    asyncio.run(main())


def test_a_can_adapter_missing_at_start_leaves_the_bms_link_down_and_the_service_up_until_it_opens(
        tmp_path: Path, caplog):
    """An adapter not there at start (here socketcan on an interface that does not exist: OSError) stopped
    `run` with exit 2, and systemd's start limit then left the gateway down until a reboot. It now
    starts with the BMS link down, holds 0 W, retries, and heals once the bus can be opened."""
    async def main() -> None:
        model = InverterModel(now=time.time())
        async with SimInverterServer(model) as server:
            channel = f"service-test-{next(_channels)}"
            config = gateway_config(tmp_path, channel, port=server.port, poll_interval_s=0.2)
            config = replace(config, can=replace(config.can, interface="socketcan", channel="psgw-absent0"))
            service = Service(assemble(config, time.time), RunOptions(owner_api=False))
            link = service.assembly.can_link
            assert link.bus is None
            try:
                await service.start()
                await until(lambda: link.reopens >= 2, "the link to retry the missing adapter")
                assert not any(task.done() for task in service.tasks)  # running, not exited
                view = service.gateway.links.view(time.time())["bms"]
                assert not view["ok"] and "cannot open the socketcan bus 'psgw-absent0'" in view["cause"]
                assert service.gateway.command.setpoint_w == 0
                assert service.gateway.controller.mode is not Mode.STANDBY  # no BMS data: not ready to serve
                # The adapter appears: the same channel now opens (a virtual bus stands in for it).
                link._opener = lambda: can.Bus(interface="virtual", channel=channel)
                async with LivePack(channel, model):
                    await until(lambda: service.gateway.controller.mode is Mode.STANDBY, "fresh BMS data")
                    await until(lambda: service.gateway.links.view(time.time())["bms"]["ok"], "the link shown up")
                    assert link.bus is not None
            finally:
                await service.stop()

    with caplog.at_level(logging.WARNING):
        asyncio.run(main())
    assert len([r for r in caplog.records if "starts without BMS data" in r.getMessage()]) == 1
    assert len([r for r in caplog.records if r.getMessage().startswith("link lost: bms")]) == 1
    assert not [r for r in caplog.records if r.exc_info]
