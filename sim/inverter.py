"""The simulated 11.5 kW bidirectional "Powershare" inverter.

Two halves. `InverterModel` is pure (no I/O, time passed in): it follows the
SunSpec 704 controls a real DER would (WSet, WSetEna, WMaxLimPct, and both
revert functions, so a silent gateway still ends at 0 W), moves energy to and from
the pack through an efficiency, islands on a grid outage and can be told to
misbehave. After an outage it enters service again as IEEE 1547-2018 requires
(model 703): no power at all for `ESDlyTms` (300 s by default; `ESDlyRemTms`
counts down, `ConnSt` DISCONNECTED, `InvSt` STARTING), then at most a share of
its rating that rises linearly over `ESRmpTms` (300 s). Writes out of range
(a setpoint beyond the rating, a percentage outside 0..100, an undefined enum)
are refused with ILLEGAL_DATA_VALUE, read-only points with ILLEGAL_DATA_ADDRESS. `SimInverterServer` serves it over Modbus (TCP, or RTU on any
pyserial URL) with pymodbus 3.16's `SimDevice`/`SimData` API: the device
`action` hook refreshes the live models before each read and applies each
write to the model, so the registers are never a second copy of the truth.
Register layouts come from `firmware_py.inverter.sunspec` (pysunspec2's JSON),
the same definitions the gateway's client uses.

Ramping: the inverter ramps *up* at its ramp rate but drops toward 0 W at
once, as real DER do on a stop or a revert (a safe stop must not take seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import can
from firmware_py.sim.battery import Battery
from firmware_py.sim.bms_node import BmsNode
from firmware_py.sim.faults import InverterFault

from firmware_py.addresses import parse_host_port
from firmware_py.arguments import number, whole
from firmware_py.core.types import InverterState
from firmware_py.errors import InputError
from firmware_py.inverter.sunspec import (
    COMMON,
    DEFAULT_BASE,
    DER_CAPACITY,
    DER_CONTROL_AC,
    DER_ENTER_SERVICE,
    DER_MEASURE_AC,
    DER_STORAGE,
    AlrmBit,
    ModelDef,
    SunSpecMap,
    WSetMod,
)

log = logging.getLogger(__name__)

FAULT_ALARM_BIT = AlrmBit.OVER_TEMP  # the alarm a simulated inverter fault raises

# The simulated inverter's model chain: the gateway's own DER set, and IEEE 1547 enter service (703).
SIM_MODELS = (COMMON, DER_MEASURE_AC, DER_CAPACITY, DER_ENTER_SERVICE, DER_CONTROL_AC, DER_STORAGE)

# IEEE 1547-2018 enter-service defaults (Table 4 ranges' defaults): voltage 91.7..105 % of nominal,
# frequency 59.5..60.1 Hz, a 300 s delay and a 300 s ramp.
ENTER_SERVICE_DEFAULTS: dict[str, Any] = {
    "ES": 1, "ESVHi": 105.0, "ESVLo": 91.7, "ESHzHi": 60.1, "ESHzLo": 59.5,
    "ESDlyTms": 300, "ESRndTms": 0, "ESRmpTms": 300,
}

# Engineering ranges the simulated inverter accepts for its writable points (beyond: ILLEGAL_DATA_VALUE).
PCT_RANGES = {"WMaxLimPct": (0.0, 100.0), "WMaxLimPctRvrt": (0.0, 100.0), "WSetPct": (-100.0, 100.0),
              "WSetPctRvrt": (-100.0, 100.0), "ESVHi": (100.0, 120.0), "ESVLo": (50.0, 100.0)}
HZ_RANGES = {"ESHzHi": (60.0, 66.0), "ESHzLo": (50.0, 60.0)}
SECONDS_MAX = 86_400 * 7  # a revert or enter-service time beyond a week is a mistake, not a setting
# Scale factors the simulated device publishes: WSet in 0.1 W exercises a client's scaling.
SCALE = {
    701: {"W_SF": 0, "VA_SF": 0, "Var_SF": 0, "PF_SF": -2, "A_SF": -2, "V_SF": -1, "Hz_SF": -2,
          "TotWh_SF": 0, "TotVarh_SF": 0, "Tmp_SF": 0},
    702: {"W_SF": 0, "PF_SF": -2, "VA_SF": 0, "Var_SF": 0, "V_SF": -1, "A_SF": -1, "S_SF": 0},
    704: {"PF_SF": -2, "WMaxLimPct_SF": 0, "WSet_SF": -1, "WSetPct_SF": 0, "VarSet_SF": 0,
          "VarSetPct_SF": 0},
    713: {"WH_SF": 1, "Pct_SF": -1},
    703: {"V_SF": -1, "Hz_SF": -2},
}


@dataclass(frozen=True)
class Ratings:
    w_max: float = 11_500.0
    w_cha_max: float = 11_500.0
    w_discha_max: float = 11_500.0
    ramp_w_per_s: float = 11_500.0
    efficiency: float = 0.96
    v_nom: float = 240.0
    wh_rtg: float = 123_000.0


def default_home_load(now: float) -> float:
    """A plausible home: 1.2 kW base, up to 3.2 kW in the evening (now = seconds, UTC day)."""
    hour = (now / 3600.0) % 24.0
    return 1_200.0 + 2_000.0 * math.exp(-((hour - 19.0) ** 2) / 8.0)


class InverterModel:
    """The inverter's behaviour, advanced by whoever owns time (the bench or a real-time loop)."""

    def __init__(self, ratings: Ratings = Ratings(), *, home_load: Callable[[float], float] = default_home_load,
                 now: float = 0.0, unit_id: int = 1, reversed_w: bool = False):
        self.ratings = ratings
        self.home_load = home_load
        self.unit_id = unit_id
        self.reversed_w = reversed_w
        """Report 701 `W` with the wrong sign (a meter or CT fitted backwards, a vendor's own convention)
        while the power itself flows as commanded: what commissioning's sign self-test must catch."""
        self.now = now
        self.faults: dict[InverterFault, float] = {}
        self.exception_code = 4
        """What a `modbus_exception` fault answers every request with (4: SLAVE_DEVICE_FAILURE)."""
        self.ac_power_w = 0.0
        self.tot_wh_inj = 0.0
        self.tot_wh_abs = 0.0
        self.throttled = False
        self.reverted = False
        self.soc_pct: float | None = None
        """The pack's SoC for model 713, when whoever owns the pack tells us."""
        self.on_wset: Callable[[float], None] | None = None
        """Told each WSet as it is accepted (the benchmarks time reactions by it)."""
        self.controls: dict[str, Any] = {
            "WSetEna": 0, "WSetMod": WSetMod.WATTS, "WSet": 0.0, "WSetRvrt": 0.0, "WSetEnaRvrt": 0,
            "WSetRvrtTms": 0, "WMaxLimPctEna": 0, "WMaxLimPct": 100, "WMaxLimPctRvrt": 100,
            "WMaxLimPctEnaRvrt": 0, "WMaxLimPctRvrtTms": 0, "WMax": ratings.w_max, "AntiIslEna": 1,
            "WSetPct": 0, "WSetPctRvrt": 0, "WRmp": None, "WRmpRef": 1, **ENTER_SERVICE_DEFAULTS,
        }
        self.last_refresh = now
        self.limit_refresh = now  # the WMaxLimPct revert function's last refresh
        self.limit_reverted = False
        self.grid_back_at: float | None = None
        """When the grid last came back after an outage: the enter-service delay and ramp run from it."""
        self._islanded = False

    # --- the bench's contract -------------------------------------------------
    @property
    def wset_w(self) -> float:
        return float(self.controls["WSet"])

    def inject(self, kind: InverterFault | str, until: float) -> None:
        """Make `kind` go wrong until time `until` (math.inf: until cleared with until=now)."""
        self.faults[InverterFault(kind)] = until

    def active(self, kind: InverterFault) -> bool:
        return self.faults.get(kind, -math.inf) > self.now

    def advance(self, dt_s: float, now: float, pack_max_discharge_w: float, pack_max_charge_w: float) -> float:
        """Move time on by `dt_s` to `now`; return DC power drawn from the pack (+ = discharge)."""
        self.now = now
        self._check_grid()
        self._check_revert()
        target = self._limited(self._wanted(), pack_max_discharge_w, pack_max_charge_w)
        self.ac_power_w = self._ramped(target, dt_s)
        hours = max(dt_s, 0.0) / 3600.0
        self.tot_wh_inj += max(self.ac_power_w, 0.0) * hours
        self.tot_wh_abs += max(-self.ac_power_w, 0.0) * hours
        eff = self.ratings.efficiency
        return self.ac_power_w / eff if self.ac_power_w >= 0 else self.ac_power_w * eff

    # --- control writes ---------------------------------------------------------
    def write(self, name: str, value: Any) -> None:
        """Apply one written control point (engineering units); a write to a setpoint or its revert
        settings refreshes that revert timer."""
        self.controls[name] = value
        if name == "WSet" and self.on_wset is not None:
            self.on_wset(float(value))
        if name in ("WSet", "WSetPct", "WSetEna", "WSetMod", "WSetRvrtTms", "WSetEnaRvrt"):
            self.last_refresh = self.now
            self.reverted = False
        if name in ("WMaxLimPct", "WMaxLimPctEna", "WMaxLimPctRvrtTms", "WMaxLimPctEnaRvrt"):
            self.limit_refresh = self.now
            self.limit_reverted = False

    def revert_remaining_s(self) -> float:
        if not self.controls["WSetEnaRvrt"]:
            return 0.0
        return max(0.0, float(self.controls["WSetRvrtTms"]) - (self.now - self.last_refresh))

    def limit_revert_remaining_s(self) -> float:
        c = self.controls
        if not (c["WMaxLimPctEnaRvrt"] and c["WMaxLimPctEna"]) or self.limit_reverted:
            return 0.0
        return max(0.0, float(c["WMaxLimPctRvrtTms"]) - (self.now - self.limit_refresh))

    def _check_revert(self) -> None:
        c = self.controls
        if c["WSetEnaRvrt"] and c["WSetEna"] and not self.reverted and self.revert_remaining_s() <= 0:
            log.info("revert timer expired after %ss: WSet %s -> %s W", c["WSetRvrtTms"], c["WSet"], c["WSetRvrt"])
            c["WSet"], c["WSetPct"] = c["WSetRvrt"], c["WSetPctRvrt"]
            self.reverted = True
        if c["WMaxLimPctEnaRvrt"] and c["WMaxLimPctEna"] and not self.limit_reverted \
                and self.limit_revert_remaining_s() <= 0:
            log.info("limit revert timer expired after %ss: WMaxLimPct %s -> %s %%", c["WMaxLimPctRvrtTms"],
                     c["WMaxLimPct"], c["WMaxLimPctRvrt"])
            c["WMaxLimPct"] = c["WMaxLimPctRvrt"]
            self.limit_reverted = True

    # --- IEEE 1547 enter service (model 703) ---------------------------------------
    def _check_grid(self) -> None:
        """Note the instant the grid comes back after an outage: enter service runs from it."""
        islanded = self.active(InverterFault.GRID_OUTAGE)
        if self._islanded and not islanded:
            self.grid_back_at = self.now
            log.info("grid back: entering service after %ss, ramping over %ss", self.controls["ESDlyTms"],
                     self.controls["ESRmpTms"])
        self._islanded = islanded

    def enter_service_remaining_s(self) -> float:
        """Seconds left before the inverter may export again after a grid return (`ESDlyRemTms`)."""
        if self.grid_back_at is None:
            return 0.0
        return max(0.0, self.grid_back_at + float(self.controls["ESDlyTms"]) - self.now)

    def in_service(self) -> bool:
        """Connected to the grid and allowed to move power: not islanded, enter service permitted and
        its delay over."""
        if self.active(InverterFault.GRID_OUTAGE):
            return True  # islanded: serving the home, not the grid
        return bool(self.controls["ES"]) and self.enter_service_remaining_s() <= 0

    def _ramp_share(self) -> float:
        """The share of the rating allowed while ramping in after the delay (1.0 when done)."""
        if self.grid_back_at is None:
            return 1.0
        ramp = float(self.controls["ESRmpTms"])
        since = self.now - self.grid_back_at - float(self.controls["ESDlyTms"])
        return 1.0 if ramp <= 0 else min(1.0, max(0.0, since / ramp))

    def _wanted(self) -> float:
        if self.active(InverterFault.INVERTER_FAULT) or not self.in_service():
            return 0.0
        c = self.controls
        if c["WSetEna"] and c["WSetMod"] == WSetMod.W_MAX_PCT:
            return float(c["WSetPct"]) / 100.0 * min(float(c["WMax"]), self.ratings.w_max)
        commanded = c["WSetEna"] and c["WSetMod"] == WSetMod.WATTS
        if self.active(InverterFault.GRID_OUTAGE):
            # Islanded: the home's load. An enabled WSet is the ceiling, which is how the
            # gateway holds the backup floor; a reverted WSet = 0 stops it.
            load = max(self.home_load(self.now), 0.0)
            return min(load, max(float(c["WSet"]), 0.0)) if commanded else load
        return float(c["WSet"]) if commanded else 0.0

    def _limited(self, target: float, pack_discharge_w: float, pack_charge_w: float) -> float:
        r, c = self.ratings, self.controls
        limit = min(float(c["WMax"]), r.w_max)
        if c["WMaxLimPctEna"]:
            limit *= float(c["WMaxLimPct"]) / 100.0
        if not self.active(InverterFault.GRID_OUTAGE):
            limit *= self._ramp_share()  # entering service: the ramp after the delay
        high = min(limit, r.w_discha_max, max(pack_discharge_w, 0.0) * r.efficiency)
        low = -min(limit, r.w_cha_max, max(pack_charge_w, 0.0) / r.efficiency)
        if self.active(InverterFault.GRID_OUTAGE):
            low = 0.0  # no grid to charge from
        limited = min(max(target, low), high)
        self.throttled = not math.isclose(limited, target)
        return limited

    def ramp_w_per_s(self) -> float:
        """The normal ramp-up rate: 704 `WRmp` (% of WMax per second) once written, else the rating's."""
        rate = float(self.controls.get("WRmp") or 0)
        return rate / 100.0 * self.ratings.w_max if rate > 0 else self.ratings.ramp_w_per_s

    def _ramped(self, target: float, dt_s: float) -> float:
        p = self.ac_power_w
        if p * target < 0:
            p = 0.0  # a change of direction passes through zero first
        if abs(target) <= abs(p):
            return target  # reductions are immediate
        step = self.ramp_w_per_s() * max(dt_s, 0.0)
        return math.copysign(min(abs(target), abs(p) + step), target)

    # --- what the registers show -------------------------------------------------
    def inv_state(self) -> InverterState:
        if self.active(InverterFault.INVERTER_FAULT):
            return InverterState.FAULT
        if not self.in_service():
            return InverterState.STARTING
        if self.ac_power_w == 0.0:
            return InverterState.STANDBY
        return InverterState.THROTTLED if self.throttled else InverterState.RUNNING

    def alarms(self) -> int:
        bits = 0
        if self.active(InverterFault.GRID_OUTAGE):
            bits |= 1 << AlrmBit.GRID_DISCONNECT
        if self.active(InverterFault.INVERTER_FAULT):
            bits |= 1 << FAULT_ALARM_BIT
        return bits

    def values(self, model_id: int) -> dict[str, Any]:
        """Point values (engineering units, sf points included) of one model right now."""
        r, sf = self.ratings, SCALE.get(model_id, {})
        if model_id == 1:
            return {"Mn": "powershare-gw", "Md": "Powershare-sim 11.5kW", "Opt": "bidi", "Vr": "1.0",
                    "SN": "SIM-0001", "DA": self.unit_id}
        if model_id == 701:
            w = self.ac_power_w
            shown_w = -w if self.reversed_w else w
            outage = self.active(InverterFault.GRID_OUTAGE)
            connected = not outage and self.in_service()
            return {**sf, "ACType": 1, "St": int(w != 0.0), "InvSt": int(self.inv_state()),
                    "ConnSt": 1 if connected else 0, "Alrm": self.alarms(), "DERMode": 2 if outage else 1,
                    "W": shown_w, "VA": abs(w), "Var": 0, "PF": 1.0, "A": abs(w) / r.v_nom, "LLV": r.v_nom,
                    "LNV": r.v_nom / 2, "Hz": 60.0, "TotWhInj": int(self.tot_wh_inj),
                    "TotWhAbs": int(self.tot_wh_abs), "TmpCab": 35,
                    "MnAlrmInfo": "over temperature" if self.active(InverterFault.INVERTER_FAULT) else None}
        if model_id == 702:
            c = self.controls
            return {**sf, "WMaxRtg": r.w_max, "VAMaxRtg": r.w_max, "WChaRteMaxRtg": r.w_cha_max,
                    "WDisChaRteMaxRtg": r.w_discha_max, "VNomRtg": r.v_nom, "VMaxRtg": r.v_nom * 1.1,
                    "VMinRtg": r.v_nom * 0.88, "AMaxRtg": r.w_max / r.v_nom, "NorOpCatRtg": 1,
                    "AbnOpCatRtg": 2, "CtrlModes": 1 << 1, "IntIslandCatRtg": 1 << 1, "WMax": c["WMax"],
                    "VNom": r.v_nom}
        if model_id == 704:
            c = self.controls
            return {**sf, **c, "WSetRvrtRem": int(math.ceil(self.revert_remaining_s())),
                    "WMaxLimPctRvrtRem": int(math.ceil(self.limit_revert_remaining_s())),
                    "WRmp": c["WRmp"] if c["WRmp"] is not None else round(100 * r.ramp_w_per_s / r.w_max)}
        if model_id == 703:
            return {**sf, **{k: self.controls[k] for k in ENTER_SERVICE_DEFAULTS},
                    "ESDlyRemTms": int(math.ceil(self.enter_service_remaining_s()))}
        if model_id == 713:
            soc = self.soc_pct
            return {**sf, "WHRtg": r.wh_rtg, "WHAvail": None if soc is None else r.wh_rtg * soc / 100,
                    "SoC": soc, "SoH": 100.0, "Sta": 0}
        return {}

    def register_map(self, base: int = DEFAULT_BASE) -> SunSpecMap:
        sunspec = SunSpecMap(base)
        for model_id in SIM_MODELS:
            sunspec.add(model_id, self.values(model_id))
        return sunspec


