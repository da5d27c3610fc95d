"""`powershare-gw commission` against the bench in separate processes (issue 16, item 1).

The peers run as an installer would run them (README, "Commissioning on the bench"):
python-can-remote servers carry two CAN buses on 127.0.0.1, and `sim inverter --can-*`
serves SunSpec Modbus TCP while simulating the truck's pack wired to it, its BMS on
the bus, so the BMS current follows the power the inverter really draws. A second
such truck has `--swap-sign`. An openleadr VTN runs in this process. Every config
is the bundled `config/commission-bench.toml` with this bench's ports and one change
per failing case; `commission` itself is a child process, like on site.

One set of peers serves every case; the passing run goes first (it discharges), then
the failing ones run at once, each with its own config and files.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from children import CAN_SERVER_PORT, SIM_INVERTER_PORT, ChildOutput, spawn
from firmware_py.sim.ports import free_port
from firmware_py.sim.vtn import LoopbackVtn
from sunspec2.modbus.client import SunSpecModbusClientDeviceTCP

from firmware_py.config import bundled_config, bundled_dbc
from firmware_py.journal import Journal

pytestmark = pytest.mark.slow  # separate processes and real-time windows

START_S = 25.0
RUN_S = 60.0  # bound on one commissioning run (each takes ~10 s)
CAN_S = "3"  # the shortest window the bundled DBC allows (three periods of its 1 s messages)
DISCHARGE_S = "2"


class VtnThread:
    """openleadr's VTN on its own event loop in a thread: the tests here are synchronous."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="VTN", daemon=True)
        self.thread.start()

        async def started() -> LoopbackVtn:
            vtn = LoopbackVtn(ven_name="truck-1")
            await vtn.start()
            return vtn

        self.vtn = asyncio.run_coroutine_threadsafe(started(), self.loop).result(timeout=START_S)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.vtn.close(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@dataclass
class Peers:
    tmp: Path
    can: dict[str, int]
    inverter: dict[str, int]
    vtn: LoopbackVtn
    children: list[tuple[subprocess.Popen, ChildOutput]]

    def config(self, case: str, **overrides: Any) -> Path:
        """The bundled commissioning config with this bench's ports, then `overrides` (key -> line)."""
        folder = self.tmp / case
        folder.mkdir()
        text = bundled_config("commission-bench.toml").read_text(encoding="utf-8")
        lines = {
            "channel": f'channel = "ws://127.0.0.1:{self.can["good"]}/"',
            "port": f"port = {self.inverter['good']}",
            "listen": f'listen = "127.0.0.1:{free_port()}"',
            "api_listen": f'api_listen = "127.0.0.1:{free_port()}"',
            "revert_timeout_s": "revert_timeout_s = 10\ntimeout_s = 0.5\npoll_interval_s = 0.2",
            **overrides,
        }
        for key, line in lines.items():
            text, n = re.subn(rf"^{key} = .*$", lambda _m, line=line: line, text, count=1, flags=re.M)
            assert n == 1, key
        text += f'\n[dispatch.openadr]\nenabled = true\nvtn_url = "{self.vtn.url}"\nven_name = "truck-1"\n'
        path = folder / "gateway.toml"
        path.write_text(text, encoding="utf-8")
        return path

    def wait_alive(self) -> None:
        for proc, output in self.children:
            assert proc.poll() is None, output.text()


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peers]:
    tmp = tmp_path_factory.mktemp("commission-bench")
    children: list[tuple[subprocess.Popen, ChildOutput]] = []

    def start(name: str, *args: str) -> ChildOutput:
        proc, output = spawn([sys.executable, *args], tmp / f"{name}.log", cwd=tmp)
        children.append((proc, output))
        return output

    vtn = VtnThread()
    try:
        buses = {name: start(f"can-{name}", "-m", "can_remote", "-i", "virtual", "-c", f"commission-{name}",
                             "-H", "127.0.0.1", "-p", "0") for name in ("good", "swapped")}
        can = {name: int(out.wait_for_line(CAN_SERVER_PORT, START_S).group(1)) for name, out in buses.items()}
        inverters = {name: start(f"inverter-{name}", "-m", "firmware_py", "sim", "inverter", "--listen",
                                 "127.0.0.1:0", "--can-interface", "remote", "--can-channel",
                                 f"ws://127.0.0.1:{can[name]}/", "--soc", "70",
                                 *(["--swap-sign"] if name == "swapped" else []))
                     for name in ("good", "swapped")}
        ports = {name: int(out.wait_for_line(SIM_INVERTER_PORT, START_S).group(1)) for name, out in inverters.items()}
        for out in inverters.values():
            out.wait_for_line(r"wired to a simulated pack", START_S)
        yield Peers(tmp, can, ports, vtn.vtn, children)
    finally:
        for proc, output in children:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
            output.join()
        vtn.close()


