"""Scenario files (docs/simulator.md): what the bench runs, and what it must show.

Times are seconds of simulated time from the start of the run. A scenario is
checked whole on load, like the config: every unknown key, wrong type or
out-of-range value is reported with the file and key, then exit 2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from itertools import pairwise
from pathlib import Path

from firmware_py.sim.faults import SCENARIO_FAULT_KINDS, BmsFault

from firmware_py.bms.reader import load_dbc
from firmware_py.config import bundled_dbc
from firmware_py.core import Mode
from firmware_py.core.types import ReasonCode, Verdict
from firmware_py.dispatch.openadr3_events import OBJECT_ID
from firmware_py.errors import InputError
from firmware_py.quoting import shown
from firmware_py.schema import given_by_loader, load_table, read_toml, spec

VERDICTS = tuple(v.value for v in Verdict)  # what expect.answers may name
REASONS = tuple(r.value for r in ReasonCode)  # what expect.reasons may name

DEFAULT = "summer-peak.toml"
BENCH_DBC = "cybertruck_bms.dbc"

MAX_RUN_S = 30 * 86_400
"""The longest run, and so the bound of every time in a scenario (times are seconds from its start)."""
NOT_SET = -1
"""The documented "unchanged" / "not checked" value: exactly -1, never any negative (a typo'd sign
would otherwise switch a check off without a word)."""
MAX_ID_CHARS = 200
MAX_STEP_S = 0.25
"""Half the gateway's BMS timeout (0.5 s): the BMS node's frames reach the gateway once a step, and what
comes between two deliveries (a dispatch, a tick) must find them fresh. At 0.6 s every dispatch was
refused NO_DATA and the gateway faulted bms_stale with nothing injected."""


@dataclass(frozen=True)
class RunSection:
    duration_s: float = spec(18_000, lo=1, hi=MAX_RUN_S)
    step_s: float = spec(0.1, lo=0.01, hi=MAX_STEP_S, doc="simulated time per bench step")
    seed: int = spec(0, lo=0, hi=2**31)
    start_hour: float = spec(15.0, lo=0, hi=24, doc="time of day at t=0, for the home-load profile")


@dataclass(frozen=True)
class VehicleSection:
    initial_soc_pct: float = spec(80, lo=0, hi=100)
    usable_capacity_wh: float = spec(123_000, lo=1_000, hi=300_000)
    ambient_c: float = spec(25, lo=-40, hi=55)


@dataclass(frozen=True)
class OwnerSection:
    reserve_pct: float = spec(40, lo=0, hi=100)


@dataclass(frozen=True)
class AggregatorSection:
    kind: str = spec("scripted", choices=("scripted", "openadr", "openadr3", "sunspec"))
    revert_s: int = spec(60, lo=0, hi=3_600, doc="sunspec: the site controller's WSetRvrtTms, refreshed every "
                                                 "third of it; 0: written without the revert function")


@dataclass(frozen=True)
class InverterSection:
    """The simulated inverter's IEEE 1547 enter-service settings (model 703)."""

    enter_service_delay_s: float = spec(300, lo=0, hi=3_600, doc="ESDlyTms: no power after a grid return")
    enter_service_ramp_s: float = spec(300, lo=0, hi=3_600, doc="ESRmpTms: then a ramp to the full rating")


@dataclass(frozen=True)
class Dispatch:
    at_s: float = spec(..., lo=0, hi=MAX_RUN_S)
    id: str = spec(...)
    start_s: float = spec(..., lo=0, hi=MAX_RUN_S)
    duration_s: float = spec(..., lo=1, hi=MAX_RUN_S)
    target_w: float = spec(..., lo=1, hi=1_000_000)
    kind: str = spec("discharge", choices=("discharge", "charge"))
    ramp_w_per_s: float = spec(0, lo=0, hi=1_000_000, doc="0: the gateway's own ramp")


@dataclass(frozen=True)
class Cancel:
    at_s: float = spec(..., lo=0, hi=MAX_RUN_S)
    id: str = spec(...)


@dataclass(frozen=True)
class OwnerChange:
    at_s: float = spec(..., lo=0, hi=MAX_RUN_S)
    reserve_pct: float = spec(NOT_SET, lo=0, hi=100, unset=NOT_SET, doc="-1: unchanged")
    opt_out: bool = spec(False)


@dataclass(frozen=True)
class Fault:
    at_s: float = spec(..., lo=0, hi=MAX_RUN_S)
    kind: str = spec(..., choices=SCENARIO_FAULT_KINDS)
    duration_s: float = spec(5, lo=0.01, hi=86_400)
    message: str = spec("", doc="message_silence only: the DBC message that goes silent")
    ignored: bool = spec(False, doc="the gateway should not react to it: max_safe_after_s checks it went undetected")


