"""Replaying a run: the same steps, the same decisions.

Everything that decides is in the core and time is an input, so feeding a
journal's recorded steps back through `step` must give back every answer,
transition, fault and energy record the gateway journaled, bit for bit. That is
what makes the journal evidence and a field problem reproducible on a desk.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from firmware_py.core.machine import Controller, StepResult, step
from firmware_py.core.types import Input


def replay(controller: Controller, steps: Iterable[tuple[float, Iterable[Input]]]) -> Iterator[StepResult]:
    """Step `controller` through `steps` ((now, inputs) each), yielding each step's result."""
    for now, inputs in steps:
        result = step(controller, inputs, now)
        controller = result.controller
        yield result