@dataclass
class Run:
    code: int
    out: str
    report: dict[str, Any]

    def checks(self, step: str) -> dict[str, dict[str, Any]]:
        (found,) = [s for s in self.report["steps"] if s["step"] == step]
        return {c["name"]: c for c in found["checks"]}

    def failed(self) -> dict[str, dict[str, Any]]:
        return {c["name"]: c for s in self.report["steps"] for c in s["checks"] if c["outcome"] == "fail"}


def commission(config: Path, *extra: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "firmware_py", "commission", "--config", str(config),
            "--report", str(config.parent / "report.json"), "--can-seconds", CAN_S, *extra]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=config.parent)


def finished(config: Path, proc: subprocess.Popen) -> Run:
    out, _ = proc.communicate(timeout=RUN_S)
    report = json.loads((config.parent / "report.json").read_text(encoding="utf-8"))
    return Run(proc.returncode, out, report)


def sunspec(port: int) -> SunSpecModbusClientDeviceTCP:
    dev = SunSpecModbusClientDeviceTCP(slave_id=1, ipaddr="127.0.0.1", ipport=port, timeout=2)
    dev.scan()
    return dev


def held_at_zero(port: int) -> dict[str, Any]:
    """The inverter as pysunspec2 (an independent SunSpec client) reads it: what it measures and holds."""
    dev = sunspec(port)
    try:
        m701, m704 = dev.models[701][0], dev.models[704][0]
        m701.read()
        m704.read()
        return {"W": m701.W.cvalue, "WSet": m704.WSet.cvalue, "WSetEnaRvrt": m704.WSetEnaRvrt.value}
    finally:
        dev.close()


def meter(port: int) -> float:
    """The inverter's injected-energy meter (701 TotWhInj), read by pysunspec2."""
    dev = sunspec(port)
    try:
        m701 = dev.models[701][0]
        m701.read()
        return m701.TotWhInj.cvalue
    finally:
        dev.close()


def discharging(port: int, within_s: float = 20.0) -> bool:
    """Whether the inverter holds a WSet above 0 within `within_s` (no event to wait on from outside the
    process: its registers are asked, a bounded number of times)."""
    for _ in range(int(within_s / 0.2)):
        if held_at_zero(port)["WSet"] > 0:
            return True
        time.sleep(0.2)
    return False


def wrong_dbc(folder: Path) -> Path:
    """The bundled DBC with every id moved by 0x400: another vehicle's DBC, same signal names."""
    text = bundled_dbc("cybertruck_bms.dbc").read_text(encoding="utf-8")
    moved = re.sub(r"\b(BO_|SG_|VAL_) (\d+)\b", lambda m: f"{m.group(1)} {int(m.group(2)) + 0x400}", text)
    path = folder / "other-vehicle.dbc"
    path.write_text(moved, encoding="utf-8")
    return path


def test_commissioning_passes_against_the_bench(peers: Peers):
    config = peers.config("pass")
    run = finished(config, commission(config, "--allow-test-discharge", "--discharge-seconds", DISCHARGE_S))
    assert run.code == 0, run.out
    assert run.report["passed"] and run.failed() == {}, run.out
    assert [s["outcome"] for s in run.report["steps"]] == ["pass"] * 5, run.out
    assert "COMMISSIONING PASSED: 26 passed, 0 failed, 0 skipped" in run.out
    can = run.checks("can")
    assert can["BmsEnergyStatus (0x352)"]["detail"].endswith("(DBC: 1000 ms)")
    assert "discharge allowed now" in can["contactors and BMS state"]["detail"]
    assert run.checks("inverter")["revert function"]["detail"].startswith("WSetEnaRvrt 1, WSetRvrt 0 W, WSetRvrtTms 10 s")
    sign = run.checks("sign_test")
    assert "pack discharges" in sign["BMS current"]["detail"]
    assert sign["back to 0 W"]["outcome"] == "pass"
    dispatch = run.checks("dispatch")
    assert all(c["outcome"] == "pass" for c in dispatch.values()) and len(dispatch) == 2
    assert [r["ven_name"] for r in peers.vtn.registrations] == ["truck-1"]  # the VTN saw it register

    # The test discharge went through the core, journaled like any request, and ended.
    with Journal.open(config.parent / "commission-journal.sqlite", readonly=True) as journal:
        events = [r.event() for r in journal.records() if r.kind in ("DispatchRequest", "DispatchAnswer",
                                                                     "DispatchEnded")]
    request, answer, *rest = events
    assert request.source == "commission" and request.target_w == 500 and answer.verdict.value == "accepted"
    assert any(type(e).__name__ == "DispatchEnded" and e.request_id == request.id for e in rest)
    held = held_at_zero(peers.inverter["good"])
    assert held["W"] == 0 and held["WSet"] == 0 and held["WSetEnaRvrt"] == 1


