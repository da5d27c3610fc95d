"""`powershare-gw bench`: the performance targets (the README's performance section), measured, never asserted in tests.

- reaction: a BMS fault frame on the CAN bus -> `WSet = 0` received by the simulated
  inverter over Modbus TCP loopback, in real time: first with `powershare-gw run` and
  every peer and load in processes of their own (`process_bench.py`), then with the
  real runtime and its peers sharing one process (`RealtimeRig`), each beside its floor;
- dispatch: a SunSpec `WSet` write by an aggregator to the gateway's DER server ->
  the inverter's new setpoint;
- bus load: CPU of the gateway's CAN intake on a worst-case 500 kbit/s bus (3,704
  frames/s, 90 % not BMS) against a naive decode-everything loop and the floor (a
  loop that only receives);
- simulator: simulated seconds per wall second on a bundled scenario, and the RSS.
Everything binds to 127.0.0.1; every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import resource
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import can
from cantools.database.errors import DecodeError
from firmware_py.arguments import number, whole
from firmware_py.sim import process_bench, scenario
from firmware_py.sim.battery import Battery
from firmware_py.sim.bms_node import BmsNode
from firmware_py.sim.inverter import InverterModel, SimInverterServer
from firmware_py.sim.measuring import BUS_FRAMES_PER_S, BenchmarkFailed, find_model, flood, percentiles, signed
from firmware_py.sim.sim_command import check_outputs

from firmware_py.assembly import assemble
from firmware_py.bms.reader import BmsReader
from firmware_py.config import Config, bundled_dbc
from firmware_py.core import Mode
from firmware_py.core.types import DispatchKind, DispatchRequest, OwnerSettings
from firmware_py.errors import InputError
from firmware_py.inverter.sunspec import (
    DER_CONTROL_AC,
    WSetEna,
    WSetMod,
)
from firmware_py.journal import RecordKind
from firmware_py.narration import lines_written_aside
from firmware_py.service import RunOptions, Service
from firmware_py.tasks import cancel_all, every, run_stoppable, stop_signals_interrupt

WAIT_S = 10.0
DESCENT = 300
"""Dispatch samples per descent of the setpoint (9,000 W down by 20 W a sample), then raised again."""
WARM_UP_RAMP_W_PER_S = 20_000.0
"""The dispatch rig's ramp rate: its warm-up to 9,500 W takes half a second."""


