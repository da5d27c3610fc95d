"""The hardware-like bench as separate processes, the way an installer would run it (issue 5, items 3
and 5; issue 10: links that heal, the gateway's own stall, `status`).

python-can-remote's server carries the CAN bus between processes on 127.0.0.1;
`powershare-gw sim bms` talks on it, `powershare-gw sim inverter` serves SunSpec
Modbus TCP, and `powershare-gw run` is the real gateway between them. Every
process is a child of the test, bound to 127.0.0.1 (on port 0, or on a free port
where the gateway's config names it), and ended in a `finally`; every wait is bounded. The test waits for events where the children give
one: a child's "listening" line on its output pipe (the CAN server and the inverter bind
port 0 and print the port they got) and the gateway's systemd READY=1 on $NOTIFY_SOCKET.
What only shows in Modbus registers or the SQLite journal (which push nothing) is re-read
until true, every 50 ms, within a bound.

The SunSpec side is read and written with pysunspec2's client: an independent
Modbus + SunSpec implementation that discovers the model chain and applies the
scale factors (WSet_SF, W_SF) itself, so nothing here shares the gateway's codec.
The inverter's revert timer is observed through its own registers and meter,
never through wall-clock measurements in the test.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from children import (
    CAN_SERVER_PORT,
    SIM_INVERTER_PORT,
    ChildOutput,
    spawn,
)
from firmware_py.sim.notify_socket import NotifySocket, NotReady
from firmware_py.sim.ports import free_port
from sunspec2.modbus.client import SunSpecModbusClientDeviceTCP

from firmware_py.core.types import DispatchAnswer, DispatchEnded, EventEnergy, Verdict
from firmware_py.journal import Journal

pytestmark = pytest.mark.slow  # separate processes: start-up and real-time waits, in CI only

REVERT_S = 3
TARGET_W = 4_000.0
SOC_PCT = 70.0
START_S = 25.0
"""Bound for a process to come up: imports of pymodbus/cantools are slow on a busy 2-core machine."""
WAIT_S = 15.0
POLL_S = 0.05  # between re-reads of registers or the journal, which have no change notification
INV_ST_STANDBY = 7  # SunSpec 701 InvSt


# --- the bench ----------------------------------------------------------------------------------


@dataclass
class Bench:
    """The child processes of one test, their ports, logs and the gateway's config."""

    tmp: Path
    ports: dict[str, int] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    outputs: dict[str, ChildOutput] = field(default_factory=dict)
    expected_exit: set[str] = field(default_factory=set)
    notify: NotifySocket = field(default_factory=NotifySocket)

    @property
    def config(self) -> Path:
        return self.tmp / "gateway.toml"

    @property
    def journal(self) -> Path:
        return self.tmp / "journal.sqlite"

    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> ChildOutput:
        """Start a child; its output is read as it comes (and copied to `name`.log)."""
        proc, output = spawn([sys.executable, *args], self.tmp / f"{name}.log", cwd=self.tmp, env=env)
        self.procs[name], self.outputs[name] = proc, output
        self.expected_exit.discard(name)
        return output

    def start_gateway(self) -> subprocess.Popen:
        """`powershare-gw run`, returning once it sent READY=1: it has fresh BMS and inverter data."""
        self.start("gateway", "-m", "firmware_py", "run", "--config", str(self.config),
                   env={**os.environ, "NOTIFY_SOCKET": self.notify.name})
        try:
            self.notify.wait_ready(self.procs["gateway"], START_S)
        except NotReady as why:  # said with the children's own words (a taken port, a bad key)
            pytest.fail(f"the gateway {why}\n{self.logs()}")
        return self.procs["gateway"]

    def log(self, name: str) -> str:
        return self.outputs[name].text() if name in self.outputs else ""

    def logs(self) -> str:
        return "\n".join(f"--- {name} (exit {p.poll()}):\n{self.log(name)}" for name, p in self.procs.items())

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if name not in self.expected_exit and proc.poll() is not None:
                pytest.fail(f"{name} exited with {proc.returncode}\n{self.logs()}")

    def wait_for(self, what: str, predicate: Callable[[], Any], timeout: float = WAIT_S) -> Any:
        """Re-check `predicate` until truthy; a child dying or the deadline passing fails with the logs.

        Only for what has no event: a Modbus register or a journal row can only be read again.
        """
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                value = predicate()
            except Exception as err:  # not up yet, or not yet true
                last_error, value = err, None
            if value:
                return value
            time.sleep(POLL_S)
        pytest.fail(f"timed out waiting for {what} (last error: {last_error!r})\n{self.logs()}")

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Signal one child and reap it (SIGKILL if it ignores `sig`); its exit code."""
        proc = self.procs[name]
        self.expected_exit.add(name)
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self.outputs[name].join()  # its last lines read, for the logs in a failure message
        return proc.returncode

    def stop_all(self) -> None:
        for name in ("gateway", "bms", "inverter", "can"):  # the gateway first: its safe stop needs the inverter
            if name in self.procs:
                self.stop(name, timeout=5.0)
        self.notify.close()

    def write_config(self) -> None:
        """config/bench.toml with this bench's ports and paths, a short revert time and the DER server on."""
        p = self.ports
        self.config.write_text(f"""\
[vehicle]
dbc = "cybertruck_bms.dbc"
usable_capacity_wh = 123000

[can]
interface = "remote"
channel = "ws://127.0.0.1:{p['can']}/"

[inverter]
transport = "tcp"
host = "127.0.0.1"
port = {p['inverter']}
unit_id = 1
revert_timeout_s = {REVERT_S}

[owner]
reserve_pct = 40
api_listen = "127.0.0.1:{p['owner']}"
token_file = "owner.token"
settings_file = "owner-settings.json"

[safety]
ramp_w_per_s = 10000

[dispatch.sunspec_server]
enabled = true
listen = "127.0.0.1:{p['der']}"

[journal]
path = "journal.sqlite"
""")


