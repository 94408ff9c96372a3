"""The front door's latency histogram from HAProxy's HTTP log lines, over a real UDP socket."""

from __future__ import annotations

import socket
import time

import pytest
from agent_helpers import metric_samples
from prometheus_client import CollectorRegistry, generate_latest

from pifarm_agent.exporter import ExporterConfig, registry_for
from pifarm_agent.request_log import EdgeLatency, code_class, parse_line

# HAProxy's configuration manual, "HTTP log format" (its example line).
MANUAL_EXAMPLE = (
    "haproxy[14389]: 10.0.1.2:33317 [06/Feb/2009:12:14:14.655] http-in static/srv1 10/0/30/69/109 200 2750 "
    '- - ---- 1/1/1/1/0 0/0 {1wt.eu} {} "GET /index.html HTTP/1.1"'
)
# Received from Debian 12's HAProxy 2.6.12 (frontend with `log 127.0.0.1:5140 local1 info`).
RECORDED = (
    b"<142>Nov 23 07:21:55 haproxy[195]: 127.0.0.1:42876 [23/Nov/2026:07:21:55.230] inference edge_x/node1 "
    b'0/0/0/1/1 200 1031 - - ---- 1/1/0/0/0 0/0 "GET / HTTP/1.1"\n'
)
# The same form with the timers of a completion: an edge backend, 2.311 s.
SENT = (
    "<134>Nov 23 07:20:00 haproxy[812]: 172.18.0.1:51022 [23/Nov/2026:07:19:58.412] inference "
    'edge_gemma3-270m/node1 0/0/1/2310/2311 200 901 - - ---- 1/1/0/0/0 0/0 "POST /v1/completions HTTP/1.1"'
)
# Answered by HAProxy itself: the API key check (401), no server.
REFUSED = (
    "<134>Nov 23 07:20:01 haproxy[812]: 172.18.0.1:51030 [23/Nov/2026:07:20:01.002] inference "
    'inference/<NOSRV> 0/-1/-1/-1/0 401 178 - - PR-- 1/1/0/0/0 0/0 "POST /v1/completions HTTP/1.1"'
)


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple], float]:
    return metric_samples(generate_latest(registry).decode())


def test_the_recorded_datagram_parses():
    request = parse_line(RECORDED.decode())
    assert (request.frontend, request.backend, request.server, request.status, request.seconds) == (
        "inference",
        "edge_x",
        "node1",
        200,
        0.001,
    )


def test_the_manual_example_and_the_gateway_line_parse():
    example = parse_line(MANUAL_EXAMPLE)
    assert (example.frontend, example.backend, example.server, example.status, example.seconds) == (
        "http-in",
        "static",
        "srv1",
        200,
        0.109,
    )
    sent = parse_line(SENT)
    assert (sent.backend, sent.server, sent.seconds) == ("edge_gemma3-270m", "node1", 2.311)
    refused = parse_line(REFUSED)
    assert (refused.backend, refused.server, refused.status, refused.seconds) == (
        "inference",
        "<NOSRV>",
        401,
        0.0,
    )


@pytest.mark.parametrize(
    "line",
    ["", "haproxy[1]: Proxy inference started.", "Server edge_gemma/node1 is DOWN, reason: Layer4 timeout"],
)
def test_other_lines_are_not_requests(line):
    assert parse_line(line) is None


def test_logasap_and_ssl_frontends_are_understood():
    line = SENT.replace("0/0/1/2310/2311", "0/0/1/2310/+2311").replace(" inference ", " inference~ ")
    request = parse_line(line)
    assert (request.frontend, request.seconds) == ("inference", 2.311)


def test_code_classes():
    assert [code_class(s) for s in (200, 302, 429, 503, -1)] == ["2xx", "3xx", "4xx", "5xx", "other"]


def test_lines_sent_over_udp_land_in_the_histogram():
    registry = CollectorRegistry()
    edge = EdgeLatency(registry)
    address = edge.listen("127.0.0.1", 0)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            for line in (SENT, SENT, REFUSED, MANUAL_EXAMPLE, "not a log line"):
                sender.sendto(line.encode(), address)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            got = samples(registry)
            if got.get(("pifarm_edge_request_log_ignored_total", ())) == 1.0:
                break
            time.sleep(0.02)
    finally:
        edge.close()
    ok = (("backend", "edge_gemma3-270m"), ("code_class", "2xx"), ("server", "node1"))
    assert got[("pifarm_edge_request_duration_seconds_count", ok)] == 2.0
    assert got[("pifarm_edge_request_duration_seconds_sum", ok)] == pytest.approx(4.622)
    assert got[("pifarm_edge_request_duration_seconds_bucket", (*ok[:2], ("le", "2.0"), ok[2]))] == 0.0
    assert got[("pifarm_edge_request_duration_seconds_bucket", (*ok[:2], ("le", "4.0"), ok[2]))] == 2.0
    refused = (("backend", "inference"), ("code_class", "4xx"), ("server", "<NOSRV>"))
    assert got[("pifarm_edge_request_duration_seconds_count", refused)] == 1.0
    static = (("backend", "static"), ("code_class", "2xx"), ("server", "srv1"))
    assert got[("pifarm_edge_request_duration_seconds_count", static)] == 1.0
    assert got[("pifarm_edge_request_log_ignored_total", ())] == 1.0


def test_the_exporter_lists_the_request_log_source_only_when_it_listens():
    config = ExporterConfig.parse(
        {
            "node": "gateway1",
            "port": 9110,
            "root": "/nonexistent",
            "vcgencmd": "/bin/false",
            "request_log_port": 5140,
        }
    )
    got = samples(registry_for(config, run=lambda argv: ""))
    assert got[("pifarm_exporter_source_up", (("source", "edge_requests"),))] == 0.0
    assert ("pifarm_edge_request_log_listening", ()) not in got