def _pipelined_server_class() -> type:
    """pymodbus' TCP server, answering every request a TCP segment carries (SunSpec TCP-3).

    pymodbus 3.16 decodes one frame per segment received and leaves the rest in its buffer,
    which sending the answer then empties (a client's habit), so a client that sends several
    requests at once never hears about all but the first. This handler keeps what followed
    the request being answered and serves it once the answer is sent, in order. (A request
    arriving while another is being answered is pymodbus' own race; the gateway's client never
    sends one.) Built on first use: the simulator imports pymodbus only when it serves.
    """
    from pymodbus.server import ModbusTcpServer
    from pymodbus.server.requesthandler import ServerRequestHandler

    class PipelinedHandler(ServerRequestHandler):
        async def handle_request(self) -> None:
            following = self.recv_buffer  # `send` empties the buffer: keep what came after this request
            await super().handle_request()
            self.recv_buffer = following + self.recv_buffer
            if self.recv_buffer:  # the next request of the same segment: frame and answer it
                self.datagram_received(b"", None)

    class PipelinedTcpServer(ModbusTcpServer):
        def callback_new_connection(self) -> ServerRequestHandler:
            return PipelinedHandler(self, self.trace_packet, self.trace_pdu, self.trace_connect)

    return PipelinedTcpServer