FAILING = {
    # case -> (config overrides, extra flags, the failed check, words it must say, words its advice must say)
    "no CAN traffic": ({"interface": 'interface = "virtual"', "channel": 'channel = "commission-silent"'}, (),
                       "traffic", "no CAN traffic on virtual commission-silent", "termination"),
    "wrong DBC": ({}, (), "BMS messages of other-vehicle.dbc", "none of its 9 messages", "another vehicle"),
    "inverter unreachable": ({"port": "port = {closed}"}, (), "SunSpec discovery",
                             "cannot connect to 127.0.0.1:{closed} unit 1", "[inverter] host and port"),
    "wrong unit id": ({"unit_id": "unit_id = 2"}, (), "SunSpec discovery", "not for unit id 2",
                      "[inverter] unit_id (2)"),
    "swapped power sign": ({"channel": 'channel = "ws://127.0.0.1:{can_swapped}/"', "port": "port = {inv_swapped}"},
                           ("--allow-test-discharge", "--discharge-seconds", DISCHARGE_S), "inverter measured power",
                           "reports its power with the opposite sign", "CT is fitted backwards"),
    "VTN unreachable": ({}, (), "dispatch.openadr (http://127.0.0.1:{closed}/OpenADR2/Simple/2.0b)",
                        "no answer from the VTN", "vtn_url"),
    "below the floor": ({"reserve_pct": "reserve_pct = 80"},  # the truck is at 70 %: the floor is 82 %
                        ("--allow-test-discharge", "--discharge-seconds", DISCHARGE_S), "test discharge",
                        "refused INSUFFICIENT_ENERGY", "never discharges below it"),
}


def run_failing_cases(peers: Peers) -> dict[str, tuple[Run, dict[str, Any]]]:
    """Every failing case at once (after the passing run where both run, which discharges the shared inverter)."""
    fill = {"closed": free_port(), "can_swapped": peers.can["swapped"], "inv_swapped": peers.inverter["swapped"]}
    injected_before = meter(peers.inverter["good"])
    started = {}
    for case, (overrides, flags, *_) in FAILING.items():
        config = peers.config(case.replace(" ", "-"), **{k: v.format(**fill) for k, v in overrides.items()})
        if case == "wrong DBC":
            dbc = wrong_dbc(config.parent)
            config.write_text(config.read_text().replace('dbc = "cybertruck_bms.dbc"', f'dbc = "{dbc.name}"'))
        if case == "VTN unreachable":
            config.write_text(config.read_text().replace(peers.vtn.url, f"http://127.0.0.1:{fill['closed']}/"
                                                                         "OpenADR2/Simple/2.0b"))
        started[case] = (config, commission(config, *flags))
    runs = {case: finished(config, proc) for case, (config, proc) in started.items()}
    peers.wait_alive()
    # Not one of them moved energy out of the good truck (the one below its floor asked to).
    assert meter(peers.inverter["good"]) == injected_before
    return {case: (run, fill) for case, run in runs.items()}


def wrong_in(case: str, run: Run, fill: dict[str, Any]) -> list[str]:
    """What a failing case's run got wrong: not exit 1, another failed check, the wrong words or advice."""
    _, _, name, words, advice = FAILING[case]
    name, words = name.format(**fill), words.format(**fill)
    failed = run.failed()
    if run.code != 1 or run.report["passed"]:
        return [f"{case}: exit {run.code}, passed {run.report['passed']}\n{run.out}"]
    if list(failed) != [name]:  # this failure and no other
        return [f"{case}: failed {list(failed)}, expected only {name!r}\n{run.out}"]
    if words not in failed[name]["detail"] or advice not in failed[name]["advice"]:
        return [f"{case}: {failed[name]} does not say {words!r} with advice {advice!r}"]
    if f"FAIL  {name}: " not in run.out or "COMMISSIONING FAILED" not in run.out:  # the terminal says it too
        return [f"{case}: the terminal does not say so\n{run.out}"]
    return []


