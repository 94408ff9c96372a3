"""The front door's request latency as a histogram, from HAProxy's own per-request log lines.

HAProxy keeps averages and maxima of its timers, no percentiles, so the gateway's HAProxy
also sends each request's log line (``option httplog``, syslog over UDP on the loopback) to
the farm exporter, which counts ``Ta`` — the time from the request's arrival to the end of
the response — into ``pifarm_edge_request_duration_seconds{backend,server,code_class}``.
Prometheus computes p50/p95/p99 from it (``histogram_quantile``); the edge SLO alert uses
the p95.

The HTTP log format (HAProxy's configuration manual, "HTTP log format")::

    <client>:<port> [<accept date>] <frontend> <backend>/<server> TR/Tw/Tc/Tr/Ta <status> ...

``Ta`` carries a ``+`` with ``option logasap``; a request HAProxy answered itself (400, 408,
413, 429, ...) has the server ``<NOSRV>`` and the frontend's name as backend, and is counted
too, under that name. Only the front door's frontend sends its lines to this port. A line that
is not an HTTP log line is ignored and counted in ``pifarm_edge_request_log_ignored_total``.
"""

from __future__ import annotations

import re
import socketserver
import threading
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram

# LLM requests: tens of milliseconds for /health to minutes for long generations.
BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0, 300.0)
HTTP_LOG = re.compile(
    r"\] (?P<frontend>\S+) (?P<backend>[^/\s]+)/(?P<server>\S+) "
    r"(?P<TR>-?\d+)/(?P<Tw>-?\d+)/(?P<Tc>-?\d+)/(?P<Tr>-?\d+)/\+?(?P<Ta>-?\d+) (?P<status>-?\d+) "
)
# A syslog datagram; HAProxy's lines stay far below this.
MAX_DATAGRAM = 8192


@dataclass(frozen=True)
class Request:
    frontend: str
    backend: str
    server: str
    status: int
    seconds: float


def parse_line(line: str) -> Request | None:
    """One HAProxy HTTP log line (with or without its syslog header), or None."""
    match = HTTP_LOG.search(line)
    if match is None:
        return None
    total_ms = int(match["Ta"])
    if total_ms < 0:
        return None
    return Request(
        frontend=match["frontend"].removesuffix("~"),
        backend=match["backend"],
        server=match["server"],
        status=int(match["status"]),
        seconds=total_ms / 1000.0,
    )


def code_class(status: int) -> str:
    return f"{status // 100}xx" if 100 <= status <= 599 else "other"


class EdgeLatency:
    """The histogram and the UDP listener that feeds it."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Histogram(
            "pifarm_edge_request_duration_seconds",
            "Time from a request's arrival at the front door to the end of its response (HAProxy Ta)",
            # server: a rollout's gate compares the p95 of the switched nodes' servers with the others'.
            ["backend", "server", "code_class"],
            buckets=BUCKETS,
            registry=registry,
        )
        self.ignored = Counter(
            "pifarm_edge_request_log_ignored",
            "Datagrams on the request log port that were not an HTTP log line",
            registry=registry,
        )
        self.server: socketserver.UDPServer | None = None

    def observe_line(self, line: str) -> bool:
        request = parse_line(line)
        if request is None:
            self.ignored.inc()
            return False
        self.requests.labels(request.backend, request.server, code_class(request.status)).observe(
            request.seconds
        )
        return True

    def listen(self, address: str, port: int) -> tuple[str, int]:
        """Receives HAProxy's datagrams on a daemon thread; returns the bound address."""
        latency = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                data = self.request[0]
                latency.observe_line(data[:MAX_DATAGRAM].decode("utf-8", errors="replace"))

        self.server = socketserver.UDPServer((address, port), Handler)
        threading.Thread(target=self.server.serve_forever, name="request-log", daemon=True).start()
        return self.server.server_address[:2]

    @property
    def listening(self) -> bool:
        return self.server is not None

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
