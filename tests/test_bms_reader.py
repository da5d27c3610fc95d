"""The reader: decoding, unit conversion, freshness and every way a frame is refused."""

from __future__ import annotations

import re
import struct
import threading
from pathlib import Path

import can
import cantools
import pytest
from hypothesis import given
from hypothesis import strategies as st

from firmware_py.bms import BmsListener, BmsReader
from firmware_py.bms.signals import PLAUSIBLE
from firmware_py.config import bundled_dbc
from firmware_py.core import Controller, Policy, step
from firmware_py.core.faults import bms_usable, conditions
from firmware_py.core.types import FaultKind
from firmware_py.errors import InputError

DBC = bundled_dbc("cybertruck_bms.dbc")
DB = cantools.database.load_file(str(DBC))


def frame(name: str, **values) -> can.Message:
    message = DB.get_message_by_name(name)
    return can.Message(arbitration_id=message.frame_id, data=message.encode(values), is_extended_id=False)


def soc(pct: float) -> can.Message:
    return frame("BmsSoc", SocMin=pct, SocUi=pct, SocMax=pct, SocAvg=pct)


def status(bms=2, contactor=4) -> can.Message:
    return frame("BmsStatus", BmsState=bms, ContactorState=contactor, HvState=6, Isolation=5000)


@pytest.fixture
def reader() -> BmsReader:
    return BmsReader(DBC, clock=lambda: 0.0)


def test_units_and_signs_are_the_snapshots(reader):
    reader.on_message(frame("HvBattAmpVolt", PackVoltage=812.0, SmoothedCurrent=-50.0, RawCurrent=-50.0), now=0)
    reader.on_message(frame("BmsPowerAvailable", MaxRegenPower=120.5, MaxDischargePower=300.0), now=0)
    reader.on_message(frame("LifetimeEnergy", TotalDischarge=1234.5, TotalCharge=2000.0), now=0)
    reader.on_message(frame("HvContactorState", PackContactorNeg=6, PackContactorPos=4, HvilStatus=1), now=0)
    s = reader.snapshot(0.0)
    assert s.pack_voltage_v == pytest.approx(812.0)
    assert s.pack_current_a == pytest.approx(-50.0)  # negative = charging, as in docs/README.md
    assert s.max_charge_w == pytest.approx(120_500) and s.max_discharge_w == pytest.approx(300_000)
    assert s.lifetime_discharge_wh == pytest.approx(1_234_500)
    assert (s.pack_contactor_neg, s.pack_contactor_pos, s.hvil_ok) == (6, 4, True)
    reader.on_message(frame("HvContactorState", PackContactorNeg=6, PackContactorPos=4, HvilStatus=4), now=0.1)
    assert reader.snapshot(0.1).hvil_ok is False


def test_multiplexed_pages_fill_their_own_fields(reader):
    reader.on_message(frame("BmsEnergyStatus", EnergyStatusIndex=0, NominalFullPack=127.9, NominalRemaining=90.0), now=0)
    s = reader.snapshot(0)
    assert s.nominal_full_wh == pytest.approx(127_900) and s.energy_buffer_wh is None
    reader.on_message(frame("BmsEnergyStatus", EnergyStatusIndex=1, EnergyBuffer=4.9, ExpectedRemaining=80.0), now=0.5)
    s = reader.snapshot(0.5)
    assert s.energy_buffer_wh == pytest.approx(4_900) and s.nominal_full_wh == pytest.approx(127_900)
    reader.on_message(frame("BrickMinMax", BrickMinMaxIndex=1, BrickVoltageMax=3.9, BrickVoltageMin=3.88), now=0.5)
    assert reader.snapshot(0.5).brick_v_min == pytest.approx(3.88)


def test_returns_a_snapshot_only_when_something_changed(reader):
    first = reader.on_message(soc(60.0), now=0.0)
    assert first is not None and first.soc_min_pct == pytest.approx(60.0) and first.received_at == 0.0
    assert reader.on_message(soc(60.0), now=0.1) is None
    assert reader.on_message(soc(60.1), now=0.2).soc_min_pct == pytest.approx(60.1)


def test_fields_go_stale_after_three_periods_and_recover(reader):
    reader.on_message(soc(60.0), now=0.0)  # BmsSoc period 100 ms -> timeout 0.3 s
    reader.on_message(status(), now=0.0)
    assert reader.snapshot(0.3).stale == frozenset()
    late = reader.snapshot(0.31)
    assert {"soc_min_pct", "bms_state", "contactor_state"} <= late.stale
    assert not late.fresh("soc_min_pct") and not late.energy_path_closed()
    assert reader.on_message(soc(60.0), now=0.4) is not None  # same values, but fresh again
    assert "soc_min_pct" not in reader.snapshot(0.4).stale


