"""`powershare-gw commission` in-process: bad input, an installation it cannot reach, the CAN observation.

The runs against a working bench (and one failing run per case) are separate
processes in `test_commission_bench.py`; these are the quick paths: exit 2 with a
message for what cannot be used, exit 1 with a full report when nothing answers,
and what the CAN observation counts on a real (virtual) python-can bus.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import can
import pytest
from aiohttp import web
from firmware_py.sim.battery import Battery
from firmware_py.sim.bms_node import BmsNode
from firmware_py.sim.ports import free_port

from firmware_py.bms.reader import BmsReader
from firmware_py.cli import main
from firmware_py.commissioning import commands as commission_commands
from firmware_py.commissioning.judgement import EXTENDED_ID, judge_can
from firmware_py.commissioning.probes import message_specs, observe_can
from firmware_py.commissioning.report import Outcome
from firmware_py.config import bundled_dbc
from firmware_py.journal import Journal


def write_config(folder: Path, can: str, *, api_port: int | None = None) -> Path:
    path = folder / "gateway.toml"
    path.write_text(f"""\
[can]
{can}

[inverter]
host = "127.0.0.1"
port = {free_port()}
timeout_s = 0.2

[owner]
api_listen = "127.0.0.1:{api_port or free_port()}"

[journal]
path = "journal.sqlite"
""", encoding="utf-8")
    return path


NO_BUS = 'interface = "socketcan"\nchannel = "nosuchcan9"'


def test_an_installation_that_cannot_be_reached_fails_every_step_it_can_try(tmp_path: Path, capsys):
    config = write_config(tmp_path, NO_BUS)
    report = tmp_path / "report.json"
    code = main(["commission", "--config", str(config), "--report", str(report), "--allow-test-discharge"])
    out = capsys.readouterr().out
    assert code == 1, out
    doc = json.loads(report.read_text())
    assert not doc["passed"]
    steps = {s["step"]: s for s in doc["steps"]}
    assert [steps[s]["outcome"] for s in ("config", "can", "inverter", "sign_test", "dispatch")] == \
        ["pass", "fail", "fail", "skipped", "skipped"]
    (bus,) = steps["can"]["checks"]
    assert bus["name"] == "bus" and "nosuchcan9" in bus["detail"] and "ip link show" in bus["advice"]
    (inverter,) = steps["inverter"]["checks"]
    assert "cannot connect to 127.0.0.1:" in inverter["detail"] and "[inverter] host and port" in inverter["advice"]
    assert "COMMISSIONING FAILED: 2 passed, 2 failed, 2 skipped" in out
    assert "check: [inverter] host and port" in out


def test_a_listen_address_another_program_holds_fails_the_configuration_step(tmp_path: Path, capsys):
    """`run` exits 2 on a web app or metrics port that is taken: commissioning must not pass such a gateway
    (it passed, and the service then would not start). Each address is named; the other steps still run."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        config = write_config(tmp_path, NO_BUS)
        config.write_text(config.read_text() + f"""
[web]
enabled = true
listen = "127.0.0.1:{taken}"

[metrics]
enabled = true
listen = "127.0.0.1:{free_port()}"
""", encoding="utf-8")
        report = tmp_path / "report.json"
        assert main(["commission", "--config", str(config), "--report", str(report)]) == 1
    doc = json.loads(report.read_text())
    steps = {s["step"]: s for s in doc["steps"]}
    assert steps["config"]["outcome"] == "fail" and steps["inverter"]["outcome"] == "fail"  # tried all the same
    failures = [c for c in steps["config"]["checks"] if c["outcome"] == "fail"]
    assert [c["name"] for c in failures] == [f"web.listen (127.0.0.1:{taken})"]
    assert "`run` would exit at its start" in failures[0]["detail"] and "ss -ltnp" in failures[0]["advice"]
    assert "metrics.listen" not in json.dumps(steps["config"])  # free: not a problem
    assert "web.listen" in capsys.readouterr().out


