"""The pace of polling a peer: a steady beat, and a break for a peer slower than the beat."""

from __future__ import annotations

import pytest

from firmware_py.links import Backoff, next_poll_in


def test_a_quick_poll_keeps_the_beat_counted_from_its_start():
    assert next_poll_in(began=10.0, ended=10.02, interval_s=0.5) == pytest.approx(0.48)


def test_a_peer_slower_than_the_beat_gets_half_an_interval_of_rest():
    assert next_poll_in(began=10.0, ended=10.8, interval_s=0.5) == pytest.approx(0.25)
    assert next_poll_in(began=10.0, ended=10.3, interval_s=0.5) == pytest.approx(0.25)  # the rest decides


def test_back_off_doubles_to_its_ceiling_and_a_success_restores_the_pace():
    backoff = Backoff(ceiling_s=4.0)
    assert [backoff.next(1.0) for _ in range(5)] == [1.0, 2.0, 4.0, 4.0, 4.0]
    backoff.reset()
    assert backoff.next(1.0) == 1.0
