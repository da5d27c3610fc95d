"""Logs for people and `powershare-gw status` (issue 10, item 4), on the assembled gateway.

The gateway runs in lock-step (`lockstep.Rig`: virtual CAN bus, Modbus TCP inverter,
SQLite journal) with the narrator `run` attaches; its owner API serves on 127.0.0.1
and the real CLI asks it for the status, as an installer would.
"""

from __future__ import annotations

import asyncio
import http.server
import itertools
import json
import logging
import socket
import threading
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from lockstep import Rig

from firmware_py import cli
from firmware_py.core import Mode
from firmware_py.core.types import DispatchKind, DispatchRequest, Verdict
from firmware_py.narration import JournaldFormatter, Narrator, configure_logging, lines_written_aside
from firmware_py.owner.api import OwnerApi
from firmware_py.status import render


def write_config(path: Path, api_listen: str, token_file: Path) -> Path:
    config = path / "gateway.toml"
    config.write_text(f'[owner]\napi_listen = "{api_listen}"\ntoken_file = "{token_file}"\n')
    return config


def test_every_thing_worth_knowing_is_one_line_and_nothing_else_is_logged(tmp_path, caplog):
    async def main() -> None:
        async with Rig(tmp_path) as rig:
            rig.gateway.observers.append(Narrator(rig.gateway.clocks))
            await rig.run(2.0)
            now = rig.gateway.now()
            request = DispatchRequest("peak", "openadr", DispatchKind.DISCHARGE, 5_000, now, now + 600, now)
            assert (await rig.gateway.submit(request)).verdict is Verdict.ACCEPTED
            await rig.run(5.0)
            settings = rig.gateway.owner_settings()
            await rig.gateway.set_owner(replace(settings, reserve_pct=55.0, received_at=rig.gateway.now()))
            rig.node.inject("bms_fault", until=rig.time.mono + 1.0)
            await rig.run(4.0)  # raised, then cleared after the 2 s hold-off
            rig.server.drop_connections()  # the inverter drops the gateway: lost, then back
            await rig.run(5.0)  # reconnected after its back-off, the comms fault held 2 s more
            assert rig.gateway.controller.mode is Mode.DISCHARGE

    with caplog.at_level(logging.INFO):
        asyncio.run(main())
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("firmware_py")]
    expected = [
        "mode STARTUP -> STANDBY: BMS and inverter data ready",
        "dispatch peak from openadr (discharge 5000 W, 2025-06-01 12:00:02Z to 2025-06-01 12:10:02Z, rev 0): accepted",
        "mode STANDBY -> DISCHARGE: dispatch peak",
        "owner settings changed: reserve 55 %",
        "fault raised: bms_fault (BMS state FAULT)",
        "mode DISCHARGE -> FAULT: fault: bms_fault",
        "fault cleared: bms_fault",
        "mode FAULT -> STARTUP: faults cleared",
        "mode STARTUP -> STANDBY: BMS and inverter data ready",
        "mode STANDBY -> DISCHARGE: dispatch peak",
        "fault raised: inverter_comms (reading 40070+27: connection closed by the inverter",
        "mode DISCHARGE -> FAULT: fault: inverter_comms",
        "link lost: inverter: reading 40070+27: connection closed by the inverter",
        "link recovered: inverter, after 1.0 s",
        "fault cleared: inverter_comms",
        "mode FAULT -> STARTUP: faults cleared",
        "mode STARTUP -> STANDBY: BMS and inverter data ready",
        "mode STANDBY -> DISCHARGE: dispatch peak",
    ]
    assert len(lines) == len(expected) and all(line.startswith(want) for line, want in zip(lines, expected)), \
        "\n".join(lines)
    assert not [r for r in caplog.records if r.exc_info], "an expected condition printed a traceback"
    assert all("\n" not in line for line in lines)


def test_journald_lines_carry_their_priority():
    record = logging.LogRecord("firmware_py.links", logging.WARNING, __file__, 1, "link lost: %s", ("bms",), None)
    assert JournaldFormatter("%(message)s").format(record) == "<4>firmware_py.links: link lost: bms"


FORGED_ID = "peak\x1b[2J\n<3>firmware_py.gateway.narration: LOCKOUT: forged"
"""An event id a VTN may send: an escape that clears a terminal, and a line of its own for journald."""


