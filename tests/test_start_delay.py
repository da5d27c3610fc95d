"""The delay a VEN starts a randomised event with: within the window, the same on every reading of
the event, and spread across gateways."""

from __future__ import annotations

import statistics

import pytest

from firmware_py.dispatch.start_delay import start_delay_s


def test_the_delay_is_within_the_window_and_the_same_each_time_the_event_is_read():
    delay = start_delay_s("truck-1", "peak-7", 600.0)
    assert 0 <= delay < 600 and start_delay_s("truck-1", "peak-7", 600.0) == delay


@pytest.mark.parametrize("window", [0.0, -5.0, float("nan")])
def test_no_window_is_no_delay(window):
    assert start_delay_s("truck-1", "peak-7", window) == 0.0


def test_gateways_spread_one_event_evenly_over_its_window():
    """What randomisation is for: a thousand trucks do not step onto the grid in the same second."""
    fractions = [start_delay_s(f"truck-{n}", "peak-7", 600.0) / 600.0 for n in range(1_000)]
    assert len(set(fractions)) == 1_000
    assert min(fractions) < 0.01 and max(fractions) > 0.99
    assert statistics.mean(fractions) == pytest.approx(0.5, abs=0.03)
    assert sum(f < 0.5 for f in fractions) == pytest.approx(500, abs=50)


def test_one_gateway_draws_anew_for_each_event():
    assert len({start_delay_s("truck-1", f"peak-{n}", 600.0) for n in range(100)}) == 100
