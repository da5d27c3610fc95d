"""Debian's mosquitto as the tests' MQTT broker, and a client that watches what reaches it.

`Mosquitto` runs the real broker as a child process on 127.0.0.1 with a config file
written here (anonymous, or a password file made by `mosquitto_passwd`; TLS with a
certificate the test made), and can stop and start it again on the same port, as a
broker restart would. It waits for the broker's own "running" log line, never on a
sleep. `.ci/run` installs the package; elsewhere the tests skip, saying so, unless
CI_REQUIRE_MOSQUITTO=1.

`Watcher` is an independent subscriber (aiomqtt, its own connection) that keeps every
message in order and lets a test wait for one that satisfies a predicate, bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from children import ChildOutput, spawn
from firmware_py.sim.ports import free_port

from firmware_py.tasks import cancel_all

MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
PASSWD = shutil.which("mosquitto_passwd")
START_S = 10.0
WAIT_S = 10.0
RUNNING = r"mosquitto version \S+ running"


TEST_S = 60.0
"""The most one test's asyncio part may take: a hang becomes a failure showing where it waited."""


def bounded(main: Any) -> Any:
    """`asyncio.run(main)` within `TEST_S`."""
    return asyncio.run(asyncio.wait_for(main, TEST_S))


def require_mosquitto() -> str:
    """The broker's path, or a skip (a failure in CI, where `.ci/run` installs it)."""
    if MOSQUITTO is None:
        if os.environ.get("CI_REQUIRE_MOSQUITTO") == "1":
            pytest.fail("mosquitto is not installed (apt-get install mosquitto); CI requires it")
        pytest.skip("mosquitto is not installed (Debian: apt-get install mosquitto); .ci/run installs it")
    return MOSQUITTO


@dataclass
class Tls:
    """PEM files for a TLS listener: the CA a client trusts, the broker's certificate and key."""

    ca: Path
    cert: Path
    key: Path
    require_certificate: bool = False  # clients must present one the CA signed


