"""HOST:PORT listen addresses, as every server of the gateway and the bench takes them."""

from __future__ import annotations

import ipaddress

from firmware_py.errors import InputError


def parse_host_port(text: str, key: str) -> tuple[str, int]:
    """'127.0.0.1:1502' or '[::1]:1502' -> (host, port); InputError naming `key` otherwise."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not (port.isascii() and port.isdigit()) or int(port) > 65_535:  # not "²"
        raise InputError(f"{key}: expected HOST:PORT (e.g. 127.0.0.1:1502), got {text!r}")
    return host, int(port)


def parse_ip_listen(text: str, key: str, examples: str) -> tuple[str, int]:
    """HOST:PORT to listen on, the host an IP address or localhost; InputError naming `key` otherwise.

    A host name would be looked up at each start and could stand for another machine, or none: the
    listener would fail to bind only then (exit 2 from `run`, after `check-config` called it valid).
    `examples` says which addresses to use instead."""
    host, port = parse_host_port(text, key)
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise InputError(f"{key}: {host!r} is not an IP address ({examples})") from None
    return host, port
