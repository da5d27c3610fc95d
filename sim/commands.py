"""`powershare-gw sim` and its parts run alone (`sim bms`, `sim inverter`)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from sim import bms_node, inverter

    p = sub.add_parser("sim", help="run the whole bench simulator (or one of its parts)")
    p.set_defaults(handler=lambda args: p.print_help() or 0)
    parts = p.add_subparsers(dest="sim_part", metavar="PART")
    bms_node.register(parts)
    inverter.register(parts)
