"""Who holds the other end of a connection on this machine: the user a secret would be sent to.

The owner's commands send the owner token to whatever listens on the owner API's address. While the
gateway is stopped or restarting, any local user may listen there (a port above 1024 on loopback is
anyone's), and would be handed the token that also logs into the web app. So before the token goes,
the command asks the kernel whose the listening end is: a Unix socket says it itself (`SO_PEERCRED`);
for TCP on this machine, the kernel's socket table (`/proc/net/tcp`, `tcp6`) lists the accepted socket
with its owner's uid.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from pathlib import Path

PROC_NET = Path("/proc/net")
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_LITTLE_ENDIAN = struct.pack("=I", 1) == struct.pack("<I", 1)


def peer_uid(sock: socket.socket, proc_net: Path = PROC_NET) -> int | None:
    """The uid of the process at the other end of the connected `sock`, or None where this machine cannot
    tell (a peer on another machine, no /proc)."""
    if sock.family == socket.AF_UNIX:
        _, uid, _ = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
        return uid
    ours, theirs = _endpoint(sock.getsockname()), _endpoint(sock.getpeername())
    table = proc_net / ("tcp6" if sock.family == socket.AF_INET6 else "tcp")
    try:
        lines = table.read_text(encoding="ascii").splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) > 7 and _decode(fields[1]) == theirs and _decode(fields[2]) == ours:
            return int(fields[7])
    return None


def _endpoint(address: tuple) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    return ipaddress.ip_address(address[0].split("%")[0]), int(address[1])


def _decode(text: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int] | None:
    """An address of the kernel's table: the IP as 32-bit words in the machine's byte order, hex; the port hex."""
    host, _, port = text.partition(":")
    try:
        raw = bytes.fromhex(host)
        words = b"".join(raw[i:i + 4][::-1] if _LITTLE_ENDIAN else raw[i:i + 4] for i in range(0, len(raw), 4))
        return ipaddress.ip_address(words), int(port, 16)
    except ValueError:
        return None