def _PipelinedTcpServer(*args: Any, **kwargs: Any) -> Any:
    return _pipelined_server_class()(*args, **kwargs)


class SimInverterServer:
    """`model` served over Modbus TCP (default) or RTU on a pyserial URL (`rtu=`)."""

    def __init__(self, model: InverterModel, host: str = "127.0.0.1", port: int = 0, *,
                 rtu: str | None = None, base: int = DEFAULT_BASE, slow_reply_s: float = 2.0,
                 baudrate: int = 19_200):
        self.model, self.host, self.port, self.rtu = model, host, port, rtu
        self.slow_reply_s, self.baudrate = slow_reply_s, baudrate
        self.map = model.register_map(base)
        self.addresses = self.map.addresses()
        self.writes = 0
        self._server: Any = None

    async def start(self) -> int:
        """Listen; return the TCP port (0 for a serial line)."""
        from pymodbus.server import ModbusSerialServer
        from pymodbus.simulator import DataType, SimData, SimDevice

        block = SimData(self.map.base, values=self.map.registers(), datatype=DataType.REGISTERS)
        device = SimDevice(id=self.model.unit_id, simdata=[block], action=self._action)
        if self.rtu:
            self._server = ModbusSerialServer(device, port=self.rtu, baudrate=self.baudrate,
                                              ignore_missing_devices=True)
        else:
            self._server = _PipelinedTcpServer(device, address=(self.host, self.port), ignore_missing_devices=True)
        await self._server.serve_forever(background=True)
        transport = self._server.transport
        sockets = getattr(transport, "sockets", None)
        self.port = sockets[0].getsockname()[1] if sockets else 0
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.shutdown()
            self._server = None

    async def __aenter__(self) -> SimInverterServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def drop_connections(self) -> None:
        if self._server is not None:
            for conn in list(self._server.active_connections.values()):
                conn.close()

    async def _action(self, function_code: int, start: int, address: int, count: int,
                      registers: list[int], values: list[int] | list[bool] | None) -> Any:
        """pymodbus calls this before every access: apply faults, writes, and refresh reads."""
        from pymodbus.constants import ExcCodes
        from pymodbus.exceptions import NoSuchIdException

        m = self.model
        if m.active(InverterFault.DROP_CONNECTION):
            if not self.rtu or self.rtu.startswith("socket://"):
                self.drop_connections()  # a serial line cannot drop: it goes silent instead
            raise NoSuchIdException("dropped")  # with ignore_missing_devices: no reply at all
        if m.active(InverterFault.SLOW_REPLY):
            await asyncio.sleep(self.slow_reply_s)
        if m.active(InverterFault.MODBUS_EXCEPTION):
            return ExcCodes(m.exception_code)
        if values is not None:
            return self._write(address, [int(v) for v in values])
        self._refresh(start, address, count, registers)
        return None

    def _models_in(self, address: int, count: int) -> list[tuple[int, ModelDef]]:
        out = []
        for model_id, at in self.addresses.items():
            mdef = ModelDef.load(model_id)
            if at < address + count and at + mdef.size > address:
                out.append((at, mdef))
        return out

    def _refresh(self, start: int, address: int, count: int, registers: list[int]) -> None:
        """Bring the registers this read covers up to date from the model.

        Only those: every read refreshes what it covers, so registers outside it
        are never served stale, and a poll of 27 registers does not pay for
        encoding all 155 of model 701.
        """
        for at, mdef in self._models_in(address, count):
            if mdef.id == 1:
                continue
            lo, hi = max(address, at), min(address + count, at + mdef.size)
            registers[lo - start:hi - start] = mdef.encode_span(self.model.values(mdef.id), lo - at, hi - lo)

    def _write(self, address: int, values: list[int]) -> Any:
        """Apply a write to the model; reject read-only, partial or out-of-range writes."""
        from pymodbus.constants import ExcCodes

        targets = self._models_in(address, len(values))
        if len(targets) != 1:
            return ExcCodes.ILLEGAL_ADDRESS
        at, mdef = targets[0]
        rel = address - at
        points = mdef.points_in(rel, len(values))
        if any(not p.writable or p.offset < rel or p.offset + p.size > rel + len(values) for p in points):
            return ExcCodes.ILLEGAL_ADDRESS
        decoded = mdef.decode(values, rel, sfs=SCALE.get(mdef.id, {}))
        if any(not self._in_range(p, decoded[p.name]) for p in points):
            return ExcCodes.ILLEGAL_VALUE
        for p in points:
            if decoded[p.name] is not None:
                self.model.write(p.name, decoded[p.name])
        self.writes += 1
        return None

    def _in_range(self, p: Any, value: Any) -> bool:
        """Whether a written value is one this inverter can take (the conformance "rejection" rule)."""
        if value is None:
            return True  # "not implemented": leaves the point as it is
        if p.symbols and p.type.startswith("enum"):
            return value in p.symbols.values()
        rated = self.model.ratings.w_max
        if p.name in ("WSet", "WSetRvrt"):
            return abs(value) <= rated
        if p.name == "WMax":
            return 0 <= value <= rated
        bounds = PCT_RANGES.get(p.name) or HZ_RANGES.get(p.name)
        if bounds is not None:
            return bounds[0] <= value <= bounds[1]
        if p.units == "Secs":
            return 0 <= value <= SECONDS_MAX
        return True


