"""The pure controller core: no I/O, no clock, no asyncio (a test enforces it).

`step(controller, inputs, now)` is the whole interface; see README.md here
for the modules and the state diagram.
"""

from firmware_py.core.controller import Controller, StepResult
from firmware_py.core.machine import TRANSITIONS, step
from firmware_py.core.policy import Policy
from firmware_py.core.telemetry import Telemetry, telemetry
from firmware_py.core.types import Mode

__all__ = ["Controller", "Mode", "Policy", "StepResult", "TRANSITIONS", "Telemetry", "step", "telemetry"]