@pytest.fixture(params=[True, False], ids=["journald", "terminal"])
def journald(request, monkeypatch) -> bool:
    """Logging as `run` does under systemd (JOURNAL_STREAM set), or on a terminal."""
    if request.param:
        monkeypatch.setenv("JOURNAL_STREAM", "8:1234")
    else:
        monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    return request.param


def test_an_id_with_control_characters_stays_on_its_own_line_escaped(journald, capsys):
    with lines_written_aside(verbose=False):
        logging.getLogger("firmware_py.gateway.narration").info("dispatch %s: accepted", FORGED_ID)
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "\x1b" not in err
    assert "dispatch peak\\x1b[2J\\n<3>firmware_py.gateway.narration: LOCKOUT: forged: accepted" in err


def test_a_traceback_said_aside_keeps_its_lines_and_each_is_filed_at_its_priority(journald, capsys):
    with lines_written_aside(verbose=False):
        try:
            raise ZeroDivisionError(f"division by zero in {FORGED_ID}")  # a peer's text in the message too
        except ZeroDivisionError:
            logging.getLogger("firmware_py.service").exception("task %s died", FORGED_ID)
    lines = capsys.readouterr().err.splitlines()
    assert lines[1].endswith("Traceback (most recent call last):")
    assert lines[-1].endswith("ZeroDivisionError: division by zero in peak\\x1b[2J\\n<3>firmware_py.gateway."
                              "narration: LOCKOUT: forged")
    assert "\\n<3>" in lines[0] and not any(line.startswith("<3>firmware_py.gateway") for line in lines)
    if journald:
        assert all(line.startswith("<3>") for line in lines)


def test_status_escapes_what_the_gateway_repeats_from_aggregators(tmp_path, capsys):
    doc = {"at": "2026-12-03T12:00:00Z", "mode": "DISCHARGE", "reason": f"dispatch {FORGED_ID}",
           "event": {"id": FORGED_ID, "answer": "accepted"}}
    body = json.dumps(doc).encode()

    class Gateway(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Gateway) as server:
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        try:
            (tmp_path / "owner.token").write_text("ab" * 32)
            config = write_config(tmp_path, f"127.0.0.1:{server.server_address[1]}", tmp_path / "owner.token")
            assert cli.main(["status", "--config", str(config)]) == 0
        finally:
            server.shutdown()
    out = capsys.readouterr().out
    assert "\x1b" not in out and not any(line.startswith("<3>") for line in out.splitlines())
    assert "mode:    DISCHARGE: dispatch peak\\x1b[2J\\n<3>" in out


def test_status_from_the_running_gateway_as_json_and_text(tmp_path, capsys, caplog):
    async def main() -> tuple[int, dict, int, str]:
        def loopback(config):
            return replace(config, owner=replace(config.owner, api_listen="127.0.0.1:0"))

        async with Rig(tmp_path, configure=loopback) as rig:
            api = OwnerApi(rig.config.owner, rig.gateway, clocks=rig.gateway.clocks)
            await api.start()
            try:
                await rig.run(2.0)
                now = rig.gateway.now()
                request = DispatchRequest("peak", "test", DispatchKind.DISCHARGE, 4_000, now, now + 600, now)
                await rig.gateway.submit(request)
                await rig.run(65.0)  # past the first energy report, ramped to the target
                config = write_config(tmp_path, api.address, Path(rig.config.owner.token_file))
                code_json = await asyncio.to_thread(cli.main, ["status", "--config", str(config), "--json"])
                doc = json.loads(capsys.readouterr().out)
                code_text = await asyncio.to_thread(cli.main, ["status", "--config", str(config)])
                text = capsys.readouterr().out
                return code_json, doc, code_text, text
            finally:
                await api.stop()

    with caplog.at_level(logging.DEBUG):
        code_json, doc, code_text, text = asyncio.run(main())
    assert code_json == 0 and code_text == 0
    assert doc["mode"] == "DISCHARGE" and doc["reason"].startswith("dispatch peak")
    assert 70 < doc["soc_pct"] <= 80 and doc["floor_pct"] == 42 and doc["reserve_pct"] == 40
    assert doc["setpoint_w"] == 4_000 and doc["power_w"] == pytest.approx(4_000)
    assert doc["event"]["id"] == "peak" and doc["event"]["answer"] == "accepted"
    assert doc["event"]["cap_w"] is None and doc["event"]["delivered_wh"] > 0
    assert doc["faults"] == [] and doc["storm_watch"] is None
    assert doc["links"]["bms"]["ok"] and doc["links"]["bms"]["age_s"] < 0.2
    assert doc["links"]["inverter"]["ok"] and doc["links"]["inverter"]["age_s"] <= 1.0
    assert doc["at"].startswith("2025-06-01T12:01")
    assert text.splitlines()[1:] == render(doc)[1:]  # the same document (its `at` a moment later)
    assert "mode:    DISCHARGE: dispatch peak" in text
    assert "links:   bms ok (last good 0.0 s ago); inverter ok" in text
    token = Path(tmp_path / "owner.token").read_text().strip()
    assert token not in caplog.text  # a secret never reaches a log line


