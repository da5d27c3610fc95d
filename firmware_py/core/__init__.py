"""The pure controller core: no I/O, no clock, no asyncio (a test enforces it).

`step(controller, inputs, now)` is the whole interface; see README.md here
for the state diagram.
"""

from firmware_py.core.machine import TRANSITIONS, Controller, Mode, StepResult, step
from firmware_py.core.policy import Policy

__all__ = ["Controller", "Mode", "Policy", "StepResult", "TRANSITIONS", "step"]
