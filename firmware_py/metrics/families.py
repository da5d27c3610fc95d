"""What `/metrics` shows: the gateway read when scraped, as Prometheus metric families.

Most values are read, not counted: the mode, SoC, floor and power from the core's read
model (`Telemetry`), each link from the link book, CAN frames from the BMS reader's
own counters, Modbus errors from the inverter client's, energy from the inverter's
meters and the request book (`core.tally`). Reading them costs the control path
nothing; the scrape does the work.

Two things only the running gateway can count are kept here:
- the reaction time, BMS frame to inverter write, as a histogram (the gateway
  measures it: `Gateway.reaction_observers`);
- the dispatch answers by verdict, and the rejections by reason (an observer of the
  gateway's steps that looks only at the events a step produced).

Every name starts with `powershare_`; units are in the names (`_watts`,
`_watt_hours`, `_seconds`, `_percent`), counters end in `_total`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from firmware_py.core import StepResult
from firmware_py.core.tally import Tally, tallied
from firmware_py.core.telemetry import Telemetry
from firmware_py.core.types import DispatchAnswer, Mode, Verdict
from firmware_py.inverter.client import ModbusErrorCause
from firmware_py.status import CORE_LINKS

if TYPE_CHECKING:
    from firmware_py.gateway import Gateway

PREFIX = "powershare"
REACTION_BUCKETS_S = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
"""Around the 2 ms target (the README's Performance section), out to the 1 s a cycle-based controller would take."""


class AnswerCounts:
    """Dispatch answers by verdict and rejections by reason: an observer of the gateway's steps.

    A step that answered nothing (nearly all of them) costs one look at an empty list.
    """

    def __init__(self) -> None:
        self.verdicts: Counter[Verdict] = Counter({verdict: 0 for verdict in Verdict})
        self.reasons: Counter[str] = Counter()

    def __call__(self, result: StepResult) -> None:
        for event in result.events:
            if isinstance(event, DispatchAnswer):
                self.verdicts[event.verdict] += 1
                if event.verdict is Verdict.REJECTED:
                    self.reasons[event.reason.value if event.reason is not None else "unknown"] += 1


class GatewayMetrics:
    """The metric families of one gateway; `collect` is what a scrape asks for."""

    def __init__(self, gateway: Gateway, version: str) -> None:
        self.gateway = gateway
        self.version = version
        self.reaction = Histogram(f"{PREFIX}_reaction_seconds",
                                  "BMS frame decoded (a snapshot that changed the setpoint) to the inverter "
                                  "write acknowledged", buckets=REACTION_BUCKETS_S, registry=None)
        self.answers = AnswerCounts()
        self.tally = Tally()
        gateway.reaction_observers.append(self.reaction.observe)
        gateway.observers.append(self.answers)

    def collect(self) -> list[Metric]:
        """Every family as of now (called on the event loop: reads only, no I/O)."""
        t = self.gateway.telemetry()
        return [*self._state(t), *self._links(), *self._frames(), *self._modbus(), *self._dispatch(),
                *self._energy(t), *self.reaction.collect()]

    def _state(self, t: Telemetry) -> Iterator[Metric]:
        yield _gauge("build_info", "The gateway's software version (always 1)", 1, {"version": self.version})
        mode = GaugeMetricFamily(f"{PREFIX}_mode", "The controller's mode: 1 for the mode it is in",
                                 labels=["mode"])
        for m in Mode:
            mode.add_metric([m.value], 1.0 if m is t.mode else 0.0)
        yield mode
        if t.soc_pct is not None:
            yield _gauge("soc_percent", "State of charge the reserve is judged on (the BMS's SoC min)", t.soc_pct)
        yield _gauge("floor_percent", "The floor in force: reserve, departure, storm watch or outage, plus margin",
                     t.floor_pct)
        if t.reserve_pct is not None:
            yield _gauge("reserve_percent", "The owner's reserve", t.reserve_pct)
        yield _gauge("setpoint_watts", "The setpoint commanded (positive: discharge)", t.setpoint_w)
        yield _gauge("power_watts", "AC power measured at the inverter (positive: discharge); the last good reading "
                                    "while its data is not fresh", t.shown_power_w)
        yield _gauge("journal_ok", "1 while the journal writes, 0 while it fails (dispatch is refused)",
                     1.0 if t.journal_ok else 0.0)
        faults = GaugeMetricFamily(f"{PREFIX}_fault_active", "1 for each latched fault", labels=["kind"])
        for kind in t.faults:
            faults.add_metric([str(kind)], 1.0)
        yield faults

    def _links(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(f"{PREFIX}_link_up", "1 when the link delivers, 0 when it is lost", labels=["link"])
        age = GaugeMetricFamily(f"{PREFIX}_link_age_seconds", "Age of the link's last good data", labels=["link"])
        links = {name: {"ok": False, "age_s": None} for name in CORE_LINKS}
        links.update(self.gateway.links.view(self.gateway.now()))
        for name, link in links.items():
            up.add_metric([name], 1.0 if link["ok"] else 0.0)
            if link.get("age_s") is not None:
                age.add_metric([name], link["age_s"])
        yield up
        yield age

    def _frames(self) -> Iterator[Metric]:
        accepted, dropped = self.gateway.reader.frame_counts()
        yield _counter("can_frames_accepted", "BMS frames decoded and believed", accepted)
        by_reason = CounterMetricFamily(f"{PREFIX}_can_frames_dropped", "BMS frames refused, by reason",
                                        labels=["reason"])
        for reason, count in sorted(dropped.items()):
            by_reason.add_metric([reason], count)
        yield by_reason

    def _modbus(self) -> Iterator[Metric]:
        inverter = self.gateway.inverter
        errors = CounterMetricFamily(f"{PREFIX}_modbus_errors", "Failed exchanges with the inverter, by cause",
                                     labels=["cause"])
        for cause in ModbusErrorCause:
            errors.add_metric([cause.value], inverter.errors[cause])
        yield errors
        yield _counter("inverter_writes", "Command blocks (model 704) written to the inverter", inverter.writes)

    def _dispatch(self) -> Iterator[Metric]:
        verdicts = CounterMetricFamily(f"{PREFIX}_dispatch_answers", "Dispatch answers, by verdict",
                                       labels=["verdict"])
        for verdict, count in self.answers.verdicts.items():
            verdicts.add_metric([verdict.value], count)
        yield verdicts
        reasons = CounterMetricFamily(f"{PREFIX}_dispatch_rejections", "Rejected dispatch requests, by reason",
                                      labels=["reason"])
        for reason, count in sorted(self.answers.reasons.items()):
            reasons.add_metric([reason], count)
        yield reasons

    def _energy(self, t: Telemetry) -> Iterator[Metric]:
        self.tally = tallied(self.tally, self.gateway.controller)
        yield _counter("delivered_energy_watt_hours", "Dispatch energy delivered (the inverter's meter) since the "
                       "gateway started", self.tally.total_wh)
        yield _gauge("available_energy_watt_hours", "Energy above the floor now", t.available_wh)
        if t.meter_wh is not None:
            yield _gauge("event_delivered_watt_hours", "Energy delivered so far to the event being served",
                         t.meter_wh)
        if t.inverter_meters_wh is not None:
            injected, absorbed = t.inverter_meters_wh
            yield _counter("inverter_injected_watt_hours", "The inverter's lifetime meter: energy to the AC side "
                           "(TotWhInj)", injected)
            yield _counter("inverter_absorbed_watt_hours", "The inverter's lifetime meter: energy from the AC side "
                           "(TotWhAbs)", absorbed)


def _gauge(name: str, doc: str, value: float, labels: dict[str, str] | None = None) -> GaugeMetricFamily:
    family = GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=list(labels) if labels else None)
    family.add_metric(list(labels.values()) if labels else [], value)
    return family


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)
