"""The client against the simulated inverter over Modbus RTU: a pyserial `socket://` URL and a real pty pair.

The pty case bridges two pseudo-terminals (a software null-modem cable):
the server opens one tty, the client the other, both through pyserial.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import struct
import termios

import pytest
from firmware_py.sim.faults import InverterFault as Fault
from firmware_py.sim.inverter import InverterModel, SimInverterServer
from firmware_py.sim.ports import free_port

from firmware_py.config import InverterConfig
from firmware_py.core.types import InverterCommand
from firmware_py.inverter.client import InverterClient

BIG = 50_000.0


def _pending(fd: int) -> int:
    """Bytes waiting to be read on a pty master."""
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]


@contextlib.contextmanager
def _null_modem():
    """Two ptys whose masters are wired together; yields the two tty paths and `drained`,
    which returns once the relay has passed on every byte written to either end."""
    loop = asyncio.get_running_loop()
    (m1, s1), (m2, s2) = os.openpty(), os.openpty()
    moved = asyncio.Event()

    def relay(src: int, dst: int) -> None:
        with contextlib.suppress(OSError):
            os.write(dst, os.read(src, 4096))
        moved.set()

    async def drained() -> None:
        while _pending(m1) or _pending(m2):  # the relay's reader runs on the loop: wait for it to move bytes
            moved.clear()
            await moved.wait()

    loop.add_reader(m1, relay, m1, m2)
    loop.add_reader(m2, relay, m2, m1)
    try:
        yield os.ttyname(s1), os.ttyname(s2), drained
    finally:
        loop.remove_reader(m1)
        loop.remove_reader(m2)
        for fd in (m1, m2, s1, s2):
            os.close(fd)


async def _nothing_to_drain() -> None:
    return None


@contextlib.asynccontextmanager
async def _line(kind: str):
    """(client URL, server URL, drained) for one RTU line."""
    if kind == "socket":
        url = f"socket://127.0.0.1:{free_port()}"
        yield url, url, _nothing_to_drain  # a late reply goes to the connection the client dropped
    else:
        with _null_modem() as (a, b, drained):
            yield a, b, drained


class AnsweringServer(SimInverterServer):
    """The simulated inverter, telling the test when no request is being answered: every
    late (slow) reply has gone out on the line."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.answering = 0
        self.settled = asyncio.Event()
        self.settled.set()

    async def _action(self, *args):
        self.answering += 1
        self.settled.clear()
        try:
            return await super()._action(*args)
        finally:
            self.answering -= 1
            if not self.answering:
                self.settled.set()


async def replies_drained(server: AnsweringServer, line_drained) -> None:
    """Until every late reply has been sent by the server (it writes it as its action returns,
    before this wakes) and carried to the client's end of the line. By now the client has
    waited out each request's timeout, so none is still on its way to the server."""
    await asyncio.wait_for(server.settled.wait(), 5)
    await asyncio.wait_for(line_drained(), 5)


def run(kind, scenario):
    async def main():
        async with _line(kind) as (client_url, server_url, drained):
            model = InverterModel()
            async with AnsweringServer(model, rtu=server_url, slow_reply_s=0.4) as server:
                now = [0.0]
                cfg = InverterConfig(transport="rtu", serial_port=client_url, timeout_s=0.2, revert_timeout_s=3)
                client = InverterClient(cfg, lambda: now[0], backoff_min_s=1.0)
                await client.connect()
                try:
                    await scenario(model, client, now, lambda: replies_drained(server, drained))
                finally:
                    await client.close()

    asyncio.run(main())


KINDS = ["socket", "pty"]
# At most one spoiled exchange per request the client sent while the fault lasted (reads and writes).
LATE_REPLIES_BOUND = 12


@pytest.mark.parametrize("kind", KINDS)
def test_rtu_discovers_reads_and_commands(kind):
    async def scenario(model, client, now, drained):
        assert sorted(client.discovery.models) == [1, 701, 702, 703, 704, 713]
        await client.apply(InverterCommand(-4_000.0, "charge"))
        model.advance(1.0, 1.0, BIG, BIG)
        st = await client.read_status(setpoint=True)
        assert st.comms_ok and st.measured_w == pytest.approx(-4_000.0) and st.wset_w == pytest.approx(-4_000.0)
        assert model.controls["WSetEnaRvrt"] == 1 and model.controls["WSetRvrtTms"] == 3

    run(kind, scenario)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fault", [Fault.MODBUS_EXCEPTION, Fault.SLOW_REPLY, Fault.DROP_CONNECTION])
def test_rtu_faults_end_as_comms_lost_and_zero_watts(kind, fault):
    async def scenario(model, client, now, drained):
        await client.apply(InverterCommand(5_000.0, "dispatch"))
        model.advance(1.0, 1.0, BIG, BIG)
        model.inject(fault, until=1e9)
        for t in range(2, 6):
            now[0] = float(t)
            st = await client.read_status()
            assert not st.comms_ok and st.measured_w == 0.0 and st.error
            await client.apply(InverterCommand(5_000.0, "dispatch"))
            model.advance(1.0, float(t), BIG, BIG)
        assert model.ac_power_w == 0.0  # the inverter's own revert took it to 0 W
        model.inject(fault, until=model.now)
        await drained()  # a late (slow) reply has left the server and the line before the client reconnects
        now[0] += 60.0
        st = await client.read_status()
        for _ in range(LATE_REPLIES_BOUND):
            if st.comms_ok:
                break
            # A request queued behind the slow ones can still be answered late and spoil an exchange
            # (RTU has no transaction id, and the server is briefly idle between queued requests, more
            # than once on a loaded machine); the client must recover on a later poll, never stay down.
            await drained()
            now[0] += 60.0
            st = await client.read_status()
        assert st.comms_ok, st.error

    run(kind, scenario)
