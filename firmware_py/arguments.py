"""Command-line numbers, refused at the door when they make no sense.

`type=float` takes `nan`, `inf` and any sign: a `--load-w nan` would then run a
pack model into NaN, a `--soak-hours 0` fail after minutes with a traceback. Every
numeric option of the commands goes through these instead, so argparse names the
option and the range it wants, and exits 2 before anything starts.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from firmware_py.quoting import shown_text


def number(lo: float, hi: float, *, above: bool = False) -> Callable[[str], float]:
    """A finite number from `lo` (exclusive when `above`) to `hi`."""
    wanted = f"a number above {lo:g}, at most {hi:g}" if above else f"a number from {lo:g} to {hi:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {shown_text(text)}") from None
        low_ok = value > lo if above else value >= lo
        if not (math.isfinite(value) and low_ok and value <= hi):
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {shown_text(text)}")
        return value

    return parse


def whole(lo: int, hi: int) -> Callable[[str], int]:
    """A whole number from `lo` to `hi`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number from {lo} to {hi}, "
                                             f"got {shown_text(text)}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"expected a whole number from {lo} to {hi}, got {value}")
        return value

    return parse
