"""A VTN's answer is read whole up to its cap, and not a byte further (both OpenADR VENs read through it)."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web

from firmware_py.dispatch.vtn_answers import AnswerTooLarge, read_capped

BODY = bytes(range(256)) * 400  # 100 KiB


async def answered(limit: int) -> bytes:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)  # chunked, no length announced
        for start in range(0, len(BODY), 8192):
            await response.write(BODY[start:start + 8192])
        return response

    app = web.Application()
    app.router.add_get("/events", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{runner.addresses[0][1]}/events") as response:
                return await read_capped(response, limit)
    finally:
        await runner.cleanup()


def test_an_answer_within_the_cap_is_read_whole():
    assert asyncio.run(answered(len(BODY))) == BODY


def test_an_answer_past_the_cap_fails_naming_the_request_and_the_cap():
    with pytest.raises(AnswerTooLarge, match=r"GET /events: the answer is larger than 65536 bytes"):
        asyncio.run(answered(65_536))
