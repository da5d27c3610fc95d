"""Price-responsive mode through the real gateway: published prices submitted to `Gateway.submit`
on the in-process bench (a real virtual CAN bus and BMS node, the simulated inverter behind a real
Modbus TCP server, a real SQLite journal), then the journal, a replay and a statement read back.

One run shows both cases and the budget: a price below the owner's threshold (refused, 0 W), then
one above it (discharged for) until the day's budget is spent, well before its interval ends; the
same interval's import price, published beside it under the same id, is refused as not followed.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from core_builders import bms, inverter
from firmware_py.sim import scenario
from firmware_py.sim.simulation import Simulation, SimulationOptions
from test_bench import replayed_and_journaled
from test_statements import make

from firmware_py.assembly import assemble
from firmware_py.clocks import Clocks
from firmware_py.config import Config
from firmware_py.core.types import (
    DispatchAnswer,
    DispatchRequest,
    EventEnergy,
    OwnerSettings,
    PriceInterval,
    PriceKind,
    ReasonCode,
    Verdict,
)
from firmware_py.gateway import Gateway
from firmware_py.journal import Journal, RecordKind

THRESHOLD = 0.30
BUDGET_WH = 60.0  # at 11.5 kW: about 20 s of discharge, then the budget's ramp-down
LOW = PriceInterval("tou/low", "oadr3", "tou", PriceKind.EXPORT_PRICE, 0.20, 5.0, 30.0, received_at=2.0)
HIGH = PriceInterval("tou/high", "oadr3", "tou", PriceKind.EXPORT_PRICE, 0.55, 30.0, 150.0, received_at=28.0)
HIGH_IMPORT = replace(HIGH, kind=PriceKind.PRICE, price_per_kwh=0.25)  # the same interval's import price


class PricePublisher:
    """A program that publishes prices: the owner's price settings at the start, then each interval
    handed to `Gateway.submit` at its time, as the OpenADR 3 VEN hands them over. It records what
    the gateway commanded at every bench step."""

    def __init__(self, prices: list[PriceInterval]):
        self.prices = sorted(prices, key=lambda p: p.received_at)
        self.answers: dict[tuple[str, PriceKind], DispatchAnswer | None] = {}
        self.setpoints: list[tuple[float, float]] = []

    async def start(self, gateway: Gateway) -> None:
        self.gateway = gateway
        await gateway.set_owner(replace(gateway.owner_settings(), received_at=gateway.now(),
                                        price_threshold_per_kwh=THRESHOLD, price_max_wh_per_day=BUDGET_WH))

    async def send(self, request: DispatchRequest) -> DispatchAnswer | None:
        return await self.gateway.submit(request)

    async def cancel(self, event_id: str) -> None:
        raise AssertionError("this program cancels nothing")

    async def step(self, t: float) -> None:
        while self.prices and self.prices[0].received_at <= t + 1e-9:
            price = self.prices.pop(0)
            self.answers[price.id, price.kind] = await self.gateway.submit(replace(price, received_at=t))
        self.setpoints.append((t, self.gateway.command.setpoint_w))

    async def stop(self) -> None:
        pass

    def commanded(self, lo: float, hi: float) -> list[float]:
        return [w for t, w in self.setpoints if lo <= t < hi]


@pytest.fixture(scope="module")
def priced_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prices")
    path = folder / "scenario.toml"
    path.write_text('[run]\nduration_s = 160\nstep_s = 0.2\n[vehicle]\ninitial_soc_pct = 80\n[owner]\nreserve_pct = 30\n')
    publisher = PricePublisher([LOW, HIGH, HIGH_IMPORT])
    journal = folder / "journal.sqlite"
    asyncio.run(Simulation(scenario.load(path), SimulationOptions(journal_path=journal, aggregator=publisher)).run())
    return publisher, journal, folder


def records(journal: Path, kind: RecordKind) -> list[dict]:
    with Journal.open(journal, readonly=True) as opened:
        return [r.payload for r in opened.records(kind)]


def test_a_price_below_the_threshold_is_refused_and_the_truck_stays_at_zero(priced_run):
    publisher, _, _ = priced_run
    low = publisher.answers[LOW.id, LOW.kind]
    assert (low.verdict, low.reason) == (Verdict.REJECTED, ReasonCode.BELOW_THRESHOLD)
    assert "0.2 per kWh is below the owner's threshold 0.3" in low.detail
    assert set(publisher.commanded(LOW.start, LOW.end)) == {0.0}


def test_a_price_above_the_threshold_discharges_until_the_day_budget_is_spent(priced_run):
    publisher, journal, _ = priced_run
    high = publisher.answers[HIGH.id, HIGH.kind]
    assert publisher.answers[HIGH.id, PriceKind.PRICE].reason is ReasonCode.PRICE_KIND
    assert high.verdict is Verdict.ACCEPTED and "0.55 per kWh meets the threshold 0.3" in high.detail
    assert max(publisher.commanded(HIGH.start, HIGH.start + 20)) == 11_500
    (ended,) = [e for e in records(journal, RecordKind.DISPATCH_ENDED) if e["request_id"] == HIGH.id]
    assert ended["reason"].startswith("daily price budget spent")
    final = [e for e in records(journal, RecordKind.EVENT_ENERGY) if e["request_id"] == HIGH.id and e["final"]][-1]
    assert BUDGET_WH - 5 <= final["meter_wh"] <= BUDGET_WH + 1.0  # the meter counts whole Wh
    stopped_at = max(t for t, w in publisher.setpoints if w > 0)
    assert stopped_at < HIGH.end - 30  # mid-interval: the budget, not the interval, ended it
    assert set(publisher.commanded(stopped_at + 1, HIGH.end)) == {0.0}


def test_the_journal_holds_each_price_and_its_one_answer_and_replays(priced_run):
    _, journal, _ = priced_run
    prices = records(journal, RecordKind.PRICE_INTERVAL)
    assert [(p["id"], p["kind"], p["price_per_kwh"]) for p in prices] == [
        (LOW.id, "EXPORT_PRICE", 0.20), (HIGH.id, "EXPORT_PRICE", 0.55), (HIGH.id, "PRICE", 0.25)]
    answers = [(a["request_id"], a["verdict"], a["reason"]) for a in records(journal, RecordKind.DISPATCH_ANSWER)]
    assert answers == [(LOW.id, "rejected", "BELOW_THRESHOLD"), (HIGH.id, "accepted", None),
                       (HIGH.id, "rejected", "PRICE_KIND_NOT_FOLLOWED")]
    steps, replayed, decided = replayed_and_journaled(journal)
    assert steps > 700 and replayed == decided


def test_the_statement_credits_the_price_event_at_its_published_price(priced_run, tmp_path):
    _, journal, _ = priced_run
    config = tmp_path / "gateway.toml"
    config.write_text(f'[journal]\npath = "{journal}"\n[program]\nname = "Time of use"\ncurrency = "USD"\n'
                      'credit_per_kwh = 1.0\nwear_cost_per_kwh = 0.0\n')
    statement = make(journal, tmp_path / "s.json", config=config)
    lines = {line["id"]: line for line in statement["events"]}
    high, low = lines[HIGH.id], lines[LOW.id]
    assert high["answer"] == "accepted" and high["credited_wh"] > 0  # the import price beside it changes nothing
    assert high["credit"] == round(high["credited_wh"] / 1000 * 0.55, 2)  # not the program's 1.0 per kWh
    assert any("published EXPORT_PRICE of 0.55 per kWh" in note for note in high["notes"])
    assert low["status"] == "refused" and low["credit"] == 0


def test_a_restart_counts_what_the_journal_says_today_already_spent(tmp_path):
    """The core has no memory across a restart: the gateway reads today's price-driven energy
    back from the journal, so the owner's daily maximum is not granted twice."""
    path = tmp_path / "journal.sqlite"
    with Journal.open(path) as journal:  # what the run before spent today, on one price event
        journal.append_event(replace(HIGH, received_at=10.0), wall=10.0)
        journal.append_event(DispatchAnswer.accepted(HIGH.id, 10.0), wall=10.0)
        journal.append_event(EventEnergy(70.0, HIGH.id, 40.0, 41.5, True), wall=70.0)
        journal.append_event(EventEnergy(80.0, "agg-1", 500.0, 500.0, True), wall=80.0)  # not price-driven
    clock = [500.0]
    owner = OwnerSettings(40, 0.0, price_threshold_per_kwh=THRESHOLD, price_max_wh_per_day=BUDGET_WH)
    assembly = assemble(replace(Config(), journal=replace(Config().journal, path=str(path)),
                                can=replace(Config().can, interface="virtual", channel=f"prices-{path}")),
                        lambda: clock[0], owner=owner)
    try:
        gateway = assembly.gateway
        gateway.feed(bms(500.0), inverter(500.0))
        assert gateway.controller.price_day_wh == 41.5  # the larger of the event's meter and integrated
        clock[0] = 501.0
        later = PriceInterval("tou/later", "oadr3", "tou", PriceKind.EXPORT_PRICE, 0.9, 501.0, 900.0, 501.0)
        answer = gateway.feed(bms(501.0), inverter(501.0), later).answer_for("tou/later")
        assert answer.verdict is Verdict.ACCEPTED and f"{BUDGET_WH - 41.5:.0f} Wh of the day's" in answer.detail
    finally:
        assembly.close()


