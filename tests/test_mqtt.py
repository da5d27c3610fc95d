"""MQTT (issue 15): state out, commands in, Home Assistant discovery, against Debian's mosquitto.

The gateway runs in lock-step (`lockstep.Rig`: simulated pack and BMS on a virtual
bus, the simulated inverter over Modbus TCP, the journal in SQLite), assembled with
`[mqtt] enabled` so the bridge is the integration `run` starts. The broker is the real
mosquitto on a free loopback port (`broker.Mosquitto`); a second, independent client
(`broker.Watcher`) publishes what an automation or a Home Assistant entity would and
waits, bounded, for what the gateway answers. Time is the rig's: the state is paced
on it, so a test advances the rig to let a publication come due.

The broker restarting under a gateway that runs in real time, and the will of a
killed gateway process, are in `test_mqtt_process.py` (slow tier).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import re
import shutil
import ssl
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiomqtt
import jinja2
import pytest
from broker import AcksHeldProxy, Mosquitto, Seen, Tls, Watcher, bounded, running_broker
from hypothesis import assume, given
from hypothesis import strategies as st
from lockstep import Rig
from openadr_vtn import TlsMaterial, make_tls_material

from firmware_py import cli, narration
from firmware_py.assembly import notes
from firmware_py.config import Config, MqttConfig
from firmware_py.core.types import DispatchKind, DispatchRequest, Mode, OwnerSettings
from firmware_py.journal import Journal
from firmware_py.mqtt import bridge as bridge_module
from firmware_py.mqtt import commands
from firmware_py.mqtt.bridge import Kind, MqttBridge, Outbox, Outgoing, _first_failure
from firmware_py.mqtt.commands import CommandGate
from firmware_py.mqtt.discovery import configurations
from firmware_py.mqtt.state import Pacer, changed
from firmware_py.mqtt.topics import NODE_ID_CHARS, Command, Topics, node_id, prefix_problem
from firmware_py.owner.changes import BadRequest
from firmware_py.tasks import cancel_all

PREFIX = "powershare-gw/truck-1"
TOPICS = Topics(PREFIX)


def mqtt_enabled(broker: Mosquitto, program: dict[str, Any] | None = None, **mqtt: Any):
    def configure(config: Config) -> Config:
        return replace(config, mqtt=replace(config.mqtt, enabled=True, broker=broker.address, **mqtt),
                       program=replace(config.program, **(program or {})))
    return configure


def is_state(message: Seen) -> bool:
    return message.topic == TOPICS.state


def result_after(watcher: Watcher, index: int):
    return watcher.wait_for("on P/result", lambda m: m.topic == TOPICS.result, after=index)


@asynccontextmanager
async def gateway_on(tmp: Path, broker: Mosquitto, watcher: dict[str, Any] | None = None,
                     program: dict[str, Any] | None = None, **mqtt: Any) -> AsyncIterator[tuple[Rig, MqttBridge, Watcher]]:
    """A rig with fresh data (STANDBY), its MQTT bridge running, and a watcher subscribed to everything
    (`watcher`: its client's options, for a broker with TLS or passwords; `program`: its `[program]` terms)."""
    async with Rig(tmp, configure=mqtt_enabled(broker, program, **mqtt)) as rig, \
            Watcher(broker, **(watcher or {})) as watcher:
        bridge = rig.assembly.integrations["mqtt"]
        assert isinstance(bridge, MqttBridge)
        await rig.run(2.0)
        task = asyncio.create_task(bridge.run())
        try:
            await watcher.wait_for("online", lambda m: m.topic == TOPICS.availability and m.payload == b"online")
            await watcher.wait_for("a STANDBY state", lambda m: is_state(m) and m.json()["mode"] == "STANDBY")
            yield rig, bridge, watcher
        finally:
            await cancel_all([task])


async def advance(rig: Rig, bridge: MqttBridge, seconds: float) -> int:
    """Run the rig `seconds` on, the bridge looking at the gateway every half second of it (as `run`
    paces, on the gateway's clock); how many states it queued."""
    queued = 0
    for _ in range(round(seconds / 0.5)):
        await rig.run(0.5)
        queued += bridge.pace_once()
    return queued


async def command(rig: Rig, watcher: Watcher, name: str, payload: bytes | str, *,
                  settle_s: float = 0.2) -> dict[str, Any]:
    """Publish a command as an automation would; its result (and the rig `settle_s` on, so state comes due)."""
    index = len(watcher.seen)
    await watcher.publish(TOPICS.command(Command(name)) if name in set(Command) else f"{PREFIX}/set/{name}",
                          payload)
    answer = (await result_after(watcher, index)).json()
    await rig.run(settle_s)
    return answer


# ------------------------------------------------------------------ Home Assistant discovery

COMMON_FIELDS = {"name", "unique_id", "state_topic", "availability_topic", "payload_available",
                 "payload_not_available", "availability", "availability_mode", "device", "origin", "value_template", "icon", "json_attributes_topic",
                 "json_attributes_template", "entity_category", "enabled_by_default", "qos", "object_id"}
"""Options every MQTT entity platform documents (Home Assistant's MQTT sensor, binary sensor, number
and switch pages), of those this gateway could use."""
COMPONENT_FIELDS = {
    "sensor": {"device_class", "state_class", "unit_of_measurement", "options", "expire_after", "force_update",
               "suggested_display_precision", "last_reset_value_template"},
    "binary_sensor": {"device_class", "payload_on", "payload_off", "expire_after", "force_update", "off_delay"},
    "number": {"command_topic", "command_template", "min", "max", "step", "mode", "unit_of_measurement",
               "device_class", "optimistic", "retain"},
    "switch": {"command_topic", "payload_on", "payload_off", "state_on", "state_off", "optimistic", "retain",
               "device_class"},
}
REQUIRED = {"sensor": {"state_topic"}, "binary_sensor": {"state_topic"}, "number": {"command_topic"},
            "switch": {"command_topic"}}
DEVICE_FIELDS = {"identifiers", "connections", "name", "manufacturer", "model", "model_id", "sw_version",
                 "hw_version", "serial_number", "configuration_url", "suggested_area", "via_device"}
SENSOR_CLASSES = {  # device class: (units allowed, state classes allowed), as Home Assistant's sensor docs
    "battery": ({"%"}, {"measurement"}),
    "power": ({"W", "kW"}, {"measurement"}),
    "energy": ({"Wh", "kWh", "MWh"}, {"total", "total_increasing"}),
    "energy_storage": ({"Wh", "kWh", "MWh"}, {"measurement"}),
    "enum": ({None}, {None}),
    "monetary": ({"USD"}, {"total"}),  # any ISO 4217 code (the tests' [program] is in USD)
}
BINARY_SENSOR_CLASSES = {"connectivity", "problem"}
DISCOVERY_TOPIC = re.compile(r"homeassistant/(sensor|binary_sensor|number|switch)/([a-zA-Z0-9_-]+)/"
                             r"([a-zA-Z0-9_-]+)/config")


def check_entity(component: str, config: dict[str, Any]) -> None:
    unknown = set(config) - COMMON_FIELDS - COMPONENT_FIELDS[component]
    assert not unknown, f"{component} {config['unique_id']}: fields Home Assistant does not document: {unknown}"
    assert REQUIRED[component] <= set(config)
    assert set(config["device"]) <= DEVICE_FIELDS and config["device"]["identifiers"]
    assert config["origin"]["name"] == "powershare-gw"
    device_class = config.get("device_class")
    if component == "sensor" and device_class is not None:
        units, state_classes = SENSOR_CLASSES[device_class]
        assert config.get("unit_of_measurement") in units
        assert config.get("state_class") in state_classes | {None}  # none: shown, but kept out of statistics
        if device_class == "enum":
            assert config["options"] and all(isinstance(o, str) for o in config["options"])
    if component == "binary_sensor":
        assert device_class in BINARY_SENSOR_CLASSES
    if component == "number":
        assert config["min"] < config["max"] and config["step"] >= 0.001 and config["mode"] in ("box", "slider")


def availability(config: dict[str, Any]) -> list[dict[str, Any]]:
    """Where Home Assistant reads whether the entity is available: one topic, or a list (then all must say
    `online`: `availability_mode: all`); never both, which Home Assistant refuses."""
    if "availability" not in config:
        return [{"topic": config["availability_topic"]}]
    assert "availability_topic" not in config and config["availability_mode"] == "all"
    return config["availability"]


def available(config: dict[str, Any], state: dict[str, Any]) -> bool:
    """Whether Home Assistant shows the entity available, the gateway being online, given this state."""
    return all(render(e["value_template"], state) == "online" for e in availability(config) if "value_template" in e)


def render(template: str, state: dict[str, Any]) -> str:
    """A value template rendered the way Home Assistant does: Jinja, the payload as `value_json`."""
    return jinja2.Environment(undefined=jinja2.StrictUndefined).from_string(template).render(value_json=state)


def test_discovery_configs_appear_as_home_assistant_documents_them_and_render_the_state(tmp_path):
    async def main() -> None:
        with running_broker(tmp_path) as broker:
            async with gateway_on(tmp_path, broker) as (rig, bridge, watcher):
                state = (await watcher.wait_for("a state", is_state)).json()
                await watcher.wait_for("the last config", lambda m: m.topic.endswith("/link_inverter/config"))
                configs = {m.topic: m.json() for m in watcher.seen if m.topic.startswith("homeassistant/") and m.payload}
                async with Watcher(broker) as late:  # what Home Assistant gets when it subscribes later
                    for topic in configs:  # the broker hands retained messages over in an order of its own
                        await late.wait_for(topic, lambda m, topic=topic: m.topic == topic)
                    await late.wait_for("the state", is_state)
                    retained = {m.topic for m in late.seen if m.retain}
        assert len(configs) == 16
        devices, unique_ids = set(), set()
        for topic, config in configs.items():
            match = DISCOVERY_TOPIC.fullmatch(topic)
            assert match, topic
            component, node, object_id = match.groups()
            assert node == "powershare-gw_truck-1" and config["unique_id"] == f"{node}_{object_id}"
            check_entity(component, config)
            devices.add(json.dumps(config["device"], sort_keys=True))
            unique_ids.add(config["unique_id"])
            assert config["state_topic"] == TOPICS.state
            assert [entry["topic"] for entry in availability(config)][:1] == [TOPICS.availability]
            assert all(render(e["value_template"], state) == "online" for e in availability(config)[1:])
            value = render(config["value_template"], state)
            if component in ("switch", "binary_sensor"):
                assert value in ("ON", "OFF"), (topic, value)
            if "json_attributes_template" in config:
                assert isinstance(json.loads(render(config["json_attributes_template"], state)), dict)
        assert len(devices) == 1 and len(unique_ids) == len(configs)  # one device; every entity its own id
        device = json.loads(devices.pop())
        assert device["sw_version"] and device["name"] == "Powershare truck-1"
        by_id = {topic.split("/")[3]: config for topic, config in configs.items()}
        assert by_id["delivered_energy"]["state_class"] == "total_increasing"  # the energy dashboard's sensor
        assert by_id["delivered_energy"]["device_class"] == "energy"
        assert by_id["credit_month"]["device_class"] == "monetary" and by_id["credit_month"]["unit_of_measurement"] == "USD"
        assert render(by_id["credit_month"]["value_template"], state) == "None"  # unknown until computed
        assert by_id["reserve"]["command_topic"] == TOPICS.command(Command.RESERVE)
        assert by_id["storm_watch"]["command_topic"] == TOPICS.command(Command.STORM_WATCH)
        assert by_id["opt_out"]["command_topic"] == TOPICS.command(Command.OPT_OUT)
        assert render(by_id["soc"]["value_template"], state) == str(state["soc_pct"])
        assert render(by_id["mode"]["value_template"], state) == "STANDBY"
        # Home Assistant refuses a sensor state over 255 characters; an OpenADR 2.0b event id has no bound.
        assert render(by_id["event"]["value_template"], {**state, "event": {"id": "x" * 4_000}}) == "x" * 255
        assert render(by_id["link_bms"]["value_template"], state) == "ON"
        assert set(configs) <= retained and TOPICS.state in retained and TOPICS.availability in retained
        for field in ("mode", "reason", "soc_pct", "floor_pct", "reserve_pct", "setpoint_w", "power_w", "event",
                      "faults", "links", "storm_watch"):  # the status document's fields
            assert field in state

    bounded(main())


def test_a_silent_bms_makes_the_soc_unavailable_in_home_assistant_not_its_last_reading_live(tmp_path):
    """With the BMS silent, Home Assistant showed the last SoC as the live one (availability followed only
    the broker connection): an automation acted on a figure minutes old."""
    async def main() -> tuple[dict[str, Any], dict[str, Any], Config]:
        with running_broker(tmp_path) as broker:
            async with gateway_on(tmp_path, broker) as (rig, bridge, watcher):
                rig.bms_on = False
                await advance(rig, bridge, 2.0)
                silent = await watcher.wait_for("the BMS stale", lambda m: is_state(m) and not m.json()["fresh"]["bms"])
                index = len(watcher.seen)
                rig.bms_on = True
                await advance(rig, bridge, 2.0)
                heard = await watcher.wait_for("the BMS heard again", lambda m: is_state(m) and m.json()["fresh"]["bms"],
                                               after=index)
                return silent.json(), heard.json(), rig.config

    silent, heard, config = bounded(main())
    entities = {topic.split("/")[3]: entity for topic, entity in configurations(config, "test")}
    assert silent["soc_pct"] is not None  # the last reading is still in the state: the reader must not show it live
    assert not available(entities["soc"], silent) and not available(entities["available_energy"], silent)
    assert available(entities["power"], silent) and available(entities["mode"], silent)
    assert available(entities["soc"], heard) and heard["fresh"] == {"bms": True, "inverter": True}


def test_an_entity_announced_before_and_gone_now_is_removed_from_home_assistant(tmp_path):
    """A run with the DER server left its link's retained config; HA showed it "Disconnected" for ever."""
    node = "powershare-gw_truck-1"
    stale = f"homeassistant/binary_sensor/{node}/link_sunspec_server/config"

    async def main() -> None:
        with running_broker(tmp_path) as broker:
            async with Watcher(broker) as earlier:
                await earlier.publish(stale, json.dumps({"name": "SunSpec server"}), retain=True)
            async with gateway_on(tmp_path, broker) as (rig, bridge, watcher):
                await watcher.wait_for("the stale config cleared", lambda m: m.topic == stale and not m.payload)
                async with Watcher(broker) as late:  # what Home Assistant gets when it subscribes later
                    await late.wait_for("the last config", lambda m: m.topic.endswith("/link_inverter/config"))
                    assert not [m for m in late.seen if m.topic == stale]

    bounded(main())


def test_a_custom_discovery_prefix_still_hears_home_assistant_come_online_on_its_birth_topic(tmp_path):
    """Home Assistant says `online` on homeassistant/status whatever its discovery prefix."""
    async def main() -> None:
        with running_broker(tmp_path) as broker:
            async with gateway_on(tmp_path, broker, discovery_prefix="ha") as (rig, bridge, watcher):
                await watcher.wait_for("the configs", lambda m: m.topic.startswith("ha/") and m.topic.endswith(
                    "/soc/config"))
                index = len(watcher.seen)
                await watcher.publish("homeassistant/status", "online")
                await watcher.wait_for("configs again", lambda m: m.topic.endswith("/soc/config"), after=index)

    bounded(main())


def test_home_assistant_coming_online_gets_the_configs_and_the_state_again(tmp_path):
    async def main() -> None:
        with running_broker(tmp_path) as broker:
            async with gateway_on(tmp_path, broker) as (rig, bridge, watcher):
                index = len(watcher.seen)
                await watcher.publish("homeassistant/status", "online")
                await watcher.wait_for("configs again", lambda m: m.topic.endswith("/soc/config"), after=index)
                await watcher.wait_for("the state again", is_state, after=index)

    bounded(main())


def test_home_assistant_online_sent_again_and_again_is_answered_twice_then_once_in_30_s(tmp_path):
    """Anyone on the broker may publish Home Assistant's "online": each answer is every discovery config and
    the state, so the answers are rationed (the configs are retained for whoever subscribes meanwhile)."""
    async def main() -> None:
        with running_broker(tmp_path) as broker:
            async with gateway_on(tmp_path, broker) as (rig, bridge, watcher):
                index = len(watcher.seen)
                for _ in range(5):
                    await watcher.publish("homeassistant/status", "online")
                await watcher.publish(f"{TOPICS.prefix}/set/nothing", "1")  # its result follows all five
                await watcher.wait_for("the marker's result", lambda m: m.topic == TOPICS.result, after=index)
                configs = [m for m in watcher.seen[index:] if m.topic.endswith("/soc/config")]
                assert len(configs) == 2

    bounded(main())


# ------------------------------------------------------------------ commands


def test_an_automation_sets_the_reserve_and_switches_turn_storm_watch_and_opt_out_on(tmp_path):
    async def main() -> None:
        with running_broker(tmp_path) as broker:
            async with gateway_on(tmp_path, broker) as (rig, bridge, watcher):
                answer = await command(rig, watcher, "reserve", "55")
                assert answer == {"command": "reserve", "ok": True, "reason": "reserve 55 %", "at": answer["at"]}
                assert rig.gateway.owner_settings().reserve_pct == 55
                state = await watcher.wait_for("reserve 55", lambda m: is_state(m) and m.json()["reserve_pct"] == 55)
                assert state.retain is False  # a live publication (retained for those who subscribe later)

                answer = await command(rig, watcher, "storm_watch", "ON")  # what the Home Assistant switch sends
                assert answer["ok"] and answer["reason"].startswith("storm watch: keeping 80 % until ")
                storm = await watcher.wait_for("storm watch on", lambda m: is_state(m) and m.json()["storm_watch"])
                assert storm.json()["storm_watch"]["floor_pct"] == 80
                answer = await command(rig, watcher, "storm_watch", json.dumps(
                    {"floor_pct": 70, "until": "2025-06-02T06:00:00Z"}))
                assert answer["reason"] == "storm watch: keeping 70 % until 2025-06-02T06:00:00Z"

                assert (await command(rig, watcher, "opt_out", "ON"))["reason"] == "opted out until revoked"
                await watcher.wait_for("opted out", lambda m: is_state(m) and m.json()["opt_out"]["active"])
                assert (await command(rig, watcher, "opt_out", "OFF"))["reason"] == "opted back in"
                answer = await command(rig, watcher, "departure", '{"time": "07:30", "soc_pct": 90}')
                assert answer["ok"] and "at 90 %" in answer["reason"]
                await watcher.wait_for("departure", lambda m: is_state(m) and m.json()["departure"])
                assert (await command(rig, watcher, "storm_watch", "OFF"))["reason"] == "storm watch off"
                await watcher.wait_for("storm watch off", lambda m: is_state(m) and m.json()["storm_watch"] is None)

        saved = json.loads((tmp_path / "owner.json").read_text())  # the same settings file as the owner API's
        assert saved["reserve_pct"] == 55 and saved["departure_soc_pct"] == 90
        assert saved["storm_watch_until"] is None and saved["opt_out_until"] is None
        with Journal.open(tmp_path / "journal.sqlite", readonly=True) as journal:  # journaled like every change
            assert [str(r.kind) for r in journal.records()].count("OwnerSettings") == 7

    bounded(main())


def test_an_automation_turns_price_mode_on_and_off(tmp_path):
    async def main() -> None:
        with running_broker(tmp_path) as broker:
            async with gateway_on(tmp_path, broker) as (rig, bridge, watcher):
                answer = await command(rig, watcher, "price", json.dumps(
                    {"threshold_per_kwh": 0.3, "max_wh_per_day": 8000, "kind": "PRICE"}))
                assert answer["ok"] and answer["reason"] == (
                    "price mode: discharging while PRICE >= 0.3 per kWh, up to 8,000 Wh a day"), answer
                settings = rig.gateway.owner_settings()
                assert settings.price_mode and settings.price_max_wh_per_day == 8000
                state = await watcher.wait_for("price mode", lambda m: is_state(m) and m.json()["price_mode"])
                assert state.json()["price_mode"] == {"threshold_per_kwh": 0.3, "kind": "PRICE",
                                                      "max_wh_per_day": 8000, "today_wh": 0.0}
                # A power limit, then a change that leaves it out: kept (the same rule as the web app's).
                for body in ({"threshold_per_kwh": 0.3, "max_wh_per_day": 8000, "power_w": 2500},
                             {"threshold_per_kwh": 0.4, "max_wh_per_day": 8000}):
                    assert (await command(rig, watcher, "price", json.dumps(body)))["ok"]
                assert rig.gateway.owner_settings().price_power_w == 2500
                assert (await command(rig, watcher, "price", "OFF"))["reason"] == "price mode off"
                await watcher.wait_for("price mode off", lambda m: is_state(m) and m.json()["price_mode"] is None)
                assert not rig.gateway.owner_settings().price_mode

    bounded(main())


BAD_PAYLOADS = [
    ("reserve", b"abc", 'reserve: expected a number 0 to 100 (or {"pct": N}), got \'abc\''),
    ("reserve", b"140", "pct: 140 is out of range (0 to 100)"),
    ("reserve", b"ON", "reserve: expected a number 0 to 100"),
    ("reserve", b"NaN", "reserve: expected a number 0 to 100 (or {\"pct\": N}), got NaN"),
    ("storm_watch", b'{"floor_pct": 80', "storm_watch: expected ON, OFF or"),
    ("storm_watch", b'{"floor_pct": 80, "until": "2020-01-01T00:00Z"}', "is not in the future"),
    ("departure", b'{"time": "25:00", "soc_pct": 90}', "time: expected HH:MM"),
    ("departure", b"ON", "departure: expected OFF or"),
    ("opt_out", b"[1, 2]", "opt_out: expected ON, OFF"),
    ("opt_out", b"\xff\xfe", "payload is not UTF-8 text"),
    ("reserve", b"9" * 5000, "payload of 5,000 bytes; at most 4,096 are read"),
    ("reserve", b"[" * 3000 + b"]" * 3000, "payload of 6,000 bytes"),
    ("brightness", b"50", "unknown command 'brightness'"),
    ("price", b"ON", "price: expected OFF or"),
    ("price", b'{"threshold_per_kwh": 0.3}', "max_wh_per_day: missing"),
    ("price", b'{"threshold_per_kwh": -1, "max_wh_per_day": 100}', "threshold_per_kwh: -1 is out of range"),
]


def test_a_bad_payload_gets_a_clear_result_and_changes_nothing(tmp_path, caplog):
    async def main() -> None:
        with running_broker(tmp_path) as broker:
            async with gateway_on(tmp_path, broker) as (rig, bridge, watcher):
                before = rig.gateway.owner_settings()
                bridge.gate = CommandGate(rig.gateway.clock, burst=len(BAD_PAYLOADS))  # all in one burst
                for name, payload, reason in BAD_PAYLOADS:
                    answer = await command(rig, watcher, name, payload, settle_s=0)
                    assert answer["ok"] is False and answer["command"] == name, answer
                    assert reason in answer["reason"], (reason, answer["reason"])
                after = rig.gateway.owner_settings()
                assert (after.reserve_pct, after.storm_watch_until, after.departure_at, after.opt_out_until) == \
                    (before.reserve_pct, before.storm_watch_until, before.departure_at, before.opt_out_until)
                assert bridge.connected.is_set()  # nothing a payload says ends the session

    with caplog.at_level(logging.DEBUG):
        bounded(main())
    assert "Traceback" not in caplog.text and not any(r.exc_info for r in caplog.records)
    assert not (tmp_path / "owner.json").exists()  # nothing was saved


def test_a_retained_command_is_not_applied_at_every_reconnect(tmp_path):
    async def main() -> None:
        with running_broker(tmp_path) as broker:
            async with Watcher(broker) as publisher:  # left behind on the broker before the gateway connects
                await publisher.publish(TOPICS.command(Command.RESERVE), "70", retain=True)
            async with gateway_on(tmp_path, broker) as (rig, bridge, watcher):
                answer = (await watcher.wait_for("a result", lambda m: m.topic == TOPICS.result)).json()
                assert answer["ok"] is False and "retained command is not applied" in answer["reason"]
                assert rig.gateway.owner_settings().reserve_pct == 40

    bounded(main())


def test_an_empty_command_is_answered_refused_like_any_bad_command(tmp_path):
    """An empty message on a command topic used to go unanswered (only the gateway's own clears are no
    command): it is refused "empty payload", through the same rate limit as any other command."""
    async def main() -> None:
        with running_broker(tmp_path) as broker:
            async with gateway_on(tmp_path, broker) as (rig, bridge, watcher):
                for name in ("reserve", "departure"):
                    answer = await command(rig, watcher, name, b"")
                    assert answer == {**answer, "command": name, "ok": False, "reason": "empty payload"}, answer
                answer = await command(rig, watcher, "reserve", "55")  # the next command is answered as ever
                assert answer["ok"] is True and rig.gateway.owner_settings().reserve_pct == 55
                bridge.gate = CommandGate(rig.gateway.clock, burst=0)  # the rate gate counts an empty one too
                answer = await command(rig, watcher, "reserve", b"")
                assert answer["ok"] is False and answer["reason"] == bridge.gate.refusal(), answer

    bounded(main())


async def take_over_the_session(broker: Mosquitto, bridge: MqttBridge, watcher: Watcher) -> None:
    """A network blip: another client takes the gateway's client id for a moment, the broker drops the
    gateway, and it connects again (back at `online`)."""
    index = len(watcher.seen)
    async with aiomqtt.Client("127.0.0.1", broker.port, identifier=bridge.client_id):
        pass
    await watcher.wait_for("online again", lambda m: m.topic == TOPICS.availability and m.payload == b"online",
                           after=index)


async def retained_on(broker: Mosquitto, topic: str) -> list[Seen]:
    """What a fresh subscriber gets retained on `topic`: it subscribes to `topic`, then to the retained
    availability, whose arrival means the broker has handed over whatever `topic` held."""
    async with Watcher(broker, (topic, TOPICS.availability)) as fresh:
        await fresh.wait_for("the availability", lambda m: m.topic == TOPICS.availability)
        return [m for m in fresh.on(topic) if m.retain]


def test_a_retained_command_is_applied_live_then_refused_and_cleared_once_when_replayed(tmp_path):
    """MQTT 3.1.1 forwards a retained command to a connected gateway without the retain flag: it was
    applied, stayed on the broker, and was refused at every later reconnect, a result the owner had not
    asked for. The replay is refused once and cleared; an empty payload arriving back is no command."""
    async def main() -> None:
        reserve = TOPICS.command(Command.RESERVE)
        with running_broker(tmp_path) as broker:
            async with gateway_on(tmp_path, broker) as (rig, bridge, watcher):
                index = len(watcher.seen)
                await watcher.publish(reserve, "63", retain=True)
                assert (await result_after(watcher, index)).json()["ok"] is True
                assert rig.gateway.owner_settings().reserve_pct == 63

                index = len(watcher.seen)
                await take_over_the_session(broker, bridge, watcher)
                answer = (await result_after(watcher, index)).json()
                assert answer["ok"] is False and "retained command is not applied" in answer["reason"], answer
                await watcher.wait_for("the clearing", lambda m: m.topic == reserve and m.payload == b"", after=index)
                assert await retained_on(broker, reserve) == []
                assert "cleared" in answer["reason"]

                index = len(watcher.seen)  # the clear's echo came back before this: the broker keeps the order
                await watcher.publish(reserve, b"")  # an empty command of someone else's is answered, the echo not
                answer = (await result_after(watcher, index)).json()
                assert (answer["ok"], answer["reason"]) == (False, "empty payload"), answer

                index = len(watcher.seen)
                await take_over_the_session(broker, bridge, watcher)
                await watcher.publish(reserve, "50")  # the replay, had there been one, is answered before it
                answer = (await result_after(watcher, index)).json()
                assert (answer["ok"], answer["reason"]) == (True, "reserve 50 %"), answer
                refusals = [m.json()["reason"] for m in watcher.on(TOPICS.result) if not m.json()["ok"]]
                assert len(refusals) == 2 and refusals[1] == "empty payload", refusals  # none for the echo
                assert bridge.published[Kind.CLEARED] == 1 and not +bridge._clears

    bounded(main())


FLOODER = """
import sys, paho.mqtt.client as mqtt
port, topic, count = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="flooder")
client.connect("127.0.0.1", port)
client.loop_start()
for _ in range(count):
    client.publish(topic, b"offline", qos=0)
client.publish(topic, b"offline", qos=1).wait_for_publish(10)  # the broker has them all, in order
client.disconnect()
client.loop_stop()
"""
"""Anyone who may publish on the broker: a plain paho client, another process, as fast as it can."""


class Warnings(logging.Handler):
    """WARNING and above, as they come; `reported` set at the line that counts a flood's discards."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []
        self.overflowed = asyncio.Event()  # aiomqtt's first "queue is full"
        self.reported = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        if record.msg == bridge_module.DISCARDED:
            self.overflowed.set()
        if "incoming messages were discarded" in record.getMessage():
            self.reported.set()


@pytest.mark.slow  # 20,000 messages through a real broker: 3-5 s
def test_a_flood_beyond_the_incoming_queue_costs_two_log_lines_not_one_per_message(tmp_path):
    """aiomqtt logged "Message queue is full" for every discarded message (33,000 to 50,000 lines for
    50,000 messages): whoever may publish on the broker set the gateway's log rate. With logging set up
    as `run` does: it held aiomqtt's logger at ERROR, so in service a flood was neither said nor counted."""
    flood = 20_000
    warnings, said = Warnings(), io.StringIO()
    narration.configure_logging(stream=said)

    async def main() -> None:
        with running_broker(tmp_path) as broker:
            async with gateway_on(tmp_path, broker) as (_, bridge, watcher):
                # The gateway's reader is held (in Home Assistant's announcement) until the queue has
                # overflowed: whether a flood outpaces a free reader depends on the machine's load.
                held, release = asyncio.Event(), asyncio.Event()
                announce = bridge._announce

                async def held_announce(client: aiomqtt.Client) -> None:
                    held.set()
                    await release.wait()
                    await announce(client)
                bridge._announce = held_announce  # type: ignore[method-assign]

                await watcher.publish(bridge_module.HA_BIRTH_TOPIC, b"online")
                await asyncio.wait_for(held.wait(), 10)
                flooder = await asyncio.create_subprocess_exec(
                    sys.executable, "-c", FLOODER, str(broker.port), bridge_module.HA_BIRTH_TOPIC, str(flood))
                assert await asyncio.wait_for(flooder.wait(), 30) == 0
                await asyncio.wait_for(warnings.overflowed.wait(), 30)
                release.set()
                await asyncio.wait_for(warnings.reported.wait(), 30)
                assert bridge.connected.is_set()

    logging.getLogger().addHandler(warnings)
    try:
        bounded(main())
    finally:
        logging.getLogger().removeHandler(warnings)
    lines = [r.getMessage() for r in warnings.records]
    assert len(lines) <= 2, lines[:5]
    report = next(r for r in warnings.records if "incoming messages were discarded" in r.getMessage())
    assert 0 < report.args[0] <= flood + 1, lines  # type: ignore[index]
    assert said.getvalue().count(bridge_module.DISCARDED) == 1 and report.getMessage() in said.getvalue()


def test_states_queued_before_a_session_are_not_published_after_its_fresh_one(tmp_path):
    """States built while the bridge was still connecting (the link down, older figures) were sent after
    the session's own state, so Home Assistant showed the past until the next change."""
    async def main() -> dict[str, Any]:
        with running_broker(tmp_path) as broker:
            async with Rig(tmp_path, configure=mqtt_enabled(broker)) as rig, Watcher(broker) as watcher:
                bridge = rig.assembly.integrations["mqtt"]
                assert isinstance(bridge, MqttBridge)
                assert await advance(rig, bridge, 2.0)  # queued before any connection
                task = asyncio.create_task(bridge.run())
                try:
                    return (await watcher.wait_for("a state", is_state)).json()
                finally:
                    await cancel_all([task])

    first = bounded(main())
    assert first["links"]["mqtt"]["ok"] is True


@pytest.mark.slow  # three sessions held past STEADY_S
def test_a_broker_lost_after_a_good_session_is_tried_again_at_the_shortest_back_off(tmp_path, monkeypatch):
    """A session only ends by failing, so the back-off never started afresh: each broker restart was
    met later than the one before (0.5, 1, 2, 4, 8 s ... 30 s), however long the sessions between."""
    monkeypatch.setattr(bridge_module, "STEADY_S", 1.0)  # a steady session, shortened: the rig runs it
    async def main() -> list[float]:
        waits = []
        with running_broker(tmp_path) as broker:
            async with gateway_on(tmp_path, broker) as (rig, bridge, watcher):
                for _ in range(3):
                    await rig.run(bridge_module.STEADY_S)  # a session that proved itself (the gateway's clock)
                    broker.stop()
                    await asyncio.wait_for(bridge.unreachable.wait(), 10)
                    waits.append(bridge.retry_in_s)  # the first wait after the loss
                    broker.start()
                    await asyncio.wait_for(bridge.connected.wait(), 20)
        return waits

    assert bounded(main()) == [0.5, 0.5, 0.5]


class Told(logging.Handler):
    """Sets `said` when a record whose message contains `words` is logged: a test waits on it, not on time."""

    def __init__(self, words: str) -> None:
        super().__init__(logging.DEBUG)
        self.words, self.said, self.records = words, asyncio.Event(), []

    def emit(self, record: logging.LogRecord) -> None:
        if self.words in record.getMessage():
            self.records.append(record)
            self.said.set()


@pytest.mark.slow  # a dozen real takeovers at a back-off of up to 0.2 s: 2-4 s
def test_two_gateways_with_one_client_id_back_off_and_warn_once_instead_of_flapping(tmp_path, monkeypatch):
    """Each connection with one client id takes the other's session over: the back-off started afresh after
    any session that had connected, even for milliseconds, so the two knocked each other off twice a second
    for ever (availability flapping, every discovery config re-published, a `link lost` line each time)."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    told = Told("ended within")
    client_ids: list[str] = []
    monkeypatch.setattr(bridge_module, "PUBLISH_TIMEOUT_S", 0.5)  # a publication a takeover left unacknowledged

    async def main() -> None:
        with running_broker(tmp_path) as broker:
            async with Watcher(broker) as watcher, Rig(tmp_path / "a", configure=mqtt_enabled(broker)) as a, \
                    Rig(tmp_path / "b", configure=mqtt_enabled(broker)) as b:
                bridges = [a.assembly.integrations["mqtt"], b.assembly.integrations["mqtt"]]
                assert bridges[0].client_id == bridges[1].client_id
                client_ids.append(bridges[0].client_id)
                for bridge in bridges:
                    bridge.backoff_min_s, bridge.backoff_max_s = 0.05, 0.2
                tasks = [asyncio.create_task(bridge.run()) for bridge in bridges]
                try:
                    await asyncio.wait_for(told.said.wait(), 10)  # sessions of no time on the gateways' clocks
                    onlines = iter(range(1, 7))  # six more takeovers, at the longest back-off now
                    await watcher.wait_for("six more sessions", lambda m: m.topic == TOPICS.availability
                                           and m.payload == b"online" and next(onlines) == 6, after=len(watcher.seen))
                finally:
                    await cancel_all(tasks)
                waits = sorted(bridge.retry_in_s for bridge in bridges)
                assert waits[0] > 0.05 and waits[1] == 0.2, waits  # doubling, not 0.05 after every takeover

    logging.getLogger(bridge_module.__name__).addHandler(told)
    try:
        bounded(main())
    finally:
        logging.getLogger(bridge_module.__name__).removeHandler(told)
    assert len(told.records) <= 2  # one per gateway, not one per takeover
    assert all(r.levelno == logging.WARNING for r in told.records)
    assert f"client id {client_ids[0]!r}" in told.records[0].getMessage()


async def results_until_offline(watcher: Watcher, index: int) -> list[str]:
    """The reasons published on P/result from the watcher's `index`th message on, up to `offline`."""
    offline = await watcher.wait_for("offline", lambda m: m.topic == TOPICS.availability, after=index)
    return [m.json()["reason"] for m in watcher.seen[index:watcher.seen.index(offline)] if m.topic == TOPICS.result]


def test_a_command_in_flight_when_the_gateway_stops_is_answered_before_offline(tmp_path):
    """The stop caught a command in its inverter write: the command was seen through (saved, fed to the core)
    and its result queued after `_send` had been ended, so only `offline` was published, never the result."""
    async def main() -> None:
        with running_broker(tmp_path) as broker:
            async with Rig(tmp_path, configure=mqtt_enabled(broker)) as rig, Watcher(broker) as watcher:
                bridge = rig.assembly.integrations["mqtt"]
                await rig.run(2.0)
                task = asyncio.create_task(bridge.run())
                write_started, release_write, send_ended = asyncio.Event(), asyncio.Event(), asyncio.Event()
                original_write, original_get = rig.gateway.write_command, bridge.outbox.get

                async def held_write() -> None:  # an inverter answering the Modbus write slowly
                    write_started.set()
                    await release_write.wait()
                    await original_write()
                rig.gateway.write_command = held_write

                async def get() -> Outgoing:
                    try:
                        return await original_get()
                    except asyncio.CancelledError:
                        send_ended.set()
                        raise
                bridge.outbox.get = get

                try:
                    await watcher.wait_for("online", lambda m: m.topic == TOPICS.availability and m.payload == b"online")
                    index = len(watcher.seen)
                    await watcher.publish(TOPICS.command(Command.RESERVE), "55")
                    await asyncio.wait_for(write_started.wait(), 10)
                    rig.gateway.begin_stop()  # as `Service.stop`: then its tasks are cancelled
                    task.cancel()
                    await asyncio.wait_for(send_ended.wait(), 10)  # the session's parts are being ended
                    release_write.set()
                    await asyncio.wait_for(cancel_all([task]), 10)
                finally:
                    release_write.set()
                    await cancel_all([task])
                assert await results_until_offline(watcher, index) == ["reserve 55 %"]
                assert rig.gateway.owner_settings().reserve_pct == 55

        assert json.loads((tmp_path / "owner.json").read_text())["reserve_pct"] == 55

    bounded(main())


def test_a_clean_stop_says_offline_though_the_broker_acknowledges_nothing_in_time(tmp_path):
    """A broker some 300 ms away (or slow to acknowledge), two results owed at a stop: the stop published each and
    waited for its PUBACK before handing over `offline`, `STOP_S` ran out first, and the clean DISCONNECT that
    followed dropped the will: P/availability stayed retained `online` while the gateway was stopped."""
    async def main() -> None:
        with running_broker(tmp_path) as broker:
            async with AcksHeldProxy(broker) as proxy, Watcher(broker) as watcher:
                def via_proxy(config: Config) -> Config:
                    return replace(config, mqtt=replace(config.mqtt, enabled=True, broker=proxy.address))

                async with Rig(tmp_path, configure=via_proxy) as rig:
                    bridge = rig.assembly.integrations["mqtt"]
                    await rig.run(2.0)
                    task = asyncio.create_task(bridge.run())
                    try:
                        await watcher.wait_for("the state", is_state)
                        for _ in range(500):  # the announcement acknowledged whole: held, it would end the session
                            if bridge.published[Kind.STATE]:
                                break
                            await asyncio.sleep(0.01)
                        index, proxy.holding = len(watcher.seen), True
                        for pct in ("50", "55"):
                            await watcher.publish(TOPICS.command(Command.RESERVE), pct)
                        # the first result on the broker, its PUBACK held; the second owed behind it
                        await watcher.wait_for("the first result", lambda m: m.topic == TOPICS.result, after=index)
                        for _ in range(500):
                            if rig.gateway.owner_settings().reserve_pct == 55 and len(bridge.outbox):
                                break
                            await asyncio.sleep(0.01)
                        assert rig.gateway.owner_settings().reserve_pct == 55 and len(bridge.outbox)
                        rig.gateway.begin_stop()
                        await asyncio.wait_for(cancel_all([task]), 10)
                    finally:
                        await cancel_all([task])
                assert await results_until_offline(watcher, index) == ["reserve 50 %", "reserve 55 %"]
            async with Watcher(broker, topics=(TOPICS.availability,)) as later:  # Home Assistant subscribing now
                retained = await later.wait_for("retained availability", lambda m: m.retain)
            assert retained.payload == b"offline"

    bounded(main())


def test_at_a_stop_a_result_already_sent_is_not_sent_again_and_commands_not_yet_read_are_refused(tmp_path):
    """A clean stop: the result whose PUBACK the stop cut short was put back and published again (twice on
    P/result), and commands already taken from the broker but not yet read were never answered at all."""
    async def main() -> None:
        with running_broker(tmp_path) as broker:
            async with Rig(tmp_path, configure=mqtt_enabled(broker)) as rig, Watcher(broker) as watcher:
                bridge = rig.assembly.integrations["mqtt"]
                await rig.run(2.0)
                made: list[aiomqtt.Client] = []
                original_client, original_publish = bridge._client, bridge._publish
                bridge._client = lambda: made.append(original_client()) or made[-1]
                acked, write_started, release_write = asyncio.Event(), asyncio.Event(), asyncio.Event()

                async def publish(client: aiomqtt.Client, topic: str, payload: bytes, *, retain: bool,
                                  kind: Kind) -> None:
                    await original_publish(client, topic, payload, retain=retain, kind=kind)
                    if kind is Kind.RESULT and not acked.is_set():  # on the broker; its PUBACK "still to come"
                        acked.set()
                        await asyncio.Event().wait()
                bridge._publish = publish
                original_write = rig.gateway.write_command

                async def held_write() -> None:  # the second command's inverter write, answered slowly
                    write_started.set()
                    await release_write.wait()
                    await original_write()

                task = asyncio.create_task(bridge.run())
                try:
                    await watcher.wait_for("online", lambda m: m.topic == TOPICS.availability and m.payload == b"online")
                    index = len(watcher.seen)
                    await watcher.publish(TOPICS.command(Command.RESERVE), "41")
                    await asyncio.wait_for(acked.wait(), 10)
                    rig.gateway.write_command = held_write
                    await watcher.publish(TOPICS.command(Command.RESERVE), "42")
                    await asyncio.wait_for(write_started.wait(), 10)
                    for pct in ("43", "44"):
                        await watcher.publish(TOPICS.command(Command.RESERVE), pct)
                    for _ in range(500):  # both taken from the broker into the client's queue, unread
                        if len(made[-1].messages) == 2:
                            break
                        await asyncio.sleep(0.01)
                    assert len(made[-1].messages) == 2
                    rig.gateway.begin_stop()
                    task.cancel()
                    release_write.set()
                    await asyncio.wait_for(cancel_all([task]), 10)
                finally:
                    release_write.set()
                    await cancel_all([task])
                answers = await results_until_offline(watcher, index)
        stopping = "not applied: the gateway is stopping; send it again once its availability says online"
        assert answers == ["reserve 41 %", "reserve 42 %", stopping, stopping], answers
        assert rig.gateway.owner_settings().reserve_pct == 42

    bounded(main())


def test_a_command_in_flight_when_the_broker_goes_away_is_answered_after_the_reconnect(tmp_path):
    """A command whose inverter write was under way when the broker went away: `_send` failing (a state
    queued on the lost connection) cancelled `_receive` mid-command, so the change, already saved and fed
    to the core, was never answered on P/result, not even after the reconnect."""
    async def main() -> None:
        with running_broker(tmp_path) as broker:
            async with gateway_on(tmp_path, broker) as (rig, bridge, watcher):
                write_started, release_write = asyncio.Event(), asyncio.Event()
                original_write = rig.gateway.write_command

                async def held_write() -> None:  # an inverter answering the Modbus write slowly
                    write_started.set()
                    await release_write.wait()
                    await original_write()
                rig.gateway.write_command = held_write

                clients: list[aiomqtt.Client] = []
                published, send_failed = asyncio.Event(), asyncio.Event()
                original_publish = bridge._publish

                async def publish(client: aiomqtt.Client, topic: str, payload: bytes, **kw: Any) -> None:
                    clients.append(client)
                    try:
                        await original_publish(client, topic, payload, **kw)
                    except Exception:
                        send_failed.set()
                        raise
                    published.set()
                bridge._publish = publish

                may_reconnect = asyncio.Event()  # the next session waits until a fresh watcher listens
                original_session = bridge._session

                async def held_session() -> None:
                    await may_reconnect.wait()
                    await original_session()
                bridge._session = held_session

                try:
                    bridge.pacer.forget()
                    assert bridge.pace_once()  # a state through the spy: the session's client
                    await asyncio.wait_for(published.wait(), 10)
                    client = clients[-1]

                    await watcher.publish(TOPICS.command(Command.RESERVE), "42")
                    await asyncio.wait_for(write_started.wait(), 10)  # the command is in the inverter write
                    broker.stop()
                    # the client has seen the connection close (a publish now fails at once, not after its timeout)
                    await asyncio.wait_for(asyncio.wait({client._disconnected}), 10)
                    bridge.pacer.forget()
                    assert bridge.pace_once()  # a state comes due on the lost connection: `_send` fails
                    await asyncio.wait_for(send_failed.wait(), 10)
                    release_write.set()
                    await asyncio.wait_for(bridge.unreachable.wait(), 10)  # the session has ended

                    broker.start()
                    async with Watcher(broker) as after:
                        may_reconnect.set()
                        await asyncio.wait_for(bridge.connected.wait(), 10)
                        answer = (await after.wait_for("the reserve's result",
                                                       lambda m: m.topic == TOPICS.result)).json()
                finally:  # a failure above must not leave the bridge's stop waiting on the held write
                    release_write.set()
                    may_reconnect.set()
                assert answer == {"command": "reserve", "ok": True, "reason": "reserve 42 %", "at": answer["at"]}
                assert rig.gateway.owner_settings().reserve_pct == 42

        assert json.loads((tmp_path / "owner.json").read_text())["reserve_pct"] == 42

    bounded(main())


def test_commands_beyond_the_rate_are_refused_on_the_gateway_clock():
    now = [0.0]
    gate = CommandGate(lambda: now[0], burst=3, per_s=0.5)
    assert [gate.admit() for _ in range(4)] == [True, True, True, False]
    now[0] += 2.0  # one more token
    assert [gate.admit(), gate.admit()] == [True, False]
    assert "at most 3 at once, then 0.5 a second" in gate.refusal()


def test_payloads_are_read_into_the_owner_apis_requests():
    settings, now = MqttConfig(storm_watch_pct=75, storm_watch_hours=12), 1_000.0
    assert commands.read(Command.RESERVE, b" 45.5\n", settings, now).body == {"pct": 45.5}
    assert commands.read(Command.RESERVE, b'{"pct": 45}', settings, now).body == {"pct": 45}
    assert commands.read(Command.OPT_OUT, b"on", settings, now).body == {"now": True}
    assert commands.read(Command.OPT_OUT, b'{"event": "peak-1"}', settings, now).body == {"event": "peak-1"}
    assert commands.read(Command.STORM_WATCH, b"ON", settings, now).body == {"floor_pct": 75, "until": 44_200.0}
    assert commands.read(Command.DEPARTURE, b"OFF", settings, now).clear
    with pytest.raises(BadRequest, match="empty payload"):
        commands.read(Command.DEPARTURE, b"  ", settings, now)


# ------------------------------------------------------------------ state


def test_an_opt_out_of_one_event_is_reported_as_that_even_while_a_timed_opt_out_runs():
    settings = OwnerSettings(40.0, 0.0, opt_out_until=1_748_786_402.0, opt_out_events=frozenset({"peak-9"}))
    change = commands.Change(Command.OPT_OUT, {"event": "peak-9"})
    assert commands.done(change, settings) == "opted out of event peak-9"
    assert commands.done(commands.Change(Command.OPT_OUT, {"until": 1_748_786_402.0}), settings) == \
        "opted out until 2025-06-01T14:00:02Z"


def test_state_follows_the_bench_through_an_event_to_the_months_credit(tmp_path):
    async def main() -> None:
        with running_broker(tmp_path) as broker:
            async with gateway_on(tmp_path, broker, program={"credit_per_kwh": 2.0}) as (rig, bridge, watcher):
                now = rig.gateway.now()
                await rig.gateway.submit(DispatchRequest("peak-1", "test", DispatchKind.DISCHARGE, 5_000, now,
                                                         now + 60, received_at=now))
                await advance(rig, bridge, 5.0)
                serving = await watcher.wait_for("the event served", lambda m: is_state(m) and m.json()["event"])
                assert serving.json()["mode"] == "DISCHARGE" and serving.json()["event"]["id"] == "peak-1"
                await advance(rig, bridge, 62.0)
                ended = await watcher.wait_for("the event over", lambda m: is_state(m) and m.json()["mode"] ==
                                               "STANDBY" and m.json()["delivered"]["total_wh"] > 0)
                rig.gateway.flush_journal(final=True)  # with the steps' batch, as `run` writes it each minute
                await rig.gateway.earnings.refresh()  # what the service's earnings task does when due
                await advance(rig, bridge, 1.0)
                earned = await watcher.wait_for("the month's credit", lambda m: is_state(m) and m.json()["earnings"])
                entities = dict(configurations(rig.config, "test"))
        delivered = ended.json()["delivered"]
        earnings = earned.json()["earnings"]
        assert earnings["delivered_wh"] == pytest.approx(delivered["total_wh"], abs=0.01)
        assert earnings["credit"] == round(earnings["credited_wh"] / 1000 * 2.0, 2) > 0
        credit = next(c for topic, c in entities.items() if topic.endswith("/credit_month/config"))
        assert render(credit["value_template"], earned.json()) == str(earnings["credit"])
        assert render(credit["last_reset_value_template"], earned.json()) == "2025-06-01T00:00:00+00:00"
        assert render(credit["last_reset_value_template"], ended.json()) == ""  # none yet: HA ignores it quietly
        assert delivered["event_id"] == "peak-1" and delivered["event_wh"] == delivered["total_wh"]
        assert 60 < delivered["total_wh"] < 5_000 * 61 / 3600 + 1  # about 5 kW for a minute, by the meter
        power = [m.json()["power_w"] for m in watcher.seen if is_state(m)]
        assert max(power) > 4_000 and power[-1] == 0

    bounded(main())


def test_the_state_is_paced_on_change_and_at_least_every_interval():
    base = {"at": "t0", "mode": "STANDBY", "power_w": 0.0, "links": {"bms": {"ok": True, "age_s": 0.1}},
            "delivered": {"event_wh": None, "total_wh": 0.0}}
    assert not changed(base, {**base, "at": "t1", "links": {"bms": {"ok": True, "age_s": 3.0}}})
    assert not changed(base, {**base, "power_w": 99.0})  # inside the dead band
    assert changed(base, {**base, "power_w": 100.0})
    assert changed(base, {**base, "mode": "DISCHARGE"})
    assert changed(base, {**base, "links": {"bms": {"ok": False, "age_s": 0.1}}})
    assert changed(base, {**base, "delivered": {"event_wh": 5.0, "total_wh": 0.0}})
    # a price-driven discharge's energy grows every second: it was a change each time (42 states a minute)
    priced = {**base, "price_mode": {"active": True, "today_wh": 100.0}}
    assert not changed(priced, {**priced, "price_mode": {"active": True, "today_wh": 199.0}})
    assert changed(priced, {**priced, "price_mode": {"active": True, "today_wh": 200.0}})
    pacer = Pacer(interval_s=10.0)
    assert pacer.due(base, 0.0)
    pacer.sent(base, 0.0)
    moved = {**base, "mode": "DISCHARGE"}
    assert not pacer.due(moved, 0.5)  # within the minimum gap...
    assert pacer.due(moved, 0.5, urgent=True)  # ...unless an owner's command just changed it
    assert pacer.due(moved, 1.0)
    assert not pacer.due(base, 9.9) and pacer.due(base, 10.0)


def test_the_outbox_drops_the_oldest_state_first_and_keeps_results_ahead():
    async def main() -> None:
        outbox = Outbox(states=3, results=2)
        for n in range(5):
            outbox.put(Outgoing("s", str(n).encode(), True, Kind.STATE))
        outbox.put(Outgoing("r", b"answer", False, Kind.RESULT))
        assert outbox.dropped[Kind.STATE] == 2 and len(outbox) == 4
        assert [(await outbox.get()).payload for _ in range(4)] == [b"answer", b"2", b"3", b"4"]

    bounded(main())


def test_a_burst_of_refused_commands_never_pushes_out_the_result_of_an_applied_one():
    """Results wait for the broker's acknowledgement one by one: a burst of bad commands after good ones
    fills the queue, and what it gives up is refusals, oldest first, never the word that a change was made."""
    async def main() -> None:
        outbox = Outbox(states=3, results=3)
        outbox.put(Outgoing("r", b"ok-1", False, Kind.RESULT, applied=True))
        outbox.put(Outgoing("r", b"ok-2", False, Kind.RESULT, applied=True))
        for n in range(5):
            outbox.put(Outgoing("r", f"bad-{n}".encode(), False, Kind.RESULT))
        assert [(await outbox.get()).payload for _ in range(3)] == [b"ok-1", b"ok-2", b"bad-4"]
        for n in range(4):
            outbox.put(Outgoing("r", f"ok-{n + 3}".encode(), False, Kind.RESULT, applied=True))
        outbox.put(Outgoing("r", b"bad-5", False, Kind.RESULT))  # every queued result applied: it goes
        assert [(await outbox.get()).payload for _ in range(3)] == [b"ok-4", b"ok-5", b"ok-6"]
        assert outbox.dropped[Kind.RESULT] == 4 + 2 and not len(outbox)

    bounded(main())


def test_a_result_put_back_on_a_full_queue_follows_the_same_rule_and_never_pushes_out_the_newest():
    """A publish that failed puts its result back first; on a full deque that silently dropped the newest
    result, one saying a change was made among them. The put-back refusal goes instead, counted."""
    async def main() -> None:
        outbox = Outbox(states=3, results=3)
        outbox.put(Outgoing("r", b"bad-1", False, Kind.RESULT))
        in_flight = await outbox.get()
        for n in range(3):
            outbox.put(Outgoing("r", f"ok-{n}".encode(), False, Kind.RESULT, applied=True))
        outbox.put_back(in_flight)
        assert [(await outbox.get()).payload for _ in range(3)] == [b"ok-0", b"ok-1", b"ok-2"]
        assert outbox.dropped[Kind.RESULT] == 1 and not len(outbox)
        outbox.put(Outgoing("r", b"bad-2", False, Kind.RESULT))
        second = await outbox.get()
        outbox.put(Outgoing("r", b"bad-3", False, Kind.RESULT))
        outbox.put(Outgoing("r", b"ok-3", False, Kind.RESULT, applied=True))
        outbox.put(Outgoing("r", b"ok-4", False, Kind.RESULT, applied=True))
        outbox.put_back(second)  # a refusal queued: it makes the room
        assert [(await outbox.get()).payload for _ in range(3)] == [b"bad-2", b"ok-3", b"ok-4"]
        assert outbox.dropped[Kind.RESULT] == 2

    bounded(main())


def test_a_part_that_loses_a_cancellation_is_cancelled_again_so_a_stop_is_a_stop():
    """Python 3.11's `asyncio.wait_for` can lose a cancellation that comes as what it waits for completes
    (the MQTT client waits that way for every acknowledgement); the bridge's parts must end all the same."""
    async def stubborn() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            pass  # lost, as wait_for loses it
        await asyncio.Event().wait()

    async def main() -> None:
        before = asyncio.all_tasks()
        bridge_like = asyncio.create_task(_first_failure(stubborn(), asyncio.Event().wait()))
        await asyncio.sleep(0)
        bridge_like.cancel()
        await asyncio.wait([bridge_like], timeout=5)
        assert bridge_like.cancelled()
        assert asyncio.all_tasks() == before  # no part left running

    bounded(main())


def test_messages_per_minute_in_steady_state_and_during_an_event(tmp_path):
    """What one gateway costs a fleet's broker (README, fleet scale): pacing on the rig's clock."""
    async def main() -> dict[str, float]:
        with running_broker(tmp_path) as broker:
            async with Rig(tmp_path, configure=mqtt_enabled(broker)) as rig:
                bridge = rig.assembly.integrations["mqtt"]
                return await publication_rates(rig, bridge, minutes=2.0)

    rates = bounded(main())
    assert rates["steady_per_min"] <= 7  # every publish_interval_s (10 s), and little else
    assert rates["event_per_min"] <= 15


async def publication_rates(rig: Rig, bridge: MqttBridge, minutes: float) -> dict[str, float]:
    """State publications a minute, idle and then serving an 11.5 kW event, paced as `run` paces them."""
    await rig.run(2.0)
    await advance(rig, bridge, 10.0)  # the first publication and the start-up's changes
    steady = await advance(rig, bridge, minutes * 60)
    now = rig.gateway.now()
    await rig.gateway.submit(DispatchRequest("peak", "test", DispatchKind.DISCHARGE, 11_500, now, now + 3600,
                                             received_at=now))
    event = await advance(rig, bridge, minutes * 60)
    assert rig.gateway.controller.mode is Mode.DISCHARGE
    return {"steady_per_min": steady / minutes, "event_per_min": event / minutes}


class SilentBroker:
    """A listener on 127.0.0.1 that accepts connections and never answers: each MQTT connect times out."""

    def __init__(self) -> None:
        self.accepted, self.open = 0, set()
        self.server: asyncio.Server | None = None
        self.address = ""
        self._changed = asyncio.Event()

    async def until(self, what: Callable[[], bool], timeout_s: float = 5.0) -> None:
        """Wait (bounded) until `what` holds, looked at whenever a connection comes or goes."""
        async with asyncio.timeout(timeout_s):
            while not what():
                self._changed.clear()
                await self._changed.wait()

    async def __aenter__(self) -> SilentBroker:
        self.server = await asyncio.start_server(self._hold, "127.0.0.1", 0)
        self.address = "127.0.0.1:%d" % self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        for writer in list(self.open):
            writer.close()
        self.server.close()

    async def _hold(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.open.add(writer)
        self._changed.set()
        with contextlib.suppress(ConnectionError):
            while await reader.read(1024):
                pass  # the CONNECT, never answered
        self.open.discard(writer)
        self._changed.set()


def test_connect_attempts_a_silent_broker_never_answers_leave_no_socket_behind(tmp_path, monkeypatch):
    """aiomqtt gives up a connect with no CONNACK but leaves its socket open until the broker's keep-alive
    ends it: every attempt against a broker that accepts and never answers left one more behind."""
    monkeypatch.setattr(bridge_module, "PUBLISH_TIMEOUT_S", 0.2)  # the CONNACK wait, shortened

    async def main() -> None:
        async with SilentBroker() as broker, Rig(tmp_path, configure=mqtt_enabled(broker)) as rig:
            bridge = rig.assembly.integrations["mqtt"]
            bridge.backoff_min_s = bridge.backoff_max_s = 0.05
            task = asyncio.create_task(bridge.run())
            try:
                await broker.until(lambda: broker.accepted >= 4)
                await broker.until(lambda: len(broker.open) <= 1)  # the attempt under way (keep-alive: 30 s+)
                assert rig.gateway.status()["links"]["mqtt"]["ok"] is False
            finally:
                await cancel_all([task])
            # Once the bridge stopped, at most the attempt a stop caught in its connect (its socket is opened in
            # aiomqtt's thread, after the cancel, and closed with the process or by the broker's keep-alive).
            await broker.until(lambda: len(broker.open) <= 1)

    bounded(main())


# ------------------------------------------------------------------ TLS and a password


def test_tls_and_a_password_from_a_file_and_a_wrong_password_never_shown(tmp_path, caplog):
    from test_web import self_signed

    cert, key = self_signed(tmp_path)
    (tmp_path / "mqtt.secret").write_text("correct horse battery\n")
    (tmp_path / "mqtt.secret").chmod(0o600)
    tls = Tls(ca=cert, cert=cert, key=key)

    async def main() -> None:
        with running_broker(tmp_path, users={"gateway": "correct horse battery"}, tls=tls) as broker:
            client = {"username": "gateway", "password": "correct horse battery",
                      "tls_context": ssl.create_default_context(cafile=str(cert))}
            async with gateway_on(tmp_path, broker, username="gateway", password_file=str(tmp_path / "mqtt.secret"),
                                  tls_ca_file=str(cert), watcher=client) as (rig, bridge, watcher):
                assert rig.gateway.status()["links"]["mqtt"]["ok"] is True
            (tmp_path / "mqtt.secret").write_text("wrong horse\n")
            async with Rig(tmp_path, configure=mqtt_enabled(
                    broker, username="gateway", password_file=str(tmp_path / "mqtt.secret"),
                    tls_ca_file=str(cert))) as rig:
                bridge = rig.assembly.integrations["mqtt"]
                task = asyncio.create_task(bridge.run())
                try:
                    await asyncio.wait_for(bridge.unreachable.wait(), 10)
                    await rig.run(1.0)  # the control path goes on meanwhile
                    link = rig.gateway.status()["links"]["mqtt"]
                finally:
                    await cancel_all([task])
        assert "authori" in link["cause"].lower(), link
        assert rig.gateway.controller.mode is Mode.STANDBY

    with caplog.at_level(logging.DEBUG):
        bounded(main())
    assert "horse" not in caplog.text


async def link_once_refused(tmp: Path, broker: Mosquitto, **mqtt: Any) -> dict[str, Any]:
    """The `mqtt` link's status once the bridge, configured with `mqtt`, found it could not connect."""
    async with Rig(tmp, configure=mqtt_enabled(broker, **mqtt)) as rig:
        bridge = rig.assembly.integrations["mqtt"]
        task = asyncio.create_task(bridge.run())
        try:
            await asyncio.wait_for(bridge.unreachable.wait(), 10)
            return rig.gateway.status()["links"]["mqtt"]
        finally:
            await cancel_all([task])


def test_a_broker_requiring_a_client_certificate_is_named_as_the_cause_not_a_timeout(tmp_path, monkeypatch):
    """The broker's TLS alert ends the connection before its CONNACK; aiomqtt waits out its timeout and
    says "Operation timed out", which the installer read as a broker out of reach."""
    from test_web import self_signed

    cert, key = self_signed(tmp_path)
    monkeypatch.setattr(bridge_module, "PUBLISH_TIMEOUT_S", 2.0)  # the CONNACK wait, shortened

    async def main() -> dict[str, Any]:
        with running_broker(tmp_path, tls=Tls(ca=cert, cert=cert, key=key, require_certificate=True)) as broker:
            return await link_once_refused(tmp_path, broker, tls_ca_file=str(cert))

    link = bounded(main())
    assert link["cause"].startswith("the broker ended the connection before accepting it: "), link
    # The broker's alert is read, or lost to the reset the client's CONNECT draws (connect_failure says how):
    # which of the two is the broker's timing, and either way the client certificate is named.
    alert_read = "certificate required" in link["cause"]
    assert ("the broker requires a client certificate" if alert_read
            else "a broker that requires a client certificate ends the connection this way") in link["cause"], link
    assert link["cause"].endswith("let the broker accept mqtt.username with mqtt.password_file over TLS)"), link
    assert "give it one (mqtt.tls_cert, mqtt.tls_key)" in link["cause"], link


@pytest.mark.parametrize(("failure", "tls", "hint"), [
    ("[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert certificate required (_ssl.c:2580)", True,
     "the broker requires a client certificate"),
    ("EOF occurred in violation of protocol (_ssl.c:2427)", True,
     "a broker that requires a client certificate ends the connection this way"),
    ("[Errno 104] Connection reset by peer", True, "a broker that requires a client certificate ends"),
    ("[Errno 104] Connection reset by peer", False, None),
    ("[Errno 111] Connection refused", True, None),
])
def test_a_connection_cut_before_its_connack_names_a_client_certificate_where_tls_makes_it_likely(
        failure: str, tls: bool, hint: str | None):
    """The alert that names the certificate can be lost to a reset (TLS 1.3 ends the client's handshake
    before the broker judges it): a TLS connection cut without a word still points at the likely cause,
    and a plain one or a refusal does not."""
    cause = bridge_module.connect_failure(aiomqtt.MqttError(bridge_module.TIMED_OUT), failure, MqttConfig(tls=tls))
    assert cause.startswith("the broker ended the connection before accepting it: "), cause
    assert (hint in cause) if hint else "certificate" not in cause, cause


# ------------------------------------------------------------------ a client certificate


def broker_requiring_certificates(tmp: Path) -> tuple[TlsMaterial, Tls]:
    """A CA, a broker certificate for 127.0.0.1 and a client certificate (the gateway's) it issued, and the
    broker's TLS settings: only clients with a certificate from that CA are let in."""
    tls = make_tls_material(tmp / "pki")
    return tls, Tls(ca=tls.ca_file, cert=tls.vtn_cert, key=tls.vtn_key, require_certificate=True)


def test_a_client_certificate_lets_the_gateway_onto_a_broker_that_requires_one(tmp_path):
    """The gateway had no way to show a certificate: a broker that requires one (mosquitto's
    `require_certificate`, a fleet's usual setting) could not be used at all."""
    tls, listener = broker_requiring_certificates(tmp_path)
    watcher_tls = ssl.create_default_context(cafile=str(tls.ca_file))
    watcher_tls.load_cert_chain(tls.ven_cert, tls.ven_key)

    async def main() -> None:
        with running_broker(tmp_path, tls=listener) as broker:
            async with gateway_on(tmp_path, broker, tls_ca_file=str(tls.ca_file), tls_cert=str(tls.ven_cert),
                                  tls_key=str(tls.ven_key), watcher={"tls_context": watcher_tls}) as (rig, _, _):
                assert rig.gateway.status()["links"]["mqtt"]["ok"] is True

    bounded(main())


@pytest.mark.parametrize("certificate", ["stranger", "expired", "server's"])
def test_a_client_certificate_the_broker_refuses_is_named_with_what_to_do(tmp_path, monkeypatch, certificate):
    """A certificate from a CA the broker does not trust, one out of date, or one from its CA but made for a
    server only (extended key usage serverAuth): the broker ends the handshake and the link's cause names the
    gateway's certificate, and what makes it acceptable (told to trust the CA it was, for the last)."""
    tls, listener = broker_requiring_certificates(tmp_path)
    shown = {"stranger": lambda: make_tls_material(tmp_path / "other"),
             "expired": lambda: make_tls_material(tmp_path / "old", ven_expired=True),
             "server's": lambda: replace(tls, ven_cert=tls.vtn_cert, ven_key=tls.vtn_key)}[certificate]()
    monkeypatch.setattr(bridge_module, "PUBLISH_TIMEOUT_S", 2.0)  # the CONNACK wait, shortened

    async def main() -> dict[str, Any]:
        with running_broker(tmp_path, tls=listener) as broker:
            return await link_once_refused(tmp_path, broker, tls_ca_file=str(tls.ca_file),
                                           tls_cert=str(shown.ven_cert), tls_key=str(shown.ven_key))

    cause = bounded(main())["cause"]
    assert cause.startswith("the broker ended the connection before accepting it: "), cause
    cut = "mqtt.tls_cert, ends the connection this way: let it trust the CA that issued the certificate)"
    if certificate == "stranger":
        assert cause.endswith(("mqtt.tls_cert: let it trust the CA that issued the certificate)", cut)), cause
    elif certificate == "server's":
        assert cause.endswith(("mqtt.tls_cert: it is made for another use: give one for client authentication "
                               "(extended key usage clientAuth))", cut)), cause
    else:
        assert re.search(r"\(mqtt\.tls_cert: the gateway's certificate expired on [0-9-]+ [0-9:]+ UTC, and the "
                         r"broker refuses it; renew it\)$", cause), cause


@pytest.mark.parametrize(("failure", "hint"), [
    ("[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca (_ssl.c:2580)",
     "(the broker refused the gateway's certificate, mqtt.tls_cert: let it trust the CA that issued the "
     "certificate)"),
    ("[SSL: SSLV3_ALERT_BAD_CERTIFICATE] sslv3 alert bad certificate (_ssl.c:2580)",
     "(the broker refused the gateway's certificate, mqtt.tls_cert: the broker's log says why)"),
    ("[SSL: SSLV3_ALERT_UNSUPPORTED_CERTIFICATE] sslv3 alert unsupported certificate (_ssl.c:2580)",
     "mqtt.tls_cert: it is made for another use: give one for client authentication (extended key usage "
     "clientAuth))"),
    ("[SSL: SSLV3_ALERT_CERTIFICATE_REVOKED] sslv3 alert certificate revoked (_ssl.c:2580)",
     "mqtt.tls_cert: it is revoked; use a newly issued one)"),
    ("[Errno 104] Connection reset by peer",
     "(a broker that does not trust the gateway's certificate, mqtt.tls_cert, ends the connection this way:"),
    ("[SSL: TLSV1_ALERT_PROTOCOL_VERSION] tlsv1 alert protocol version (_ssl.c:2580)", None),
    ("[Errno 111] Connection refused", None),
])
def test_a_connection_cut_with_a_client_certificate_shown_names_what_was_refused_not_its_absence(
        tmp_path, failure: str, hint: str | None):
    """With `tls_cert` set, "the gateway sends none" would be false: the certificate's trust is named, and
    an alert about something else, or a refusal, names no certificate."""
    tls = make_tls_material(tmp_path)
    mqtt = MqttConfig(tls_ca_file=str(tls.ca_file), tls_cert=str(tls.ven_cert), tls_key=str(tls.ven_key))
    cause = bridge_module.connect_failure(aiomqtt.MqttError(bridge_module.TIMED_OUT), failure, mqtt)
    assert (hint in cause) if hint else "certificate" not in cause, cause
    assert "sends none" not in cause, cause


@pytest.mark.parametrize("keys, message", [
    ('tls_cert = "ven.crt"', "mqtt.tls_cert, mqtt.tls_key: set both (a client certificate and its key) or neither"),
    ('tls_key = "ven.key"', "mqtt.tls_cert, mqtt.tls_key: set both"),
    ('tls_cert = "ven.crt"\ntls_key = "vtn.key"', "mqtt.tls_cert, mqtt.tls_key: {d}/vtn.key: is not the private "
                                                  "key of {d}/ven.crt"),
    ('tls_cert = "ven.crt"\ntls_key = "missing.key"', "mqtt.tls_cert, mqtt.tls_key: {d}/missing.key: does not exist"),
])
def test_check_config_refuses_a_client_certificate_that_cannot_serve(tmp_path, capsys, keys, message):
    make_tls_material(tmp_path)
    path = tmp_path / "gw.toml"
    path.write_text(f"[mqtt]\nenabled = true\n{keys}\n")
    assert cli.main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert message.format(d=tmp_path) in err, err


def test_a_client_certificate_out_of_date_or_a_key_others_may_read_is_noted_at_the_start():
    """As for the web app's and the VEN's: not refused (the pack's protection must start), but named. The
    key is made in a folder every user may enter, outside pytest's own (0700)."""
    folder = Path(tempfile.mkdtemp(prefix="mqtt-keys-"))
    folder.chmod(0o711)
    try:
        tls = make_tls_material(folder, ven_expired=True)
        config = replace(Config(), mqtt=MqttConfig(enabled=True, tls_cert=str(tls.ven_cert),
                                                   tls_key=str(tls.ven_key)))
        tls.ven_key.chmod(0o644)
        certificate, key = notes(config)
        assert certificate.startswith(f"mqtt.tls_cert: {tls.ven_cert}: the certificate expired on "), certificate
        assert certificate.endswith(": the broker refuses the gateway's connections, and Home Assistant shows it "
                                    "unavailable; renew it"), certificate
        assert key.startswith(f"mqtt.tls_key: {tls.ven_key}: every user of the machine may read this private key "
                              "(mode 0644)"), key
        tls.ven_key.chmod(0o600)
        assert notes(replace(config, mqtt=replace(config.mqtt, enabled=False))) == []
        assert notes(config) == [certificate]
    finally:
        shutil.rmtree(folder)


# ------------------------------------------------------------------ configuration


@pytest.mark.parametrize("mqtt, message", [
    ('broker = "broker.local"', "mqtt.broker: expected HOST:PORT"),
    # IDNA refuses the name: the lookup raised UnicodeError at every reconnect, a traceback every 5 s, no cause
    ('broker = "mqtt..lan:1883"', "mqtt.broker: 'mqtt..lan' is neither an IP address nor a host name"),
    ('broker = "300.1.1.1:1883"', "mqtt.broker: '300.1.1.1' is not an IP address"),
    ('topic_prefix = "home/+/truck"', "mqtt.topic_prefix: 'home/+/truck' holds an MQTT wildcard"),
    ('topic_prefix = "truck/"', "mqtt.topic_prefix: 'truck/' has an empty level"),
    ('discovery_prefix = "$SYS"', "mqtt.discovery_prefix: '$SYS' starts with $"),
    ('username = "gw"\npassword_file = "missing.secret"', "mqtt.password_file:"),
    ('password_file = "gw.secret"', "mqtt.password_file: set mqtt.username too"),
    ('tls_ca_file = "ca.pem"', "mqtt.tls_ca_file:"),
    ("publish_interval_s = 0", "mqtt.publish_interval_s: 0 is out of range"),
    # paho cannot pack a string past 65,535 bytes: a traceback at every connection attempt, every 5 s
    (f'client_id = "{"c" * 70_000}"', "mqtt.client_id: 70000 bytes in UTF-8; MQTT carries at most 65,535"),
    (f'username = "{"é" * 40_000}"', "mqtt.username: 80000 bytes in UTF-8; MQTT carries at most 65,535"),
    ('client_id = "truck\\u0000one"', "mqtt.client_id: contains a NUL character"),
])
def test_check_config_runs_the_mqtt_checks(tmp_path, capsys, mqtt, message):
    (tmp_path / "gw.secret").write_text("s3cret\n")
    (tmp_path / "gw.secret").chmod(0o600)
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    path = tmp_path / "gw.toml"
    path.write_text(f"[mqtt]\nenabled = true\n{mqtt}\n")
    assert cli.main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "s3cret" not in err


@pytest.mark.parametrize("ca, told", [
    ("fifo", "must be a regular file, not a FIFO"),  # no writer: the check waited for one forever
    ("/dev/zero", "must be a regular file, not a device"),  # read as a would-be bundle
    ("empty.pem", "holds no certificate"),  # nothing to load: the system's CAs were trusted instead
    ("missing.pem", "does not exist"),
])
def test_a_ca_file_that_is_no_regular_pem_file_is_refused_without_reading_it(tmp_path, capsys, ca, told):
    """`tls_ca_file` went straight to OpenSSL, past the rule every other file key keeps: a FIFO hung
    `check-config` (and `run`'s start) for good, `/dev/zero` was read. Refused, naming the key, at once."""
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "empty.pem").write_text("\n")
    path = tmp_path / "gw.toml"
    path.write_text(f'[mqtt]\nenabled = true\ntls_ca_file = "{ca}"\n')
    assert cli.main(["check-config", str(path)]) == 2  # a hang here is the pytest-timeout's to catch
    err = capsys.readouterr().err
    assert "mqtt.tls_ca_file: " in err and told in err, err


def test_a_ca_bundle_of_trusted_certificates_is_loaded_as_openssl_loads_a_ca_file(tmp_path):
    """OpenSSL's TRUSTED CERTIFICATE form (ca-bundle.trust.crt) was refused by the check for plain
    certificates, though OpenSSL, given the file, loads it."""
    import subprocess

    subprocess.run("openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=ca "
                   "&& openssl x509 -in ca.pem -addtrust serverAuth -out trusted.pem", shell=True, cwd=tmp_path,
                   check=True, capture_output=True, timeout=60)
    assert (tmp_path / "trusted.pem").read_text().startswith("-----BEGIN TRUSTED CERTIFICATE-----")
    context = bridge_module.tls_context(MqttConfig(enabled=True, tls_ca_file=str(tmp_path / "trusted.pem")))
    assert [c["subject"] for c in context.get_ca_certs()] == [((("commonName", "ca"),),)]


@pytest.mark.parametrize("mode, told", [(0o644, "mode 0644"), (0o640, "mode 0640")])
def test_a_broker_password_others_may_read_is_refused_naming_the_mode(tmp_path, capsys, mode, told):
    """The broker password was read from a file anyone on the gateway could read (0644), where the
    OpenADR 3 client secret and the tokens are refused: now the same rule for every secret."""
    secret = tmp_path / "gw.secret"
    secret.write_text("s3cret\n")
    secret.chmod(mode)
    path = tmp_path / "gw.toml"
    path.write_text('[mqtt]\nenabled = true\nusername = "gw"\npassword_file = "gw.secret"\n')
    assert cli.main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"mqtt.password_file: {secret}: the MQTT password file is accessible by group or others ({told})" in err
    assert f"chmod 600 {secret}" in err and "s3cret" not in err
    secret.chmod(0o600)
    assert cli.main(["check-config", str(path)]) == 0, capsys.readouterr().err


def test_prefixes_that_root_a_topic_tree():
    assert prefix_problem("powershare-gw/truck-1", "k") is None
    assert prefix_problem("", "k") == "k: must not be empty"
    assert "control characters" in prefix_problem("a\nb", "k")


@given(st.lists(st.text(alphabet="ab1_/-. ", min_size=1, max_size=8), min_size=2, max_size=2, unique=True))
def test_two_valid_prefixes_never_share_a_node_id(prefixes):
    """One node id for two gateways (`fleet/site_1/truck`, `fleet/site/1/truck`) made the broker close
    each one's connection whenever the other connected, and each overwrote the other's entities."""
    assume(all(prefix_problem(p, "k") is None for p in prefixes))
    first, second = (node_id(p) for p in prefixes)
    assert first != second and not any(NODE_ID_CHARS.search(n) for n in (first, second))


def test_a_plain_prefix_keeps_its_readable_node_id_and_others_gain_a_digest():
    assert node_id("powershare-gw/truck-1") == "powershare-gw_truck-1"  # ids installed gateways already use
    assert node_id("fleet/site_1/truck").startswith("fleet_site_1_truck__")
    digested = node_id("fleet/site_1")  # a plain prefix spelling another's digest still has its own id
    assert node_id("fleet/site/1/" + digested.rsplit("_", 1)[1]) != digested
    assert node_id("fleet/site_1/truck") != node_id("fleet/site/1/truck") == "fleet_site_1_truck"
