"""`StandingWatch`: which gateway steps call for a look at standing settings. A grid outage ending and
the inverter's enter-service delay running out clear what refused a standing setting without changing
any setting, so they count too (else an OpenADR event waits for the VEN's own wall-clock tick)."""

from __future__ import annotations

from core_builders import bms, inverter, ready

from firmware_py.core import step
from firmware_py.dispatch.standing import StandingLooks, StandingWatch


def test_the_watch_notices_the_outage_and_the_enter_service_delay_ending():
    watch = StandingWatch()
    c = ready(0.0, soc=80.0)
    r = step(c, [bms(1.0), inverter(1.0, grid_outage=True)], 1.0)
    watch.changed(r)
    r = step(r.controller, [bms(2.0), inverter(2.0, grid_outage=True)], 2.0)
    assert not watch.changed(r), "nothing that admits dispatch moved"
    r = step(r.controller, [bms(3.0), inverter(3.0, enter_service_s=10.0)], 3.0)
    assert watch.changed(r), "the outage ended: the enter-service delay refuses now"
    r = step(r.controller, [bms(4.0), inverter(4.0, enter_service_s=9.0)], 4.0)
    assert not watch.changed(r), "the delay still runs"
    r = step(r.controller, [bms(5.0), inverter(5.0, enter_service_s=0.0)], 5.0)
    assert watch.changed(r), "the delay ran out: nothing refuses any more"
    r = step(r.controller, [bms(6.0), inverter(6.0)], 6.0)
    assert not watch.changed(r)


def test_looks_are_pending_until_a_look_covering_them_is_done():
    looks = StandingLooks()
    assert not looks.pending
    looks.ask()
    covered = looks.begin()
    looks.ask()  # asked while the look runs: not covered by it
    looks.done(covered)
    assert looks.pending
    looks.done(looks.begin())
    assert not looks.pending
