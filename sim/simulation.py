"""The whole bench in one process, on a simulated clock.

Real parts throughout: the pack and BMS node on a python-can virtual bus, the
simulated inverter served over Modbus TCP on a loopback port, the real gateway
runtime (the same `Gateway` as `powershare-gw run`) with its journal in a real
SQLite file, and an aggregator from the scenario. Only time is simulated: each
bench step advances physics by `step_s`, lets the BMS node send what is due,
hands the frames to the gateway, and awaits its tick, inverter poll and command
write, so every Modbus round trip really happens, just without waiting for the
wall clock in between.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

import can
from firmware_py.sim.aggregators import Aggregator, for_scenario
from firmware_py.sim.battery import Battery
from firmware_py.sim.bms_node import BmsNode
from firmware_py.sim.faults import RAISABLE, SCENARIO_INVERTER_FAULTS
from firmware_py.sim.inverter import InverterModel, SimInverterServer, default_home_load
from firmware_py.sim.scenario import BENCH_DBC, NOT_SET, Scenario

from firmware_py.assembly import assemble, integration
from firmware_py.bms.reader import TIMEOUT_PERIODS
from firmware_py.config import Config, bundled_dbc
from firmware_py.core import Controller, Mode, StepResult
from firmware_py.core.energy import delivered_wh
from firmware_py.core.types import (
    DispatchAnswer,
    DispatchKind,
    DispatchRequest,
    FaultRaised,
    OwnerSettings,
    describe,
)
from firmware_py.errors import InputError
from firmware_py.journal import Journal, RecordKind
from firmware_py.journal import files as journal_files
from firmware_py.journal.lock import JournalLock, holder_named, lock_journal

_channels = itertools.count()

SAFE_TOLERANCE_W = 1.0
"""How far from 0 W (either way: charging is negative) the inverter may be and still count as made safe."""


@dataclass
class FaultWatch:
    """When a scenario fault was injected, noticed by the gateway, and made safe.

    Noticed = the gateway's own reaction after the injection: a fault raised, a change of
    mode, or a new reason for its command. A change the requests explain (a window closing or
    opening, a cancellation: another request in force) is no reaction to the fault: it becomes
    the new baseline, and so does a fault raised that this kind cannot cause (`RAISABLE`): another
    fault's doing. A fault is watched only until it has ended plus the time the gateway
    needs to judge what it touched stale: a reaction later than that is to something else. Safe =
    the inverter at 0 W after that (for a grid outage: serving the house in BACKUP).
    """

    kind: str
    at_s: float
    mode: Mode
    reason: str
    asked: str | None  # the request in force (whatever faults allow of it)
    watched_until: float = math.inf  # its end plus the time the gateway needs to judge its data stale (`_grace_s`)
    ignored: bool = False  # the scenario expects no reaction ([[fault]] ignored)
    detected_at: float | None = None
    safe_at: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "at_s": _round(self.at_s),  # as the trace and the table have it
                "detected_after_s": _round(self.detected_at - self.at_s) if self.detected_at is not None else None,
                "safe_after_s": _round(self.safe_at - self.at_s) if self.safe_at is not None else None}


@dataclass
class Outcome:
    summary: dict[str, Any]
    checks: list[tuple[str, bool, str]]

    @property
    def passed(self) -> bool:
        return all(ok for _, ok, _ in self.checks)


@dataclass
class SimulationOptions:
    speed: float | None = None  # None: as fast as the machine allows; 1.0: real time
    trace: TextIO | None = None
    journal_path: Path | None = None
    on_progress: Callable[["Simulation"], None] | None = None
    progress_every_s: float = 0.25
    aggregator: Aggregator | None = None
    series: list[tuple[float, ...]] = field(default_factory=list)  # for the plot
    metrics_listen: str | None = None  # HOST:PORT: serve the gateway's /metrics while it runs (`sim --metrics`)


class Simulation:
    def __init__(self, scenario: Scenario, options: SimulationOptions):
        self.scenario = scenario
        self.options = options
        self.t = 0.0
        self.answers: dict[str, DispatchAnswer | None] = {}
        self.faults: list[FaultWatch] = []
        self.min_soc = scenario.vehicle.initial_soc_pct
        self.floor_violations = 0
        self.records = 0
        self._last_trace: tuple | None = None
        self._next_trace_t = 0.0
        self.metrics: Any = None  # the metrics server, with `SimulationOptions.metrics_listen`

    # ------------------------------------------------------------------ set-up

    def _config(self, port: int) -> Config:
        s, base = self.scenario, Config()
        return replace(
            base,
            vehicle=replace(base.vehicle, usable_capacity_wh=s.vehicle.usable_capacity_wh),
            can=replace(base.can, interface="virtual", channel=self.channel),
            inverter=replace(base.inverter, host="127.0.0.1", port=port, poll_interval_s=1.0),
            owner=replace(base.owner, reserve_pct=s.owner.reserve_pct),
            journal=replace(base.journal, path=str(self.journal_path)),
            source=f"scenario {s.name}",
        )

    async def _build(self) -> None:
        s = self.scenario
        self.journal_path = self.options.journal_path or Path(f"/tmp/powershare-bench-{id(self)}.sqlite")
        self._journal_lock = lock_bench_journal(self.journal_path)  # held until the run is torn down
        try:
            _replace_bench_journal(self.journal_path)  # before anything is opened that would need closing
        except BaseException:
            self._journal_lock.close()
            raise
        self.channel = f"powershare-bench-{next(_channels)}"
        self.battery = Battery(capacity_wh=s.vehicle.usable_capacity_wh, soc_pct=s.vehicle.initial_soc_pct,
                               ambient_c=s.vehicle.ambient_c, seed=s.run.seed)
        dbc = bundled_dbc(BENCH_DBC)
        self.node_bus = can.Bus(interface="virtual", channel=self.channel)
        self.node = BmsNode(self.battery, self.node_bus, dbc, seed=s.run.seed)
        day_offset = s.run.start_hour * 3600
        self.model = InverterModel(home_load=lambda now: default_home_load(now + day_offset), now=0.0)
        self.model.write("ESDlyTms", s.inverter.enter_service_delay_s)
        self.model.write("ESRmpTms", s.inverter.enter_service_ramp_s)
        self.server = SimInverterServer(self.model)
        port = await self.server.start()
        self.config = self._config(port)
        # The one simulated clock everything reads; the scenario's owner, not a settings file.
        self.assembly = assemble(self.config, lambda: self.t, owner=OwnerSettings(s.owner.reserve_pct, 0.0))
        self.gateway, self.gateway_bus = self.assembly.gateway, self.assembly.bus
        self.gateway.journal.append(BENCH_MARK, 0.0, {"scenario": s.name})
        self.gateway.observers.append(self._observe)
        if self.options.aggregator is None:
            self.options.aggregator = for_scenario(s)
        self.aggregator = self.options.aggregator
        await self.aggregator.start(self.gateway)
        if self.options.metrics_listen:  # the same endpoint `run` serves ([metrics]), on the bench's gateway
            config = replace(self.config, metrics=replace(self.config.metrics, enabled=True,
                                                          listen=self.options.metrics_listen))
            try:
                self.metrics = integration("metrics", config, self.gateway)
                await self.metrics.start(self.gateway)
            except BaseException:  # a bad or taken address: release the bench before saying so
                self.metrics = None
                await self._teardown()
                raise

    async def _teardown(self) -> None:
        if self.metrics is not None:
            await self.metrics.stop()
        await self.aggregator.stop()
        await self.gateway.inverter.safe_stop()
        self.gateway.flush_journal(final=True)
        await self.gateway.inverter.close()
        await self.server.stop()
        self.assembly.close()
        self.node_bus.shutdown()
        self._journal_lock.close()

    # ------------------------------------------------------------------ the run

    async def run(self) -> Outcome:
        await self._build()
        wall0 = time.perf_counter()
        try:
            await self._loop(wall0)
        finally:
            await self._teardown()
        return self._outcome(time.perf_counter() - wall0)

    async def _loop(self, wall0: float) -> None:
        s = self.scenario
        step_s, poll_s = s.run.step_s, self.config.inverter.poll_interval_s
        timeline = self._timeline()
        # The last step may be shorter, so the run ends exactly at duration_s and nothing scheduled
        # inside it (a fault at 9.95 s of 10 s, 0.3 s a step) is left out.
        steps = math.ceil(s.run.duration_s / step_s - 1e-9)
        next_poll, next_progress = 0.0, 0.0
        await self.gateway.poll_inverter()
        for n in range(1, steps + 1):
            t = min(n * step_s, s.run.duration_s)
            dt, self.t = t - self.t, t
            self._physics(dt)
            while timeline and timeline[0][0] <= self.t + 1e-9:
                await timeline.pop(0)[1]()
            await self.aggregator.step(self.t)
            self.node.emit_due(self.t)
            if self._deliver_frames() is None:
                self.gateway.tick()  # nothing the core decides on changed: time alone is judged
            if self.t + 1e-9 >= next_poll:
                await self.gateway.poll_inverter()
                next_poll = self.t + poll_s
            await self.gateway.write_command()
            self.gateway.flush_journal()
            self._trace_step()
            wall = time.perf_counter()
            if self.options.speed:
                ahead = self.t / self.options.speed - (wall - wall0)
                if ahead > 0:
                    await asyncio.sleep(ahead)
            if self.options.on_progress and wall >= next_progress:
                self.options.on_progress(self)
                next_progress = wall + self.options.progress_every_s

    def _physics(self, dt: float) -> None:
        b = self.battery
        dc = self.model.advance(dt, self.t, b.max_discharge_w if b.contactors_closed else 0.0,
                                b.max_charge_w if b.contactors_closed else 0.0)
        b.step(dt, dc)
        self.model.soc_pct = b.true_soc_pct

    def _deliver_frames(self) -> StepResult | None:
        """Everything the node sent this step reaches the gateway together, as one step of the core."""
        frames = []
        while (msg := self.gateway_bus.recv(timeout=0)) is not None:
            frames.append(msg)
        return self.gateway.on_frames(frames)

    def _timeline(self) -> list[tuple[float, Callable[[], Any]]]:
        """Every scripted action, in time order (dispatch before faults at the same instant)."""
        s, actions = self.scenario, []
        for d in s.dispatch:
            actions.append((d.at_s, 0, lambda d=d: self._send(d)))
        for c in s.cancel:
            actions.append((c.at_s, 1, lambda c=c: self.aggregator.cancel(c.id)))
        for o in s.owner_change:
            actions.append((o.at_s, 2, lambda o=o: self._owner(o)))
        for f in s.fault:
            actions.append((f.at_s, 3, lambda f=f: self._inject(f)))
        return [(at, action) for at, _, action in sorted(actions, key=lambda a: (a[0], a[1]))]

    async def _send(self, d) -> None:
        kind = DispatchKind.CHARGE if d.kind == "charge" else DispatchKind.DISCHARGE
        request = DispatchRequest(d.id, "scenario", kind, d.target_w, d.start_s, d.start_s + d.duration_s,
                                  received_at=self.t, ramp_w_per_s=d.ramp_w_per_s or None)
        self.answers[d.id] = await self.aggregator.send(request)

    async def _owner(self, change) -> None:
        current = self.gateway.owner_settings()
        reserve = current.reserve_pct if change.reserve_pct == NOT_SET else change.reserve_pct
        await self.gateway.set_owner(replace(current, reserve_pct=reserve, received_at=self.t,
                                             opt_out_until=math.inf if change.opt_out else None))

    async def _inject(self, f) -> None:
        until = self.t + f.duration_s
        if f.kind in SCENARIO_INVERTER_FAULTS:
            self.model.inject(SCENARIO_INVERTER_FAULTS[f.kind], until)
        else:
            self.node.inject(f.kind, until, f.message)
        c = self.gateway.controller
        self.faults.append(FaultWatch(f.kind, self.t, c.mode, self.gateway.command.reason, _in_force(c, self.t),
                                      watched_until=until + self._grace_s(f.kind, f.message), ignored=f.ignored))

    def _grace_s(self, kind: str, message: str) -> float:
        """How long after a fault ends the gateway may still rightly react to it: the time it takes to
        judge what the fault touched stale. A BMS field goes stale `TIMEOUT_PERIODS` of its message's
        period after its last frame (bms/reader.py): the silenced message's, else the slowest message's.
        Inverter data is judged stale `inverter_timeout_s` after the last good poll, and a poll
        started just before the fault ended may time out `timeout_s` later."""
        if kind in SCENARIO_INVERTER_FAULTS:
            return self.config.safety.inverter_timeout_s + self.config.inverter.timeout_s
        periods = {m.name: m.cycle_time / 1000.0 for m in self.node.db.messages if m.cycle_time}
        return TIMEOUT_PERIODS * periods.get(message, max(periods.values()))

    # ------------------------------------------------------------------ watching

    def _observe(self, result: StepResult) -> None:
        """Note when each injected fault was noticed and when the inverter became safe."""
        pending = [w for w in self.faults if w.detected_at is None and self.t <= w.watched_until + 1e-9]
        if not pending:
            return
        c = result.controller
        raised = {e.kind.value for e in result.events if isinstance(e, FaultRaised)}
        asked = _in_force(c, self.t)
        for w in pending:
            if raised & RAISABLE[w.kind]:
                w.detected_at = self.t
            elif raised or asked != w.asked:
                # A fault this kind cannot cause, a window opening or closing, a request coming or
                # going: not this fault's doing, so the new baseline.
                w.mode, w.reason, w.asked = c.mode, result.command.reason, asked
            elif c.mode is not w.mode or result.command.reason != w.reason:
                w.detected_at = self.t

    def _watch_safety(self) -> None:
        """Safe means the inverter at 0 W in either direction: charging power is negative, so "at or
        below 0 W" called a fault during a charge event safe while the pack still took 11.5 kW."""
        for w in self.faults:
            if w.safe_at is None and w.detected_at is not None:
                outage_served = w.kind == "grid_outage" and self.gateway.controller.mode is Mode.BACKUP
                if abs(self.model.ac_power_w) <= SAFE_TOLERANCE_W or outage_served:
                    w.safe_at = self.t

    def _trace_step(self) -> None:
        self._watch_safety()
        c, cmd = self.gateway.controller, self.gateway.command
        soc = self.battery.true_soc_pct
        floor = c.floor_pct(self.t)
        self.min_soc = min(self.min_soc, soc)
        key = (c.mode, round(cmd.setpoint_w, 1))
        if key == self._last_trace and self.t + 1e-9 < self._next_trace_t:
            return
        self._last_trace, self._next_trace_t = key, math.floor(self.t + 1e-9) + 1.0
        self.floor_violations += floor_violation(soc, floor, self.model.ac_power_w)
        self.records += 1
        record = {"t": _round(self.t), "state": c.mode.value, "soc_pct": round(soc, 4), "floor_pct": round(floor, 3),
                  "setpoint_w": round(cmd.setpoint_w, 1), "inverter_w": round(self.model.ac_power_w, 1),
                  "bms_max_discharge_w": c.bms.max_discharge_w if c.bms else None,
                  "event_id": self._scenario_id(c.serving_id), "reason": cmd.reason}
        self.options.series.append((self.t, soc, floor, cmd.setpoint_w, self.model.ac_power_w,
                                    1.0 if c.mode is Mode.DISCHARGE else 0.0))
        if self.options.trace is not None:
            self.options.trace.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------------ outcome

    def _scenario_id(self, request_id: str | None) -> str | None:
        """A protocol may name an event its own way (SunSpec sessions): the trace and the summary name it by
        the scenario's id (the trace said `sunspec-2-1` where the summary said `a`)."""
        return getattr(self.aggregator, "request_ids", {}).get(request_id, request_id)

    def _outcome(self, wall_s: float) -> Outcome:
        c = self.gateway.controller
        # Each event by the scenario's id, and the answers that arrived after `send` returned (a SunSpec write
        # at the event's start).
        delivered: dict[str, float] = {}
        for request_id, wh in delivered_wh(c).items():
            name = self._scenario_id(request_id)
            delivered[name] = round(delivered.get(name, 0.0) + wh, 1)
        for event_id, answer in getattr(self.aggregator, "answers", {}).items():
            if self.answers.get(event_id) is None:
                self.answers[event_id] = answer
        answers = {rid: (a.verdict.value if a else None) for rid, a in self.answers.items()}
        summary = {
            "scenario": self.scenario.name,
            "delivered_wh": delivered,
            "min_soc_pct": round(self.min_soc, 3),
            "floor_violations": self.floor_violations,
            "faults": [w.as_dict() for w in self.faults],
            "final_state": c.mode.value,
            "wall_s": round(wall_s, 3),
            "sim_s": self.scenario.run.duration_s,
            "speed_x": round(self.scenario.run.duration_s / wall_s, 1) if wall_s > 0 else None,
            "answers": answers,
            "answer_details": {rid: _answer_dict(a) for rid, a in self.answers.items()},
            "inverter_meter_wh": round(self.model.tot_wh_inj, 1),
            "final_soc_pct": round(self.battery.true_soc_pct, 3),
            "journal": str(self.journal_path),
            "trace_records": self.records,
        }
        return Outcome(summary, self._checks(summary, sum(delivered_wh(c).values())))

    def _checks(self, summary: dict[str, Any], total: float) -> list[tuple[str, bool, str]]:
        """Each `[expect]` judged on the run's own figures, not the summary's rounded ones (a lowest SoC of
        79.9258 % passed `min_soc_pct = 79.926` as the summary's 79.926), and each figure is printed whole, so
        a failed check never reads "79.926 % >= 79.926"; `total` is the energy delivered."""
        e, checks = self.scenario.expect, []
        checks.append(("floor violations", summary["floor_violations"] <= e.max_floor_violations,
                       f"{summary['floor_violations']} (allowed {e.max_floor_violations})"))
        if e.min_delivered_wh != NOT_SET:
            checks.append(("min delivered", total >= e.min_delivered_wh, f"{total!r} Wh >= {e.min_delivered_wh!r}"))
        if e.max_delivered_wh != NOT_SET:
            checks.append(("max delivered", total <= e.max_delivered_wh, f"{total!r} Wh <= {e.max_delivered_wh!r}"))
        if e.min_soc_pct != NOT_SET:
            checks.append(("min SoC", self.min_soc >= e.min_soc_pct, f"{self.min_soc!r} % >= {e.min_soc_pct!r}"))
        if e.final_state:
            checks.append(("final state", summary["final_state"] == e.final_state,
                           f"{summary['final_state']} == {e.final_state}"))
        for event_id, verdict in e.answers.items():
            got = summary["answers"].get(event_id)
            checks.append((f"answer {event_id}", got == verdict, f"{got} == {verdict}"))
        for event_id, reason in e.reasons.items():
            got = (summary["answer_details"].get(event_id) or {}).get("reason")
            checks.append((f"reason {event_id}", got == reason, f"{got} == {reason}"))
        if e.max_safe_after_s != NOT_SET:
            # A fault the gateway never detected fails "made safe" (it missed it), unless the scenario
            # marks it `ignored`: then the check is the opposite, that it was never detected.
            for w, watch in zip(summary["faults"], self.faults, strict=True):
                detected, safe = w["detected_after_s"], w["safe_after_s"]
                if watch.ignored:
                    checks.append((f"{w['kind']} ignored", detected is None,
                                   "never detected" if detected is None else f"detected after {detected} s"))
                else:
                    checks.append((f"{w['kind']} made safe", safe is not None and safe <= e.max_safe_after_s,
                                   f"after {seconds_or_never(safe)} (allowed {e.max_safe_after_s} s)"))
        return checks


