"""Shared test set-up: hypothesis profiles and where the shared fixtures live."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, settings

from firmware_py import http_listener
from firmware_py.narration import QUIETED

ROOT = Path(__file__).resolve().parents[1]
SHARED_FIXTURES = ROOT.parent / "shared" / "fixtures"

settings.register_profile("ci", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=10_000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=50, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
FAST_TIER = "not slow"


def pytest_configure(config: pytest.Config) -> None:
    """The fast tier (`-m "not slow"`, run while working) draws 50 examples per property instead of 200:
    a quarter of the drawing for the same properties; the whole suite (CI) draws 200. HYPOTHESIS_PROFILE
    chooses otherwise for either."""
    if "HYPOTHESIS_PROFILE" not in os.environ and config.getoption("markexpr", "").strip() == FAST_TIER:
        settings.load_profile("dev")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked `first` go to the front, in their order (the rest keep theirs). Under xdist each worker
    runs the front of its share itself while the others take from its back: a long test in the middle of
    the share of the worker running the bench's scenarios started about 220 s in and ended the suite
    alone 20 s after every other worker had finished."""
    items.sort(key=lambda item: item.get_closest_marker("first") is None)


@pytest.fixture
def tesla_capture():
    """Path to a real Model 3 capture in ../shared/fixtures, or a clear skip."""

    def find(name: str) -> Path:
        path = SHARED_FIXTURES / "tesla-model3-2025" / name
        if not path.exists():
            pytest.skip(f"real CAN capture {path} is absent (it lives in ../shared/fixtures beside the project)")
        return path

    return find


@pytest.fixture(autouse=True)
def _root_logging_restored():
    """A command run in-process (`main([...])`) sets up logging on the stderr pytest captured for
    that test; later tests must not log into that closed stream, so the root logger is put back, and
    the libraries' levels it set (a test's outcome depended on which tests its worker had run before)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    quieted = {name: logging.getLogger(name).level for name in QUIETED}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, before in quieted.items():
        logging.getLogger(name).setLevel(before)
    http_listener.REFUSED_REQUESTS.__init__()  # its window of refusals said one by one starts afresh


@pytest.fixture
def local_zone() -> Iterator[Callable[[str], ZoneInfo]]:
    """Sets the process's local time zone for one test (`TZ`, then `time.tzset()`), as on a gateway
    configured in that zone, and puts the one before back after it. Returns the zone, for expected values."""
    before = os.environ.get("TZ")

    def use(name: str) -> ZoneInfo:
        os.environ["TZ"] = name
        time.tzset()
        return ZoneInfo(name)

    yield use
    if before is None:
        os.environ.pop("TZ", None)
    else:
        os.environ["TZ"] = before
    time.tzset()
