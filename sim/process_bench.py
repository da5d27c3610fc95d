"""The hardware-like bench: every peer its own process, the way a gateway meets its hardware.

`powershare-gw run` is spawned as an installer would start it, with the CAN bus
carried between processes by python-can-remote's server (it applies each client's
acceptance filters in its own process, as a kernel driver or an adapter would, so
a frame the gateway does not want never reaches it), the simulated BMS
(`sim bms`) and inverter (`sim inverter`) as processes, and whatever load a
benchmark adds in yet other processes. What the figures then show is the
gateway's own time, not the time of peers sharing its interpreter.

A reaction is timed across processes on CLOCK_MONOTONIC, one clock for the whole
machine: the sender notes the instant it hands the frame to the bus, and the
simulated inverter notes the instant it accepts `WSet` (`sim inverter
--setpoint-log`). Everything binds to 127.0.0.1; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import can
from firmware_py.sim.battery import Battery
from firmware_py.sim.bms_node import BmsNode
from firmware_py.sim.measuring import BUS_FRAMES_PER_S, BenchmarkFailed, find_model, flood, percentiles, signed
from firmware_py.sim.notify_socket import NotifySocket, NotReady
from firmware_py.sim.ports import free_port

from firmware_py.bms.bus import SEND_ONLY
from firmware_py.config import bundled_dbc
from firmware_py.core.types import BmsState
from firmware_py.inverter.sunspec import DER_CONTROL_AC, ModelDef, WSetEna, WSetMod
from firmware_py.tasks import cancel_all, every

START_S = 30.0
"""Bound for a child to come up: imports of pymodbus and cantools are slow on a busy 2-core machine."""
WAIT_S = 10.0
"""Bound for any one thing a benchmark waits on once everything runs."""
LOOK_S = 0.005
"""Between looks at the inverter's setpoint log: it only paces the samples (each is timed by the
inverter's own instant), and a busier look would take processor time from what is measured."""
SETPOINT_W = 5_000.0


async def listening(port: int, what: str, deadline: float) -> None:
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise BenchmarkFailed(f"benchmark: {what} never listened on 127.0.0.1:{port}") from None
            await asyncio.sleep(0.05)


