"""pysunspec2's own client (an independent Modbus and SunSpec implementation) against the simulated inverter."""

from __future__ import annotations

import asyncio

import pytest
from sunspec2.modbus.client import SunSpecModbusClientDeviceTCP

from firmware_py.sim.faults import InverterFault as Fault
from firmware_py.sim.inverter import InverterModel, SimInverterServer

BIG = 50_000.0


def _scan_and_write(port: int) -> dict:
    dev = SunSpecModbusClientDeviceTCP(slave_id=1, ipaddr="127.0.0.1", ipport=port, timeout=2)
    try:
        dev.scan()
        seen = {mid: dev.models[mid][0] for mid in (1, 701, 702, 704, 713)}
        out = {
            "ids": sorted(k for k in dev.models if isinstance(k, int)),
            "Mn": seen[1].Mn.value, "SN": seen[1].SN.value,
            "W": seen[701].W.cvalue, "InvSt": seen[701].InvSt.value, "ConnSt": seen[701].ConnSt.value,
            "Alrm": seen[701].Alrm.value, "TotWhInj": seen[701].TotWhInj.cvalue, "Hz": seen[701].Hz.cvalue,
            "LLV": seen[701].LLV.cvalue, "WMaxRtg": seen[702].WMaxRtg.cvalue,
            "WChaRteMaxRtg": seen[702].WChaRteMaxRtg.cvalue, "WHRtg": seen[713].WHRtg.cvalue,
            "SoC": seen[713].SoC.cvalue, "WSet_before": seen[704].WSet.cvalue,
        }
        ctl = seen[704]
        ctl.WSetMod.value = 1
        ctl.WSet.cvalue = -3_210.5
        ctl.WSetEna.value = 1
        ctl.write()
        ctl.read()
        out["WSet_after"] = ctl.WSet.cvalue
        return out
    finally:
        dev.close()


def test_pysunspec2_scans_reads_every_model_and_writes_wset():
    async def main():
        m = InverterModel()
        m.soc_pct = 64.5
        m.write("WSetMod", 1)
        m.write("WSet", 7_000.0)
        m.write("WSetEna", 1)
        m.advance(1.0, 1.0, BIG, BIG)
        m.advance(3600.0, 3601.0, BIG, BIG)
        m.inject(Fault.GRID_OUTAGE, until=4000.0)
        m.advance(0.0, 3601.0, BIG, BIG)
        async with SimInverterServer(m) as server:
            got = await asyncio.to_thread(_scan_and_write, server.port)
        return m, got

    m, got = asyncio.run(main())
    assert got["ids"] == [1, 701, 702, 703, 704, 713]
    assert (got["Mn"], got["SN"]) == ("powershare-gw", "SIM-0001")
    assert got["W"] == pytest.approx(m.ac_power_w)  # islanded: the home load
    assert got["InvSt"] == 3 and got["ConnSt"] == 0 and got["Alrm"] == 1 << 4
    assert got["TotWhInj"] == pytest.approx(int(m.tot_wh_inj)) and got["TotWhInj"] >= 7_000
    assert got["Hz"] == pytest.approx(60.0) and got["LLV"] == pytest.approx(240.0)
    assert got["WMaxRtg"] == got["WChaRteMaxRtg"] == 11_500
    assert got["WHRtg"] == 123_000 and got["SoC"] == pytest.approx(64.5)
    assert got["WSet_before"] == pytest.approx(7_000.0)
    assert got["WSet_after"] == pytest.approx(-3_210.5)
    assert m.wset_w == pytest.approx(-3_210.5) and m.controls["WSetEna"] == 1
