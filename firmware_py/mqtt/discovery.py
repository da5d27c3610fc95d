"""Home Assistant MQTT discovery: the configurations that make the gateway appear as one device.

Home Assistant reads a retained JSON configuration per entity at
`<discovery_prefix>/<component>/<node_id>/<object_id>/config` and from then on
reads the entity's value from P/state with the configuration's `value_template`,
marks it unavailable when P/availability says `offline`, and publishes to the
command topic when someone moves a number or flips a switch. Every entity carries
the same `device` block (identifiers, name, manufacturer, model, software version),
so they are grouped as one device; `unique_id` lets people rename them.

The entities (`ENTITIES`): SoC, floor, reserve (a number that sets it), power,
mode, the event served, energy above the floor, the energy of the event served
(or the last one), delivered energy in total (`device_class: energy`,
`state_class: total_increasing`: what the energy dashboard takes), opt-out and
storm watch (switches), a fault indicator, this month's bill credit and the energy it
credits (the status's `earnings`: the statement's own figures, `device_class: monetary`
in the `[program]` currency, and `energy`; both `state_class: total`, reset at the
month's start), and one connectivity sensor per link the configuration uses. Every entity is
unavailable while P/availability says `offline`; a reading of the BMS (SoC, energy above the floor)
or of the inverter (power) also while the state's `fresh` says that source is silent. Device classes, units and state classes are those Home
Assistant documents for sensors: `battery` in %, `power` in W, `energy` in Wh (total or
total_increasing; the event's energy has none, as it restarts with each event and long-term
statistics would count it twice), `energy_storage` (measurement) in Wh, `enum` with its options.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from firmware_py.config import Config
from firmware_py.core.types import Mode
from firmware_py.mqtt.topics import Command, Topics, node_id

MANUFACTURER = "powershare-gw"
MODEL = "Powershare vehicle-to-home gateway"


class Component(StrEnum):
    """Home Assistant's entity platforms used here (the `<component>` level of the topic)."""

    SENSOR = "sensor"
    BINARY_SENSOR = "binary_sensor"
    NUMBER = "number"
    SWITCH = "switch"


@dataclass(frozen=True)
class Entity:
    """One discovered entity: where it sits, what it shows, and what it may command."""

    component: Component
    object_id: str
    name: str
    template: str
    options: dict[str, Any] = field(default_factory=dict)
    command: Command | None = None
    reading_of: str | None = None  # the source (`fresh` key of the state) whose silence makes it unavailable


def _switch_state(test: str) -> str:
    return "{{ 'ON' if " + test + " else 'OFF' }}"


ENTITIES: tuple[Entity, ...] = (
    Entity(Component.SENSOR, "soc", "State of charge", "{{ value_json.soc_pct }}",
           {"device_class": "battery", "unit_of_measurement": "%", "state_class": "measurement"}, reading_of="bms"),
    Entity(Component.SENSOR, "floor", "Floor", "{{ value_json.floor_pct }}",
           {"unit_of_measurement": "%", "state_class": "measurement", "icon": "mdi:battery-lock"}),
    Entity(Component.NUMBER, "reserve", "Reserve", "{{ value_json.reserve_pct }}",
           {"min": 0, "max": 100, "step": 1, "unit_of_measurement": "%", "mode": "slider",
            "icon": "mdi:car-battery"}, Command.RESERVE),
    Entity(Component.SENSOR, "power", "Power", "{{ value_json.power_w }}",
           {"device_class": "power", "unit_of_measurement": "W", "state_class": "measurement"},
           reading_of="inverter"),
    Entity(Component.SENSOR, "mode", "Mode", "{{ value_json.mode }}",
           {"device_class": "enum", "options": [m.value for m in Mode]}),
    Entity(Component.SENSOR, "event", "Event", "{{ value_json.event.id[:255] if value_json.event else 'none' }}",
           {"icon": "mdi:transmission-tower-export",
            "json_attributes_template": "{{ (value_json.event if value_json.event else {}) | tojson }}"}),
    Entity(Component.SENSOR, "available_energy", "Energy above the floor", "{{ value_json.available_wh }}",
           {"device_class": "energy_storage", "unit_of_measurement": "Wh", "state_class": "measurement"},
           reading_of="bms"),
    Entity(Component.SENSOR, "event_energy", "Event energy", "{{ value_json.delivered.event_wh }}",
           {"device_class": "energy", "unit_of_measurement": "Wh",
            "json_attributes_template": "{{ {'event_id': value_json.delivered.event_id} | tojson }}"}),
    Entity(Component.SENSOR, "delivered_energy", "Delivered energy", "{{ value_json.delivered.total_wh }}",
           {"device_class": "energy", "unit_of_measurement": "Wh", "state_class": "total_increasing"}),
    Entity(Component.SWITCH, "opt_out", "Opt-out", _switch_state("value_json.opt_out.active"),
           {"icon": "mdi:hand-back-left"}, Command.OPT_OUT),
    Entity(Component.SWITCH, "storm_watch", "Storm watch", _switch_state("value_json.storm_watch"),
           {"icon": "mdi:weather-lightning-rainy"}, Command.STORM_WATCH),
    Entity(Component.BINARY_SENSOR, "faults", "Faults", _switch_state("value_json.faults"),
           {"device_class": "problem",
            "json_attributes_template": "{{ {'faults': value_json.faults, 'reason': value_json.reason} | tojson }}"}),
)
"""Every entity but those that depend on the configuration (`earnings_entities`, `link_entities`)."""