class RealtimeRig:
    """Pack, BMS node, inverter and the real gateway, all on the wall clock."""

    def __init__(self, workdir: Path, owner_api: bool = False, der_server: bool = False,
                 ramp_w_per_s: float | None = None):
        self.workdir = workdir
        self.owner_api, self.der_server = owner_api, der_server
        self.ramp_w_per_s = ramp_w_per_s  # None: the configuration's default
        self.clock = time.time
        self.channel = f"powershare-benchmark-{id(self)}"
        self.setpoints: list[tuple[float, float]] = []  # (perf_counter, WSet) as the inverter received them

    async def __aenter__(self) -> "RealtimeRig":
        self.workdir.mkdir(parents=True, exist_ok=True)
        dbc = bundled_dbc("cybertruck_bms.dbc")
        self.battery = Battery(soc_pct=80)
        self.node_bus = can.Bus(interface="virtual", channel=self.channel)
        self.node = BmsNode(self.battery, self.node_bus, dbc)
        self.model = InverterModel(now=self.clock())
        self.model.on_wset = lambda watts: self.setpoints.append((time.perf_counter(), watts))
        self.server = SimInverterServer(self.model)
        port = await self.server.start()
        base = Config()
        self.config = replace(
            base, can=replace(base.can, interface="virtual", channel=self.channel),
            inverter=replace(base.inverter, port=port, poll_interval_s=0.5),
            safety=replace(base.safety, fault_holdoff_s=0, lockout_faults=100, lockout_window_s=1,
                           ramp_w_per_s=self.ramp_w_per_s or base.safety.ramp_w_per_s),
            journal=replace(base.journal, path=str(self.workdir / "bench.sqlite")),
            owner=replace(base.owner, settings_file=str(self.workdir / "owner-settings.json"),
                          token_file=str(self.workdir / "owner.token"), api_listen="127.0.0.1:0"),
            dispatch=replace(base.dispatch, sunspec_server=replace(
                base.dispatch.sunspec_server, enabled=self.der_server, listen="127.0.0.1:0")))
        self.service = Service(assemble(self.config, self.clock), RunOptions(owner_api=self.owner_api))
        self.gateway = self.service.gateway
        await self.service.start()
        self.physics = asyncio.create_task(every(0.01, self._physics), name="physics")
        return self

    def _physics(self) -> None:
        now = self.clock()
        dc = self.model.advance(0.01, now, self.battery.max_discharge_w, self.battery.max_charge_w)
        self.battery.step(0.01, dc)
        self.node.emit_due(now)

    @property
    def der_port(self) -> int:
        """Where the gateway's own DER server listens (the service bound it before starting)."""
        return self.service.assembly.integrations["dispatch.sunspec_server"].port

    async def wait_for(self, condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + WAIT_S
        while not condition():
            if time.monotonic() > deadline:
                raise BenchmarkFailed(f"benchmark rig: timed out waiting for {what}")
            await asyncio.sleep(0.002)

    def fault_frame(self) -> bytes:
        """A 0x212 status frame saying FAULT, the pack otherwise as it is."""
        status = next(m for m in self.node.db.messages if m.frame_id == 0x212)
        return self.node.encode(status, {**self.node.field_values(), "bms_state": 6})[0]

    async def discharging(self) -> None:
        await self.wait_for(lambda: self.gateway.controller.mode is Mode.STANDBY, "the gateway to be ready")
        now = self.clock()
        await self.gateway.submit(DispatchRequest("bench", "benchmark", DispatchKind.DISCHARGE, 5_000, now,
                                                  now + 3_600, received_at=now))
        await self.wait_for(lambda: self.model.wset_w > 0, "the inverter to discharge")

    async def __aexit__(self, *exc: object) -> None:
        await cancel_all([self.physics])
        await self.service.stop()
        await self.server.stop()
        self.node_bus.shutdown()


class Load:
    """The targets' load beside a reaction: a saturated bus, the DER server polled at 10 Hz,
    the status API polled at 1 Hz, and the journal writing."""

    def __init__(self, rig: RealtimeRig, foreign_per_s: float):
        self.rig, self.foreign_per_s = rig, foreign_per_s
        self.stopping = threading.Event()
        self.counts = {"foreign frames": 0, "DER reads": 0, "status reads": 0, "journal notes": 0}
        self.tasks: list[asyncio.Task[Any]] = []

    @classmethod
    async def start(cls, rig: RealtimeRig) -> "Load":
        load = cls(rig, BUS_FRAMES_PER_S - rig.node.frames_per_s())
        load.flood = threading.Thread(target=load._flood, name="bench-flood", daemon=True)
        load.flood.start()
        load.tasks = [asyncio.create_task(every(0.1, lambda: load._read_der(rig.der_port))),
                      asyncio.create_task(every(1.0, load._read_status)),
                      asyncio.create_task(every(0.1, load._note))]
        return load

    def describe(self) -> str:
        return (f"{BUS_FRAMES_PER_S} frames/s on the bus ({self.foreign_per_s:.0f}/s not BMS), DER server read "
                "at 10 Hz, status API at 1 Hz, a journal record every 0.1 s; "
                + ", ".join(f"{v} {k}" for k, v in self.counts.items()))

    def _flood(self) -> None:
        """Frames the BMS reader must look past, at the bus's worst-case rate (a thread, as a bus would)."""
        bus = can.Bus(interface="virtual", channel=self.rig.channel)
        try:
            flood(bus, self.foreign_per_s, self.rig.gateway.reader.frame_ids, self.stopping.is_set,
                  lambda n: self.counts.__setitem__("foreign frames", n))
        finally:
            bus.shutdown()

    async def _read_der(self, port: int) -> None:
        from pymodbus.client import AsyncModbusTcpClient

        if not hasattr(self, "der"):
            self.der = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=2)
            await self.der.connect()
        await self.der.read_holding_registers(40000, count=100, device_id=1)
        self.counts["DER reads"] += 1

    async def _read_status(self) -> None:
        from firmware_py.owner.access import read_token

        reader, writer = await asyncio.open_connection(*self.rig.service.owner_api.address.rsplit(":", 1))
        token = read_token(self.rig.config.owner.token_file)
        writer.write(f"GET /status HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {token}\r\n"
                     "Connection: close\r\n\r\n".encode())
        await reader.read()
        writer.close()
        self.counts["status reads"] += 1

    def _note(self) -> None:
        self.rig.gateway.note(RecordKind.BENCH_LOAD, {"n": self.counts["journal notes"]})
        self.counts["journal notes"] += 1

    async def stop(self) -> None:
        self.stopping.set()
        await cancel_all(self.tasks)
        await asyncio.to_thread(self.flood.join, 5)
        if hasattr(self, "der"):
            self.der.close()


