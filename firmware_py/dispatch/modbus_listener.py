"""The DER server's Modbus TCP transport: pymodbus' listener, with connections framed by us.

pymodbus' `ModbusTcpServer` accepts connections and hands each one a request
handler. Here the handler (`Connection`) keeps pymodbus' plumbing (transport,
listener bookkeeping, sending) but frames the byte stream itself
(`modbus_frames`) and hands each request to a `Gate`, the DER server, which
decides whether the connection may stay, answers requests and counts refusals.
The listener (`Listener`) lets a bind failure's reason reach the caller.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from pymodbus.pdu import ModbusPDU
from pymodbus.server import ModbusTcpServer
from pymodbus.server.requesthandler import ServerRequestHandler
from pymodbus.simulator import SimDevice

from firmware_py.dispatch.connections import ConnectionTable
from firmware_py.dispatch.modbus_frames import (
    MAX_LENGTH,
    Frame,
    FramingError,
    split_frame,
)

BUFFER_LIMIT = 4 * (6 + MAX_LENGTH)  # unanswered bytes held per connection before it stops being read


class Gate(Protocol):
    """What a connection asks of the server it belongs to."""

    connections: ConnectionTable
    monotonic: Callable[[], float]

    def admit(self, connection: Connection) -> bool:
        """Whether a new connection may stay (a refused one is closed at once)."""

    def framing_error(self, client: str, reason: str) -> None:
        """The byte stream is not Modbus TCP (the connection closes)."""

    async def answer(self, frame: Frame, client: str) -> ModbusPDU:
        """The reply to one request."""


class Connection(ServerRequestHandler):
    """One client connection. Its bytes are framed here (`modbus_frames`), not by pymodbus, and
    its requests are answered one at a time, in order, by the gate.

    The server stops reading a connection that sends faster than it reads its replies (its
    unanswered bytes beyond `BUFFER_LIMIT`, or the transport's write buffer full), so neither
    side's buffer grows without bound; the request timeout then closes it.
    """

    def __init__(self, listener: Listener) -> None:
        super().__init__(listener, None, None, None)
        self.gate = listener.gate
        self.client = "unknown"
        self._buffer = bytearray()
        self._start = 0  # where the next unanswered request begins in `_buffer`
        self._busy = self._dropped = self._write_paused = self._read_paused = False
        self._task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        name = transport.get_extra_info("peername")
        self.client = str(name[0]) if name else "unknown"
        if not self.gate.admit(self):
            self.drop()

    def callback_disconnected(self, exc: Exception | None) -> None:
        super().callback_disconnected(exc)
        self.gate.connections.release(self)

    def drop(self) -> None:
        """Close at once (over a cap, overdue, or not speaking Modbus TCP); unsent replies are discarded."""
        if self._dropped:
            return
        self._dropped = True
        self.gate.connections.release(self)
        if self.transport is not None:
            self.transport.abort()
        self.close()

    def data_received(self, data: bytes) -> None:
        if self._dropped:
            return
        self.gate.connections.received(self, self.gate.monotonic())
        self._buffer += data
        if self._unanswered() > BUFFER_LIMIT and not self._read_paused:
            self._read_paused = True
            self.transport.pause_reading()  # type: ignore[attr-defined]
        self._serve_soon()

    def pause_writing(self) -> None:
        self._write_paused = True
        self.gate.connections.replies_unread(self, True)

    def resume_writing(self) -> None:
        self._write_paused = False
        self.gate.connections.replies_unread(self, False)
        self._serve_soon()

    def _serve_soon(self) -> None:
        if not self._busy and not self._write_paused and not self._dropped:
            self._busy = True
            self._task = asyncio.ensure_future(self._serve())

    def _unanswered(self) -> int:
        return len(self._buffer) - self._start

    def _open(self) -> bool:
        return not self._dropped and not self.is_closing and self.transport is not None

    async def _serve(self) -> None:
        """Answer every whole request in the buffer, in order."""
        try:
            while self._open() and not self._write_paused:
                try:
                    frame, used = split_frame(self._buffer, self._start)
                except FramingError as err:
                    self.gate.framing_error(self.client, str(err))
                    self.drop()
                    return
                if frame is None:
                    break
                self._start += used
                response = await self.gate.answer(frame, self.client)
                if not self._open():
                    return
                self.pdu_send(response)
                self.gate.connections.answered(self, self.gate.monotonic(), pending=self._unanswered() > 0)
            del self._buffer[:self._start]  # once per batch, not per request
            self._start = 0
            if self._read_paused and self._unanswered() <= BUFFER_LIMIT and self._open():
                self._read_paused = False
                self.transport.resume_reading()  # type: ignore[attr-defined]
        finally:
            self._busy = False


class Listener(ModbusTcpServer):
    """ModbusTcpServer whose connections are `Connection`s, and whose bind failure says why."""

    def __init__(self, gate: Gate, devices: list[SimDevice], address: tuple[str, int]) -> None:
        super().__init__(devices, address=address, ignore_missing_devices=False)
        self.gate = gate

    def callback_new_connection(self) -> Connection:
        return Connection(self)

    async def listen(self) -> bool:
        """Bind; an OSError (address in use, not ours) reaches the caller with its reason, where
        pymodbus' own `listen` would log it and return False."""
        self.is_closing = False
        self.is_listener = True
        self.transport = await self.call_create()
        return True