def test_a_restart_after_a_crash_counts_what_the_meter_ran_on_after_the_last_report(tmp_path):
    """A crash mid price event: the last report said 40 Wh, then the inverter's meter ran on 150 Wh before
    the setpoint reverted. The start-up reads the inverter (a step, which reads the day's spending) and
    then bills that gap to the event: the budget counts the 190 Wh, not the 40 Wh read before it."""
    path = tmp_path / "journal.sqlite"
    meter = 1_000_000.0
    with Journal.open(path) as journal:
        journal.append_event(replace(HIGH, received_at=10.0), wall=10.0)
        journal.append_event(DispatchAnswer.accepted(HIGH.id, 10.0), wall=10.0)
        journal.append_event(EventEnergy(70.0, HIGH.id, 40.0, 40.0, False, meter_total_wh=meter + 40), wall=70.0)
    assembly = restarted(path, lambda: 130.0, 1000.0)
    try:
        gateway = assembly.gateway
        first = inverter(130.0, tot_wh_inj=meter + 190)
        gateway.feed(first)  # as the service starts: the inverter read first,
        assert gateway.close_open_events(first.tot_wh_inj) == [HIGH.id]  # then the crash's events closed
        gateway.feed(bms(130.0), first)
        assert gateway.controller.price_day_wh == 190.0
    finally:
        assembly.close()


