"""`/metrics` on `[metrics] listen`: the Prometheus text format, served by the gateway itself.

One small aiohttp server (the web app's library: no second HTTP stack in memory).
A scrape reads the gateway on the event loop (attribute reads, microseconds) and
renders the text in a worker thread, with the process's own figures (RSS, open
descriptors, CPU) read from /proc there too: the loop is never held by a scraper.

    GET /metrics     the metrics (text/plain; version per prometheus-client)
    GET /            a line saying where they are

A listen address that cannot be bound stops `run` at start with exit 2, like the
other listeners. The default is loopback: on a LAN, put a firewall rule or the
scraper's tunnel in front (the metrics hold no secrets, but they tell what the
truck is doing).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, ProcessCollector, disable_created_metrics, generate_latest
from prometheus_client.core import Metric

from firmware_py.addresses import parse_host_port, parse_ip_listen
from firmware_py.config import Config
from firmware_py.errors import InputError
from firmware_py.http_listener import HttpListener, serve_until_cancelled
from firmware_py.metrics.families import PREFIX, GatewayMetrics
from firmware_py.version import software_version

if TYPE_CHECKING:
    from firmware_py.gateway import Gateway

log = logging.getLogger(__name__)


def check(config: Config) -> list[str]:
    """The listen address: HOST:PORT with an IP address (or localhost) for the host."""
    try:
        parse_ip_listen(config.metrics.listen, "metrics.listen", "127.0.0.1 for this machine only, the "
                        "gateway's LAN address, or 0.0.0.0 for every interface")
    except InputError as err:
        return err.problems
    return []


class _Scrape:
    """One scrape's families, already read on the loop, and the process collector: what the renderer walks."""

    def __init__(self, families: list[Metric], process: ProcessCollector) -> None:
        self.families, self.process = families, process

    def collect(self) -> list[Metric]:
        return [*self.families, *self.process.collect()]


class MetricsServer:
    """The metrics endpoint for one running gateway: an integration in `assembly.INTEGRATIONS` (`[metrics]`)."""

    def __init__(self, config: Config, gateway: Gateway) -> None:
        self.config = config
        self.host, self.port = parse_host_port(config.metrics.listen, "metrics.listen")
        disable_created_metrics()  # no `_created` series: a scraper derives nothing from them here
        self.metrics = GatewayMetrics(gateway, software_version())
        self.process = ProcessCollector(namespace=PREFIX, registry=None)
        self.listener = HttpListener(f"metrics.listen: cannot listen on {config.metrics.listen}",
                                     shutdown_timeout_s=0.5)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    async def start(self, sink: Any = None) -> int:
        """Bind; InputError (exit 2) when the address cannot be listened on."""
        if self.listener.listening:
            return self.port
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/", self._index)
        await self.listener.start(app, lambda runner: web.TCPSite(runner, self.host, self.port, reuse_address=True))
        self.port = self.listener.bound[1]
        log.info("metrics on %s", self.url)
        return self.port

    async def run(self, sink: Any = None) -> None:
        """Serve until cancelled."""
        await serve_until_cancelled(self.start, self.stop)

    async def stop(self) -> None:
        await self.listener.stop()

    async def render(self) -> bytes:
        """The text a scrape gets: read here, rendered (and /proc read) in a worker thread."""
        scrape = _Scrape(self.metrics.collect(), self.process)
        return await asyncio.to_thread(generate_latest, scrape)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=await self.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _index(self, request: web.Request) -> web.Response:
        return web.Response(text="powershare-gw: metrics at /metrics\n")
