"""The gateway's SunSpec client against the simulated inverter over Modbus TCP.

Real pymodbus on both sides; the inverter model is advanced by hand and the
client's clock is a plain variable, so nothing here depends on timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import AsyncIterator

import pytest

from firmware_py.config import InverterConfig
from firmware_py.core.types import InverterCommand, InverterState
from firmware_py.inverter.client import STATUS_SPAN, InverterClient, LinkError, ModbusErrorCause
from firmware_py.inverter.sunspec import ModelDef
from firmware_py.sim.faults import InverterFault as Fault
from firmware_py.sim.inverter import SCALE, InverterModel, Ratings, SimInverterServer

BIG = 50_000.0


class Rig:
    """A simulated inverter, its server and a connected client sharing one hand-driven clock."""

    def __init__(self, model: InverterModel, server: SimInverterServer, client: InverterClient):
        self.model, self.server, self.client = model, server, client
        self.now = 0.0

    def advance(self, dt: float) -> None:
        self.now += dt
        self.model.advance(dt, self.now, BIG, BIG)


def run(scenario, **settings):
    async def main():
        model = InverterModel()
        async with SimInverterServer(model, slow_reply_s=0.5) as server:
            cfg = InverterConfig(port=server.port, **{"timeout_s": 0.2, "revert_timeout_s": 9, **settings})
            rig = Rig(model, server, None)  # type: ignore[arg-type]
            rig.client = InverterClient(cfg, lambda: rig.now, backoff_min_s=1.0)
            await rig.client.connect()
            try:
                await scenario(rig)
            finally:
                await rig.client.close()

    asyncio.run(main())


def test_discovery_reports_models_ratings_and_common():
    async def scenario(rig):
        disc = rig.client.discovery
        assert disc.base == 40000
        assert sorted(disc.models) == [1, 701, 702, 703, 704, 713]
        assert disc.common["Mn"] == "powershare-gw"
        assert disc.ratings["WMaxRtg"] == 11_500.0
        assert disc.storage["WHRtg"] == 123_000.0

    run(scenario)


def test_status_reflects_the_inverter():
    async def scenario(rig):
        await rig.client.apply(InverterCommand(4_000.0, "dispatch"))
        rig.advance(1800.0)  # within the 1 h revert time set below
        st = await rig.client.read_status(setpoint=True)
        assert st.comms_ok and st.error is None
        assert st.measured_w == pytest.approx(4_000.0)
        assert st.inv_state == InverterState.RUNNING
        assert st.grid_connected and not st.grid_outage
        assert st.tot_wh_inj == pytest.approx(2_000.0, abs=1.0)
        assert st.w_max_rtg == st.w_discha_max_rtg == st.w_cha_max_rtg == 11_500.0
        assert st.wset_w == pytest.approx(4_000.0)

    run(scenario, revert_timeout_s=3600)


def test_command_arms_the_revert_in_704():
    async def scenario(rig):
        await rig.client.apply(InverterCommand(-2_500.5, "charge"))
        c = rig.model.controls
        assert (c["WSetEna"], c["WSetMod"], c["WSetEnaRvrt"], c["WSetRvrt"], c["WSetRvrtTms"]) == (1, 1, 1, 0, 9)
        assert c["WSet"] == pytest.approx(-2_500.5)  # the sim's WSet_SF is -1: 0.1 W steps

    run(scenario)


def test_writes_only_on_change_or_when_a_refresh_is_due():
    async def scenario(rig):
        cmd = InverterCommand(3_000.0, "dispatch")
        await rig.client.apply(cmd)
        assert rig.server.writes == 1
        rig.now += 1.0
        await rig.client.apply(cmd)
        assert rig.server.writes == 1
        await rig.client.apply(InverterCommand(3_100.0, "dispatch"))
        assert rig.server.writes == 2
        rig.now += rig.client.refresh_s  # 3 s: a third of the 9 s revert time
        await rig.client.apply(InverterCommand(3_100.0, "dispatch"))
        assert rig.server.writes == 3

    run(scenario)


def test_the_same_command_applied_twice_at_once_is_written_once():
    """The command writer and a dispatch's own write, woken by one step: the second waits for the link,
    then finds the setpoint written."""
    async def scenario(rig):
        cmd = InverterCommand(3_000.0, "dispatch")
        await asyncio.gather(rig.client.apply(cmd), rig.client.apply(cmd))
        assert rig.server.writes == 1 and rig.model.wset_w == pytest.approx(3_000.0)

    run(scenario)


def test_a_write_that_waited_for_the_link_writes_the_newest_decision_not_the_one_it_was_given():
    """A poll holds the link; the writer is handed 6 kW and waits; a fault makes the core decide 0 W.
    The old setpoint was then written (re-arming the revert timer for it) before the 0 W."""
    async def scenario(rig):
        decided = [InverterCommand(5_000.0, "dispatch")]
        rig.client.follow(lambda: decided[0])
        await rig.client.apply(decided[0])
        async with rig.client._busy:  # the poll's exchange, under way
            decided[0] = InverterCommand(6_000.0, "dispatch")
            waiting = asyncio.create_task(rig.client.apply(decided[0]))
            await asyncio.sleep(0)  # the writer is waiting for the link now
            decided[0] = InverterCommand(0.0, "fault: bms_fault")
        await waiting
        assert rig.model.wset_w == 0.0 and rig.server.writes == 2  # 6 kW never reached the inverter

    run(scenario)


@pytest.mark.parametrize("decided, written", [(60.0, 0.0), (150.0, 100.0), (11_470.0, 11_400.0),
                                              (-150.0, -100.0), (-11_470.0, -11_400.0), (11_500.0, 11_500.0)])
def test_a_coarse_scale_factor_never_rounds_a_setpoint_beyond_what_the_core_decided(monkeypatch, decided, written):
    """WSet in hundreds of watts (WSet_SF = 2): rounded to nearest, a 60 W envelope became 100 W."""
    monkeypatch.setitem(SCALE[704], "WSet_SF", 2)

    async def scenario(rig):
        await rig.client.apply(InverterCommand(decided, "dispatch"))
        assert rig.model.wset_w == written

    run(scenario)


def test_safe_stop_writes_zero_even_when_unchanged():
    async def scenario(rig):
        await rig.client.apply(InverterCommand(0.0, "idle"))
        await rig.client.safe_stop()
        assert rig.server.writes == 2 and rig.model.wset_w == 0.0

    run(scenario)


def test_grid_outage_and_inverter_fault_are_reported():
    async def scenario(rig):
        rig.model.inject(Fault.GRID_OUTAGE, until=10.0)
        rig.advance(1.0)
        st = await rig.client.read_status()
        assert st.comms_ok and st.grid_outage and not st.grid_connected
        rig.model.inject(Fault.INVERTER_FAULT, until=10.0)
        rig.advance(1.0)
        st = await rig.client.read_status()
        assert st.faulted and st.measured_w == 0.0 and st.alarms & ~(1 << 4)

    run(scenario)


@pytest.mark.parametrize(("fault", "cause"), [
    (Fault.MODBUS_EXCEPTION, "Modbus exception 4 (device failure)"),
    (Fault.SLOW_REPLY, "no reply within 0.2 s"),
    (Fault.DROP_CONNECTION, "connection closed by the inverter"),
])
def test_each_fault_becomes_comms_lost_then_recovers(fault, cause, caplog):
    async def scenario(rig):
        await rig.client.apply(InverterCommand(5_000.0, "dispatch"))
        rig.advance(1.0)
        rig.model.inject(fault, until=rig.now + 5.0)
        with caplog.at_level(logging.WARNING, logger="firmware_py.inverter.client"):
            statuses = [await rig.client.read_status() for _ in range(3)]
            await rig.client.apply(InverterCommand(6_000.0, "dispatch"))  # must not raise
        for st in statuses:
            assert not st.comms_ok and st.measured_w == 0.0 and cause in st.error
        warnings = [r for r in caplog.records if r.name == "firmware_py.inverter.client"]
        assert warnings == []  # an outage is told once, by the gateway's link book, not per poll here
        rig.advance(5.0)
        rig.now += 2.0  # past the reconnect backoff
        st = await rig.client.read_status()
        assert st.comms_ok, st.error
        await rig.client.apply(InverterCommand(6_000.0, "dispatch"))
        assert rig.model.wset_w == pytest.approx(6_000.0)

    run(scenario)


@pytest.mark.parametrize(("point", "value", "cause"), [
    ("W", None, "model 701 W is 'not implemented'"),
    ("InvSt", 99, "model 701 InvSt=99 is not a defined state"),
])
def test_a_reading_that_does_not_fit_is_a_failed_reading_not_a_reconnect(point, value, cause):
    """701 `W` reading 'not implemented' (or an undefined InvSt) closed the link: since each connect reset the
    back-off, every poll reconnected, discovered the device again and rewrote the command. The reply came over
    a healthy link: docs/sunspec.md treats it as a failed reading, and the link stays as it is."""
    async def scenario(rig):
        await rig.client.apply(InverterCommand(3_000.0, "dispatch"))
        disc, writes = rig.client.discovery, rig.client.writes
        assert writes == 1
        values = rig.model.values
        rig.model.values = lambda mid: {**values(mid), point: value} if mid == 701 else values(mid)
        for _ in range(5):  # a poll a second, each followed by the core's unchanged command
            rig.now += 1.0
            st = await rig.client.read_status()
            assert not st.comms_ok and cause in st.error and "link closed" not in st.error
            await rig.client.apply(InverterCommand(3_000.0, "dispatch"))
        assert rig.client.discovery is disc and rig.client.connected  # never reopened nor rediscovered
        assert rig.client.writes == writes  # nor the command rewritten (a refresh is due only after 10 s)
        rig.model.values = values
        assert (await rig.client.read_status()).comms_ok

    run(scenario, revert_timeout_s=30)


def test_a_faulted_link_ends_at_zero_watts_by_revert():
    async def scenario(rig):
        await rig.client.apply(InverterCommand(5_000.0, "dispatch"))
        rig.advance(1.0)
        rig.model.inject(Fault.DROP_CONNECTION, until=1e9)
        for _ in range(10):
            rig.advance(1.0)
            assert not (await rig.client.read_status()).comms_ok
            await rig.client.apply(InverterCommand(5_000.0, "dispatch"))
        assert rig.model.ac_power_w == 0.0

    run(scenario)


def test_readback_mismatch_is_reported_not_raised(caplog):
    async def scenario(rig):
        original = rig.server._write

        def clamping_write(address, values):
            result = original(address, values)
            rig.model.controls["WSet"] = min(rig.model.controls["WSet"], 1_000.0)  # a device that clamps
            return result

        rig.server._write = clamping_write
        with caplog.at_level(logging.WARNING, logger="firmware_py.inverter.client"):
            await rig.client.apply(InverterCommand(5_000.0, "dispatch"))
        assert "read-back differs" in caplog.text and "WSet wrote 50000 read 10000" in caplog.text
        # What the inverter holds is not what was asked: it is stopped, and the core is told so.
        assert rig.model.controls["WSet"] == 0.0
        status = await rig.client.read_status()
        assert not status.comms_ok and "read-back differs" in status.error
        rig.server._write = original  # a command that reads back as written restores trust
        await rig.client.apply(InverterCommand(0.0, "fault"))
        assert (await rig.client.read_status()).comms_ok


def test_a_revert_that_does_not_take_stops_the_inverter():
    """A device that ignores WSetEnaRvrt must not be left discharging unguarded."""

    async def scenario(rig):
        original = rig.server._write

        def unarmed_write(address, values):
            result = original(address, values)
            rig.model.controls["WSetEnaRvrt"] = 0
            return result

        rig.server._write = unarmed_write
        await rig.client.apply(InverterCommand(5_000.0, "dispatch"))
        assert rig.model.controls["WSet"] == 0.0
        assert not (await rig.client.read_status()).comms_ok

    run(scenario)

    run(scenario)


def test_read_status_when_unreachable_is_a_status_not_an_exception():
    async def main():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        client = InverterClient(InverterConfig(port=port, timeout_s=0.2), lambda: 0.0)
        with pytest.raises(LinkError, match="cannot connect"):
            await client.connect()
        st = await client.read_status()
        assert not st.comms_ok and "cannot connect" in st.error
        await client.apply(InverterCommand(1_000.0, "x"))  # a no-op while disconnected

    asyncio.run(main())


@contextlib.asynccontextmanager
async def device_serving(registers: list[int], at: int = 40000) -> AsyncIterator[InverterClient]:
    """A plain pymodbus device holding `registers` from `at` on 127.0.0.1, and a client for it (not connected)."""
    from pymodbus.server import ModbusTcpServer
    from pymodbus.simulator import DataType, SimData, SimDevice

    server = ModbusTcpServer(SimDevice(1, [SimData(at, values=registers, datatype=DataType.REGISTERS)]),
                             address=("127.0.0.1", 0))
    await server.serve_forever(background=True)
    try:
        port = server.transport.sockets[0].getsockname()[1]
        client = InverterClient(InverterConfig(port=port, timeout_s=0.5), lambda: 0.0)
        try:
            yield client
        finally:
            await client.close()
    finally:
        await server.shutdown()


def test_a_common_model_of_65_registers_without_its_pad_is_a_sunspec_device():
    """SunSpec accepts model 1 with L = 65 (devices from before its Pad): refusing it left such an
    inverter never commanded, the link down for ever."""
    async def main():
        registers = InverterModel().register_map(40000).registers()
        assert registers[2:4] == [1, 66]  # after the SunS marker: model 1, L = 66, its last register the Pad
        legacy = registers[:3] + [65] + registers[4:4 + 65] + registers[4 + 66:]
        async with device_serving(legacy) as client:
            await client.connect()
            assert sorted(client.discovery.models) == [1, 701, 702, 703, 704, 713]
            assert client.discovery.common["Mn"] == "powershare-gw"
            status = await client.read_status()
            assert status.comms_ok and status.w_max_rtg == 11_500.0

    asyncio.run(main())


@pytest.mark.parametrize("models, found", [(64, "accepted"), (65, "no end model within 64 models")])
def test_a_model_chain_of_64_models_is_walked_to_its_end_and_a_longer_one_refused(models, found):
    """docs/sunspec.md allows at most 64 models: a device with exactly 64 (its six, then vendor
    models of L = 0) was refused because the end model's header was never read."""
    async def main() -> str:
        registers = InverterModel().register_map(40000).registers()
        assert registers[-2:] == [0xFFFF, 0]  # the end model, after the six models the simulator serves
        vendor = [64000, 0] * (models - 6)
        async with device_serving(registers[:-2] + vendor + registers[-2:]) as client:
            try:
                await client.connect()
            except LinkError as err:
                return str(err)
            return "accepted"

    assert found in asyncio.run(main())