@pytest.fixture
def bench(tmp_path: Path) -> Iterator[Bench]:
    """CAN server, simulated BMS and simulated inverter running; the gateway's config written."""
    # The gateway's own listeners take their ports from its config; the peers pick theirs (port 0).
    b = Bench(tmp_path, ports={k: free_port() for k in ("der", "owner")})
    try:
        can = b.start("can", "-m", "can_remote", "-i", "virtual", "-c", "bench", "-H", "127.0.0.1", "-p", "0")
        inverter = b.start("inverter", "-m", "firmware_py", "sim", "inverter", "--listen", "127.0.0.1:0")
        b.ports["can"] = int(can.wait_for_line(CAN_SERVER_PORT, START_S).group(1))
        b.start("bms", "-m", "firmware_py", "sim", "bms", "--can-interface", "remote",
                "--can-channel", f"ws://127.0.0.1:{b.ports['can']}/", "--soc", str(SOC_PCT))
        b.ports["inverter"] = int(inverter.wait_for_line(SIM_INVERTER_PORT, START_S).group(1))
        b.write_config()
        yield b
    finally:
        b.stop_all()


# --- SunSpec through pysunspec2 ---------------------------------------------------------------------


def sunspec_device(port: int) -> SunSpecModbusClientDeviceTCP:
    """pysunspec2's device on `port`, scanned (called once its server said it listens)."""
    dev = SunSpecModbusClientDeviceTCP(slave_id=1, ipaddr="127.0.0.1", ipport=port, timeout=2)
    try:
        dev.scan()
    except BaseException:
        dev.close()
        raise
    return dev


def read(dev: SunSpecModbusClientDeviceTCP, model_id: int, *names: str) -> dict[str, Any]:
    """Points of one model as they are now, scale factors applied."""
    model = dev.models[model_id][0]
    model.read()
    return {name: getattr(model, name).cvalue for name in names}


def inverter_controls(inv: SunSpecModbusClientDeviceTCP) -> dict[str, Any]:
    """Models 701 then 704: two reads, so read what the inverter does (W) before what it was told
    (WSet). A revert comes before W ramps to 0, so a W of 0 is read with the reverted WSet; in the
    other order a busy machine can show W at 0 next to the WSet read before the revert."""
    measured = read(inv, 701, "W", "TotWhInj")
    return {**read(inv, 704, "WSetEna", "WSetMod", "WSet", "WSetEnaRvrt", "WSetRvrtTms", "WSetRvrtRem"), **measured}


def holding_zero(inv: SunSpecModbusClientDeviceTCP) -> dict[str, Any] | None:
    """The gateway is commanding 0 W right now: enabled, WSet 0, revert armed and recently refreshed."""
    c = inverter_controls(inv)
    live = c["WSetEna"] == 1 and c["WSetEnaRvrt"] == 1 and c["WSetRvrtTms"] == REVERT_S and c["WSetRvrtRem"] > 0
    return c if live and c["WSet"] == 0 and c["W"] == 0 else None


def dispatch_through_gateway(der: SunSpecModbusClientDeviceTCP, watts: float) -> None:
    """What a site controller does: WATTS mode, the setpoint (pysunspec2 scales by WSet_SF), enable."""
    ctl = der.models[704][0]
    ctl.read()
    ctl.WSetMod.value = 1
    ctl.WSet.cvalue = watts
    ctl.WSetEna.value = 1
    ctl.write()


