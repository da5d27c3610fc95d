"""Loopback ports for the bench's peers and the tests' servers, one way for both.

A port asked of the kernel (`bind(0)`) comes from the ephemeral range, the range every outgoing
connection on the machine also draws from: between the probe closing and the server binding (a
child process importing for seconds), a client may take it, and the server exits before it is
ready. So a port here comes from below the ephemeral range, from a block of its own for each
pytest-xdist worker (the test suite runs the bench too, on several workers at once), and is
checked free by binding it. Within a process, ports are handed out in a shuffled round through the
block, so two asked one after the other (a gateway's DER server and its web app) never get the same
port while neither listens yet.
"""

from __future__ import annotations

import functools
import itertools
import os
import random
import re
import socket
from collections.abc import Iterator

BLOCK = 1500
FIRST = 16000  # blocks of BLOCK ports from here, one per worker, all below Linux's ephemeral range (32768)
WORKERS = (32768 - FIRST) // BLOCK
TRIES = 200


def _block() -> range:
    """This worker's ports: `gw3` takes the fourth block; a run without workers the first."""
    match = re.fullmatch(r"gw(\d+)", os.environ.get("PYTEST_XDIST_WORKER", ""))
    n = int(match.group(1)) % WORKERS if match else 0
    return range(FIRST + n * BLOCK, FIRST + (n + 1) * BLOCK)


@functools.cache
def _rounds() -> Iterator[int]:
    """This worker's block, shuffled once, over and over: each port given again only after all the others."""
    return itertools.cycle(random.sample(_block(), BLOCK))


def free_port() -> int:
    """A loopback port nobody listens on now and not handed out recently, from this worker's block."""
    block = _block()
    for port in itertools.islice(_rounds(), TRIES):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free loopback port in {block.start}-{block.stop - 1} after {TRIES} tries")
