"""Modbus TCP requests as the DER server accepts them: framing, and only the functions SunSpec needs.

pymodbus' server decodes every function it knows (diagnostics, report server id,
file and FIFO records, ...) and answers a request it cannot decode with a
malformed exception (function code 0x80). The DER server needs three functions:
read holding registers (3), write single register (6) and write multiple
registers (16). So the server splits the byte stream into frames here and
decodes each request strictly:

- a frame whose MBAP header is impossible (protocol id not 0, length outside
  2..254) cannot be answered or resynchronised on a TCP stream: `FramingError`,
  and the connection is closed;
- any other function, including the ones pymodbus would serve: `Refused` with
  ILLEGAL_FUNCTION;
- a served function with a bad length or count: `Refused` with ILLEGAL_VALUE (the
  Modbus specification's exception 3), or ILLEGAL_ADDRESS when address + count
  runs past register 65535;
- a valid request: pymodbus' own request object, which the server executes
  against its datastore.

The limits are the Modbus Application Protocol's: 1..125 registers per read,
1..123 per write, byte count = 2 × count.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pymodbus.constants import ExcCodes
from pymodbus.pdu import ModbusPDU
from pymodbus.pdu.register_message import (
    ReadHoldingRegistersRequest,
    WriteMultipleRegistersRequest,
    WriteSingleRegisterRequest,
)

from firmware_py.dispatch.refusals import Cause

READ_HOLDING, WRITE_SINGLE, WRITE_MULTIPLE = 3, 6, 16
SERVED_FUNCTIONS = frozenset({READ_HOLDING, WRITE_SINGLE, WRITE_MULTIPLE})
MAX_READ_COUNT, MAX_WRITE_COUNT = 125, 123
MBAP_BYTES = 7  # transaction id, protocol id, length, unit id
MAX_LENGTH = 254  # the MBAP length field: unit id + PDU (at most 253 bytes)
REGISTER_SPACE = 65_536


class FramingError(Exception):
    """The byte stream is not Modbus TCP: nothing can be answered, the connection must close."""


@dataclass(frozen=True)
class Frame:
    """One Modbus TCP request: its MBAP fields and the PDU (function code first)."""

    transaction: int
    unit: int
    pdu: bytes


@dataclass(frozen=True)
class Refused:
    """A request refused before it reached the datastore, with the exception to answer."""

    function: int
    exception: ExcCodes
    cause: Cause
    reason: str
    address: int | None = None
    count: int | None = None


def split_frame(buffer: bytes | bytearray, start: int = 0) -> tuple[Frame | None, int]:
    """The first whole frame in `buffer` from `start`, and the bytes it used; (None, 0) while more
    is needed. (An offset rather than a slice: one read may hold thousands of small frames.)

    FramingError when the header cannot be Modbus TCP.
    """
    if len(buffer) - start < MBAP_BYTES:
        return None, 0
    transaction, protocol, length, unit = struct.unpack_from(">HHHB", buffer, start)
    if protocol != 0:
        raise FramingError(f"protocol id {protocol} is not Modbus (0)")
    if not 2 <= length <= MAX_LENGTH:
        raise FramingError(f"MBAP length {length} is outside 2..{MAX_LENGTH}")
    used = 6 + length
    if len(buffer) - start < used:
        return None, 0
    return Frame(transaction, unit, bytes(buffer[start + MBAP_BYTES:start + used])), used


def decode_request(pdu: bytes) -> ModbusPDU | Refused:
    """The request in `pdu` (function code first) as pymodbus' request object, or why it is refused."""
    function = pdu[0]
    if function not in SERVED_FUNCTIONS:
        return Refused(function, ExcCodes.ILLEGAL_FUNCTION, Cause.UNSUPPORTED_FUNCTION,
                       f"function {function} is not served (this DER serves functions 3, 6 and 16)")
    body = pdu[1:]
    if function == WRITE_SINGLE:
        return _write_single(body)
    if function == READ_HOLDING:
        return _read(body)
    return _write_multiple(body)


def _read(body: bytes) -> ModbusPDU | Refused:
    if len(body) != 4:
        return _bad_length(READ_HOLDING, len(body), "4")
    address, count = struct.unpack(">HH", body)
    refused = _check_count(READ_HOLDING, address, count, MAX_READ_COUNT)
    return refused or ReadHoldingRegistersRequest(address=address, count=count)


def _write_single(body: bytes) -> ModbusPDU | Refused:
    if len(body) != 4:
        return _bad_length(WRITE_SINGLE, len(body), "4")
    address, value = struct.unpack(">HH", body)
    return WriteSingleRegisterRequest(address=address, registers=[value])


def _write_multiple(body: bytes) -> ModbusPDU | Refused:
    if len(body) < 5:
        return _bad_length(WRITE_MULTIPLE, len(body), "at least 5")
    address, count, byte_count = struct.unpack(">HHB", body[:5])
    refused = _check_count(WRITE_MULTIPLE, address, count, MAX_WRITE_COUNT)
    if refused is not None:
        return refused
    if byte_count != 2 * count or len(body) - 5 != byte_count:
        return Refused(WRITE_MULTIPLE, ExcCodes.ILLEGAL_VALUE, Cause.MALFORMED,
                       f"{count} registers need {2 * count} bytes; the byte count says {byte_count} "
                       f"and {len(body) - 5} came", address, count)
    registers = list(struct.unpack(f">{count}H", body[5:]))
    return WriteMultipleRegistersRequest(address=address, registers=registers)


def _check_count(function: int, address: int, count: int, most: int) -> Refused | None:
    if not 1 <= count <= most:
        return Refused(function, ExcCodes.ILLEGAL_VALUE, Cause.MALFORMED,
                       f"count {count} is outside 1..{most}", address, count)
    if address + count > REGISTER_SPACE:
        return Refused(function, ExcCodes.ILLEGAL_ADDRESS, Cause.BAD_ADDRESS,
                       f"{count} registers at {address} run past register {REGISTER_SPACE - 1}", address, count)
    return None


def _bad_length(function: int, got: int, expected: str) -> Refused:
    return Refused(function, ExcCodes.ILLEGAL_VALUE, Cause.MALFORMED,
                   f"function {function} carries {expected} data bytes, not {got}")
