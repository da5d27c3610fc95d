"""The live progress line of `powershare-gw sim` (rich, on stderr)."""

from __future__ import annotations

from rich.console import Console
from rich.live import Live
from rich.text import Text


class Progress:
    def __init__(self, scenario) -> None:
        self.duration = scenario.run.duration_s
        self.live = Live(Text("starting…"), console=Console(stderr=True), refresh_per_second=8, transient=True)
        self.live.start()

    def update(self, bench) -> None:
        c, t = bench.gateway.controller, bench.t
        h, rem = divmod(int(t), 3600)
        line = (f"{h:02d}:{rem // 60:02d}:{rem % 60:02d} sim ({100 * t / self.duration:5.1f} %)  "
                f"SoC {bench.battery.true_soc_pct:6.2f} %  floor {c.floor_pct(t):5.1f} %  "
                f"{bench.model.ac_power_w / 1000:6.2f} kW  {c.mode.value:<9} {c.serving_id or '-'}")
        self.live.update(Text(line))

    def close(self) -> None:
        self.live.stop()
