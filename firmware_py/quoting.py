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


def printable(text: str) -> str:
    """`text` with every control character written as an escape (\\x1b, \\n), safe for a terminal or a log."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
