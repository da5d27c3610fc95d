"""The tests' loopback ports: two servers started side by side must not be handed the same one."""

from __future__ import annotations

from firmware_py.sim.ports import BLOCK, free_port


def test_ports_asked_one_after_another_differ_until_the_block_is_used_up() -> None:
    """A gateway's DER server and web app are asked for ports before either listens; a repeat fails its start."""
    ports = [free_port() for _ in range(BLOCK // 3)]
    assert len(set(ports)) == len(ports)