LINK_NAMES = {"bms": "BMS link", "inverter": "Inverter link", "openadr": "OpenADR link",
              "openadr3": "OpenADR 3 link", "sunspec_server": "SunSpec server"}


def links_in_use(config: Config) -> list[str]:
    """The links the configuration uses (the BMS and the inverter always)."""
    links = ["bms", "inverter"]
    if config.dispatch.openadr.enabled:
        links.append("openadr")
    if config.dispatch.openadr3.enabled:
        links.append("openadr3")
    if config.dispatch.sunspec_server.enabled:
        links.append("sunspec_server")
    return links


def link_entities(links: Iterable[str]) -> tuple[Entity, ...]:
    """A connectivity sensor for each of `links`."""
    return tuple(Entity(Component.BINARY_SENSOR, f"link_{name}", LINK_NAMES[name],
                        _switch_state(f"(value_json.links.get('{name}') or {{}}).get('ok')"),
                        {"device_class": "connectivity", "entity_category": "diagnostic"}) for name in links)


MONTH_STARTED = "{{ value_json.earnings.month ~ '-01T00:00:00+00:00' if value_json.earnings else '' }}"
"""When this month's figures were last reset to 0 (the first of the month, UTC), for `state_class: total`;
empty before the first figures, which Home Assistant ignores (`None` it logs, each state, as a bad date)."""


def earnings_entities(config: Config) -> tuple[Entity, ...]:
    """This month's credit (in the program's currency) and the energy it credits, from the status's `earnings`."""
    monthly = {"state_class": "total", "last_reset_value_template": MONTH_STARTED}
    return (
        Entity(Component.SENSOR, "credit_month", "Credit this month",
               "{{ value_json.earnings.credit if value_json.earnings else None }}",
               {"device_class": "monetary", "unit_of_measurement": config.program.currency, **monthly,
                "json_attributes_template": "{{ (value_json.earnings if value_json.earnings else {}) | tojson }}"}),
        Entity(Component.SENSOR, "credited_energy_month", "Energy credited this month",
               "{{ value_json.earnings.credited_wh if value_json.earnings else None }}",
               {"device_class": "energy", "unit_of_measurement": "Wh", **monthly}),
    )


def device(config: Config, version: str) -> dict[str, Any]:
    """The one device every entity belongs to."""
    label = config.mqtt.topic_prefix.rsplit("/", 1)[-1]
    return {"identifiers": [node_id(config.mqtt.topic_prefix)], "name": f"Powershare {label}",
            "manufacturer": MANUFACTURER, "model": MODEL, "sw_version": version}


def _announced(config: Config) -> tuple[Entity, ...]:
    """Every entity this configuration makes the gateway announce."""
    return (*ENTITIES, *earnings_entities(config), *link_entities(links_in_use(config)))


def _config_topic(config: Config, entity: Entity) -> str:
    """`<discovery_prefix>/<component>/<node_id>/<object_id>/config`, where Home Assistant reads the entity."""
    return f"{config.mqtt.discovery_prefix}/{entity.component}/{node_id(config.mqtt.topic_prefix)}/" \
           f"{entity.object_id}/config"


def retired(config: Config) -> list[str]:
    """Configuration topics of entities this gateway may have announced before but does not now (a link
    turned off; every entity, with discovery turned off): each is cleared with an empty retained
    message, how Home Assistant removes an entity, or it would show a stale one for ever."""
    possible = (*ENTITIES, *earnings_entities(config), *link_entities(LINK_NAMES))
    current = _announced(config) if config.mqtt.discovery else ()
    return sorted({_config_topic(config, e) for e in possible} - {_config_topic(config, e) for e in current})


def _availability(topics: Topics, reading_of: str | None) -> dict[str, Any]:
    """Available while the gateway is online; a reading (`reading_of` its source) also only while the core
    judges that source's data fresh (the state's `fresh`): else Home Assistant would show a silent BMS's
    last SoC as the live one. (`availability` and `availability_topic` exclude each other.)"""
    online = {"payload_available": "online", "payload_not_available": "offline"}
    if reading_of is None:
        return {"availability_topic": topics.availability, **online}
    fresh = "{{ 'online' if (value_json.fresh or {}).get('" + reading_of + "') else 'offline' }}"
    return {"availability": [{"topic": topics.availability, **online},
                             {"topic": topics.state, "value_template": fresh, **online}],
            "availability_mode": "all"}


def configurations(config: Config, version: str) -> list[tuple[str, dict[str, Any]]]:
    """(topic, configuration) for every entity, to publish retained."""
    topics, node = Topics(config.mqtt.topic_prefix), node_id(config.mqtt.topic_prefix)
    shared = {"state_topic": topics.state, "device": device(config, version),
              "origin": {"name": MANUFACTURER, "sw_version": version}}
    found = []
    for entity in _announced(config):
        payload: dict[str, Any] = {"name": entity.name, "unique_id": f"{node}_{entity.object_id}",
                                   **shared, **_availability(topics, entity.reading_of),
                                   "value_template": entity.template, **entity.options}
        if "json_attributes_template" in payload:
            payload["json_attributes_topic"] = topics.state
        if entity.command is not None:
            payload["command_topic"] = topics.command(entity.command)
        if entity.component in (Component.SWITCH, Component.BINARY_SENSOR):
            payload |= {"payload_on": "ON", "payload_off": "OFF"}
        if entity.component is Component.SWITCH:
            payload |= {"state_on": "ON", "state_off": "OFF"}
        found.append((_config_topic(config, entity), payload))
    return found
