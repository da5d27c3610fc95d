"""Placeholder until its issue lands."""

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add `sim <part>` to the parser."""
