"""The software version people and peers are told (Home Assistant's device, `powershare_build_info`)."""

from __future__ import annotations

from importlib import metadata


def software_version() -> str:
    """The installed distribution's version; "unknown" when run from files that were never installed."""
    try:
        return metadata.version("powershare-gw")
    except metadata.PackageNotFoundError:
        return "unknown"
