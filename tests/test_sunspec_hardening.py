"""The DER server against a stranger on the network: what it serves, what a flood costs, who may connect.

Real parts throughout: the real DER server on 127.0.0.1, raw sockets and real pymodbus
clients, the real gateway and its SQLite journal where the journal's cost is the point.
Connection and refusal-summary timing runs on an injected monotonic clock that the tests
move, so nothing waits on the wall clock; every socket wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from children import spawn
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.pdu.file_message import FileRecord
from test_sunspec_server import CTL, RATINGS, ScriptedSink, config, run

from firmware_py import cli
from firmware_py.assembly import assemble
from firmware_py.config import Config, OwnerConfig
from firmware_py.core.types import Mode, OwnerSettings
from firmware_py.dispatch import Telemetry
from firmware_py.dispatch.connections import (
    RESERVED_DESCRIPTORS,
    ConnectionLimits,
    descriptor_budget,
)
from firmware_py.dispatch.refusals import OTHER_CLIENTS, Cause, Refusal, RefusalLedger
from firmware_py.dispatch.sunspec_server import SunSpecDerServer
from firmware_py.journal import Journal, RecordKind
from firmware_py.owner.api import OwnerApi
from firmware_py.tasks import cancel_all

FIRST, SUMMARY = RecordKind.SUNSPEC_WRITE_REFUSED, RecordKind.SUNSPEC_REFUSALS
WAIT_S = 5.0
ROOT = Path(__file__).resolve().parent.parent


class Clock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.t = 1_000.0

    def __call__(self) -> float:
        return self.t


@contextlib.asynccontextmanager
async def der(sink: Any, clock: Clock | None = None, **cfg: Any) -> AsyncIterator[SunSpecDerServer]:
    server = SunSpecDerServer(config(**cfg), RATINGS, monotonic=clock or Clock())
    await server.start(sink)
    try:
        yield server
    finally:
        await server.stop()


def adu(transaction: int, unit: int, pdu: bytes) -> bytes:
    return struct.pack(">HHHB", transaction, 0, len(pdu) + 1, unit) + pdu


async def exchange(port: int, frame: bytes, reply_bytes: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(frame)
        await writer.drain()
        return await asyncio.wait_for(reader.readexactly(reply_bytes), WAIT_S)
    finally:
        writer.close()


async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    """True once the server has closed (or reset) the connection; False if it sends data instead."""
    try:
        return await asyncio.wait_for(reader.read(1), WAIT_S) == b""
    except ConnectionResetError:
        return True


async def still_served(port_reader_writer: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> bool:
    """The connection answers a read of the SunS marker."""
    reader, writer = port_reader_writer
    writer.write(adu(9, 1, struct.pack(">BHH", 3, 40_000, 2)))
    await writer.drain()
    reply = await asyncio.wait_for(reader.readexactly(13), WAIT_S)
    return reply[7:] == bytes([3, 4]) + b"SunS"


# --- only what SunSpec needs: 3, 6, 16; everything else a well-formed exception ------------------
UNSERVED = [
    ("read coils (1)", bytes.fromhex("01 0000 0001")),
    ("read discrete inputs (2)", bytes.fromhex("02 0000 0001")),
    ("read input registers (4)", bytes.fromhex("04 9c40 0002")),
    ("write coil (5)", bytes.fromhex("05 0000 ff00")),
    ("diagnostics (8)", bytes.fromhex("08 0000 1234")),
    ("write coils (15)", bytes.fromhex("0f 0000 0001 01 01")),
    ("report server id (17)", bytes.fromhex("11")),
    ("read file record (20)", bytes.fromhex("14 07 06 0001 0000 0001")),
    ("write file record (21)", bytes.fromhex("15 09 06 0001 0000 0001 1234")),
    ("mask write (22)", bytes.fromhex("16 9c40 ffff 0000")),
    ("read/write registers (23)", bytes.fromhex("17 9c40 0001 9c40 0001 02 0001")),
    ("read FIFO (24)", bytes.fromhex("18 0000")),
    ("device identification (43)", bytes.fromhex("2b 0e 01 00")),
    ("user-defined (65)", bytes.fromhex("41")),
    ("function 0", bytes.fromhex("00")),
    ("an exception reply sent as a request", bytes.fromhex("83 02")),
]


@pytest.mark.parametrize("what, pdu", UNSERVED, ids=[u[0] for u in UNSERVED])
def test_unserved_functions_get_a_well_formed_illegal_function_over_raw_bytes(what, pdu):
    sink = ScriptedSink()

    async def main() -> bytes:
        async with der(sink) as server:
            return await exchange(server.port, adu(0x1234, 1, pdu), 9)

    reply = run(main())
    assert reply == adu(0x1234, 1, bytes([pdu[0] | 0x80, 1])), what  # tid, pid, length 3, unit, fc|0x80, 01
    [(kind, note)] = sink.notes
    assert kind == FIRST and note["cause"] == "unsupported_function" and note["function"] == pdu[0]
    assert note["exception"] == "ILLEGAL_FUNCTION" and "3, 6 and 16" in note["reason"]


MALFORMED = [
    ("read count 0", bytes.fromhex("03 9c40 0000"), 3),
    ("read count 126", bytes.fromhex("03 9c40 007e"), 3),
    ("read count 65535", bytes.fromhex("03 9c40 ffff"), 3),
    ("read with a byte too many", bytes.fromhex("03 9c40 0002 00"), 3),
    ("read cut short", bytes.fromhex("03 9c40"), 3),
    ("read past register 65535", bytes.fromhex("03 ffff 0002"), 2),
    ("write single cut short", bytes.fromhex("06 9c40 00"), 3),
    ("write multiple count 0", bytes.fromhex("10 9c40 0000 00"), 3),
    ("write multiple count 124", bytes.fromhex("10 9c40 007c 00"), 3),
    ("write multiple byte count disagreeing", bytes.fromhex("10 9c40 0002 02 0001"), 3),
    ("write multiple data missing", bytes.fromhex("10 9c40 0001 02"), 3),
]


@pytest.mark.parametrize("what, pdu, code", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_requests_get_a_well_formed_exception(what, pdu, code):
    sink = ScriptedSink()

    async def main() -> bytes:
        async with der(sink) as server:
            return await exchange(server.port, adu(77, 1, pdu), 9)

    assert run(main()) == adu(77, 1, bytes([pdu[0] | 0x80, code])), what  # e.g. 0x83 0x03 for a bad count
    [(kind, note)] = sink.notes
    assert kind == FIRST and note["cause"] in ("malformed", "bad_address") and note["reason"]
    assert sink.received == []


def test_a_write_file_record_changes_nothing_and_is_journaled():
    sink = ScriptedSink()

    async def main() -> tuple[bytes, list[int], list[int]]:
        async with der(sink) as server:
            client = AsyncModbusTcpClient("127.0.0.1", port=server.port, timeout=2, retries=0)
            await client.connect()
            try:
                before = (await client.read_holding_registers(server.addresses[704], count=20, device_id=1)).registers
                reply = await exchange(server.port, adu(5, 1, bytes.fromhex("15 09 06 0001 0000 0001 1234")), 9)
                after = (await client.read_holding_registers(server.addresses[704], count=20, device_id=1)).registers
            finally:
                client.close()
            return reply, before, after

    reply, before, after = run(main())
    assert reply[7:] == bytes([0x95, 1]) and before == after
    [(kind, note)] = sink.notes
    assert kind == FIRST and note["function"] == 21 and note["cause"] == "unsupported_function"


def test_a_real_pymodbus_client_gets_illegal_function_for_everything_but_3_6_16():
    sink = ScriptedSink()

    async def main() -> dict[str, Any]:
        async with der(sink) as server:
            client = AsyncModbusTcpClient("127.0.0.1", port=server.port, timeout=2, retries=0)
            await client.connect()
            try:
                replies = {
                    "report_device_id": await client.report_device_id(device_id=1),
                    "diag_read_bus_message_count": await client.diag_read_bus_message_count(device_id=1),
                    "read_file_record": await client.read_file_record(
                        [FileRecord(file_number=1, record_number=0, record_length=2)], device_id=1),
                    "write_file_record": await client.write_file_record(
                        [FileRecord(file_number=1, record_number=0, record_data=b"\x12\x34")], device_id=1),
                    "read_fifo_queue": await client.read_fifo_queue(address=0, device_id=1),
                    "read_input_registers": await client.read_input_registers(40_000, count=2, device_id=1),
                    "read_coils": await client.read_coils(0, count=1, device_id=1),
                    "mask_write_register": await client.mask_write_register(address=40_000, device_id=1),
                }
                served = await client.read_holding_registers(40_000, count=2, device_id=1)
            finally:
                client.close()
            return {"replies": replies, "served": served}

    got = run(main())
    for name, reply in got["replies"].items():
        assert reply.isError() and reply.exception_code == 1, (name, reply)
    assert not got["served"].isError() and got["served"].registers == [0x5375, 0x6E53]


def test_two_requests_in_one_segment_get_two_replies_in_order():
    sink = ScriptedSink()

    async def main() -> bytes:
        async with der(sink) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(adu(1, 1, struct.pack(">BHH", 3, 40_000, 2)) + adu(2, 1, bytes.fromhex("08 0000 0000")))
            await writer.drain()
            reply = await asyncio.wait_for(reader.readexactly(13 + 9), WAIT_S)
            writer.close()
            return reply

    reply = run(main())
    assert reply == adu(1, 1, bytes([3, 4]) + b"SunS") + adu(2, 1, bytes([0x88, 1]))


@pytest.mark.parametrize("what, header", [
    ("protocol id not Modbus", struct.pack(">HHHB", 1, 7, 6, 1)),
    ("length 0", struct.pack(">HHHB", 1, 0, 0, 1)),
    ("length beyond an ADU", struct.pack(">HHHB", 1, 0, 300, 1)),
])
def test_a_stream_that_is_not_modbus_tcp_is_closed_and_counted(what, header):
    sink = ScriptedSink()

    async def main() -> bool:
        async with der(sink) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(header + bytes(5))
            await writer.drain()
            closed = await closed_by_server(reader)
            writer.close()
            return closed

    assert run(main()), what
    [(kind, note)] = sink.notes
    assert kind == FIRST and note["cause"] == "malformed" and "connection closed" in note["reason"]


# --- a flood costs the journal a bounded number of records, and loses no count -----------------
def ledger_with(clock: Clock, **kw: Any) -> tuple[RefusalLedger, list[tuple[RecordKind, dict]]]:
    written: list[tuple[RecordKind, dict]] = []
    return RefusalLedger(lambda kind, payload: written.append((kind, payload)), clock, **kw), written


def accounted(written: list[tuple[RecordKind, dict]]) -> int:
    """Refusals the records account for: one per first record, `count` per summary."""
    return sum(1 if kind is FIRST else payload["count"] for kind, payload in written)


@pytest.mark.parametrize("per_interval", [1, 10, 1_000, 20_000])
def test_records_per_interval_do_not_depend_on_the_refusal_rate(per_interval):
    clock = Clock()
    ledger, written = ledger_with(clock)
    per_minute = []
    for _minute in range(3):
        before = len(written)
        for i in range(per_interval):
            ledger.record(Refusal("192.168.1.66", Cause.OTHER_UNIT, "unit id 2", 6, 40_000 + i % 7, 1))
        clock.t += 60
        ledger.tick()
        per_minute.append(len(written) - before)
    ledger.flush()
    assert accounted(written) == 3 * per_interval  # exact
    # A first and a summary, then one summary a minute (a lone refusal a minute is a first each time).
    assert per_minute == ([1, 1, 1] if per_interval == 1 else [2, 1, 1])


def test_a_quiet_client_is_forgotten_and_its_next_refusal_journaled_at_once():
    clock = Clock()
    ledger, written = ledger_with(clock)
    assert ledger.record(Refusal("10.0.0.9", Cause.NOT_ALLOWED, "not in allow_write_from", 6, 40_299, 1))
    assert not ledger.record(Refusal("10.0.0.9", Cause.NOT_ALLOWED, "not in allow_write_from", 6, 40_299, 1))
    assert ledger.record(Refusal("10.0.0.9", Cause.BAD_VALUE, "WSet beyond the rating", 16, 40_307, 2))
    clock.t += 60
    ledger.tick()  # summary of the one counted; the bad-value pair had nothing counted: forgotten
    clock.t += 60
    ledger.tick()  # the allow-list pair had nothing counted this time: forgotten too
    assert ledger.record(Refusal("10.0.0.9", Cause.NOT_ALLOWED, "not in allow_write_from", 6, 40_299, 1))
    kinds = [(kind, payload["cause"], payload.get("count")) for kind, payload in written]
    assert kinds == [(FIRST, "not_allowed", 1), (FIRST, "bad_value", 2), (SUMMARY, "not_allowed", 1),
                     (FIRST, "not_allowed", 1)]


def test_many_clients_are_tracked_up_to_a_bound_and_the_rest_counted_together():
    clock = Clock()
    ledger, written = ledger_with(clock, max_clients=8)
    for i in range(1_000):
        ledger.record(Refusal(f"fd00::{i:x}", Cause.TOO_MANY_CONNECTIONS, "the server holds its limit"))
    ledger.flush()
    firsts = [p for k, p in written if k is FIRST]
    assert len(firsts) == 8 + 1  # eight clients, then the first beyond them (as itself) once
    assert firsts[-1]["client"] == "fd00::8" and firsts[0]["function"] is None
    [other] = [p for k, p in written if k is SUMMARY]
    assert other["client"] == OTHER_CLIENTS and other["count"] == 1_000 - 9
    assert accounted(written) == 1_000


def gateway_config(tmp_path: Path, **der_cfg: Any) -> Config:
    base = Config()
    return replace(base, can=replace(base.can, interface="virtual", channel=f"der-flood-{id(tmp_path)}"),
                   journal=replace(base.journal, path=str(tmp_path / "journal.sqlite")),
                   owner=replace(base.owner, settings_file=str(tmp_path / "owner.json")),
                   dispatch=replace(base.dispatch, sunspec_server=config(**der_cfg)))


async def flood(client: AsyncModbusTcpClient, how: str, n: int, wset_ena: int) -> None:
    """`n` requests the DER refuses, each awaited (a client as fast as its round trips)."""
    for _ in range(n):
        if how == "unit 2":
            reply = await client.write_register(wset_ena, 1, device_id=2)
        elif how == "not allowed":
            reply = await client.write_register(wset_ena, 1, device_id=1)
        else:
            reply = await client.diag_read_bus_message_count(device_id=1)
        assert reply.isError()


def test_a_flood_from_four_connections_costs_the_journal_a_few_records_a_minute(tmp_path, caplog):
    """The issue's flood (function 6 to unit 2, ~7,000 records/s before), plus writes from outside the
    allow-list and diagnostics, at two rates; through the real gateway into its SQLite journal."""
    clock = Clock()
    rates = [30, 300]  # requests per connection per minute

    async def main() -> None:
        assembly = assemble(gateway_config(tmp_path, allow_write_from=["10.0.0.0/8"]), time.time)
        gateway = assembly.gateway
        server = SunSpecDerServer(assembly.config.dispatch.sunspec_server, monotonic=clock)
        await server.start(gateway)
        clients = [AsyncModbusTcpClient("127.0.0.1", port=server.port, timeout=2, retries=0) for _ in range(4)]
        try:
            for client in clients:
                assert await client.connect()
            wset_ena = server.addresses[704] + CTL.offset("WSetEna")
            for n in rates:
                for _ in range(6):  # the minute in steps of 10 s: busy clients are never idle
                    await asyncio.gather(*(flood(c, how, n // 6, wset_ena) for c, how in
                                           zip(clients, ["unit 2", "unit 2", "not allowed", "diagnostics"])))
                    clock.t += 10
                    await server.tick()
                    gateway.flush_journal()
        finally:
            for client in clients:
                client.close()
            await server.stop()
            gateway.flush_journal(final=True)
            assembly.close()

    with caplog.at_level(logging.WARNING, logger="firmware_py.dispatch.sunspec_server"):
        run(main(), timeout_s=60)
    with Journal.open(tmp_path / "journal.sqlite", readonly=True) as journal:
        assert journal.verify() == []
        firsts = [r.payload for r in journal.records(kind=FIRST)]
        summaries = [r.payload for r in journal.records(kind=SUMMARY)]
    assert sorted(p["cause"] for p in firsts) == ["not_allowed", "other_unit", "unsupported_function"]
    assert len(summaries) == 3 * len(rates)  # one per (client, cause) per minute, whatever the rate
    by_cause = {cause: sum(p["count"] for p in summaries if p["cause"] == cause) + 1
                for cause in ("other_unit", "not_allowed", "unsupported_function")}
    assert by_cause == {"other_unit": 2 * sum(rates), "not_allowed": sum(rates), "unsupported_function": sum(rates)}
    logged = [r for r in caplog.records if r.name == "firmware_py.dispatch.sunspec_server"]
    assert len(logged) == len(firsts) + len(summaries)  # the log is limited the same way


# --- connections: capped, timed out, and the owner's way in kept free ----------------------------
async def connect(port: int, source: str = "127.0.0.1") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0)), WAIT_S)


def test_connections_over_the_per_client_cap_are_closed_at_once_and_counted():
    sink = ScriptedSink()

    async def main() -> tuple[list[bool], list[bool]]:
        async with der(sink, max_connections_per_client=2) as server:
            conns = [await connect(server.port) for _ in range(5)]
            served = [await still_served(c) for c in conns[:2]]
            closed = [await closed_by_server(reader) for reader, _ in conns[2:]]
            for _, writer in conns:
                writer.close()
            return served, closed

    served, closed = run(main())
    assert served == [True, True] and closed == [True, True, True]
    (kind, first), (summary_kind, summary) = sink.notes
    assert kind == FIRST and first["cause"] == "too_many_connections" and "limit of 2" in first["reason"]
    assert summary_kind == SUMMARY and summary["count"] == 2


def test_total_cap_and_slots_kept_for_clients_that_may_write():
    """4 connections at most; one of them only for allow_write_from (127.0.0.1 here)."""
    sink = ScriptedSink()

    async def main() -> dict[str, Any]:
        async with der(sink, max_connections=4) as server:
            readers = [await connect(server.port, f"127.0.0.{i}") for i in (2, 3, 4)]
            fourth_reader = await connect(server.port, "127.0.0.5")
            writer_conn = await connect(server.port, "127.0.0.1")
            fifth = await connect(server.port, "127.0.0.1")
            out = {"readers": [await still_served(c) for c in readers],
                   "fourth_reader_closed": await closed_by_server(fourth_reader[0]),
                   "writer": await still_served(writer_conn),
                   "fifth_closed": await closed_by_server(fifth[0]), "held": len(server.connections)}
            for _, w in [*readers, fourth_reader, writer_conn, fifth]:
                w.close()
            return out

    got = run(main())
    assert got == {"readers": [True] * 3, "fourth_reader_closed": True, "writer": True, "fifth_closed": True,
                   "held": 4}
    reasons = [note["reason"] for _, note in sink.notes]
    assert any("outside allow_write_from hold their limit of 3" in r for r in reasons)
    assert any("holds its limit of 4 connections" in r for r in reasons)


def test_idle_connections_are_closed_after_the_idle_timeout_on_the_servers_clock():
    sink, clock = ScriptedSink(), Clock()

    async def main() -> tuple[bool, bool, int, int]:
        async with der(sink, clock, idle_timeout_s=60) as server:
            conn = await connect(server.port)
            assert await still_served(conn)
            clock.t += 59
            await server.tick()
            alive = await still_served(conn)  # a request resets the idle time
            clock.t += 60
            await server.tick()
            closed = await closed_by_server(conn[0])
            conn[1].close()
            return alive, closed, server.closed_idle, len(server.connections)

    assert run(main()) == (True, True, 1, 0)
    assert sink.notes == []  # an idle client did nothing wrong: not a refusal


async def until_waiting(server: SunSpecDerServer, n: int) -> None:
    """Until the server has taken in the bytes just sent (same loop: a bounded number of its turns)."""
    for _ in range(10_000):
        if server.connections.waiting() == n:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"the server did not see the bytes sent ({server.connections.waiting()} waiting)")


@pytest.mark.parametrize("trickle", [False, True])
def test_a_half_sent_request_is_closed_after_the_request_timeout_even_when_trickled(trickle):
    sink, clock = ScriptedSink(), Clock()

    async def main() -> tuple[int, bool]:
        async with der(sink, clock) as server:
            reader, writer = await connect(server.port)
            frame = adu(3, 1, struct.pack(">BHH", 3, 40_000, 2))
            writer.write(frame[:4])
            await until_waiting(server, 1)
            for at in range(4 if trickle else 1):  # trickled: a byte a second, never a whole request
                clock.t += 1.0 if trickle else 4.9
                await server.tick()
                if trickle:
                    writer.write(frame[4 + at:5 + at])
            held = len(server.connections)  # 4.9 s after the first byte: still held
            clock.t += 1.0 if trickle else 0.1
            await server.tick()
            closed = await closed_by_server(reader)
            writer.close()
            return held, closed

    assert run(main()) == (1, True)
    [(kind, note)] = sink.notes
    assert kind == FIRST and note["cause"] == "stalled_request"


def test_many_requests_in_one_segment_are_all_answered_in_order():
    sink = ScriptedSink()
    n = 500

    async def main() -> bytes:
        async with der(sink) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"".join(adu(i, 1, struct.pack(">BHH", 3, 40_000, 2)) for i in range(n)))
            reply = await asyncio.wait_for(reader.readexactly(13 * n), 4 * WAIT_S)
            writer.close()
            return reply

    reply = run(main())
    assert reply == b"".join(adu(i, 1, bytes([3, 4]) + b"SunS") for i in range(n))


def test_a_client_that_never_reads_its_replies_is_no_longer_answered_then_closed():
    """Requests keep coming, replies are never read: the server stops answering (its buffers stay
    bounded) and the request timeout closes the connection."""
    sink, clock = ScriptedSink(), Clock()

    async def main() -> tuple[int, bool]:
        async with der(sink, clock) as server:
            # Small kernel buffers both ways (a slow link): the replies back up after a few hundred
            # requests rather than megabytes. Accepted sockets take the listener's send buffer size.
            server._server.transport.sockets[0].setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port))
            _reader, writer = await asyncio.open_connection(sock=sock)
            writer.write(b"".join(adu(i, 1, struct.pack(">BHH", 3, 40_000, 125)) for i in range(5_000)))
            for _ in range(100_000):  # bounded: the loop's turns until the server stops answering
                if server.connections.not_reading():
                    break
                await asyncio.sleep(0)
            unread = server.connections.not_reading()
            clock.t += 5
            await server.tick()
            closed = server.connections.waiting() == 0 and len(server.connections) == 0
            writer.close()
            return unread, closed

    assert run(main(), timeout_s=30) == (1, True)
    [(kind, note)] = sink.notes
    assert kind == FIRST and note["cause"] == "stalled_request"


class OwnerPortStub:
    """The gateway's side of the owner API, enough for `GET /status`."""

    def __init__(self) -> None:
        self.settings = OwnerSettings(reserve_pct=40, received_at=0.0)
        self.stopping = False

    def owner_settings(self) -> OwnerSettings:
        return self.settings

    async def set_owner(self, settings: OwnerSettings) -> None:
        self.settings = settings

    def telemetry(self) -> Telemetry:
        return Telemetry(at=0.0, mode=Mode.STANDBY, soc_pct=70.0, floor_pct=42.0, power_w=0.0, setpoint_w=0.0,
                         available_wh=30_000.0, active_event_id=None)

    def now(self) -> float:
        return 0.0