def test_an_ipv6_wildcard_beside_another_programs_ipv4_wildcard_is_free_as_run_finds_it(tmp_path: Path):
    """`run` binds "[::]:P" IPv6-only (asyncio's servers do), so another program on 0.0.0.0:P does not stop it:
    the check once bound a dual-stack probe and failed a gateway that would start."""
    from firmware_py.commissioning.probes import taken_addresses
    from firmware_py.config import load

    try:
        with socket.socket(socket.AF_INET6) as six:
            six.bind(("::1", 0))
    except OSError as err:
        pytest.skip(f"this machine has no IPv6 loopback ({err})")
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("0.0.0.0", 0))  # the other program, on the IPv4 wildcard
        holder.listen()
        port = holder.getsockname()[1]
        config = write_config(tmp_path, NO_BUS)
        config.write_text(config.read_text() + f'\n[web]\nenabled = true\nlisten = "[::]:{port}"\n', encoding="utf-8")
        assert taken_addresses(load(config)) == []
        config.write_text(config.read_text().replace(f"[::]:{port}", f"0.0.0.0:{port}"), encoding="utf-8")
        assert [key for key, _, _ in taken_addresses(load(config))] == ["web.listen"]


def test_free_listen_addresses_pass_the_configuration_step(tmp_path: Path):
    config = write_config(tmp_path, NO_BUS)
    config.write_text(config.read_text() + f'\n[web]\nenabled = true\nlisten = "127.0.0.1:{free_port()}"\n',
                      encoding="utf-8")
    report = tmp_path / "report.json"
    assert main(["commission", "--config", str(config), "--report", str(report)]) == 1  # no bus, no inverter
    (config_step,) = [s for s in json.loads(report.read_text())["steps"] if s["step"] == "config"]
    assert config_step["outcome"] == "pass"
    assert "every address the gateway listens on is free" in [c["detail"] for c in config_step["checks"]]


def test_an_invalid_configuration_is_bad_input_and_still_reported(tmp_path: Path, capsys):
    config = tmp_path / "bad.toml"
    config.write_text("[owner]\nresrve = 40\n", encoding="utf-8")
    report = tmp_path / "report.json"
    assert main(["commission", "--config", str(config), "--report", str(report)]) == 2
    captured = capsys.readouterr()
    assert "owner.resrve: unknown key" in captured.err and "Traceback" not in captured.err
    doc = json.loads(report.read_text())
    assert doc["steps"][0]["outcome"] == "fail" and "owner.resrve" in doc["steps"][0]["checks"][0]["detail"]
    assert [step["outcome"] for step in doc["steps"][1:]] == ["skipped"] * 4  # never checked, and said so
    assert ", 1 failed, 4 skipped" in captured.out


@pytest.mark.parametrize(("args", "words"), [
    (["--discharge-seconds", "0"], "--discharge-seconds: expected above 0 and at most 60 s, got 0"),
    (["--can-seconds", "0"], "--can-seconds: expected above 0 and at most 120 s, got 0"),
    (["--discharge-w", "-500"], "--discharge-w: expected above 0 and at most 100000 W (default 500 W), got -500"),
    (["--discharge-w", "200000"], "--discharge-w: expected above 0 and at most 100000 W (default 500 W), got 200000"),
    (["--discharge-w", "1"], "--discharge-w: expected at least 100 W (the core refuses a discharge it could serve "
                             "only below that, and the test would blame the pack), got 1"),
    (["--can-seconds", "2"], "--can-seconds 2: too short to time the DBC's slowest message"),
    (["--report", "/no/such/folder/report.json"], "folder /no/such/folder does not exist"),
])
def test_unusable_options_are_bad_input(tmp_path: Path, capsys, args: list[str], words: str):
    config = write_config(tmp_path, 'interface = "virtual"\nchannel = "commission-options"')
    assert main(["commission", "--config", str(config), *args]) == 2
    assert words in capsys.readouterr().err


RUNNING_TOKEN = "0123456789abcdef" * 4


