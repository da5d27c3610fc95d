"""`Controller.evolve`, the core's fast copy, builds exactly what `dataclasses.replace` builds."""

from __future__ import annotations

from dataclasses import fields, replace

import pytest

from core_builders import POLICY, bms, discharge, inverter
from firmware_py.core import Controller, Mode, step


def _running() -> Controller:
    c = Controller.start(POLICY, now=0.0)
    c = step(c, [bms(0.0), inverter(0.0)], 0.0).controller
    return step(c, [discharge("e1", 1.0, 1.0, 100.0)], 1.0).controller


def test_a_controller_is_exactly_its_fields():
    """`evolve` copies the instance dict: nothing but the fields may live there."""
    c = _running()
    assert set(vars(c)) == {f.name for f in fields(Controller)}


@pytest.mark.parametrize("changes", [
    {}, {"mode": Mode.FAULT}, {"setpoint_w": 5_000.0, "reason": "r", "last_step_at": 2.0},
    {"bms": bms(3.0, soc=55.0), "bms_seen": True, "peak_since_bms_w": 0.0},
])
def test_evolve_equals_replace(changes):
    c = _running()
    evolved = c.evolve(**changes)
    assert evolved == replace(c, **changes) and type(evolved) is Controller
    assert vars(evolved) == vars(replace(c, **changes))
    assert evolved is not c and vars(c) == vars(_running())  # the original is untouched


def test_evolve_refuses_an_unknown_field_like_replace():
    with pytest.raises(TypeError, match="setpoint"):
        _running().evolve(setpoint=1.0)
    with pytest.raises(AttributeError):
        _running().evolve().mode = Mode.FAULT  # still frozen