# --- standalone ---------------------------------------------------------------------
@dataclass
class ConstantPack:
    """Standalone stand-in for the simulated pack: fixed limits (the bench wires sim/battery.py)."""

    max_discharge_w: float = 11_500.0
    max_charge_w: float = 11_500.0
    soc_pct: float = 80.0


class Pack(Protocol):
    """What the inverter needs of the pack it is wired to: the BMS's limits now."""

    @property
    def max_discharge_w(self) -> float: ...

    @property
    def max_charge_w(self) -> float: ...


async def run_realtime(model: InverterModel, server: SimInverterServer, pack: Pack,
                       step_s: float = 0.1, stop: asyncio.Event | None = None,
                       on_dc: Callable[[float], None] | None = None) -> None:
    """Advance `model` on the wall clock until `stop` is set; `on_dc` is told the DC power drawn
    from the pack after each step (+ = discharge)."""
    stop = stop or asyncio.Event()
    last = time.time()
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), step_s)
        except asyncio.TimeoutError:
            pass
        now = time.time()
        dc_w = model.advance(now - last, now, pack.max_discharge_w, pack.max_charge_w)
        last = now
        if on_dc is not None:
            on_dc(dc_w)


class WiredPack:
    """The truck's pack wired to the inverter, its simulated BMS on a CAN bus (`sim inverter --can-*`).

    The DC power the inverter really draws moves the pack, so the BMS current shows
    what the inverter does, whatever its registers say (`--swap-sign`). The BMS node
    sends in its own thread at its DBC periods, as `sim bms` does.
    """

    def __init__(self, battery: Battery, bus: can.BusABC, dbc: Path) -> None:
        self.battery, self.bus = battery, bus
        self.node = BmsNode(battery, bus, dbc)
        self.dc_w = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.node.run, args=(self._stop,),
                                        kwargs={"load_w": lambda: self.dc_w}, name="simulated BMS", daemon=True)

    @property
    def max_discharge_w(self) -> float:
        return self.battery.max_discharge_w

    @property
    def max_charge_w(self) -> float:
        return self.battery.max_charge_w

    def __enter__(self) -> WiredPack:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)
        self.bus.shutdown()