@pytest.fixture
def running_gateway() -> Iterator[int]:
    """Something answering GET /api/status as a running gateway's owner API does: with its token, the
    status; with any other, 401."""

    class Status(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if self.headers.get("Authorization") != f"Bearer {RUNNING_TOKEN}":
                self.send_response(401)
                self.send_header("WWW-Authenticate", "Bearer")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = b'{"at": 0, "mode": "STANDBY", "reason": "idle"}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Status)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("token_file", [True, False], ids=["its token file", "its token file elsewhere"])
def test_it_refuses_to_run_beside_a_running_gateway(tmp_path: Path, capsys, running_gateway: int, token_file: bool):
    config = write_config(tmp_path, 'interface = "virtual"\nchannel = "commission-running"', api_port=running_gateway)
    if token_file:
        (tmp_path / "owner.token").write_text(RUNNING_TOKEN + "\n", encoding="utf-8")
        (tmp_path / "owner.token").chmod(0o600)  # as the gateway keeps it (a readable one is refused first)
    assert main(["commission", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "a gateway is running with this configuration" in err and "systemctl stop powershare-gw" in err
    assert RUNNING_TOKEN not in err
    assert not (tmp_path / "journal.sqlite").exists()  # nothing was assembled


@pytest.mark.parametrize("token_file", [True, False], ids=["a token file", "a fresh gateway, no token file yet"])
def test_another_program_on_the_owner_api_address_is_refused_but_not_called_a_gateway(tmp_path: Path, capsys,
                                                                                     token_file: bool):
    """`python -m http.server` on [owner] api_listen: refused (the commissioning's gateway needs the
    address), named for what it is, not "a gateway is running" (there was no service to stop); on a
    fresh gateway too, which has no owner token until its first `run`."""
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)  # 404 for /api/status
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        config = write_config(tmp_path, 'interface = "virtual"\nchannel = "commission-other"', api_port=port)
        if token_file:
            (tmp_path / "owner.token").write_text(RUNNING_TOKEN + "\n", encoding="utf-8")
            (tmp_path / "owner.token").chmod(0o600)
        assert main(["commission", "--config", str(config)]) == 2
    finally:
        server.shutdown()
        server.server_close()
    err = capsys.readouterr().err
    assert f"owner.api_listen: something other than a gateway listens on 127.0.0.1:{port}" in err
    assert "ss -ltnp" in err and "a gateway is running" not in err
    assert not (tmp_path / "journal.sqlite").exists()


# --- the CAN observation, on a real virtual bus ---------------------------------------------------------

def test_a_bus_that_fails_during_the_window_is_a_failed_bus_check_not_a_crash():
    """An adapter unplugged or a CAN server gone mid-window: the bus check fails naming it, and the
    commissioning goes on to the inverter (the command's no-bus path)."""
    bus = can.Bus(interface="virtual", channel="commission-lost")
    bus.shutdown()  # every receive now fails
    obs = observe_can(bus, BmsReader(bundled_dbc("cybertruck_bms.dbc"), clock=lambda: 0.0), 1.0,
                      where="virtual commission-lost", usable_capacity_wh=123_000)
    (check,) = judge_can(obs, [])
    assert check.outcome is Outcome.FAIL and check.name == "bus"
    assert check.detail.startswith("virtual commission-lost: receiving failed 0.0 s into the window, after 0 frame(s):")


def test_the_can_observation_counts_each_page_each_refusal_and_the_foreign_ids():
    """Frames queued on a python-can virtual bus before the window: the counts are exact (their
    receive times all fall together, so periods are the judgement's tests, not this one's)."""
    dbc = bundled_dbc("cybertruck_bms.dbc")
    channel = "commission-observation"
    rx, tx = can.Bus(interface="virtual", channel=channel), can.Bus(interface="virtual", channel=channel)
    try:
        node = BmsNode(Battery(soc_pct=70), tx, dbc)
        for t in range(3):
            node.emit_due(float(t))  # every message once a second: both pages of the multiplexed ones
        tx.send(can.Message(arbitration_id=0x132, data=b"\x00\x01", is_extended_id=False))  # too short
        tx.send(can.Message(arbitration_id=0x7FF, data=b"\x01", is_extended_id=False))  # another node's
        reader = BmsReader(dbc, clock=lambda: 0.0)
        obs = observe_can(rx, reader, 0.2, where="virtual commission-observation", usable_capacity_wh=123_000)
    finally:
        rx.shutdown()
        tx.shutdown()
    specs = {s.frame_id: s for s in message_specs(reader)}
    assert specs[0x352].pages == 2 and specs[0x132].pages == 1 and specs[0x132].period_s == 0.01
    assert obs.frames == node.sent + 2 and obs.foreign_ids == (0x7FF,)
    assert obs.by_id[0x352].count == 6
    assert {key: t.count for key, t in obs.by_page.items() if key[0] == 0x352} == {(0x352, 0): 3, (0x352, 1): 3}
    assert obs.refused == {0x132: {"wrong_length": 1}} and obs.accepted[0x132] == 3
    assert obs.values["soc_min_pct"] is not None and "soc_min_pct" not in obs.stale


def test_the_can_observation_keeps_29_bit_ids_apart_from_the_dbcs_11_bit_ones():
    """A BMS id in a 29-bit frame was kept as the bare number, and shown as the DBC's own 11-bit id."""
    dbc = bundled_dbc("cybertruck_bms.dbc")
    channel = "commission-extended"
    rx, tx = can.Bus(interface="virtual", channel=channel), can.Bus(interface="virtual", channel=channel)
    try:
        tx.send(can.Message(arbitration_id=0x132, data=bytes(8), is_extended_id=True))
        tx.send(can.Message(arbitration_id=0x7FF, data=b"\x01", is_extended_id=False))
        reader = BmsReader(dbc, clock=lambda: 0.0)
        obs = observe_can(rx, reader, 0.2, where="virtual commission-extended", usable_capacity_wh=123_000)
    finally:
        rx.shutdown()
        tx.shutdown()
    assert obs.foreign_ids == (0x7FF, 0x132 | EXTENDED_ID) and 0x132 not in obs.by_id
    check = next(c for c in judge_can(obs, message_specs(reader)) if c.name == "BMS messages of cybertruck_bms.dbc")
    assert "0x00000132 (29-bit)" in check.detail
    assert "0x132 arrives as a 29-bit (extended) frame; the DBC defines it as 11-bit" in check.detail


def test_it_refuses_beside_anything_on_the_owner_api_address_even_a_gateway_still_starting(tmp_path: Path, capsys):
    """No token file, no HTTP answer yet: a gateway that is starting has already bound its owner API."""
    with socket.socket() as starting:
        starting.bind(("127.0.0.1", 0))
        starting.listen()
        config = write_config(tmp_path, 'interface = "virtual"\nchannel = "commission-starting"',
                              api_port=starting.getsockname()[1])
        assert main(["commission", "--config", str(config)]) == 2
    assert "a gateway is running with this configuration" in capsys.readouterr().err
    assert not (tmp_path / "journal.sqlite").exists()


@pytest.mark.slow  # a real-time CAN window
def test_a_run_that_stops_part_way_is_never_reported_as_passed(tmp_path: Path, capsys, monkeypatch):
    """The CAN step passes, then the journal (one when the configuration was checked, no longer one when
    the gateway is built) cannot be opened: exit 2 as for any bad input, and the report kept for the
    installer says FAILED, naming why (it said PASSED on the checks it had): a configuration problem,
    under the configuration step (it was filed under the inverter step, never asked), and the steps that
    did not run as skipped."""
    channel = f"commission-ended-early-{tmp_path.name}"
    config = write_config(tmp_path, f'interface = "virtual"\nchannel = "{channel}"')
    (tmp_path / "journal.sqlite").write_text("not a journal\n" * 100, encoding="utf-8")
    monkeypatch.setattr(Journal, "check_openable", staticmethod(lambda *_, **__: None))  # changed since the check
    tx, stop = can.Bus(interface="virtual", channel=channel), threading.Event()
    node = threading.Thread(target=BmsNode(Battery(soc_pct=70), tx, bundled_dbc("cybertruck_bms.dbc")).run,
                            args=(stop,), daemon=True)
    node.start()
    try:
        code = main(["commission", "--config", str(config), "--report", str(tmp_path / "report.json"),
                     "--can-seconds", "3"])
    finally:
        stop.set()
        node.join(timeout=5)
        tx.shutdown()
    out = capsys.readouterr().out
    doc = json.loads((tmp_path / "report.json").read_text())
    assert code == 2 and doc["passed"] is False and "COMMISSIONING FAILED" in out
    steps = {s["step"]: s for s in doc["steps"]}
    assert [steps[s]["outcome"] for s in ("config", "can", "inverter", "sign_test", "dispatch")] == \
        ["fail", "pass", "skipped", "skipped", "skipped"]
    (failure,) = [c for c in steps["config"]["checks"] if c["outcome"] == "fail"]
    assert failure["detail"].startswith(f"{config}: journal.path: ") and "journal.sqlite" in failure["detail"]
    assert "== configuration, later: FAIL" in out and "== inverter (SunSpec Modbus): SKIPPED" in out
    assert ", 1 failed, 3 skipped\n" in out, out
    assert not any(c["name"] == "commissioning ended early" for s in doc["steps"] for c in s["checks"])


@pytest.mark.slow  # a real-time CAN window
def test_under_nohup_a_hang_up_leaves_commissioning_running(tmp_path: Path, capsys, monkeypatch):
    """Started with SIGHUP ignored (`nohup`), the installer meant it to outlive the SSH session: `run`'s
    rule (`tasks.stop_signals`). It took SIGHUP for its own and failed the CAN step as interrupted."""
    channel = f"commission-nohup-{tmp_path.name}"
    config = write_config(tmp_path, f'interface = "virtual"\nchannel = "{channel}"')
    tx, stop = can.Bus(interface="virtual", channel=channel), threading.Event()
    node = threading.Thread(target=BmsNode(Battery(soc_pct=70), tx, bundled_dbc("cybertruck_bms.dbc")).run,
                            args=(stop,), daemon=True)
    observe = commission_commands.probes.observe_can

    def hung_up_while_observing(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGHUP)
        return observe(*args, **kwargs)

    monkeypatch.setattr(commission_commands.probes, "observe_can", hung_up_while_observing)
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    node.start()
    try:
        main(["commission", "--config", str(config), "--report", str(tmp_path / "report.json"),
              "--can-seconds", "3"])
    finally:
        signal.signal(signal.SIGHUP, previous)
        stop.set()
        node.join(timeout=5)
        tx.shutdown()
    steps = {s["step"]: s for s in json.loads((tmp_path / "report.json").read_text())["steps"]}
    assert steps["can"]["outcome"] == "pass", capsys.readouterr().out


def test_a_fast_message_held_up_as_the_window_closes_is_still_believed():
    """Every frame queued before a 0.2 s window: at its end the 10 ms HvBattAmpVolt's last frame is up to
    0.2 s old, past its 30 ms timeout but within the lateness the message checks allow (`LATE_S`). Judged
    at that one instant, a loaded gateway's 30 ms hiccup failed a healthy bus's values."""
    dbc = bundled_dbc("cybertruck_bms.dbc")
    channel = "commission-held-up"
    rx, tx = can.Bus(interface="virtual", channel=channel), can.Bus(interface="virtual", channel=channel)
    try:
        BmsNode(Battery(soc_pct=70), tx, dbc).emit_due(0.0)
        obs = observe_can(rx, BmsReader(dbc, clock=time.monotonic), 0.2, where=f"virtual {channel}",
                          usable_capacity_wh=123_000)
    finally:
        rx.shutdown()
        tx.shutdown()
    assert not {"pack_voltage_v", "pack_current_a"} & obs.stale
    (values,) = [c for c in judge_can(obs, []) if c.name == "values"]
    assert values.outcome is Outcome.PASS, values.detail


def test_a_bms_that_falls_silent_part_way_through_the_window_is_stale_at_its_end():
    """Values are judged as of the window's end, not its last frame: a BMS (or a bus) that stopped part-way
    passed every CAN check before."""
    dbc = bundled_dbc("cybertruck_bms.dbc")
    channel = "commission-silent-part-way"
    rx, tx = can.Bus(interface="virtual", channel=channel), can.Bus(interface="virtual", channel=channel)
    talking = threading.Thread(target=BmsNode(Battery(soc_pct=70), tx, dbc).run, args=(threading.Event(),),
                               kwargs={"duration_s": 0.5}, daemon=True)
    try:
        talking.start()
        obs = observe_can(rx, BmsReader(dbc, clock=time.monotonic), 1.5, where=f"virtual {channel}",
                          usable_capacity_wh=123_000)
    finally:
        talking.join(timeout=5)
        rx.shutdown()
        tx.shutdown()
    assert obs.frames > 0 and {"soc_min_pct", "bms_state", "max_discharge_w"} <= set(obs.stale)


# --- found before anything runs: paths that cannot be written ---------------------------------------------

def test_a_report_path_that_cannot_be_written_is_refused_before_anything_runs(tmp_path: Path, capsys):
    """/proc is a folder even root cannot create a file in: found after the whole run (the test discharge
    included) before; now exit 2 at once, naming --report, with nothing assembled or commanded."""
    config = write_config(tmp_path, 'interface = "virtual"\nchannel = "commission-report-proc"')
    started = time.monotonic()
    code = main(["commission", "--config", str(config), "--report", "/proc/commissioning.json",
                 "--allow-test-discharge"])
    captured = capsys.readouterr()
    assert code == 2, captured
    assert "--report /proc/commissioning.json: cannot write" in captured.err and "Traceback" not in captured.err
    assert "-- listening" not in captured.out and "-- asking the inverter" not in captured.out
    assert not (tmp_path / "journal.sqlite").exists()
    assert time.monotonic() - started < 5  # not after a CAN window


def test_a_journal_this_user_cannot_write_fails_the_configuration_step_naming_its_key(tmp_path: Path, capsys):
    """SQLite's "unable to open database file", filed under the inverter step, named neither the key nor
    the cause. /proc/self is a folder no user can write, root included (CI runs as root)."""
    config = write_config(tmp_path, 'interface = "virtual"\nchannel = "commission-journal-proc"')
    config.write_text(config.read_text().replace('path = "journal.sqlite"', 'path = "/proc/self/journal.sqlite"'))
    report = tmp_path / "report.json"
    assert main(["commission", "--config", str(config), "--report", str(report)]) == 2
    captured = capsys.readouterr()
    words = "journal.path: /proc/self/journal.sqlite: cannot be written by this user"
    assert words in captured.err and "Traceback" not in captured.err
    doc = json.loads(report.read_text())
    assert doc["steps"][0]["step"] == "config" and doc["steps"][0]["outcome"] == "fail"
    assert all(s["outcome"] != "pass" for s in doc["steps"][1:])  # nothing after it ran
    assert words in doc["steps"][0]["checks"][0]["detail"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: only root can give a file to another user "
                    "(uid 65534, nobody) to check that it is refused")
def test_a_secret_file_another_user_owns_fails_the_configuration_step_naming_its_key(tmp_path: Path, capsys):
    """`run` (this user) refuses an OpenADR 3 client secret file nobody owns: so does the configuration
    step, with the key, instead of passing it and failing as the inverter step once the VEN was built."""
    config = write_config(tmp_path, 'interface = "virtual"\nchannel = "commission-secret-owner"')
    secret = tmp_path / "oa3.secret"
    secret.write_text("TopSecretVTN3xyz\n")
    secret.chmod(0o600)
    os.chown(secret, 65_534, 65_534)
    config.write_text(config.read_text() + '[dispatch.openadr3]\nenabled = true\nvtn_url = "http://127.0.0.1:9/oa3"\n'
                      'client_id = "truck-1"\nclient_secret_file = "oa3.secret"\nven_name = "truck-1"\n')
    report = tmp_path / "report.json"
    assert main(["commission", "--config", str(config), "--report", str(report), "--can-seconds", "3"]) == 2
    words = f"{config}: dispatch.openadr3.client_secret_file: {secret}: the OpenADR 3 client secret file belongs to"
    assert words in capsys.readouterr().err
    doc = json.loads(report.read_text())
    assert doc["steps"][0]["step"] == "config" and doc["steps"][0]["outcome"] == "fail"
    assert words in doc["steps"][0]["checks"][0]["detail"]
    assert all(s["outcome"] != "fail" for s in doc["steps"][1:])  # nothing after it ran, nor failed


# --- Ctrl-C while an aggregator interface is asked ----------------------------------------------------------

class SlowVtn:
    """An OpenADR 3 VTN on its own loop in a thread that answers correctly, but holds GET /vens until
    closed; `asked` is set when that request arrives (the dispatch probe then waits on it)."""

    def __init__(self) -> None:
        self.asked = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="slow-VTN", daemon=True)
        self.thread.start()
        self.runner, self.port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=10)
        self.url = f"http://127.0.0.1:{self.port}/openadr3/3.0.1"

    async def _start(self) -> tuple[web.AppRunner, int]:
        base = "/openadr3/3.0.1"
        self.hold = asyncio.Event()  # set at close: until then the answer waits

        async def server(_r: web.Request) -> web.Response:
            return web.json_response({"tokenURL": f"{self.url}/auth/token"})

        async def token(_r: web.Request) -> web.Response:
            return web.json_response({"access_token": "tok", "token_type": "Bearer", "expires_in": 3600})

        async def vens(_r: web.Request) -> web.Response:
            self.asked.set()
            await self.hold.wait()
            return web.json_response([])

        app = web.Application()
        app.add_routes([web.get(f"{base}/auth/server", server), web.post(f"{base}/auth/token", token),
                        web.get(f"{base}/vens", vens)])
        runner = web.AppRunner(app, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return runner, runner.addresses[0][1]

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.hold.set)
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.mark.slow  # a real-time CAN window
def test_ctrl_c_while_an_aggregator_is_asked_fails_the_dispatch_step_as_interrupted(tmp_path: Path, capsys):
    """The stop was looked at only before the dispatch probes, which may each wait 15 s: Ctrl-C then was
    ignored and the run said PASSED, exit 0. Now the probe is cut short and the step fails as interrupted."""
    vtn = SlowVtn()
    config = write_config(tmp_path, 'interface = "virtual"\nchannel = "commission-ctrl-c-dispatch"')
    secret = tmp_path / "oa3.secret"
    secret.write_text("secret\n", encoding="utf-8")
    secret.chmod(0o600)
    config.write_text(config.read_text() + f'\n[dispatch.openadr3]\nenabled = true\nvtn_url = "{vtn.url}"\n'
                      f'client_secret_file = "{secret.name}"\n', encoding="utf-8")
    report = tmp_path / "report.json"

    sent: list[float] = []

    def ctrl_c_once_asked() -> None:
        if vtn.asked.wait(timeout=60):
            sent.append(time.monotonic())
            os.kill(os.getpid(), signal.SIGINT)

    interrupter = threading.Thread(target=ctrl_c_once_asked, daemon=True)
    interrupter.start()
    try:
        code = main(["commission", "--config", str(config), "--report", str(report), "--can-seconds", "3"])
        ended = time.monotonic()
    finally:
        interrupter.join(timeout=60)
        vtn.close()
    out = capsys.readouterr().out
    assert vtn.asked.is_set(), out
    doc = json.loads(report.read_text())
    assert code != 0 and doc["passed"] is False and "COMMISSIONING FAILED" in out, out
    dispatch = [s for s in doc["steps"] if s["step"] == "dispatch"]
    assert len(dispatch) == 1 and dispatch[0]["outcome"] == "fail"
    assert [c["name"] for c in dispatch[0]["checks"]] == ["interrupted"]
    assert ended - sent[0] < 5  # at once, not after the probe's 15 s