@dataclass(frozen=True)
class Expect:
    min_delivered_wh: float = spec(NOT_SET, lo=0, hi=1e9, unset=NOT_SET, doc="-1: not checked; all events together")
    max_delivered_wh: float = spec(NOT_SET, lo=0, hi=1e9, unset=NOT_SET)
    max_floor_violations: int = spec(0, lo=0, hi=10**9)
    min_soc_pct: float = spec(NOT_SET, lo=0, hi=100, unset=NOT_SET)
    final_state: str = spec("", choices=("", *(m.value for m in Mode)))
    max_safe_after_s: float = spec(NOT_SET, lo=0, hi=MAX_RUN_S, unset=NOT_SET, doc="every fault: inverter at 0 W (or backup) within this")
    answers: dict[str, str] = spec({}, doc="event id -> accepted | accepted_capped | rejected")
    reasons: dict[str, str] = spec({}, doc="event id -> the reason code its refusal must carry")


@dataclass(frozen=True)
class Scenario:
    run: RunSection = field(default_factory=RunSection)
    vehicle: VehicleSection = field(default_factory=VehicleSection)
    owner: OwnerSection = field(default_factory=OwnerSection)
    aggregator: AggregatorSection = field(default_factory=AggregatorSection)
    inverter: InverterSection = field(default_factory=InverterSection)
    dispatch: tuple[Dispatch, ...] = ()
    cancel: tuple[Cancel, ...] = ()
    owner_change: tuple[OwnerChange, ...] = ()
    fault: tuple[Fault, ...] = ()
    expect: Expect = field(default_factory=Expect)
    name: str = given_by_loader("scenario")  # the file's name


@cache
def bundled_dbc_messages() -> tuple[str, ...]:
    """The messages the bench's BMS sends, which a `message_silence` fault may name."""
    return tuple(m.name for m in load_dbc(bundled_dbc(BENCH_DBC)).messages)


def bundled(name: str = DEFAULT) -> Path:
    return Path(str(resources.files("firmware_py.sim.scenarios").joinpath(name)))


def bundled_names() -> list[str]:
    return sorted(p.name for p in resources.files("firmware_py.sim.scenarios").iterdir() if p.name.endswith(".toml"))


def find(given: str | None) -> Path:
    """The scenario a command line names: a file, else a bundled scenario by its name (with or
    without `.toml`); none given: the default one. A name found nowhere is returned as a path,
    for `load` to say it cannot be read."""
    if given is None:
        return bundled()
    path = Path(given)
    if path.exists() or path.suffix == ".toml" and path.parent != Path("."):
        return path
    name = given if given.endswith(".toml") else f"{given}.toml"
    return bundled(name) if name in bundled_names() else path


def load(path: str | Path) -> Scenario:
    path = Path(path)
    table = read_toml(path, "scenario")
    if not table:  # an empty or truncated file: a run of nothing but defaults would pass for the one meant
        raise InputError(f"{path}: the scenario is empty; give at least [run] duration_s (and the [vehicle], "
                         "[owner], [[dispatch]] and [[fault]] it needs)")
    problems: list[str] = []
    scenario = load_table(Scenario, table, "", path.parent, problems)
    if not problems:
        problems += _cross_checks(scenario)
    if problems:
        raise InputError([f"{path}: {p}" for p in problems])
    return Scenario(**{**scenario.__dict__, "name": path.stem})


def _overlapping_setpoints(dispatch: tuple[Dispatch, ...]) -> list[str]:
    """A SunSpec site controller holds one setpoint at a time: the end of one window would end the
    other's too (WSetEna = 0), and the DER would serve both as one request."""
    problems = []
    ordered = sorted(enumerate(dispatch), key=lambda item: item[1].start_s)
    for (i, a), (j, b) in pairwise(ordered):
        if b.start_s < a.start_s + a.duration_s:
            problems.append(f"dispatch[{j}]: its window overlaps dispatch[{i}]'s; a SunSpec aggregator holds one "
                            "setpoint at a time (use kind \"openadr3\" or \"scripted\" for overlapping events)")
    return problems


XML_MARKUP = "&<>\"'"
"""Characters XML must escape."""


