"""Price-responsive mode end to end: a price program on the bench OpenADR 3 VTN, the gateway's real
OpenADR 3 VEN, the real gateway on the in-process bench (virtual CAN bus, the simulated inverter over
Modbus TCP, a SQLite journal).

One run, two published EXPORT_PRICE events: the first below the owner's threshold (refused, the truck
stays at 0 W), the second above it (discharged for until its interval ends, the energy credited in the
statement at the published price). The VTN hears the gateway's answer to each.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import timedelta

import pytest
from firmware_py.sim import scenario
from firmware_py.sim.aggregators import OpenAdr3Aggregator
from firmware_py.sim.simulation import Simulation, SimulationOptions
from test_statements import make

from firmware_py.core.types import DispatchAnswer, PriceKind, ReasonCode, Verdict
from firmware_py.dispatch.openadr3_events import price_id
from firmware_py.gateway import Gateway

THRESHOLD = 0.30
LOW = ("tou-low", 0.20, 20.0, 40.0)  # (event id, price per kWh, start s, duration s)
HIGH = ("tou-high", 0.55, 80.0, 40.0)


class PriceProgram(OpenAdr3Aggregator):
    """The bench OpenADR 3 aggregator publishing a time-of-use program's export prices, one event per
    price, each a few seconds before its interval, with the owner's price mode on."""

    def __init__(self, prices: list[tuple[str, float, float, float]]) -> None:
        super().__init__()
        self.prices = sorted(prices, key=lambda p: p[2])
        self.setpoints: list[tuple[float, float]] = []

    async def start(self, gateway: Gateway) -> None:
        await super().start(gateway)
        self.gateway = gateway
        await gateway.set_owner(replace(gateway.owner_settings(), received_at=gateway.now(),
                                        price_threshold_per_kwh=THRESHOLD, price_max_wh_per_day=10_000.0))

    async def step(self, t: float) -> None:
        await super().step(t)
        while self.prices and self.prices[0][2] - 5.0 <= t:
            event_id, price, start, duration = self.prices.pop(0)
            assert self.vtn is not None
            self.vtn.add_event(self.program_id, "EXPORT_PRICE", self.t0 + timedelta(seconds=start), duration, price,
                               event_id=event_id, units="KWH", currency="USD", report_every=-1)
            self.ven.wake()
            key = price_id(event_id, 0, PriceKind.EXPORT_PRICE)
            await self._wait(lambda key=key, event_id=event_id: key in self.sink.answers
                             and self.vtn.answers_for(event_id), f"the answer to price event {event_id}")
        self.setpoints.append((t, self.gateway.command.setpoint_w))

    def answer(self, event_id: str) -> DispatchAnswer | None:
        return self.sink.answers.get(price_id(event_id, 0, PriceKind.EXPORT_PRICE))

    def commanded(self, lo: float, hi: float) -> set[float]:
        return {w for t, w in self.setpoints if lo <= t < hi}


@pytest.fixture(scope="module")
def priced(tmp_path_factory):
    folder = tmp_path_factory.mktemp("price-program")
    path = folder / "scenario.toml"
    path.write_text("[run]\nduration_s = 140\nstep_s = 0.2\n[vehicle]\ninitial_soc_pct = 80\n"
                    "[owner]\nreserve_pct = 30\n")
    program = PriceProgram([LOW, HIGH])
    journal = folder / "journal.sqlite"
    asyncio.run(Simulation(scenario.load(path), SimulationOptions(journal_path=journal, aggregator=program)).run())
    return program, journal


def test_a_published_price_below_the_threshold_is_refused_and_the_truck_stays_at_zero(priced):
    program, _ = priced
    low = program.answer(LOW[0])
    assert low is not None and (low.verdict, low.reason) == (Verdict.REJECTED, ReasonCode.BELOW_THRESHOLD)
    assert program.commanded(LOW[2], LOW[2] + LOW[3]) == {0.0}
    assert program.vtn is not None and program.vtn.answers_for(LOW[0]) == ["refused"]


def test_a_published_price_above_the_threshold_is_discharged_for_during_its_interval(priced):
    program, _ = priced
    high = program.answer(HIGH[0])
    assert high is not None and high.verdict is Verdict.ACCEPTED
    assert program.vtn is not None and program.vtn.answers_for(HIGH[0]) == ["accepted"]
    assert max(program.commanded(HIGH[2] + 5, HIGH[2] + HIGH[3])) > 0  # ramped up, serving the price
    assert program.commanded(HIGH[2] + HIGH[3] + 1, 140) == {0.0}  # and stopped when its interval ended
    assert program.commanded(0, HIGH[2]) == {0.0}


def test_the_statement_credits_the_price_event_at_the_price_the_vtn_published(priced, tmp_path):
    _, journal = priced
    config = tmp_path / "gateway.toml"
    config.write_text(f'[journal]\npath = "{journal}"\n[program]\nname = "Time of use"\ncurrency = "USD"\n'
                      "credit_per_kwh = 1.0\n")
    lines = {line["id"]: line for line in make(journal, tmp_path / "s.json", config=config)["events"]}
    high = lines[price_id(HIGH[0], 0, PriceKind.EXPORT_PRICE)]
    assert high["credited_wh"] > 0 and high["credit"] == round(high["credited_wh"] / 1000 * HIGH[1], 2)
    assert lines[price_id(LOW[0], 0, PriceKind.EXPORT_PRICE)]["credit"] == 0