def test_status_exits_2_when_no_gateway_answers(tmp_path, capsys):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    token = tmp_path / "owner.token"
    token.write_text("0" * 64 + "\n")
    token.chmod(0o600)
    config = write_config(tmp_path, f"127.0.0.1:{port}", token)
    assert cli.main(["status", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: status: no gateway answering on 127.0.0.1:") and "Traceback" not in err


def test_a_library_that_sets_its_own_level_on_import_stays_quiet(capsys):
    """openleadr's client module sets its logger to INFO when imported, after the log is set up:
    its per-second report chatter must still not reach the journal (its warnings may)."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging(verbose=False)
        import openleadr.client  # noqa: F401  (imported for its side effect on the level)

        logging.getLogger("openleadr").setLevel(logging.INFO)  # as its import does, whatever the order
        logging.getLogger("openleadr").info("Adding 0.0 to report")
        logging.getLogger("firmware_py.gateway.narration").info("mode STANDBY -> DISCHARGE")
        err = capsys.readouterr().err
        assert "Adding 0.0 to report" not in err and "mode STANDBY -> DISCHARGE" in err
    finally:
        root.handlers[:], root.level = saved


def test_run_says_its_lines_through_a_queue_and_loses_none_of_them(capsys):
    """`run` logs aside (the fault's 0 W is not kept waiting for the journal's pipe): inside, the
    gateway's log call only queues; when `run` ends, every line said was written, in order, and
    the root logger is as it was."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    narration = logging.getLogger("firmware_py.gateway.narration")
    try:
        with lines_written_aside(verbose=False):
            assert [type(h).__mro__[1].__name__ for h in root.handlers] == ["QueueHandler"]
            for n in range(500):
                narration.warning("fault raised: bms_fault (line %d)", n)
        assert (root.handlers, root.level) == saved  # as before: the stream may be closed now
        lines = [line for line in capsys.readouterr().err.splitlines() if "fault raised" in line]
        assert [line.rpartition("(line ")[2] for line in lines] == [f"{n})" for n in range(500)]
    finally:
        root.handlers[:], root.level = saved


def test_status_shows_when_the_envelope_reduces_power_and_what_blocks_dispatch():
    from firmware_py.core.telemetry import Telemetry
    from firmware_py.core.types import ReasonCode
    from firmware_py.status import status_document

    serving = Telemetry(at=10.0, mode=Mode.DISCHARGE, soc_pct=44.0, floor_pct=42.0, power_w=11_500.0,
                        setpoint_w=11_500.0, available_wh=400.0, active_event_id="sunspec-1-1",
                        verdict=Verdict.ACCEPTED, meter_wh=50.0, envelope_in_s=120.0, site_limit_w=11_500.0,
                        reserve_pct=40.0)
    doc = status_document(serving, {}, wall_now=1_750_000_000.0)
    assert doc["event"]["envelope_from"] == "2025-06-15T15:08:40Z" and doc["dispatch_blocked"] is None
    assert "envelope reduces power from 2025-06-15T15:08:40Z" in "\n".join(render(doc))
    blocked = replace(serving, active_event_id=None, refusal=ReasonCode.ENTER_SERVICE,
                      refusal_detail="grid back: export may resume in 212 s (enter-service delay)")
    doc = status_document(blocked, {}, wall_now=1_750_000_000.0)
    assert doc["dispatch_blocked"] == {"reason": "ENTER_SERVICE_DELAY",
                                       "detail": "grid back: export may resume in 212 s (enter-service delay)"}
    assert "dispatch: not followed now: ENTER_SERVICE_DELAY" in "\n".join(render(doc))


def test_status_says_which_figures_are_last_readings_of_a_silent_source():
    """The SoC of a silent BMS read like a live one; `fresh` (the core's judgement) says it is not."""
    from firmware_py.core.telemetry import Telemetry
    from firmware_py.status import status_document

    silent = Telemetry(at=10.0, mode=Mode.FAULT, soc_pct=44.0, floor_pct=42.0, power_w=0.0, setpoint_w=0.0,
                       available_wh=0.0, active_event_id=None, bms_fresh=False, inverter_fresh=True)
    doc = status_document(silent, {}, wall_now=1_750_000_000.0)
    assert doc["fresh"] == {"bms": False, "inverter": True}
    lines = render(doc)
    assert lines[2].startswith("SoC:     44 % (last reading: no fresh data)"), lines[2]
    assert "no fresh data" not in lines[3]  # the inverter's power is a reading of now
    assert "no fresh data" not in "\n".join(render({k: v for k, v in doc.items() if k != "fresh"}))  # an older gateway


def test_the_owner_apis_status_shows_this_months_credit_from_the_statements_own_code(tmp_path, capsys):
    """After an event, the status's `earnings` are the month statement's totals, to the cent."""
    async def main() -> tuple[dict, str]:
        def enrolled(config):
            return replace(config, owner=replace(config.owner, api_listen="127.0.0.1:0"),
                           program=replace(config.program, name="Peak Rewards", credit_per_kwh=100.0,
                                           wear_cost_per_kwh=1.0))

        async with Rig(tmp_path, configure=enrolled) as rig:
            api = OwnerApi(rig.config.owner, rig.gateway, clocks=rig.gateway.clocks)
            await api.start()
            try:
                await rig.run(2.0)
                earnings = rig.gateway.earnings
                assert rig.gateway.status()["earnings"] is None  # not read yet: nothing made up meanwhile
                await earnings.refresh()  # what the service's earnings task does at start
                assert rig.gateway.status()["earnings"]["events"] == 0
                now = rig.gateway.now()
                await rig.gateway.submit(DispatchRequest("peak", "test", DispatchKind.DISCHARGE, 4_000, now,
                                                         now + 90, now))
                await rig.run(70.0)
                rig.gateway.flush_journal(final=True)
                assert not earnings.due()  # its energy so far is journaled, but a running event is not read for
                await rig.run(25.0)
                rig.gateway.flush_journal(final=True)  # with the steps' batch, as `run` writes it each minute
                assert earnings.due()  # it ended
                await earnings.refresh()
                config = write_config(tmp_path, api.address, Path(rig.config.owner.token_file))
                assert await asyncio.to_thread(cli.main, ["status", "--config", str(config), "--json"]) == 0
                doc = json.loads(capsys.readouterr().out)
                assert await asyncio.to_thread(cli.main, ["status", "--config", str(config)]) == 0
                return doc, capsys.readouterr().out
            finally:
                await api.stop()

    doc, text = asyncio.run(main())
    earnings = doc["earnings"]
    statement_config = tmp_path / "statement.toml"
    statement_config.write_text(f'[journal]\npath = "{tmp_path / "journal.sqlite"}"\n[program]\n'
                                'name = "Peak Rewards"\ncredit_per_kwh = 100.0\nwear_cost_per_kwh = 1.0\n')
    assert cli.main(["statement", "--config", str(statement_config), "--month", "2025-06", "--format", "json"]) == 0
    statement = json.loads(capsys.readouterr().out)
    totals = statement["totals"]
    assert earnings["month"] == "2025-06" and earnings["currency"] == "USD" and earnings["program"] == "Peak Rewards"
    assert earnings["events_served"] == 1 and earnings["credit"] > 8.0  # ~90 s at 4 kW, at 100 USD/kWh
    for name in ("delivered_wh", "credited_wh", "throughput_wh", "credit", "wear_cost", "net"):
        assert earnings[name] == totals[name], name
    assert f"earned:  2025-06: credit {totals['credit']:,.2f} USD for" in text


def test_status_text_rounds_for_people_and_the_json_keeps_every_digit():
    from firmware_py.core.telemetry import Telemetry
    from firmware_py.status import status_document

    raw = Telemetry(at=10.0, mode=Mode.DISCHARGE, soc_pct=79.833333, floor_pct=42.123456, power_w=3_999.74,
                    setpoint_w=4_000.0, available_wh=4_567.891, active_event_id="peak", verdict=Verdict.ACCEPTED,
                    meter_wh=12.345678, reserve_pct=40.0, storm_watch_pct=75.25, storm_watch_until=3_610.0,
                    bms_fresh=True, inverter_fresh=True)
    doc = status_document(raw, {"bms": {"ok": True, "age_s": 0.0333}}, wall_now=1_750_000_000.0)
    assert doc["soc_pct"] == 79.833333 and doc["floor_pct"] == 42.123 and doc["event"]["delivered_wh"] == 12.345678
    text = "\n".join(render(doc))
    assert "SoC:     79.8 % (floor 42.1 %, reserve 40 %)" in text
    assert "power:   4,000 W measured, setpoint 4,000 W" in text
    assert "peak: accepted, 12.3 Wh delivered" in text and "keeping 75.2 % for an outage" in text
    assert "bms ok (last good 0.0 s ago)" in text
    assert "79.83" not in text and "42.12" not in text and "12.34" not in text


def test_the_status_document_carries_the_soc_the_bms_sent_without_a_binary_floats_tail():
    """796 × 0.1 from the DBC is 79.60000000000001: MQTT and `status --json` showed that tail."""
    from firmware_py.core.telemetry import Telemetry
    from firmware_py.status import status_document

    raw = Telemetry(at=10.0, mode=Mode.STANDBY, soc_pct=796 * 0.1, floor_pct=42.0, power_w=0.0, setpoint_w=0.0,
                    available_wh=0.0, active_event_id=None, bms_fresh=True)
    assert status_document(raw, {}, wall_now=1_750_000_000.0)["soc_pct"] == 79.6
    unread = Telemetry(at=10.0, mode=Mode.STANDBY, soc_pct=None, floor_pct=42.0, power_w=0.0, setpoint_w=0.0,
                       available_wh=0.0, active_event_id=None)
    assert status_document(unread, {}, wall_now=1_750_000_000.0)["soc_pct"] is None


class Peer:
    """A peer on api_listen that answers every request with `answer` (raw bytes), then `after(conn)`."""

    def __init__(self, answer: bytes, after=lambda conn: None) -> None:
        self.answer, self.after = answer, after
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(10)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(10)
            conn.recv(65536)
            try:
                conn.sendall(self.answer)
                self.after(conn)
            except OSError:
                pass

    def config(self, tmp_path: Path) -> Path:
        token = tmp_path / "owner.token"
        token.write_text("ab" * 32)
        token.chmod(0o600)
        return write_config(tmp_path, f"127.0.0.1:{self.sock.getsockname()[1]}", token)


def status_answered(doc: bytes, tmp_path: Path) -> int:
    """`status`'s exit code when a peer answers it 200 with `doc`."""
    peer = Peer(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(doc) + doc)
    try:
        return cli.main(["status", "--config", str(peer.config(tmp_path))])
    finally:
        peer.sock.close()


def test_status_refuses_an_answer_over_1_mib_as_no_gateway(tmp_path, capsys):
    """`response.read()` had no bound: a peer declaring 100 GB made `status` die of a MemoryError."""
    doc = json.dumps({"at": "x", "mode": "STANDBY", "reason": "r", "pad": "x" * (2 << 20)}).encode()
    assert status_answered(doc, tmp_path) == 2
    err = capsys.readouterr().err
    assert "is not a powershare-gw owner API (its answer is longer than 1 MiB)" in err and "Traceback" not in err


def test_status_gives_up_on_an_answer_that_drips_past_its_deadline(tmp_path):
    """A socket timeout bounds one read: a peer sending a byte at a time kept `status` running for ever.
    The clock is the test's: each look at it is a second later, so the 5 s deadline passes within a few
    reads of the drip, wherever the peer is (a clock the peer moved could move before the deadline was set)."""
    from firmware_py import config as gateway_config
    from firmware_py.owner.commands import Unreachable, call

    seconds = itertools.count()
    body = b" " * 60 + b'{"at": "x", "mode": "STANDBY", "reason": "r"}'

    def drip(conn: socket.socket) -> None:
        conn.settimeout(0.05)
        for byte in body:  # until the client gives up (the old code read it all, slowly, and was satisfied)
            conn.sendall(bytes([byte]))
            try:
                if conn.recv(1) == b"":
                    return
            except TimeoutError:
                pass

    peer = Peer(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body), drip)
    owner = gateway_config.load(peer.config(tmp_path)).owner
    try:
        with pytest.raises(Unreachable, match=r"no gateway answering on 127\.0\.0\.1:\d+ \(no whole answer within 5 s\)"):
            call(owner, "GET", "/api/status", wants=("at", "mode", "reason"), clock=lambda: float(next(seconds)))
    finally:
        peer.sock.close()


@pytest.mark.parametrize("field, value", [("power_w", '"lots"'), ("links.bms.age_s", '"x"'), ("event", '"peak"'),
                                          ("earnings.credit", "[1]"), ("soc_pct", "true")])
def test_status_refuses_a_document_with_a_field_of_the_wrong_type_naming_it(tmp_path, capsys, field, value):
    """`power_w` was formatted as a number unchecked: a peer sending a string made a traceback (exit 1)."""
    parts = {"power_w": "1", "links": '{"bms": {"ok": true, "age_s": 0.5}}', "event": "null",
             "earnings": '{"month": "2025-07", "credit": 1}', "soc_pct": "50"}
    top = field.split(".")[0]
    parts[top] = {"links.bms.age_s": f'{{"bms": {{"ok": true, "age_s": {value}}}}}',
                  "earnings.credit": f'{{"month": "2025-07", "credit": {value}}}'}.get(field, value)
    doc = ('{"at": "x", "mode": "STANDBY", "reason": "r", '
           + ", ".join(f'"{key}": {text}' for key, text in parts.items()) + "}").encode()
    json.loads(doc)  # the test's own document is JSON
    assert status_answered(doc, tmp_path) == 2
    err = capsys.readouterr().err
    assert "is not a powershare-gw owner API (its field " + field + " is " in err and "Traceback" not in err


@pytest.mark.parametrize("off_s", [-0.004, 0.0, 0.004])
def test_a_storm_watch_until_a_whole_minute_reads_that_minute_whatever_the_clocks_jitter(off_s):
    """Set until 01:46 on the wall clock, held on the core's monotonic clock and shown on the wall clock
    again: a few ms early, `status` said 01:45:59Z and the page 1:45."""
    from firmware_py.core.telemetry import Telemetry
    from firmware_py.status import status_document

    wall_now = 1_765_000_000.25  # a wall clock 0.25 s past a second, as it mostly is
    until = 1_765_003_560.0  # a whole minute, 59 min 59.75 s from now
    watched = Telemetry(at=100.0, mode=Mode.STANDBY, soc_pct=80.0, floor_pct=75.0, power_w=0.0, setpoint_w=0.0,
                        available_wh=0.0, active_event_id=None, storm_watch_pct=75.0,
                        storm_watch_until=100.0 + (until - wall_now) + off_s)
    shown = status_document(watched, {}, wall_now=wall_now)["storm_watch"]["until"]
    assert shown == datetime.fromtimestamp(until, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")



def test_mqtts_state_shows_an_opt_out_until_a_whole_minute_as_that_minute():
    """The same UTC text serves MQTT's state: its copy cut the seconds, so an opt-out set until 01:46 on the
    wall clock, held on the monotonic clock and read back a few ms early, was published as 01:45:59Z."""
    from firmware_py.clocks import Clocks
    from firmware_py.core.types import OwnerSettings
    from firmware_py.mqtt.state import _opt_out

    until = 1_765_003_560.0  # a whole minute
    clocks = Clocks(lambda: 100.0, lambda: 1_765_000_000.25)  # the wall clock 0.25 s past a second
    held = clocks.to_core(until) - 0.004  # as the owner store holds it, a few ms off
    shown = _opt_out(OwnerSettings(40.0, 0.0, opt_out_until=held), clocks, now=100.0)["until"]
    assert shown == datetime.fromtimestamp(until, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