def test_the_owner_api_answers_with_the_der_server_at_its_cap(tmp_path):
    sink = ScriptedSink()
    owner = OwnerApi(OwnerConfig(api_listen="127.0.0.1:0", token_file=str(tmp_path / "owner.token"),
                                 settings_file=str(tmp_path / "owner.json")), OwnerPortStub())

    async def main() -> tuple[int, int, int]:
        await owner.start()
        try:
            async with der(sink, max_connections=8, max_connections_per_client=8) as server:
                held = [await connect(server.port) for _ in range(8)]
                extra = [await connect(server.port) for _ in range(100)]
                refused = sum([await closed_by_server(reader) for reader, _ in extra])
                token = Path(owner.config.token_file).read_text().strip()
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT_S)) as http, \
                        http.get(f"http://{owner.address}/status",
                                 headers={"Authorization": f"Bearer {token}"}) as response:
                    status = response.status
                for _, writer in held + extra:
                    writer.close()
                return status, refused, len(server.connections)
        finally:
            await owner.stop()

    assert run(main()) == (200, 100, 8)


def test_the_connection_cap_leaves_descriptors_for_the_rest_of_the_gateway():
    assert descriptor_budget(32, soft_limit=1_024) == 32
    assert descriptor_budget(256, soft_limit=300) == 300 - RESERVED_DESCRIPTORS
    assert descriptor_budget(32, soft_limit=100) == 1
    assert ConnectionLimits(total=32).writers_reserved == 8 and ConnectionLimits(total=1).writers_reserved == 0