def _run(args: argparse.Namespace) -> int:
    from firmware_py.bms.bus import SEND_ONLY, open_bus
    from firmware_py.bms.commands import resolve_dbc
    from firmware_py.tasks import take_stop_signals

    host, port = parse_host_port(args.listen, "--listen")
    if (args.can_interface is None) != (args.can_channel is None):
        raise InputError("--can-interface and --can-channel go together: the bus of the wired pack's BMS")
    if not 0 <= args.soc <= 100:
        raise InputError(f"--soc: expected 0 to 100 %, got {args.soc:g}")
    wired = None
    if args.can_interface:
        dbc, _ = resolve_dbc(args.dbc, elm=False)
        # The pack's BMS only talks: what others send on the bus is not carried to it.
        bus = open_bus(args.can_interface, args.can_channel, blame="--can-interface/--can-channel", filters=SEND_ONLY)
        wired = WiredPack(Battery(soc_pct=args.soc), bus, dbc)

    async def main() -> None:
        stop = asyncio.Event()
        take_stop_signals(stop.set)  # before it says it serves; SIGTERM's default action killed it (exit 143)
        model = InverterModel(now=time.time(), unit_id=args.unit_id, reversed_w=args.swap_sign)
        pack: Pack = wired if wired is not None else ConstantPack()
        model.soc_pct = wired.battery.soc_ui_pct if wired is not None else ConstantPack.soc_pct
        if args.setpoint_log:
            _log_setpoints(model, args.setpoint_log)
        server = SimInverterServer(model, host, port, rtu=args.rtu)
        try:
            bound = await server.start()
        except (OSError, RuntimeError) as err:
            raise InputError(f"cannot listen on {args.rtu or args.listen}: {err}") from None
        where = f"RTU {args.rtu}" if args.rtu else f"{host}:{bound}"
        print(f"simulated inverter (11.5 kW, unit {args.unit_id}) serving SunSpec models "
              f"{', '.join(map(str, SIM_MODELS))} on {where}; Ctrl-C or SIGTERM stops", flush=True)
        if args.swap_sign:
            print("# --swap-sign: model 701 W is reported with the wrong sign", flush=True)
        if wired is not None:
            print(f"# wired to a simulated pack at SoC {args.soc:g} %, its BMS on {args.can_interface} "
                  f"{args.can_channel}", flush=True)

        def draw(dc_w: float) -> None:
            assert wired is not None
            wired.dc_w = dc_w
            model.soc_pct = wired.battery.soc_ui_pct

        try:
            await run_realtime(model, server, pack, stop=stop, on_dc=draw if wired is not None else None)
        finally:
            await server.stop()
        print(f"# sim inverter: stopped, {model.tot_wh_inj:.1f} Wh injected in all", flush=True)

    if wired is None:
        asyncio.run(main())
        return 0
    with wired:
        asyncio.run(main())
    return 0


