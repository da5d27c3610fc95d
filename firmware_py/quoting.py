"""How text that came from outside is quoted back to people.

Event ids from a VTN, keys and values from a config file, names in a DBC: any of
them may be huge, hold control characters that rewrite a terminal, or look like
rich markup. Every message, table and log line that repeats such text quotes it
through here, so it arrives readable, bounded and inert.
"""

from __future__ import annotations

from typing import Any

SHOWN_CHARS = 60
"""How much of a rejected value a message repeats: enough to recognise it, never a 4,000-digit wall."""


def shown(value: Any) -> str:
    """`repr(value)` cut to a readable length, for messages about bad input."""
    return shown_text(repr(value))


def shown_text(text: str, limit: int = SHOWN_CHARS) -> str:
    """`text` cut to `limit` characters, saying how long it was."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def out_of_range(value: Any, lo: float, hi: float, also: str = "") -> str:
    """"V is out of range (LO to HI)": the one wording of every range refusal (config, owner CLI, web, MQTT,
    settings file). The value exactly as it came (1000001, not `:g`'s 1e+06, which reads as the limit
    itself), the limits as the docs write them (1 to 1,000,000)."""
    return f"{_exact(value)} is out of range ({limit_text(lo)} to {limit_text(hi)}{also})"


def limit_text(x: float) -> str:
    """A limit as people read it: whole numbers whole, grouped by thousands from 10,000 (0 to 1000,
    1 to 1,000,000), others as Python writes them exactly (0.01, inf)."""
    if isinstance(x, float) and not x.is_integer():
        return repr(x)
    whole = int(x)
    return f"{whole:,}" if abs(whole) >= 10_000 else str(whole)


def _exact(value: Any) -> str:
    """A refused value exactly: a whole float without its ".0" (1000001 as typed), else `shown`."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return shown(value)


def without_query(url: str) -> str:
    """A URL as it may be printed or logged: a query (an endpoint's parameters, which may be a credential)
    hidden, the rest as it is."""
    base, query = url.split("?", 1) if "?" in url else (url, None)
    return base if query is None else f"{base}?(query hidden)"


def printable(text: str) -> str:
    """`text` with every control character written as an escape (\\x1b, \\n), safe for a terminal or a log."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