def test_staleness_within_one_instant_follows_each_frame(reader):
    reader.on_message(soc(60.0), now=0.0)
    reader.on_message(status(), now=0.0)
    assert {"soc_min_pct", "bms_state"} <= reader.snapshot(1.0).stale
    fresh_soc = reader.on_message(soc(60.0), now=1.0)
    assert "soc_min_pct" not in fresh_soc.stale and "bms_state" in fresh_soc.stale
    assert reader.on_message(status(), now=1.0).stale == frozenset()
    assert reader.snapshot(1.0).stale == frozenset() and reader.snapshot(1.31).stale >= {"soc_min_pct", "bms_state"}


def test_never_received_is_none_not_a_default(reader):
    s = reader.snapshot(5.0)
    assert s.soc_min_pct is None and s.bms_state is None and not s.fresh("soc_min_pct")


def test_non_bms_frames_are_ignored_without_counting(reader):
    assert reader.on_message(can.Message(arbitration_id=0x123, data=bytes(8), is_extended_id=False)) is None
    assert reader.on_message(can.Message(arbitration_id=0x123, data=bytes(8), is_extended_id=True)) is None
    assert reader.accepted == 0 and not reader.dropped


def test_an_extended_frame_with_a_bms_id_is_counted_as_dropped_not_read_and_stales_nothing(reader):
    """A 29-bit id that happens to share a BMS id's number is another message: not read, but said."""
    reader.on_message(soc(50.0), now=0.0)
    assert reader.on_message(can.Message(arbitration_id=0x292, data=soc(10).data, is_extended_id=True),
                             now=0.05) is None
    assert reader.accepted == 1 and reader.dropped == {"extended_id": 1} and "extended_id" in reader.last_drop
    s = reader.snapshot(0.05)
    assert s.soc_min_pct == pytest.approx(50.0) and not s.stale


def extended_dbc(tmp_path) -> Path:
    """The bundled DBC with BmsSoc on a 29-bit id (a DBC marks one with bit 31 of the id)."""
    path = tmp_path / "extended.dbc"
    path.write_text(DBC.read_text().replace("BO_ 658 ", f"BO_ {0x80000000 | 0x18FF0292} "))
    return path


def test_a_dbc_whose_mapped_message_has_a_29_bit_id_is_refused_naming_it(tmp_path):
    """Every filter and lookup is 11-bit: such a DBC loaded fine and then every BmsSoc frame vanished."""
    path = extended_dbc(tmp_path)
    assert cantools.database.load_file(str(path)).get_message_by_name("BmsSoc").is_extended_frame
    with pytest.raises(InputError, match=re.escape(f"{path}: message BmsSoc (0x18FF0292) has a 29-bit id: "
                                                   "not supported")):
        BmsReader(path, clock=lambda: 0.0)
    # Unmapped, the message is never read, so the DBC is fine.
    assert 0x18FF0292 not in BmsReader(path, clock=lambda: 0.0, mapping={f: "" for f in (
        "soc_min_pct", "soc_ui_pct", "soc_max_pct", "soc_avg_pct")}).frame_ids


@pytest.mark.parametrize("msg,reason", [
    (can.Message(arbitration_id=0x292, data=bytes(6), is_extended_id=False), "wrong_length"),
    (can.Message(arbitration_id=0x352, data=bytes([2]) + bytes(7), is_extended_id=False), "unknown_mux_page"),
    (can.Message(arbitration_id=0x212, data=bytes([0, 4, 6, 0, 15, 0, 0, 0]), is_extended_id=False),
     "not_in_value_table"),
    (can.Message(arbitration_id=0x292, data=bytes([0xFF] * 8), is_extended_id=False), "out_of_range"),
])
def test_bad_frames_are_counted_and_dropped_with_a_reason(reader, msg, reason):
    reader.on_message(status(), now=0.0)
    reader.on_message(soc(50.0), now=0.0)
    handed = reader.on_message(msg, now=0.05)
    assert reader.dropped == {reason: 1}
    assert reason in reader.last_drop
    s = reader.snapshot(0.05)
    assert s.soc_min_pct == pytest.approx(50.0) and s.bms_state == 2  # old values kept
    # The fields the frame would have fed are stale now: that change reaches the core at once, with
    # the last believed frame's time; an unknown page feeds nothing, so nothing changed.
    assert (handed is None) == (reason == "unknown_mux_page")
    assert handed is None or (handed.stale == s.stale != frozenset() and handed.received_at == 0.0)