def test_the_systemd_unit_allows_the_largest_connection_cap_plus_the_reserve():
    unit = (ROOT / "config" / "powershare-gw.service").read_text()
    [line] = [line for line in unit.splitlines() if line.startswith("LimitNOFILE=")]
    limit = int(line.split("=", 1)[1])
    largest = Config.__dataclass_fields__["dispatch"].default_factory().sunspec_server.__dataclass_fields__[
        "max_connections"].metadata["hi"]
    assert limit >= largest + RESERVED_DESCRIPTORS


# --- every listener the config enables binds, or the gateway exits 2 with the reason -------------
@pytest.mark.parametrize("taken", [True, False], ids=["port in use", "address not on this host"])
def test_run_exits_2_naming_the_der_servers_address_when_it_cannot_listen(tmp_path, capsys, taken):
    holder = None
    if taken:
        holder = socket.socket()
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        listen = f"127.0.0.1:{holder.getsockname()[1]}"
    else:
        listen = "192.0.2.1:1502"  # TEST-NET-1: no interface here has it
    path = tmp_path / "gateway.toml"
    path.write_text(f'''
[can]
interface = "virtual"
channel = "der-bind-{tmp_path.name}"
[inverter]
port = 1
timeout_s = 0.2
[owner]
api_listen = "127.0.0.1:0"
[dispatch.sunspec_server]
enabled = true
listen = "{listen}"
[journal]
path = "journal.sqlite"
''', encoding="utf-8")
    try:
        code = cli.main(["run", "--config", str(path)])
    finally:
        if holder is not None:
            holder.close()
    err = capsys.readouterr().err
    assert code == 2
    reason = "address already in use" if taken else "cannot assign requested address"
    assert f"error: {path}: dispatch.sunspec_server.listen: cannot listen on {listen}: " in err  # file, then key
    assert reason in err.lower() and "Traceback" not in err