def _cross_checks(s: Scenario) -> list[str]:
    """What no single key can say: ids unique, times inside the run, answers naming events."""
    problems = []
    for name, actions in (("dispatch", s.dispatch), ("fault", s.fault), ("cancel", s.cancel),
                          ("owner_change", s.owner_change)):
        problems += [f"{name}[{i}].at_s: {a.at_s} is after the run ends ({s.run.duration_s} s)"
                     for i, a in enumerate(actions) if a.at_s >= s.run.duration_s]
    problems += [f"dispatch[{i}].start_s: {d.start_s} is at or after the run's end ({s.run.duration_s} s)"
                 for i, d in enumerate(s.dispatch) if d.start_s >= s.run.duration_s]
    ids = [d.id for d in s.dispatch]
    for dup in sorted({i for i in ids if ids.count(i) > 1}):
        problems.append(f"dispatch: id {dup!r} used twice")
    for i, d in enumerate(s.dispatch):
        if not d.id.strip() or len(d.id) > MAX_ID_CHARS or not d.id.isprintable():
            problems.append(f"dispatch[{i}].id: {shown(d.id)}: expected 1 to {MAX_ID_CHARS} printable characters")
        elif s.aggregator.kind == "openadr3" and not OBJECT_ID.fullmatch(d.id):
            problems.append(f"dispatch[{i}].id: {shown(d.id)} cannot be an OpenADR 3 event id (1 to 128 letters, "
                            "digits, '_' or '-'), which [aggregator] kind \"openadr3\" publishes it as")
        elif s.aggregator.kind == "openadr" and (marks := sorted(set(d.id) & set(XML_MARKUP))):
            problems.append(f"dispatch[{i}].id: {shown(d.id)} holds {' '.join(marks)}, which the bench's OpenADR "
                            "2.0b VTN (openleadr) puts into its XML unescaped: the event never reaches the gateway")
        if d.kind == "charge" and s.aggregator.kind == "openadr":
            problems.append(f"dispatch[{i}].kind: 'charge' cannot be sent by OpenADR 2.0b (its LOAD_DISPATCH asks "
                            "for discharge only): set [aggregator] kind to \"sunspec\", \"openadr3\" or \"scripted\"")
    messages = bundled_dbc_messages()
    for i, f in enumerate(s.fault):
        if (f.kind == BmsFault.MESSAGE_SILENCE) != bool(f.message):
            problems.append(f"fault[{i}].message: give it exactly for kind message_silence")
        elif f.message and f.message not in messages:
            problems.append(f"fault[{i}].message: {shown(f.message)} is not a message of the bench's DBC "
                            f"(one of: {', '.join(messages)})")
    problems += _overlapping_faults(s.fault, s.run.step_s)
    if s.aggregator.kind == "sunspec":
        problems += _overlapping_setpoints(s.dispatch)
    sent_at = {d.id: d.at_s for d in s.dispatch}
    for i, c in enumerate(s.cancel):
        if c.id not in ids:
            problems.append(f"cancel[{i}].id: no dispatch has id {c.id!r}")
        elif c.at_s < sent_at[c.id]:
            problems.append(f"cancel[{i}].at_s: {c.at_s} is before dispatch {c.id!r} is sent ({sent_at[c.id]} s)")
    for event_id, verdict in s.expect.answers.items():
        if event_id not in ids:
            problems.append(f"expect.answers.{event_id}: no dispatch has that id")
        if verdict not in VERDICTS:
            problems.append(f"expect.answers.{event_id}: {verdict!r} is not {', '.join(VERDICTS[:-1])} "
                            f"or {VERDICTS[-1]}")
    for event_id, reason in s.expect.reasons.items():
        if event_id not in ids:
            problems.append(f"expect.reasons.{event_id}: no dispatch has that id")
        if reason not in REASONS:
            problems.append(f"expect.reasons.{event_id}: {reason!r} is not a reason code ({', '.join(REASONS)})")
    return problems + _contradictory_bounds(s.expect)


def _contradictory_bounds(expect: Expect) -> list[str]:
    """A lower bound above its upper bound is a check no run can pass: every run then failed (exit 1),
    blamed on the gateway, when the scenario was what was wrong. `[expect]` has one such pair."""
    low, high = expect.min_delivered_wh, expect.max_delivered_wh
    if low != NOT_SET and high != NOT_SET and low > high:
        return [f"expect.min_delivered_wh ({low:g}) is above expect.max_delivered_wh ({high:g}): "
                "no run can pass both"]
    return []


def _overlapping_faults(faults: tuple[Fault, ...], step_s: float) -> list[str]:
    """A fault of a kind already injected would replace the first one's end (and, for a silenced
    message, the message), cutting it short while the summary still listed both: refused instead.
    Judged at the instants the bench injects them, the end of the step each falls in: two faults
    apart in the file may still start in the same step."""
    problems, ends = [], {}
    for i, f in sorted(enumerate(faults), key=lambda item: item[1].at_s):
        earlier, start = ends.get(f.kind), injected_at(f.at_s, step_s)
        if earlier is not None and start < earlier[1]:
            stepped = "" if abs(start - f.at_s) < 1e-9 else f" (injected with the step ending at {start:g} s)"
            problems.append(f"fault[{i}]: a {f.kind} at {f.at_s:g} s{stepped} while fault[{earlier[0]}] of the same "
                            f"kind lasts to {earlier[1]:g} s: one at a time (lengthen the first instead)")
        ends[f.kind] = (i, start + f.duration_s)
    return problems


def injected_at(at_s: float, step_s: float) -> float:
    """When the bench acts on something scripted at `at_s`: at the end of the step it falls in
    (`Simulation` steps to n × step_s for n from 1, acting on all that is due by then)."""
    return max(1, math.ceil((at_s - 1e-9) / step_s)) * step_s