def test_ctrl_c_in_the_can_window_shows_the_steps_not_run_on_the_terminal_as_in_the_report(
        tmp_path: Path, capsys, monkeypatch):
    """Interrupted in the CAN window, the terminal said "2 passed, 1 failed, 0 skipped" and listed no later
    step, while the report had the three as skipped: both now show them, not run, and why."""
    listening = threading.Event()
    observe = commission_commands.probes.observe_can

    def observed(*args, **kwargs):
        listening.set()
        return observe(*args, **kwargs)
    monkeypatch.setattr(commission_commands.probes, "observe_can", observed)

    def ctrl_c_once_listening() -> None:
        if listening.wait(timeout=60):
            os.kill(os.getpid(), signal.SIGINT)

    interrupter = threading.Thread(target=ctrl_c_once_listening, daemon=True)
    interrupter.start()
    config = write_config(tmp_path, 'interface = "virtual"\nchannel = "commission-ctrl-c-can"')
    try:
        code = main(["commission", "--config", str(config), "--report", str(tmp_path / "report.json"),
                     "--can-seconds", "30"])
    finally:
        interrupter.join(timeout=60)
    out = capsys.readouterr().out
    doc = json.loads((tmp_path / "report.json").read_text())
    assert code == 1 and doc["passed"] is False
    assert [(s["step"], s["outcome"]) for s in doc["steps"]] == [
        ("config", "pass"), ("can", "fail"), ("inverter", "skipped"), ("sign_test", "skipped"), ("dispatch", "skipped")]
    for step in doc["steps"][2:]:
        (check,) = step["checks"]
        assert check["detail"] == "not run: commissioning was stopped by a signal"
    assert "== inverter (SunSpec Modbus): SKIPPED" in out and "== dispatch interfaces: SKIPPED" in out, out
    assert "COMMISSIONING FAILED: 2 passed, 1 failed, 3 skipped" in out, out


