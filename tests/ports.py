"""Loopback ports for the tests' servers and children, one way for every test.

A port asked of the kernel (`bind(0)`) comes from the ephemeral range, the range every outgoing
connection of every test worker also draws from: between the probe closing and the server binding,
another worker's client may take it, and the server's child exits before it is ready. So a port here
comes from below the ephemeral range, from a block of its own for each pytest-xdist worker, and is
checked free by binding it.
"""

from __future__ import annotations

import os
import random
import re
import socket

BLOCK = 1500
FIRST = 16000  # blocks of BLOCK ports from here, one per worker, all below Linux's ephemeral range (32768)
WORKERS = (32768 - FIRST) // BLOCK
TRIES = 200


def _block() -> range:
    """This worker's ports: `gw3` takes the fourth block; a run without workers the first."""
    match = re.fullmatch(r"gw(\d+)", os.environ.get("PYTEST_XDIST_WORKER", ""))
    n = int(match.group(1)) % WORKERS if match else 0
    return range(FIRST + n * BLOCK, FIRST + (n + 1) * BLOCK)


def free_port() -> int:
    """A loopback port nobody listens on now, from this worker's block."""
    block = _block()
    for port in random.sample(block, TRIES):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free loopback port in {block.start}-{block.stop - 1} after {TRIES} tries")
