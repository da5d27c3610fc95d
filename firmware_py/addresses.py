"""HOST:PORT listen addresses, as every server of the gateway and the bench takes them."""

from __future__ import annotations

from firmware_py.errors import InputError


def parse_host_port(text: str, key: str) -> tuple[str, int]:
    """'127.0.0.1:1502' or '[::1]:1502' -> (host, port); InputError naming `key` otherwise."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not (port.isascii() and port.isdigit()) or int(port) > 65_535:  # not "²"
        raise InputError(f"{key}: expected HOST:PORT (e.g. 127.0.0.1:1502), got {text!r}")
    return host, int(port)