# --- the scenario end to end: `run` with few descriptors, hundreds of idle connections ---
CHILD_NOFILE = 160  # descriptors the gateway process may open (systemd's default is 1,024; the flood had 1,100)


def _few_descriptors() -> None:  # runs in the child before exec
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (CHILD_NOFILE, hard))


@pytest.mark.slow
def test_hundreds_of_idle_connections_leave_the_owner_able_to_reach_the_gateway(tmp_path, capsys):
    """More idle connections than the gateway has descriptors: the DER server keeps to its caps
    (24 slots for clients outside allow_write_from), the rest are closed at once and counted, and
    `owner status` still answers; the journal holds a few records for all of it, none lost."""
    run_dir = Path(tempfile.mkdtemp(prefix="psgw-", dir="/tmp"))  # a Unix socket path must be short
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(f'''
[can]
interface = "virtual"
channel = "der-nofile-{run_dir.name}"
[inverter]
port = 1
timeout_s = 0.2
[owner]
api_listen = "unix:{run_dir / 'owner.sock'}"
[dispatch.sunspec_server]
enabled = true
listen = "127.0.0.1:0"
[journal]
path = "journal.sqlite"
''', encoding="utf-8")
    proc, output = spawn([sys.executable, "-m", "firmware_py", "run", "--config", str(cfg)], tmp_path / "run.log",
                         cwd=tmp_path, preexec_fn=_few_descriptors)
    opened = 300
    try:
        port = int(output.wait_for_line(r"SunSpec DER server on 127\.0\.0\.1:(\d+)", 30).group(1))

        async def main() -> tuple[int, int]:
            conns = [await connect(port, f"127.0.0.{2 + i // 4}") for i in range(opened)]  # 4 per address
            closes = [asyncio.ensure_future(closed_by_server(reader)) for reader, _ in conns]
            refused = 0
            with contextlib.suppress(TimeoutError):
                for closing in asyncio.as_completed(closes, timeout=2 * WAIT_S):
                    refused += await closing
                    if refused == opened - 24:
                        break  # the rest are the connections the server holds
            code = await asyncio.to_thread(cli.main, ["owner", "--config", str(cfg), "status"])
            await cancel_all(closes)
            for _, writer in conns:
                writer.close()
            return refused, code

        refused, code = asyncio.run(asyncio.wait_for(main(), 60))
        assert proc.poll() is None, output.text()
        proc.send_signal(signal.SIGTERM)
        exit_code = proc.wait(timeout=30)
        output.join()  # all it printed, before it is shown
        assert exit_code == 0, output.text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        output.join()
        shutil.rmtree(run_dir, ignore_errors=True)
    assert code == 0 and "reserve" in capsys.readouterr().out.lower()
    assert refused == opened - 24
    with Journal.open(tmp_path / "journal.sqlite", readonly=True) as journal:
        refusals = [r for r in journal.records() if r.kind in (FIRST, SUMMARY)]
    assert all(r.payload["cause"] == "too_many_connections" for r in refusals)
    assert len(refusals) <= 2 * (64 + 1)  # bounded by the clients tracked, not by the connections
    assert sum(1 if r.kind is FIRST else r.payload["count"] for r in refusals) == opened - 24
