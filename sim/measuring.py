"""What every benchmark shares: how latencies are summed up, the saturated bus's rate, and
finding a SunSpec model the way an aggregator's client would (walking the chain, not assuming)."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Collection
from typing import Any

import can

from firmware_py.inverter.sunspec import DEFAULT_BASE, END_MODEL_ID, SUNS_MARKER


class BenchmarkFailed(RuntimeError):
    """A benchmark could not measure what it promised (a peer that never came up, a wait that ran out):
    `bench` says it on stderr, with a failed peer's last words where it has them, and exits 1, since a figure
    half measured would be a wrong one."""


BUS_FRAMES_PER_S = 3_704
"""A 500 kbit/s bus at its worst case: 8-byte standard frames back to back (the bus-load benchmark's)."""


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    ordered = sorted(samples_ms)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"n": len(ordered), "p50_ms": round(statistics.median(ordered), 3), "p99_ms": round(pick(0.99), 3),
            "max_ms": round(ordered[-1], 3)}


async def find_model(client: Any, model_id: int) -> int:
    """The address of SunSpec model `model_id` on a pymodbus client's device (unit 1)."""
    addr = DEFAULT_BASE + len(SUNS_MARKER)
    for _ in range(64):
        head = await client.read_holding_registers(addr, count=2, device_id=1)
        mid, length = head.registers
        if mid == model_id:
            return addr
        if mid == END_MODEL_ID:
            break
        addr += 2 + length
    raise BenchmarkFailed(f"benchmark: SunSpec model {model_id} not found")


def signed(raw: int) -> int:
    """A register's int16 (SunSpec scale factors are signed)."""
    return raw - 0x10000 if raw & 0x8000 else raw


def flood(bus: can.BusABC, per_s: float, bms_ids: Collection[int], stopping: Callable[[], bool],
          sent: Callable[[int], None]) -> None:
    """Frames no BMS sends (other ids, random payloads) on `bus` at `per_s` until `stopping()`: the
    saturated bus of the loaded benchmarks. `sent` is told the running count every 256 frames and at
    the end, whatever ended it."""
    rng, ids = random.Random(3), [i for i in range(0x100, 0x7FF) if i not in bms_ids]
    begin, n = time.perf_counter(), 0
    try:
        while not stopping():
            if (lag := begin + n / per_s - time.perf_counter()) > 0.002:
                time.sleep(lag)
            bus.send(can.Message(arbitration_id=rng.choice(ids), data=rng.randbytes(8), is_extended_id=False))
            n += 1
            if n % 256 == 0:
                sent(n)
    finally:
        sent(n)
