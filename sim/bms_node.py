"""The simulated BMS: the pack model on a CAN bus, framed by the gateway's own DBC.

It encodes through the same DBC and signal table the reader decodes with (one
source of truth), so a layout mistake shows up as a failed round trip rather
than as two wrong halves that happen to agree. Time comes from the caller:
`emit_due(now)` on the bench's simulated clock, or `run()` in real time for
`powershare-gw sim bms`. Faults are injected here, on the wire, because that is
where the gateway must notice them.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import can
from firmware_py.sim.battery import Battery, temperature_derate
from firmware_py.sim.faults import BMS_FAULT_KINDS, BmsFault
from firmware_py.sim.frame_encoder import page_encoders

from firmware_py.arguments import number, whole
from firmware_py.bms import signals
from firmware_py.bms.reader import load_dbc
from firmware_py.core.types import BmsState, ContactorState, PackContactor
from firmware_py.errors import InputError
from firmware_py.quoting import printable

log = logging.getLogger(__name__)


class BusLost(Exception):
    """Sending failed in a way no retry of that frame mends: the CAN server went away (python-can-remote
    raises the socket's OSError), the adapter's driver gave up. Carries the driver's own error."""

FAULT_KINDS = BMS_FAULT_KINDS
OVER_TEMP_C = 70.0
SOC_JUMP_PCT = 25.0  # downward, unless that would clamp at 0 and hide the jump
ISOLATION_KOHM = 5_000.0
HV_UP, HV_DOWN = 6, 0
HVIL_OK = 1
FLOW_THRESHOLD_A = 0.5
EXTRA_SIGNALS = {"HvBattAmpVolt.RawCurrent": "pack_current_a"}
"""Signals the reader does not map but a real BMS still sends; filled from these fields."""


def sent_messages(db: Any) -> tuple[str, ...]:
    """The messages of DBC `db` (cantools) the node sends: those with a period, the only ones a
    `message_silence` can stop."""
    return tuple(m.name for m in db.messages if m.cycle_time)


def check_silenced_messages(scenario_path: Path, faults: Sequence[Any], dbc: Path) -> None:
    """Refuse a scenario whose `message_silence` names a message `dbc` does not send.

    The scenario loader can only check against the bundled DBC; with `--dbc` another one is used,
    and without this check the fault failed mid-run with a traceback, the bus already open.
    """
    names = sent_messages(load_dbc(dbc))
    problems = [f"{scenario_path}: fault[{i}].message: {f.message!r} is not a message {dbc.name} sends "
                f"(it has: {', '.join(names)})"
                for i, f in enumerate(faults)
                if f.kind == BmsFault.MESSAGE_SILENCE and f.message not in names]
    if problems:
        raise InputError(problems)


@dataclass
class _Schedule:
    message: Any  # cantools Message
    period_s: float
    next_due: float | None = None


class BmsNode:
    """Emits every BMS message of the DBC at its period, from `battery`'s state."""

    def __init__(self, battery: Battery, bus: can.BusABC, db_path: Path, seed: int = 0):
        self.battery = battery
        self.bus = bus
        self.db = load_dbc(Path(db_path))
        by_signal = {ref: name for name, ref in signals.DEFAULT_SIGNALS.items()}
        by_signal.update(EXTRA_SIGNALS)
        self._encoders = {m.name: page_encoders(m, by_signal) for m in self.db.messages}
        self._schedules = [_Schedule(m, m.cycle_time / 1000.0) for m in self.db.messages if m.cycle_time]
        self._faults: dict[str, float | None] = {}
        self._silenced = ""
        self._rng = random.Random(seed)
        self.sent = 0
        self.send_errors = 0

    # -- faults -------------------------------------------------------------

    def inject(self, kind: str, until: float | None = None, message: str = "") -> None:
        """Start fault `kind` until time `until` (same clock as `emit_due`), or until `clear`.

        `message` names the DBC message a `message_silence` stops.
        """
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown BMS fault {kind!r}; valid kinds: {', '.join(FAULT_KINDS)}")
        if kind == BmsFault.MESSAGE_SILENCE:
            if message not in self.message_names:
                raise ValueError(f"message_silence: no message {message!r} in the DBC "
                                 f"(one of: {', '.join(self.message_names)})")
            self._silenced = message
        self._faults[kind] = until
        if kind == "contactor_open":
            self.battery.contactors_closed = False

    def clear(self, kind: str | None = None) -> None:
        """End one fault, or all of them."""
        for k in [kind] if kind else list(self._faults):
            self._faults.pop(k, None)
            if k == "contactor_open":
                self.battery.contactors_closed = True

    def active(self, kind: str) -> bool:
        return kind in self._faults

    @property
    def message_names(self) -> tuple[str, ...]:
        return sent_messages(self.db)

    def _expire(self, now: float) -> None:
        for kind, until in list(self._faults.items()):
            if until is not None and now >= until:
                self.clear(kind)

    # -- what the BMS says ---------------------------------------------------

    def field_values(self) -> dict[str, Any]:
        """The pack as the BMS reports it, in snapshot units, faults applied."""
        b = self.battery
        closed = b.contactors_closed
        current = b.pack_current_a
        if current > FLOW_THRESHOLD_A:
            state = BmsState.SUPPORT
        elif current < -FLOW_THRESHOLD_A:
            state = BmsState.CHARGE
        else:
            state = BmsState.STANDBY
        max_temp = OVER_TEMP_C if self.active("over_temp") else b.max_temp_c
        derate = temperature_derate(max_temp, False) if self.active("over_temp") else 1.0
        pack = PackContactor.ECONOMIZED if closed else PackContactor.OPEN
        values: dict[str, Any] = {
            "pack_voltage_v": b.pack_voltage_v, "pack_current_a": current,
            "soc_min_pct": b.soc_min_pct, "soc_ui_pct": b.soc_ui_pct,
            "soc_max_pct": b.soc_max_pct, "soc_avg_pct": b.soc_avg_pct,
            "max_discharge_w": 0.0 if self.active("dcl_zero") else b.max_discharge_w * derate,
            "max_charge_w": b.max_charge_w * derate,
            "nominal_full_wh": b.nominal_full_wh, "nominal_remaining_wh": b.nominal_remaining_wh,
            "energy_buffer_wh": b.energy_buffer_wh, "expected_remaining_wh": b.expected_remaining_wh,
            "min_temp_c": b.min_temp_c, "max_temp_c": max_temp,
            "bms_state": BmsState.FAULT if self.active("bms_fault") else state,
            "contactor_state": ContactorState.CLOSED if closed else ContactorState.OPEN,
            "hv_state": HV_UP if closed else HV_DOWN, "isolation_kohm": ISOLATION_KOHM,
            "pack_contactor_neg": pack, "pack_contactor_pos": pack, "hvil_ok": HVIL_OK,
            "brick_v_min": b.brick_v_min, "brick_v_max": b.brick_v_max,
            "lifetime_discharge_wh": b.lifetime_discharge_wh, "lifetime_charge_wh": b.lifetime_charge_wh,
        }
        if self.active("soc_jump"):
            jump = -SOC_JUMP_PCT if b.true_soc_pct >= 2 * SOC_JUMP_PCT else SOC_JUMP_PCT
            for name in signals.RATE_LIMITED:
                values[name] = min(100.0, max(0.0, values[name] + jump))
        return values

    def frames_per_s(self) -> float:
        """The bus load this node makes: one frame per page of each message, at its DBC period."""
        return sum(len(self._encoders[sched.message.name]) / sched.period_s for sched in self._schedules)

    def encode(self, message: Any, values: dict[str, Any]) -> list[bytes]:
        """The frames (one per page) that carry `values` in `message`."""
        return [page.encode(values) for page in self._encoders[message.name]]

    # -- sending ----------------------------------------------------------

    def emit_due(self, now: float) -> int:
        """Send every message whose period has elapsed at `now`; returns frames sent.

        A caller that falls behind gets one frame per message, not a burst: a real
        BMS does not replay the frames it missed.
        """
        self._expire(now)
        values: dict[str, Any] | None = None
        sent = 0
        for sched in self._schedules:
            if sched.next_due is not None and now < sched.next_due:
                continue
            behind = sched.next_due is None or now >= sched.next_due + sched.period_s
            sched.next_due = now + sched.period_s if behind else sched.next_due + sched.period_s
            if self.active("can_silence") or (self.active(BmsFault.MESSAGE_SILENCE)
                                              and sched.message.name == self._silenced):
                continue
            values = values if values is not None else self.field_values()
            for data in self.encode(sched.message, values):
                sent += self._send(sched.message.frame_id, self._corrupt(data), now)
        self.sent += sent
        return sent

    def _corrupt(self, data: bytes) -> bytes:
        if self.active("garbled"):
            return bytes(self._rng.getrandbits(8) for _ in data)
        if self.active("wrong_length"):
            return data[:-2]
        return data

    def _send(self, frame_id: int, data: bytes, now: float) -> int:
        msg = _frame(frame_id, data, now)
        try:
            self.bus.send(msg, timeout=0.1)
        except can.CanError as err:
            self.send_errors += 1
            log.warning("BMS node could not send 0x%X: %s", frame_id, err)
            return 0
        except Exception as err:  # noqa: BLE001 - a CAN server gone, a socket closed: each interface its own error
            raise BusLost(err) from err
        return 1

    def run(self, stop: threading.Event, load_w: float | Callable[[], float] = 0.0, duration_s: float | None = None,
            faults: Sequence[tuple[float, str, float | None, str]] = (), clock: Callable[[], float] = time.monotonic,
            tick_s: float = 0.002) -> None:
        """Real time: step the pack with `load_w` (constant, or asked each step) and emit, until `stop`
        or `duration_s`.

        `faults` are (at_s, kind, duration_s or None, the message a `message_silence` stops) from the
        start of the run.
        """
        start = last = clock()
        load = load_w if callable(load_w) else lambda: load_w
        pending = sorted(faults, key=lambda f: f[0])
        while not stop.is_set():
            now = clock()
            elapsed = now - start
            if duration_s is not None and elapsed >= duration_s:
                break
            while pending and pending[0][0] <= elapsed:
                _, kind, length, message = pending.pop(0)
                self.inject(kind, None if length is None else now + length, message)
            self.battery.step(now - last, load())
            last = now
            self.emit_due(now)
            stop.wait(tick_s)


def _frame(frame_id: int, data: bytes, now: float) -> can.Message:
    """A standard-id frame whose payload stays the immutable `bytes` it was encoded as.

    python-can's virtual bus deep-copies each sent Message for every receiver;
    a bytearray payload is deep-copied through pickle's reduce protocol (~8 us,
    half the cost of a send), bytes are passed on as they are, and the copy's
    constructor gives the receiver its usual bytearray. Every bus reads `data`
    only, and the node never changes a frame once built.
    """
    msg = can.Message(timestamp=now, arbitration_id=frame_id, data=data, is_extended_id=False)
    msg.data = bytes(data)  # type: ignore[assignment]  # read-only use: see above
    return msg


# -- `powershare-gw sim bms` ---------------------------------------------------

def _sim_bms(args: argparse.Namespace) -> int:
    from firmware_py.sim import scenario as scenarios

    from firmware_py.bms.bus import SEND_ONLY, open_bus, shutdown_quietly
    from firmware_py.bms.commands import CAN_FLAGS, resolve_dbc, stop_on_signals

    loaded = scenarios.load(Path(args.scenario)) if args.scenario else None
    vehicle = loaded.vehicle if loaded else scenarios.VehicleSection()
    soc = vehicle.initial_soc_pct if args.soc is None else args.soc
    duration = args.duration if args.duration is not None else (loaded.run.duration_s if loaded else None)
    # Inverter and grid faults belong to other parts of the bench.
    faults = [(f.at_s, f.kind, f.duration_s, f.message) for f in (loaded.fault if loaded else ())
              if f.kind in FAULT_KINDS]
    dbc, _ = resolve_dbc(args.dbc, elm=False)
    if loaded:
        check_silenced_messages(Path(args.scenario), loaded.fault, dbc)
    # As `sim` seeds them: a scenario's garbled frames are the same in either.
    seed = args.seed if args.seed is not None else (loaded.run.seed if loaded else 0)
    battery = Battery(capacity_wh=vehicle.usable_capacity_wh, soc_pct=soc, ambient_c=vehicle.ambient_c,
                      seed=seed)
    # A BMS only talks: what others send on the bus is not carried to it.
    bus = open_bus(args.can_interface, args.can_channel, blame=CAN_FLAGS.format(args), filters=SEND_ONLY)
    lost: BusLost | None = None
    try:
        node = BmsNode(battery, bus, dbc, seed=seed)
        print(f"# sim bms: {dbc.name} on {args.can_interface} {args.can_channel}, SoC {soc:g} %, "
              f"load {args.load_w:g} W; Ctrl-C or SIGTERM stops", flush=True)
        with stop_on_signals() as stop:
            try:
                node.run(stop, load_w=args.load_w, duration_s=duration, faults=faults)
            except BusLost as err:  # the CAN server gone: said once below, the bus closed quietly, exit 1
                lost = err
    finally:
        shutdown_quietly(bus, log)
    if lost is not None:
        cause = lost.__cause__ or lost
        print(f"error: {printable(CAN_FLAGS.format(args))}: the bus was lost after {node.sent} frames: "
              f"{printable(str(cause) or type(cause).__name__)}", file=sys.stderr, flush=True)
        return 1
    print(f"# sim bms: sent {node.sent} frames ({node.send_errors} send errors), "
          f"true SoC {battery.true_soc_pct:.2f} %", flush=True)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `sim bms` to the `sim` command's parts."""
    p = sub.add_parser("bms", help="run the simulated BMS alone on a CAN bus, in real time",
                       description="Emit every BMS message of the DBC at its period from a simulated pack. "
                                   "Without vcan, share a bus between processes with python-can-remote: "
                                   "`python -m can_remote -i virtual -c bench -H 127.0.0.1 -p PORT`, then "
                                   "--can-interface remote --can-channel ws://127.0.0.1:PORT/. "
                                   f"Scenario faults acted on: {', '.join(FAULT_KINDS)}.")
    p.add_argument("--can-interface", required=True, help="python-can interface (socketcan, virtual, remote, ...)")
    p.add_argument("--can-channel", required=True, help="channel, e.g. vcan0 or ws://127.0.0.1:54701/")
    p.add_argument("--scenario", default=None, help="scenario TOML: [vehicle] initial_soc_pct, [run] duration_s, [[fault]]")
    p.add_argument("--duration", type=number(0, 30 * 86_400, above=True), default=None,
                   help="seconds to run (default: scenario's, else until stopped)")
    p.add_argument("--dbc", default=None, help="bundled DBC name or path (default cybertruck_bms.dbc)")
    p.add_argument("--soc", type=number(0, 100), default=None, help="initial SoC in %% (overrides the scenario)")
    p.add_argument("--load-w", type=number(-1e6, 1e6), default=0.0,
                   help="constant DC power drawn, W (positive = discharge)")
    p.add_argument("--seed", type=whole(0, 2**31), default=None,
                   help="seed of the SoC estimator noise and garbled frames (default: the scenario's [run] seed, "
                        "else 0)")
    p.set_defaults(handler=_sim_bms)


