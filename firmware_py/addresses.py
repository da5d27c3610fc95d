"""HOST:PORT listen addresses, as every server of the gateway and the bench takes them."""

from __future__ import annotations

import ipaddress
import re

from firmware_py.errors import InputError

HOST_NAME_CHARS = 253
"""The longest host name DNS can carry (RFC 1035: 255 octets on the wire)."""
_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")  # "_": not DNS's, but /etc/hosts may hold one


def host_problem(host: str) -> str | None:
    """Why `host` can name no machine, to follow "HOST is" (None: an IP address, or a name DNS could carry). Anything else
    would be looked up at every reconnect, fail each time and fill the log with itself."""
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    try:
        name = host.encode("idna").decode("ascii")  # as the resolver will: bücher.example is xn--bcher-kva.example
    except UnicodeError:
        name = host  # not a name IDNA can encode: the checks below say why
    name = name[:-1] if name.endswith(".") else name
    if len(name) > HOST_NAME_CHARS:
        return f"too long for a host name ({len(name):,} characters; at most {HOST_NAME_CHARS})"
    labels = name.split(".")
    if not all(_LABEL.fullmatch(label) for label in labels):
        return ("neither an IP address nor a host name (letters, digits, hyphens and underscores, at most 63 "
                "between dots, no hyphen first or last)")
    if labels[-1].isdigit():  # no top-level domain is all digits (RFC 3696): a mistyped address
        return "not an IP address (each of its four numbers 0 to 255), nor a host name"
    return None


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
