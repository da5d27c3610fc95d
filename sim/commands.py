"""Subcommands of this subsystem (filled in by its issue)."""

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add this subsystem's subcommands to the top-level parser."""
