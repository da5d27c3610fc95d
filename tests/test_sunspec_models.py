"""The SunSpec codec: layouts from pysunspec2's JSON, checked against pysunspec2's own model objects."""

from __future__ import annotations

import math

import pytest
import sunspec2.device
from hypothesis import given
from hypothesis import strategies as st

from firmware_py.inverter.sunspec import END_MODEL_ID, SUNS_MARKER, ModelDef, SunSpecError, SunSpecMap

MODELS = (1, 701, 702, 704, 713)


def _reference_offsets(model_id: int) -> dict[str, int]:
    """Point offsets as pysunspec2's own device model computes them (an independent reading of the JSON)."""
    ref = sunspec2.device.Model(model_id=model_id)
    out = {name: p.offset for name, p in ref.points.items()}
    for gname, group in ref.groups.items():
        for pname, p in group.points.items():
            out[f"{gname}.{pname}"] = p.offset
    return out


@pytest.mark.parametrize("model_id", MODELS)
def test_offsets_and_length_match_pysunspec2(model_id):
    mdef = ModelDef.load(model_id)
    assert {n: p.offset for n, p in mdef.points.items()} == _reference_offsets(model_id)
    assert mdef.length == sunspec2.device.Model(model_id=model_id).len - 2


def test_well_known_704_points():
    m = ModelDef.load(704)
    assert m.point("WSet").type == "int32" and m.point("WSet").sf == "WSet_SF"
    assert m.point("WSetMod").symbol("WATTS") == 1
    assert m.span("WSetEna", "WSetRvrtTms") == (22, 11)


def test_int32_is_big_endian_high_word_first_and_scaled():
    m = ModelDef.load(704)
    assert m.encode_point("WSet", -5000.0, {"WSet_SF": -1}) == [0xFFFF, 0x3CB0]  # -50000
    regs = m.encode({"WSet": -5000.0, "WSet_SF": -1})
    assert m.decode(regs)["WSet"] == pytest.approx(-5000.0)
    assert m.decode(regs, scaled=False)["WSet"] == -50000


def test_uint64_energy_and_strings():
    m = ModelDef.load(701)
    regs = m.encode({"TotWhInj": 2**40 + 7, "MnAlrmInfo": "over temp"})
    lo = m.offset("TotWhInj")
    assert regs[lo:lo + 4] == [0, 0x100, 0, 7]
    assert m.decode(regs)["TotWhInj"] == 2**40 + 7
    assert m.decode(regs)["MnAlrmInfo"] == "over temp"


@pytest.mark.parametrize(("model_id", "point", "sentinel"), [
    (701, "W", [0x8000]), (702, "WMaxRtg", [0xFFFF]), (704, "WSet", [0x8000, 0]),
    (701, "Alrm", [0xFFFF, 0xFFFF]), (701, "TotWhInj", [0xFFFF] * 4), (1, "SN", [0] * 16),
])
def test_not_implemented_sentinels_decode_as_none(model_id, point, sentinel):
    m = ModelDef.load(model_id)
    p = m.point(point)
    regs = [0] * m.size
    regs[p.offset:p.offset + p.size] = sentinel
    assert m.decode(regs)[point] is None
    assert m.encode({})[p.offset:p.offset + p.size] == sentinel  # absent = not implemented


@given(st.sampled_from([(701, "W"), (704, "WSet"), (701, "Hz"), (702, "WMaxRtg"), (701, "TotWhAbs")]),
       st.integers(min_value=-3, max_value=2), st.data())
def test_scaled_round_trip(which, sf, data):
    model_id, name = which
    m = ModelDef.load(model_id)
    p = m.point(name)
    lo, hi = {"int16": (-0x7FFF, 0x7FFF), "uint16": (0, 0xFFFE), "int32": (-0x7FFFFFFF, 0x7FFFFFFF),
              "uint32": (0, 0xFFFFFFFE), "uint64": (0, 2**40)}[p.type]  # scaled meters: exact in a float
    raw = data.draw(st.integers(min_value=lo, max_value=hi))
    value = raw * 10.0 ** sf
    regs = m.encode({name: value, p.sf: sf})
    assert m.decode(regs, scaled=False)[name] == raw
    assert math.isclose(m.decode(regs)[name], value, rel_tol=1e-9, abs_tol=1e-9)


def test_unscaled_64_bit_meter_stays_exact():
    m = ModelDef.load(701)
    assert m.decode(m.encode({"TotWhInj": 2**63 + 1}))["TotWhInj"] == 2**63 + 1


def test_value_out_of_range_is_a_clear_error():
    with pytest.raises(SunSpecError, match="WMaxRtg"):
        ModelDef.load(702).encode({"WMaxRtg": 70_000})


def test_unknown_model_and_point_are_clear_errors():
    with pytest.raises(SunSpecError, match="model 9999"):
        ModelDef.load(9999)
    with pytest.raises(SunSpecError, match="no point 'Nope'"):
        ModelDef.load(701).offset("Nope")


def test_map_lays_out_marker_chain_and_end_model():
    smap = SunSpecMap(40000).add(1, {"Mn": "x"}).add(701, {}).add(704, {})
    regs = smap.registers()
    assert tuple(regs[:2]) == SUNS_MARKER
    addrs = smap.addresses()
    assert addrs == {1: 40002, 701: 40002 + 68, 704: 40002 + 68 + 155}
    for model_id, at in addrs.items():
        assert regs[at - 40000] == model_id
        assert regs[at - 40000 + 1] == ModelDef.load(model_id).length
    assert regs[-2:] == [END_MODEL_ID, 0]
    assert smap.address(704, "WSet") == addrs[704] + 24


def test_the_cores_inverter_states_are_sunspec_invst():
    """The core cannot read pysunspec2 (it stays pure), so its copy of InvSt is checked here."""
    from firmware_py.core.types import InverterState
    from firmware_py.inverter.sunspec import InvSt

    assert {s.name: s.value for s in InverterState} == {s.name: s.value for s in InvSt}


def test_symbols_come_from_the_model_json():
    from firmware_py.inverter.sunspec import DER_CONTROL_AC, DER_MEASURE_AC, AlrmBit, WSetEna, WSetMod

    assert WSetMod.WATTS == ModelDef.load(DER_CONTROL_AC).point("WSetMod").symbol("WATTS")
    assert WSetEna.ENABLED == ModelDef.load(DER_CONTROL_AC).point("WSetEna").symbol("ENABLED")
    assert AlrmBit.GRID_DISCONNECT == ModelDef.load(DER_MEASURE_AC).point("Alrm").symbol("GRID_DISCONNECT")