def journal_spent_on_price(path: Path, start: float, end: float, wh: float) -> None:
    """What the run before a restart spent on one price event between wall instants `start` and `end`."""
    price = PriceInterval("tou/spent", "oadr3", "tou", PriceKind.EXPORT_PRICE, 0.55, start, start + 3600, start)
    with Journal.open(path) as journal:
        journal.append_event(price, wall=start)
        journal.append_event(DispatchAnswer.accepted(price.id, start), wall=start)
        journal.append_event(EventEnergy(end, price.id, wh, wh, True), wall=end)


def restarted(path: Path, clocks: Clocks | Callable[[], float], budget_wh: float):
    """The gateway assembled again on the journal at `path`, the owner's price budget `budget_wh` a day."""
    owner = OwnerSettings(40, 0.0, price_threshold_per_kwh=THRESHOLD, price_max_wh_per_day=budget_wh)
    return assemble(replace(Config(), journal=replace(Config().journal, path=str(path)),
                            can=replace(Config().can, interface="virtual", channel=f"prices-{path}")),
                    clocks, owner=owner)


def test_a_restart_on_the_fall_back_day_counts_what_was_spent_in_its_first_hour(tmp_path, local_zone):
    """Berlin's 26 October 2025 begins at 00:00+02:00 and lasts 25 h: energy spent at 00:30 that
    night is today's when the gateway restarts at noon (CET), not yesterday's."""
    berlin = local_zone("Europe/Berlin")
    path = tmp_path / "journal.sqlite"
    journal_spent_on_price(path, dt.datetime(2025, 10, 26, 0, 30, tzinfo=berlin).timestamp(),
                           dt.datetime(2025, 10, 26, 0, 50, tzinfo=berlin).timestamp(), 5000.0)
    noon = dt.datetime(2025, 10, 26, 12, 0, tzinfo=berlin).timestamp()
    assembly = restarted(path, lambda: noon, 5000.0)
    try:
        assembly.gateway.feed(bms(noon), inverter(noon))
        assert (assembly.gateway.controller.day, assembly.gateway.controller.price_day_wh) == ("2025-10-26", 5000.0)
    finally:
        assembly.close()


def test_a_restart_with_a_wrong_wall_clock_counts_the_corrected_dates_spending_once_ntp_steps_it(
        tmp_path, local_zone):
    """A board without RTC boots on 9 June 23:50 when it is 10 June 12:00, after 5 kWh spent on price
    events that morning: once NTP steps the wall clock, the next tick counts by 10 June and what the
    journal holds for it, not by a fresh 0 Wh (the day's budget would be granted again)."""
    utc = local_zone("UTC")
    path = tmp_path / "journal.sqlite"
    journal_spent_on_price(path, dt.datetime(2025, 6, 10, 9, 0, tzinfo=utc).timestamp(),
                           dt.datetime(2025, 6, 10, 10, 0, tzinfo=utc).timestamp(), 5000.0)
    monotonic, offset = [100.0], [dt.datetime(2025, 6, 9, 23, 50, tzinfo=utc).timestamp() - 100.0]
    assembly = restarted(path, Clocks(lambda: monotonic[0], lambda: monotonic[0] + offset[0]), 5000.0)
    try:
        gateway = assembly.gateway
        gateway.feed(bms(monotonic[0]), inverter(monotonic[0]))
        assert gateway.controller.day == "2025-06-09"
        offset[0] = dt.datetime(2025, 6, 10, 12, 0, tzinfo=utc).timestamp() - 101.0  # NTP steps the wall clock
        monotonic[0] = 101.0
        gateway.tick()
        assert (gateway.controller.day, gateway.controller.price_day_wh) == ("2025-06-10", 5000.0)
    finally:
        assembly.close()