@pytest.mark.parametrize("dlc,data", [(2, status().data), (8, bytes(2))], ids=["bytes-past-the-dlc", "dlc-past-the-bytes"])
def test_a_frame_is_as_long_as_its_dlc_says_and_refused_when_that_is_not_the_dbcs(reader, dlc, data):
    """A DLC of 2 with 8 bytes in the buffer (python-can-remote carries the two apart) is a 2-byte
    frame: the BMS state in byte 4 was never sent and must not be believed."""
    reader.on_message(status(), now=0.0)
    fault = frame("BmsStatus", BmsState=6, ContactorState=4, HvState=6, Isolation=5000).data
    msg = can.Message(arbitration_id=0x212, data=fault if dlc == 2 else data, dlc=dlc, is_extended_id=False)
    handed = reader.on_message(msg, now=0.05)
    assert reader.dropped == {"wrong_length": 1} and "DLC" in reader.last_drop
    assert handed is not None and {"bms_state", "contactor_state"} <= handed.stale
    assert reader.snapshot(0.05).bms_state == 2  # the refused frame's FAULT was not believed


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_float_signal_carrying_nan_or_infinity_is_refused_not_raised(tmp_path, value):
    """An installer's DBC may declare an IEEE float signal (docs/can.md, fitting another vehicle)."""
    text = DBC.read_text().replace(" SG_ HvilStatus : 40|4@1+ (1,0) [0|15]", " SG_ HvilStatus : 16|32@1- (1,0) [0|15]")
    floats = tmp_path / "float-hvil.dbc"
    floats.write_text(text + "\nSIG_VALTYPE_ 522 HvilStatus : 1;\n")
    reader = BmsReader(floats, clock=lambda: 0.0)
    assert reader.db.get_message_by_frame_id(0x20A).get_signal_by_name("HvilStatus").is_float
    contactors = bytes([4 | (4 << 3), 0])
    reader.on_message(can.Message(arbitration_id=0x20A, data=contactors + struct.pack("<f", 1.0),
                                  is_extended_id=False), now=0.0)
    assert reader.snapshot(0.0).hvil_ok is True
    handed = reader.on_message(can.Message(arbitration_id=0x20A, data=contactors + struct.pack("<f", value),
                                           is_extended_id=False), now=0.05)
    assert reader.dropped == {"out_of_range": 1} and "HvilStatus" in reader.last_drop
    assert handed is not None and {"hvil_ok", "pack_contactor_neg", "pack_contactor_pos"} <= handed.stale


def shifted_state_dbc(tmp_path) -> Path:
    """The bundled DBC for a vehicle numbering its BMS states from 1: offset -1 yields the gateway's codes,
    and the value table (keyed by raw value, as DBCs are) runs 1..11."""
    text = DBC.read_text().replace(" SG_ BmsState : 32|4@1+ (1,0) [0|15]", " SG_ BmsState : 32|4@1+ (1,-1) [-1|14]")
    table = " ".join(f'{code + 1} "S{code}"' for code in range(11))
    text = re.sub(r"VAL_ 530 BmsState [^;]*;", f"VAL_ 530 BmsState {table} ;", text)
    path = tmp_path / "shifted-state.dbc"
    path.write_text(text)
    return path


def test_a_value_table_is_checked_against_the_raw_value_when_scale_and_offset_shift_the_codes(tmp_path):
    """docs/can.md: a DBC whose scale and offset yield the gateway's codes is fine, and a raw value outside
    its value table is refused. Raw 1 (the vehicle's STANDBY) must be believed as code 0; raw 12 refused."""
    reader = BmsReader(shifted_state_dbc(tmp_path), clock=lambda: 0.0)
    message = reader.db.get_message_by_name("BmsStatus")

    def state(raw: int) -> can.Message:
        data = bytearray(message.encode({"BmsState": 0, "ContactorState": 4, "HvState": 6, "Isolation": 5000}))
        data[4] = (data[4] & 0xF0) | raw
        return can.Message(arbitration_id=message.frame_id, data=bytes(data), is_extended_id=False)

    for now, (raw, code) in enumerate([(1, 0), (3, 2), (11, 10)]):
        reader.on_message(state(raw), now=float(now))
        snap = reader.snapshot(float(now))
        assert snap.bms_state == code and "bms_state" not in snap.stale, reader.last_drop
    assert not reader.dropped
    reader.on_message(state(12), now=3.0)
    assert reader.dropped == {"not_in_value_table": 1} and "BmsState" in reader.last_drop
    assert "bms_state" in reader.snapshot(3.0).stale


