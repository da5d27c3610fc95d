"""SunSpec Modbus conformance for IEEE 1547-2018, after SunSpec's test procedures, for both devices.

Modelled on the "SunSpec Modbus Conformance for IEEE 1547-2018 Test Procedures" (device
tests DEV-1, DEV-2, TCP-1..3; model tests MOD-1..3; reversion REV-1..3; scale factors;
rejection), run against the gateway's own SunSpec DER server and against the simulated
inverter, with pysunspec2 (SunSpec's own client) as the test client, as a lab would. Both
devices come from one lock-step rig (`lockstep.Rig`: the gateway assembled as `run` does,
and the simulated inverter it drives) on a loop thread; pysunspec2 is synchronous and
talks to them over Modbus TCP on 127.0.0.1. Reversion runs on the devices' injected clocks:
the gateway's monotonic clock and the inverter model's time, moved by the test, never waited for.

README.md's conformance table lists each procedure, what is checked here and the result.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from typing import Any

import pytest
from lockstep import Rig
from sunspec2.modbus.client import SunSpecModbusClientDeviceTCP
from sunspec2.modbus.modbus import ModbusClientException

from firmware_py.dispatch.sunspec_der import CONTROL_DEFAULTS
from firmware_py.dispatch.sunspec_server import SunSpecDerServer
from firmware_py.inverter.sunspec import ModelDef

ILLEGAL_ADDRESS, ILLEGAL_VALUE = 2, 3
BIG = 50_000.0


def definition(model_id: int) -> dict[str, Any]:
    """The model's SunSpec JSON as pysunspec2 ships it (mandatory flags, access, symbols)."""
    path = resources.files("sunspec2").joinpath("models", "json", f"model_{model_id}.json")
    return json.loads(path.read_text(encoding="utf-8"))


def mandatory_points(model_id: int) -> list[str]:
    found: list[str] = []

    def walk(group: dict, prefix: str) -> None:
        found.extend(prefix + p["name"] for p in group.get("points", []) if p.get("mandatory") == "M")
        for sub in group.get("groups", []):
            walk(sub, f"{prefix}{sub['name']}.")

    walk(definition(model_id)["group"], "")
    return found


# ---------------------------------------------------------------- the two devices


@dataclass
class Device:
    """One device under test: where it listens, how its clock moves, what its 704 implements."""

    name: str
    port: int
    models: tuple[int, ...]
    writable_704: tuple[str, ...]
    move_clock: Callable[[float], None]

    def client(self) -> SunSpecModbusClientDeviceTCP:
        dev = SunSpecModbusClientDeviceTCP(slave_id=1, ipaddr="127.0.0.1", ipport=self.port, timeout=2)
        dev.scan()
        return dev


