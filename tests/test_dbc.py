"""The two BMS DBCs match docs/can.md and every message and page survives encode -> decode."""

from __future__ import annotations

import cantools
import pytest
from hypothesis import given
from hypothesis import strategies as st

from firmware_py.config import bundled_dbc

DBCS = ("cybertruck_bms.dbc", "tesla_model3_bms.dbc")

# id: (period ms, {signal: (start, length, scale, offset, signed)})
TABLE = {
    0x132: (10, {"PackVoltage": (0, 16, None, 0, False), "SmoothedCurrent": (16, 16, -0.1, 0, True),
                 "RawCurrent": (32, 16, -0.05, 822, True)}),
    0x292: (100, {n: (s, 10, 0.1, 0, False) for n, s in
                  (("SocMin", 0), ("SocUi", 10), ("SocMax", 20), ("SocAvg", 30))}),
    0x252: (100, {"MaxRegenPower": (0, 16, 0.01, 0, False), "MaxDischargePower": (16, 16, 0.01, 0, False)}),
    0x352: (1000, {"EnergyStatusIndex": (0, 2, 1, 0, False), "NominalFullPack": (16, 16, 0.02, 0, False),
                   "NominalRemaining": (32, 16, 0.02, 0, False), "EnergyBuffer": (16, 16, 0.01, 0, False),
                   "ExpectedRemaining": (32, 16, 0.02, 0, False)}),
    0x312: (500, {"MinPackTemp": (44, 9, 0.25, -25, False), "MaxPackTemp": (53, 9, 0.25, -25, False)}),
    0x212: (100, {"BmsState": (32, 4, 1, 0, False), "ContactorState": (8, 3, 1, 0, False),
                  "HvState": (16, 3, 1, 0, False), "Isolation": (19, 10, 10, 0, False)}),
    0x20A: (1000, {"PackContactorNeg": (0, 3, 1, 0, False), "PackContactorPos": (3, 3, 1, 0, False),
                   "HvilStatus": (40, 4, 1, 0, False)}),
    0x332: (1000, {"BrickMinMaxIndex": (0, 2, 1, 0, False), "BrickVoltageMax": (2, 12, 0.002, 0, False),
                   "BrickVoltageMin": (16, 12, 0.002, 0, False)}),
    0x3D2: (1000, {"TotalDischarge": (0, 32, 0.001, 0, False), "TotalCharge": (32, 32, 0.001, 0, False)}),
}
VOLTAGE_SCALE = {"cybertruck_bms.dbc": 0.02, "tesla_model3_bms.dbc": 0.01}
PAGES = {0x352: {"NominalFullPack": 0, "NominalRemaining": 0, "EnergyBuffer": 1, "ExpectedRemaining": 1},
         0x332: {"BrickVoltageMax": 1, "BrickVoltageMin": 1}}


def load(name: str):
    return cantools.database.load_file(str(bundled_dbc(name)), strict=True)


@pytest.mark.parametrize("name", DBCS)
def test_layout_matches_design_table(name):
    db = load(name)
    assert {m.frame_id for m in db.messages} == set(TABLE)
    for frame_id, (period, sigs) in TABLE.items():
        message = db.get_message_by_frame_id(frame_id)
        assert message.cycle_time == period, message.name
        assert {s.name for s in message.signals} == set(sigs), message.name
        for sig_name, (start, length, scale, offset, signed) in sigs.items():
            sig = message.get_signal_by_name(sig_name)
            scale = VOLTAGE_SCALE[name] if scale is None else scale
            assert (sig.start, sig.length, sig.scale, sig.offset, sig.is_signed, sig.byte_order) == \
                   (start, length, scale, offset, signed, "little_endian"), f"{message.name}.{sig_name}"
            if frame_id in PAGES and sig_name in PAGES[frame_id]:
                assert sig.multiplexer_ids == [PAGES[frame_id][sig_name]]


@pytest.mark.parametrize("name", DBCS)
def test_enumerations_have_value_tables(name):
    db = load(name)
    status = db.get_message_by_frame_id(0x212)
    assert status.get_signal_by_name("BmsState").choices[2] == "SUPPORT"
    assert status.get_signal_by_name("BmsState").choices[6] == "FAULT"
    assert status.get_signal_by_name("ContactorState").choices[4] == "CLOSED"
    assert status.get_signal_by_name("HvState").choices[6] == "UP"
    contactors = db.get_message_by_frame_id(0x20A)
    for sig in ("PackContactorNeg", "PackContactorPos"):
        choices = contactors.get_signal_by_name(sig).choices
        assert (choices[4], choices[6], choices[7]) == ("PULLED_IN", "ECONOMIZED", "WELDED")
    assert contactors.get_signal_by_name("HvilStatus").choices[1] == "OK"


def _pages(message):
    if not message.is_multiplexed():
        return [None]
    return sorted({i for s in message.signals for i in (s.multiplexer_ids or ())})


def _cases():
    for name in DBCS:
        for message in load(name).messages:
            for page in _pages(message):
                yield name, message.frame_id, page


@pytest.mark.parametrize("name,frame_id,page", list(_cases()))
@given(data=st.data())
def test_every_message_and_page_round_trips(name, frame_id, page, data):
    """Any in-range raw value of every signal comes back exactly after encode -> decode."""
    message = load_cached(name).get_message_by_frame_id(frame_id)
    raw = {}
    for sig in message.signals:
        if sig.multiplexer_ids and page not in sig.multiplexer_ids:
            continue
        if sig.is_multiplexer:
            raw[sig.name] = page
            continue
        lo, hi = (-(1 << (sig.length - 1)), (1 << (sig.length - 1)) - 1) if sig.is_signed else (0, (1 << sig.length) - 1)
        raw[sig.name] = data.draw(st.integers(lo, hi), label=sig.name)
    payload = message.encode(raw, scaling=False, strict=False)
    assert len(payload) == message.length
    assert message.decode(payload, scaling=False, decode_choices=False) == raw


_CACHE: dict = {}


def load_cached(name):
    if name not in _CACHE:
        _CACHE[name] = load(name)
    return _CACHE[name]


def test_physical_values_round_trip():
    """Scaled values as the simulator sends them come back within one step of the scale."""
    db = load("cybertruck_bms.dbc")
    amps = db.get_message_by_frame_id(0x132)
    decoded = amps.decode(amps.encode({"PackVoltage": 812.34, "SmoothedCurrent": -101.8, "RawCurrent": -100.0}))
    assert decoded["PackVoltage"] == pytest.approx(812.34, abs=0.02)
    assert decoded["SmoothedCurrent"] == pytest.approx(-101.8, abs=0.1)
    assert decoded["RawCurrent"] == pytest.approx(-100.0, abs=0.05)
    energy = db.get_message_by_frame_id(0x352)
    page1 = energy.decode(energy.encode({"EnergyStatusIndex": 1, "EnergyBuffer": 3.27, "ExpectedRemaining": 58.12}))
    assert page1 == {"EnergyStatusIndex": 1, "EnergyBuffer": pytest.approx(3.27), "ExpectedRemaining": pytest.approx(58.12)}
