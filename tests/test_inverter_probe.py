"""`powershare-gw inverter probe` against the simulated inverter over Modbus TCP (real pymodbus on both sides)."""

from __future__ import annotations

import asyncio

import pytest
from firmware_py.sim.inverter import SCALE, InverterModel, SimInverterServer
from firmware_py.sim.ports import free_port

from firmware_py import narration
from firmware_py.config import InverterConfig
from firmware_py.errors import InputError
from firmware_py.inverter.commands import _probe


@pytest.mark.parametrize(("es", "said"), [
    (None, "enter service (703): ES not implemented,"),
    (0, "enter service (703): NOT permitted,"),
    (1, "enter service (703): permitted,"),
])
def test_probe_tells_enter_service_not_implemented_from_not_permitted(es, said):
    """703 `ES` reading 'not implemented' was printed as 'NOT permitted': an installer was sent to change a
    setting the inverter does not have. 'NOT permitted' is for ES = 0 alone."""
    async def main() -> list[str]:
        model = InverterModel()
        model.controls["ES"] = es
        async with SimInverterServer(model) as server:
            return await asyncio.wait_for(_probe(InverterConfig(port=server.port, timeout_s=0.5)), 20)

    (line,) = [line for line in asyncio.run(main()) if line.startswith("enter service (703)")]
    assert line.startswith(said), line


def test_probe_tells_a_wrong_unit_id_from_a_device_that_is_not_sunspec():
    """A SunSpec inverter at unit 2, [inverter] unit_id = 1: the probe said 'not a SunSpec device', with no
    address or unit id, where commission said the unit id was wrong. Both now give commission's diagnosis."""
    async def main() -> None:
        model = InverterModel(unit_id=2)
        async with SimInverterServer(model) as server:
            await asyncio.wait_for(_probe(InverterConfig(port=server.port, unit_id=1, timeout_s=0.5)), 20)

    with pytest.raises(InputError) as caught:
        asyncio.run(main())
    (said,) = caught.value.problems
    assert said.startswith("inverter: 127.0.0.1:"), said
    assert "a Modbus device answers there, but not for unit id 1" in said
    assert "check [inverter] unit_id (1)" in said and "it is not a SunSpec device" not in said


def _peer(behaviour: str):
    """A TCP listener on 127.0.0.1 that is not a Modbus device (or is a silent one)."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if behaviour == "http":  # answers the first bytes at once, as a web server refusing them
                await reader.read(1)
                writer.write(b"HTTP/1.0 400 Bad request\r\nContent-Type: text/html\r\n\r\n<html>\x1b[2J</html>")
            elif behaviour == "http_at_eof":  # a line-based server: answers when the request's stream ends
                await reader.read()
                writer.write(b"HTTP/1.0 400 Bad request\r\n\r\n")
            elif behaviour == "echo":  # an echo service: every request comes back as it was sent
                while data := await reader.read(256):
                    writer.write(data)
                    await writer.drain()
            elif behaviour == "silent":  # a Modbus device that ignores another unit id's requests
                await reader.read()
                return
            await writer.drain()
        finally:
            writer.close()
    return handle


@pytest.mark.parametrize(("behaviour", "said"), [
    ("close", "(it closed the connection)"),
    ("http", "(it answered `HTTP/1.0 400 Bad request\\r\\nConten...`)"),
    ("http_at_eof", "(it answered `HTTP/1.0 400 Bad request\\r\\n\\r\\n`)"),
    ("echo", "(it sent back the request it was sent, as an echo or loopback service does)"),
])
def test_probe_tells_a_peer_that_is_not_modbus_from_a_wrong_unit_id(behaviour, said, caplog):
    """An HTTP server (the inverter's web port) or a listener that closes at once: the probe said 'nothing
    answered for unit id 1' or 'a Modbus device answers there, but not for unit id 1' and sent the installer
    to [inverter] unit_id. It now says something listens there that is not Modbus TCP, and to check the host
    and port, quoting a short, escaped prefix of what it answered."""
    async def main() -> None:
        port = free_port()
        server = await asyncio.start_server(_peer(behaviour), "127.0.0.1", port)
        async with server:
            await asyncio.wait_for(_probe(InverterConfig(host="127.0.0.1", port=port, timeout_s=0.3)), 20)

    with pytest.raises(InputError) as caught:
        asyncio.run(main())
    (message,) = caught.value.problems
    assert "but it is not Modbus TCP " + said in message, message
    assert "check [inverter] host and port" in message and "unit_id" not in message, message
    assert "\x1b" not in message
    # An echo's reply is a frame pymodbus cannot decode: asyncio reports the exception raised in pymodbus's
    # callback, traceback and all, on every connection. It is pymodbus's, quieted as pymodbus is.
    reported = [r for r in caplog.records if r.name == "asyncio" and r.exc_info]
    assert (behaviour == "echo") <= bool(reported)
    assert not any(narration._quiet(r) for r in reported), [r.getMessage() for r in reported]


def test_probe_keeps_the_unit_id_hint_for_true_silence():
    """A peer that keeps the connection open and says nothing is a Modbus device silent for this unit id."""
    async def main() -> None:
        port = free_port()
        server = await asyncio.start_server(_peer("silent"), "127.0.0.1", port)
        async with server:
            await asyncio.wait_for(_probe(InverterConfig(host="127.0.0.1", port=port, timeout_s=0.3)), 20)

    with pytest.raises(InputError) as caught:
        asyncio.run(main())
    (message,) = caught.value.problems
    assert "nothing answered for unit id 1 within 0.3 s" in message and "check [inverter] unit_id (1)" in message
    assert "not Modbus TCP" not in message


def test_probe_refuses_an_inverter_whose_power_scale_factor_is_not_implemented(monkeypatch):
    """701 `W_SF` reading "not implemented" (0x8000) was taken as 0: the probe printed raw W 500 as 'W 500 W',
    the number billing and the sign test read. It is refused now, as an out-of-range scale factor is."""
    monkeypatch.setitem(SCALE[701], "W_SF", None)

    async def main() -> list[str]:
        model = InverterModel()
        async with SimInverterServer(model) as server:
            return await asyncio.wait_for(_probe(InverterConfig(port=server.port, timeout_s=0.5)), 20)

    with pytest.raises(InputError) as caught:
        asyncio.run(main())
    (said,) = caught.value.problems
    assert "model 701 W_SF is 'not implemented' (0x8000): the measured power's unit is unknown" in said, said