def _refused_report(config: Path, report: str, capsys) -> str:
    code = main(["commission", "--config", str(config), "--report", report])
    captured = capsys.readouterr()
    assert code == 2, captured
    assert "Traceback" not in captured.err and "-- listening" not in captured.out
    (line,) = [ln for ln in captured.err.splitlines() if ln.startswith("error:")]
    return line


def test_a_report_path_naming_the_configuration_file_is_refused_and_the_file_kept(tmp_path: Path, capsys):
    """`--report gateway.toml` replaced the configuration with the JSON report (an invalid one too, as
    the report of its failure): now exit 2 naming --report and the file, which is left as it was."""
    config = write_config(tmp_path, NO_BUS)
    before = config.read_bytes()
    line = _refused_report(config, str(config), capsys)
    assert f"--report {config}: is the configuration file" in line
    assert config.read_bytes() == before
    (tmp_path / "link.toml").hardlink_to(config)  # the same file by another name
    assert "the configuration file" in _refused_report(config, str(tmp_path / "link.toml"), capsys)
    assert config.read_bytes() == before
    config.write_text(before.decode() + "\n[owner]\nresrve = 1\n", encoding="utf-8")  # invalid: not even loaded
    invalid = config.read_bytes()
    assert "the configuration file" in _refused_report(config, str(tmp_path / "sub" / ".." / "gateway.toml"), capsys)
    assert config.read_bytes() == invalid