def test_a_map_that_ends_with_the_end_model_id_and_no_length_is_a_sunspec_device():
    """Some devices end their map with the end model's ID (0xFFFF) and no L register after it: reading ID and
    L at once is refused (ILLEGAL_ADDRESS) there, and discovery failed for ever. The ID alone ends the chain."""
    async def main():
        registers = InverterModel().register_map(40000).registers()
        assert registers[-2:] == [0xFFFF, 0]
        async with device_serving(registers[:-1]) as client:
            await client.connect()
            assert sorted(client.discovery.models) == [1, 701, 702, 703, 704, 713]
            assert (await client.read_status()).comms_ok

    asyncio.run(main())


def test_a_chain_cut_short_before_its_end_model_is_still_refused():
    """Reading the ID alone is only for the end model: a chain whose next model header is refused is no device."""
    async def main():
        registers = InverterModel().register_map(40000).registers()
        async with device_serving(registers[:-2] + [64000]) as client:  # a vendor model's ID, then nothing
            with pytest.raises(LinkError, match="Modbus exception 2"):
                await client.connect()

    asyncio.run(main())


def test_a_device_without_sunspec_is_named_as_such():
    async def main():
        async with device_serving([7] * 10, at=0) as client:
            with pytest.raises(LinkError, match="not a SunSpec device"):
                await client.connect()

    asyncio.run(main())