async def reaction(samples: int, workdir: Path, loaded: bool = False) -> dict[str, Any]:
    """BMS fault frame sent -> WSet = 0 received by the inverter, `samples` times; idle, or under `Load`."""
    async with RealtimeRig(workdir, owner_api=loaded, der_server=loaded) as rig:
        await rig.discharging()
        load = await Load.start(rig) if loaded else None
        try:
            fault_frame = rig.fault_frame()
            latencies = []
            for _ in range(samples):
                await rig.wait_for(lambda: rig.model.wset_w > 0, "discharge to resume")
                seen = len(rig.setpoints)
                sent = time.perf_counter()
                rig.node_bus.send(can.Message(arbitration_id=0x212, data=fault_frame, is_extended_id=False))
                await rig.wait_for(lambda: any(w == 0 for _, w in rig.setpoints[seen:]), "WSet = 0")
                received = next(t for t, w in rig.setpoints[seen:] if w == 0)
                latencies.append((received - sent) * 1000)
        finally:
            if load is not None:
                await load.stop()
    what = "BMS fault frame -> WSet = 0 at the inverter (Modbus TCP loopback)"
    if load is not None:
        what += f", under load: {load.describe()}"
    return {"what": what, "target_p99_ms": 2 if loaded else None, **percentiles(latencies)}


async def reaction_floor(samples: int) -> dict[str, Any]:
    """The physical floor of the reaction: one CAN frame through python-can, one Modbus write, no gateway.

    A Notifier thread receives the frame and hops to the loop, which writes WSet in one
    Modbus request to the simulated inverter: the least any gateway on this stack could take.
    """
    from pymodbus.client import AsyncModbusTcpClient

    from firmware_py.config import InverterConfig
    from firmware_py.inverter.client import InverterClient

    received: list[tuple[float, float]] = []
    model = InverterModel(now=time.time())
    model.on_wset = lambda watts: received.append((time.perf_counter(), watts))
    async with SimInverterServer(model) as server:
        probe = InverterClient(InverterConfig(port=server.port), time.time)
        address = (await probe.connect()).address(704, "WSet")
        await probe.close()
        client = AsyncModbusTcpClient("127.0.0.1", port=server.port, timeout=2)
        await client.connect()
        loop = asyncio.get_running_loop()
        channel = f"powershare-floor-{random.random()}"
        tx, rx = can.Bus(interface="virtual", channel=channel), can.Bus(interface="virtual", channel=channel)

        class Hop(can.Listener):
            def on_message_received(self, msg: can.Message) -> None:
                watts = int.from_bytes(msg.data[:2], "little")
                loop.call_soon_threadsafe(lambda: loop.create_task(client.write_registers(address, [0, watts])))

        notifier = can.Notifier(rx, [Hop()])
        deadline = time.monotonic() + WAIT_S
        try:
            latencies = []
            for n in range(samples):
                seen, watts, sent = len(received), 1 + n % 1000, time.perf_counter()
                tx.send(can.Message(arbitration_id=0x212, data=watts.to_bytes(2, "little") + bytes(6),
                                    is_extended_id=False))
                while len(received) == seen:
                    if time.monotonic() > deadline:
                        raise BenchmarkFailed("benchmark floor: timed out waiting for the inverter's write")
                    await asyncio.sleep(0)
                latencies.append((received[-1][0] - sent) * 1000)
                deadline = time.monotonic() + WAIT_S
        finally:
            notifier.stop()
            tx.shutdown()
            rx.shutdown()
            client.close()
    return {"what": "floor: one CAN frame (python-can virtual, Notifier thread) + one Modbus write, no gateway",
            **percentiles(latencies)}


