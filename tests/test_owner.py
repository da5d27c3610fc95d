"""Owner controls: the real API server on 127.0.0.1 or a Unix socket, driven by the real CLI.

A small recording port stands in for the running gateway (the runtime's side of
the `OwnerPort` contract): it holds the settings the core would use and records
every `set_owner` call, so each test checks what reached the gateway, what was
persisted, and what the owner was told.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import http.server
import json
import logging
import math
import os
import re
import socket
import stat
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from firmware_py import cli
from firmware_py.config import OwnerConfig
from firmware_py.core.types import Mode, OwnerSettings, PriceKind
from firmware_py.dispatch import Telemetry
from firmware_py.errors import InputError
from firmware_py.owner import changes, commands
from firmware_py.owner.access import ensure_token, parse_listen, read_token
from firmware_py.owner.api import OwnerApi
from firmware_py.owner.store import OwnerStore, decode, encode
from firmware_py.tasks import cancel_all

NOW = dt.datetime(2025, 6, 1, 12, 0, tzinfo=dt.timezone.utc).timestamp()
UTC = dt.timezone.utc


@dataclass
class RecordingPort:
    """The gateway's side of OwnerPort: current settings, a fixed clock, every change recorded."""

    settings: OwnerSettings
    clock: float = NOW
    calls: list[OwnerSettings] = field(default_factory=list)
    stopping: bool = False

    def owner_settings(self) -> OwnerSettings:
        return self.settings

    async def set_owner(self, settings: OwnerSettings) -> None:
        self.calls.append(settings)
        self.settings = settings

    def telemetry(self) -> Telemetry:
        return Telemetry(at=self.clock, mode=Mode.DISCHARGE, soc_pct=71.5, floor_pct=self.settings.reserve_pct + 2,
                         power_w=5000.0, setpoint_w=5000.0, available_wh=36_000.0, active_event_id="peak-1",
                         bms_fresh=True, inverter_fresh=True, last_power_w=5000.0)  # a gateway serving, its data live

    def now(self) -> float:
        return self.clock


class Serving:
    """Runs an OwnerApi on its own event loop thread, so the blocking CLI can talk to it."""

    def __init__(self, api: OwnerApi) -> None:
        self.api = api
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=5)

    def __enter__(self) -> OwnerApi:
        self.thread.start()
        try:
            self.call(self.api.start())
        except BaseException:
            self._close()
            raise
        return self.api

    def __exit__(self, *_: object) -> None:
        try:
            self.call(self.api.stop())
        finally:
            self._close()

    def _close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()


def owner_config(tmp_path: Path, listen: str) -> OwnerConfig:
    return OwnerConfig(api_listen=listen, token_file=str(tmp_path / "owner.token"),
                       settings_file=str(tmp_path / "owner-settings.json"))


def listen_for(kind: str, tmp_path: Path) -> str:
    return "127.0.0.1:0" if kind == "tcp" else f"unix:{tmp_path / 'owner.sock'}"


def start_port(cfg: OwnerConfig) -> RecordingPort:
    """What the runtime does at start-up: the core begins with the persisted settings."""
    return RecordingPort(OwnerStore(cfg.settings_file, cfg.reserve_pct).load(NOW))


def write_gateway_config(tmp_path: Path, address: str, token_file: str = "owner.token") -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(f'[owner]\napi_listen = "{address}"\ntoken_file = "{token_file}"\n', encoding="utf-8")
    return path


@pytest.fixture
def owner_cli(capsys):
    """Run `powershare-gw owner ...` through cli.main; returns (exit code, stdout, stderr)."""

    def run(config_file: Path, *argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = cli.main(["owner", "--config", str(config_file), *argv])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def request(api: OwnerApi, method: str, path: str, body: bytes | None = None,
            token: str | None = "from-file") -> tuple[int, dict]:
    """One raw HTTP request to the API, as any client would send it."""
    status, _, answer = exchange(api, method, path, body, token)
    return status, answer


def exchange(api: OwnerApi, method: str, path: str, body: bytes | None = None,
             token: str | None = "from-file") -> tuple[int, dict[str, str], dict]:
    """`request`, with the response's headers."""
    if token == "from-file":
        token = Path(api.config.token_file).read_text().strip()
    conn = commands._connection(parse_listen(api.address))
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), json.loads(response.read())
    finally:
        conn.close()


# --- the token ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_token_file_is_created_private_and_required(tmp_path, kind):
    cfg = owner_config(tmp_path, listen_for(kind, tmp_path))
    with Serving(OwnerApi(cfg, start_port(cfg))) as api:
        token_file = Path(cfg.token_file)
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text().strip()
        assert len(token) == 64 and int(token, 16) >= 0
        assert request(api, "GET", "/status", token=None)[0] == 401
        assert request(api, "GET", "/status", token="0" * 64)[0] == 401
        status, body = request(api, "PUT", "/reserve", b'{"pct": 90}', token=token[:-1])
        assert (status, body["error"]) == (401, "missing or wrong bearer token")
        assert api.port.calls == []
        status, body = request(api, "GET", "/status")
        assert status == 200 and body["settings"]["reserve_pct"] == 40
    with Serving(OwnerApi(cfg, start_port(cfg))):
        assert token_file.read_text().strip() == token, "a restart keeps the token"


FULL_DISK_FIRST_START = """
import resource, signal, sys
from firmware_py.errors import InputError
from firmware_py.owner.access import ensure_token
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (0, hard))
try:
    ensure_token(sys.argv[1])
except InputError as err:
    print(err)
"""


