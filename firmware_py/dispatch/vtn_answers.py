"""A VTN's answer, read with a cap on its size (both OpenADR VENs).

What an aggregator answers one residential VEN is kilobytes. A VTN, or anything posing as one,
that sends without end must fail that one exchange, not fill the memory the gateway runs in.
"""

from __future__ import annotations

import aiohttp

MAX_ANSWER_BYTES = 4 * 1024 * 1024


class AnswerTooLarge(Exception):
    """The answer passed its cap; the connection is closed, nothing more of it is read."""


async def read_capped(response: aiohttp.ClientResponse, limit: int | None = None) -> bytes:
    """The whole body of `response`, or AnswerTooLarge as soon as it passes `limit` bytes (None:
    `MAX_ANSWER_BYTES`, read at each call)."""
    limit = MAX_ANSWER_BYTES if limit is None else limit
    chunks, size = [], 0
    async for chunk in response.content.iter_any():
        size += len(chunk)
        if size > limit:
            response.close()
            raise AnswerTooLarge(f"{response.method} {response.url.path}: the answer is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