# --- helpers on the gateway's side ------------------------------------------------------------------


def gateway_up_and_holding_zero(bench: Bench) -> tuple[SunSpecModbusClientDeviceTCP, SunSpecModbusClientDeviceTCP]:
    """Start the gateway; check it reads the BMS and holds the inverter at 0 W. (DER client, inverter client)."""
    inv = sunspec_device(bench.ports["inverter"])
    before = inverter_controls(inv)
    assert before["WSetEna"] == 0 and before["WSetRvrtTms"] == 0, before  # nobody has commanded it yet
    bench.start_gateway()  # READY: out of STARTUP, every BMS message and the inverter seen
    # READY does not wait for the integrations: the DER server says when it listens.
    bench.outputs["gateway"].wait_for_line(rf"SunSpec DER server on 127\.0\.0\.1:{bench.ports['der']}\b", START_S)
    der = sunspec_device(bench.ports["der"])
    soc = read(der, 713, "SoC")["SoC"]
    assert soc is not None and SOC_PCT - 2 <= soc <= SOC_PCT  # the conservative SoC min of the simulated BMS
    # READY does not wait for the command writer's first write; the inverter's registers show it.
    held = bench.wait_for("the gateway to command the inverter to 0 W", lambda: holding_zero(inv))
    assert held["W"] == 0 and held["WSet"] == 0
    assert read(der, 701, "InvSt")["InvSt"] == INV_ST_STANDBY  # ready for dispatch
    return der, inv


def hold_outlives_a_revert_time(bench: Bench, inv: SunSpecModbusClientDeviceTCP, since: float) -> None:
    """The 0 W hold stays live at every read until one revert time after `since` (when it was seen):
    the gateway refreshes it, a single write would have expired. The inverter's revert timer runs
    on its own wall clock, so this one wait is the property itself; it is spent re-reading the
    hold, and whatever time already passed since `since` counts."""
    while time.monotonic() < since + REVERT_S + 0.2:
        bench.check_alive()
        assert holding_zero(inv), inverter_controls(inv)
        time.sleep(POLL_S)


def owner_status(bench: Bench) -> str:
    out = subprocess.run([sys.executable, "-m", "firmware_py", "owner", "--config", str(bench.config), "status"],
                         capture_output=True, text=True, timeout=30, cwd=bench.tmp)
    assert out.returncode == 0, out.stderr
    return out.stdout


def report_json(bench: Bench) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "firmware_py", "report", "--journal", str(bench.journal),
                          "--format", "json"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr  # 0 = the hash chain verifies
    return json.loads(out.stdout)


def journal_records(path: Path) -> list:
    with Journal.open(path, readonly=True) as journal:
        return journal.records()


def discharging_at_target(inv: SunSpecModbusClientDeviceTCP) -> dict[str, Any] | None:
    c = inverter_controls(inv)
    return c if c["W"] == pytest.approx(TARGET_W) else None


def accepted_request_id(records: list) -> str | None:
    for record in records:
        if record.kind == "DispatchAnswer":
            answer = record.event()
            assert isinstance(answer, DispatchAnswer)
            if answer.verdict is Verdict.ACCEPTED:
                return answer.request_id
    return None


# --- the tests ------------------------------------------------------------------------------------


def test_gateway_reads_bms_holds_zero_then_serves_sunspec_dispatch_and_stops_safely(bench: Bench):
    der, inv = gateway_up_and_holding_zero(bench)
    held_at = time.monotonic()
    try:
        status = owner_status(bench)
        soc = float(re.search(r"SoC:\s+([0-9.]+) %", status).group(1))
        assert SOC_PCT - 2 <= soc <= SOC_PCT, status
        assert re.search(r"state:\s+STANDBY", status), status
        # Still armed one revert time later: the gateway has rewritten the hold since (a refresh, not one write).
        hold_outlives_a_revert_time(bench, inv, held_at)

        dispatch_through_gateway(der, TARGET_W)
        assert read(der, 704, "WSet", "WSetEna") == {"WSet": TARGET_W, "WSetEna": 1}
    finally:
        der.close()
    running = bench.wait_for("the inverter to deliver the dispatch", lambda: discharging_at_target(inv))
    assert running["WSet"] == pytest.approx(TARGET_W)

    assert bench.stop("gateway", signal.SIGTERM, timeout=WAIT_S) == 0, bench.log("gateway")
    # WSet = 0 with the revert timer running again: written by the safe stop (a revert leaves WSetRvrtRem at 0).
    stopped = read(inv, 704, "WSet", "WSetRvrtRem")
    assert stopped["WSet"] == 0 and stopped["WSetRvrtRem"] > 0, stopped
    bench.wait_for("the inverter to stop", lambda: read(inv, 701, "W")["W"] == 0, REVERT_S + 5)

    request_id = accepted_request_id(journal_records(bench.journal))
    assert request_id is not None and request_id.startswith("sunspec-")
    report = report_json(bench)
    assert report["chain"]["intact"] and report["chain"]["problems"] == []
    events = {e["request_id"]: e for e in report["events"]}
    assert events[request_id]["source"] == "sunspec"
    assert events[request_id]["kind"] == "discharge"
    assert events[request_id]["target_w"] == pytest.approx(TARGET_W)
    assert events[request_id]["verdict"] == "accepted"
    assert events[request_id]["final"], "a clean stop must end the event with its final energy"