def test_a_command_the_inverter_let_go_of_is_written_again_at_the_next_apply():
    """The inverter's revert fired (the gateway stalled past it, or the inverter restarted):
    the next poll finds it idle under a non-zero command, and the command is rewritten at once,
    not only when the refresh falls due."""

    async def scenario(rig):
        cmd = InverterCommand(4_000.0, "dispatch")
        await rig.client.apply(cmd)
        rig.advance(1.0)
        assert (await rig.client.read_status()).measured_w == pytest.approx(4_000.0)
        writes = rig.server.writes
        rig.model.controls["WSet"] = 0.0  # what a revert (or a restart) leaves in 704
        rig.advance(1.0)
        status = await rig.client.read_status()
        assert status.comms_ok and status.measured_w == 0.0
        await rig.client.apply(cmd)  # well inside the refresh time, yet written again
        assert rig.server.writes == writes + 1 and rig.model.wset_w == pytest.approx(4_000.0)
        rig.advance(1.0)
        await rig.client.read_status()
        await rig.client.apply(cmd)  # held again: nothing more to write
        assert rig.server.writes == writes + 1

    run(scenario)


def test_a_setpoint_that_reads_not_implemented_after_a_restart_is_written_again_not_an_error(caplog):
    """An inverter restarted with WSetEna kept and WSet reading "not implemented" (0x80000000), idle:
    the poll still answers (it used to raise and end the service's poll task) and the command is
    written again at the next apply."""

    async def scenario(rig):
        cmd = InverterCommand(4_000.0, "dispatch")
        await rig.client.apply(cmd)
        rig.advance(1.0)
        writes = rig.server.writes
        rig.model.controls["WSet"] = 0.0
        rig.advance(1.0)  # idle at 0 W
        rig.model.controls["WSet"] = None
        status = await rig.client.read_status()
        assert status.comms_ok and status.measured_w == 0.0
        await rig.client.apply(cmd)
        assert rig.server.writes == writes + 1 and rig.model.wset_w == pytest.approx(4_000.0)

    with caplog.at_level(logging.INFO):
        run(scenario)
    assert "holds WSet 'not implemented', not the 4000 W written" in caplog.text