def _log_setpoints(model: InverterModel, path: Path) -> None:
    """Append "<CLOCK_MONOTONIC ns> <W>" for every WSet the inverter accepts, as it accepts it.

    The benchmarks time a reaction from another process: CLOCK_MONOTONIC is one clock for
    every process on the machine, so the sender's instant and this one can be subtracted.
    """
    try:
        log = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - open for the process's life
    except OSError as err:
        raise InputError(f"--setpoint-log {path}: cannot open: {err.strerror or err}") from None
    model.on_wset = lambda watts: log.write(f"{time.monotonic_ns()} {watts}\n")


def register(sub: argparse._SubParsersAction) -> None:
    """Add `sim inverter` to the `sim` command's parts."""
    p = sub.add_parser("inverter", help="run the simulated SunSpec inverter alone, in real time")
    p.add_argument("--listen", default="127.0.0.1:1502", help="Modbus TCP HOST:PORT (default 127.0.0.1:1502)")
    p.add_argument("--rtu", default=None, metavar="URL",
                   help="serve Modbus RTU on this pyserial URL instead (a tty, or socket://HOST:PORT)")
    p.add_argument("--unit-id", type=whole(1, 247), default=1, help="Modbus unit id (default 1)")
    p.add_argument("--swap-sign", action="store_true",
                   help="report the measured power (701 W) with the wrong sign, as a meter or CT fitted "
                        "backwards would; the power itself flows as commanded (commissioning's sign test)")
    p.add_argument("--can-interface", default=None,
                   help="also simulate the pack wired to this inverter, its BMS on this python-can interface: "
                        "the BMS current then follows the power the inverter draws")
    p.add_argument("--can-channel", default=None, help="the wired pack's CAN channel, e.g. ws://127.0.0.1:54701/")
    p.add_argument("--soc", type=number(0, 100), default=80.0, help="the wired pack's initial SoC in %% (default 80)")
    p.add_argument("--dbc", default=None, help="the wired pack's DBC, bundled name or path (default cybertruck_bms.dbc)")
    p.add_argument("--setpoint-log", type=Path, default=None, metavar="FILE",
                   help="append each accepted WSet to FILE as '<CLOCK_MONOTONIC ns> <W>' (for benchmarks)")
    p.set_defaults(handler=_run)