async def dispatch(samples: int, workdir: Path) -> dict[str, Any]:
    """SunSpec WSet write to the gateway's DER server -> the inverter's setpoint."""
    from pymodbus.client import AsyncModbusTcpClient

    from firmware_py.inverter.sunspec import ModelDef

    # Only the untimed warm-up climbs, at the ramp rate (at the default 2,000 W/s it took 4.75 s of every
    # run); each timed sample lowers the setpoint, which is held at once whatever the rate.
    async with RealtimeRig(workdir, der_server=True, ramp_w_per_s=WARM_UP_RAMP_W_PER_S) as rig:
        await rig.wait_for(lambda: rig.gateway.controller.mode is Mode.STANDBY, "the gateway to be ready")
        client = AsyncModbusTcpClient("127.0.0.1", port=rig.der_port, timeout=2)
        await client.connect()
        try:
            m704 = ModelDef.load(DER_CONTROL_AC)
            base = await find_model(client, DER_CONTROL_AC)
            regs = await client.read_holding_registers(base + m704.offset("WSet_SF"), count=1, device_id=1)
            sf = signed(regs.registers[0])
            await client.write_registers(base + m704.offset("WSetMod"), [WSetMod.WATTS], device_id=1)

            async def write_wset(watts: int) -> None:
                raw = round(watts / 10 ** sf) & 0xFFFFFFFF
                await client.write_registers(base + m704.offset("WSet"), [raw >> 16, raw & 0xFFFF], device_id=1)

            async def warm_up() -> None:  # untimed: a higher setpoint ramps at the gateway's ramp rate
                await write_wset(9_500)
                await rig.wait_for(lambda: rig.model.wset_w == 9_500, "the warm-up setpoint (ramped up)")

            await client.write_registers(base + m704.offset("WSetEna"), [WSetEna.ENABLED], device_id=1)
            latencies = []
            # Decreasing targets: a lower setpoint holds at once, while a higher one ramps at the
            # gateway's ramp rate (a policy, not a latency), so each sample times the path alone.
            # After each descent of DESCENT samples the setpoint is raised again, untimed.
            for n in range(samples):
                if n % DESCENT == 0:
                    await warm_up()
                watts = 9_000 - 20 * (n % DESCENT)
                seen = len(rig.setpoints)
                sent = time.perf_counter()
                await write_wset(watts)
                await rig.wait_for(lambda: any(abs(w - watts) < 1 for _, w in rig.setpoints[seen:])
                                   or rig.model.wset_w == watts, f"WSet {watts} W at the inverter")
                got = [t for t, w in rig.setpoints[seen:] if abs(w - watts) < 1]
                if got:
                    latencies.append((got[0] - sent) * 1000)
        finally:
            client.close()
    return {"what": "SunSpec WSet write to the gateway -> inverter setpoint", "target_p99_ms": 5,
            **percentiles(latencies)}


async def openadr(samples: int, workdir: Path) -> dict[str, Any]:
    """An event queued on a real openleadr VTN -> the first discharge setpoint at the inverter.

    The VEN polls every 0.5 s (its floor: the VTN asks for 0 s), so the target is that
    poll interval + 50 ms; each sample is one event starting now, queued at a random phase
    of the poll cycle and cancelled before the next. The discharge ramp starts from 0 W at
    the step that enters DISCHARGE, so the first non-zero setpoint waits for the next tick.
    """
    import logging
    from datetime import datetime, timezone

    from firmware_py.sim.vtn import LOAD_DISPATCH, LoopbackVtn

    from firmware_py.config import OpenAdrConfig
    from firmware_py.dispatch.openadr import MIN_POLL_S, OpenAdrVen

    logging.getLogger("openleadr").setLevel(logging.WARNING)
    async with RealtimeRig(workdir) as rig:
        await rig.wait_for(lambda: rig.gateway.controller.mode is Mode.STANDBY, "the gateway to be ready")
        async with LoopbackVtn(ven_name="bench-latency", poll_s=0) as vtn:
            config = OpenAdrConfig(enabled=True, vtn_url=vtn.url, ven_name="bench-latency")
            ven = OpenAdrVen(config, rating_w=lambda: rig.gateway.policy.max_discharge_w)
            task = asyncio.create_task(ven.run(rig.gateway))
            try:
                await peer_up(vtn.wait_for_registration(timeout_s=WAIT_S), "the VEN registering with the VTN")
                latencies = await _event_latencies(
                    rig, samples, MIN_POLL_S, vtn.cancel_event,
                    lambda n: vtn.add_event(LOAD_DISPATCH, datetime.now(timezone.utc), 600, 5.0,
                                            event_id=f"latency-{n}"))
            finally:
                await cancel_all([task])
    return {"what": "OpenADR event on the VTN -> first discharge setpoint at the inverter",
            "target_p99_ms": round(MIN_POLL_S * 1000 + 50), **percentiles(latencies)}