def test_a_refused_frame_that_stales_a_critical_field_steps_the_core_at_once_not_at_the_tick(reader):
    """docs/can.md: the core is stepped whenever the set of stale fields changes."""
    reader.on_message(status(), now=0.0)
    handed = reader.on_message(can.Message(arbitration_id=0x212, data=bytes([0, 4, 6, 0, 15, 0, 0, 0]),
                                           is_extended_id=False), now=0.05)
    assert handed is not None and {"bms_state", "contactor_state"} <= handed.stale


def test_a_snapshot_is_as_old_as_the_last_frame_believed_so_bms_timeout_judges_a_silent_bus(tmp_path):
    """With a DBC of 1 s periods each field stays fresh for 3 s, but `bms_timeout_s` (0.5 s) must still
    see a silent bus: a tick's snapshot carries the last believed frame's time, not the tick's."""
    slow = tmp_path / "slow.dbc"
    slow.write_text(DBC.read_text().replace('GenMsgCycleTime" BO_ 658 100',
                                                                    'GenMsgCycleTime" BO_ 658 1000'))
    assert 'GenMsgCycleTime" BO_ 658 1000' in slow.read_text()
    reader = BmsReader(slow, clock=lambda: 0.0)
    assert reader.on_message(soc(60.0), now=0.0).received_at == 0.0
    late = reader.snapshot(2.9)
    assert late.stale == frozenset() and late.received_at == 0.0  # fresh by its period, 2.9 s old
    assert not bms_usable(late, 2.9, Policy())


def test_an_soc_move_of_exactly_the_slack_passes_from_any_start(reader):
    """0.1 × raw is not exact in binary: a +0.5 % move at the same instant was refused from 0.1 %, 0.7 %..."""
    for tenths in range(0, 995):
        start = 1_000.0 * tenths  # long after the pair before: any move to the start is possible
        reader.on_message(soc(tenths / 10), now=start)
        reader.on_message(soc(tenths / 10 + 0.5), now=start)
    assert reader.dropped == {} and reader.accepted == 2 * 995


def test_implausible_frame_makes_its_fields_stale_until_a_good_one(reader):
    reader.on_message(soc(50.0), now=0.0)
    reader.on_message(can.Message(arbitration_id=0x292, data=bytes([0xFF] * 8), is_extended_id=False), now=0.05)
    assert "soc_min_pct" in reader.snapshot(0.05).stale
    reader.on_message(soc(50.0), now=0.1)
    assert "soc_min_pct" not in reader.snapshot(0.1).stale


def test_impossible_soc_jump_is_refused_until_time_makes_it_possible(reader):
    reader.on_message(soc(60.0), now=0.0)
    assert "soc_min_pct" in reader.on_message(soc(35.0), now=0.1).stale  # refused: stale at once
    assert reader.dropped["soc_jump"] == 1
    s = reader.snapshot(0.1)
    assert s.soc_min_pct == pytest.approx(60.0) and "soc_min_pct" in s.stale
    assert reader.on_message(soc(59.5), now=0.2) is not None  # small moves are fine
    assert reader.on_message(soc(35.0), now=30.0).soc_min_pct == pytest.approx(35.0)


@pytest.mark.parametrize("direction", [-1, 1])
def test_a_soc_ramp_faster_than_believable_is_refused_however_small_its_steps(reader, direction):
    """Steps of the slack (0.5 %) every 100 ms are 5 %/s: each alone is within rate and slack of the
    value before it, but a pack's SoC cannot move so (the fastest believable is 1 %/s)."""
    reader.on_message(soc(50.0), now=0.0)
    for n in range(1, 30):
        reader.on_message(soc(50.0 + direction * 0.5 * n), now=0.1 * n)
    assert reader.dropped["soc_jump"] > 0
    believed = reader.snapshot(2.9).soc_min_pct
    assert abs(believed - 50.0) <= 1.0 * 2.9 + 0.5 and "soc_min_pct" in reader.snapshot(2.9).stale


def test_a_soc_at_the_believable_rate_with_noise_is_never_refused(reader):
    """1 %/s (the fastest believable) with ±0.2 % of estimator noise, at 10 Hz: every frame believed."""
    for n in range(300):
        noise = 0.2 if n % 2 else -0.2
        reader.on_message(soc(round(80.0 - 0.1 * n + noise, 1)), now=0.1 * n)
    assert reader.dropped == {} and reader.accepted == 300


