"""MQTT under a gateway that runs in real time (issue 15, item 5): slow tier.

1. The service `run` starts (real clocks, the CAN intake thread, the command writer)
   with `[mqtt]` on, serving an event; the broker is stalled (SIGSTOP: it takes the
   TCP connection and answers nothing, the worst a broker can do), a BMS fault frame
   arrives meanwhile and must reach the inverter as 0 W as always; then the broker is
   killed and started again on the same port (its retained messages gone), and the
   gateway reconnects and republishes availability, discovery and state by itself.
2. `powershare-gw run` as a process on the hardware-like bench with MQTT and metrics:
   the metrics endpoint answers in Prometheus text, and SIGKILL of the gateway makes
   the broker publish its will: `offline`, retained.

Every wait is for an event (a message on the broker, a Modbus write, READY on
$NOTIFY_SOCKET) within a bound; nothing here sleeps for a fixed time.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
from broker import Mosquitto, Seen, Watcher, bounded, free_port, running_broker
from firmware_py.sim.inverter import InverterModel, SimInverterServer
from prometheus_client.parser import text_string_to_metric_families
from test_bench_processes import Bench, bench  # noqa: F401 - the bench fixture, shared
from test_service import LivePack, Watch, evening_dispatch_accepted, gateway_config

from firmware_py.assembly import assemble
from firmware_py.core import Mode, StepResult
from firmware_py.journal import Journal
from firmware_py.mqtt.bridge import MqttBridge
from firmware_py.service import RunOptions, Service

pytestmark = pytest.mark.slow

PREFIX = "powershare-gw/truck-1"
_channels = itertools.count()


def is_state(message: Seen) -> bool:
    return message.topic == f"{PREFIX}/state"


def is_online(message: Seen) -> bool:
    return message.topic == f"{PREFIX}/availability" and message.payload == b"online"


def test_a_stalled_then_restarted_broker_costs_nothing_but_a_reconnect(tmp_path: Path):
    async def main() -> None:
        model = InverterModel(now=time.time())
        discharging, stopped = Watch(lambda w: w > 0), Watch(lambda w: w == 0)

        def noting(watts: float) -> None:
            discharging.see(watts)
            if discharging.event.is_set():
                stopped.see(watts)

        model.on_wset = noting
        broker = Mosquitto(tmp_path)
        broker.start()
        async with SimInverterServer(model) as server:
            channel = f"mqtt-service-{next(_channels)}"
            config = gateway_config(tmp_path, channel, port=server.port, poll_interval_s=0.2)
            config = replace(config, mqtt=replace(config.mqtt, enabled=True, broker=broker.address, keepalive_s=5))
            service = Service(assemble(config, time.time), RunOptions())
            bridge = service.assembly.integrations["mqtt"]
            assert isinstance(bridge, MqttBridge)
            bridge.backoff_max_s = 1.0  # the test's patience, not the gateway's behaviour
            ready = Watch(lambda r: r.controller.mode is Mode.STANDBY)

            def observe(result: StepResult) -> None:
                ready.see(result)

            service.gateway.observers.append(observe)
            async with LivePack(channel, model) as node:
                try:
                    await service.start()
                    await ready.wait("fresh BMS and inverter data")
                    async with Watcher(broker) as watcher:
                        await watcher.wait_for("online", is_online)
                        await evening_dispatch_accepted(service.gateway)
                        await discharging.wait("a discharge setpoint at the inverter")
                        await watcher.wait_for("the event on P/state", lambda m: m.topic.endswith("/state")
                                               and m.json()["event"] is not None)
                    broker.pause()  # stalled: the connection stays, nothing is answered
                    node.inject("bms_fault", until=time.time() + 3_600)
                    await stopped.wait("WSet = 0 at the inverter while the broker is stalled")
                    assert service.gateway.controller.mode is Mode.FAULT
                    broker.stop(signal.SIGKILL)
                    broker.start()  # the same port, nothing retained any more
                    async with Watcher(broker) as watcher:
                        # States queued while the broker was away come first, then the one of now.
                        state = await watcher.wait_for("the state of now", lambda m: is_state(m) and
                                                       m.json()["mode"] == "FAULT", timeout=20)
                        assert "bms_fault" in state.json()["faults"]
                        async with Watcher(broker) as late:  # what the restarted broker now keeps for newcomers
                            for what, test in (("state", is_state), ("availability", is_online),
                                               ("discovery", lambda m: m.topic.startswith("homeassistant/"))):
                                assert (await late.wait_for(f"retained {what}", test)).retain
                        index = len(watcher.seen)
                        await watcher.publish(f"{PREFIX}/set/reserve", "50")
                        result = await watcher.wait_for("a result", lambda m: m.topic.endswith("/result"), after=index)
                        assert result.json()["ok"] is True
                finally:
                    await service.stop()
                    broker.stop(signal.SIGKILL)
        with Journal.open(tmp_path / "journal.sqlite", readonly=True) as journal:
            records = list(journal.records())
        kinds = [str(r.kind) for r in records]
        assert "Stall" not in kinds  # the gateway never paused for the broker
        links = [(str(r.kind), r.payload.get("link")) for r in records if str(r.kind) in ("LinkLost", "LinkRecovered")]
        assert ("LinkLost", "mqtt") in links and ("LinkRecovered", "mqtt") in links
        assert service.gateway.owner_settings().reserve_pct == 50

    bounded(main())


def test_a_killed_gateway_is_marked_offline_by_its_will_and_serves_metrics(bench: Bench, tmp_path: Path):  # noqa: F811
    metrics_port = free_port()

    async def main() -> None:
        with running_broker(tmp_path) as broker:
            with bench.config.open("a") as config:
                config.write(f'\n[mqtt]\nenabled = true\nbroker = "{broker.address}"\nkeepalive_s = 5\n'
                             f'\n[metrics]\nenabled = true\nlisten = "127.0.0.1:{metrics_port}"\n')
            async with Watcher(broker) as watcher:
                await asyncio.to_thread(bench.start_gateway)
                await watcher.wait_for("online", is_online, timeout=20)
                # the state this test relies on, not merely the first (the gateway's start may still be under way)
                await watcher.wait_for("a state with the MQTT link up",
                                       lambda m: is_state(m) and m.json()["links"]["mqtt"]["ok"] is True, timeout=20)
                text = await asyncio.to_thread(read_metrics, metrics_port)
                names = {f.name for f in text_string_to_metric_families(text)}
                assert {"powershare_reaction_seconds", "powershare_mode", "powershare_link_up",
                        "powershare_can_frames_accepted", "powershare_modbus_errors"} <= names
                index = len(watcher.seen)
                bench.stop("gateway", signal.SIGKILL)
                will = await watcher.wait_for("the will", lambda m: m.topic.endswith("/availability"), after=index)
                assert will.payload == b"offline"
            async with Watcher(broker) as late:  # retained for whoever looks later
                kept = await late.wait_for("the retained availability", lambda m: m.topic.endswith("/availability"))
                assert kept.payload == b"offline" and kept.retain

    bounded(main())


def read_metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        return response.read().decode()