async def openadr3(samples: int, workdir: Path) -> dict[str, Any]:
    """An OpenADR 3 event published on the bench VTN -> the first discharge setpoint at the inverter.

    The twin of `openadr`: the VEN polls every 0.5 s (as the 2.0b VEN does at its floor), so the
    target is that poll interval + 50 ms; each sample is one DISPATCH_SETPOINT event starting now,
    published at a random phase of the poll cycle and deleted (cancelled) before the next."""
    from datetime import datetime, timezone

    from firmware_py.sim.vtn3 import BenchVtn3

    from firmware_py.config import OpenAdr3Config
    from firmware_py.dispatch.openadr3 import OpenAdr3Ven

    poll_s = 0.5
    async with RealtimeRig(workdir) as rig:
        await rig.wait_for(lambda: rig.gateway.controller.mode is Mode.STANDBY, "the gateway to be ready")
        async with BenchVtn3(client_id="bench-latency", secret="bench-secret") as vtn:
            program = vtn.add_program("bench-latency")
            config = OpenAdr3Config(enabled=True, vtn_url=vtn.url, client_id="bench-latency",
                                    ven_name="bench-latency", poll_interval_s=poll_s)
            ven = OpenAdr3Ven(config, rating_w=lambda: rig.gateway.policy.max_discharge_w, secret=vtn.secret)
            task = asyncio.create_task(ven.run(rig.gateway))
            try:
                await peer_up(vtn.wait_for(lambda: ven.polls, timeout_s=WAIT_S), "the VEN's first poll of the VTN")
                latencies = await _event_latencies(
                    rig, samples, poll_s, vtn.delete_event,
                    lambda n: vtn.add_event(program, "DISPATCH_SETPOINT", datetime.now(timezone.utc), 600, 5.0,
                                            event_id=f"latency-{n}"))
            finally:
                await cancel_all([task])
    return {"what": "OpenADR 3 event on the VTN -> first discharge setpoint at the inverter",
            "target_p99_ms": round(poll_s * 1000 + 50), **percentiles(latencies)}


async def peer_up(waiting: Awaitable[Any], what: str) -> None:
    """A bench VTN's own wait (a bare TimeoutError) said as the benchmark failing, naming what never came."""
    try:
        await waiting
    except TimeoutError:
        raise BenchmarkFailed(f"benchmark: timed out waiting for {what}") from None


async def _event_latencies(rig: RealtimeRig, samples: int, poll_s: float, withdraw: Callable[[str], Any],
                           publish: Callable[[int], str]) -> list[float]:
    """ms from each event published on a VTN to the first discharge setpoint at the inverter; each
    published at a random phase of the VEN's poll cycle, once the last one is withdrawn and at 0 W."""
    latencies, rng = [], random.Random(7)
    for n in range(samples):
        await rig.wait_for(lambda: rig.model.wset_w == 0, "the inverter at 0 W between events")
        await asyncio.sleep(rng.uniform(0, poll_s))
        seen = len(rig.setpoints)
        sent = time.perf_counter()
        event_id = publish(n)
        await rig.wait_for(lambda: any(w > 0 for _, w in rig.setpoints[seen:]), "a discharge setpoint")  # noqa: B023
        latencies.append((next(t for t, w in rig.setpoints[seen:] if w > 0) - sent) * 1000)
        withdraw(event_id)
    return latencies


def bus_load(seconds: float) -> dict[str, Any]:
    """CPU share of one core spent taking a worst-case bus in, three ways, on a python-can virtual bus."""
    dbc = bundled_dbc("cybertruck_bms.dbc")
    frames = _worst_case_bus(dbc, int(BUS_FRAMES_PER_S * seconds))

    def floor() -> Callable[[can.Message], None]:
        return lambda msg: None

    def naive() -> Callable[[can.Message], None]:
        """The targets' baseline: decode every frame that arrives, whatever its id."""
        db = BmsReader(dbc, time.time).db

        def take(msg: can.Message) -> None:
            try:
                db.decode_message(msg.arbitration_id, msg.data)
            except (KeyError, ValueError, DecodeError):
                pass

        return take

    results = {}
    for name, make, filtered in (("floor: receive only", floor, False), ("naive: decode every frame", naive, False),
                                 ("gateway: reader + core", None, True)):
        results[name] = _intake_cpu(frames, seconds, make, filtered)
    return {"what": f"CAN intake CPU, {BUS_FRAMES_PER_S} frames/s, 90 % not BMS, {seconds:g} s",
            "target": "gateway <= 5 % of one core and below naive", **results}


