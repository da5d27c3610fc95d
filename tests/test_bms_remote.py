"""`sim bms` in one process, the gateway's reader in another, over python-can-remote on 127.0.0.1."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import can
import pytest

from children import CAN_SERVER_PORT, spawn
from firmware_py.bms import BmsReader
from firmware_py.bms import commands as bms_commands
from firmware_py.cli import main
from firmware_py.config import bundled_dbc
from firmware_py.core.types import BmsState
from firmware_py.sim.battery import Battery

DBC = bundled_dbc("cybertruck_bms.dbc")
LOAD_W = 11_500
SOC = 65.0


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@pytest.fixture
def can_server(tmp_path):
    """A python-can-remote server on a port of its own choosing, its URL known once it says it listens."""
    server, output = spawn([sys.executable, "-m", "can_remote", "-i", "virtual", "-c", "bench",
                            "-H", "127.0.0.1", "-p", "0"], tmp_path / "can-server.log")
    try:
        port = output.wait_for_line(CAN_SERVER_PORT, timeout=20).group(1)
        yield SimpleNamespace(url=f"ws://127.0.0.1:{port}/", process=server, output=output)
    finally:
        stop(server)


@pytest.fixture
def remote_url(can_server):
    return can_server.url


@pytest.mark.slow  # a CAN server and a BMS node as processes of their own
def test_node_and_reader_in_two_processes(remote_url, tmp_path):
    scenario = tmp_path / "bms.toml"
    scenario.write_text(f"[run]\nduration_s = 30\n[vehicle]\ninitial_soc_pct = {SOC}\n"
                        "[[fault]]\nat_s = 1.5\nkind = \"bms_fault\"\nduration_s = 0.5\n"
                        "[[fault]]\nat_s = 1\nkind = \"grid_outage\"\nduration_s = 1\n")
    reader = BmsReader(DBC, clock=time.monotonic)
    seen_states: list[int] = []
    fresh = None
    # The reader's bus is open before the node starts: the server relays only to connected clients, and
    # the node's faults are timed on its own clock, so a late reader would miss them.
    with can.Bus(interface="remote", channel=remote_url) as bus:
        node = subprocess.Popen([sys.executable, "-m", "firmware_py", "sim", "bms", "--can-interface", "remote",
                                 "--can-channel", remote_url, "--scenario", str(scenario), "--load-w", str(LOAD_W)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and node.poll() is None:
                msg = bus.recv(timeout=0.5)
                if msg is None:
                    continue
                believed = reader.accepted
                reader.on_message(msg)
                if reader.accepted == believed:
                    continue
                s = reader.snapshot(time.monotonic())
                if s.bms_state is not None and (not seen_states or seen_states[-1] != s.bms_state):
                    seen_states.append(s.bms_state)
                if fresh is None and all(v is not None for v in vars(s).values()) and not s.stale:
                    fresh = s
                if BmsState.FAULT in seen_states and seen_states[-1] == BmsState.SUPPORT:
                    break
        finally:
            stop(node)
            out, err = node.communicate(timeout=5)
    assert node.returncode == 0, err
    assert "sent" in out  # stopped cleanly by SIGTERM and said so
    assert fresh is not None, f"no complete snapshot; dropped {reader.dropped}"
    model = Battery(soc_pct=SOC)
    model.step(0.01, LOAD_W)
    assert fresh.pack_voltage_v == pytest.approx(model.pack_voltage_v, abs=0.5)
    assert fresh.pack_current_a == pytest.approx(model.pack_current_a, abs=0.3)
    assert SOC - 1.0 <= fresh.soc_min_pct <= SOC
    assert fresh.max_discharge_w == pytest.approx(model.max_discharge_w, abs=100)
    assert fresh.energy_path_closed() and fresh.hvil_ok
    assert seen_states[-2:] == [BmsState.FAULT, BmsState.SUPPORT], seen_states
    assert not reader.dropped


@pytest.mark.slow  # a CAN server as a process of its own
def _server_killed_under(can_server, monkeypatch, module, argv: list[str]) -> list[int]:
    """Run the command `argv` in a thread, kill the CAN server once the command has opened its bus (seen
    through `module.open_bus`: the server says "Connected" before the client's handshake ends); the exit
    code it returned, in a list (empty if it never returned)."""
    code: list[int] = []
    opened = threading.Event()
    real_open = module.open_bus

    def open_then_tell(*args, **kwargs):
        bus = real_open(*args, **kwargs)
        opened.set()
        return bus

    monkeypatch.setattr(module, "open_bus", open_then_tell)
    command = threading.Thread(target=lambda: code.append(main(argv)))
    command.start()
    try:
        assert opened.wait(20), f"{argv[:2]} never opened its bus"
        can_server.process.kill()
    finally:
        command.join(30)
    return code


def test_a_recording_whose_bus_goes_away_is_one_clear_error_and_a_whole_file(
        can_server, tmp_path, capsys, monkeypatch):
    """The adapter unplugged or the CAN server gone mid-recording: the frames before are kept in a
    file closed properly (its footer written), and the command says what happened, without a traceback."""
    out = tmp_path / "rec.asc"
    code = _server_killed_under(can_server, monkeypatch, bms_commands, [
        "bms", "record", "--can-interface", "remote", "--can-channel", can_server.url, "--duration", "30", str(out)])
    assert code == [2]
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert f"--can-channel {can_server.url}: the bus failed after 0 frames:" in err
    assert out.read_text().rstrip().endswith("End TriggerBlock")


@pytest.mark.slow  # a CAN server as a process of its own
def test_sim_bms_whose_can_server_goes_away_says_so_once_and_exits_1(can_server, capsys, monkeypatch):
    """Killing the CAN server while `sim bms` sent ended it with four chained tracebacks (ConnectionResetError,
    BrokenPipeError, OSError from the send and again from closing the bus). Its docs promise no reconnect: one
    line naming the interface and channel, exit 1."""
    from firmware_py.bms import bus as bms_bus

    code = _server_killed_under(can_server, monkeypatch, bms_bus, [
        "sim", "bms", "--can-interface", "remote", "--can-channel", can_server.url, "--duration", "30"])
    assert code == [1]
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1, err
    assert f"error: --can-interface remote --can-channel {can_server.url}: the bus was lost after " in err, err


@pytest.mark.parametrize("sig, ignored_at_start", [(signal.SIGTERM, False), (signal.SIGINT, True)],
                         ids=["SIGTERM", "SIGINT to a background job of a script"])
def test_sim_inverter_stops_cleanly_on_a_stop_signal(tmp_path, sig, ignored_at_start):
    """`sim inverter` said "Ctrl-C stops" but SIGTERM's default action killed it (exit 143), and a
    background job of a script (SIGINT ignored from the start) could not be stopped with Ctrl-C's signal."""
    from children import spawn

    def before_exec() -> None:
        if ignored_at_start:
            signal.signal(signal.SIGINT, signal.SIG_IGN)

    proc, output = spawn([sys.executable, "-m", "firmware_py", "sim", "inverter", "--listen", "127.0.0.1:0"],
                         tmp_path / "inverter.log", preexec_fn=before_exec)
    try:
        output.wait_for_line(r"serving SunSpec models .*; Ctrl-C or SIGTERM stops", timeout=20)
        proc.send_signal(sig)
        assert proc.wait(timeout=10) == 0
    finally:
        stop(proc)
    output.wait_for_line(r"# sim inverter: stopped, 0\.0 Wh injected in all", timeout=5)