def test_a_repeated_payload_is_still_judged_on_time(reader):
    """A repeat skips the decode, not the time-dependent checks: the same jump is refused again."""
    reader.on_message(soc(60.0), now=0.0)
    assert "soc_min_pct" in reader.on_message(soc(35.0), now=0.1).stale
    assert reader.on_message(soc(35.0), now=0.2) is None  # refused again: nothing new to say
    assert reader.dropped["soc_jump"] == 2 and "soc_min_pct" in reader.snapshot(0.2).stale
    assert reader.on_message(soc(60.0), now=0.3) is not None  # the believed value again: fresh, not stale
    assert reader.snapshot(0.3).stale == frozenset() and reader.accepted == 2
    assert reader.on_message(soc(35.0), now=30.0).soc_min_pct == pytest.approx(35.0)


def test_mapping_override_swaps_a_signal():
    r = BmsReader(DBC, clock=lambda: 0.0, mapping={"soc_min_pct": "BmsSoc.SocAvg", "soc_ui_pct": ""})
    r.on_message(frame("BmsSoc", SocMin=40, SocUi=41, SocMax=42, SocAvg=43), now=0)
    s = r.snapshot(0)
    assert s.soc_min_pct == pytest.approx(43) and s.soc_ui_pct is None


@pytest.mark.parametrize("mapping,named", [
    ({"soc_minimum": "BmsSoc.SocMin"}, "soc_minimum"),
    ({"soc_min_pct": "NoSuchMessage.SocMin"}, "NoSuchMessage"),
    ({"soc_min_pct": "BmsSoc.NoSuchSignal"}, "NoSuchSignal"),
    ({"soc_min_pct": "SocMin"}, "MESSAGE.SIGNAL"),
])
def test_bad_mapping_is_an_input_error_naming_it(mapping, named):
    with pytest.raises(InputError, match=named):
        BmsReader(DBC, clock=lambda: 0.0, mapping=mapping, source="cfg.toml: vehicle.signals")


def test_missing_or_bad_dbc_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="not found"):
        BmsReader(tmp_path / "none.dbc", clock=lambda: 0.0)
    bad = tmp_path / "bad.dbc"
    bad.write_text("BO_ this is not a dbc\n")
    with pytest.raises(InputError, match="bad.dbc"):
        BmsReader(bad, clock=lambda: 0.0)


def test_can_filters_cover_exactly_the_bms_ids_in_both_id_formats(reader):
    """11-bit to be read; 29-bit of the same number to be counted as `extended_id` (an id clash on the bus)."""
    bms_ids = {0x132, 0x292, 0x252, 0x352, 0x312, 0x212, 0x20A, 0x332, 0x3D2}
    filters = reader.can_filters()
    assert {f["can_id"] for f in filters if f["extended"] is False and f["can_mask"] == 0x7FF} == bms_ids
    assert {f["can_id"] for f in filters if f["extended"] is True and f["can_mask"] == 0x1FFFFFFF} == bms_ids
    assert len(filters) == 2 * len(bms_ids)


def test_a_29_bit_frame_with_a_bms_ids_number_passes_the_bus_filter_and_is_counted():
    """docs/can.md counts it as `extended_id`, an installer's sign of an id clash: the bus filter took 11-bit
    frames only, so the gateway never saw one and never counted it."""
    channel = "test_bms_extended"
    with can.Bus(interface="virtual", channel=channel) as rx, can.Bus(interface="virtual", channel=channel) as tx:
        reader = BmsReader(DBC, clock=lambda: 1.0)
        rx.set_filters(reader.can_filters())
        got = threading.Event()
        notifier = can.Notifier(rx, [BmsListener(reader, lambda s: got.set())])
        try:
            tx.send(can.Message(arbitration_id=0x252, data=bytes(8), is_extended_id=True))
            tx.send(can.Message(arbitration_id=0x1000_0252, data=bytes(8), is_extended_id=True))  # another number
            tx.send(soc(72.5))  # after both: once it is read, they were
            assert got.wait(5.0)
        finally:
            notifier.stop()
        assert reader.frame_counts() == (1, {"extended_id": 1})


def test_clock_is_used_when_no_time_is_given():
    now = [10.0]
    r = BmsReader(DBC, clock=lambda: now[0])
    assert r.on_message(soc(50)).received_at == 10.0