class Bench:
    """The rig on its own event loop thread, so pysunspec2 can drive it synchronously."""

    def __init__(self, tmp) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.rig = Rig(tmp, configure=_with_der_server)
        self.call(self.rig.__aenter__())
        server = self.rig.assembly.integrations["dispatch.sunspec_server"]
        assert isinstance(server, SunSpecDerServer)
        self.server = server
        self.der_port = self.call(server.start(self.rig.gateway))

    def call(self, coro: Any, timeout_s: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def close(self) -> None:
        try:
            self.call(self.server.stop())
            self.call(self.rig.__aexit__(None, None, None))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            self.loop.close()

    def move_gateway_clock(self, seconds: float) -> None:
        async def move() -> None:
            self.rig.time.mono += seconds
        self.call(move())

    def move_inverter_clock(self, seconds: float) -> None:
        async def move() -> None:
            model = self.rig.model
            model.advance(seconds, model.now + seconds, BIG, BIG)
        self.call(move())


def _with_der_server(config):
    from dataclasses import replace

    served = replace(config.dispatch.sunspec_server, enabled=True, listen="127.0.0.1:0")
    return replace(config, dispatch=replace(config.dispatch, sunspec_server=served))


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Iterator[Bench]:
    b = Bench(tmp_path_factory.mktemp("conformance"))
    try:
        yield b
    finally:
        b.close()


def _sim_writable() -> tuple[str, ...]:
    return tuple(p.name for p in ModelDef.load(704).points.values() if p.writable)


@pytest.fixture(params=["gateway DER server", "simulated inverter"])
def device(request, bench: Bench) -> Device:
    if request.param == "gateway DER server":
        return Device(request.param, bench.der_port, (1, 701, 702, 704, 713), tuple(sorted(CONTROL_DEFAULTS)),
                      bench.move_gateway_clock)
    return Device(request.param, bench.rig.server.port, (1, 701, 702, 703, 704, 713), _sim_writable(),
                  bench.move_inverter_clock)


def exception_code(action: Callable[[], Any]) -> int | None:
    """The Modbus exception code an action got (pysunspec2 raises it as text), None when it succeeded."""
    try:
        action()
    except ModbusClientException as err:
        found = re.search(r"Modbus exception:? (\d+)", str(err))
        assert found, str(err)
        return int(found.group(1))
    return None


# ---------------------------------------------------------------- device level


def test_dev1_general_discovery(device: Device):
    """'SunS' at a SunSpec base address, a model chain that walks to the end model, every model known."""
    dev = device.client()
    try:
        assert dev.base_addr == 40_000
        assert tuple(m for m in dev.models if isinstance(m, int)) == device.models
        last = dev.models[device.models[-1]][0]
        end = dev.read(last.model_addr + last.model_len + 2, 2)
        assert struct.unpack(">HH", end) == (0xFFFF, 0)
    finally:
        dev.close()


def test_dev2_model_1_first_with_its_mandatory_points(device: Device):
    dev = device.client()
    try:
        common = dev.models[1][0]
        assert common.model_addr == 40_002 and common.model_len == 66
        for name in ("Mn", "Md", "SN"):
            assert getattr(common, name).value, name
    finally:
        dev.close()


def _mbap_read(transaction: int, address: int, count: int) -> bytes:
    pdu = struct.pack(">BHH", 3, address, count)
    return struct.pack(">HHHB", transaction, 0, len(pdu) + 1, 1) + pdu


def _reply(sock: socket.socket) -> tuple[int, bytes]:
    transaction, _, length, _ = struct.unpack(">HHHB", _exactly(sock, 7))
    return transaction, _exactly(sock, length - 1)


def _exactly(sock: socket.socket, size: int) -> bytes:
    """`size` bytes; a peer that closes first fails the test (recv gives b"" at once, for ever)."""
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise AssertionError(f"the device closed the connection after {len(data)} of {size} bytes")
        data += chunk
    return data


def test_tcp1_tcp_interface_answers_with_the_request_transaction_id(device: Device):
    with socket.create_connection(("127.0.0.1", device.port), timeout=2) as sock:
        sock.sendall(_mbap_read(0x1234, 40_000, 2))
        transaction, body = _reply(sock)
    assert transaction == 0x1234 and body == bytes([3, 4]) + b"SunS"


def test_tcp2_a_request_split_across_packets_is_answered(device: Device):
    frame = _mbap_read(7, 40_000, 4)
    with socket.create_connection(("127.0.0.1", device.port), timeout=2) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(frame[:5])
        sock.sendall(frame[5:])
        transaction, body = _reply(sock)
    assert transaction == 7 and body[:2] == bytes([3, 8]) and body[2:6] == b"SunS"


def test_tcp3_several_requests_in_one_packet_are_each_answered_in_order(device: Device):
    frames = b"".join(_mbap_read(n, 40_000 + n, 1) for n in range(1, 4))
    with socket.create_connection(("127.0.0.1", device.port), timeout=2) as sock:
        sock.sendall(frames)
        replies = [_reply(sock) for _ in range(3)]
    assert [t for t, _ in replies] == [1, 2, 3]
    assert [b[:2] for _, b in replies] == [bytes([3, 2])] * 3


# ---------------------------------------------------------------- model level


def test_mod1_every_model_is_as_long_as_its_definition_with_mandatory_points_implemented(device: Device):
    dev = device.client()
    try:
        for model_id in device.models:
            model = dev.models[model_id][0]
            assert model.model_len == ModelDef.load(model_id).length, model_id
            for name in mandatory_points(model_id):
                if name not in ("ID", "L"):
                    assert getattr(model, name).value is not None, f"{model_id}.{name}"
    finally:
        dev.close()


def test_mod2_models_read_whole_and_point_by_point_agree(device: Device):
    dev = device.client()
    try:
        for model_id in (1, 702):  # models with no live values: a whole read and point reads must agree
            model = dev.models[model_id][0]
            model.read()
            whole = {name: point.value for name, point in model.points.items()}
            for name, point in model.points.items():
                point.read()
                assert point.value == whole[name], f"{model_id}.{name}"
        for model_id in device.models:  # every live model reads whole, in one request or in pieces
            dev.models[model_id][0].read()
    finally:
        dev.close()


def _value_for(point) -> Any:
    """A valid value other than the current one for a writable point (what a lab would write)."""
    pdef = point.pdef
    if pdef.get("symbols"):
        values = sorted(s["value"] for s in pdef["symbols"])
        return next(v for v in values if v != point.value) if len(values) > 1 else values[0]
    units = pdef.get("units")
    by_units = {"Secs": 37, "Pct": 55, "W": 1_234, "Var": 321, "%Max/Sec": 10, "Hz": 59.9, "V": 120}
    if pdef["name"] == "PF":
        return 0.95
    if pdef["name"] in ("ESVHi",):
        return 110
    if pdef["name"] in ("ESHzHi",):
        return 60.5
    return by_units.get(units, 1)


def test_mod3_every_implemented_writable_704_point_reads_back_as_written(device: Device):
    dev = device.client()
    try:
        ctl = dev.models[704][0]
        checked = []
        for name in device.writable_704:
            holder, _, last = name.rpartition(".")
            group = getattr(ctl, holder) if holder else ctl  # a point of a fixed group (PFWInj.PF) or of 704
            point = getattr(group, last)
            wrote = _value_for(point)
            point.cvalue = wrote
            group.write()  # writes what changed: this point
            group.read()  # at once: the value of the last successful write
            assert point.cvalue == pytest.approx(wrote), f"{device.name}: 704.{name}"
            checked.append(name)
        assert len(checked) == len(device.writable_704)
        if 703 in device.models:  # the enter-service settings too
            es = dev.models[703][0]
            for name in ("ES", "ESVHi", "ESVLo", "ESHzHi", "ESHzLo", "ESDlyTms", "ESRndTms", "ESRmpTms"):
                point = getattr(es, name)
                wrote = _value_for(point) if name not in ("ESVLo", "ESHzLo") else {"ESVLo": 90, "ESHzLo": 59.3}[name]
                point.cvalue = wrote
                point.write()
                point.read()
                assert point.cvalue == pytest.approx(wrote), f"703.{name}"
            es.ES.value, es.ESDlyTms.value, es.ESRmpTms.value = 1, 300, 300
            es.write()
    finally:
        _reset_controls(dev)
        dev.close()


def _reset_controls(dev: SunSpecModbusClientDeviceTCP) -> None:
    ctl = dev.models[704][0]
    for name, value in (("WSetEna", 0), ("WSetMod", 1), ("WSet", 0), ("WSetRvrt", 0), ("WSetEnaRvrt", 0),
                        ("WSetRvrtTms", 0), ("WMaxLimPctEna", 0), ("WMaxLimPct", 100), ("WMaxLimPctRvrt", 100),
                        ("WMaxLimPctEnaRvrt", 0), ("WMaxLimPctRvrtTms", 0), ("WSetPct", 0), ("WSetPctRvrt", 0)):
        getattr(ctl, name).cvalue = value
        getattr(ctl, name).write()


def test_unimplemented_704_points_are_refused_not_silently_ignored(bench: Bench):
    """The DER server implements the active-power points only: a write it would ignore gets
    ILLEGAL_DATA_ADDRESS (and the point reads as not implemented) rather than lying."""
    dev = Device("gateway DER server", bench.der_port, (), (), bench.move_gateway_clock).client()
    try:
        ctl = dev.models[704][0]
        for name in ("PFWInjEna", "VarSetEna", "WRmp", "AntiIslEna"):
            assert getattr(ctl, name).value is None
            data = ModelDef.load(704).encode_point(name, 1)
            address = ctl.model_addr + ModelDef.load(704).offset(name)
            assert exception_code(lambda: dev.write(address, struct.pack(f">{len(data)}H", *data))) == ILLEGAL_ADDRESS
    finally:
        dev.close()


def test_scale_factors_are_in_range_constant_and_applied(device: Device):
    dev = device.client()
    try:
        for model_id in device.models:
            model = dev.models[model_id][0]
            for name, point in model.points.items():
                if point.pdef["type"] == "sunssf" and point.value is not None:
                    assert -10 <= point.value <= 10, f"{model_id}.{name} = {point.value}"
        ctl = dev.models[704][0]
        before = {n: p.value for n, p in ctl.points.items() if p.pdef["type"] == "sunssf"}
        ctl.WSet.cvalue = 2_500
        ctl.WSet.write()
        raw = struct.unpack(">i", dev.read(ctl.model_addr + ModelDef.load(704).offset("WSet"), 2))[0]
        assert raw * 10 ** ctl.WSet_SF.value == pytest.approx(2_500)  # the scale factor applied to the raw value
        ctl.read()
        assert {n: p.value for n, p in ctl.points.items() if p.pdef["type"] == "sunssf"} == before
        ctl.WSet.cvalue = 0
        ctl.WSet.write()
    finally:
        dev.close()


def test_rejection_out_of_range_and_read_only_writes_get_the_right_exception_and_change_nothing(device: Device):
    dev = device.client()
    try:
        ctl = dev.models[704][0]
        m704, m701 = ModelDef.load(704), ModelDef.load(701)
        sf = ctl.WSet_SF.value or 0
        wmax = dev.models[702][0].WMaxRtg.cvalue

        def write(model, point: str, raw: int) -> int | None:
            regs = ModelDef.load(model.model_id).point(point).from_raw(raw)
            address = model.model_addr + ModelDef.load(model.model_id).offset(point)
            return exception_code(lambda: dev.write(address, struct.pack(f">{len(regs)}H", *regs)))

        ctl.read()
        before = (ctl.WSet.cvalue, ctl.WMaxLimPct.cvalue, ctl.WSetEna.value)
        assert write(ctl, "WSet", round((wmax + 1_000) / 10 ** sf)) == ILLEGAL_VALUE  # beyond the rating
        assert write(ctl, "WMaxLimPct", 101) == ILLEGAL_VALUE  # beyond 100 %
        assert write(ctl, "WSetEna", 2) == ILLEGAL_VALUE  # not an enumerated value
        assert write(dev.models[701][0], "W", 100) == ILLEGAL_ADDRESS  # read-only measurement
        assert write(ctl, "WSetRvrtRem", 5) == ILLEGAL_ADDRESS  # read-only countdown
        ctl.read()
        assert (ctl.WSet.cvalue, ctl.WMaxLimPct.cvalue, ctl.WSetEna.value) == before  # nothing changed
        assert m704 and m701
    finally:
        dev.close()


# ---------------------------------------------------------------- reversion


def _arm(ctl, **values: Any) -> None:
    for name, value in values.items():
        getattr(ctl, name).cvalue = value
    ctl.write()


def test_rev1_wset_returns_to_wsetrvrt_when_its_reversion_time_runs_out(device: Device):
    dev = device.client()
    try:
        ctl = dev.models[704][0]
        _arm(ctl, WSetRvrt=500, WSetEnaRvrt=1, WSetRvrtTms=10, WSetMod=1, WSet=2_000, WSetEna=1)
        device.move_clock(9.0)
        ctl.read()
        assert ctl.WSet.cvalue == pytest.approx(2_000) and ctl.WSetRvrtRem.value == 1
        device.move_clock(1.0)
        ctl.read()
        assert ctl.WSet.cvalue == pytest.approx(500) and ctl.WSetRvrtRem.value == 0  # in time, to WSetRvrt
    finally:
        _reset_controls(dev)
        dev.close()


def test_rev2_a_new_reversion_time_restarts_the_timer(device: Device):
    dev = device.client()
    try:
        ctl = dev.models[704][0]
        _arm(ctl, WSetRvrt=0, WSetEnaRvrt=1, WSetRvrtTms=10, WSetMod=1, WSet=3_000, WSetEna=1)
        device.move_clock(6.0)
        ctl.WSetRvrtTms.value = 20  # the update: 20 s from now
        ctl.WSetRvrtTms.write()
        device.move_clock(15.0)
        ctl.read()
        assert ctl.WSet.cvalue == pytest.approx(3_000) and ctl.WSetRvrtRem.value == 5
        device.move_clock(5.0)
        ctl.read()
        assert ctl.WSet.cvalue == 0
    finally:
        _reset_controls(dev)
        dev.close()


def test_rev3_disabling_reversion_cancels_it(device: Device):
    dev = device.client()
    try:
        ctl = dev.models[704][0]
        _arm(ctl, WSetRvrt=0, WSetEnaRvrt=1, WSetRvrtTms=10, WSetMod=1, WSet=4_000, WSetEna=1)
        device.move_clock(5.0)
        ctl.WSetEnaRvrt.value = 0
        ctl.WSetEnaRvrt.write()
        device.move_clock(20.0)
        ctl.read()
        assert ctl.WSet.cvalue == pytest.approx(4_000) and ctl.WSetRvrtRem.value == 0
    finally:
        _reset_controls(dev)
        dev.close()


def test_wmaxlimpct_returns_to_its_reversion_value_in_time(device: Device):
    dev = device.client()
    try:
        ctl = dev.models[704][0]
        _arm(ctl, WMaxLimPctRvrt=100, WMaxLimPctEnaRvrt=1, WMaxLimPctRvrtTms=10, WMaxLimPct=30, WMaxLimPctEna=1)
        device.move_clock(9.0)
        ctl.read()
        assert ctl.WMaxLimPct.cvalue == pytest.approx(30) and ctl.WMaxLimPctRvrtRem.value == 1
        device.move_clock(1.0)
        ctl.read()
        assert ctl.WMaxLimPct.cvalue == pytest.approx(100) and ctl.WMaxLimPctRvrtRem.value == 0
    finally:
        _reset_controls(dev)
        dev.close()
