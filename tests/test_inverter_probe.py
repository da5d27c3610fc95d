"""`powershare-gw inverter probe` against the simulated inverter over Modbus TCP (real pymodbus on both sides)."""

from __future__ import annotations

import asyncio

import pytest

from firmware_py.config import InverterConfig
from firmware_py.errors import InputError
from firmware_py.inverter.commands import _probe
from firmware_py.sim.inverter import InverterModel, SimInverterServer


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