def test_a_setpoint_the_scale_factor_cannot_carry_is_refused_as_a_link_error_not_raised():
    async def scenario(rig):
        writes = rig.server.writes
        await rig.client.apply(InverterCommand(3e8, "dispatch"))  # 3e9 in tenths of a watt: past int32
        assert rig.server.writes == writes
        assert "cannot write the setpoint" in (rig.client.last_error or "")
        assert await rig.client.safe_stop()  # the link itself is fine

    run(scenario)


def test_a_safe_stop_opens_a_dropped_link_once_more_to_write_zero():
    """The stop's 0 W was skipped whenever the link was down (a drop, a back-off), leaving the inverter
    at its setpoint until its revert timer: the link is opened once more for it, whatever the back-off."""

    async def scenario(rig):
        await rig.client.apply(InverterCommand(4_000.0, "dispatch"))
        assert rig.model.wset_w == pytest.approx(4_000.0)
        rig.server.drop_connections()
        for _ in range(500):  # nothing reconnects here (no poll): wait until the client has seen the drop
            if not rig.client.connected:
                break
            await asyncio.sleep(0.01)
        assert not rig.client.connected
        assert await rig.client.safe_stop()
        assert rig.model.wset_w == 0.0

    run(scenario)


def test_a_reconnect_writes_the_command_again_at_once():
    async def scenario(rig):
        cmd = InverterCommand(3_000.0, "dispatch")
        await rig.client.apply(cmd)
        writes = rig.server.writes
        rig.server.drop_connections()
        rig.advance(0.5)
        assert not (await rig.client.read_status()).comms_ok
        rig.now += 2.0  # past the reconnect back-off
        assert (await rig.client.read_status()).comms_ok  # reconnected and rediscovered
        await rig.client.apply(cmd)
        assert rig.server.writes == writes + 1 and rig.model.wset_w == pytest.approx(3_000.0)

    run(scenario)


