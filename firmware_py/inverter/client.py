"""The gateway's SunSpec Modbus client for the inverter (docs/sunspec.md).

The inverter is the only part that moves energy, so this client's one promise
is that a broken link never surprises the core: every failure (timeout,
disconnect, Modbus exception, a reply that does not fit the model) becomes
`InverterStatus(comms_ok=False, error=cause)`, logged once per cause, and the
inverter's own revert timer (armed on every write) takes it to 0 W if the
gateway goes silent.

Discovery walks the model chain instead of trusting offsets; scale factors are
read once per connection, and one outside SunSpec's -10..10 refuses the device.
The command path writes one contiguous 704 block (WSetEna..WSetRvrtTms) only when
the setpoint changes or a refresh is due, so an event (a BMS fault) costs exactly
one write before the inverter has it.

Enter service (IEEE 1547-2018, model 703): after a grid outage an inverter waits
`ESDlyTms` before it may export again. When the inverter has model 703 and 701
says it is not connected to the grid although no outage is alarmed, the poll
also reads `ESDlyRemTms`, so the core can say when export may resume (no extra
read while the inverter is connected).

Healing: a dropped link is reopened (and the device re-discovered) by the next
poll, with back-off; so is one whose discovered addresses answer ILLEGAL_ADDRESS, or
a gateway's exception 10/11 (the map moved behind a TCP link that stayed up). The
command is written again at once after a reconnect, and after the inverter has let go of it (its revert fired, or it restarted): a poll
that finds the inverter idle under a non-zero command reads the setpoint back and,
if the inverter no longer holds it, forgets what was written so the next apply
writes it again. Outages are told by the gateway's link book; this client logs
its causes at debug level only (read-back mismatches, a safety matter, as warnings).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from firmware_py.config import InverterConfig
from firmware_py.core.types import (
    InverterCommand,
    InverterState,
    InverterStatus,
    is_finite_number,
)
from firmware_py.inverter.sunspec import (
    BASE_ADDRESSES,
    DER_CAPACITY,
    DER_CONTROL_AC,
    DER_ENTER_SERVICE,
    DER_MEASURE_AC,
    DER_STORAGE,
    END_MODEL_ID,
    SUNS_MARKER,
    AlrmBit,
    ConnSt,
    ModelDef,
    SunSpecError,
    WSetEna,
    WSetMod,
    walk_chain,
)

log = logging.getLogger(__name__)

MAX_READ = 125  # registers per Modbus read
LAST_ADDRESS = 0xFFFF
MAX_MODELS = 64  # a chain longer than this is a device bug, not a device
M701, M702, M703, M704, M713 = (ModelDef.load(m) for m in (DER_MEASURE_AC, DER_CAPACITY, DER_ENTER_SERVICE,
                                                             DER_CONTROL_AC, DER_STORAGE))
IDLE_STATES = frozenset({InverterState.OFF, InverterState.SLEEPING, InverterState.STANDBY})
"""InvSt values of an inverter moving no power: under a non-zero command, worth checking it still holds it."""
STATUS_SPAN = (0, M701.offset("TotWhAbs") + M701.point("TotWhAbs").size)  # ID .. TotWhAbs
CONTROL_SPAN = M704.span("WSetEna", "WSetRvrtTms")
WSET_SPAN = M704.span("WSetEna", "WSet")
ES_REMAINING = M703.span("ESDlyRemTms", "ESDlyRemTms")
SF_RANGE = range(-10, 11)  # SunSpec's scale factors; anything else overflows (or divides by zero) when used
REDISCOVER_ON = frozenset({2, 10, 11})  # ILLEGAL_ADDRESS, GATEWAY_PATH_UNAVAILABLE, GATEWAY_NO_RESPONSE
"""Modbus exceptions that, once discovered, close the link so it is reopened and the device discovered
again: at an address discovery found, ILLEGAL_ADDRESS means the map has moved; a gateway exception means
the device behind it was unreachable and may come back changed (another base, other scale factors),
which a direct TCP link would have seen as a drop. Discovery itself keeps them (the next base is tried)."""


class ModbusErrorCause(StrEnum):
    """Why an exchange with the inverter failed, in the few kinds an installer tells apart
    (counted for the metrics: a timeout is wiring or load, an exception is the device's refusal)."""

    CONNECT = "connect"  # the link could not be opened
    TIMEOUT = "timeout"  # no reply within `timeout_s`
    DISCONNECTED = "disconnected"  # the inverter (or the network) closed the connection
    EXCEPTION = "exception"  # a Modbus exception reply
    BAD_REPLY = "bad_reply"  # a reply that does not fit: a short read, another model, not SunSpec
    READBACK = "readback"  # a command did not read back as written
    INVALID_REQUEST = "invalid_request"  # pymodbus could not frame the request
    TRANSPORT = "transport"  # any other transport failure (an OS error, a pymodbus error)


class LinkError(Exception):
    """One failed exchange with the inverter; `str()` is what an installer reads.

    `cause` alone (without the operation it hit) is what gets logged once:
    a dead link fails every poll and every write the same way. `kind` is what the
    error counters count; None when nothing was exchanged (waiting out a back-off,
    a read-back mismatch already counted).
    """

    def __init__(self, cause: str, *, what: str = "", drop: bool = True,
                 kind: ModbusErrorCause | None = ModbusErrorCause.BAD_REPLY):
        super().__init__(f"{what}: {cause}" if what else cause)
        self.cause = cause
        self.drop = drop
        """True when the connection itself is suspect and must be reopened."""
        self.kind = kind


@dataclass(frozen=True)
class Discovery:
    """What the inverter is: its SunSpec base, model chain and static facts."""

    base: int
    models: dict[int, tuple[int, int]]
    """Model id -> (address of its ID register, L)."""
    common: dict[str, Any] = field(default_factory=dict)
    ratings: dict[str, Any] = field(default_factory=dict)
    storage: dict[str, Any] | None = None
    enter_service: dict[str, Any] | None = None
    """Model 703 as read at discovery (`ESDlyTms`, `ESRmpTms`...), when the inverter has it."""

    def address(self, model_id: int, point: str = "ID") -> int:
        return self.models[model_id][0] + ModelDef.load(model_id).offset(point)


class InverterClient:
    """Async SunSpec client over Modbus TCP or RTU; see the module docstring for its promises."""

    def __init__(self, settings: InverterConfig, clock: Callable[[], float], *,
                 backoff_min_s: float = 0.5, backoff_max_s: float = 30.0):
        self.settings = settings
        self.clock = clock
        self.backoff_min_s, self.backoff_max_s = backoff_min_s, backoff_max_s
        self.discovery: Discovery | None = None
        self.marker_at: int | None = None
        """Where the last discovery found the 'SunS' marker (None: not found): past it, a failure is
        the device's model chain, not another unit id's silence."""
        self._client: Any = None
        self._sfs: dict[int, dict[str, int | None]] = {}
        self._control_regs: list[int] = []
        self._written: int | None = None
        self._written_at = -math.inf
        self._backoff = 0.0
        self._next_attempt = -math.inf
        self._error: str | None = None
        self._logged: str | None = None
        self._untrusted: str | None = None
        """Set while the last command did not read back as written."""
        self._revert_checked: tuple[int | None, float] | None = None
        """The write (raw WSet, when) whose hold was last checked: each write is checked at most once."""
        # One Modbus exchange at a time: pymodbus pairs replies with requests per connection,
        # and a write must not interleave with another write's read-back.
        self._busy = asyncio.Lock()
        self.errors: Counter[ModbusErrorCause] = Counter()
        """Failed exchanges by cause since start (the metrics read it; nothing here decides on it)."""
        self.writes = 0
        """Command blocks written since start: the gateway tells a write from a skipped apply by it."""
        self._newest: Callable[[], InverterCommand] | None = None

    def follow(self, newest: Callable[[], InverterCommand]) -> None:
        """Where the newest command is read when a write gets the link: an `apply` that waited for a
        poll must not write the command it was given if the core has decided another since (a fault's
        0 W would wait behind the old setpoint, and that write would re-arm the revert timer for it)."""
        self._newest = newest

    @property
    def refresh_s(self) -> float:
        """Rewrite an unchanged setpoint this often: well inside the inverter's revert time."""
        return self.settings.revert_timeout_s / 3.0

    @property
    def last_error(self) -> str | None:
        """The cause of the last failed exchange, while the link is failing."""
        return self._error

    @property
    def connected(self) -> bool:
        return self.discovery is not None and self._client is not None and self._client.connected

    # --- connection -------------------------------------------------------------
    async def connect(self) -> Discovery:
        """Open the link, discover the model chain, read ratings and scale factors; raises LinkError."""
        await self._close_transport()
        s = self.settings
        try:
            if s.transport == "rtu":
                from pymodbus.client import AsyncModbusSerialClient

                self._client = AsyncModbusSerialClient(s.serial_port, baudrate=s.baudrate, timeout=s.timeout_s,
                                                       retries=0, reconnect_delay=0)
            else:
                from pymodbus.client import AsyncModbusTcpClient

                self._client = AsyncModbusTcpClient(s.host, port=s.port, timeout=s.timeout_s, retries=0,
                                                    reconnect_delay=0)
            ok = await asyncio.wait_for(self._client.connect(), s.timeout_s + 1.0)
        except (OSError, asyncio.TimeoutError, ValueError) as err:
            ok, detail = False, f": {err}" if str(err) else ""
        else:
            detail = ""
        if not ok:
            await self._close_transport()
            raise LinkError(f"cannot connect to {self._where()}{detail}", kind=ModbusErrorCause.CONNECT)
        try:
            self.discovery = await self._discover()
        except LinkError:
            await self._close_transport()
            raise
        self._written, self._written_at = None, -math.inf
        self._recovered()
        return self.discovery

    async def close(self) -> None:
        await self._close_transport()

    async def _close_transport(self) -> None:
        client, self._client, self.discovery = self._client, None, None
        if client is not None:
            client.close()

    def _where(self) -> str:
        s = self.settings
        return f"RTU {s.serial_port} unit {s.unit_id}" if s.transport == "rtu" else f"{s.host}:{s.port} unit {s.unit_id}"

    async def _ensure(self) -> None:
        """Reconnect when the link is down and the backoff has passed; raises LinkError."""
        if self.connected:
            return
        now = self.clock()
        if now < self._next_attempt:
            raise LinkError(self._logged or "not connected", what="waiting to reconnect", drop=False, kind=None)
        try:
            await self.connect()
        except LinkError:
            self._back_off(now)
            raise

    def _back_off(self, now: float) -> None:
        """The next connect waits longer (doubling, within its bounds) until a poll works again."""
        self._backoff = min(max(self._backoff * 2, self.backoff_min_s), self.backoff_max_s)
        self._next_attempt = now + self._backoff

    # --- discovery ----------------------------------------------------------------
    async def _discover(self) -> Discovery:
        base = await self._find_base()
        headers, addr = [], base + 2
        for _ in range(MAX_MODELS + 1):  # the models, then the end model's header
            model_id, length = await self._header(addr)
            if model_id == END_MODEL_ID:
                break
            if len(headers) == MAX_MODELS:
                raise LinkError(f"SunSpec model chain at {base} has no end model within {MAX_MODELS} models")
            if addr + 2 + length > LAST_ADDRESS:
                raise LinkError(f"model {model_id} at {addr} with L={length} runs past the last Modbus address")
            headers.append((addr, model_id, length))
            addr += length + 2
        try:
            models = walk_chain(headers)
        except SunSpecError as err:
            raise LinkError(str(err)) from None
        for needed in (701, 704):
            if needed not in models:
                raise LinkError(f"inverter has no SunSpec model {needed} (found {sorted(models)}): cannot use it")
        disc = Discovery(base, models)
        common = await self._read_model(disc, 1) if 1 in models else {}
        ratings = await self._read_model(disc, 702) if 702 in models else {}
        storage = await self._read_model(disc, 713) if 713 in models else None
        enter_service = await self._read_model(disc, DER_ENTER_SERVICE) if DER_ENTER_SERVICE in models else None
        m701 = await self._read_model(disc, 701, scaled=False)
        m704 = await self._read_model(disc, 704, scaled=False)
        self._sfs = {701: _sfs(M701, m701), 704: _sfs(M704, m704)}
        lo, count = CONTROL_SPAN
        self._control_regs = await self._read(disc.address(704) + lo, count)
        return Discovery(base, models, common, ratings, storage, enter_service)

    async def _header(self, addr: int) -> tuple[int, int | None]:
        """A model's ID and L, read at once; when that read is refused, its ID alone: some devices end their
        map with the end model's ID and no L after it (pysunspec2 reads the ID alone for them), and refusing
        them left the inverter never commanded. L is None only for the end model."""
        try:
            model_id, length = await self._read(addr, 2)
        except LinkError as err:
            if err.kind is not ModbusErrorCause.EXCEPTION:
                raise
            try:
                (model_id,) = await self._read(addr, 1)
            except LinkError:
                raise err from None
            if model_id != END_MODEL_ID:
                raise err from None
            return END_MODEL_ID, None
        return model_id, length

    async def _find_base(self) -> int:
        """The first of 40000, 0, 50000 holding the 'SunS' marker; raises LinkError.

        A base that times out is passed like one refused: some devices stay silent for addresses they do not
        map, and giving up at 40000 refused a map at 0. Each base waits at most one timeout, so the search
        takes at most three; when no base answered at all, the error is the timeout (a silent unit id), not
        'not a SunSpec device'. A link that closed ends the search at once."""
        tried: list[str] = []
        silent: LinkError | None = None
        answered = False
        self.marker_at = None
        for base in BASE_ADDRESSES:
            try:
                marker = await self._read(base, 2)
            except LinkError as err:
                if err.drop and not self._silent_but_connected(err):
                    raise
                if err.kind is ModbusErrorCause.TIMEOUT:
                    silent = silent or err
                else:
                    answered = True
                tried.append(f"{base}: {err}")
                continue
            answered = True
            if tuple(marker) == SUNS_MARKER:
                self.marker_at = base
                return base
            tried.append(f"{base}: no 'SunS' marker")
        if silent is not None and not answered:
            raise LinkError(silent.cause + " at " + ", ".join(map(str, BASE_ADDRESSES)),
                            what="looking for the 'SunS' marker", kind=ModbusErrorCause.TIMEOUT)
        raise LinkError("not a SunSpec device (" + "; ".join(tried) + ")")

    def _silent_but_connected(self, err: LinkError) -> bool:
        """A timeout on a link still open: the device may only be silent at that address."""
        return err.kind is ModbusErrorCause.TIMEOUT and self._client is not None and self._client.connected

    async def _read_model(self, disc: Discovery, model_id: int, *, scaled: bool = True) -> dict[str, Any]:
        at, length = disc.models[model_id]
        mdef = ModelDef.load(model_id)
        regs = await self._read(at, min(length + 2, mdef.size))
        if regs[0] != model_id:
            raise LinkError(f"model {model_id} at {at} now reads as model {regs[0]}")
        raw = mdef.decode(regs, scaled=False)
        _check_sfs(model_id, mdef, raw)
        return mdef.decode(regs) if scaled else raw

    # --- status -------------------------------------------------------------------
    async def read_status(self, *, setpoint: bool = False) -> InverterStatus:
        """Poll the inverter; never raises: a failure is a status with comms_ok=False.

        The gateway's poll reads model 701 alone: the core decides nothing on the
        setpoint the inverter holds, and every write is read back already (at least
        every `refresh_s`). `setpoint=True` also reads it (`wset_w`), for people.
        """
        try:
            async with self._busy:
                await self._ensure()
                assert self.discovery is not None
                status = await self._status(self.discovery, setpoint)
                await self._check_hold(self.discovery, status)
            if self._untrusted:  # until a command reads back as written, the core must not rely on it
                raise LinkError(self._untrusted, drop=False, kind=None)
        except LinkError as err:
            return await self._failed(err)
        self._backoff = 0.0  # only a poll that worked ends a back-off: a link that connects, then fails, grows it
        self._recovered()
        return status

    async def _status(self, disc: Discovery, setpoint: bool) -> InverterStatus:
        lo, count = STATUS_SPAN
        regs = await self._read(disc.address(701) + lo, count)
        if regs[0] != 701:
            raise LinkError(f"model 701 at {disc.address(701)} now reads as model {regs[0]}")
        v = M701.decode(regs, lo, sfs=self._sfs[701])
        wset = await self._setpoint(disc) if setpoint else None
        inv_state = v["InvSt"]
        # A reading that does not fit comes over a healthy link: a failed reading, not a reason to reopen it
        # (each reopen rediscovered the device and rewrote the command, every poll).
        if v["W"] is None:
            raise LinkError("model 701 W is 'not implemented': cannot measure power", drop=False)
        if inv_state is not None and inv_state not in InverterState._value2member_map_:
            raise LinkError(f"model 701 InvSt={inv_state} is not a defined state", drop=False)
        alarms = v["Alrm"] or 0
        outage = bool(alarms >> AlrmBit.GRID_DISCONNECT & 1)
        connected = v["ConnSt"] in (None, ConnSt.CONNECTED)
        entering = 0.0 if connected or outage else await self._enter_service_s(disc)
        r = disc.ratings
        return InverterStatus(
            received_at=self.clock(), measured_w=float(v["W"]),
            inv_state=InverterState.OFF if inv_state is None else inv_state,
            grid_connected=connected, grid_outage=outage, enter_service_s=entering,
            alarms=alarms, tot_wh_inj=float(v["TotWhInj"] or 0.0), tot_wh_abs=float(v["TotWhAbs"] or 0.0),
            w_max_rtg=float(r.get("WMaxRtg") or 0.0), w_cha_max_rtg=float(r.get("WChaRteMaxRtg") or 0.0),
            w_discha_max_rtg=_reported(r.get("WDisChaRteMaxRtg")),
            wset_w=wset,
        )

    async def _enter_service_s(self, disc: Discovery) -> float:
        """Model 703 `ESDlyRemTms`: the enter-service delay left (0 without model 703 or the point)."""
        if DER_ENTER_SERVICE not in disc.models:
            return 0.0
        lo, count = ES_REMAINING
        remaining = M703.decode(await self._read(disc.address(DER_ENTER_SERVICE) + lo, count), lo)["ESDlyRemTms"]
        return float(remaining) if is_finite_number(remaining) and remaining > 0 else 0.0

    async def _check_hold(self, disc: Discovery, status: InverterStatus) -> None:
        """Forget a non-zero command the inverter no longer holds, so the next apply writes it again.

        Checked only when the inverter reads idle under such a command (a revert, a
        restart, or a ramp just starting), and once per write: a poll normally reads 701 alone.
        """
        written = (self._written, self._written_at)
        if not self._written or status.measured_w != 0 or status.inv_state not in IDLE_STATES \
                or self._revert_checked == written:
            return
        self._revert_checked = written
        held = await self._setpoint(disc)
        wanted = self._written * 10.0 ** (self._sfs[704].get("WSet_SF") or 0)
        if held is None or abs(held - wanted) > 10.0 ** (self._sfs[704].get("WSet_SF") or 0) / 2:
            log.info("inverter %s holds WSet %s, not the %g W written (its revert fired or it restarted): "
                     "writing the command again", self._where(),
                     "'not implemented'" if held is None else f"{held:g} W", wanted)
            self._written = None

    async def read_controls(self) -> dict[str, Any]:
        """Model 704's command block (WSetEna..WSetRvrtTms) as the inverter holds it now, scaled: what
        commissioning shows an installer after writing it. Raises LinkError."""
        async with self._busy:
            await self._ensure()
            assert self.discovery is not None
            lo, count = CONTROL_SPAN
            regs = await self._read(self.discovery.address(704) + lo, count)
        return M704.decode(regs, lo, sfs=self._sfs[704])

    async def _setpoint(self, disc: Discovery) -> float | None:
        """The setpoint the inverter holds now (0 W when not enabled; None when WSet reads "not implemented",
        as after a restart that kept WSetEna)."""
        wlo, wcount = WSET_SPAN
        ctl = M704.decode(await self._read(disc.address(704) + wlo, wcount), wlo, sfs=self._sfs[704])
        return ctl["WSet"] if ctl.get("WSetEna") == WSetEna.ENABLED else 0.0

    # --- commands -----------------------------------------------------------------
    async def apply(self, cmd: InverterCommand) -> None:
        """Send `cmd` if it differs from what the inverter has or a refresh is due; never raises.

        Disconnected, it only remembers nothing: the poll loop reconnects and
        the next apply writes (the inverter's revert timer holds 0 W meanwhile).
        """
        await self._command(cmd.setpoint_w, force=False)

    async def safe_stop(self) -> bool:
        """WSet = 0 now, whatever was written before; True when it read back as written.

        A link that is down is opened once more for it, whatever the back-off says: the inverter
        may well answer, and its revert timer is the fallback, not the plan."""
        if not self.connected:
            try:
                async with self._busy:
                    if not self.connected:
                        await self.connect()
            except LinkError as err:
                await self._failed(err)
                return False
        return await self._command(0.0, force=True)

    async def _command(self, setpoint_w: float, *, force: bool) -> bool:
        """Write the setpoint when needed; True when the inverter holds it (written and read back now)."""
        if not self.connected:
            return False
        now = self.clock()
        if not force and self._holds(self._raw(setpoint_w), now):
            return True
        lo, count = CONTROL_SPAN
        try:
            async with self._busy:
                # Scale and address are those of the connection now: the link may have been lost, or
                # found again on an inverter that scales differently, while this waited for it.
                if self.discovery is None:
                    raise LinkError(f"not connected to {self._where()}", kind=ModbusErrorCause.DISCONNECTED)
                if not force and self._newest is not None:
                    setpoint_w = self._newest().setpoint_w
                raw = self._raw(setpoint_w)
                if not force and self._holds(raw, now):
                    return True  # written while this waited for the link (the writer and a dispatch at once)
                addr, block = self.discovery.address(704) + lo, self._control_block(raw)
                await self._write(addr, block)
                self.writes += 1
                self._written, self._written_at = raw, now
                back = await self._read(addr, count)
                if back != block and raw != 0:
                    # The inverter may hold this setpoint without the revert armed: take it to 0 W now.
                    await self._write(addr, self._control_block(0))
            if back != block:
                self._untrusted = (f"704 read-back differs from what was written (WSet raw {raw}): "
                                   f"{_diff(M704, lo, block, back)}")
                log.warning("inverter %s: %s", self._where(), self._untrusted)
                raise LinkError(self._untrusted, drop=False, kind=ModbusErrorCause.READBACK)
            self._untrusted = None
        except LinkError as err:
            self._written = None
            await self._failed(err)
            return False
        return True

    def _raw(self, setpoint_w: float) -> int:
        """The setpoint in WSet's register units (its scale factor as discovered), rounded toward 0 W:
        at WSet_SF = 2 a 60 W envelope rounded to nearest was 100 W, beyond every limit the core kept.
        A number the inverter cannot represent (NaN, infinity) is never forwarded: 0 W."""
        if not is_finite_number(setpoint_w):
            return 0
        units = setpoint_w / 10.0 ** (self._sfs[704].get("WSet_SF") or 0)
        return math.trunc(round(units, 6))  # the rounding only takes away float error (1149.9999999)

    def _holds(self, raw: int, now: float) -> bool:
        """The inverter has this setpoint from a write recent enough that no refresh is due."""
        return raw == self._written and now - self._written_at < self.refresh_s

    def _control_block(self, raw_wset: int) -> list[int]:
        """WSetEna..WSetRvrtTms: WATTS mode, the setpoint, and the revert to 0 W armed. LinkError when
        the inverter's scale factor cannot carry the setpoint (nothing is written)."""
        lo, _ = CONTROL_SPAN
        block = list(self._control_regs)
        tms = max(1, int(self.settings.revert_timeout_s))
        for name, value in (("WSetEna", WSetEna.ENABLED), ("WSetMod", WSetMod.WATTS), ("WSet", raw_wset),
                            ("WSetRvrt", 0), ("WSetEnaRvrt", WSetEna.ENABLED), ("WSetRvrtTms", tms)):
            p = M704.point(name)
            try:
                block[p.offset - lo:p.offset - lo + p.size] = p.from_raw(value)
            except SunSpecError as err:
                raise LinkError(f"cannot write the setpoint: {err} (WSet_SF {self._sfs[704].get('WSet_SF')})",
                                drop=False, kind=ModbusErrorCause.INVALID_REQUEST) from None
        return block

    # --- one exchange -----------------------------------------------------------------
    async def _read(self, addr: int, count: int) -> list[int]:
        out: list[int] = []
        while count > 0:
            n = min(count, MAX_READ)
            reply = await self._exchange(f"reading {addr}+{n}", self._client.read_holding_registers,
                                         addr, count=n, device_id=self.settings.unit_id)
            regs = list(getattr(reply, "registers", []) or [])
            if len(regs) != n:
                raise LinkError(f"reply carried {len(regs)} registers", what=f"reading {addr}+{n}")
            out += regs
            addr, count = addr + n, count - n
        return out

    async def _write(self, addr: int, values: list[int]) -> None:
        await self._exchange(f"writing {addr}+{len(values)}", self._client.write_registers,
                             addr, values, device_id=self.settings.unit_id)

    async def _exchange(self, what: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        from pymodbus.exceptions import ModbusException

        if self._client is None or not self._client.connected:
            raise LinkError(f"not connected to {self._where()}", what=what, kind=ModbusErrorCause.DISCONNECTED)
        try:
            reply = await asyncio.wait_for(call(*args, **kwargs), self.settings.timeout_s + 0.5)
        except (asyncio.TimeoutError, ModbusException) as err:
            if self._client is None or not self._client.connected:
                raise LinkError("connection closed by the inverter", what=what,
                                kind=ModbusErrorCause.DISCONNECTED) from None
            if isinstance(err, asyncio.TimeoutError) or "No response" in str(err):
                raise LinkError(f"no reply within {self.settings.timeout_s} s", what=what,
                                kind=ModbusErrorCause.TIMEOUT) from None
            raise LinkError(str(err).strip(), what=what, kind=ModbusErrorCause.TRANSPORT) from None
        except OSError as err:
            raise LinkError(str(err), what=what, kind=ModbusErrorCause.TRANSPORT) from None
        except ValueError as err:  # pymodbus refuses a request it cannot frame (an address past 65535)
            raise LinkError(f"invalid request: {err}", what=what, drop=False,
                            kind=ModbusErrorCause.INVALID_REQUEST) from None
        if reply is None:
            raise LinkError("no reply", what=what, kind=ModbusErrorCause.TIMEOUT)
        if reply.isError():
            code = getattr(reply, "exception_code", None)
            raise LinkError(f"Modbus exception {code} ({_exception_name(code)})", what=what,
                            drop=self.discovery is not None and code in REDISCOVER_ON,
                            kind=ModbusErrorCause.EXCEPTION)
        return reply

    # --- failure bookkeeping ------------------------------------------------------------
    async def _failed(self, err: LinkError) -> InverterStatus:
        cause = str(err)
        if err.kind is not None:
            self.errors[err.kind] += 1
        if err.drop and self._client is not None:
            await self._close_transport()
            self._back_off(self.clock())
            cause = f"{cause} (link closed, reconnecting)"
        if err.cause != self._logged:
            log.debug("inverter %s: %s", self._where(), cause)
            self._logged = err.cause
        self._error = cause
        return InverterStatus(received_at=self.clock(), comms_ok=False, error=cause)

    def _recovered(self) -> None:
        if self._logged is not None:
            log.debug("inverter %s: link healthy again", self._where())
        self._logged = self._error = None


def _reported(value: Any) -> float | None:
    """A rating as read: None when "not implemented", so that it stays apart from a reported 0."""
    return None if value is None else float(value)


def _sfs(mdef: ModelDef, raw: dict[str, Any]) -> dict[str, int | None]:
    return {n: raw.get(n) for n, p in mdef.points.items() if p.type == "sunssf"}


# The scale factors of the points the gateway measures, bills, bounds or commands with: model -> sf ->
# (what an unknown one leaves unknown, the points it scales). Empty points: needed whatever they read.
NEEDED_SFS: dict[int, dict[str, tuple[str, tuple[str, ...]]]] = {
    DER_MEASURE_AC: {"W_SF": ("the measured power's unit is unknown", ()),
                     "TotWh_SF": ("the energy counters' unit is unknown", ("TotWhInj", "TotWhAbs"))},
    DER_CAPACITY: {"W_SF": ("the power ratings' unit is unknown",
                            ("WMaxRtg", "WChaRteMaxRtg", "WDisChaRteMaxRtg", "WMax"))},
    DER_CONTROL_AC: {"WSet_SF": ("the setpoint's unit is unknown", ())},
}


def _check_sfs(model_id: int, mdef: ModelDef, raw: dict[str, Any]) -> None:
    """Refuse a scale factor outside SunSpec's -10..10 at discovery (a device bug, a non-conforming map):
    used later it would overflow or divide by zero in the middle of a poll or a command. Refuse as well a
    "not implemented" (0x8000) one the gateway needs (`NEEDED_SFS`): read as 0 it turned a raw 500 into
    500 W, a measurement billed and a setpoint written in a unit nobody knows. A counter's scale factor is
    needed only while a counter it scales is implemented."""
    for name, value in _sfs(mdef, raw).items():
        if value is not None and value not in SF_RANGE:
            raise LinkError(f"model {model_id} {name} = {value} is outside -10..10: not a usable SunSpec device")
    for name, (unknown, points) in NEEDED_SFS.get(model_id, {}).items():
        if name in raw and raw[name] is None and (not points or any(raw.get(p) is not None for p in points)):
            raise LinkError(f"model {model_id} {name} is 'not implemented' (0x8000): {unknown}: "
                            "not a usable SunSpec device")


def _diff(mdef: ModelDef, lo: int, wrote: list[int], read: list[int]) -> str:
    a, b = mdef.decode(wrote, lo, scaled=False), mdef.decode(read, lo, scaled=False)
    return ", ".join(f"{n} wrote {a[n]} read {b.get(n)}" for n in a if a[n] != b.get(n)) or "registers differ"


def _exception_name(code: int | None) -> str:
    from pymodbus.constants import ExcCodes

    try:
        return ExcCodes(code).name.lower().replace("_", " ")
    except ValueError:
        return "unknown"