def test_each_failing_case_fails_by_its_own_check_with_its_message_and_advice(peers: Peers):
    """One test for every case (their runs share the peers and go at once, ~10 s together): as a test per case,
    xdist could hand some to another worker, which set the peers up and ran every case again."""
    runs = run_failing_cases(peers)
    wrong = [problem for case, (run, fill) in runs.items() for problem in wrong_in(case, run, fill)]
    assert not wrong, "\n\n".join(wrong)

    # A swapped sign is confirmed by the BMS, and the inverter still ends at 0 W.
    sign = runs["swapped power sign"][0].checks("sign_test")
    assert sign["BMS current"]["outcome"] == "pass"  # the pack did discharge: only the reading is reversed
    assert sign["back to 0 W"]["outcome"] == "pass"
    held = held_at_zero(peers.inverter["swapped"])
    assert held["W"] == 0 and held["WSet"] == 0 and held["WSetEnaRvrt"] == 1


def test_a_dropped_ssh_session_during_the_test_discharge_still_ends_at_0_w_with_the_report(peers: Peers):
    """SIGHUP (the installer's SSH session dropped) killed the run at once: no WSet = 0, no report, the
    inverter discharging until its revert timer. Its terminal is gone too (here: the pipe closed), so the
    console's lines fail; the clean-up must still run to the end. Last in this file: it discharges the good
    truck, which the failing cases check nothing did."""
    config = peers.config("sighup")
    proc = commission(config, "--allow-test-discharge", "--discharge-seconds", "30", "--discharge-w", "2000")
    try:
        assert proc.stdout is not None
        seen = []
        for line in proc.stdout:  # bounded by the guard below: the run ends within RUN_S whatever happens
            seen.append(line)
            if line.startswith("-- test discharge:"):
                break
        assert seen and seen[-1].startswith("-- test discharge:"), "".join(seen)
        assert discharging(peers.inverter["good"]), "".join(seen)
        proc.stdout.close()  # the terminal is gone: every later line fails to print
        proc.send_signal(signal.SIGHUP)
        code = proc.wait(timeout=RUN_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    held = held_at_zero(peers.inverter["good"])  # well within the 10 s revert timer of its last write
    report = json.loads((config.parent / "report.json").read_text(encoding="utf-8"))
    assert code == 1 and report["passed"] is False
    sign = {c["name"]: c for s in report["steps"] if s["step"] == "sign_test" for c in s["checks"]}
    assert sign["sign"]["outcome"] == "fail" and "interrupted" in sign["sign"]["detail"]
    assert sign["back to 0 W"]["outcome"] == "pass"
    assert held["WSet"] == 0 and held["W"] == 0


def test_a_bus_lost_during_the_test_discharge_judges_no_sign_and_blames_no_dbc(peers: Peers):
    """The CAN server died mid-test: the core faulted and withdrew the command, and the readings left (the
    BMS current's last value, the few watts of a withdrawn command) were judged as signs: "inverter
    measured power" passed and "BMS current" failed with the advice to change a correct DBC. On its own
    bus and truck, so the shared peers stay up."""
    bus_proc, bus_out = spawn([sys.executable, "-m", "can_remote", "-i", "virtual", "-c", "commission-dying",
                               "-H", "127.0.0.1", "-p", "0"], peers.tmp / "can-dying.log", cwd=peers.tmp)
    inverter = None
    try:
        bus = int(bus_out.wait_for_line(CAN_SERVER_PORT, START_S).group(1))
        inverter = spawn([sys.executable, "-m", "firmware_py", "sim", "inverter", "--listen", "127.0.0.1:0",
                          "--can-interface", "remote", "--can-channel", f"ws://127.0.0.1:{bus}/", "--soc", "70"],
                         peers.tmp / "inverter-dying.log", cwd=peers.tmp)
        port = int(inverter[1].wait_for_line(SIM_INVERTER_PORT, START_S).group(1))
        inverter[1].wait_for_line(r"wired to a simulated pack", START_S)
        config = peers.config("bus-dies", channel=f'channel = "ws://127.0.0.1:{bus}/"', port=f"port = {port}")
        proc = commission(config, "--allow-test-discharge", "--discharge-seconds", "8")
        try:
            assert discharging(port, within_s=RUN_S / 2), "the test discharge never began"
            bus_proc.kill()
            run = finished(config, proc)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    finally:
        for child, output in [(bus_proc, bus_out), *([inverter] if inverter else [])]:
            child.kill()
            child.wait(timeout=10)
            output.join()
    sign = run.checks("sign_test")
    assert run.code == 1 and set(sign) == {"test discharge", "sign", "back to 0 W"}, run.out
    assert sign["sign"]["outcome"] == "fail" and "did not hold" in sign["sign"]["detail"], run.out
