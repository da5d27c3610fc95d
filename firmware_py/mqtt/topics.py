"""The gateway's topic tree under `topic_prefix` (P), fixed by the README's topic table.

    P/state             retained JSON: the status document (§3.9) and a few owner fields
    P/availability      retained "online" / "offline" (the last will)
    P/set/<command>     commands: reserve, opt_out, storm_watch, departure, price
    P/result            one JSON answer per command: {"command", "ok", "reason", ...}

Prefixes come from a person's config file, so they are checked here before the
gateway connects: a wildcard or an empty level would subscribe to other devices'
topics or publish where nobody looks.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from enum import StrEnum

from firmware_py.quoting import shown

MAX_PREFIX_CHARS = 200
NODE_ID_CHARS = re.compile(r"[^a-zA-Z0-9_-]+")
"""Home Assistant's node ids take letters, digits, `_` and `-` only."""
PLAIN_PREFIX = re.compile(r"[a-zA-Z0-9-]+(/[a-zA-Z0-9-]+)*")
"""A topic prefix whose node id is itself with `/` as `_`: no two such prefixes give one node id."""


class Command(StrEnum):
    """The owner controls MQTT accepts, named as their topics are (P/set/<command>)."""

    RESERVE = "reserve"
    OPT_OUT = "opt_out"
    STORM_WATCH = "storm_watch"
    DEPARTURE = "departure"
    PRICE = "price"


@dataclass(frozen=True)
class Topics:
    """Every topic of one gateway, from its prefix."""

    prefix: str

    @property
    def state(self) -> str:
        return f"{self.prefix}/state"

    @property
    def availability(self) -> str:
        return f"{self.prefix}/availability"

    @property
    def result(self) -> str:
        return f"{self.prefix}/result"

    @property
    def commands(self) -> str:
        """The subscription that covers every command topic."""
        return f"{self.prefix}/set/+"

    def command(self, command: Command) -> str:
        return f"{self.prefix}/set/{command.value}"

    def command_of(self, topic: str) -> Command | None:
        """The command a topic carries, or None (a topic under P/set/ that names none)."""
        head = f"{self.prefix}/set/"
        if not topic.startswith(head):
            return None
        try:
            return Command(topic[len(head):])
        except ValueError:
            return None


def prefix_problem(prefix: str, key: str) -> str | None:
    """Why `prefix` cannot root a topic tree (naming `key`), or None when it can."""
    if not prefix:
        return f"{key}: must not be empty"
    if len(prefix) > MAX_PREFIX_CHARS:
        return f"{key}: longer than {MAX_PREFIX_CHARS} characters"
    if any(c in prefix for c in "+#\0"):
        return f"{key}: {shown(prefix)} holds an MQTT wildcard (+ or #) or a NUL; give a plain topic"
    if prefix.startswith("$"):
        return f"{key}: {shown(prefix)} starts with $, which brokers keep for themselves ($SYS)"
    if prefix.startswith("/") or prefix.endswith("/") or "//" in prefix:
        return f"{key}: {shown(prefix)} has an empty level (a leading, trailing or doubled /)"
    if not prefix.isprintable():
        return f"{key}: {shown(prefix)} holds control characters"
    return None


def node_id(prefix: str) -> str:
    """The gateway's Home Assistant node id (and its MQTT client id's tail): its topic prefix in the
    characters node ids allow.

    Two gateways must never share one: the broker would close one's connection whenever the other
    connected, and each would overwrite the other's entities. A prefix of letters, digits, `-` and
    `/` maps one to one (each `/` becomes `_`, as the default prefix always has); any other (an `_`
    of its own, a space, a dot...) could meet another's, so a short digest of the prefix follows,
    after `__`, which no plain prefix's id holds.
    """
    readable = NODE_ID_CHARS.sub("_", prefix).strip("_") or "powershare_gw"
    if PLAIN_PREFIX.fullmatch(prefix):
        return readable
    return f"{readable}__{hashlib.sha256(prefix.encode()).hexdigest()[:8]}"
