"""SIMPLE levels, the one mapping OpenADR 2.0b and OpenADR 3 share (docs/dispatch.md).

Both versions send a bare level 0-3 rather than a power: 0 is "normal
operation" (no dispatch), and 1, 2, 3 are asks of rising strength that the
owner's configuration turns into a share of the gateway's rating
(`[dispatch.openadr] simple_levels_pct`, default 33 %, 66 %, 100 %). Kept in
one place so the two VENs can never disagree about what a level means.
"""

from __future__ import annotations

from collections.abc import Sequence

LEVELS = (0, 1, 2, 3)
DEFAULT_LEVELS_PCT = (33.0, 66.0, 100.0)


def level_target_w(level: float, rating_w: float, levels_pct: Sequence[float]) -> float:
    """The discharge target (W) a SIMPLE level asks for; ValueError naming what is wrong."""
    if isinstance(level, bool) or level not in LEVELS:
        raise ValueError(f"SIMPLE level must be 0, 1, 2 or 3, got {level!r}")
    return 0.0 if level == 0 else rating_w * float(levels_pct[int(level) - 1]) / 100.0


def check_levels(levels: Sequence[object], key: str) -> list[str]:
    """Why a configured list of shares cannot serve as the SIMPLE mapping, or nothing."""
    if len(levels) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 100
                                   for v in levels):
        return [f"{key}: three shares 0-100 for SIMPLE levels 1, 2, 3, got {list(levels)!r}"]
    return []