@pytest.mark.parametrize(("name", "words"), [
    ("journal.sqlite", "the live segment of the journal"),
    ("journal.sqlite-wal", "SQLite side file of the journal"),
    ("journal.sqlite.anchors", "anchors of the journal"),
    ("owner.token", "owner.token_file's file"),
    ("owner-settings.json", "owner.settings_file's file"),
])
def test_a_report_path_naming_a_file_the_configuration_keeps_is_refused(tmp_path: Path, capsys, name: str,
                                                                          words: str):
    """The journal (and its side files), the owner token and settings: a report written over one lost it."""
    (tmp_path / "sub").mkdir()
    config = write_config(tmp_path, NO_BUS)
    kept = tmp_path / name
    kept.write_bytes(b"kept record")
    line = _refused_report(config, str(tmp_path / "sub" / ".." / name), capsys)
    assert "--report" in line and words in line and "would replace it" in line
    assert kept.read_bytes() == b"kept record"


def test_it_refuses_a_journal_a_gateway_holds_naming_its_pid_and_touches_nothing(tmp_path: Path, capsys):
    """A gateway still starting (its owner API not yet listening) holds its journal's lock already:
    commissioning beside it would take over its inverter's setpoint and its journal."""
    from firmware_py.journal.lock import lock_journal

    config = write_config(tmp_path, 'interface = "virtual"\nchannel = "commission-locked"', api_port=free_port())
    lock = lock_journal(tmp_path / "journal.sqlite", lambda pid: "in use")
    try:
        assert main(["commission", "--config", str(config)]) == 2
    finally:
        lock.close()
    err = capsys.readouterr().err
    assert f"journal.path: journal {tmp_path / 'journal.sqlite'} is in use by a gateway (pid {os.getpid()})" in err
    assert "systemctl stop powershare-gw" in err and "--" not in err  # no step begun
    assert not (tmp_path / "journal.sqlite").exists()  # nothing was assembled
