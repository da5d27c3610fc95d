"""Prometheus metrics (issue 15): `/metrics` served by the gateway, parsed with prometheus-client's parser.

The gateway runs in lock-step (`lockstep.Rig`) with `[metrics] enabled`, so the
endpoint is the integration `run` starts; a real HTTP client scrapes it on 127.0.0.1
and the text is read back with `prometheus_client.parser`, the way a Prometheus
server would. Each test makes something happen on the bench (a dispatch, a BMS fault
frame, a garbled frame, the inverter going away) and checks the series that count it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import aiohttp
import can
import pytest
from broker import bounded
from lockstep import Rig
from prometheus_client.parser import text_string_to_metric_families

from firmware_py import cli
from firmware_py.config import Config
from firmware_py.core.types import DispatchKind, DispatchRequest, Mode
from firmware_py.errors import InputError
from firmware_py.inverter.client import ModbusErrorCause
from firmware_py.metrics.server import MetricsServer


def metrics_enabled(config: Config) -> Config:
    return replace(config, metrics=replace(config.metrics, enabled=True, listen="127.0.0.1:0"))


@asynccontextmanager
async def serving(tmp: Path) -> AsyncIterator[tuple[Rig, MetricsServer]]:
    async with Rig(tmp, configure=metrics_enabled) as rig:
        server = rig.assembly.integrations["metrics"]
        assert isinstance(server, MetricsServer)
        await server.start(rig.gateway)
        try:
            await rig.run(2.0)
            yield rig, server
        finally:
            await server.stop()


class Scrape:
    """One scrape as Prometheus reads it: samples by name and labels."""

    def __init__(self, text: str) -> None:
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                        for f in self.families.values() for s in f.samples}

    def value(self, name: str, **labels: str) -> float:
        return self.samples[(name, tuple(sorted(labels.items())))]


async def scrape(server: MetricsServer) -> Scrape:
    async with aiohttp.ClientSession() as http, http.get(server.url) as response:
        assert response.status == 200 and response.content_type == "text/plain"
        return Scrape(await response.text())


def dispatch(rig: Rig, request_id: str, watts: float = 5_000) -> DispatchRequest:
    now = rig.gateway.now()
    return DispatchRequest(request_id, "test", DispatchKind.DISCHARGE, watts, now, now + 600, received_at=now)


def test_every_name_is_prefixed_and_the_state_links_and_frames_are_read(tmp_path):
    async def main() -> Scrape:
        async with serving(tmp_path) as (rig, server):
            return await scrape(server)

    s = bounded(main())
    assert s.families and all(name.startswith("powershare_") for name in s.families)
    assert s.value("powershare_mode", mode="STANDBY") == 1 and s.value("powershare_mode", mode="FAULT") == 0
    assert s.families["powershare_mode"].type == "gauge"
    assert 70 < s.value("powershare_soc_percent") <= 80 and s.value("powershare_floor_percent") == 42
    assert s.value("powershare_link_up", link="bms") == 1 and s.value("powershare_link_up", link="inverter") == 1
    assert 0 <= s.value("powershare_link_age_seconds", link="inverter") <= 1.0
    assert s.value("powershare_can_frames_accepted_total") > 50
    assert s.families["powershare_can_frames_accepted"].type == "counter"
    assert {s.value("powershare_modbus_errors_total", cause=c.value) for c in ModbusErrorCause} == {0}
    assert s.value("powershare_build_info", version=next(iter(
        dict(k[1]).get("version") for k in s.samples if k[0] == "powershare_build_info"))) == 1
    assert s.value("powershare_process_resident_memory_bytes") > 10e6  # the default process collector, prefixed
    assert s.families["powershare_reaction_seconds"].type == "histogram"
    assert s.value("powershare_reaction_seconds_count") == 0


def test_dispatch_answers_energy_and_the_reaction_to_a_bms_fault_frame_are_counted(tmp_path):
    async def main() -> tuple[Scrape, Scrape]:
        async with serving(tmp_path) as (rig, server):
            assert (await rig.gateway.submit(dispatch(rig, "peak-1"))).verdict.value == "accepted"
            await rig.run(30.0)
            during = await scrape(server)
            rig.node.inject("bms_fault", until=rig.time.mono + 5)  # the frame the core stops for
            await rig.run(0.5)
            assert rig.gateway.controller.mode is Mode.FAULT
            refused = await rig.gateway.submit(dispatch(rig, "peak-2"))
            assert refused is not None and refused.reason is not None and refused.reason.value == "FAULT"
            return during, await scrape(server)

    during, after = bounded(main())
    assert during.value("powershare_mode", mode="DISCHARGE") == 1
    assert 4_900 <= during.value("powershare_power_watts") <= 5_000
    assert 0 < during.value("powershare_event_delivered_watt_hours") <= 5_000 * 30 / 3600
    assert during.value("powershare_delivered_energy_watt_hours_total") == \
        during.value("powershare_event_delivered_watt_hours")
    assert during.value("powershare_inverter_injected_watt_hours_total") > 0
    assert after.value("powershare_dispatch_answers_total", verdict="accepted") == 1
    assert after.value("powershare_dispatch_answers_total", verdict="rejected") == 1
    assert after.value("powershare_dispatch_rejections_total", reason="FAULT") == 1
    assert after.value("powershare_fault_active", kind="bms_fault") == 1
    # The fault frame's snapshot changed the setpoint to 0 W: one reaction, measured to the write's reply.
    assert after.value("powershare_reaction_seconds_count") >= 1
    assert 0 < after.value("powershare_reaction_seconds_sum") < 1.0
    assert after.value("powershare_reaction_seconds_bucket", le="+Inf") == \
        after.value("powershare_reaction_seconds_count")
    assert after.value("powershare_delivered_energy_watt_hours_total") >= \
        during.value("powershare_delivered_energy_watt_hours_total")


def test_dropped_frames_by_reason_and_modbus_errors_by_cause(tmp_path):
    async def main() -> Scrape:
        async with serving(tmp_path) as (rig, server):
            rig.node_bus.send(can.Message(arbitration_id=0x292, data=b"\x01\x02", is_extended_id=False))
            await rig.run(0.2)
            await rig.server.stop()  # the inverter goes away
            await rig.run(1.5)
            return await scrape(server)

    s = bounded(main())
    assert s.value("powershare_can_frames_dropped_total", reason="wrong_length") == 1
    assert s.value("powershare_link_up", link="inverter") == 0
    errors = {c.value: s.value("powershare_modbus_errors_total", cause=c.value) for c in ModbusErrorCause}
    assert errors["disconnected"] + errors["connect"] + errors["timeout"] >= 1, errors
    assert errors["exception"] == errors["bad_reply"] == 0


def test_a_taken_port_is_input_error_and_check_config_checks_the_address(tmp_path, capsys):
    async def main() -> None:
        async with serving(tmp_path) as (rig, server):
            other = MetricsServer(replace(rig.config, metrics=replace(rig.config.metrics,
                                                                      listen=f"127.0.0.1:{server.port}")), rig.gateway)
            with pytest.raises(InputError, match=r"metrics.listen: cannot listen on 127.0.0.1:\d+: "):
                await other.start()

    bounded(main())
    for listen, message in (("nowhere", "metrics.listen: expected HOST:PORT"),
                            ("metrics.local:9108", "metrics.listen: 'metrics.local' is not an IP address")):
        path = tmp_path / "gw.toml"
        path.write_text(f'[metrics]\nenabled = true\nlisten = "{listen}"\n')
        assert cli.main(["check-config", str(path)]) == 2
        assert message in capsys.readouterr().err