def _worst_case_bus(dbc: Path, count: int) -> list[can.Message]:
    rng = random.Random(1)
    node = BmsNode(Battery(), can.Bus(interface="virtual", channel="bench-source"), dbc)
    bms = [(m, node.encode(m, node.field_values())) for m in node.db.messages]
    bms_ids = {m.frame_id for m, _ in bms}
    others = [i for i in range(0x100, 0x7FF) if i not in bms_ids]
    frames = []
    for n in range(count):
        if n % 10 == 0:
            message, datas = bms[(n // 10) % len(bms)]
            frames.append(can.Message(arbitration_id=message.frame_id, data=datas[0], is_extended_id=False))
        else:
            frames.append(can.Message(arbitration_id=rng.choice(others), data=rng.randbytes(8), is_extended_id=False))
    node.bus.shutdown()
    return frames


def _intake_cpu(frames: list[can.Message], seconds: float, make: Callable[[], Callable[[can.Message], None]] | None,
                filtered: bool) -> dict[str, Any]:
    """Send `frames` paced over `seconds`; measure the receiving thread's CPU time."""
    channel = f"bench-load-{random.random()}"
    tx = can.Bus(interface="virtual", channel=channel)
    cpu = {}
    done = threading.Event()
    workdir = tempfile.TemporaryDirectory()
    if filtered:
        # The gateway as `run` assembles it (its bus, reader, filters and core); its inverter is never reached.
        base = Config()
        config = replace(base, can=replace(base.can, interface="virtual", channel=channel),
                         journal=replace(base.journal, path=str(Path(workdir.name) / "load.sqlite")))
        assembly = assemble(config, time.time, owner=OwnerSettings(40, time.time()))
        rx, gateway = assembly.bus, assembly.gateway
        take = lambda msg: gateway.on_frames((msg,))  # noqa: E731
    else:
        rx = can.Bus(interface="virtual", channel=channel)
        take = make()

    def receive() -> None:
        start = time.thread_time()
        while not done.is_set():
            msg = rx.recv(timeout=0.05)
            if msg is not None:
                take(msg)
        cpu["s"] = time.thread_time() - start

    thread = threading.Thread(target=receive, daemon=True)
    thread.start()
    begin, per_ms = time.perf_counter(), len(frames) / (seconds * 1000)
    for n, msg in enumerate(frames):
        due = begin + n / (per_ms * 1000)
        if (lag := due - time.perf_counter()) > 0.002:
            time.sleep(lag)
        tx.send(msg)
    time.sleep(0.2)
    done.set()
    thread.join(timeout=5)
    tx.shutdown()
    if filtered:
        assembly.close()
    else:
        rx.shutdown()
    workdir.cleanup()
    elapsed = time.perf_counter() - begin
    return {"cpu_pct_of_one_core": round(100 * cpu.get("s", float("nan")) / elapsed, 2)}


def simulator(loaded: scenario.Scenario) -> dict[str, Any]:
    from firmware_py.sim.simulation import Simulation, SimulationOptions

    own_peak = _restart_peak_rss()
    with tempfile.TemporaryDirectory() as tmp:
        outcome = run_stoppable(Simulation(loaded, SimulationOptions(journal_path=Path(tmp) / "j.sqlite")).run())
    rss_mb = process_bench.proc_status(os.getpid())["peak_rss_mb"] if own_peak else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    s = outcome.summary
    return {"what": f"bench simulator, scenario {loaded.name}", "target_speed_x": 1000, "sim_s": s["sim_s"],
            "wall_s": s["wall_s"], "speed_x": s["speed_x"], "max_rss_mb": round(rss_mb, 1),
            "target_rss_mb": 80}


def _restart_peak_rss() -> bool:
    """Count the process's peak RSS afresh from here (Linux: `clear_refs` 5 resets VmHWM, which
    `process_bench.proc_status` reads), so the simulator's figure in a whole `bench` run is its own,
    not that of the benchmarks run before it in this process (114.9 MB read that way against the
    simulator's 80 MB alone). False where the system cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


SOAK_FAULT_EVERY_S = 31 * 60
"""A fault every 31 simulated minutes: as often as the default lockout allows (three faults within an
hour lock the truck out until an installer comes), so the soak exercises recovery, not the lockout."""
SOAK_SKIPS = ("garbled",)
"""Random payloads on the BMS ids decode, now and then, as a BMS FAULT, a welded contactor and an
over-temperature at once: three faults, a lockout by design (the `fault-garbled` scenario shows it)."""


def soak(hours: float) -> dict[str, Any]:
    """A long run with a daily peak event and a fault of every kind in turn: memory, descriptors, accounting.

    RSS and open descriptors are sampled every simulated hour (flat, or a leak). The first hours
    fill what is bounded by design (SQLite's page cache, the allocator's free lists), so flatness
    is read on the second half. Delivered energy is set against the inverter's own meter (drift);
    the reserve must never be crossed.
    """
    from firmware_py.sim.faults import SCENARIO_FAULT_KINDS
    from firmware_py.sim.simulation import Simulation, SimulationOptions

    base = scenario.load(scenario.bundled())
    duration_s = hours * 3600
    days = max(1, int(hours // 24) + 1)
    events = tuple(replace(base.dispatch[0], id=f"peak-{d + 1}", at_s=d * 86_400 + 60,
                           start_s=d * 86_400 + 120) for d in range(days) if d * 86_400 + 60 < duration_s)
    times = range(SOAK_FAULT_EVERY_S, int(duration_s) - 60, SOAK_FAULT_EVERY_S)
    kinds = [kind for kind in SCENARIO_FAULT_KINDS if kind not in SOAK_SKIPS and kind != "message_silence"]
    faults = tuple(scenario.Fault(at_s=float(at), kind=kinds[i % len(kinds)], duration_s=5.0)
                   for i, at in enumerate(times))
    long_run = replace(base, run=replace(base.run, duration_s=duration_s), dispatch=events, fault=faults,
                       expect=scenario.Expect(), name=f"soak-{hours:g}h")
    samples: list[tuple[float, float, int]] = []

    def sample(bench) -> None:
        if not samples or bench.t - samples[-1][0] >= 3600:
            status = process_bench.proc_status(os.getpid())
            samples.append((bench.t, status["rss_mb"], int(status["fds"])))

    with tempfile.TemporaryDirectory() as tmp:
        options = SimulationOptions(journal_path=Path(tmp) / "j.sqlite", on_progress=sample, progress_every_s=0.0)
        options.series = _Discard()
        outcome = run_stoppable(Simulation(long_run, options).run())
    s = outcome.summary
    settled = [row for row in samples if row[0] >= 3600] or samples
    second_half = [row for row in settled if row[0] >= duration_s / 2] or settled[-1:]
    delivered, meter = sum(s["delivered_wh"].values()), s["inverter_meter_wh"]
    return {"what": f"{hours:g} h simulated soak: a daily 4 h event, a fault every {SOAK_FAULT_EVERY_S // 60} min "
                    f"(every kind in turn but {', '.join(SOAK_SKIPS)})", "target": "<= 80 MB, flat; descriptors flat; no drift; reserve kept",
            "rss_mb_first_hour": round(settled[0][1], 1), "rss_mb_last": round(settled[-1][1], 1),
            "rss_mb_max": round(max(row[1] for row in settled), 1),
            "rss_mb_by_hour": [round(row[1], 1) for row in samples],
            "rss_mb_second_half_growth": round(second_half[-1][1] - second_half[0][1], 1),
            "fds_first_hour": settled[0][2], "fds_last": settled[-1][2], "fds_max": max(row[2] for row in settled),
            "faults": len(faults), "faults_made_safe": sum(f["safe_after_s"] is not None for f in s["faults"]),
            "delivered_wh": round(delivered, 1), "inverter_meter_wh": meter,
            "drift_pct": round(100 * (meter - delivered) / meter, 3) if meter else 0.0,
            "min_soc_pct": s["min_soc_pct"], "reserve_pct": base.owner.reserve_pct,
            "floor_violations": s["floor_violations"], "final_state": s["final_state"],
            "wall_s": s["wall_s"]}


class _Discard(list):
    """The plot series would grow with the run; a soak keeps none of it."""

    def append(self, item: Any) -> None:
        pass


def machine() -> dict[str, Any]:
    """What the figures were measured on: they mean little without it."""
    import platform
    from importlib import metadata

    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "")
    versions = {name: metadata.version(name) for name in ("powershare-gw", "python-can", "cantools", "pymodbus")}
    return {"cpu": model or platform.processor(), "cores": os.cpu_count(), "system": platform.platform(),
            "python": platform.python_version(), **versions}


def summary(results: dict[str, Any]) -> dict[str, Any]:
    """The headline figures under stable names (what `--json` promises), then every detail."""
    def ms(result: dict[str, Any] | None) -> dict[str, float] | None:
        return None if result is None else {k: result[f"{k}_ms"] for k in ("p50", "p99", "max")}

    bus = results.get("bus_load", {}).get("gateway: reader + core", {})
    process = results.get("processes", {})
    return {
        "reaction_ms": {"idle": ms(results.get("reaction_idle")), "loaded": ms(results.get("reaction_loaded")),
                        "floor": ms(results.get("reaction_floor"))},
        "reaction_one_process_ms": {layer: ms(results.get(f"reaction_one_process_{layer}"))
                                    for layer in ("idle", "loaded", "floor")},
        "dispatch_ms": ms(results.get("dispatch")),
        "openadr_ms": ms(results.get("openadr")),
        "openadr3_ms": ms(results.get("openadr3")),
        "bus_cpu_pct": bus.get("cpu_pct_of_one_core"),
        "sim_speed_x": results.get("simulator", {}).get("speed_x"),
        "start_s": process.get("start_s"),
        "rss_mb": process.get("rss_mb"),
        "fds": process.get("fds"),
        "machine": machine(),
        "details": results,
    }


def measure(args: argparse.Namespace, loaded: scenario.Scenario | None) -> dict[str, Any]:
    """Every benchmark `--only` names, in its order, in one temporary folder removed at the end."""
    results: dict[str, Any] = {}
    # SIGTERM or SIGHUP unwind the run as Ctrl-C does: the started processes stopped, the folder removed.
    with stop_signals_interrupt(), tempfile.TemporaryDirectory() as tmp, \
            open(Path(tmp) / "gateway.log", "a", encoding="utf-8") as log, \
            lines_written_aside(stream=log):  # the in-process gateways log as `run` does, not onto the table
        work = Path(tmp)
        if "reaction" in args.only:
            # The gateway and each peer in its own process (the headline figures), then all in one.
            layered = run_stoppable(process_bench.reactions(args.samples, work / "reaction"))
            results["reaction_idle"], results["reaction_loaded"] = layered["idle"], layered["loaded"]
            results["reaction_floor"] = run_stoppable(process_bench.floor(args.samples, work / "floor"))
            results["reaction_one_process_idle"] = run_stoppable(reaction(args.samples, work / "one-idle"))
            results["reaction_one_process_loaded"] = run_stoppable(reaction(args.samples, work / "one-loaded",
                                                                          loaded=True))
            results["reaction_one_process_floor"] = run_stoppable(reaction_floor(args.samples))
        if "dispatch" in args.only:
            results["dispatch"] = run_stoppable(dispatch(args.samples, work / "dispatch"))
        if "openadr" in args.only:
            results["openadr"] = run_stoppable(openadr(min(args.samples, 50), work / "openadr"))
            results["openadr3"] = run_stoppable(openadr3(min(args.samples, 50), work / "openadr3"))
        if "start" in args.only:
            (work / "processes").mkdir()
            results["processes"] = run_stoppable(process_bench.processes(work / "processes", args.steady_seconds))
        if "bus" in args.only:
            results["bus_load"] = bus_load(args.bus_seconds)
        if loaded is not None:
            results["simulator"] = simulator(loaded)
        if "soak" in args.only:
            results["soak"] = soak(args.soak_hours)
    return results


def _bench(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    # What could be wrong with the command line is said before the first benchmark, not minutes in.
    loaded = scenario.load(scenario.find(args.scenario)) if "sim" in args.only else None
    check_outputs({"--json": args.json})
    try:
        results = measure(args, loaded)
    except BenchmarkFailed as failed:
        print(f"error: {failed}", file=sys.stderr)
        return 1
    table = Table(title="powershare-gw bench")
    table.add_column("benchmark")
    table.add_column("result")
    for name, result in results.items():
        table.add_row(name, "\n".join(f"{k}: {v}" for k, v in result.items()))
    Console().print(table)
    if args.json:
        try:
            args.json.write_text(json.dumps(summary(results), indent=2) + "\n")
        except OSError as err:
            raise InputError(f"--json {args.json}: cannot write: {err.strerror or err}") from None
    return 0


BENCHMARKS = ("reaction", "dispatch", "openadr", "bus", "sim", "start", "soak")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure the performance targets")
    p.add_argument("--only", nargs="+", default=[b for b in BENCHMARKS if b != "soak"], choices=BENCHMARKS,
                   help="which benchmarks (default: all but soak, which takes minutes)")
    p.add_argument("--soak-hours", type=number(0, 24 * 30, above=True), default=24.0,
                   help="simulated hours of the soak")
    p.add_argument("--samples", type=whole(1, 100_000), default=200, help="latency samples (default 200)")
    p.add_argument("--bus-seconds", type=number(0, 3_600, above=True), default=10.0,
                   help="seconds of worst-case bus traffic")
    p.add_argument("--steady-seconds", type=number(0, 3_600, above=True), default=10.0,
                   help="seconds the started gateway is watched for memory and descriptors (start; default 10)")
    p.add_argument("--scenario", default="summer-peak.toml",
                   help="scenario for the simulator figure: a bundled name (as `sim --list` shows) or a file")
    p.add_argument("--json", type=Path, help="also write the results here as JSON")
    p.set_defaults(handler=_bench)