def proc_status(pid: int) -> dict[str, float]:
    """RSS and peak RSS (MB, VmHWM: since the start or the last reset of `/proc/PID/clear_refs`) and open
    file descriptors of process `pid`."""
    with open(f"/proc/{pid}/status") as status:
        kib = {name: int(value.split()[0]) for name, _, value in (line.partition(":") for line in status)
               if name in ("VmRSS", "VmHWM")}
    return {"rss_mb": kib["VmRSS"] / 1024, "peak_rss_mb": kib["VmHWM"] / 1024,
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def mosquitto() -> str | None:
    """Debian's mosquitto broker, when installed (it lives in /usr/sbin, often not on a user's PATH)."""
    found = shutil.which("mosquitto")
    if found:
        return found
    return "/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None


class Hardware:
    """The CAN server, the simulated BMS and the simulated inverter as processes; then the gateway.

    An async context manager: every child is ended (SIGTERM, then kill) when it exits,
    whatever happened.
    """

    def __init__(self, workdir: Path, *, soc_pct: float = 80.0, bms: bool = True) -> None:
        self.workdir, self.soc_pct, self.bms = workdir, soc_pct, bms
        self.ports = {name: free_port() for name in ("can", "inverter", "der", "owner", "web", "metrics", "mqtt")}
        self.can_url = f"ws://127.0.0.1:{self.ports['can']}/"
        self.setpoint_log = workdir / "setpoints.log"
        self.children: list[subprocess.Popen] = []
        self.gateway: subprocess.Popen | None = None
        self._read_at = 0
        self.setpoints: list[tuple[int, float]] = []
        """(CLOCK_MONOTONIC ns, W) of every WSet the inverter accepted, as read so far."""

    def spawn(self, name: str, *args: str, env: dict[str, str] | None = None,
              program: str = sys.executable) -> subprocess.Popen:
        with open(self.workdir / f"{name}.log", "ab") as log:
            child = subprocess.Popen([program, *args], stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=self.workdir, env=env)
        self.children.append(child)
        return child

    async def __aenter__(self) -> "Hardware":
        self.workdir.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + START_S
        try:
            self.spawn("can", "-m", "can_remote", "-i", "virtual", "-c", "bench", "-H", "127.0.0.1",
                       "-p", str(self.ports["can"]))
            self.spawn("inverter", "-m", "firmware_py", "sim", "inverter",
                       "--listen", f"127.0.0.1:{self.ports['inverter']}", "--setpoint-log", str(self.setpoint_log))
            await listening(self.ports["can"], "the CAN server", deadline)
            if self.bms:
                self.spawn("bms", "-m", "firmware_py", "sim", "bms", "--can-interface", "remote",
                           "--can-channel", self.can_url, "--soc", str(self.soc_pct))
            await listening(self.ports["inverter"], "the simulated inverter", deadline)
        except BaseException:
            self.stop()
            raise
        return self

    async def start_gateway(self, config_text: str) -> float:
        """Spawn `powershare-gw run` on `config_text`; seconds from spawn to its systemd READY=1."""
        config = self.workdir / "gateway.toml"
        config.write_text(config_text)
        with NotifySocket() as notify:
            env = {**os.environ, "NOTIFY_SOCKET": notify.name}
            begin = time.perf_counter()
            gateway = self.gateway = self.spawn("gateway", "-m", "firmware_py", "run", "--config", str(config),
                                                env=env)
            try:
                await asyncio.to_thread(notify.wait_ready, gateway, START_S)
            except NotReady as why:  # said with the gateway's own last words
                tail = self.log_tail("gateway")
                raise BenchmarkFailed(f"benchmark: the gateway {why}; the end of its log:\n{tail}") from None
            return time.perf_counter() - begin

    def log_tail(self, name: str, lines: int = 20) -> str:
        return "\n".join(self.log_text(name).splitlines()[-lines:]) or "(empty)"

    def log_text(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")

    def read_setpoints(self) -> list[tuple[int, float]]:
        """The inverter's accepted setpoints, with any it logged since the last read."""
        if self.setpoint_log.exists():
            with open(self.setpoint_log, encoding="utf-8") as log:
                log.seek(self._read_at)
                text = log.read()
            complete = text[:text.rfind("\n") + 1]  # a line still being written is read next time
            self._read_at += len(complete.encode())
            for line in complete.splitlines():
                at, watts = line.split()
                self.setpoints.append((int(at), float(watts)))
        return self.setpoints

    async def wait_setpoint(self, test: Any, what: str, after_ns: int = 0) -> int:
        """The instant (ns) of the first setpoint accepted after `after_ns` that passes `test`."""
        deadline = time.monotonic() + WAIT_S
        seen = 0
        while True:
            points = self.read_setpoints()
            for at, watts in points[seen:]:
                if at > after_ns and test(watts):
                    return at
            seen = len(points)
            if time.monotonic() > deadline:
                raise BenchmarkFailed(f"benchmark: timed out waiting for {what}")
            await asyncio.sleep(LOOK_S)

    def stop(self) -> None:
        for child in reversed(self.children):
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in self.children:
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait(timeout=5)

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.stop)


# --- start-up, memory and descriptors ------------------------------------------------

async def processes(workdir: Path, steady_s: float = 10.0) -> dict[str, Any]:
    """`powershare-gw run` as its own process with every interface it has enabled, hardware-like peers:
    start (spawn -> systemd READY with fresh BMS and inverter data), then RSS and open descriptors.

    Every interface: the OpenADR 2.0b VEN against a real VTN, the OpenADR 3 VEN against the bench
    VTN, the SunSpec DER server, the owner API, the web app, the metrics endpoint, and MQTT to
    Debian's mosquitto when it is installed (without it MQTT stays off and the result says so)."""
    from firmware_py.sim.vtn import LoopbackVtn
    from firmware_py.sim.vtn3 import BenchVtn3

    secret = workdir / "openadr3.secret"
    secret.write_text("bench-secret\n")
    secret.chmod(0o600)
    async with LoopbackVtn(ven_name="bench-truck", poll_s=1) as vtn, \
            BenchVtn3(client_id="bench-truck", secret="bench-secret") as vtn3, Hardware(workdir) as hw:
        broker = mosquitto()
        if broker:
            (workdir / "mosquitto.conf").write_text(f"listener {hw.ports['mqtt']} 127.0.0.1\n"
                                                    "allow_anonymous true\npersistence false\n")
            hw.spawn("mosquitto", "-c", str(workdir / "mosquitto.conf"), program=broker)
            await listening(hw.ports["mqtt"], "mosquitto", time.monotonic() + START_S)
        start_s = await hw.start_gateway(EVERY_INTERFACE.format(vtn_url=vtn.url, vtn3_url=vtn3.url,
                                                                mqtt_on=str(bool(broker)).lower(), **hw.ports))
        fresh = "ready without fresh data" not in hw.log_text("gateway")
        assert hw.gateway is not None
        await asyncio.sleep(2.0)
        first = proc_status(hw.gateway.pid)
        await asyncio.sleep(steady_s)
        last = proc_status(hw.gateway.pid)
    return {"what": "powershare-gw run as a process (CAN over python-can-remote, simulated BMS and inverter as "
                    "processes; OpenADR 2.0b VEN against a real VTN, OpenADR 3 VEN against the bench VTN, SunSpec "
                    "DER server, owner API, web app, metrics "
                    f"and {'MQTT to mosquitto' if broker else 'no MQTT (mosquitto is not installed)'} enabled)",
            "start_s": round(start_s, 3), "ready_with_fresh_data": fresh, "target_start_s": 2,
            "rss_mb": round(last["rss_mb"], 1), "rss_mb_after_2_s": round(first["rss_mb"], 1), "target_rss_mb": 80,
            "fds": last["fds"], "fds_after_2_s": first["fds"], "steady_s": steady_s}


EVERY_INTERFACE = """\
[can]
interface = "remote"
channel = "ws://127.0.0.1:{can}/"

[inverter]
port = {inverter}

[owner]
api_listen = "127.0.0.1:{owner}"

[dispatch.sunspec_server]
enabled = true
listen = "127.0.0.1:{der}"

[dispatch.openadr]
enabled = true
vtn_url = "{vtn_url}"
ven_name = "bench-truck"

[dispatch.openadr3]
enabled = true
vtn_url = "{vtn3_url}"
client_id = "bench-truck"
client_secret_file = "openadr3.secret"
ven_name = "bench-truck"
poll_interval_s = 1

[web]
enabled = true
listen = "127.0.0.1:{web}"

[metrics]
enabled = true
listen = "127.0.0.1:{metrics}"

[mqtt]
enabled = {mqtt_on}
broker = "127.0.0.1:{mqtt}"

[journal]
path = "journal.sqlite"
"""


# --- reaction ---------------------------------------------------------------------------

REACTING = """\
[can]
interface = "remote"
channel = "ws://127.0.0.1:{can}/"

[inverter]
port = {inverter}

[safety]
# Each sample latches a BMS fault; let it clear as soon as the BMS says all is well again,
# and never count the samples toward a lockout.
fault_holdoff_s = 0
lockout_faults = 100
lockout_window_s = 1

[owner]
api_listen = "127.0.0.1:{owner}"

[dispatch.sunspec_server]
enabled = true
listen = "127.0.0.1:{der}"

[journal]
path = "journal.sqlite"
sample_interval_s = 1
"""


def fault_frame() -> bytes:
    """A 0x212 status frame saying FAULT, the rest of it as a healthy pack reports."""
    dbc = bundled_dbc("cybertruck_bms.dbc")
    node = BmsNode(Battery(soc_pct=80), None, dbc)  # encodes only: never sends
    status = next(m for m in node.db.messages if m.frame_id == 0x212)
    return node.encode(status, {**node.field_values(), "bms_state": BmsState.FAULT})[0]


async def reactions(samples: int, workdir: Path) -> dict[str, dict[str, Any]]:
    """A BMS fault frame sent on the bus -> `WSet = 0` accepted by the inverter, `samples` times idle
    and `samples` times under the targets' load, with `powershare-gw run` and each peer its own process."""
    from pymodbus.client import AsyncModbusTcpClient

    what = ("BMS fault frame -> WSet = 0 at the inverter; powershare-gw run, the CAN server, the BMS and the "
            "inverter each their own process (CAN over python-can-remote, Modbus TCP loopback)")
    async with Hardware(workdir) as hw:
        await hw.start_gateway(REACTING.format(**hw.ports))
        der = AsyncModbusTcpClient("127.0.0.1", port=hw.ports["der"], timeout=2)
        await der.connect()
        tx = can.Bus(interface="remote", channel=hw.can_url, can_filters=SEND_ONLY)
        frame = can.Message(arbitration_id=0x212, data=fault_frame(), is_extended_id=False)
        try:
            await _standing_discharge(der)
            await hw.wait_setpoint(lambda w: w > 0, "the gateway to discharge")
            idle = await _samples(hw, tx, frame, samples)
            load = await ProcessLoad.start(hw, der)
            try:
                loaded = await _samples(hw, tx, frame, samples)
            finally:
                await load.stop()
        finally:
            tx.shutdown()
            der.close()
    return {"idle": {"what": what, **percentiles(idle)},
            "loaded": {"what": f"{what}, under load: {load.describe()}", "target_p99_ms": 2,
                       "load": load.counts_now(), **percentiles(loaded)}}


async def _samples(hw: Hardware, tx: can.BusABC, frame: can.Message, samples: int) -> list[float]:
    latencies = []
    for _ in range(samples):
        await _until_discharging(hw)
        sent = time.monotonic_ns()
        tx.send(frame)
        stopped = await hw.wait_setpoint(lambda w: w == 0, "WSet = 0", after_ns=sent)
        latencies.append((stopped - sent) / 1e6)
    return latencies


async def _until_discharging(hw: Hardware) -> None:
    """Until the inverter's newest setpoint is a discharge again (the last fault cleared)."""
    deadline = time.monotonic() + WAIT_S
    while not ((points := hw.read_setpoints()) and points[-1][1] > 0):
        if time.monotonic() > deadline:
            raise BenchmarkFailed("benchmark: timed out waiting for discharge to resume")
        await asyncio.sleep(LOOK_S)


async def _standing_discharge(der: Any) -> None:
    """Ask the gateway's DER server for a standing SETPOINT_W discharge, as an aggregator would."""
    m704 = ModelDef.load(DER_CONTROL_AC)
    base = await find_model(der, DER_CONTROL_AC)
    regs = await der.read_holding_registers(base + m704.offset("WSet_SF"), count=1, device_id=1)
    raw = round(SETPOINT_W / 10 ** signed(regs.registers[0]))
    await der.write_registers(base + m704.offset("WSetMod"), [WSetMod.WATTS], device_id=1)
    await der.write_registers(base + m704.offset("WSet"), [raw >> 16, raw & 0xFFFF], device_id=1)
    await der.write_registers(base + m704.offset("WSetEna"), [WSetEna.ENABLED], device_id=1)


async def floor(samples: int, workdir: Path) -> dict[str, Any]:
    """The physical floor in the same layout: one frame through the CAN server to another client
    and one Modbus write to the inverter process, no gateway."""
    from pymodbus.client import AsyncModbusTcpClient

    from firmware_py.config import InverterConfig
    from firmware_py.inverter.client import InverterClient

    async with Hardware(workdir, bms=False) as hw:
        probe = InverterClient(InverterConfig(port=hw.ports["inverter"]), time.time)
        address = (await probe.connect()).address(DER_CONTROL_AC, "WSet")
        await probe.close()
        client = AsyncModbusTcpClient("127.0.0.1", port=hw.ports["inverter"], timeout=2)
        await client.connect()
        loop = asyncio.get_running_loop()
        tx = can.Bus(interface="remote", channel=hw.can_url, can_filters=SEND_ONLY)
        rx = can.Bus(interface="remote", channel=hw.can_url,
                     can_filters=[{"can_id": 0x212, "can_mask": 0x7FF, "extended": False}])

        class Hop(can.Listener):
            def on_message_received(self, msg: can.Message) -> None:
                watts = int.from_bytes(msg.data[:2], "little")
                loop.call_soon_threadsafe(lambda: loop.create_task(client.write_registers(address, [0, watts])))

        notifier = can.Notifier(rx, [Hop()])
        try:
            latencies = []
            for n in range(samples):
                watts, sent = 1 + n % 1000, time.monotonic_ns()
                tx.send(can.Message(arbitration_id=0x212, data=watts.to_bytes(2, "little") + bytes(6),
                                    is_extended_id=False))
                got = await hw.wait_setpoint(lambda w: True, f"WSet {watts}", after_ns=sent)
                latencies.append((got - sent) / 1e6)
        finally:
            notifier.stop()
            tx.shutdown()
            rx.shutdown()
            client.close()
    return {"what": "floor, same layout: one CAN frame through the CAN server to a client (Notifier thread) and one "
                    "Modbus write to the inverter process, no gateway", **percentiles(latencies)}


class ProcessLoad:
    """The targets' load, none of it in the gateway's process: the bus saturated by a flood process,
    the DER server read at 10 Hz and the status API at 1 Hz by this process, the journal writing
    (the gateway's own samples and step records while it discharges)."""

    def __init__(self, hw: Hardware, der: Any, foreign_per_s: float) -> None:
        self.hw, self.der, self.foreign_per_s = hw, der, foreign_per_s
        self.counts = {"DER reads": 0, "status reads": 0}
        self.tasks: list[asyncio.Task[Any]] = []

    @classmethod
    async def start(cls, hw: Hardware, der: Any) -> "ProcessLoad":
        bms_per_s = BmsNode(Battery(), None, bundled_dbc("cybertruck_bms.dbc")).frames_per_s()
        load = cls(hw, der, BUS_FRAMES_PER_S - bms_per_s)
        context = multiprocessing.get_context("spawn")
        load.stopping, running = context.Event(), context.Event()
        load.sent = context.Value("q", 0)
        load.flood = context.Process(target=flood_process, name="bench-flood", daemon=True,
                                     args=(hw.can_url, load.foreign_per_s, running, load.stopping, load.sent))
        load.flood.start()
        if not await asyncio.to_thread(running.wait, START_S):
            load.flood.kill()
            raise BenchmarkFailed("benchmark: the flood process never got onto the bus")
        load.tasks = [asyncio.create_task(every(0.1, load._read_der)), asyncio.create_task(every(1.0, load._read_status))]
        return load

    def counts_now(self) -> dict[str, int]:
        return {"foreign frames": self.sent.value, **self.counts}

    def describe(self) -> str:
        return (f"{BUS_FRAMES_PER_S:,} frames/s on the bus ({self.foreign_per_s:.0f}/s not BMS, from a process of "
                "its own; the CAN server filters them out for the gateway, as a kernel driver would), DER server "
                "read at 10 Hz, status API at 1 Hz, the journal writing; "
                + ", ".join(f"{v} {k}" for k, v in self.counts_now().items()))

    async def _read_der(self) -> None:
        try:
            await self.der.read_holding_registers(40000, count=100, device_id=1)
        except Exception:  # noqa: BLE001 - counted: a load that stopped would make the figure a lie
            self.counts["DER read errors"] = self.counts.get("DER read errors", 0) + 1
            return
        self.counts["DER reads"] += 1

    async def _read_status(self) -> None:
        from firmware_py.owner.access import read_token

        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.hw.ports["owner"])
            token = read_token(str(self.hw.workdir / "owner.token"))
            writer.write(f"GET /status HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {token}\r\n"
                         "Connection: close\r\n\r\n".encode())
            await reader.read()
            writer.close()
        except Exception:  # noqa: BLE001 - counted, as above
            self.counts["status read errors"] = self.counts.get("status read errors", 0) + 1
            return
        self.counts["status reads"] += 1

    async def stop(self) -> None:
        self.stopping.set()
        await cancel_all(self.tasks)
        await asyncio.to_thread(self.flood.join, 10)
        if self.flood.is_alive():
            self.flood.kill()



def flood_process(url: str, per_s: float, running: Any, stopping: Any, sent: Any) -> None:
    """Frames no BMS sends, at `per_s`, from `running` until `stopping` is set (a process of its own)."""
    from firmware_py.bms.reader import BmsReader

    bus = can.Bus(interface="remote", channel=url, can_filters=SEND_ONLY)
    bms_ids = BmsReader(bundled_dbc("cybertruck_bms.dbc"), time.monotonic).frame_ids
    running.set()
    try:
        flood(bus, per_s, bms_ids, stopping.is_set, lambda n: setattr(sent, "value", n))
    finally:
        bus.shutdown()
