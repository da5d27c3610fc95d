"""Shared test set-up: hypothesis profiles and where the shared fixtures live."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

ROOT = Path(__file__).resolve().parents[1]
SHARED_FIXTURES = ROOT.parent / "shared" / "fixtures"

settings.register_profile("ci", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=10_000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=50, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def tesla_capture():
    """Path to a real Model 3 capture in ../shared/fixtures, or a clear skip."""

    def find(name: str) -> Path:
        path = SHARED_FIXTURES / "tesla-model3-2025" / name
        if not path.exists():
            pytest.skip(f"real CAN capture {path} is absent (it lives in ../shared/fixtures beside the project)")
        return path

    return find
