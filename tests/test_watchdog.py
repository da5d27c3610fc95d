"""The watchdog's decision on an injected clock: a ping only while every watched task finishes its rounds."""

from __future__ import annotations

import logging

import pytest

from firmware_py.watchdog import Watchdog


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_pings_while_every_task_finishes_rounds_within_its_longest_round_and_the_margin(clock: Clock):
    sent: list[str] = []
    dog = Watchdog(clock, sent.append, hung_after_s=30)
    tick, poll = dog.expect("tick", 0.1), dog.expect("poll", 2.0)
    for _ in range(10):
        clock.now += 20.0  # each round slow, none hung: 20 s < 30 s + its longest round
        tick()
        poll()
        assert dog.ping()
    assert sent == ["WATCHDOG=1"] * 10


def test_a_task_that_ends_no_round_withholds_the_ping_and_says_once_which_and_since_when(clock: Clock, caplog):
    sent: list[str] = []
    dog = Watchdog(clock, sent.append, hung_after_s=30)
    dog.expect("poll", 2.0)  # it never finishes a round
    tick = dog.expect("tick", 0.1)
    clock.now += 32.0
    tick()
    assert dog.ping()  # 32 s is within poll's 2 s + 30 s
    clock.now += 0.5
    with caplog.at_level(logging.WARNING, logger="firmware_py.watchdog"):
        tick()
        assert not dog.ping()
        clock.now += 5
        tick()
        assert not dog.ping()
    assert sent == ["WATCHDOG=1"]
    assert dog.hung() == {"poll": pytest.approx(37.5)}
    critical = [r for r in caplog.records if r.levelno == logging.CRITICAL]
    assert len(critical) == 1 and "poll has finished no round for 32 s" in critical[0].getMessage()


def test_a_round_that_ends_after_all_was_slow_not_hung_and_the_pings_resume(clock: Clock, caplog):
    sent: list[str] = []
    dog = Watchdog(clock, sent.append, hung_after_s=30)
    journal = dog.expect("journal", 5.0)
    clock.now += 36.0
    with caplog.at_level(logging.WARNING, logger="firmware_py.watchdog"):
        assert not dog.ping()
        journal()
        assert dog.ping() and dog.ping()
    assert sent == ["WATCHDOG=1"] * 2
    assert [r.levelno for r in caplog.records] == [logging.CRITICAL, logging.WARNING]
    assert "pings resume" in caplog.records[1].getMessage()