class Mosquitto:
    """One broker on 127.0.0.1:`port`, restartable on the same port."""

    def __init__(self, tmp: Path, *, users: dict[str, str] | None = None, tls: Tls | None = None) -> None:
        self.binary = require_mosquitto()
        self.tmp, self.users, self.tls = tmp, users or {}, tls
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.output: ChildOutput | None = None
        self.starts = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _config(self) -> Path:
        lines = [f"listener {self.port} 127.0.0.1", "persistence false", "log_dest stderr",
                 f"user {getpass.getuser()}",  # as root it would become `mosquitto`, who cannot read tmp
                 "log_type error", "log_type warning", "log_type notice", "log_type information",
                 "set_tcp_nodelay true"]
        if self.users:
            passwords = self.tmp / "mosquitto.passwd"
            passwords.write_text("")
            for user, secret in self.users.items():
                subprocess.run([PASSWD or "mosquitto_passwd", "-b", str(passwords), user, secret], check=True,
                               capture_output=True, timeout=10)
            lines += ["allow_anonymous false", f"password_file {passwords}"]
        else:
            lines.append("allow_anonymous true")
        if self.tls:
            lines += [f"cafile {self.tls.ca}", f"certfile {self.tls.cert}", f"keyfile {self.tls.key}"]
            if self.tls.require_certificate:
                lines.append("require_certificate true")
        path = self.tmp / "mosquitto.conf"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start(self) -> None:
        """Start the broker and return once it says it is running (a bound wait on its output)."""
        self.starts += 1
        self.proc, self.output = spawn([self.binary, "-c", str(self._config())],
                                       self.tmp / f"mosquitto-{self.starts}.log")
        self.output.wait_for_line(RUNNING, START_S)
        self.output.wait_for_line(rf"Opening ipv4 listen socket on port {self.port}", START_S)

    def pause(self) -> None:
        """SIGSTOP: the broker keeps every connection open and answers nothing (a stalled broker)."""
        assert self.proc is not None and self.proc.poll() is None
        self.proc.send_signal(signal.SIGSTOP)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """End the broker with `sig` (SIGKILL: as a crash; a paused one too) and reap it, bounded."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        if self.output is not None:
            self.output.join()

    def log(self) -> str:
        return self.output.text() if self.output else ""


@contextlib.contextmanager
def running_broker(tmp: Path, **options: Any):
    broker = Mosquitto(tmp, **options)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@dataclass(frozen=True)
class Seen:
    """One message the watcher received."""

    topic: str
    payload: bytes
    retain: bool

    def json(self) -> Any:
        return json.loads(self.payload)


class Watcher:
    """A subscriber of its own on the broker: every message, in order, and bounded waits for one."""

    def __init__(self, broker: Mosquitto, topics: tuple[str, ...] = ("#",), **client: Any) -> None:
        self.broker, self.topics, self.client_options = broker, topics, client
        self.seen: list[Seen] = []
        self._changed = asyncio.Condition()
        self._task: asyncio.Task | None = None
        self._client: aiomqtt.Client | None = None
        self._subscribed = asyncio.Event()

    async def __aenter__(self) -> Watcher:
        self._task = asyncio.create_task(self._listen())
        await asyncio.wait_for(self._subscribed.wait(), WAIT_S)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is None:
            return
        await cancel_all([self._task])
        if not self._task.cancelled():
            with contextlib.suppress(aiomqtt.MqttError):
                self._task.result()

    async def _listen(self) -> None:
        nodelay = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)
        async with aiomqtt.Client("127.0.0.1", self.broker.port, socket_options=nodelay,
                                  **self.client_options) as client:
            self._client = client
            for topic in self.topics:
                await client.subscribe(topic, qos=1)
            self._subscribed.set()
            async for message in client.messages:
                payload = message.payload if isinstance(message.payload, bytes) else str(message.payload).encode()
                async with self._changed:
                    self.seen.append(Seen(str(message.topic), payload, message.retain))
                    self._changed.notify_all()

    async def publish(self, topic: str, payload: bytes | str, *, retain: bool = False) -> None:
        assert self._client is not None
        await self._client.publish(topic, payload, qos=1, retain=retain)

    async def wait_for(self, what: str, predicate: Callable[[Seen], bool], *, after: int = 0,
                       timeout: float = WAIT_S) -> Seen:
        """The first message from index `after` on that satisfies `predicate`; fails after `timeout`."""
        async def found() -> Seen:
            async with self._changed:
                index = after
                while True:
                    for message in self.seen[index:]:
                        if predicate(message):
                            return message
                    index = len(self.seen)
                    await self._changed.wait()
        try:
            return await asyncio.wait_for(found(), timeout)
        except TimeoutError:
            shown = "\n".join(f"  {m.topic}: {m.payload[:200]!r}" for m in self.seen[-15:])
            pytest.fail(f"no message {what} within {timeout} s; the last ones:\n{shown}")

    def on(self, topic: str) -> list[Seen]:
        return [m for m in self.seen if m.topic == topic]


PUBACK = 4
"""The MQTT control packet type of a QoS 1 acknowledgement (the high nibble of its first byte)."""


class AcksHeldProxy:
    """A relay on 127.0.0.1 between a client and the broker that, once `holding`, keeps the broker's PUBACKs from
    the client: a broker far away or slow to acknowledge, whose acknowledgements come after the client gave up
    waiting. Everything else passes at once, whole packets at a time."""

    def __init__(self, broker: Mosquitto) -> None:
        self.broker = broker
        self.holding = False
        self.held: list[bytes] = []
        self._server: asyncio.Server | None = None
        self._relays: list[asyncio.Task] = []

    @property
    def address(self) -> str:
        assert self._server is not None
        return f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def __aenter__(self) -> AcksHeldProxy:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await cancel_all(self._relays)

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self._relays.append(asyncio.current_task())
        broker_reader, broker_writer = await asyncio.open_connection("127.0.0.1", self.broker.port)
        try:
            await asyncio.gather(self._up(client_reader, broker_writer), self._down(broker_reader, client_writer))
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for writer in (client_writer, broker_writer):
                writer.close()

    @staticmethod
    async def _up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65_536):
            writer.write(data)
            await writer.drain()
        writer.close()

    async def _down(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            packet = await _mqtt_packet(reader)
            if self.holding and packet[0] >> 4 == PUBACK:
                self.held.append(packet)
                continue
            writer.write(packet)
            await writer.drain()


async def _mqtt_packet(reader: asyncio.StreamReader) -> bytes:
    """One whole MQTT control packet: its fixed header (type, then the remaining length, 7 bits a byte) and body."""
    header = await reader.readexactly(1)
    length, shift = 0, 0
    while True:
        byte = (await reader.readexactly(1))[0]
        header += bytes([byte])
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return header + await reader.readexactly(length)