BENCH_MARK = RecordKind.BENCH_RUN


def lock_bench_journal(journal: Path) -> JournalLock:
    """Take the exclusive lock a run holds on its journal (`journal/lock.py`), closed to release it.

    Two runs sharing a journal replaced each other's files under an open journal: one crashed,
    the other reported a journal that was no longer its own. InputError (exit 2) when another run
    holds it; never waits."""
    return lock_journal(journal, lambda pid: f"journal {journal} is in use by another run{holder_named(pid)}; "
                                             "give --journal another file")


def _replace_bench_journal(path: Path) -> None:
    """A bench journal is one run's record: replace the last run's, never anything else."""
    check_bench_journal(path)
    journal_files.remove_all(path)  # its anchors and key too: they belong to the run they checkpointed


def check_bench_journal(path: Path) -> None:
    """InputError unless `path` is free for a bench journal: absent, or the journal of an earlier run."""
    if path.exists():
        try:
            with Journal.open(path, readonly=True) as old:
                first = next(old.iter_records(), None)
        except InputError:
            first = None
        if first is None or first.kind != BENCH_MARK:
            raise InputError(f"{path}: exists and is not a bench journal; refusing to overwrite it "
                             "(give --journal a new file)")


def _in_force(c: Controller, now: float) -> str | None:
    entry = c.book.in_force(now)
    return entry.request.id if entry is not None else None


def floor_violation(soc_pct: float, floor_pct: float, inverter_w: float) -> bool:
    """One trace record's share of `floor_violations` (docs/simulator.md): energy left the pack
    (`inverter_w > 0`) while its true SoC was below the floor in force. A truck that starts below
    its floor and stays idle, or charges back up to it, has none."""
    return inverter_w > 0 and soc_pct < floor_pct


def _answer_dict(a: DispatchAnswer | None) -> dict[str, Any] | None:
    if a is None:
        return None
    return {"verdict": a.verdict.value, "cap_w": a.cap_w, "reason": a.reason.value if a.reason else None,
            "detail": a.detail, "text": describe(a)}


def seconds_or_never(x: float | None) -> str:
    """A summary's seconds for people: `never` for null (the gateway never did it)."""
    return "never" if x is None else f"{x} s"


def _round(x: float) -> float:
    return round(x, 3)
