"""The bench run as a picture: SoC against the floor, setpoint against measured power.

matplotlib is an optional extra (`pip install 'powershare-gw[plot]'`): a
gateway on a small ARM board never needs it, so it is imported only here.
"""

from __future__ import annotations

from pathlib import Path

from firmware_py.errors import InputError
from firmware_py.files import replacing


def draw(series: list[tuple[float, ...]], faults: list[dict], title: str, path: Path) -> None:
    """`series` rows: (t, soc, floor, setpoint_w, inverter_w, in_event)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError(f"{path}: cannot draw the plot: matplotlib is not installed "
                         "(pip install 'powershare-gw[plot]')") from None
    if not series:
        raise InputError(f"{path}: nothing to plot: the run produced no trace records")
    hours = [row[0] / 3600 for row in series]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(11, 6.5), constrained_layout=True)
    top.plot(hours, [row[1] for row in series], label="SoC (true)", color="tab:green")
    top.plot(hours, [row[2] for row in series], label="floor", color="tab:red", linestyle="--")
    top.set_ylabel("state of charge, %")
    bottom.plot(hours, [row[3] / 1000 for row in series], label="setpoint", color="tab:blue")
    bottom.plot(hours, [row[4] / 1000 for row in series], label="inverter (measured)", color="tab:orange",
                alpha=0.8)
    bottom.set_ylabel("power, kW (+ discharge)")
    bottom.set_xlabel("simulated time, h")
    for axis in (top, bottom):
        _shade_events(axis, hours, [row[5] for row in series])
        for fault in faults:
            axis.axvline(fault["at_s"] / 3600, color="black", linewidth=0.8, linestyle=":")
        axis.grid(alpha=0.3)
        axis.legend(loc="upper right")
    for fault in faults:
        top.annotate(fault["kind"], (fault["at_s"] / 3600, top.get_ylim()[1]), rotation=90, fontsize=7,
                     va="top", ha="right")
    top.set_title(title)
    try:
        with replacing(path, binary=True) as out:  # a plot that fails part-way leaves the one that was there
            fig.savefig(out, format=path.suffix.lstrip(".").lower(), dpi=110)
    except OSError as err:
        raise InputError(f"{path}: cannot write the plot: {err.strerror or err}") from None
    finally:
        plt.close(fig)


def _shade_events(axis, hours: list[float], active: list[float]) -> None:
    """Shade the spans in which a dispatch event was being served."""
    start = None
    for h, on in zip(hours, active):
        if on and start is None:
            start = h
        elif not on and start is not None:
            axis.axvspan(start, h, color="gold", alpha=0.15)
            start = None
    if start is not None:
        axis.axvspan(start, hours[-1], color="gold", alpha=0.15)