def test_a_token_that_cannot_be_written_leaves_no_file_and_the_next_start_makes_one(tmp_path):
    """A full disk at the first start once left an empty token file that refused every later start."""
    path = tmp_path / "owner.token"
    first = subprocess.run([sys.executable, "-c", FULL_DISK_FIRST_START, str(path)], capture_output=True,
                           text=True, timeout=30, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert first.stdout.startswith(f"{path}: cannot create the owner API token file"), first.stdout + first.stderr
    assert list(tmp_path.iterdir()) == []
    token = ensure_token(path)
    assert path.read_text() == token + "\n" and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ensure_token(path) == token and list(tmp_path.iterdir()) == [path]


def test_token_file_readable_by_others_is_refused(tmp_path):
    cfg = owner_config(tmp_path, "127.0.0.1:0")
    Path(cfg.token_file).write_text("ab" * 32 + "\n")
    os.chmod(cfg.token_file, 0o644)
    with pytest.raises(InputError, match=r"owner\.token: .*accessible by group or others \(mode 0644\).*chmod 600"):
        asyncio.run(OwnerApi(cfg, start_port(cfg)).start())


def test_private_token_file_planted_by_another_user_is_refused(tmp_path):
    """Mode 0600 is not enough: the file must belong to the user the gateway runs as."""
    cfg = owner_config(tmp_path, "127.0.0.1:0")
    Path(cfg.token_file).write_text("ab" * 32 + "\n")
    os.chmod(cfg.token_file, 0o600)
    stranger = 54_321
    if os.geteuid() == 0:  # root can plant it for real: chown to a uid that is not ours
        os.chown(cfg.token_file, stranger, stranger)
        start = OwnerApi(cfg, start_port(cfg)).start
        with pytest.raises(InputError, match=r"owner\.token: .*belongs to uid 54321, not to .*root.*planted"):
            asyncio.run(start())
    else:  # otherwise the file is ours: expect someone else instead
        with pytest.raises(InputError, match=r"owner\.token: .*belongs to .*not to uid 54321.*planted"):
            ensure_token(cfg.token_file, owner_uid=stranger)
    assert read_token(cfg.token_file) == "ab" * 32  # the CLI, which only reads it, is not the one refusing


def test_token_file_that_is_a_link_or_not_a_regular_file_is_refused(tmp_path):
    target = tmp_path / "real.token"
    target.write_text("ab" * 32 + "\n")
    os.chmod(target, 0o600)
    link = tmp_path / "link.token"
    link.symlink_to(target)
    with pytest.raises(InputError, match=r"link\.token: .*symbolic link"):
        ensure_token(link)
    fifo = tmp_path / "fifo.token"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(InputError, match=r"fifo\.token: .*not a regular file"):  # at once: no hang on the FIFO
        ensure_token(fifo)
    with pytest.raises(InputError, match="not an owner API token"):
        read_token(fifo)


def test_a_folder_as_the_token_file_is_named_as_such_not_to_be_deleted(tmp_path):
    """A folder named by mistake: "delete it and the gateway will create a new one" was the advice."""
    folder = tmp_path / "tokdir"
    folder.mkdir(mode=0o700)
    for read in (read_token, ensure_token):
        with pytest.raises(InputError) as caught:
            read(folder)
        assert str(caught.value) == (f"{folder}: a folder, not the owner API token file: owner.token_file must "
                                     "name a file (the gateway creates it at its first start)")


def test_token_file_that_is_not_a_token_is_refused(tmp_path):
    cfg = owner_config(tmp_path, "127.0.0.1:0")
    Path(cfg.token_file).write_text("hunter2\n")
    os.chmod(cfg.token_file, 0o600)
    with pytest.raises(InputError, match="not an owner API token"):
        asyncio.run(OwnerApi(cfg, start_port(cfg)).start())


@pytest.mark.parametrize("listen, reason", [
    ("0.0.0.0:8765", "only listens on loopback"),
    ("192.168.1.20:8765", "only listens on loopback"),
    ("gateway.local:8765", "not an IP address"),
    ("127.0.0.1", "expected HOST:PORT"),
    ("127.0.0.1:99999", "expected HOST:PORT"),
    ("unix:owner.sock", "must be absolute"),
])
def test_listen_address_off_loopback_is_refused(listen, reason):
    with pytest.raises(InputError, match=f"owner.api_listen: .*{reason}"):
        parse_listen(listen)


def test_loopback_addresses_are_accepted():
    assert parse_listen("[::1]:8765").describe() == "[::1]:8765"
    assert parse_listen("localhost:8765").port == 8765
    assert parse_listen("unix:/run/powershare/owner.sock").unix_path == "/run/powershare/owner.sock"


# --- every command through the CLI --------------------------------------------------------------

@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_each_command_reaches_the_gateway_and_persists(tmp_path, kind, owner_cli):
    cfg = owner_config(tmp_path, listen_for(kind, tmp_path))
    port = start_port(cfg)
    with Serving(OwnerApi(cfg, port, tz=UTC)) as api:
        gateway = write_gateway_config(tmp_path, api.address)

        assert owner_cli(gateway, "reserve", "55")[:2] == (0, "reserve set to 55 %\n")
        assert port.calls[-1] == OwnerSettings(reserve_pct=55, received_at=NOW)

        code, out, _ = owner_cli(gateway, "opt-out", "event", "peak-7")
        assert (code, out) == (0, "opted out of event(s) peak-7\n")
        assert port.calls[-1].opted_out(NOW, "peak-7") and not port.calls[-1].opted_out(NOW, "peak-8")

        code, out, _ = owner_cli(gateway, "opt-out", "until", "2025-06-01T18:00+00:00")
        assert code == 0 and out.startswith("opted out until ")
        assert port.calls[-1].opt_out_until == NOW + 6 * 3600

        assert owner_cli(gateway, "opt-out", "now")[:2] == (0, "opted out until revoked; opted out of event(s) peak-7\n")
        assert port.calls[-1].opt_out_until == math.inf

        assert owner_cli(gateway, "opt-out", "off")[:2] == (0, "not opted out\n")
        assert not port.calls[-1].opted_out(NOW, "peak-7")

        code, out, _ = owner_cli(gateway, "departure", "07:30", "80")
        assert code == 0 and out.endswith(", 80 % wanted\n")
        tomorrow_0730 = dt.datetime(2025, 6, 2, 7, 30, tzinfo=UTC).timestamp()
        assert (port.calls[-1].departure_at, port.calls[-1].departure_soc_pct) == (tomorrow_0730, 80)

        code, out, _ = owner_cli(gateway, "status")
        assert code == 0
        assert "reserve:      55 % (floor now 57 %)" in out
        assert "SoC:          71.5 %, 36,000 Wh available above the floor" in out
        assert "state:        DISCHARGE, power 5,000 W (setpoint 5,000 W)" in out
        assert "opt-out:      not opted out" in out
        assert "departure:    " in out and "80 % wanted" in out
        assert "active event: peak-1" in out
        assert len(port.calls) == 6
    last = port.calls[-1]

    restarted = start_port(cfg)
    assert restarted.settings == last, "settings persist across a restart"
    with Serving(OwnerApi(cfg, restarted, tz=UTC)) as api:
        assert owner_cli(write_gateway_config(tmp_path, api.address), "departure", "off")[:2] == (0, "departure: none\n")
        assert restarted.calls[-1].departure_at is None and restarted.calls[-1].reserve_pct == 55
    assert start_port(cfg).settings == restarted.calls[-1]
    leftovers = {p.name for p in tmp_path.iterdir()} - {"owner.token", "owner-settings.json", "gateway.toml"}
    assert leftovers == set(), "no temp files and no stale socket are left behind"


@pytest.mark.parametrize("argv, message", [
    (("reserve", "150"), "the gateway refused: pct: 150 is out of range (0 to 100)"),
    (("reserve", "-1"), "pct: -1 is out of range (0 to 100)"),
    (("reserve", "lots"), "owner reserve: expected a number, got 'lots'"),
    (("departure", "25:00", "80"), "time: expected HH:MM (00:00 to 23:59), got '25:00'"),
    (("departure", "07:30", "101"), "soc_pct: 101 is out of range (0 to 100)"),
    (("departure", "07:30"), "usage: departure HH:MM SOC_PCT"),
    (("departure", "off", "80"), "usage: departure off"),
    (("opt-out", "until", "2025-05-31T12:00+00:00"), "until: '2025-05-31T12:00+00:00' is not in the future"),
    (("opt-out", "until", "next tuesday"), "until: 'next tuesday' is not an ISO-8601 time"),
    (("opt-out", "event"), "usage: opt-out event ID"),
    (("opt-out", "now", "please"), "usage: opt-out now"),
    (("storm-watch", "80"), "usage: storm-watch FLOOR_PCT UNTIL"),
    (("storm-watch", "off", "2025-06-02T00:00"), "usage: storm-watch off"),
    (("storm-watch", "120", "2025-06-02T00:00+00:00"), "floor_pct: 120 is out of range (0 to 100)"),
    (("storm-watch", "80", "2025-05-31T00:00+00:00"), "until: '2025-05-31T00:00+00:00' is not in the future"),
    (("storm-watch", "80", "2025-07-01T00:00+00:00"), "is more than 14 days ahead"),
])
def test_bad_input_is_refused_with_exit_2_and_changes_nothing(tmp_path, owner_cli, argv, message):
    cfg = owner_config(tmp_path, "127.0.0.1:0")
    with Serving(OwnerApi(cfg, start_port(cfg))) as api:
        code, out, err = owner_cli(write_gateway_config(tmp_path, api.address), *argv)
        assert (code, out) == (2, "")
        assert message in err and "Traceback" not in err
        assert api.port.calls == []
    assert not Path(cfg.settings_file).exists()


@pytest.mark.parametrize("method, path, body, message", [
    ("PUT", "/reserve", b"{pct: 50", "request body is not valid JSON"),
    ("PUT", "/reserve", b"", "expected a JSON object with pct, got NoneType"),
    ("POST", "/reserve", b'{"pct": 50, "colour": "red"}', "unknown field(s) colour (expected: pct)"),
    ("PUT", "/reserve", b'{"pct": true}', "pct: expected a number 0 to 100, got True"),
    ("PUT", "/reserve", b'{"pct": "50"}', "pct: expected a number 0 to 100, got '50'"),
    ("PUT", "/reserve", b"[50]", "expected a JSON object with pct, got list"),
    ("PUT", "/opt-out", b'{"now": true, "event": "x"}', "give exactly one of"),
    ("PUT", "/opt-out", b'{"now": false}', "now: expected true, got False"),
    ("PUT", "/opt-out", b'{"event": ""}', "event: expected a non-empty event id"),
    ("PUT", "/opt-out", b'{"until": 1000}', "until: 1000 is not in the future"),
    ("POST", "/departure", b'{"soc_pct": 80}', "give one of time"),
    ("POST", "/departure", b'{"time": "07:30", "at": "2025-06-02T07:30:00Z", "soc_pct": 80}', "give one of time"),
    ("POST", "/departure", b'{"at": 1000, "soc_pct": 80}', "at: 1000 is not in the future"),
    ("POST", "/departure", b'{"at": 1e12, "soc_pct": 80}', "at: 1000000000000.0 is more than 2 days ahead"),
    ("POST", "/departure", b'{"at": "soon", "soc_pct": 80}', "at: 'soon' is not an ISO-8601 time"),
    ("POST", "/departure", b'{"time": "7:30pm", "soc_pct": 80}', "time: expected HH:MM"),
    ("PUT", "/storm-watch", b'{"floor_pct": 80}', "until: missing"),
    ("PUT", "/storm-watch", b'{"until": 1e10}', "floor_pct: missing"),
    ("PUT", "/storm-watch", b'{"floor_pct": 80, "until": "tonight"}', "until: 'tonight' is not an ISO-8601 time"),
    ("PUT", "/storm-watch", b'{"floor_pct": 80, "until": 1e10, "why": "storm"}', "unknown field(s) why"),
])
def test_bad_requests_get_400_with_a_clear_message(tmp_path, method, path, body, message):
    cfg = owner_config(tmp_path, "127.0.0.1:0")
    with Serving(OwnerApi(cfg, start_port(cfg))) as api:
        status, answer = request(api, method, path, body)
        assert status == 400 and message in answer["error"]
        assert api.port.calls == []


def test_a_body_over_4_kib_is_413_as_in_the_web_app_and_changes_nothing(tmp_path):
    cfg = owner_config(tmp_path, "127.0.0.1:0")
    with Serving(OwnerApi(cfg, start_port(cfg))) as api:
        status, answer = request(api, "PUT", "/reserve", b'{"pct": 1' + b"0" * 5000 + b"}")
        assert status == 413 and answer["error"] == "request body larger than 4096 bytes"
        assert api.port.calls == []


def test_unknown_path_and_method_answer_json_after_auth(tmp_path):
    cfg = owner_config(tmp_path, "127.0.0.1:0")
    with Serving(OwnerApi(cfg, start_port(cfg))) as api:
        assert request(api, "GET", "/secrets", token=None)[0] == 401
        assert request(api, "GET", "/secrets")[0] == 404
        status, headers, answer = exchange(api, "DELETE", "/reserve")
        assert (status, answer["error"]) == (405, "Method Not Allowed")
        assert set(headers["Allow"].split(",")) == {"PUT", "POST"}, headers  # which it takes (RFC 9110)


def test_api_accepts_epoch_until_and_post(tmp_path):
    cfg = owner_config(tmp_path, "127.0.0.1:0")
    with Serving(OwnerApi(cfg, start_port(cfg))) as api:
        status, answer = request(api, "POST", "/opt-out", json.dumps({"until": NOW + 60}).encode())
        assert status == 200 and answer["settings"]["opt_out_until"] == NOW + 60
        assert api.port.calls[-1].opted_out(NOW + 59) and not api.port.calls[-1].opted_out(NOW + 60)


# --- no gateway, wrong gateway, failed save ------------------------------------------------------

def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_no_gateway_answering_exits_2_as_status_does(tmp_path, owner_cli):
    """No gateway to ask is exit 2 with `error: owner: ...`, as `powershare-gw status` says it."""
    gateway = write_gateway_config(tmp_path, f"127.0.0.1:{free_tcp_port()}")
    code, _, err = owner_cli(gateway, "status")
    assert code == 2 and err.startswith("error: owner: no gateway answering on 127.0.0.1:")
    assert "has the gateway been started" in err and "Traceback" not in err

    (tmp_path / "owner.token").write_text("ab" * 32)
    code, _, err = owner_cli(gateway, "reserve", "50")
    assert code == 2 and err.startswith("error: owner: no gateway answering on 127.0.0.1:")

    unix_gateway = write_gateway_config(tmp_path, f"unix:{tmp_path / 'nobody.sock'}")
    code, _, err = owner_cli(unix_gateway, "status")
    assert code == 2 and f"error: owner: no gateway answering on unix:{tmp_path / 'nobody.sock'}" in err


class _NotTheGateway(http.server.BaseHTTPRequestHandler):
    """Another service on the owner API's address: any 200 or 404 it gives is no gateway's answer."""

    answer: tuple[int, bytes] = (200, b"<html>ok</html>")

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        status, body = self.answer
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_PUT = do_DELETE = do_GET  # noqa: N815

    def log_message(self, *args) -> None:
        pass


@pytest.mark.parametrize("status, body", [(200, b"<html>ok</html>"), (200, b"[1, 2]"), (200, b"{}"),
                                          (404, b"not found")])
def test_another_service_on_the_api_address_is_no_gateway_exit_2_never_a_made_up_state(
        tmp_path, owner_cli, capsys, status, body):
    """A 200 that is not the API's JSON printed `mode: None` with exit 0 (`status`) or a KeyError (`owner`)."""
    handler = type("Handler", (_NotTheGateway,), {"answer": (status, body)})
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        try:
            gateway = write_gateway_config(tmp_path, f"127.0.0.1:{server.server_address[1]}")
            (tmp_path / "owner.token").write_text("ab" * 32)
            for argv in (["status"], ["reserve", "50"]):
                code, out, err = owner_cli(gateway, *argv)
                assert code == 2 and "not a powershare-gw owner API" in err and "Traceback" not in err, err
            assert cli.main(["status", "--config", str(gateway)]) == 2
            printed = capsys.readouterr()
            assert "not a powershare-gw owner API" in printed.err and printed.out == ""
        finally:
            server.shutdown()


def impostor(uid: int) -> tuple[int, int, int]:
    """A listener on 127.0.0.1 run by `uid` (a fork of this process that gave up root): (its pid, its port, a pipe
    that gives every byte it received once it has read a request, answered 404 and ended)."""
    ports, received = os.pipe(), os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no imports, no threads, it leaves by os._exit whatever happens
        try:
            os.setgid(uid)
            os.setuid(uid)
            with socket.create_server(("127.0.0.1", 0)) as server:
                os.write(ports[1], str(server.getsockname()[1]).encode() + b"\n")
                server.settimeout(30)
                conn, _ = server.accept()
                conn.settimeout(5)
                data = b""
                with contextlib.suppress(OSError):
                    while b"\r\n\r\n" not in data and (chunk := conn.recv(4096)):
                        data += chunk
                    conn.sendall(b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                os.write(received[1], data)
        finally:
            os._exit(0)
    os.close(ports[1])
    os.close(received[1])
    with os.fdopen(ports[0]) as reader:
        port = int(reader.readline())
    return pid, port, received[0]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a listener as another user (CI runs as root)")
def test_the_token_is_never_sent_to_a_listener_another_user_runs(tmp_path, owner_cli):
    """While the gateway is stopped, another local user listens on its address: `owner status` sent the owner
    token (which also logs into the web app) and only then found no owner API there. It now asks the kernel
    whose the listening end is, and sends nothing to a user other than the token file's owner."""
    pid, port, received = impostor(65534)
    try:
        gateway = write_gateway_config(tmp_path, f"127.0.0.1:{port}")
        token = "ab" * 32
        (tmp_path / "owner.token").write_text(token)
        code, out, err = owner_cli(gateway, "status")
        assert code == 2 and out == "", (out, err)
        assert f"what listens on 127.0.0.1:{port} runs as user nobody (uid 65534), not as the gateway's user root " \
               f"(uid 0) (who owns {tmp_path / 'owner.token'}): the token is not sent to it" in err, err
        with os.fdopen(received, "rb") as reader:
            sent = reader.read()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
        os.waitpid(pid, 0)
    assert token.encode() not in sent and b"Authorization" not in sent, sent


def test_the_listener_of_a_connection_is_told_by_its_user(tmp_path):
    """The kernel's word on who listens: this process's own TCP (both families) and Unix listeners are ours."""
    from firmware_py.owner.peer import peer_uid

    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        with socket.create_server((host, 0), family=family) as server, \
                socket.create_connection(server.getsockname()[:2], timeout=5) as client:
            assert peer_uid(client) == os.geteuid()
            assert peer_uid(client, proc_net=tmp_path) is None  # no socket table to ask: not known
    path = str(tmp_path / "api.sock")
    with socket.socket(socket.AF_UNIX) as server, socket.socket(socket.AF_UNIX) as client:
        server.bind(path)
        server.listen()
        client.connect(path)
        assert peer_uid(client) == os.geteuid()


def test_wrong_token_exits_2_unauthorized(tmp_path, owner_cli):
    cfg = owner_config(tmp_path, "127.0.0.1:0")
    (tmp_path / "other.token").write_text("cd" * 32)
    with Serving(OwnerApi(cfg, start_port(cfg))) as api:
        code, _, err = owner_cli(write_gateway_config(tmp_path, api.address, "other.token"), "reserve", "90")
        assert code == 2 and "error: owner: unauthorized" in err and "other.token" in err
        assert api.port.calls == []


def test_a_change_that_cannot_be_saved_is_not_applied(tmp_path, owner_cli):
    (tmp_path / "not-a-dir").write_text("")
    cfg = OwnerConfig(api_listen="127.0.0.1:0", token_file=str(tmp_path / "owner.token"),
                      settings_file=str(tmp_path / "not-a-dir" / "owner-settings.json"))
    with Serving(OwnerApi(cfg, RecordingPort(OwnerSettings(40, NOW)))) as api:
        code, _, err = owner_cli(write_gateway_config(tmp_path, api.address), "reserve", "60")
        assert code == 1 and "could not save the owner settings" in err and "nothing changed" in err  # answered
        assert api.port.calls == []


def test_a_change_while_the_gateway_stops_is_refused_and_nothing_is_saved(tmp_path, owner_cli):
    """Once the stop began the core is stepped no more and the safe stop alone commands the inverter:
    a change then is answered 503 (the owner asks again once it runs), neither saved nor applied."""
    cfg = owner_config(tmp_path, "127.0.0.1:0")
    port = start_port(cfg)
    port.stopping = True
    with Serving(OwnerApi(cfg, port)) as api:
        code, _, err = owner_cli(write_gateway_config(tmp_path, api.address), "reserve", "60")
        assert code == 1 and "the gateway is stopping: nothing changed; ask again once it runs" in err
        assert request(api, "PUT", "/reserve", b'{"pct": 60}')[0] == 503
        assert request(api, "DELETE", "/opt-out")[0] == 503
    assert port.calls == [] and not Path(cfg.settings_file).exists()


def test_a_fault_of_the_gateways_own_is_a_json_500_in_one_log_line_without_its_message(tmp_path, caplog):
    """aiohttp's plain-text 500 and a traceback were the answer; the exception's message may quote a
    request's bytes (a token), so the log line names only its type and where it was raised."""
    class FailingPort(RecordingPort):
        def telemetry(self) -> Telemetry:
            raise RuntimeError("a message quoting secret-bytes")

    cfg = owner_config(tmp_path, "127.0.0.1:0")
    with caplog.at_level(logging.INFO), Serving(OwnerApi(cfg, FailingPort(OwnerSettings(40, NOW)))) as api:
        status, answer = request(api, "GET", "/status")
        assert request(api, "PUT", "/reserve", b'{"pct": 55}')[0] == 200  # it serves on
    assert status == 500 and answer == {"error": "internal error: the gateway's log has a line about it"}
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "owner API: GET /status failed: RuntimeError at test_owner.py:" in errors[0].getMessage()
    assert "secret-bytes" not in caplog.text and errors[0].exc_info is None


def test_missing_config_option_is_bad_input(owner_cli, monkeypatch, capsys):
    assert cli.main(["owner", "status"]) == 2
    assert "--config FILE is required" in capsys.readouterr().err


class StartedOwnerApi(OwnerApi):
    """The owner API, telling the test when `run` has bound its socket: an event to wait on,
    rather than looking for the socket file over and over."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.started = asyncio.Event()

    async def start(self) -> None:
        await super().start()
        self.started.set()


def test_run_serves_until_cancelled_and_removes_its_socket(tmp_path):
    cfg = owner_config(tmp_path, listen_for("unix", tmp_path))
    sock = tmp_path / "owner.sock"

    async def scenario() -> None:
        api = StartedOwnerApi(cfg, start_port(cfg))
        task = asyncio.create_task(api.run())
        await api.started.wait()  # bounded by the wait_for around the scenario
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        status, answer = await asyncio.to_thread(request, api, "GET", "/status")
        assert status == 200 and answer["floor_pct"] == 42 and answer["telemetry"]["active_event_id"] == "peak-1"
        await cancel_all([task])
        assert task.cancelled()

    asyncio.run(asyncio.wait_for(scenario(), 10))
    assert not sock.exists()


# --- departure times ---------------------------------------------------------------------------

MINUS_7 = dt.timezone(dt.timedelta(hours=-7))


@pytest.mark.parametrize("hhmm", ["\u0667:30", "07:0\u0665", "1\uff17:30"])
def test_a_departure_written_with_other_digits_than_ascii_is_refused(hhmm):
    """HH:MM is 0-9: '٧:30' (an Arabic-Indic seven) was taken as 07:30 from an API that documents ASCII."""
    with pytest.raises(changes.BadRequest, match="time: expected HH:MM"):
        changes.next_occurrence(hhmm, 0.0, MINUS_7)


@pytest.mark.parametrize("local_now, expected", [
    (dt.datetime(2025, 6, 1, 6, 0), dt.datetime(2025, 6, 1, 7, 30)),
    (dt.datetime(2025, 6, 1, 7, 30), dt.datetime(2025, 6, 2, 7, 30)),
    (dt.datetime(2025, 6, 1, 23, 59), dt.datetime(2025, 6, 2, 7, 30)),
    (dt.datetime(2025, 12, 31, 8, 0), dt.datetime(2026, 1, 1, 7, 30)),
])
def test_departure_is_the_next_occurrence_in_local_time(local_now, expected):
    now = local_now.replace(tzinfo=MINUS_7).timestamp()
    assert changes.next_occurrence("07:30", now, MINUS_7) == expected.replace(tzinfo=MINUS_7).timestamp()


def test_departure_across_a_daylight_saving_change_keeps_the_wall_clock_time():
    denver = ZoneInfo("America/Denver")
    now = dt.datetime(2025, 3, 8, 8, 0, tzinfo=denver).timestamp()  # MST; clocks spring forward that night
    at = changes.next_occurrence("07:30", now, denver)
    assert at == dt.datetime(2025, 3, 9, 13, 30, tzinfo=UTC).timestamp()  # 07:30 MDT
    assert at - now == 22.5 * 3600


@pytest.mark.parametrize("now_fold, expected", [
    (0, dt.datetime(2025, 11, 2, 5, 20, tzinfo=UTC)),  # 01:15 EDT: 01:20 EDT
    (1, dt.datetime(2025, 11, 2, 6, 20, tzinfo=UTC)),  # the second 01:15 (EST): 01:20 EST, not tomorrow's
])
def test_departure_in_the_hour_repeated_at_fall_back_is_the_next_pass(now_fold, expected):
    new_york = ZoneInfo("America/New_York")
    now = dt.datetime(2025, 11, 2, 1, 15, fold=now_fold, tzinfo=new_york).timestamp()
    assert changes.next_occurrence("01:20", now, new_york) == expected.timestamp()


def test_departure_at_a_time_skipped_at_spring_forward_is_after_the_jump():
    new_york = ZoneInfo("America/New_York")
    now = dt.datetime(2025, 3, 9, 1, 0, tzinfo=new_york).timestamp()  # 01:00 EST; 02:00 becomes 03:00
    assert changes.next_occurrence("02:30", now, new_york) == dt.datetime(2025, 3, 9, 7, 30, tzinfo=UTC).timestamp()


def test_departure_through_the_api_uses_the_gateway_clock(tmp_path):
    cfg = owner_config(tmp_path, "127.0.0.1:0")
    port = start_port(cfg)
    port.clock = dt.datetime(2025, 6, 1, 5, 0, tzinfo=MINUS_7).timestamp()
    with Serving(OwnerApi(cfg, port, tz=MINUS_7)) as api:
        status, _ = request(api, "PUT", "/departure", b'{"time": "06:15", "soc_pct": 90}')
    assert status == 200
    assert port.calls[-1].departure_at == dt.datetime(2025, 6, 1, 6, 15, tzinfo=MINUS_7).timestamp()
    assert port.calls[-1].received_at == port.clock


def test_departure_as_an_instant_is_the_owners_own_clock_whatever_the_gateways(tmp_path):
    """The web page works out the next 07:00 in the owner's time zone and sends that instant: a gateway
    in UTC read "07:00" as its own, the New York owner's 03:00."""
    cfg = owner_config(tmp_path, "127.0.0.1:0")
    port = start_port(cfg)
    port.clock = dt.datetime(2025, 6, 1, 5, 0, tzinfo=UTC).timestamp()
    new_york_7am = dt.datetime(2025, 6, 1, 7, 0, tzinfo=ZoneInfo("America/New_York"))
    with Serving(OwnerApi(cfg, port, tz=UTC)) as api:
        body = json.dumps({"at": new_york_7am.isoformat(), "soc_pct": 90}).encode()
        status, _ = request(api, "PUT", "/departure", body)
    assert status == 200 and port.calls[-1].departure_at == new_york_7am.timestamp()


# --- the settings file -------------------------------------------------------------------------

@pytest.mark.parametrize("content, reason", [
    ("{not json", "corrupt owner settings"),
    ('{"reserve_pct": 150}', "reserve_pct: 150 is out of range"),
    ('{"reserve_pct": 40, "opt_out_until": "soon"}', "opt_out_until: expected a number"),
    ('{"reserve_pct": 40, "departure_at": 1e9}', "must be set together"),
    ('{"reserve_pct": 40, "mood": "sunny"}', "unknown field(s) mood"),
    ("[]", "expected a JSON object"),
    ("", "corrupt owner settings"),
    ('{"reserve_pct": ' + "[" * 100_000 + "]" * 100_000 + "}", "corrupt owner settings"),  # json recurses
])
def test_corrupt_settings_file_is_an_input_error_naming_it(tmp_path, content, reason):
    path = tmp_path / "owner-settings.json"
    path.write_text(content)
    with pytest.raises(InputError) as caught:
        OwnerStore(path, 40).load(NOW)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and reason in message and "not reset silently" in message


def test_missing_settings_file_means_the_configured_reserve(tmp_path):
    assert OwnerStore(tmp_path / "absent.json", 35).load(NOW) == OwnerSettings(reserve_pct=35, received_at=NOW)


finite = st.floats(min_value=0, max_value=4e9, allow_nan=False)
settings_strategy = st.builds(
    OwnerSettings,
    reserve_pct=st.floats(0, 100),
    received_at=finite,
    opt_out_until=st.none() | finite | st.just(math.inf),
    opt_out_events=st.frozensets(st.text(min_size=1, max_size=20), max_size=4),
    departure_at=st.none(),
    departure_soc_pct=st.none(),
) | st.builds(OwnerSettings, reserve_pct=st.floats(0, 100), received_at=finite,
              departure_at=finite, departure_soc_pct=st.floats(0, 100)) \
    | st.builds(OwnerSettings, reserve_pct=st.floats(0, 100), received_at=finite,
                storm_watch_floor_pct=st.floats(0, 100), storm_watch_until=finite)


@given(settings_strategy)
def test_settings_survive_the_file_format(settings):
    assert decode(json.loads(json.dumps(encode(settings)))) == settings


def test_save_replaces_the_file_whole(tmp_path):
    store = OwnerStore(tmp_path / "s.json", 40)
    store.save(OwnerSettings(50, NOW, opt_out_until=math.inf))
    store.save(OwnerSettings(60, NOW + 1))
    assert store.load() == OwnerSettings(60, NOW + 1)
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]


def test_a_change_drops_opt_outs_and_departures_already_past():
    stale = OwnerSettings(40, NOW - 100, opt_out_until=NOW - 1, opt_out_events=frozenset({"e1"}),
                          departure_at=NOW - 1, departure_soc_pct=80)
    assert changes.set_reserve(stale, {"pct": 45}, NOW) == OwnerSettings(45, NOW, opt_out_events=frozenset({"e1"}))


def test_single_event_opt_outs_are_bounded_and_revoking_makes_room():
    full = OwnerSettings(40, NOW, opt_out_events=frozenset(f"e{n}" for n in range(changes.MAX_OPT_OUT_EVENTS)))
    with pytest.raises(changes.BadRequest, match=f"{changes.MAX_OPT_OUT_EVENTS} events are opted out of already"):
        changes.opt_out(full, {"event": "one-more"}, NOW, None)
    assert changes.opt_out(full, {"event": "e0"}, NOW, None).opt_out_events == full.opt_out_events  # kept
    assert changes.opt_out(changes.revoke_opt_out(full, NOW), {"event": "one-more"}, NOW, None).opt_out_events == \
        frozenset({"one-more"})


def test_an_event_opt_out_is_kept_without_the_spaces_a_phone_keyboard_adds(tmp_path):
    """"peak " from a phone was stored as is, matched no event "peak", and the truck discharged."""
    assert changes.opt_out(OwnerSettings(40, NOW), {"event": " peak  "}, NOW, None).opt_out_events == \
        frozenset({"peak"})
    cfg = owner_config(tmp_path, "127.0.0.1:0")
    with Serving(OwnerApi(cfg, start_port(cfg))) as api:  # the API (and MQTT, the page) share changes.opt_out
        status, answer = request(api, "PUT", "/opt-out", json.dumps({"event": "peak "}).encode())
        assert status == 200 and answer["settings"]["opt_out_events"] == ["peak"]
        assert api.port.calls[-1].opt_out_events == frozenset({"peak"})


def test_owner_without_an_action_is_bad_input(tmp_path, owner_cli):
    code, _, err = owner_cli(write_gateway_config(tmp_path, "127.0.0.1:1"))
    assert code == 2 and "give an action: status, reserve, opt-out, departure, storm-watch or price" in err


# --- hostile input: far-future times, huge numbers, deep nesting, oversized headers ---------------

@pytest.mark.parametrize("body, message", [
    (b'{"until": 1e12}', "is more than 366 days ahead"),
    (b'{"until": "9999-12-31T23:59:59-23:59"}', "is more than 366 days ahead"),
    (b'{"until": "' + b"2" * 500 + b'"}', "expected an ISO-8601 time or epoch seconds"),
    (b'{"event": "peak\\u001b[31m"}', "printable characters"),
])
def test_an_opt_out_out_of_bounds_is_refused_and_status_keeps_working(tmp_path, body, message):
    cfg = owner_config(tmp_path, "127.0.0.1:0")
    with Serving(OwnerApi(cfg, start_port(cfg))) as api:
        status, answer = request(api, "PUT", "/opt-out", body)
        assert status == 400 and message in answer["error"]
        assert api.port.calls == [] and not Path(cfg.settings_file).exists()
        assert request(api, "GET", "/status")[0] == 200


@pytest.mark.parametrize("body, message", [
    (b'{"pct": 1' + b"0" * 400 + b"}", "expected a number 0 to 100, got 1000"),
    (b"[" * 2000 + b"]" * 2000, "nested too deeply"),
])
def test_huge_numbers_and_deep_nesting_get_400_not_500(tmp_path, body, message):
    cfg = owner_config(tmp_path, "127.0.0.1:0")
    with Serving(OwnerApi(cfg, start_port(cfg))) as api:
        status, answer = request(api, "PUT", "/reserve", body)
        assert status == 400 and message in answer["error"] and len(answer["error"]) < 200


def test_a_header_over_8_kb_is_refused_in_one_log_line_without_traceback(tmp_path, caplog):
    cfg = owner_config(tmp_path, "127.0.0.1:0")
    with caplog.at_level(logging.INFO), Serving(OwnerApi(cfg, start_port(cfg))) as api:
        conn = commands._connection(parse_listen(api.address))
        try:
            conn.request("GET", "/status", headers={"X-Big": "a" * 9000})
            assert conn.getresponse().status == 400
        finally:
            conn.close()
    refusals = [r for r in caplog.records if "malformed request" in r.getMessage()]
    assert refusals and all(r.levelno == logging.INFO and r.exc_info is None for r in refusals)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_saved_time_beyond_any_calendar_is_corrupt_not_a_crash_later(tmp_path):
    path = tmp_path / "owner-settings.json"
    path.write_text('{"reserve_pct": 40, "opt_out_until": 1e15}')
    with pytest.raises(InputError, match="opt_out_until: 1000000000000000 is out of range"):
        OwnerStore(path, 40).load(NOW)


def test_status_prints_a_time_no_calendar_can_show_as_a_number():
    assert "s after the epoch" in commands.describe_opt_out({"opt_out_until": 1e15}, NOW)


@pytest.mark.parametrize("special", ["/dev/zero", "fifo", "dir"])
def test_a_settings_path_that_is_not_a_regular_file_is_refused(tmp_path, special):
    path = {"/dev/zero": Path("/dev/zero"), "fifo": tmp_path / "fifo", "dir": tmp_path}[special]
    if special == "fifo":
        os.mkfifo(path)
    with pytest.raises(InputError, match="must be a regular file"):
        OwnerStore(path, 40).load(NOW)


# --- storm watch -----------------------------------------------------------------------------------


def test_storm_watch_through_the_cli_reaches_the_gateway_persists_and_clears(tmp_path, owner_cli):
    cfg = owner_config(tmp_path, "127.0.0.1:0")
    port = start_port(cfg)
    with Serving(OwnerApi(cfg, port, tz=UTC)) as api:
        gateway = write_gateway_config(tmp_path, api.address)
        code, out, err = owner_cli(gateway, "storm-watch", "85", "2025-06-02T18:00+00:00")
        assert code == 0 and out.startswith("storm watch: keeping 85 % for an outage until "), err
        until = dt.datetime(2025, 6, 2, 18, 0, tzinfo=UTC).timestamp()
        assert (port.calls[-1].storm_watch_floor_pct, port.calls[-1].storm_watch_until) == (85, until)
        assert port.calls[-1].storm_watch(NOW) == 85 and port.calls[-1].storm_watch(until) is None
        assert "storm watch:  keeping 85 % for an outage until" in owner_cli(gateway, "status")[1]
        assert start_port(cfg).settings == port.calls[-1], "the storm watch persists across a restart"
        assert owner_cli(gateway, "storm-watch", "off")[:2] == (0, "storm watch: off\n")
        assert port.calls[-1].storm_watch_floor_pct is None and port.calls[-1].reserve_pct == 40
    assert start_port(cfg).settings.storm_watch_until is None


def test_a_version_1_settings_file_is_still_read(tmp_path):
    path = tmp_path / "owner-settings.json"
    path.write_text(json.dumps({"version": 1, "reserve_pct": 55, "received_at": NOW, "opt_out_until": None,
                                "opt_out_events": ["e1"], "departure_at": None, "departure_soc_pct": None}))
    assert OwnerStore(path, 40).load() == OwnerSettings(55, NOW, opt_out_events=frozenset({"e1"}))
    OwnerStore(path, 40).save(OwnerSettings(55, NOW, storm_watch_floor_pct=80, storm_watch_until=NOW + 60))
    assert json.loads(path.read_text())["version"] == 3


@pytest.mark.parametrize("content, reason", [
    ('{"version": 4, "reserve_pct": 40}', "version: expected one of 1, 2, 3, got 4"),
    ('{"reserve_pct": 40, "price_kind": "CHEAP"}', "price_kind: expected one of PRICE, EXPORT_PRICE"),
    ('{"reserve_pct": 40, "price_threshold_per_kwh": -1}', "price_threshold_per_kwh: -1 is out of range"),
    ('{"reserve_pct": 40, "storm_watch_floor_pct": 80}', "must be set together"),
    ('{"reserve_pct": 40, "storm_watch_floor_pct": 180, "storm_watch_until": 1e9}', "out of range"),
])
def test_a_bad_storm_watch_in_the_settings_file_is_corrupt(tmp_path, content, reason):
    path = tmp_path / "owner-settings.json"
    path.write_text(content)
    with pytest.raises(InputError, match=reason):
        OwnerStore(path, 40).load(NOW)


def test_an_expired_storm_watch_is_dropped_by_the_next_change():
    stale = OwnerSettings(40, NOW - 100, storm_watch_floor_pct=80, storm_watch_until=NOW - 1)
    assert changes.set_reserve(stale, {"pct": 45}, NOW) == OwnerSettings(45, NOW)


def test_a_storm_watch_may_end_at_the_same_local_time_14_days_on_across_a_clock_change(local_zone):
    """A storm watch's "at most 14 days ahead" counts days on the owner's clock: across the fall-back night those
    14 days are 14 × 24 h + 1 h, and the same time on the 14th day is within them; a minute later is not."""
    berlin = local_zone("Europe/Berlin")
    now = dt.datetime(2025, 10, 20, 18, 0, tzinfo=berlin).timestamp()
    watch = changes.set_storm_watch(OwnerSettings(40, NOW), {"floor_pct": 85, "until": "2025-11-03T18:00"}, now, None)
    assert watch.storm_watch_until == dt.datetime(2025, 11, 3, 18, 0, tzinfo=berlin).timestamp()
    with pytest.raises(changes.BadRequest, match="is more than 14 days ahead; a storm watch lasts at most"):
        changes.set_storm_watch(OwnerSettings(40, NOW), {"floor_pct": 85, "until": "2025-11-03T18:01"}, now, None)


def test_a_storm_watch_may_last_14_times_24_hours_across_the_spring_change(local_zone):
    """Across the spring-forward night 14 calendar days are 335 h: 336 h (14 × 24 h, the longest storm watch
    MQTT's ON asks for) is within "14 days ahead" too; a minute more is not."""
    berlin = local_zone("Europe/Berlin")
    now = dt.datetime(2026, 3, 20, 12, 0, tzinfo=berlin).timestamp()
    watch = changes.set_storm_watch(OwnerSettings(40, NOW), {"floor_pct": 85, "until": now + 336 * 3600}, now, None)
    assert watch.storm_watch_until == now + 336 * 3600
    with pytest.raises(changes.BadRequest, match="is more than 14 days ahead"):
        changes.set_storm_watch(OwnerSettings(40, NOW), {"floor_pct": 85, "until": now + 336 * 3600 + 60}, now, None)


# --- price-responsive mode ---------------------------------------------------------------------------


def test_price_mode_through_the_cli_reaches_the_gateway_persists_and_turns_off(tmp_path, owner_cli):
    cfg = owner_config(tmp_path, "127.0.0.1:0")
    port = start_port(cfg)
    with Serving(OwnerApi(cfg, port, tz=UTC)) as api:
        gateway = write_gateway_config(tmp_path, api.address)
        code, out, err = owner_cli(gateway, "price", "0.30", "10000")
        assert (code, out) == (0, "price mode: discharging while EXPORT_PRICE >= 0.3 per kWh, at as much power as "
                                  "the limits allow, up to 10,000 Wh a day\n"), err
        s = port.calls[-1]
        assert (s.price_threshold_per_kwh, s.price_max_wh_per_day, s.price_kind, s.price_power_w) == (
            0.30, 10_000, PriceKind.EXPORT_PRICE, None) and s.price_mode
        code, out, _ = owner_cli(gateway, "price", "0.5", "2000", "--kind", "PRICE", "--power-w", "5000")
        assert code == 0 and "PRICE >= 0.5 per kWh, at 5,000 W, up to 2,000 Wh a day" in out
        assert "price mode:   discharging while PRICE >= 0.5" in owner_cli(gateway, "status")[1]
        assert start_port(cfg).settings == port.calls[-1], "price mode persists across a restart"
        assert owner_cli(gateway, "price", "off")[:2] == (0, "price mode: off\n")
        assert not port.calls[-1].price_mode and port.calls[-1].price_kind is PriceKind.PRICE  # kept for next time
        assert "price mode:   off" in owner_cli(gateway, "status")[1]


@pytest.mark.parametrize("argv, message", [
    (("price", "0.30"), "usage: price THRESHOLD_PER_KWH MAX_WH_PER_DAY"),
    (("price", "cheap", "100"), "price THRESHOLD_PER_KWH: expected a number, got 'cheap'"),
    (("price", "-0.1", "100"), "threshold_per_kwh: -0.1 is out of range (0 to 1000)"),
    (("price", "0.3", "0"), "max_wh_per_day: 0 is out of range (1 to 1,000,000)"),
    (("price", "0.3", "100", "--power-w", "-5"), "power_w: -5 is out of range (1 to 1,000,000)"),
    # the refused value as typed, not rounded by `:g` into the limit itself ("1e+06 is out of range (1 to 1e+06)")
    (("price", "0.3", "1000001"), "max_wh_per_day: 1000001 is out of range (1 to 1,000,000)"),
    (("price", "0.3", "100", "--power-w", "99999999"), "power_w: 99999999 is out of range (1 to 1,000,000)"),
    (("price", "0.3", "100", "--power-w", "1000000.5"), "power_w: 1000000.5 is out of range (1 to 1,000,000)"),
    (("price", "off", "100"), "usage: price off"),
])
def test_a_bad_price_setting_is_refused_with_its_reason_and_exit_2(tmp_path, owner_cli, argv, message):
    cfg = owner_config(tmp_path, "127.0.0.1:0")
    port = start_port(cfg)
    with Serving(OwnerApi(cfg, port, tz=UTC)) as api:
        code, out, err = owner_cli(write_gateway_config(tmp_path, api.address), *argv)
    assert code == 2 and message in err and out == "", err
    assert not any(call.price_mode for call in port.calls)


@pytest.mark.parametrize("body, message", [
    ({"threshold_per_kwh": 0.3}, "max_wh_per_day: missing"),
    ({"threshold_per_kwh": True, "max_wh_per_day": 10}, "threshold_per_kwh: expected a price per kWh"),
    ({"threshold_per_kwh": 0.3, "max_wh_per_day": 10, "kind": "CHEAP"}, "kind: expected one of PRICE, EXPORT_PRICE"),
    ({"threshold_per_kwh": 0.3, "max_wh_per_day": 10, "colour": "red"}, "unknown field(s) colour"),
    ({"threshold_per_kwh": 0.3, "max_wh_per_day": float("nan")}, "max_wh_per_day: expected a number of Wh"),
    # above 0 yet shown as 0: a mode that looks set and never discharges
    ({"threshold_per_kwh": 0.3, "max_wh_per_day": 1e-300}, "max_wh_per_day: 1e-300 is out of range (1 to 1,000,000)"),
    ({"threshold_per_kwh": 0.3, "max_wh_per_day": 10, "power_w": 0.2}, "power_w: 0.2 is out of range (1 to 1,000,000)"),
])
def test_price_mode_rules_refuse_what_cannot_mean_anything(body, message):
    with pytest.raises(changes.BadRequest, match=re.escape(message)):
        changes.set_price_mode(OwnerSettings(40, NOW), body, NOW)


def test_a_price_change_without_power_w_keeps_the_limit_set_before_and_null_lifts_it():
    """The web page has no power field and sent back the limit it had read, undoing one set since (the
    command line, MQTT); a missing `power_w` now keeps the current one, as a missing `kind` does."""
    limited = changes.set_price_mode(OwnerSettings(40, NOW), {"threshold_per_kwh": 0.3, "max_wh_per_day": 10_000,
                                                              "kind": "PRICE", "power_w": 3000}, NOW)
    again = changes.set_price_mode(limited, {"threshold_per_kwh": 0.35, "max_wh_per_day": 10_000}, NOW)
    assert (again.price_threshold_per_kwh, again.price_kind, again.price_power_w) == (0.35, PriceKind.PRICE, 3000)
    lifted = changes.set_price_mode(again, {"threshold_per_kwh": 0.35, "max_wh_per_day": 10_000, "power_w": None}, NOW)
    assert lifted.price_power_w is None
    assert changes.set_price_mode(OwnerSettings(40, NOW), {"threshold_per_kwh": 0.3, "max_wh_per_day": 1},
                                  NOW).price_power_w is None  # no limit at first


def test_the_cli_keeps_the_power_limit_unless_told_and_max_lifts_it(tmp_path, owner_cli):
    cfg = owner_config(tmp_path, "127.0.0.1:0")
    port = start_port(cfg)
    with Serving(OwnerApi(cfg, port, tz=UTC)) as api:
        gateway = write_gateway_config(tmp_path, api.address)
        assert owner_cli(gateway, "price", "0.3", "1000", "--power-w", "4000")[0] == 0
        code, out, err = owner_cli(gateway, "price", "0.4", "1000")
        assert code == 0 and "at 4,000 W" in out and port.calls[-1].price_power_w == 4000, err
        code, out, err = owner_cli(gateway, "price", "0.4", "1000", "--power-w", "max")
        assert code == 0 and "at as much power as the limits allow" in out, err
        assert port.calls[-1].price_power_w is None


# --- a slow answer, negative zero, a time before any clock ---------------------------------------------------


class SlowPort(RecordingPort):
    """The gateway's side when the inverter link is slow: the core has the change at once (as
    `Gateway.feed` does), then `set_owner` waits on the inverter write until `released`."""

    def __init__(self, settings: OwnerSettings) -> None:
        super().__init__(settings)
        self.released = asyncio.Event()

    async def set_owner(self, settings: OwnerSettings) -> None:
        await super().set_owner(settings)
        await self.released.wait()


def test_a_change_whose_answer_is_late_is_no_answer_exit_1_not_no_gateway(tmp_path, owner_cli, monkeypatch):
    """A read timeout after the change was sent was "no gateway answering" (exit 2) while the reserve was
    saved and in the core: the owner is told it may have been made and how to look."""
    monkeypatch.setattr(commands, "answer_wait_s", lambda inverter_timeout_s: 0.3, raising=False)
    cfg = owner_config(tmp_path, "127.0.0.1:0")
    port = SlowPort(start_port(cfg).settings)
    serving = Serving(OwnerApi(cfg, port))
    with serving as api:
        try:
            gateway = write_gateway_config(tmp_path, api.address)
            code, _, err = owner_cli(gateway, "reserve", "80")
            assert code == 1, err
            assert "did not answer within 0.3 s" in err and "the change may have been made" in err
            assert "owner status" in err and "no gateway answering" not in err
            assert port.settings.reserve_pct == 80.0
            assert json.loads(Path(cfg.settings_file).read_text())["reserve_pct"] == 80.0
            code, out, _ = owner_cli(gateway, "status")
            assert code == 0 and "reserve:      80 %" in out
        finally:
            serving.loop.call_soon_threadsafe(port.released.set)


def test_the_wait_for_a_changes_answer_outlasts_the_inverter_exchanges_it_may_wait_on():
    """The API answers a change after the inverter write (`Gateway.set_owner`): a fixed 5 s was shorter
    than one exchange at `[inverter] timeout_s` 30."""
    assert commands.answer_wait_s(1.0) >= 5.0 + 4 * 1.5
    assert commands.answer_wait_s(30.0) >= 4 * 30.5


@pytest.mark.parametrize("argv, field", [(["reserve", "-0"], "reserve_pct"),
                                         (["storm-watch", "-0", "2025-06-02T12:00"], "storm_watch_floor_pct"),
                                         (["price", "-0", "1000"], "price_threshold_per_kwh")])
def test_negative_zero_is_zero_shown_and_saved(tmp_path, owner_cli, argv, field):
    """`reserve -0` was taken, shown as "-0 %" and -0.0 was written to the settings file."""
    cfg = owner_config(tmp_path, "127.0.0.1:0")
    with Serving(OwnerApi(cfg, start_port(cfg), tz=UTC)) as api:
        code, out, err = owner_cli(write_gateway_config(tmp_path, api.address), *argv)
        assert code == 0, err
        assert " -0 " not in f" {out} " and ">= -0 " not in out, out
        saved = json.loads(Path(cfg.settings_file).read_text())[field]
        assert saved == 0 and math.copysign(1.0, saved) == 1.0
        assert math.copysign(1.0, getattr(api.port.settings, field)) == 1.0


def test_a_saved_negative_zero_reads_as_zero(tmp_path):
    """A file written before -0 was refused still reads as a plain 0 (not shown as "-0 %")."""
    data = encode(OwnerSettings(40, NOW))
    data["reserve_pct"] = -0.0
    settings = decode(data)
    assert settings.reserve_pct == 0 and math.copysign(1.0, settings.reserve_pct) == 1.0


@pytest.mark.parametrize("tz", [None, UTC])
def test_a_time_long_past_is_not_in_the_future_not_malformed(tz):
    """Year 1 in the system's local time cannot be placed by the clock: it was called "not an ISO-8601 time"."""
    with pytest.raises(changes.BadRequest, match="is not in the future"):
        changes.opt_out(OwnerSettings(40, NOW), {"until": "0001-01-01T00:00"}, NOW, tz)
    with pytest.raises(changes.BadRequest, match="is not an ISO-8601 time"):
        changes.opt_out(OwnerSettings(40, NOW), {"until": "0001-13-01T00:00"}, NOW, tz)


def test_owner_status_marks_the_figures_of_a_silent_source_as_last_readings():
    """An inverter that stopped answering at -3.9 kW (charging) read "power 0 W", never measured; a silent BMS's
    SoC read as one of now. Both are their last readings, said so, as `status` says it."""
    telemetry = {"mode": "FAULT", "soc_pct": 79.5, "available_wh": 0.0, "power_w": 0.0, "last_power_w": -3_924.0,
                 "setpoint_w": 0.0, "bms_fresh": False, "inverter_fresh": False, "active_event_id": None}
    answer = {"settings": {"reserve_pct": 49.0}, "telemetry": telemetry, "now": 0.0, "floor_pct": 97.0}
    soc, state = commands.describe_status(answer)[1:3]
    assert soc.startswith("SoC:          79.5 % (last reading: no fresh data), 0 Wh")
    assert state == "state:        FAULT, power -3,924 W (last reading: no fresh data) (setpoint 0 W)"
    fresh = {**telemetry, "bms_fresh": True, "inverter_fresh": True, "power_w": 5_000.0, "last_power_w": 5_000.0}
    assert "last reading" not in "".join(commands.describe_status({**answer, "telemetry": fresh}))