@given(frame_id=st.sampled_from([0x132, 0x292, 0x252, 0x352, 0x312, 0x212, 0x20A, 0x332, 0x3D2]),
       data=st.lists(st.binary(min_size=0, max_size=8), min_size=1, max_size=20))
def test_any_bytes_never_raise_and_never_yield_impossible_values(frame_id, data):
    r = BmsReader(DBC, clock=lambda: 0.0)
    for i, payload in enumerate(data):
        s = r.on_message(can.Message(arbitration_id=frame_id, data=payload, is_extended_id=False), now=i * 0.01)
        if s is None:
            continue
        for name, (lo, hi) in PLAUSIBLE.items():
            value = getattr(s, name)
            assert value is None or lo <= value <= hi, name
    assert r.accepted + sum(r.dropped.values()) == len(data)


def test_listener_on_a_virtual_bus_with_a_notifier():
    channel = "test_bms_listener"
    with can.Bus(interface="virtual", channel=channel) as rx, can.Bus(interface="virtual", channel=channel) as tx:
        rx.set_filters(BmsReader(DBC, clock=lambda: 0.0).can_filters())
        reader = BmsReader(DBC, clock=lambda: 1.0)
        got, done = [], threading.Event()

        def on_snapshot(s):
            got.append(s)
            if s.bms_state is not None and s.soc_min_pct is not None:
                done.set()

        notifier = can.Notifier(rx, [BmsListener(reader, on_snapshot)])
        try:
            tx.send(can.Message(arbitration_id=0x7FF, data=bytes(8), is_extended_id=False))
            tx.send(soc(72.5))
            tx.send(status(bms=2))
            assert done.wait(5.0)
        finally:
            notifier.stop()
        assert got[-1].soc_min_pct == pytest.approx(72.5) and got[-1].bms_state == 2


def test_a_frame_is_stamped_under_the_readers_lock_so_a_tick_cannot_come_between():
    """The receive thread stamps a frame and the loop's tick takes a snapshot, each under the reader's lock:
    stamped outside it, a tick could stamp a later time in between, and the frame's snapshot (a fault, say),
    older than the one the core then holds, would not be believed until the next tick."""
    locked_at_stamp: list[bool] = []

    def clock() -> float:
        locked_at_stamp.append(stamped.locked())
        return 1.0

    timed = BmsReader(DBC, clock=clock)
    stamped = timed._lock
    timed.on_message(status(bms=6))
    assert locked_at_stamp == [True]


@pytest.mark.parametrize("coldest, fault", [(-25.0, True), (-24.75, False)])
def test_the_coldest_pack_0x312_can_report_is_an_under_temp_fault(reader, coldest, fault):
    """MinPackTemp starts at −25 °C (raw 0): a limit below that, as −30 °C was, could never be reached."""
    reader.on_message(frame("BmsThermal", MinPackTemp=coldest, MaxPackTemp=20.0), now=0.0)
    s = reader.snapshot(0.0)
    assert s.min_temp_c == coldest
    found = conditions(s, None, 0.0, Policy(), bms_seen=False, inverter_seen=False)
    assert (FaultKind.UNDER_TEMP in found) is fault


def test_a_frames_snapshot_overtaken_by_a_tick_does_not_make_the_silent_soc_fresh_again(reader):
    """The Notifier thread's snapshot of a status frame at 0.29 (SoC still fresh) is queued behind a tick
    at 0.31 (SoC past its timeout), with the same `received_at`. The core, given the tick's first, once
    believed the silent SoC again from the older one; its `as_of` tells it is the older view."""
    reader.on_message(soc(60), now=0.0)  # the last SoC frame
    reader.on_message(status(bms=2), now=0.0)
    queued = reader.on_message(status(bms=0), now=0.29)
    tick = reader.snapshot(0.31)
    assert queued is not None and not queued.stale and "soc_min_pct" in tick.stale
    assert queued.received_at == tick.received_at == 0.29 and queued.as_of == 0.29 and tick.as_of == 0.31
    c = step(Controller.start(Policy(), now=0.0), [tick], 0.31).controller
    c = step(c, [queued], 0.311).controller  # the hop delivered after the tick
    assert "soc_min_pct" in c.bms.stale and c.bms.believed("soc_min_pct") is None
    later = reader.on_message(soc(60), now=0.35)  # a new SoC frame: fresh again
    assert later is not None
    assert step(c, [later], 0.35).controller.bms.believed("soc_min_pct") == 60.0