def test_kill_9_during_an_event_loses_no_record_and_the_restart_ends_it(bench: Bench):
    der, inv = gateway_up_and_holding_zero(bench)
    try:
        dispatch_through_gateway(der, TARGET_W)
    finally:
        der.close()
    bench.wait_for("the inverter to deliver the dispatch", lambda: discharging_at_target(inv))
    before = bench.wait_for("the event's first energy record",
                            lambda: (r := journal_records(bench.journal)) and
                            any(x.kind == "EventEnergy" for x in r) and r)
    request_id = accepted_request_id(before)
    assert request_id is not None

    gateway = bench.procs["gateway"]
    assert bench.stop("gateway", signal.SIGKILL) == -signal.SIGKILL
    assert gateway.returncode == -signal.SIGKILL
    at_kill = inverter_controls(inv)
    assert at_kill["WSetRvrtTms"] == REVERT_S and at_kill["WSetEnaRvrt"] == 1

    # The inverter's own revert timer stops it: no one else is writing now.
    stopped = bench.wait_for("the inverter's revert timer", lambda: (c := inverter_controls(inv))["W"] == 0 and c,
                             REVERT_S + 5)
    assert stopped["WSet"] == 0 and stopped["WSetRvrtRem"] == 0
    after_kill_wh = stopped["TotWhInj"] - at_kill["TotWhInj"]
    assert after_kill_wh <= TARGET_W * REVERT_S / 3600 + 1  # at most REVERT_S of full power (+1 Wh rounding)

    # Every record committed before the kill is still there, unchanged, and the chain verifies.
    with Journal.open(bench.journal, readonly=True) as journal:
        assert journal.verify() == []
        kept = {r.seq: r.hash for r in journal.records()}
    assert all(kept.get(r.seq) == r.hash for r in before)
    last_energy = [r.event() for r in before if r.kind == "EventEnergy"][-1]
    assert isinstance(last_energy, EventEnergy) and last_energy.request_id == request_id

    # The restarted gateway ends the event, billing the meter's gap, and holds 0 W.
    bench.start_gateway()  # READY: its start-up, which ends open events, is done

    def ended() -> list | None:
        records = journal_records(bench.journal)
        return records if any(r.kind == "DispatchEnded" for r in records) else None

    records = bench.wait_for("the restarted gateway to end the event", ended, START_S)
    mine = [r.event() for r in records if r.kind in ("DispatchEnded", "EventEnergy")]
    mine = [e for e in mine if e.request_id == request_id]
    end = next(e for e in mine if isinstance(e, DispatchEnded))
    final = [e for e in mine if isinstance(e, EventEnergy)][-1]
    assert "gateway restarted" in end.reason
    assert final.final
    assert final.meter_wh >= last_energy.meter_wh
    assert final.meter_total_wh == stopped["TotWhInj"]
    assert final.meter_wh == pytest.approx(last_energy.meter_wh + stopped["TotWhInj"] - last_energy.meter_total_wh,
                                           abs=1e-3)
    held = bench.wait_for("the restarted gateway to hold 0 W", lambda: holding_zero(inv))
    assert held["TotWhInj"] == stopped["TotWhInj"]

    report = report_json(bench)
    assert report["chain"]["intact"]
    event = {e["request_id"]: e for e in report["events"]}[request_id]
    assert event["final"] and "gateway restarted" in event["ended_reason"]
    assert event["meter_wh"] == pytest.approx(final.meter_wh)
    assert bench.stop("gateway", signal.SIGTERM, timeout=WAIT_S) == 0, bench.log("gateway")


# --- issue 10: links that heal, the gateway's own stall, `status` ------------------------------------

STOP_S = 4.0  # the pause the issue describes: longer than the bench's revert time (3 s)


