"""A gateway assembled as `run` assembles it, on a pair of clocks the test holds, driven in lock-step.

Real parts throughout: the simulated pack and BMS node on a python-can `virtual`
bus, the simulated inverter served by pymodbus over Modbus TCP on 127.0.0.1, the
journal in a real SQLite file. Only time is the test's: a monotonic clock it
advances step by step and a wall clock it may step like NTP would, so nothing
here waits on the real clock.
"""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Self

import can
from firmware_py.sim.battery import Battery
from firmware_py.sim.bms_node import BmsNode
from firmware_py.sim.inverter import InverterModel, SimInverterServer

from firmware_py.assembly import Assembly, assemble
from firmware_py.clocks import Clocks
from firmware_py.config import Config, bundled_dbc
from firmware_py.core import StepResult
from firmware_py.links import Link

WALL_START = dt.datetime(2025, 6, 1, 12, 0, tzinfo=dt.UTC).timestamp()
_channels = itertools.count()


class TestClocks:
    """A monotonic clock the test advances and a wall clock it can step (NTP, a board without RTC)."""

    __test__ = False  # not a test class for pytest

    def __init__(self, wall_start: float = WALL_START) -> None:
        self.mono = 1_000.0  # monotonic time has its own origin (boot), never the epoch
        self.offset = wall_start - self.mono
        self.clocks = Clocks(lambda: self.mono, lambda: self.mono + self.offset)

    def wall(self) -> float:
        return self.mono + self.offset

    def step_wall(self, seconds: float) -> None:
        self.offset += seconds


class Rig:
    """The gateway, its BMS node and its inverter; `run` advances them together."""

    def __init__(self, tmp: Path, clocks: TestClocks | None = None, *, soc_pct: float = 80.0,
                 configure: Callable[[Config], Config] = lambda c: c) -> None:
        self.tmp, self.time = tmp, clocks or TestClocks()
        self.soc_pct, self.configure = soc_pct, configure
        self.bms_on = True
        self.results: list[StepResult] = []

    async def __aenter__(self) -> Self:
        self.model = InverterModel(now=self.time.mono)
        self.server = SimInverterServer(self.model)
        port = await self.server.start()
        channel = f"lockstep-{next(_channels)}-{id(self)}"
        base = Config()
        self.config = self.configure(replace(
            base, can=replace(base.can, interface="virtual", channel=channel),
            inverter=replace(base.inverter, port=port, poll_interval_s=1.0),
            safety=replace(base.safety, fault_holdoff_s=2.0),
            journal=replace(base.journal, path=str(self.tmp / "journal.sqlite")),
            owner=replace(base.owner, settings_file=str(self.tmp / "owner.json"),
                          token_file=str(self.tmp / "owner.token"))))
        self.battery = Battery(soc_pct=self.soc_pct)
        self.node_bus = can.Bus(interface="virtual", channel=channel)
        self.node = BmsNode(self.battery, self.node_bus, bundled_dbc("cybertruck_bms.dbc"))
        self.assembly: Assembly = assemble(self.config, self.time.clocks)
        self.gateway = self.assembly.gateway
        self.gateway.observers.append(self.results.append)
        self._next_poll = self.time.mono
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self.gateway.inverter.safe_stop()
            self.gateway.flush_journal(final=True)
            await self.gateway.inverter.close()
        finally:
            await self.server.stop()
            self.assembly.close()
            self.node_bus.shutdown()

    async def run(self, seconds: float, step_s: float = 0.1) -> None:
        """Advance everything by `seconds`: physics, frames, steps, polls, writes, journal."""
        for _ in range(round(seconds / step_s)):
            await self.step(step_s)

    async def step(self, step_s: float = 0.1) -> None:
        self.time.mono += step_s
        now = self.time.mono
        dc = self.model.advance(step_s, now, self.battery.max_discharge_w, self.battery.max_charge_w)
        self.battery.step(step_s, dc)
        if self.bms_on:
            self.node.emit_due(now)
        frames = []
        while (msg := self.assembly.bus.recv(timeout=0)) is not None:
            frames.append(msg)
        if frames:  # what the CAN link's supervisor says in `run`, where a receive thread reads the bus
            self.gateway.links.good(Link.BMS, now)
        if self.gateway.on_frames(frames) is None:
            self.gateway.tick()
        if now >= self._next_poll - 1e-9:
            await self.gateway.poll_inverter()
            self._next_poll = now + self.config.inverter.poll_interval_s
        await self.gateway.write_command()
        self.gateway.flush_journal()

    def events(self, kind: type) -> list:
        return [e for r in self.results for e in r.events if isinstance(e, kind)]