def test_a_device_that_answers_the_marker_then_refuses_its_models_is_judged_on_its_model_chain():
    """Exceptions past the 'SunS' marker come from the device found at this unit id: sending the installer
    to change a unit id that answered would be wrong."""
    from firmware_py.commissioning.judgement import LinkTrouble, judge_inverter, link_trouble
    from firmware_py.commissioning.probes import probe_inverter

    async def main():
        registers = InverterModel().register_map(40000).registers()
        cut = registers[:2 + 2 + 66]  # the marker and model 1, then nothing: the next header is refused
        async with device_serving(cut) as client:
            obs = await probe_inverter(client, client.settings)
        assert obs.marker_at == 40000 and obs.error_kind == "exception"
        assert link_trouble(obs) is LinkTrouble.MODEL_CHAIN
        (check,) = judge_inverter(obs)
        assert "the SunSpec marker answers at 40000, but the model chain after it could not be read" in check.detail
        assert "unit_id" not in check.advice and "firmware and SunSpec settings" in check.advice

    asyncio.run(main())


class MovingDevice:
    """A Modbus TCP device on 127.0.0.1 whose SunSpec map can move to another base, or go away (answering
    exception 11 as a TCP<->RS-485 gateway does while the device behind it restarts), while the client's
    TCP connection stays up. Outside its map it answers exception 2 (ILLEGAL_ADDRESS), as devices do."""

    def __init__(self, base: int):
        self.connections = 0
        self.move(base)

    def move(self, base: int | None) -> None:
        self.base = base
        self.regs = [] if base is None else InverterModel().register_map(base).registers()

    def wset_w(self) -> float:
        """WSet as the device holds it now, scaled by the simulated inverter's WSet_SF."""
        m704 = ModelDef.load(704)
        at = InverterModel().register_map(self.base).addresses()[704] - self.base
        raw = m704.decode(self.regs[at:at + m704.size], scaled=False)
        return raw["WSet"] * 10.0 ** SCALE[704]["WSet_SF"]

    def reply(self, pdu: bytes) -> bytes:
        fc = pdu[0]
        if self.base is None:
            return bytes([fc | 0x80, 11])
        addr, n = struct.unpack(">HH", pdu[1:5])
        lo = addr - self.base
        if fc not in (3, 16) or lo < 0 or lo + n > len(self.regs):
            return bytes([fc | 0x80, 2])
        if fc == 3:
            return bytes([3, 2 * n]) + struct.pack(f">{n}H", *self.regs[lo:lo + n])
        self.regs[lo:lo + n] = struct.unpack(f">{n}H", pdu[6:6 + 2 * n])
        return pdu[:5]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                tid, _, length, unit = struct.unpack(">HHHB", await reader.readexactly(7))
                body = self.reply(await reader.readexactly(length - 1))
                writer.write(struct.pack(">HHHB", tid, 0, len(body) + 1, unit) + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


@pytest.mark.parametrize("restart", ["map moved", "unreachable, then map moved"])
def test_a_map_that_moves_base_while_tcp_stays_up_is_discovered_again(restart):
    """An inverter behind a Modbus TCP gateway restarts with its map at another base: the TCP link
    never drops, so the client polled the old address for ever (exception 2) and wrote nothing.
    Once discovered, exception 2 (or a gateway's 11) closes the link; the next poll rediscovers."""
    async def main():
        device = MovingDevice(40000)
        server = await asyncio.start_server(device.handle, "127.0.0.1", 0)
        now = [0.0]
        client = InverterClient(InverterConfig(port=server.sockets[0].getsockname()[1], timeout_s=0.5),
                                lambda: now[0])
        try:
            assert (await client.read_status()).comms_ok and client.discovery.base == 40000
            if restart.startswith("unreachable"):
                device.move(None)
                st = await client.read_status()
                assert not st.comms_ok and "Modbus exception 11" in st.error
            device.move(50000)
            for _ in range(4):  # bounded: each poll is past every back-off
                now[0] += 60.0
                st = await client.read_status()
                if st.comms_ok:
                    break
            assert st.comms_ok, st.error
            assert client.discovery.base == 50000
            await client.apply(InverterCommand(3_000.0, "dispatch"))
            assert client.last_error is None and device.wset_w() == pytest.approx(3_000.0)
        finally:
            await client.close()
            server.close()

    asyncio.run(main())


class StatusRefusingDevice(MovingDevice):
    """A device that is discovered, then refuses every status read (701 from its ID to TotWhAbs) with
    ILLEGAL_ADDRESS: once discovered, a reply that closes the link and sends the client to rediscover."""

    def reply(self, pdu: bytes) -> bytes:
        addr, n = struct.unpack(">HH", pdu[1:5])
        status_at = InverterModel().register_map(self.base).addresses()[701]
        if pdu[0] == 3 and addr == status_at and n == STATUS_SPAN[1]:
            return bytes([0x83, 2])
        return super().reply(pdu)


def test_a_link_that_connects_then_fails_every_poll_backs_off():
    """Only a poll that worked ends the back-off: each connect() reset it, so a device discovered at every
    connect whose polls then closed the link was reconnected and rediscovered at every poll, for ever."""
    async def main():
        device = StatusRefusingDevice(40000)
        server = await asyncio.start_server(device.handle, "127.0.0.1", 0)
        now = [0.0]
        client = InverterClient(InverterConfig(port=server.sockets[0].getsockname()[1], timeout_s=0.5),
                                lambda: now[0], backoff_min_s=1.0)
        try:
            for _ in range(10):  # ten polls a second apart: backing off 1, 2, 4 s, not a reconnect at each
                st = await client.read_status()
                assert not st.comms_ok and "Modbus exception 2" in st.error
                now[0] += 1.0
        finally:
            await client.close()
            server.close()
        assert device.connections <= 4, device.connections

    asyncio.run(main())


class SilentOutsideDevice(MovingDevice):
    """A device with its map at `base` that sends nothing at all for a read from `silent_from` on, as some
    devices (and RS-485 gateways) do for addresses they do not map."""

    def __init__(self, base: int, silent_from: int):
        super().__init__(base)
        self.silent_from = silent_from

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                tid, _, length, unit = struct.unpack(">HHHB", await reader.readexactly(7))
                pdu = await reader.readexactly(length - 1)
                if struct.unpack(">H", pdu[1:3])[0] >= self.silent_from:
                    continue
                body = self.reply(pdu)
                writer.write(struct.pack(">HHHB", tid, 0, len(body) + 1, unit) + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


@pytest.mark.parametrize(("base", "silent_from", "found"), [
    (0, 40000, "base 0"),
    (50000, 0, "looking for the 'SunS' marker: no reply within 0.2 s at 40000, 0, 50000"),
])
def test_a_base_that_times_out_sends_the_search_on_to_the_next(base, silent_from, found):
    """docs/sunspec.md promises 40000, then 0, then 50000: a timeout at 40000 ended the search, so a device
    silent outside its map at 0 was refused (and commissioning blamed the unit id). A device silent at every
    base is still told as a timeout (a silent unit id), after at most one timeout per base."""
    async def main() -> str:
        device = SilentOutsideDevice(base, silent_from)
        server = await asyncio.start_server(device.handle, "127.0.0.1", 0)
        client = InverterClient(InverterConfig(port=server.sockets[0].getsockname()[1], timeout_s=0.2),
                                lambda: 0.0)
        try:
            disc = await asyncio.wait_for(client.connect(), 3 * (0.2 + 0.5) + 2.0)
            return f"base {disc.base}"
        except LinkError as err:
            assert err.kind is ModbusErrorCause.TIMEOUT
            return str(err)
        finally:
            await client.close()
            server.close()

    assert found in asyncio.run(main())


def refused_with_scale_factor(model: int, point: str, raw: int):
    """The status of a device whose `point` reads `raw`, after a command it must not have been written."""
    async def main():
        smap = InverterModel().register_map(40000)
        registers = smap.registers()
        registers[smap.addresses()[model] - 40000 + ModelDef.load(model).offset(point)] = raw
        async with device_serving(registers) as client:
            status = await client.read_status()
            await client.apply(InverterCommand(3_000.0, "dispatch"))
            assert client.writes == 0
        return status

    return asyncio.run(main())


@pytest.mark.parametrize("model, point, value", [(701, "W_SF", 400), (704, "WSet_SF", -400), (702, "W_SF", 11)])
def test_a_scale_factor_outside_sunspec_range_is_a_link_error_not_a_crash(model, point, value):
    """A scale factor outside -10..10 overflowed (10.0 ** 400) or divided by zero (10.0 ** -400) inside
    read_status()/apply(), both documented never to raise: discovery refuses the device instead."""
    status = refused_with_scale_factor(model, point, value & 0xFFFF)
    assert not status.comms_ok
    assert f"model {model} {point} = {value} is outside -10..10: not a usable SunSpec device" in status.error


def test_a_discharge_rating_of_0_w_reads_as_cannot_discharge_not_as_not_reported():
    """702 `WDisChaRteMaxRtg` = 0 W was read as "not reported" (0.0, as "not implemented" was) and the core
    fell back to `WMaxRtg`: an inverter that said it cannot discharge was bounded at 11.5 kW."""
    async def main():
        async with SimInverterServer(InverterModel(Ratings(w_discha_max=0.0))) as server:
            client = InverterClient(InverterConfig(port=server.port, timeout_s=0.5), lambda: 0.0)
            try:
                await client.connect()
                return await client.read_status()
            finally:
                await client.close()

    status = asyncio.run(main())
    assert status.comms_ok and status.w_max_rtg == 11_500
    assert status.w_discha_max_rtg == 0 and status.discharge_rating_w() == 0


@pytest.mark.parametrize("model, point, unknown", [
    (701, "W_SF", "the measured power's unit is unknown"),
    (704, "WSet_SF", "the setpoint's unit is unknown"),
    (702, "W_SF", "the power ratings' unit is unknown"),
])
def test_a_needed_scale_factor_not_implemented_is_refused_like_one_out_of_range(model, point, unknown):
    """A scale factor reading "not implemented" (0x8000) was taken as 0: raw W 500 was 500 W to billing, and
    WSet written as watts in a unit nobody knew. Discovery refuses the device, as for an out-of-range one."""
    status = refused_with_scale_factor(model, point, 0x8000)
    assert not status.comms_ok
    assert f"model {model} {point} is 'not implemented' (0x8000): {unknown}: not a usable SunSpec device" \
        in status.error


def test_an_energy_scale_factor_not_implemented_is_accepted_while_no_counter_is():
    """701 `TotWh_SF` is needed only while a counter it scales is implemented: a device without energy
    counters is still usable (its counters read 0)."""
    async def main():
        smap = InverterModel().register_map(40000)
        registers = smap.registers()
        m701, at = ModelDef.load(701), smap.addresses()[701] - 40000
        for name in ("TotWh_SF", "TotWhInj", "TotWhAbs"):  # each "not implemented"
            point = m701.points[name]
            registers[at + point.offset:at + point.offset + point.size] = point.from_raw(None)
        async with device_serving(registers) as client:
            return await client.read_status()

    assert asyncio.run(main()).comms_ok