HOLDOFF_S = 3


def short_holdoff(bench: Bench) -> None:
    """A fault clears 3 s after its cause is gone (30 s by default): the wait for service again stays short."""
    text = bench.config.read_text()
    bench.config.write_text(text.replace("[safety]\n", f"[safety]\nfault_holdoff_s = {HOLDOFF_S}\n"))


def status(bench: Bench) -> dict:
    out = subprocess.run([sys.executable, "-m", "firmware_py", "status", "--config", str(bench.config), "--json"],
                         capture_output=True, text=True, timeout=30, cwd=bench.tmp, check=False)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def serving_again(bench: Bench, inv) -> dict:
    return bench.wait_for("the dispatch to be served again", lambda: discharging_at_target(inv), WAIT_S + 10)


def test_the_can_server_restarted_on_the_same_port_is_rejoined_and_dispatch_served_again(bench: Bench):
    """The issue's bug: with python-can-remote, a restarted bus server left the gateway at 0 W for good."""
    short_holdoff(bench)
    der, inv = gateway_up_and_holding_zero(bench)
    try:
        dispatch_through_gateway(der, TARGET_W)
    finally:
        der.close()
    serving_again(bench, inv)

    port = bench.ports["can"]
    bench.stop("can")  # the bus goes away under the gateway (and under the simulated BMS)
    bench.stop("bms")
    bench.wait_for("the gateway to stop discharging", lambda: read(inv, 701, "W")["W"] == 0)
    assert bench.procs["gateway"].poll() is None
    down = status(bench)
    assert down["links"]["bms"]["ok"] is False and down["setpoint_w"] == 0

    can = bench.start("can", "-m", "can_remote", "-i", "virtual", "-c", "bench", "-H", "127.0.0.1", "-p", str(port))
    assert int(can.wait_for_line(CAN_SERVER_PORT, START_S).group(1)) == port
    bench.start("bms", "-m", "firmware_py", "sim", "bms", "--can-interface", "remote",
                "--can-channel", f"ws://127.0.0.1:{port}/", "--soc", "70")
    serving_again(bench, inv)  # no restart of the gateway
    up = status(bench)
    assert up["links"]["bms"]["ok"] and up["mode"] == "DISCHARGE"
    log = bench.log("gateway")
    assert log.count("link lost: bms") == 1 and log.count("link recovered: bms") == 1, log
    assert "Traceback" not in log
    # A SIGHUP (the terminal or SSH session that ran it closed) stops it as safely as SIGTERM: it used to kill it.
    assert bench.stop("gateway", signal.SIGHUP, timeout=WAIT_S) == 0, bench.log("gateway")
    assert "safe stop: WSet = 0 written to the inverter and read back" in bench.log("gateway")


def test_a_sigstop_is_the_gateways_own_stall_resynced_and_never_a_vehicle_fault(bench: Bench):
    der, inv = gateway_up_and_holding_zero(bench)
    try:
        dispatch_through_gateway(der, TARGET_W)
    finally:
        der.close()
    serving_again(bench, inv)
    before = status(bench)
    assert before["faults"] == [] and before["mode"] == "DISCHARGE"

    gateway = bench.procs["gateway"]
    gateway.send_signal(signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        # The inverter's own revert timer takes it to 0 W while nobody refreshes the setpoint.
        reverted = bench.wait_for("the inverter's revert", lambda: read(inv, 701, "W")["W"] == 0, WAIT_S)
        assert reverted
        time.sleep(max(0.0, stopped_at + STOP_S - time.monotonic()))  # the pause itself: the stimulus, not a wait
    finally:
        gateway.send_signal(signal.SIGCONT)
        paused_s = time.monotonic() - stopped_at

    serving_again(bench, inv)
    after = status(bench)
    assert after["faults"] == [] and not after["resyncing"], after
    records = journal_records(bench.journal)
    kinds = [r.kind for r in records]
    stall = kinds.index("Stall")
    (resynced,) = [r for r in records if r.kind == "Resynced"]
    # The gap the gateway saw runs from its last step before the pause (a tick, 0.1 s at most before).
    assert resynced.payload["fresh"] and paused_s - 0.1 <= resynced.payload["gap_s"] <= paused_s + 1.0
    assert not [r for r in records[stall:] if r.kind == "FaultRaised"], "the stall counted as a fault"
    log = bench.log("gateway")
    assert "the gateway itself stalled" in log and "resynced after the" in log and "Traceback" not in log
    assert bench.stop("gateway", signal.SIGTERM, timeout=WAIT_S) == 0, bench.log("gateway")
