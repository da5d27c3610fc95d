"""The state-of-charge floor and how much power it still allows.

All reserve decisions use the BMS's conservative SoC (SoC min): a BMS promises
the true SoC is at least that, so stopping at the floor by SoC min can never
leave the true SoC below it.
"""

from __future__ import annotations

import math
from dataclasses import replace

from firmware_py.core.policy import Policy
from firmware_py.core.types import OwnerSettings

# Discharge starts only this far above the floor, so SoC noise at the floor
# cannot toggle the mode every frame.
ENTRY_HYSTERESIS_PCT = 0.5


def departure_requirement_pct(policy: Policy, owner: OwnerSettings, at: float) -> float:
    """SoC needed at `at` so that charging until departure still reaches the target.

    The requirement climbs linearly toward the departure target, at the rate the
    house can recharge the truck, so the floor rises ahead of departure instead
    of jumping at the last minute.
    """
    if owner.departure_at is None or owner.departure_soc_pct is None or at > owner.departure_at:
        return 0.0
    recharge_pct = policy.departure_charge_w * (owner.departure_at - at) / 3600 / policy.usable_capacity_wh * 100
    return max(0.0, owner.departure_soc_pct - recharge_pct)


def floor_pct(policy: Policy, owner: OwnerSettings, at: float, outage: bool = False) -> float:
    """The lowest SoC-min the pack may reach at `at`, margin included.

    In a grid outage the house may use the pack down to the backup floor (the
    owner's reserve yields to keeping the lights on), never below the hard minimum:
    a storm watch kept that energy for exactly this moment, so it yields too.
    """
    base = max(policy.backup_floor_pct if outage else owner.reserve_pct, policy.hard_min_soc_pct)
    if not outage:
        base = max(base, departure_requirement_pct(policy, owner, at), owner.storm_watch(at) or 0.0)
    return min(100.0, base + policy.soc_margin_pct)


def storm_watch_binds(policy: Policy, owner: OwnerSettings, at: float) -> bool:
    """Whether the storm watch, and nothing else, holds the floor where it is at `at` (grid up)."""
    if owner.storm_watch(at) is None:
        return False
    without = floor_pct(policy, replace(owner, storm_watch_floor_pct=None, storm_watch_until=None), at)
    return floor_pct(policy, owner, at) > without


def energy_above_wh(policy: Policy, soc_min_pct: float, floor: float) -> float:
    """AC energy the pack can still deliver before SoC min reaches the floor."""
    return max(0.0, (soc_min_pct - floor) / 100 * policy.usable_capacity_wh * policy.dc_efficiency)


def stopping_energy_wh(power_w: float, ramp_w_per_s: float) -> float:
    """Energy used while ramping from `power_w` to 0 at `ramp_w_per_s`: P²/2r."""
    return power_w * power_w / (2 * ramp_w_per_s) / 3600


def discharge_envelope_w(policy: Policy, energy_wh: float) -> float:
    """The most discharge power that can still stop in time above the floor.

    Two bounds: ramping down at r from P uses P²/2r, so P ≤ √(2·r·E); and a
    setpoint may run unrefreshed for the command horizon before the inverter
    reverts, so P·horizon ≤ E. The first makes power ramp down smoothly as the
    floor nears; the second keeps a dying gateway from overshooting.
    """
    energy_j = max(0.0, energy_wh) * 3600
    return min(math.sqrt(2 * policy.ramp_w_per_s * energy_j), energy_j / policy.command_horizon_s)


def envelope_takes_over_wh(policy: Policy, power_w: float) -> float:
    """The energy above the floor at which the envelope starts to cut `power_w`: the inverse of
    `discharge_envelope_w`, max(P²/2r, P·horizon) (in Wh)."""
    power_w = max(0.0, power_w)
    return max(power_w * power_w / (2 * policy.ramp_w_per_s), power_w * policy.command_horizon_s) / 3600
