"""Which simulated aggregator a scenario talks through.

`scripted` hands requests straight to the gateway's dispatch interface; the
protocol aggregators (OpenADR VTN, SunSpec client) are added by issue 6's bench work.
"""

from __future__ import annotations

from firmware_py.errors import InputError
from sim.bench import Aggregator, ScriptedAggregator


def for_scenario(scenario) -> Aggregator:
    kind = scenario.aggregator.kind
    if kind == "scripted":
        return ScriptedAggregator()
    raise InputError(f"scenario {scenario.name}: aggregator.kind = {kind!r} is not available yet")
